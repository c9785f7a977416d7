//! Hostile pods on the same node as their victims. Each scenario gives the attacker what a real
//! pod can be given (lab pods run as root: `NET_ADMIN`, `NET_RAW` and more), runs the attack
//! while the victim works, and checks three things: the attack fails, the victim's traffic is
//! unaffected, and the refusal is named (a verdict counter or an error).
//!
//! The iptables backend keeps every piece of capture state inside the pod's own netns (rules,
//! conntrack), so there is nothing shared to hijack and the counters that name eBPF's refusals
//! do not exist there; its scenarios check that the victim is unaffected all the same.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use sluice_capture::{Backend, CaptureError, Verdict, ebpf};
use sluice_lab::app::{self, Session};
use sluice_lab::cluster::{Cluster, PodSpec};
use sluice_lab::hostile::{self, RepeatOutcome, SpoofOutcome};

const fn pod(name: &'static str, node: usize, host: u8, meshed: bool) -> PodSpec {
    PodSpec::new(name, node, host, meshed)
}

/// A victim and an attacker side by side on node 0 (and a neighbour outside the mesh on the same
/// bridge), the victim's peer on node 1.
const PODS: [PodSpec; 4] = [
    pod("victim", 0, 2, true),
    pod("attacker", 0, 3, true),
    pod("neighbour", 0, 9, false),
    pod("server", 1, 2, true),
];

const STRICT: &str = r#"- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec: {mtls: {mode: STRICT}}
"#;

/// Node 0's count of `verdict` (eBPF only).
fn verdicts(cluster: &Cluster, verdict: Verdict) -> Result<u64> {
    Ok(ebpf::verdicts(&cluster.pin_root(0))?
        .into_iter()
        .find(|(v, _)| *v == verdict)
        .map_or(0, |(_, n)| n))
}

/// Pod `attacker` puts both of pod `victim`'s addresses on its own `lo` (`NET_ADMIN`).
fn claim_on_lo(cluster: &Cluster, attacker: &str, victim: &str) -> Result<()> {
    let ns = &cluster.pod(attacker).ns;
    let (ip, ip6) = (cluster.pod(victim).ip, cluster.pod(victim).ip6);
    ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "lo",
        "nodad",
    ])
}

