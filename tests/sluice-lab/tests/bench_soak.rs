//! `cargo xtask bench soak` end to end, shortened: a few hundred tunnels instead of ten
//! thousand, one-second phases, into a scratch directory. Checks what the soak reports: every
//! tunnel opened and carried its trickle with no error, the flood got nothing through and was
//! refused, each proxy's descriptors came back to where they started and its memory per tunnel
//! is in range. Timing figures come from `cargo xtask bench soak` itself, never from here.

use std::process::Command;

#[test]
fn a_short_soak_holds_every_tunnel_refuses_the_flood_and_gives_everything_back() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the soak builds a cluster of network namespaces; run `sudo cargo xtask test`"
    );
    let out = std::env::temp_dir().join(format!("sluice-soak-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_sluice-lab"))
        .args([
            "bench",
            "soak",
            "--connections",
            "400",
            "--pods",
            "2",
            "--seconds",
            "1",
            "--rr-seconds",
            "0.5",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run sluice-lab bench soak");
    let json = std::fs::read_to_string(out.join("soak.json"));
    let _ = std::fs::remove_dir_all(&out);
    assert!(status.success(), "sluice-lab bench soak failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(&json.expect("soak.json")).expect("soak.json is JSON");
    assert_eq!(report["opened"], 400, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let workload = report["workload"].as_array().expect("workload");
    assert!(
        workload.iter().all(|w| w["trickles"].as_u64() > Some(0)),
        "every holder trickled: {report}"
    );
    assert_eq!(report["flood"]["accepted"], 0, "{report}");
    assert!(
        report["flood"]["attempts"].as_u64() > Some(0),
        "the flood ran: {report}"
    );
    for proxy in report["proxies"].as_array().expect("proxies") {
        let fds = |at: &str| proxy[at]["fds"].as_u64().expect("fds");
        assert!(
            fds("peak") >= fds("cold") + 400,
            "each proxy held a socket per tunnel: {proxy}"
        );
        assert!(
            fds("after") <= fds("cold") + 2,
            "every descriptor given back: {proxy}"
        );
        let per_tunnel = proxy["rss_per_connection_kb"].as_f64().expect("rss");
        assert!(
            per_tunnel > 0.0 && per_tunnel < 200.0,
            "memory per tunnel out of range: {proxy}"
        );
        assert!(
            proxy["rss_after_ratio"].as_f64() < Some(1.5),
            "a round left more behind than the warm-up round did: {proxy}"
        );
    }
    for phase in ["idle", "load", "load_and_flood"] {
        assert!(
            report["rr_us"][phase]["p99"].as_f64() > Some(0.0),
            "{phase} latency measured: {report}"
        );
    }
}
