//! `cargo xtask bench` end to end, shortened: the real matrix (five configurations, each a
//! fresh two-node cluster) with one round of one-second runs, into a scratch directory. Checks
//! that every configuration × metric was measured and written with its path, and that the chart
//! names them all. Not run in the 5.10 guest (no iperf3 there); timing figures come from
//! `cargo xtask bench` itself, never from here.

use std::process::Command;

#[test]
fn the_matrix_writes_every_measurement_and_the_chart() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the benchmark builds clusters of network namespaces; run `sudo cargo xtask test`"
    );
    let out = std::env::temp_dir().join(format!("sluice-bench-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_sluice-lab"))
        .args([
            "bench",
            "--runs",
            "1",
            "--seconds",
            "1",
            "--rate-seconds",
            "0.5",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run sluice-lab bench");
    let json = std::fs::read_to_string(out.join("results.json"));
    let svg = std::fs::read_to_string(out.join("results.svg"));
    let _ = std::fs::remove_dir_all(&out);
    assert!(status.success(), "sluice-lab bench failed: {status}");
    let json: serde_json::Value =
        serde_json::from_str(&json.expect("results.json")).expect("results.json is JSON");
    let results = json["results"].as_array().expect("results");
    let configs = sluice_lab::bench::matrix::CONFIGS;
    let metrics = sluice_lab::bench::matrix::METRICS;
    for (mode, path) in configs {
        for (metric, _, _) in metrics {
            let found = results
                .iter()
                .find(|r| r["mode"] == mode && r["path"] == path && r["metric"] == metric)
                .unwrap_or_else(|| panic!("no {mode}/{path} {metric} in {json}"));
            let median = found["median"].as_f64().expect("a median");
            assert!(median > 0.0, "{mode}/{path} {metric} = {median}");
        }
    }
    assert!(json["machine"]["kernel"].is_string() && json["command"].is_string());
    sluice_lab::bench::chart::check(&svg.expect("results.svg")).expect("a complete chart");
}