fn reached(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<()> {
    let pod = cluster.pod(from);
    let place = if pod.meshed {
        pod.place()
    } else {
        pod.place_server()
    };
    let outcome = app::run_client(&place, to, 16 * 1024)?;
    if !outcome.ok {
        // Both proxies' last lines: what the tunnel or the plaintext path said.
        let tail = |n: usize| {
            let log = cluster.proxies[n].log();
            log[log.len().saturating_sub(25)..].join("\n")
        };
        bail!(
            "{from} → {to} must work, got {:?}\nnode 0's proxy:\n{}\nnode 1's proxy:\n{}",
            outcome.error,
            tail(0),
            tail(1)
        );
    }
    Ok(())
}

fn refused(cluster: &Cluster, from: &str, to: SocketAddr) -> Result<()> {
    let outcome = app::run_client(&cluster.pod(from).place_server(), to, 16 * 1024)?;
    ensure!(
        !outcome.ok,
        "{from} → {to} must be refused, but the app answered (it saw {:?})",
        outcome.server_saw
    );
    Ok(())
}

/// (1) A pod with `NET_ADMIN` puts its neighbour's addresses on its own `lo` and asks to be
/// captured with them. The addresses stay the victim's: the claim is refused by name (eBPF,
/// where the address map is node-wide), and the victim's inbound traffic, tunnelled and
/// plaintext, IPv4 and IPv6, still reaches the victim's own app.
pub fn a_pod_cannot_claim_another_pods_addresses(backend: Backend) -> Result<()> {
    let mut cluster = Cluster::new(backend, &PODS, &[])?;
    let (victim_ip, victim_ip6) = (cluster.pod("victim").ip, cluster.pod("victim").ip6);
    let _victim_app = app::spawn_server(
        &cluster.pod("victim").place_server(),
        &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))],
    )?;
    // With the addresses on its `lo`, the attacker's netns would answer ARP and neighbour
    // solicitations for them on the shared lab bridge: a layer-2 hijack that is the CNI's to
    // prevent (real CNIs tie each pod address to its own veth, with routes or static
    // neighbours). Pin the victim's addresses to its interface as such a CNI does, on the node
    // and in the neighbour, so what is tested is sluice's own state.
    let victim_mac = cluster
        .pod("victim")
        .ns
        .output(&[
            "cat",
            &format!("/sys/class/net/{}/address", cluster.pod_interface("victim")),
        ])?
        .trim()
        .to_owned();
    let neighbour_if = cluster.pod_interface("neighbour");
    for ip in [victim_ip.to_string(), victim_ip6.to_string()] {
        let pin = |dev: &str| {
            [
                "ip",
                "neigh",
                "replace",
                &ip,
                "lladdr",
                &victim_mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]
            .map(str::to_owned)
        };
        let node = pin("br0");
        cluster
            .node_ns(0)
            .exec(&node.each_ref().map(String::as_str))?;
        let neighbour = pin(&neighbour_if);
        cluster
            .pod("neighbour")
            .ns
            .exec(&neighbour.each_ref().map(String::as_str))?;
    }
    claim_on_lo(&cluster, "attacker", "victim")?;
    let _attacker_app = app::spawn_server(
        &cluster.pod("attacker").place_server(),
        &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))],
    )?;

    let claim = cluster.recapture("attacker", |spec| {
        spec.addrs
            .extend([IpAddr::V4(victim_ip), IpAddr::V6(victim_ip6)]);
    });
    match (backend, claim) {
        (Backend::Ebpf, Err(CaptureError::AddressOwned { owner, .. })) => ensure!(
            owner == cluster.pod("victim").uid.to_string(),
            "the refusal must name the owner, named {owner}"
        ),
        (Backend::Ebpf, other) => {
            bail!("claiming the victim's addresses must be refused: {other:?}")
        }
        // Rules and conntrack live in each pod's own netns: an address is nothing to claim.
        (Backend::Iptables, result) => result.context("enrol the attacker again")?,
    }
    if backend == Backend::Ebpf {
        let pods = ebpf::list_pods(&cluster.pin_root(0))?;
        let owns = |name: &str, ip: IpAddr| {
            let uid = cluster.pod(name).uid.to_string();
            pods.iter().any(|p| p.uid == uid && p.addrs.contains(&ip))
        };
        for ip in [IpAddr::V4(victim_ip), IpAddr::V6(victim_ip6)] {
            ensure!(
                owns("victim", ip),
                "{ip} must still be the victim's: {pods:?}"
            );
            ensure!(
                !owns("attacker", ip),
                "{ip} must not be the attacker's: {pods:?}"
            );
        }
    }
    for to in [
        cluster.pod("victim").addr(8080),
        cluster.pod("victim").addr6(8080),
    ] {
        reached(&cluster, "server", to)?; // tunnelled from node 1
        reached(&cluster, "neighbour", to)?; // plaintext on the bridge
    }
    // The victim's proxy logged the victim as the destination of the tunnels, never the attacker.
    let victim_dst = format!("dst={}", cluster.pod("victim").addr(8080));
    let victim_dst6 = format!("dst={}", cluster.pod("victim").addr6(8080));
    cluster.proxies[0]
        .wait_for_log(&["spiffe://cluster.local/ns/default/sa/victim", &victim_dst])?;
    cluster.proxies[0]
        .wait_for_log(&["spiffe://cluster.local/ns/default/sa/victim", &victim_dst6])?;
    Ok(())
}

