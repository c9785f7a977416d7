//! Capture scenarios, written once and run against both backends.
//!
//! The evidence that an inbound connection went through the proxy: the app sees the client's
//! own address (the proxy preserves it) but not the client's port (the proxy's connection to the
//! app is its own, from a fresh port), and the proxy logs it; a direct connection shows the very
//! same address and port on both ends.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use anyhow::{Context, Result, ensure};
use sluice_capture::Backend;
use sluice_capture::ebpf;
use sluice_lab::app::{self, Outcome};
use sluice_lab::lab::{Lab, PEER_IP, PEER_IP6, POD_IP, POD_IP6};
use sluice_lab::proxy::ProxyProcess;

const MIB: u64 = 1024 * 1024;

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A lab with the pod captured and the proxy serving it.
fn captured(backend: Backend) -> Result<(Lab, ProxyProcess)> {
    let mut lab = Lab::new(backend)?;
    lab.capture()?;
    let proxy = ProxyProcess::start(&lab, &[])?;
    Ok((lab, proxy))
}

fn succeeded(outcome: &Outcome) -> Result<()> {
    ensure!(outcome.ok, "connection failed: {:?}", outcome.error);
    Ok(())
}

/// Inbound through the proxy: the app saw the client's address on another connection.
fn proxied(outcome: &Outcome) -> bool {
    ip_of(outcome.server_saw.as_deref()) == ip_of(outcome.local.as_deref())
        && outcome.server_saw != outcome.local
}

/// Not through the proxy: the app saw the client's own socket.
fn direct(outcome: &Outcome) -> bool {
    outcome.server_saw.is_some() && outcome.server_saw == outcome.local
}

