//! `cargo xtask demo`: sluice's capture on a live pod, narrated.
//!
//! Two hosts (network namespaces on a veth): `pod`, enrolled with eBPF capture and served by the
//! real proxy, and `peer`, outside the mesh. Traffic goes both ways through the proxy, the app
//! still sees its real peer, the proxy is killed (traffic is refused, never bypasses it), and
//! the pod is released (traffic is direct again, nothing left behind).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use sluice_capture::{Backend, ebpf};

use crate::app::{self, Outcome};
use crate::lab::{Lab, PEER_IP, POD_IP};
use crate::proxy::ProxyProcess;

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn show(what: &str, o: &Outcome) {
    if o.ok {
        println!(
            "  {what}: ok, {} bytes echoed; app's socket: local {} peer {}; server saw the client as {}",
            o.echoed,
            o.local.as_deref().unwrap_or("?"),
            o.peer.as_deref().unwrap_or("?"),
            o.server_saw.as_deref().unwrap_or("?")
        );
    } else {
        println!("  {what}: refused ({})", o.error.as_deref().unwrap_or("?"));
    }
}

pub fn run() -> Result<()> {
    println!("sluice demo: eBPF capture of one pod, proxy in L4 passthrough\n");
    let mut lab = Lab::new(Backend::Ebpf)?;
    println!(
        "1. lab: netns {} ({POD_IP}) <-veth-> {} ({PEER_IP})",
        lab.pod_ns.name, lab.peer_ns.name
    );
    lab.capture()?;
    println!(
        "2. pod enrolled: sk_lookup on its netns, connect/getpeername/sockops on its cgroup, pinned under {}",
        lab.pin_root().display()
    );
    let mut proxy = ProxyProcess::start(&lab, &[])?;
    println!(
        "3. sluice-proxy up: listeners 15001/15006 created inside the pod's netns from the host netns"
    );
    let _app = app::spawn_server(&lab.in_pod(), &[addr(Ipv4Addr::UNSPECIFIED, 8080)])?;
    let _peer = app::spawn_server(&lab.in_peer(), &[addr(PEER_IP, 9090)])?;

    println!("\n4. traffic through the proxy");
    let inbound = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 1 << 20)?;
    show("peer -> pod:8080 (inbound) ", &inbound);
    let outbound = app::run_client(&lab.in_pod_cgroup(), addr(PEER_IP, 9090), 1 << 20)?;
    show("pod -> peer:9090 (outbound)", &outbound);
    ensure!(
        inbound.ok && outbound.ok,
        "traffic through the proxy failed"
    );
    println!(
        "  (inbound: the app sees the proxy's in-pod connection from {POD_IP}; outbound: the app's getpeername() is the real server)"
    );
    for line in proxy
        .log()
        .iter()
        .filter(|l| l.contains("connection closed"))
    {
        println!(
            "  proxy: {}",
            line.split_once("conn{")
                .map_or(line.as_str(), |(_, rest)| rest)
        );
    }

    println!("\n5. verdict counters (eBPF maps):");
    for (verdict, count) in ebpf::verdicts(&lab.pin_root())?
        .into_iter()
        .filter(|(_, n)| *n > 0)
    {
        println!("  {:<24} {count}", verdict.name());
    }

    println!("\n6. proxy killed: captured traffic must be refused, never bypass it");
    proxy.kill();
    let inbound = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 1024)?;
    show("peer -> pod:8080 (inbound) ", &inbound);
    let outbound = app::run_client(&lab.in_pod_cgroup(), addr(PEER_IP, 9090), 1024)?;
    show("pod -> peer:9090 (outbound)", &outbound);
    ensure!(
        !inbound.ok && !outbound.ok,
        "traffic bypassed a stopped proxy"
    );

    println!("\n7. pod released: traffic is direct again");
    lab.release()?;
    let inbound = app::run_client(&lab.in_peer(), addr(POD_IP, 8080), 1024)?;
    show("peer -> pod:8080 (inbound) ", &inbound);
    ensure!(inbound.ok, "direct traffic after release failed");
    println!(
        "  pinned pods left: {}",
        ebpf::list_pods(&lab.pin_root())?.len()
    );
    println!("\ndemo done; the lab (namespaces, cgroups, pins, processes) is removed on exit");
    Ok(())
}
