//! What apps and kubelet see on a real node: the client's own address at the app (tunnelled
//! from another node or the same node, plaintext, IPv4 and IPv6), and kubelet's probes, which
//! come from the node itself, reaching the app whatever the mesh policy says, while nothing a
//! pod sends can pass for such a probe.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail, ensure};
use sluice_capture::node::{PROBE_V4, PROBE_V6};
use sluice_capture::{Backend, Verdict, ebpf};
use sluice_lab::app::{self, Outcome};
use sluice_lab::cluster::{Cluster, PodSpec};
use sluice_lab::hostile::run_forged_client;

const PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const BYTES: u64 = 64 * 1024;

fn ip_of(addr: Option<&str>) -> Option<IpAddr> {
    addr.and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
}

/// Mesh-wide STRICT mTLS, and an ALLOW policy with no rules for the namespace: nothing from the
/// mesh or outside it may reach its apps.
const STRICT_AND_ALLOW_NOTHING: &str = r#"- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec: {mtls: {mode: STRICT}}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: allow-nothing, namespace: default}
  spec: {}
"#;

/// A connection that must work end to end: every byte echoed, a clean close both ways.
fn works(what: &str, outcome: &Outcome) -> Result<()> {
    ensure!(
        outcome.ok && outcome.echoed == BYTES,
        "{what} must work with every byte echoed: {outcome:?}"
    );
    Ok(())
}

fn refused(what: &str, outcome: &Outcome) -> Result<()> {
    ensure!(
        !outcome.ok && outcome.server_saw.is_none(),
        "{what} must never reach the app, it saw {:?}: {outcome:?}",
        outcome.server_saw
    );
    Ok(())
}

pub fn kubelet_probes_reach_the_app_under_strict_and_allow_nothing(backend: Backend) -> Result<()> {
    let mut cluster = Cluster::new(
        backend,
        &[
            PodSpec::new("app", 0, 2, true),
            PodSpec::new("client", 0, 3, true),
            PodSpec::new("legacy", 0, 9, false),
            PodSpec::new("remote", 1, 2, true),
        ],
        &[],
    )?;
    let pod = cluster.pod("app");
    let (v4, v6) = (pod.addr(PORT), pod.addr6(PORT));
    let (http4, http6) = (pod.addr(HTTP_PORT), pod.addr6(HTTP_PORT));
    let _servers = [
        app::spawn_server(&pod.place_server(), &[v4, v6])?,
        app::spawn_http_server(&pod.place_server(), &[http4, http6])?,
    ];
    cluster.set_policies(STRICT_AND_ALLOW_NOTHING)?;

    // Kubelet's TCP and HTTP probes, from the node, both families: they reach the app, which
    // sees Istio's probe address.
    for (to, probe_ip) in [(v4, IpAddr::V4(PROBE_V4)), (v6, IpAddr::V6(PROBE_V6))] {
        let tcp = cluster.probe(0, to)?;
        ensure!(
            tcp.ok && ip_of(tcp.server_saw.as_deref()) == Some(probe_ip),
            "kubelet's TCP probe to {to} must reach the app from {probe_ip}: {tcp:?}"
        );
    }
    for (to, probe_ip) in [(http4, IpAddr::V4(PROBE_V4)), (http6, IpAddr::V6(PROBE_V6))] {
        let http = cluster.http_probe(0, to)?;
        ensure!(
            http.ok
                && http.status == Some(200)
                && ip_of(http.server_saw.as_deref()) == Some(probe_ip),
            "kubelet's HTTP probe to {to} must get 200 from the app, seen from {probe_ip}: {http:?}"
        );
    }

    // Everyone else is refused: a plaintext pod on the same bridge, a meshed pod of the same
    // node through its tunnel, and another node's own connection (only the pod's own node
    // probes it; kubelet never probes across nodes).
    for to in [v4, v6] {
        let legacy = app::run_client(&cluster.pod("legacy").place_server(), to, BYTES)?;
        refused(&format!("plaintext from a pod to {to}"), &legacy)?;
        let meshed = app::run_client(&cluster.pod("client").place(), to, BYTES)?;
        refused(&format!("a tunnel from a meshed pod to {to}"), &meshed)?;
        let other_node = cluster.probe(1, to)?;
        refused(&format!("node 1's own connection to {to}"), &other_node)?;
    }
    cluster.proxies[0].wait_for_log(&[
        "plaintext connection denied by policy",
        "istio-system/default (PeerAuthentication STRICT)",
    ])?;

    // Hostile pods forge the exempt source, and the node's own address, with `IP_TRANSPARENT`:
    // from outside the mesh (a plain pod on the same bridge) and from inside it (a captured
    // pod). None of it reaches the app: the handshake cannot complete (the app's answer goes to
    // the node, not to the forger), or the forger's capture refuses the spoofed socket.
    let node_v4: IpAddr = "10.99.1.1".parse()?;
    let node_v6: IpAddr = "fd00:99:1::1".parse()?;
    for attacker in ["legacy", "client"] {
        let place = if cluster.pod(attacker).meshed {
            cluster.pod(attacker).place()
        } else {
            cluster.pod(attacker).place_server()
        };
        for (from, to) in [
            (IpAddr::V4(PROBE_V4), v4),
            (IpAddr::V6(PROBE_V6), v6),
            (node_v4, v4),
            (node_v6, v6),
        ] {
            let forged = run_forged_client(&place, from, to)?;
            refused(&format!("{attacker} forging {from} towards {to}"), &forged)?;
        }
    }

    // The probes were let through by the exemption, not by accident.
    if backend == Backend::Ebpf {
        let counts = ebpf::verdicts(&cluster.pin_root(0))?;
        let count = |v: Verdict| counts.iter().find(|(k, _)| *k == v).map_or(0, |(_, n)| *n);
        ensure!(
            count(Verdict::NodeProbeBound) >= 4 && count(Verdict::InboundPassNodeProbe) >= 4,
            "the four probes must be bound to the probe address and passed as probes: {counts:?}"
        );
    }
    // And nothing changed for the probes: they still work after all that.
    let again = cluster.probe(0, v4)?;
    ensure!(again.ok, "the probe must still work: {again:?}");
    Ok(())
}