/// (2) A pod with `CAP_NET_RAW` binds its neighbour's address with `IP_TRANSPARENT` on each port
/// of the victim's ephemeral range and connects, in a loop, while the victim makes short
/// connections: each spoofed connect tries to file a destination of the attacker's choosing
/// (a closed port) under the victim's (ip, port). At the same time a second loop, with the
/// victim's address on the attacker's own `lo` (`NET_ADMIN`), connects from it straight to the
/// proxy's 15001 in the attacker's netns, making the proxy ask for the victim's filed
/// destinations. The victim's connections all work, IPv4 and IPv6, and eBPF counts every
/// refused filing.
pub fn a_spoofed_source_cannot_redirect_another_pods_connections(backend: Backend) -> Result<()> {
    let cluster = Cluster::new(backend, &PODS, &[])?;
    let _server = app::spawn_server(
        &cluster.pod("server").place_server(),
        &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))],
    )?;
    // A narrow ephemeral range makes the race winnable: the attacker covers every port the
    // victim can use.
    let (first_port, ports) = (40000u16, 24u16);
    cluster.pod("victim").ns.exec(&[
        "sysctl",
        "-qw",
        &format!(
            "net.ipv4.ip_local_port_range={first_port} {}",
            first_port + ports - 1
        ),
    ])?;
    claim_on_lo(&cluster, "attacker", "victim")?;
    for (victim_ip, to, sink) in [
        (
            IpAddr::V4(cluster.pod("victim").ip),
            cluster.pod("server").addr(8080),
            cluster.pod("server").addr(9),
        ),
        (
            IpAddr::V6(cluster.pod("victim").ip6),
            cluster.pod("server").addr6(8080),
            cluster.pod("server").addr6(9),
        ),
    ] {
        let refused_before = match backend {
            Backend::Ebpf => verdicts(&cluster, Verdict::OutboundSpoofRefused)?,
            Backend::Iptables => 0,
        };
        let seconds = 3.0;
        let attack = hostile::start_spoof(
            &cluster.pod("attacker").place(),
            victim_ip,
            first_port,
            ports,
            sink,
            seconds,
            Duration::ZERO,
        )?;
        // The second loop only matters where the proxy reads filed destinations (eBPF);
        // with iptables conntrack answers, per netns. Each of its connects reaches the shared
        // proxy, so it pauses between them.
        let proxy_port = match victim_ip {
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::LOCALHOST, 15001)),
        };
        let asker = match backend {
            Backend::Ebpf => Some(hostile::start_spoof(
                &cluster.pod("attacker").place(),
                victim_ip,
                first_port,
                ports,
                proxy_port,
                seconds,
                Duration::from_micros(100),
            )?),
            Backend::Iptables => None,
        };
        let victim = hostile::start_repeat(&cluster.pod("victim").place(), to, seconds)?;
        let limit = Duration::from_secs_f64(seconds) + sluice_lab::WAIT;
        let victim: RepeatOutcome = victim.finish(limit)?;
        let attack: SpoofOutcome = attack.finish(limit)?;
        if let Some(asker) = asker {
            let asked: SpoofOutcome = asker.finish(limit)?;
            ensure!(
                asked.attempts > 10,
                "the second loop must have tried in earnest: {asked:?}"
            );
        }
        ensure!(
            attack.attempts > 100,
            "the attacker must have tried in earnest: {attack:?}"
        );
        ensure!(
            victim.failed == 0 && victim.ok > 0,
            "every one of the victim's connections to {to} must work while {victim_ip} is \
             spoofed: {victim:?} (attacker: {attack:?})"
        );
        if backend == Backend::Ebpf {
            let refused = verdicts(&cluster, Verdict::OutboundSpoofRefused)? - refused_before;
            ensure!(
                refused > 0 && refused <= attack.attempts,
                "each spoofed filing is refused and counted: {refused} of {attack:?}"
            );
        }
    }
    Ok(())
}