fn ip_of(addr: Option<&str>) -> String {
    addr.and_then(|s| s.parse::<SocketAddr>().ok())
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// Inbound: a client outside the mesh reaches the pod's app on arbitrary ports, via the proxy.
pub fn inbound_to_any_port_reaches_the_app_through_the_proxy(backend: Backend) -> Result<()> {
    let (lab, proxy) = captured(backend)?;
    let _server = app::spawn_server(
        &lab.in_pod(),
        &[
            addr(Ipv4Addr::UNSPECIFIED, 8080),
            addr(Ipv4Addr::UNSPECIFIED, 31337),
        ],
    )?;
    for port in [8080, 31337] {
        let outcome = app::run_client(&lab.in_peer(), addr(POD_IP, port), MIB)?;
        succeeded(&outcome)?;
        ensure!(
            outcome.echoed == MIB,
            "1 MiB should come back intact: {outcome:?}"
        );
        ensure!(
            proxied(&outcome) && ip_of(outcome.server_saw.as_deref()) == PEER_IP.to_string(),
            "port {port}: the app should see the client's address {PEER_IP} on the proxy's connection, saw {:?} (client {:?}; not captured?)",
            outcome.server_saw,
            outcome.local
        );
        proxy.wait_for_log(&[
            "direction=\"inbound\"",
            &format!("dst={POD_IP}:{port}"),
            "connection closed",
        ])?;
    }
    Ok(())
}

/// Outbound: the pod's app reaches a server outside via the proxy and still sees the real peer.
pub fn outbound_reaches_the_server_through_the_proxy_and_the_app_sees_the_real_peer(
    backend: Backend,
) -> Result<()> {
    let (lab, proxy) = captured(backend)?;
    let _server = app::spawn_server(&lab.in_peer(), &[addr(PEER_IP, 9090)])?;
    let outcome = app::run_client(&lab.in_pod_cgroup(), addr(PEER_IP, 9090), MIB)?;
    succeeded(&outcome)?;
    ensure!(
        outcome.echoed == MIB,
        "1 MiB should come back intact: {outcome:?}"
    );
    ensure!(
        outcome.peer.as_deref() == Some("10.99.0.1:9090"),
        "getpeername() must be the real server, got {:?}",
        outcome.peer
    );
    // Both backends leave the app's own address what it would be without the mesh (eBPF
    // redirects to the pod's address, not loopback), so `getsockname()` tells the truth too.
    ensure!(
        ip_of(outcome.local.as_deref()) == POD_IP.to_string(),
        "the app's socket should have the pod's address, local was {:?}",
        outcome.local
    );
    ensure!(
        proxied(&outcome),
        "the server should see the pod's address, on the proxy's connection: {outcome:?}"
    );
    proxy.wait_for_log(&[
        "direction=\"outbound\"",
        "dst=10.99.0.1:9090",
        "connection closed",
    ])?;
    Ok(())
}

/// Workloads run in per-container cgroups below the pod's: capture finds the pod from there,
/// two levels down as well as one.
pub fn clients_in_container_cgroups_are_captured(backend: Backend) -> Result<()> {
    let (lab, proxy) = captured(backend)?;
    let _server = app::spawn_server(&lab.in_peer(), &[addr(PEER_IP, 9091)])?;
    for (n, container) in ["app", "app/nested"].into_iter().enumerate() {
        let outcome = app::run_client(
            &lab.in_pod_container(container)?,
            addr(PEER_IP, 9091),
            64 * 1024,
        )?;
        succeeded(&outcome)?;
        ensure!(
            outcome.echoed == 64 * 1024 && outcome.peer.as_deref() == Some("10.99.0.1:9091"),
            "a client in container cgroup {container} should reach the server: {outcome:?}"
        );
        // Each connection went through the proxy: one more access-log line each time.
        proxy.wait_for_log_lines(
            &[
                "direction=\"outbound\"",
                "dst=10.99.0.1:9091",
                "connection closed",
            ],
            n + 1,
        )?;
    }
    Ok(())
}

/// HBONE's port 15008 and loopback traffic inside the pod bypass the proxy.
pub fn hbone_port_and_loopback_are_not_captured(backend: Backend) -> Result<()> {
    let (lab, _proxy) = captured(backend)?;
    let _hbone = app::spawn_server(&lab.in_pod(), &[addr(POD_IP, 15008)])?;
    let outcome = app::run_client(&lab.in_peer(), addr(POD_IP, 15008), 4096)?;
    succeeded(&outcome)?;
    ensure!(
        direct(&outcome),
        "15008 must reach the pod directly: {outcome:?}"
    );

    let _local = app::spawn_server(&lab.in_pod(), &[addr(Ipv4Addr::LOCALHOST, 8082)])?;
    let outcome = app::run_client(&lab.in_pod_cgroup(), addr(Ipv4Addr::LOCALHOST, 8082), 4096)?;
    succeeded(&outcome)?;
    ensure!(
        outcome.server_saw == outcome.local,
        "loopback must connect directly (server saw {:?}, client was {:?})",
        outcome.server_saw,
        outcome.local
    );
    Ok(())
}

/// Configured exclusions are delivered directly in each direction.
pub fn excluded_ports_are_not_captured(backend: Backend) -> Result<()> {
    let mut lab = Lab::new(backend)?;
    lab.pod.exclude_inbound_ports = vec![2222];
    lab.pod.exclude_outbound_ports = vec![5432];
    lab.capture()?;
    let _proxy = ProxyProcess::start(&lab, &[])?;
    let _pod_server = app::spawn_server(
        &lab.in_pod(),
        &[
            addr(Ipv4Addr::UNSPECIFIED, 2222),
            addr(Ipv4Addr::UNSPECIFIED, 2223),
        ],
    )?;
    let _peer_server = app::spawn_server(&lab.in_peer(), &[addr(PEER_IP, 5432)])?;

    let excluded = app::run_client(&lab.in_peer(), addr(POD_IP, 2222), 1024)?;
    succeeded(&excluded)?;
    ensure!(direct(&excluded), "inbound 2222 is excluded: {excluded:?}");
    let captured = app::run_client(&lab.in_peer(), addr(POD_IP, 2223), 1024)?;
    succeeded(&captured)?;
    ensure!(proxied(&captured), "inbound 2223 is captured: {captured:?}");

    let outbound = app::run_client(&lab.in_pod_cgroup(), addr(PEER_IP, 5432), 1024)?;
    succeeded(&outbound)?;
    ensure!(
        ip_of(outbound.local.as_deref()) == POD_IP.to_string(),
        "outbound 5432 is excluded: {outbound:?}"
    );
    Ok(())
}

/// Fail closed: with the proxy gone nothing reaches the app or leaves the pod; a new proxy
/// serves the pod again without re-enrolling it.
pub fn proxy_stopped_refuses_traffic_and_restarted_proxy_serves_it_again(
    backend: Backend,
) -> Result<()> {
    let (lab, mut proxy) = captured(backend)?;
    let _pod_server = app::spawn_server(&lab.in_pod(), &[addr(Ipv4Addr::UNSPECIFIED, 8080)])?;
    let _peer_server = app::spawn_server(&lab.in_peer(), &[addr(PEER_IP, 9090)])?;
    succeeded(&app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 1024)?)?;

    proxy.kill();
    let inbound = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 1024)?;
    ensure!(
        !inbound.ok,
        "inbound must be refused with the proxy down, but it connected: {inbound:?}"
    );
    let outbound = app::run_client(&lab.in_pod_cgroup(), addr(PEER_IP, 9090), 1024)?;
    ensure!(
        !outbound.ok,
        "outbound must be refused with the proxy down, but it connected: {outbound:?}"
    );

    let _proxy = ProxyProcess::start(&lab, &[])?;
    let inbound = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 1024)?;
    succeeded(&inbound)?;
    ensure!(proxied(&inbound), "captured again: {inbound:?}");
    succeeded(&app::run_client(
        &lab.in_pod_cgroup(),
        addr(PEER_IP, 9090),
        1024,
    )?)?;
    Ok(())
}

