//! Authorization and PeerAuthentication across two nodes, with Istio's own objects in the mesh
//! file: the getting-started scenario (sleep may reach productpage, notsleep is reset), DENY
//! over ALLOW, a policy change closing a live connection, STRICT vs PERMISSIVE for plaintext.

use std::net::SocketAddr;

use anyhow::{Result, ensure};
use sluice_capture::Backend;
use sluice_lab::app::{self, Outcome, Session};
use sluice_lab::cluster::{Cluster, PodSpec};

const fn pod(name: &'static str, node: usize, host: u8, meshed: bool) -> PodSpec {
    PodSpec::new(name, node, host, meshed)
}

/// Clients on node 0 (sleep, notsleep meshed; legacy not), servers on node 1.
const PODS: [PodSpec; 5] = [
    pod("sleep", 0, 2, true),
    pod("notsleep", 0, 3, true),
    pod("legacy", 0, 9, false),
    pod("productpage", 1, 2, true),
    pod("reviews", 1, 3, true),
];

const PRODUCTPAGE_VIEWER: &str = r#"- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: productpage-viewer, namespace: default}
  spec:
    selector: {matchLabels: {app: productpage}}
    action: ALLOW
    rules:
      - from:
          - source:
              principals:
                - cluster.local/ns/default/sa/sleep
                - cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account
"#;

const DENY_SLEEP_8080: &str = r#"- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-sleep-8080, namespace: default}
  spec:
    action: DENY
    rules:
      - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
        to: [{operation: {ports: ["8080"]}}]
"#;

const STRICT: &str = r#"- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec: {mtls: {mode: STRICT}}
"#;