/// (3) Inbound to addresses nobody assigned: a link-local IPv6 address and an IPv4 address the
/// pod added after it was captured. A neighbour on the bridge reaches neither around the proxy:
/// under a mesh-wide STRICT PeerAuthentication both are refused like the pod's own address,
/// while tunnelled traffic still gets through.
pub fn link_local_and_later_added_addresses_are_captured(backend: Backend) -> Result<()> {
    let mut cluster = Cluster::new(backend, &PODS, &[])?;
    cluster.set_policies(STRICT)?;
    let victim_if = cluster.pod_interface("victim");
    let victim = &cluster.pod("victim").ns;
    let link_local: Ipv6Addr = "fe80::99:77".parse()?;
    let later = Ipv4Addr::new(10, 99, 1, 77);
    victim.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{link_local}/64"),
        "dev",
        &victim_if,
        "nodad",
    ])?;
    victim.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{later}/24"),
        "dev",
        &victim_if,
    ])?;
    let _app = app::spawn_server(
        &cluster.pod("victim").place_server(),
        &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))],
    )?;
    let neighbour_if = cluster.pod_interface("neighbour");
    let ifindex: u32 = cluster
        .pod("neighbour")
        .ns
        .output(&["cat", &format!("/sys/class/net/{neighbour_if}/ifindex")])?
        .trim()
        .parse()
        .context("the neighbour's interface index")?;
    let denied_before = cluster.proxies[0].count_log(&["plaintext connection denied by policy"]);
    let targets = [
        SocketAddr::V6(SocketAddrV6::new(link_local, 8080, 0, ifindex)),
        SocketAddr::from((later, 8080)),
        cluster.pod("victim").addr(8080),
        cluster.pod("victim").addr6(8080),
    ];
    for to in targets {
        refused(&cluster, "neighbour", to)?;
    }
    cluster.proxies[0].wait_for_log_lines(
        &["plaintext connection denied by policy"],
        denied_before + targets.len(),
    )?;
    reached(&cluster, "server", cluster.pod("victim").addr(8080))?;
    Ok(())
}

/// (5) A pod opens far more connections than its bound while its neighbour has connections open
/// and keeps making new ones. The storm is refused past the attacker's own bound (eBPF counts
/// each refusal), nothing of the victim's capture state is evicted (its open connections carry
/// on, IPv4 and IPv6, its new ones work), and the attacker's count comes back down as its
/// sockets close.
pub fn a_connect_storm_cannot_evict_another_pods_capture(backend: Backend) -> Result<()> {
    const BOUND: u32 = 16;
    const STORM: usize = 64;
    let mut cluster = Cluster::new(backend, &PODS, &[])?;
    let _server = app::spawn_server(
        &cluster.pod("server").place_server(),
        &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))],
    )?;
    cluster
        .recapture("attacker", |spec| spec.max_tracked_sockets = BOUND)
        .context("enrol the attacker with a small bound")?;
    let server = cluster.pod("server");
    let mut live = Session::open(&cluster.pod("victim").place(), server.addr(8080))?;
    let mut live6 = Session::open(&cluster.pod("victim").place(), server.addr6(8080))?;
    let quota_before = match backend {
        Backend::Ebpf => verdicts(&cluster, Verdict::OutboundDropQuota)?,
        Backend::Iptables => 0,
    };

    let (storm, outcome) =
        hostile::start_storm(&cluster.pod("attacker").place(), server.addr(8080), STORM)?;
    let expected = match backend {
        Backend::Ebpf => BOUND as usize,
        Backend::Iptables => STORM,
    };
    ensure!(
        outcome.opened == expected && outcome.refused == STORM - expected,
        "the storm must open exactly {expected} of {STORM}: {outcome:?}"
    );
    if backend == Backend::Ebpf {
        let counted = verdicts(&cluster, Verdict::OutboundDropQuota)? - quota_before;
        ensure!(
            counted == (STORM - expected) as u64,
            "each refusal past the bound is counted: {counted}"
        );
    }
    live.round_trip(8192)?;
    live6.round_trip(8192)?;
    reached(&cluster, "victim", server.addr(8080))?;
    reached(&cluster, "victim", server.addr6(8080))?;

    // The attacker's sockets close: their entries go with them, and its bound is free again.
    drop(storm);
    let (_again, outcome) = hostile::start_storm(
        &cluster.pod("attacker").place(),
        server.addr(8080),
        expected,
    )?;
    ensure!(
        outcome.opened == expected,
        "closed sockets must give their places back: {outcome:?}"
    );
    live.round_trip(8192)?;
    if backend == Backend::Ebpf {
        // Nothing lingers once the sockets are gone: the maps do not fill in normal operation.
        drop(_again);
        tracked_drains_to(&cluster, "attacker", 0)?;
        drop((live, live6));
        tracked_drains_to(&cluster, "victim", 0)?;
    }
    Ok(())
}