/// The loader (the agent) can restart: capture stays in place, a new instance knows the pod.
pub fn loader_restart_keeps_capture_and_adopts_the_pod(backend: Backend) -> Result<()> {
    let (mut lab, _proxy) = captured(backend)?;
    let _pod_server = app::spawn_server(&lab.in_pod(), &[addr(Ipv4Addr::UNSPECIFIED, 8080)])?;
    // Drop every fd the loader held: only the pins keep capture alive now.
    drop(lab.capture.take());
    let outcome = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 4096)?;
    succeeded(&outcome)?;
    ensure!(
        proxied(&outcome),
        "still captured after the loader exited: {outcome:?}"
    );

    let mut reloaded = lab.load_backend()?;
    if backend == Backend::Ebpf {
        let pods = ebpf::list_pods(&lab.pin_root())?;
        ensure!(
            pods.iter()
                .any(|p| p.uid == lab.pod.uid.as_str() && p.links.len() == ebpf::POD_LINKS),
            "the reloaded loader should see all the pod's links: {pods:?}"
        );
    }
    reloaded.remove(&lab.pod)?;
    let outcome = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 4096)?;
    succeeded(&outcome)?;
    ensure!(direct(&outcome), "released by the new loader: {outcome:?}");
    Ok(())
}

/// Enrolment and removal are idempotent.
pub fn enrol_twice_and_remove_unknown_succeed(backend: Backend) -> Result<()> {
    let (mut lab, _proxy) = captured(backend)?;
    let _pod_server = app::spawn_server(&lab.in_pod(), &[addr(Ipv4Addr::UNSPECIFIED, 8080)])?;
    let mut capture = lab.capture.take().context("captured lab has a loader")?;
    capture.enroll(&lab.pod).context("second enrol")?;
    let outcome = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 4096)?;
    succeeded(&outcome)?;
    ensure!(
        proxied(&outcome),
        "captured once, not broken by enrolling twice: {outcome:?}"
    );

    let mut unknown = lab.pod.clone();
    unknown.uid = sluice_capture::PodUid::parse("never-enrolled")?;
    unknown.netns = "/var/run/netns/sluice-does-not-exist".into();
    capture
        .remove(&unknown)
        .context("removing an unknown pod succeeds")?;
    capture.remove(&lab.pod)?;
    capture
        .remove(&lab.pod)
        .context("removing twice succeeds")?;
    Ok(())
}

