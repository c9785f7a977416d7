//! The mesh across two nodes: HBONE between proxies for both capture backends, with the bytes
//! on the link between the nodes checked to be ciphertext.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Result, ensure};
use sluice_capture::Backend;
use sluice_lab::app::{self, Outcome};
use sluice_lab::cluster::{CLIENT_AND_SERVER, Cluster, PodSpec, ServiceSpec};

const MIB: u64 = 1024 * 1024;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn ok(what: &str, outcome: &Outcome, bytes: u64) -> Result<()> {
    ensure!(
        outcome.ok && outcome.echoed == bytes,
        "{what}: expected {bytes} bytes echoed intact, got {outcome:?}"
    );
    Ok(())
}

/// 64 bytes of the lab client's payload pattern (`i % 251`), as it would appear in plaintext.
fn payload_sample() -> Vec<u8> {
    (1000u64..1064).map(|i| (i % 251) as u8).collect()
}

pub fn captured_clients_reach_meshed_pods_through_hbone(backend: Backend) -> Result<()> {
    let cluster = Cluster::new(
        backend,
        &[
            PodSpec {
                name: "sleep",
                node: 0,
                host: 2,
                meshed: true,
            },
            PodSpec {
                name: "reviews",
                node: 0,
                host: 3,
                meshed: true,
            },
            PodSpec {
                name: "productpage",
                node: 1,
                host: 2,
                meshed: true,
            },
            PodSpec {
                name: "legacy",
                node: 1,
                host: 9,
                meshed: false,
            },
        ],
        &[ServiceSpec {
            hostname: "productpage.default.svc.cluster.local",
            vip: VIP,
            port: 9080,
            target_port: 8080,
            endpoints: &["productpage"],
        }],
    )?;
    let (sleep, reviews, productpage, legacy) = (
        cluster.pod("sleep"),
        cluster.pod("reviews"),
        cluster.pod("productpage"),
        cluster.pod("legacy"),
    );
    let _servers = [
        app::spawn_server(&reviews.place_server(), &[reviews.addr(8080)])?,
        app::spawn_server(
            &productpage.place_server(),
            &[productpage.addr(8080), productpage.addr6(8080)],
        )?,
        app::spawn_server(&legacy.place_server(), &[legacy.addr(8080)])?,
    ];

    let link = cluster.capture_link()?;
    let by_ip = app::run_client(&sleep.place(), productpage.addr(8080), 2 * MIB)?;
    ok(
        "sleep → productpage by pod IP (other node)",
        &by_ip,
        2 * MIB,
    )?;
    // Round robin over both endpoints: every connection lands on the live one, the refusing
    // endpoint is retried away (503 from its proxy) and then kept at the back of the line.
    for _ in 0..3 {
        let by_vip = app::run_client(&sleep.place(), SocketAddr::from((VIP, 9080)), MIB)?;
        ok("sleep → productpage by service VIP", &by_vip, MIB)?;
        ensure!(
            by_vip.peer.as_deref() == Some("10.96.0.10:9080"),
            "the app must see the VIP it dialled as its peer: {by_vip:?}"
        );
    }
    let by_ip6 = app::run_client(&sleep.place(), productpage.addr6(8080), MIB)?;
    ok(
        "sleep → productpage by its IPv6 address (other node)",
        &by_ip6,
        MIB,
    )?;
    let same_node = app::run_client(&sleep.place(), reviews.addr(8080), MIB)?;
    ok("sleep → reviews (same node)", &same_node, MIB)?;

    // The tunnels really were HBONE, with both identities proven.
    let (proxy_a, proxy_b) = (&cluster.proxies[0], &cluster.proxies[1]);
    let server_id = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}");
    proxy_a.wait_for_log_lines(
        &[
            "connection closed",
            "hbone=true",
            &server_id("productpage"),
            &server_id("sleep"),
        ],
        2,
    )?;
    proxy_a.wait_for_log_lines(
        &["connection closed", "hbone=true", &server_id("reviews")],
        1,
    )?;
    let tunnel_from_sleep = [
        "connection closed",
        "direction=\"inbound\"",
        "hbone=true",
        &format!("src_identity={}", server_id("sleep")),
    ];
    proxy_b.wait_for_log_lines(&tunnel_from_sleep, 5)?;
    proxy_a.wait_for_log_lines(&tunnel_from_sleep, 1)?;

    // What crossed the link between the nodes was TLS: 6 MiB went over it, none of it legible.
    ensure!(
        link.len() as u64 > 6 * MIB,
        "the cross-node traffic should have crossed the link ({} bytes seen)",
        link.len()
    );
    ensure!(
        !link.contains(&payload_sample()),
        "plaintext payload seen on the link between the nodes"
    );
    ensure!(
        !link.contains(b"peer=10.99."),
        "plaintext greeting seen on the link"
    );
    drop(link);

    // A destination outside the mesh is passed through as it is, in plaintext: the control
    // that shows the capture above would have seen plaintext had there been any.
    let link = cluster.capture_link()?;
    let plain = app::run_client(&sleep.place(), legacy.addr(8080), 256 * 1024)?;
    ok("sleep → legacy (not meshed)", &plain, 256 * 1024)?;
    ensure!(
        link.contains(&payload_sample()),
        "the passthrough control should be visible on the link"
    );
    proxy_a.wait_for_log_lines(
        &["connection closed", "hbone=false", "dst=10.99.2.9:8080"],
        1,
    )?;
    Ok(())
}

/// SIGTERM to a node's proxy: its peers get GOAWAY, new connections to its pods are refused at
/// once, open ones carry on, and it exits as soon as they are done.
pub fn a_terminated_proxy_drains_then_exits(backend: Backend) -> Result<()> {
    let mut cluster = Cluster::with_proxy_args(
        backend,
        &CLIENT_AND_SERVER,
        &[],
        &["--drain-timeout", "30s"],
    )?;
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let target = server.addr(8080);
    let _server = app::spawn_server(&server.place_server(), &[target])?;
    let client_place = client.place();
    let held = app::hold_connections(&client_place, target, 5)?;

    let proxy = &mut cluster.proxies[1];
    proxy.terminate()?;
    // The five tunnels share one pooled HBONE connection: one open connection to wait for.
    proxy.wait_for_log(&["pod draining", "open=1"])?;
    let refused = app::run_client(&client_place, target, 1024)?;
    ensure!(
        !refused.ok,
        "a draining proxy must refuse new connections: {refused:?}"
    );
    ensure!(
        proxy.running(),
        "the proxy must wait for its open connections"
    );

    drop(held);
    let took = proxy.wait_exit(std::time::Duration::from_secs(10))?;
    ensure!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("drained") && l.contains("cut=0")),
        "every connection should have finished on its own (exited after {took:?})"
    );
    Ok(())
}