/// (6) A pod floods the proxy with more connections than the proxy lets one source hold
/// (`--max-connections-per-source`, small here; the eBPF bound is far above it). The proxy
/// refuses the excess at once (a reset, counted in `sluice_limits_total`), the neighbour's open
/// connections carry on and its new ones are served, and the attacker's room comes back as its
/// connections close. Without the bound, the flood would take as many of the proxy's file
/// descriptors as it liked.
pub fn a_connection_flood_is_refused_at_the_proxys_per_source_bound(
    backend: Backend,
) -> Result<()> {
    const BOUND: usize = 24;
    const FLOOD: usize = 40;
    let bound = format!("--max-connections-per-source={BOUND}");
    let cluster = Cluster::with_proxy_args(backend, &PODS, &[], &[&bound])?;
    let _server = app::spawn_server(
        &cluster.pod("server").place_server(),
        &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8080))],
    )?;
    let server = cluster.pod("server");
    let mut live = Session::open(&cluster.pod("victim").place(), server.addr(8080))?;
    let refused_before = refused_by_source(&cluster)?;

    let (flood, outcome) =
        hostile::start_storm(&cluster.pod("attacker").place(), server.addr(8080), FLOOD)?;
    ensure!(
        outcome.opened == BOUND && outcome.refused == FLOOD - BOUND,
        "the flood must hold exactly {BOUND} of {FLOOD}: {outcome:?}"
    );
    let counted = refused_by_source(&cluster)? - refused_before;
    ensure!(
        counted == (FLOOD - BOUND) as u64,
        "each refusal is counted in sluice_limits_total: {counted}"
    );
    live.round_trip(8192)?;
    reached(&cluster, "victim", server.addr(8080))?;
    reached(&cluster, "victim", server.addr6(8080))?;

    drop(flood);
    let deadline = std::time::Instant::now() + sluice_lab::WAIT;
    loop {
        let (again, outcome) =
            hostile::start_storm(&cluster.pod("attacker").place(), server.addr(8080), BOUND)?;
        if outcome.opened == BOUND {
            break;
        }
        drop(again);
        ensure!(
            std::time::Instant::now() < deadline,
            "closed connections must give their room back: {outcome:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    live.round_trip(8192)?;
    Ok(())
}

/// Connections refused at the per-source bound by node 0's proxy so far.
fn refused_by_source(cluster: &Cluster) -> Result<u64> {
    let (status, text) = cluster.proxies[0].get("metrics", "/metrics")?;
    ensure!(status == 200, "metrics answered {status}");
    text.lines()
        .find_map(|l| l.strip_prefix("sluice_limits_total{outcome=\"refused_source\"} "))
        .context("no sluice_limits_total{outcome=\"refused_source\"} in the metrics")?
        .trim()
        .parse()
        .context("parse sluice_limits_total")
}

/// Waits (bounded) until pod `name` has `want` tracked sockets on node 0.
fn tracked_drains_to(cluster: &Cluster, name: &str, want: u64) -> Result<()> {
    let uid = cluster.pod(name).uid.to_string();
    let deadline = std::time::Instant::now() + sluice_lab::WAIT;
    loop {
        let pods = ebpf::list_pods(&cluster.pin_root(0))?;
        let now = pods
            .iter()
            .find(|p| p.uid == uid)
            .map(|p| p.tracked_sockets);
        if now == Some(want) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{name} still tracks {now:?} sockets, wanted {want}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