fn call(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<Outcome> {
    let place = if cluster.pod(from).meshed {
        cluster.pod(from).place()
    } else {
        cluster.pod(from).place_server()
    };
    app::run_client(&place, to, 16 * 1024)
}

fn allowed(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<()> {
    let outcome = call(cluster, from, to)?;
    ensure!(
        outcome.ok && outcome.echoed == 16 * 1024,
        "{from} -> {to} must work: {outcome:?}"
    );
    Ok(())
}

/// A denied client sees a reset, not a clean close (Istio: curl exit 56).
fn reset(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<()> {
    let outcome = call(cluster, from, to)?;
    let error = outcome.error.clone().unwrap_or_default();
    ensure!(
        !outcome.ok && error.contains("reset"),
        "{from} -> {to} must be reset: {outcome:?}"
    );
    Ok(())
}

pub fn authorization_and_peer_authentication_are_enforced_at_the_destination(
    backend: Backend,
) -> Result<()> {
    let mut cluster = Cluster::new(backend, &PODS, &[])?;
    let productpage = cluster.pod("productpage").addr(8080);
    let reviews = cluster.pod("reviews").addr(8080);
    let _servers = [
        app::spawn_server(&cluster.pod("productpage").place_server(), &[productpage])?,
        app::spawn_server(&cluster.pod("reviews").place_server(), &[reviews])?,
    ];

    // No policy: everyone reaches productpage, plaintext too (PERMISSIVE by default).
    allowed(&cluster, "notsleep", productpage)?;
    allowed(&cluster, "legacy", productpage)?;

    // Istio's getting-started policy: sleep allowed, notsleep and plaintext reset.
    cluster.set_policies(PRODUCTPAGE_VIEWER)?;
    allowed(&cluster, "sleep", productpage)?;
    reset(&cluster, "notsleep", productpage)?;
    reset(&cluster, "legacy", productpage)?;
    allowed(&cluster, "notsleep", reviews)?;
    cluster.proxies[1].wait_for_log(&[
        "connection denied by policy (401)",
        "sa/notsleep",
        "no ALLOW policy matched",
    ])?;
    cluster.proxies[0].wait_for_log(&["denied by the destination's policy (401); reset"])?;

    // A live connection of sleep is closed when a DENY that matches it appears; DENY wins over
    // the ALLOW for new connections too.
    let mut live = Session::open(&cluster.pod("sleep").place(), productpage)?;
    live.round_trip(4096)?;
    cluster.set_policies(&format!("{PRODUCTPAGE_VIEWER}{DENY_SLEEP_8080}"))?;
    ensure!(
        live.round_trip(4096).is_err(),
        "the live connection must be closed"
    );
    reset(&cluster, "sleep", productpage)?;
    cluster.proxies[1].wait_for_log(&[
        "tunnel closed: a policy change denies it",
        "default/deny-sleep-8080",
    ])?;
    cluster.proxies[1].wait_for_log(&[
        "connection denied by policy (401)",
        "default/deny-sleep-8080",
    ])?;

    // STRICT mesh-wide: plaintext is refused even where no AuthorizationPolicy applies, while
    // mesh clients still get through.
    cluster.set_policies("[]")?;
    allowed(&cluster, "legacy", reviews)?;
    cluster.set_policies(STRICT)?;
    reset(&cluster, "legacy", reviews)?;
    allowed(&cluster, "notsleep", reviews)?;
    cluster.proxies[1].wait_for_log(&[
        "plaintext connection denied by policy",
        "istio-system/default (PeerAuthentication STRICT)",
    ])?;

    // A malformed policy is reported and fails closed for what it selects; others keep working.
    cluster.set_policies(&format!(
        "{PRODUCTPAGE_VIEWER}- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  \
         metadata: {{name: broken, namespace: default}}\n  spec:\n    selector: {{matchLabels: {{app: reviews}}}}\n    \
         rules: [{{from: [{{source: {{ipBlocks: [\"10.0.0.0/40\"]}}}}]}}]\n"
    ))?;
    cluster.proxies[1].wait_for_log(&["default/broken", "ipBlocks"])?;
    reset(&cluster, "notsleep", reviews)?;
    allowed(&cluster, "sleep", productpage)?;
    Ok(())
}

/// The sum of `metric`'s series whose labels include every one of `labels` (`k="v"`).
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits (bounded) until `check` holds on the proxy's metrics; returns the last scrape.
fn scrape_until(cluster: &Cluster, proxy: usize, check: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = std::time::Instant::now() + sluice_lab::WAIT;
    loop {
        let (status, text) = cluster.proxies[proxy].get("metrics", "/metrics")?;
        ensure!(status == 200, "metrics answered {status}");
        if check(&text) || std::time::Instant::now() > deadline {
            return Ok(text);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn metrics_config_dump_and_readiness_show_what_the_proxy_does(backend: Backend) -> Result<()> {
    let cluster = Cluster::new(
        backend,
        &[
            pod("sleep", 0, 2, true),
            pod("legacy", 0, 9, false),
            pod("productpage", 1, 2, true),
        ],
        &[],
    )?;
    let productpage = cluster.pod("productpage").addr(8080);
    let _server = app::spawn_server(&cluster.pod("productpage").place_server(), &[productpage])?;
    for proxy in &cluster.proxies {
        let (status, body) = proxy.get("readiness", "/healthz/ready")?;
        ensure!(status == 200, "readiness: {status} {body}");
    }

    // Known traffic: 3 tunnelled connections of 16 KiB each way (plus the server's greeting
    // line back), and 1 plaintext one.
    const BYTES: u64 = 16 * 1024;
    let mut to_client = 0;
    for _ in 0..3 {
        let outcome = app::run_client(&cluster.pod("sleep").place(), productpage, BYTES)?;
        ensure!(outcome.ok, "{outcome:?}");
        to_client +=
            BYTES + format!("peer={}\n", outcome.server_saw.unwrap_or_default()).len() as u64;
    }
    let plain = app::run_client(&cluster.pod("legacy").place_server(), productpage, BYTES)?;
    ensure!(plain.ok, "{plain:?}");

    let hbone = [
        "source_workload=\"sleep\"",
        "destination_workload=\"productpage\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    for (proxy, reporter) in [(1, "reporter=\"destination\""), (0, "reporter=\"source\"")] {
        let mut labels = hbone.to_vec();
        labels.push(reporter);
        let text = scrape_until(&cluster, proxy, |t| {
            metric(t, "istio_tcp_connections_closed_total", &labels) >= 3
        })?;
        let get = |name| metric(&text, name, &labels);
        ensure!(
            get("istio_tcp_connections_opened_total") == 3,
            "opened ({reporter}):\n{text}"
        );
        ensure!(
            get("istio_tcp_connections_closed_total") == 3,
            "closed ({reporter}):\n{text}"
        );
        ensure!(
            get("istio_tcp_received_bytes_total") == 3 * BYTES,
            "received ({reporter}):\n{text}"
        );
        ensure!(
            get("istio_tcp_sent_bytes_total") == to_client,
            "sent ({reporter}): want {to_client}\n{text}"
        );
    }
    let text = scrape_until(&cluster, 1, |t| {
        metric(
            t,
            "istio_tcp_connections_closed_total",
            &["connection_security_policy=\"none\""],
        ) >= 1
    })?;
    let plain_labels = [
        "reporter=\"destination\"",
        "source_workload=\"legacy\"",
        "source_principal=\"unknown\"",
        "connection_security_policy=\"none\"",
    ];
    ensure!(
        metric(&text, "istio_tcp_connections_opened_total", &plain_labels) == 1,
        "{text}"
    );
    ensure!(
        metric(&text, "istio_tcp_received_bytes_total", &plain_labels) == BYTES,
        "{text}"
    );
    ensure!(
        metric(
            &text,
            "sluice_hbone_server_total",
            &["outcome=\"tunnelled\""]
        ) == 3,
        "{text}"
    );
    let client_side = cluster.proxies[0].get("metrics", "/metrics")?.1;
    ensure!(
        metric(&client_side, "sluice_pool_handshakes_total", &[]) == 1,
        "3 tunnels in a row share one pooled connection: {client_side}"
    );
    if backend == Backend::Ebpf {
        ensure!(
            metric(&text, "sluice_capture_verdicts_total", &[]) > 0,
            "eBPF verdicts are exported: {text}"
        );
    }

    // One access line per connection with both addresses and identities, bytes and duration.
    let productpage_id = "dst_identity=spiffe://cluster.local/ns/default/sa/productpage";
    let sent = format!("bytes_sent={BYTES}");
    cluster.proxies[1].wait_for_log_lines(
        &[
            "connection closed",
            "direction=\"inbound\"",
            "hbone=true",
            "src_identity=spiffe://cluster.local/ns/default/sa/sleep",
            productpage_id,
            &sent,
            "duration_ms=",
        ],
        3,
    )?;
    cluster.proxies[1].wait_for_log(&[
        "connection closed",
        "direction=\"inbound\"",
        "hbone=false",
        "src_identity=-",
        productpage_id,
        &sent,
    ])?;
    cluster.proxies[0].wait_for_log_lines(
        &[
            "connection closed",
            "direction=\"outbound\"",
            "hbone=true",
            "src_identity=spiffe://cluster.local/ns/default/sa/sleep",
            productpage_id,
            &format!("dst={productpage}"),
        ],
        3,
    )?;

    // The config dump shows what is enforced, and certificates without keys.
    let (status, dump) = cluster.proxies[1].get("admin", "/config_dump")?;
    ensure!(status == 200, "config dump: {status}");
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    let uid = cluster.pod("productpage").uid.to_string();
    ensure!(dump["pods"] == serde_json::json!([uid]), "{dump:#}");
    ensure!(
        dump["mesh"]["workloads"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w["identity"] == "spiffe://cluster.local/ns/default/sa/productpage")),
        "{dump:#}"
    );
    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    ensure!(
        certs.iter().any(
            |c| c["identity"] == "spiffe://cluster.local/ns/default/sa/productpage"
                && c["notAfter"].as_u64().is_some_and(|t| t > now)
        ),
        "{dump:#}"
    );
    ensure!(
        !dump.to_string().contains("PRIVATE KEY"),
        "no key material in the dump"
    );

    // The log level changes at runtime; a bad one is refused.
    let admin = cluster.proxies[1].endpoint("admin")?;
    let (status, _) = sluice_lab::daemon::http(admin, "POST", "/logging?level=debug")?;
    ensure!(status == 200, "set log level: {status}");
    let (status, body) = sluice_lab::daemon::http(admin, "POST", "/logging?level=lou%20d")?;
    ensure!(status == 400, "a bad level is refused: {status} {body}");
    Ok(())
}