/// Release: traffic flows directly again and nothing of sluice is left in the pod or on bpffs.
pub fn release_restores_direct_traffic_and_leaves_nothing_behind(backend: Backend) -> Result<()> {
    let (mut lab, _proxy) = captured(backend)?;
    let _pod_server = app::spawn_server(&lab.in_pod(), &[addr(Ipv4Addr::UNSPECIFIED, 8080)])?;
    let _peer_server = app::spawn_server(&lab.in_peer(), &[addr(PEER_IP, 9090)])?;
    lab.release()?;

    let inbound = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 4096)?;
    succeeded(&inbound)?;
    ensure!(
        direct(&inbound),
        "inbound is direct after release: {inbound:?}"
    );
    let outbound = app::run_client(&lab.in_pod_cgroup(), addr(PEER_IP, 9090), 4096)?;
    succeeded(&outbound)?;
    ensure!(
        ip_of(outbound.local.as_deref()) == POD_IP.to_string(),
        "outbound is direct after release: {outbound:?}"
    );

    let rules = lab.pod_ns.output(&["iptables-save"])? + &lab.pod_ns.output(&["ip6tables-save"])?;
    ensure!(
        !rules.contains("ISTIO_"),
        "iptables rules left in the pod:\n{rules}"
    );
    let ip_rules = lab.pod_ns.output(&["ip", "rule"])?;
    ensure!(
        !ip_rules.contains("0x111"),
        "policy routing rule left in the pod:\n{ip_rules}"
    );
    if backend == Backend::Ebpf {
        ensure!(
            ebpf::list_pods(&lab.pin_root())?.is_empty(),
            "the pod is still recorded in the pins"
        );
        let pod_dir = lab.pin_root().join("pods").join(lab.pod.uid.as_str());
        ensure!(!pod_dir.exists(), "link pins left at {}", pod_dir.display());
    }
    Ok(())
}

fn addr6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// IPv6 is captured like IPv4, both ways, with the real peer visible to the app.
pub fn ipv6_is_captured_both_ways(backend: Backend) -> Result<()> {
    let mut lab = Lab::new(backend)?;
    lab.add_ipv6()?;
    lab.capture()?;
    let proxy = ProxyProcess::start(&lab, &[])?;
    let _pod_server = app::spawn_server(&lab.in_pod(), &[addr6(Ipv6Addr::UNSPECIFIED, 8080)])?;
    let _peer_server = app::spawn_server(&lab.in_peer(), &[addr6(PEER_IP6, 9090)])?;

    let inbound = app::run_client(&lab.in_peer(), addr6(POD_IP6, 8080), MIB)?;
    succeeded(&inbound)?;
    ensure!(
        proxied(&inbound) && ip_of(inbound.server_saw.as_deref()) == PEER_IP6.to_string(),
        "inbound IPv6 goes through the proxy, and the app sees the client's address: {inbound:?}"
    );
    proxy.wait_for_log(&[
        "direction=\"inbound\"",
        &format!("dst=[{POD_IP6}]:8080"),
        "connection closed",
    ])?;

    let outbound = app::run_client(&lab.in_pod_cgroup(), addr6(PEER_IP6, 9090), MIB)?;
    succeeded(&outbound)?;
    ensure!(
        outbound.peer.as_deref() == Some(&*format!("[{PEER_IP6}]:9090")),
        "getpeername() must be the real IPv6 server: {outbound:?}"
    );
    ensure!(
        outbound.echoed == MIB,
        "1 MiB intact over IPv6: {outbound:?}"
    );
    proxy.wait_for_log(&[
        "direction=\"outbound\"",
        &format!("dst=[{PEER_IP6}]:9090"),
        "connection closed",
    ])?;
    Ok(())
}
