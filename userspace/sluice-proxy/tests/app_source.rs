//! `socket::connect_app_in` against the kernel: in a network namespace of its own, with the
//! reply routing capture sets up (marked connections' replies are delivered locally), an app
//! accepts connections that carry a foreign client's address, bytes cross both ways, and a
//! closed port is refused at once rather than timing out.
//!
//! Needs root (network namespaces, `IP_TRANSPARENT`): without it these tests fail, they never
//! skip, so a run that could not check this says so.

// A test binary: a failed unwrap in a helper is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sluice_capture::netns::Netns;
use sluice_proxy::socket::{self, AppDials, AppSource, ClientSource, PortChoice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn must_be_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and bind foreign addresses: run them as root \
         (e.g. sudo -E cargo test -p sluice-proxy --test app_source)"
    );
}

/// Runs a command line (words split on spaces), failing the test with its stderr.
fn run(line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let out = Command::new(words[0])
        .args(&words[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {line}: {e}"));
    assert!(
        out.status.success(),
        "{line} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace deleted on drop, even when the test panics.
struct TestNetns {
    name: String,
}

impl TestNetns {
    /// A netns with `lo` up holding `addr`, and the reply routing of capture: connections
    /// marked with bit 12 (the proxy's dials that carry a client address) have their replies,
    /// and the resets answering them, delivered locally.
    fn new(tag: &str, addr: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // Made before the netns exists: a failure below still deletes it.
        let netns = Self {
            name: format!("sluice-src-{tag}-{}-{n}", std::process::id()),
        };
        let ns = netns.name.as_str();
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        run(&format!("ip netns add {ns}"));
        run(&format!("ip -n {ns} link set lo up"));
        // On `lo`: the app's address only has to be local (and not every kernel has dummy).
        let (family, nodad, any, reflect) = match addr.contains(':') {
            true => ("-6", "nodad", "::/0", "net.ipv6.fwmark_reflect=1"),
            false => ("-4", "", "0.0.0.0/0", "net.ipv4.fwmark_reflect=1"),
        };
        run(&format!("ip -n {ns} addr add {addr} dev lo {nodad}"));
        run(&format!(
            "ip -n {ns} {family} rule add fwmark 0x1000/0x1000 pref 32764 lookup 100"
        ));
        run(&format!(
            "ip -n {ns} {family} route add local {any} dev lo table 100"
        ));
        // The app's socket inherits the SYN's mark (so its replies route back), and the
        // kernel's resets carry the mark of what they answer.
        run(&format!(
            "ip netns exec {ns} sysctl -q -w net.ipv4.tcp_fwmark_accept=1 {reflect}"
        ));
        netns
    }

    fn open(&self) -> Netns {
        Netns::open(format!("/var/run/netns/{}", self.name)).unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An app in `netns` on `ip` (any free port) that echoes every connection and reports each
/// accepted peer; returns its address and the peers.
fn echo_app(
    netns: &Netns,
    ip: IpAddr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>) {
    let listener = socket::listen_in(netns, SocketAddr::new(ip, 0), false).unwrap();
    let addr = listener.local_addr().unwrap();
    let (peers, accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                return;
            };
            let _ = peers.send(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// A port on `ip` in `netns` that nothing listens on.
fn closed_port(netns: &Netns, ip: IpAddr) -> SocketAddr {
    let listener = socket::listen_in(netns, SocketAddr::new(ip, 0), false).unwrap();
    listener.local_addr().unwrap()
    // Dropped here: the port is closed again.
}

async fn echoes(stream: &mut tokio::net::TcpStream) {
    let sent = b"the client's own address, carried";
    stream.write_all(sent).await.unwrap();
    let mut back = [0u8; 33];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("the echo came back in time")
        .unwrap();
    assert_eq!(&back, sent);
}

async fn carries_the_client_address(tag: &str, app_net: &str, client: &str, other: &str) {
    must_be_root();
    let test_netns = TestNetns::new(tag, app_net);
    let netns = test_netns.open();
    let app_ip: IpAddr = app_net.split('/').next().unwrap().parse().unwrap();
    let (app, mut peers) = echo_app(&netns, app_ip);
    let dials = AppDials::new(None, netns.inode().unwrap());
    let client: SocketAddr = client.parse().unwrap();

    // Plaintext inbound: the client's address, any port but the client's.
    let source = ClientSource {
        addr: client,
        port: PortChoice::NotClients,
    };
    let mut dialled = tokio::time::timeout(
        WAIT,
        socket::connect_app_in(&netns, app, Some(source), &dials),
    )
    .await
    .expect("the dial is answered in time")
    .unwrap();
    let AppSource::Client(bound) = dialled.source.clone() else {
        panic!("the client's address was not carried: {:?}", dialled.source);
    };
    assert_eq!(bound.ip(), client.ip());
    assert_ne!(bound.port(), client.port(), "never the client's own port");
    let peer = tokio::time::timeout(WAIT, peers.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peer, bound, "the app sees the client's address");
    echoes(&mut dialled.stream).await;
    assert!(dials.is_own(bound, app), "a live dial is the proxy's own");
    drop(dialled);
    assert!(!dials.is_own(bound, app), "an ended dial is forgotten");

    // HBONE: the client's own port, and another when that is taken (a listener on every
    // address holds it).
    let taken = socket::listen_in(&netns, SocketAddr::new(any(app_ip), 0), false).unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    for (port, expect_same) in [(client.port() + 1, true), (taken_port, false)] {
        let source = ClientSource {
            addr: SocketAddr::new(client.ip(), port),
            port: PortChoice::ClientFirst,
        };
        let mut dialled = tokio::time::timeout(
            WAIT,
            socket::connect_app_in(&netns, app, Some(source), &dials),
        )
        .await
        .expect("the dial is answered in time")
        .unwrap();
        let AppSource::Client(bound) = dialled.source.clone() else {
            panic!("the client's address was not carried: {:?}", dialled.source);
        };
        assert_eq!(bound.ip(), client.ip());
        assert_eq!(
            bound.port() == port,
            expect_same,
            "bound {bound}, asked {port}"
        );
        let peer = tokio::time::timeout(WAIT, peers.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(peer, bound);
        echoes(&mut dialled.stream).await;
    }
    drop(taken);

    // A closed port answers with a reset, which the reply routing brings back: refused at
    // once, not a timeout.
    let closed = closed_port(&netns, app_ip);
    let started = Instant::now();
    let refused = socket::connect_app_in(
        &netns,
        closed,
        Some(ClientSource {
            addr: client,
            port: PortChoice::NotClients,
        }),
        &dials,
    )
    .await;
    let Err(e) = refused else {
        panic!("a dial to the closed port {closed} succeeded");
    };
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED),
        "a dial to a closed port: {e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused only after {:?}",
        started.elapsed()
    );

    // What cannot be carried goes from the pod's own address, as without preservation.
    let other: SocketAddr = other.parse().unwrap();
    for source in [other, SocketAddr::new(loopback(app_ip), 40000)] {
        let mut dialled = socket::connect_app_in(
            &netns,
            app,
            Some(ClientSource {
                addr: source,
                port: PortChoice::NotClients,
            }),
            &dials,
        )
        .await
        .unwrap();
        assert_eq!(dialled.source, AppSource::Pod, "from {source}");
        let peer = tokio::time::timeout(WAIT, peers.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(peer.ip(), app_ip, "from {source}: the pod's own address");
        echoes(&mut dialled.stream).await;
    }
}

fn any(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

#[tokio::test]
async fn an_ipv4_app_sees_the_clients_address() {
    let x = std::process::id() % 200 + 1;
    carries_the_client_address(
        "v4",
        &format!("10.200.{x}.1/24"),
        "192.0.2.7:40000",
        "[2001:db8::7]:40000",
    )
    .await;
}

#[tokio::test]
async fn an_ipv6_app_sees_the_clients_address() {
    carries_the_client_address(
        "v6",
        "fd00:200::1/64",
        "[2001:db8::7]:40000",
        "192.0.2.7:40000",
    )
    .await;
}