pub fn apps_see_the_clients_own_address(backend: Backend) -> Result<()> {
    let cluster = Cluster::new(
        backend,
        &[
            PodSpec::new("client", 0, 2, true),
            PodSpec::new("neighbour", 0, 3, true),
            PodSpec::new("legacy", 0, 9, false),
            PodSpec::new("server", 1, 2, true),
        ],
        &[],
    )?;
    let mut servers = Vec::new();
    for name in ["neighbour", "server"] {
        let pod = cluster.pod(name);
        servers.push(app::spawn_server(
            &pod.place_server(),
            &[pod.addr(PORT), pod.addr6(PORT)],
        )?);
    }
    let (client, legacy) = (cluster.pod("client"), cluster.pod("legacy"));
    for target in ["server", "neighbour"] {
        let pod = cluster.pod(target);
        let node = pod.node;
        for to in [pod.addr(PORT), pod.addr6(PORT)] {
            // Tunnelled (HBONE from another node, or on the same node): the app sees the
            // client's own socket, address and port.
            let hbone = ["hbone=true", "direction=\"inbound\"", "connection closed"];
            let seen = cluster.proxies[node].count_log(&hbone);
            let tunnelled = app::run_client(&client.place(), to, BYTES)?;
            works(&format!("client → {target} {to}"), &tunnelled)?;
            ensure!(
                tunnelled.server_saw.is_some() && tunnelled.server_saw == tunnelled.local,
                "{target} must see the client's own address and port through the tunnel: saw {:?}, client socket {:?}",
                tunnelled.server_saw,
                tunnelled.local
            );
            cluster.proxies[node].wait_for_log_lines(&hbone, seen + 1)?;

            // Plaintext from outside the mesh, through the destination's proxy: the client's
            // address (the proxy's connection to the app has its own port).
            let dst = format!("dst={to}");
            let plaintext = [
                "direction=\"inbound\"",
                "hbone=false",
                &dst,
                "connection closed",
            ];
            let seen = cluster.proxies[node].count_log(&plaintext);
            let plain = app::run_client(&legacy.place_server(), to, BYTES)?;
            works(&format!("legacy → {target} {to}"), &plain)?;
            let legacy_ip = if to.is_ipv4() {
                IpAddr::V4(legacy.ip)
            } else {
                IpAddr::V6(legacy.ip6)
            };
            if ip_of(plain.server_saw.as_deref()) != Some(legacy_ip) {
                bail!(
                    "{target} must see legacy's address {legacy_ip} on a plaintext connection, saw {:?}",
                    plain.server_saw
                );
            }
            ensure!(
                plain.server_saw != plain.local,
                "the plaintext connection must have gone through the proxy: {plain:?}"
            );
            cluster.proxies[node].wait_for_log_lines(&plaintext, seen + 1)?;
        }
    }
    Ok(())
}

/// `--preserve-source=false`: the proxy dials the app from the pod's own address, as before
/// source preservation (for kernels or networks where it cannot work).
pub fn without_source_preservation_the_app_sees_the_pods_own_address(
    backend: Backend,
) -> Result<()> {
    let cluster = Cluster::with_proxy_args(
        backend,
        &[
            PodSpec::new("client", 0, 2, true),
            PodSpec::new("legacy", 0, 9, false),
            PodSpec::new("server", 1, 2, true),
        ],
        &[],
        &["--preserve-source=false"],
    )?;
    let server = cluster.pod("server");
    let _app = app::spawn_server(
        &server.place_server(),
        &[server.addr(PORT), server.addr6(PORT)],
    )?;
    for (to, own) in [
        (server.addr(PORT), IpAddr::V4(server.ip)),
        (server.addr6(PORT), IpAddr::V6(server.ip6)),
    ] {
        for (from, place) in [
            ("client", cluster.pod("client").place()),
            ("legacy", cluster.pod("legacy").place_server()),
        ] {
            let outcome = app::run_client(&place, to, BYTES)?;
            works(&format!("{from} → {to}"), &outcome)?;
            ensure!(
                ip_of(outcome.server_saw.as_deref()) == Some(own),
                "with --preserve-source=false the app sees its own pod's address {own}: {outcome:?}"
            );
        }
    }
    Ok(())
}
