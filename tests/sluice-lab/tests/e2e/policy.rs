//! Authorization and PeerAuthentication across two nodes, with Istio's own objects in the mesh
//! file: the getting-started scenario (sleep may reach productpage, notsleep is reset), DENY
//! over ALLOW, a policy change closing a live connection, STRICT vs PERMISSIVE for plaintext.

use std::net::SocketAddr;

use anyhow::{Result, ensure};
use sluice_capture::Backend;
use sluice_lab::app::{self, Outcome, Session};
use sluice_lab::cluster::{Cluster, PodSpec};

const fn pod(name: &'static str, node: usize, host: u8, meshed: bool) -> PodSpec {
    PodSpec {
        name,
        node,
        host,
        meshed,
    }
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
