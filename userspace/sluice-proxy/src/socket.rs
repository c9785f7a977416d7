//! Sockets inside a pod: listeners and upstream connections are created in the pod's netns
//! (through `sluice_capture::netns`, the one place that enters a netns) and used from here.
//!
//! Connections to a pod's app can carry the client's address as their source
//! ([`connect_app_in`]): an `IP_TRANSPARENT` socket bound to the client's address, marked
//! [`APP_DIAL_MARK`] so the app's replies are routed back to the proxy, and registered where
//! capture would otherwise take its SYN for inbound traffic and steer it back to the proxy.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sluice_capture::inbound_map::ProxyDials;
use sluice_capture::netns::Netns;
use sluice_capture::{APP_DIAL_MARK, PROXY_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const SOL_IP: libc::c_int = 0;
const SOL_IPV6: libc::c_int = 41;
const SO_ORIGINAL_DST: libc::c_int = 80;
const LISTEN_BACKLOG: i32 = 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates a listening socket inside `netns`. `dual_stack` listeners on `[::]` also take IPv4.
pub fn listen_in(netns: &Netns, addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))??;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `dst` from inside `netns`, marked so the iptables rules let the proxy's own
/// traffic through (eBPF capture never sees it: the proxy is not in the pod's cgroup).
pub async fn connect_in(netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))??;
    socket.set_mark(PROXY_MARK)?;
    connect_socket(socket, dst).await
}

/// Connects a socket made in a pod's netns, within [`CONNECT_TIMEOUT`].
async fn connect_socket(socket: Socket, dst: SocketAddr) -> io::Result<TcpStream> {
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out"),
        )),
    }
}

/// Which source port a connection to an app that carries the client's address binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortChoice {
    /// The client's own port first, any other if that is taken. For HBONE: the client's
    /// connection ended on its own node, so nothing in this netns holds its tuple.
    ClientFirst,
    /// Any port but the client's. For plaintext inbound: the proxy's accepted socket (eBPF:
    /// sk_lookup keeps the original 4-tuple) or the conntrack entry (iptables REDIRECT) already
    /// holds client:port → app:port in this netns, so a dial with that tuple would be delivered
    /// to that socket or NATed back into the proxy.
    NotClients,
}

/// The client address a connection to an app should carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSource {
    pub addr: SocketAddr,
    pub port: PortChoice,
}

/// Whose address an app saw on a connection the proxy made to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppSource {
    /// The client's: this address and port.
    Client(SocketAddr),
    /// The pod's own, as asked: no client address was given, or it cannot be carried
    /// (unspecified, loopback or multicast, or not the app's address family).
    Pod,
    /// The pod's own, because carrying the client's failed: why.
    NotPreserved(String),
}

/// A pod's dials to its apps that carry a client's address: where capture is told about them
/// (the pinned `SLUICE_PROXY_DIALS` under eBPF capture) and the ones live now, which the
/// proxy's own inbound listener refuses if capture steers one back to it anyway.
pub struct AppDials {
    bpf: Option<Arc<ProxyDials>>,
    netns_ino: u64,
    /// (client, app) → live dials with that tuple (one, unless a failed dial's guard has not
    /// run yet when the same tuple is dialled again).
    live: Mutex<HashMap<(SocketAddr, SocketAddr), u32>>,
    /// Dials of this pod registered with capture right now (bounded by
    /// [`MAX_REGISTERED_PER_POD`], so one pod whose app never answers cannot take the node's
    /// whole `SLUICE_PROXY_DIALS` from the others).
    registered: std::sync::atomic::AtomicUsize,
}

/// How many dials of one pod may be registered with capture at once: 128 pods at this bound
/// fill `SLUICE_PROXY_DIALS` (65,536), more than a kubelet runs. A dial past it goes from the
/// pod's address (counted as `source_not_preserved`).
pub const MAX_REGISTERED_PER_POD: usize = 512;

/// One of a pod's [`MAX_REGISTERED_PER_POD`] registration slots, given back on drop.
struct Slot(Arc<AppDials>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .registered
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl AppDials {
    /// The dials of the pod whose netns has inode `netns_ino`; `bpf` is the pinned
    /// `SLUICE_PROXY_DIALS` under eBPF capture, `None` under iptables (or without capture).
    pub fn new(bpf: Option<Arc<ProxyDials>>, netns_ino: u64) -> Arc<Self> {
        Arc::new(Self {
            bpf,
            netns_ino,
            live: Mutex::new(HashMap::new()),
            registered: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// A registration slot, or `None` when the pod already holds all of its own.
    fn reserve(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .registered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = Slot(self.clone());
        (taken < MAX_REGISTERED_PER_POD).then_some(slot)
    }

    /// Whether a connection from `peer` to `local` accepted in this pod is one of the proxy's
    /// own dials to an app, come back to the proxy.
    pub fn is_own(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        let key = (canonical(peer), canonical(local));
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&key)
    }

    fn hold(self: &Arc<Self>, client: SocketAddr, app: SocketAddr) -> OwnDial {
        let key = (canonical(client), canonical(app));
        *self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(0) += 1;
        OwnDial {
            dials: self.clone(),
            key,
        }
    }
}

/// One live dial in [`AppDials`], for as long as its connection lives: capture could steer its
/// SYN back to the proxy, and the proxy accepts that connection only after `connect()` returned.
struct OwnDial {
    dials: Arc<AppDials>,
    key: (SocketAddr, SocketAddr),
}

impl Drop for OwnDial {
    fn drop(&mut self) {
        let mut live = self
            .dials
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = live.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.key);
            }
        }
    }
}

/// A connection to a pod's app.
pub struct AppStream {
    pub stream: TcpStream,
    /// Whose address the app sees.
    pub source: AppSource,
    /// Keeps the dial known as the proxy's own while the connection lives.
    _own: Option<OwnDial>,
}

impl From<TcpStream> for AppStream {
    /// A connection from the pod's own address.
    fn from(stream: TcpStream) -> Self {
        Self {
            stream,
            source: AppSource::Pod,
            _own: None,
        }
    }
}

/// Connects to the app at `dst` from inside `netns`, from the client's address when `source`
/// is given and can be carried, else as [`connect_in`] does. When carrying the client's address
/// fails before the app answered (no `CAP_NET_ADMIN`, no free port, `SLUICE_PROXY_DIALS` full),
/// the connection is made from the pod's address instead and says why
/// ([`AppSource::NotPreserved`]). The app's own answer (refused, timed out) is the error.
pub async fn connect_app_in(
    netns: &Netns,
    dst: SocketAddr,
    source: Option<ClientSource>,
    dials: &Arc<AppDials>,
) -> io::Result<AppStream> {
    let dst = canonical(dst);
    let Some(source) = source.and_then(|s| carriable(s, dst)) else {
        return connect_in(netns, dst).await.map(AppStream::from);
    };
    let why = match connect_from_client(netns, dst, source, dials).await? {
        Ok(app) => return Ok(app),
        Err(why) => why,
    };
    let stream = connect_in(netns, dst).await?;
    Ok(AppStream {
        stream,
        source: AppSource::NotPreserved(why),
        _own: None,
    })
}

/// `source` in canonical form if a connection to `dst` can carry it: a unicast address that is
/// not loopback nor unspecified, of `dst`'s family (an IPv4 client reaching an IPv6 app has no
/// IPv6 address to carry), and not IPv6 link-local (binding one needs its interface, which
/// names nothing in the pod's netns).
fn carriable(source: ClientSource, dst: SocketAddr) -> Option<ClientSource> {
    let addr = canonical(source.addr);
    let special = match addr.ip() {
        IpAddr::V4(ip) => {
            ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast()
        }
        IpAddr::V6(ip) => {
            ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_unicast_link_local()
        }
    };
    (!special && addr.is_ipv4() == dst.is_ipv4()).then_some(ClientSource {
        addr,
        port: source.port,
    })
}

/// The source ports the proxy's connections to apps take when not the client's own: below the
/// ephemeral ranges clients' own ports come from (Linux 32768–60999, Windows 49152–65535). The
/// captured connection's client may have other connections to the same app port from the same
/// address; a dial sharing one's tuple would reach that connection's socket (or conntrack
/// entry) instead of the app, and that client's next connection from the dial's port would
/// reach the app's socket of the dial. Outside those ranges such a clash needs a client that
/// picks its own ports there.
const DIAL_PORTS: std::ops::RangeInclusive<u16> = 20000..=32767;
/// Every attempt of one dial: the client's port (HBONE), then ports of [`DIAL_PORTS`] while
/// the one tried is in use.
const MAX_ATTEMPTS: usize = 6;

/// The source ports one dial tries, in order (see [`PortChoice`]).
#[derive(Debug)]
struct PortPlan {
    /// 0 when the client's port is not known.
    client_port: u16,
    /// The port the next bind asks for.
    next: u16,
    attempts: usize,
}

impl PortPlan {
    fn new(client_port: u16, choice: PortChoice) -> Self {
        let next = match choice {
            PortChoice::ClientFirst if client_port != 0 => client_port,
            _ => pick(client_port, 0),
        };
        Self {
            client_port,
            next,
            attempts: 1,
        }
    }

    fn port(&self) -> u16 {
        self.next
    }

    /// The port was in use (bind: `EADDRINUSE`; connect: the tuple exists, `EADDRNOTAVAIL`):
    /// whether to try another (then [`PortPlan::port`] is a fresh one).
    fn in_use(&mut self) -> bool {
        if self.attempts >= MAX_ATTEMPTS {
            return false;
        }
        self.attempts += 1;
        self.next = pick(self.client_port, self.attempts as u64);
        true
    }
}

/// A port of [`DIAL_PORTS`] that is not `avoid` (the client's own), spread so concurrent dials
/// rarely try the same one.
fn pick(avoid: u16, salt: u64) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(n ^ salt.rotate_left(32));
    let span = u64::from(DIAL_PORTS.end() - DIAL_PORTS.start()) + 1;
    let port = DIAL_PORTS.start() + (hasher.finish() % span) as u16;
    if port == avoid {
        // The next one is not the client's (the range has thousands of ports).
        if port == *DIAL_PORTS.end() {
            *DIAL_PORTS.start()
        } else {
            port + 1
        }
    } else {
        port
    }
}

/// `EADDRINUSE` from bind, `EADDRNOTAVAIL` (or `EADDRINUSE`) from connect: this source port
/// cannot be used now, another may.
fn port_in_use(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
    )
}

/// One dial from the client's address. The outer error is the app's answer; the inner one
/// says why the client's address could not be carried (the caller then dials as usual).
async fn connect_from_client(
    netns: &Netns,
    dst: SocketAddr,
    source: ClientSource,
    dials: &Arc<AppDials>,
) -> io::Result<Result<AppStream, String>> {
    let mut plan = PortPlan::new(source.addr.port(), source.port);
    for _ in 0..MAX_ATTEMPTS {
        let port = plan.port();
        let socket = match transparent_socket(netns, dst) {
            Ok(socket) => socket,
            Err(e) => {
                return Ok(Err(format!(
                    "set up a transparent socket (IP_TRANSPARENT and SO_MARK need CAP_NET_ADMIN): {e}"
                )));
            }
        };
        let want = SocketAddr::new(source.addr.ip(), port);
        if let Err(e) = socket.bind(&want.into()) {
            if port_in_use(&e) && plan.in_use() {
                continue;
            }
            return Ok(Err(format!("bind {want}: {e}")));
        }
        let Some(bound) = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(canonical)
        else {
            return Ok(Err(format!("read the address bound for {want}")));
        };
        let own = dials.hold(bound, dst);
        let registered = match &dials.bpf {
            Some(map) => match dials.reserve() {
                None => {
                    return Ok(Err(format!(
                        "the pod already has {MAX_REGISTERED_PER_POD} dials registered with capture"
                    )));
                }
                Some(slot) => match map.allow(dials.netns_ino, bound, dst) {
                    Ok(guard) => Some((slot, guard)),
                    Err(e) => {
                        if !ProxyDials::is_full(&e) {
                            tracing::warn!(client = %bound, app = %dst, error = %e, "could not register a dial in SLUICE_PROXY_DIALS; dialling from the pod's address");
                        }
                        return Ok(Err(format!("register the dial with capture: {e}")));
                    }
                },
            },
            None => None,
        };
        let connected = connect_socket(socket, dst).await;
        // The SYN has been answered (or never will be): capture needs the entry no more.
        drop(registered);
        match connected {
            Ok(stream) => {
                return Ok(Ok(AppStream {
                    stream,
                    source: AppSource::Client(bound),
                    _own: Some(own),
                }));
            }
            Err(e) if port_in_use(&e) => {
                if plan.in_use() {
                    continue;
                }
                return Ok(Err(format!("connect from {bound}: {e}")));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                // An app that does not answer, or (when every such connect of the pod times
                // out) a pod whose reply routing is gone: the app's answer left towards the
                // client instead of coming back to the proxy.
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect to {dst} from the client's address {bound} timed out (the app \
                         does not answer; if every such connect of the pod times out, its reply \
                         routing, mark bit 0x1000 to table 100, is missing: capture it again, or \
                         run with --preserve-source=false)"
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Err(format!(
        "no usable source port after {MAX_ATTEMPTS} attempts"
    )))
}

/// A socket in `netns` that may bind an address the netns does not have (`IP_TRANSPARENT`),
/// marked so the app's replies come back to it.
fn transparent_socket(netns: &Netns, dst: SocketAddr) -> io::Result<Socket> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))??;
    socket.set_mark(APP_DIAL_MARK)?;
    if dst.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    Ok(socket)
}

/// Where a captured connection was going before capture rewrote it, as the kernel reports it
/// to `getsockopt(SO_ORIGINAL_DST)`: conntrack after an iptables REDIRECT, or sluice's
/// cgroup/getsockopt program after an eBPF redirect.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // SAFETY: the fd stays open for the call; the stream owns it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match stream.local_addr()? {
        SocketAddr::V4(_) => sockopt_addr(fd, SOL_IP),
        SocketAddr::V6(local) if local.ip().to_ipv4_mapped().is_some() => sockopt_addr(fd, SOL_IP),
        SocketAddr::V6(_) => sockopt_addr(fd, SOL_IPV6),
    }
}

fn sockopt_addr(fd: BorrowedFd<'_>, level: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are valid for writes of the given size.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut storage).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned a malformed address",
        )
    };
    let addr = match i32::from(storage.ss_family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in.
            let sin = unsafe { &*std::ptr::from_ref(&storage).cast::<libc::sockaddr_in>() };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*std::ptr::from_ref(&storage).cast::<libc::sockaddr_in6>() };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            ))
        }
        _ => return Err(bad()),
    };
    Ok(canonical(addr))
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// All addresses: eBPF capture redirects to the pod's own address (so the client's address is
/// unique on the node), iptables REDIRECT to loopback. Connections from outside the pod to
/// 15001 never get here: both backends steer them to 15006 like any other inbound port.
pub fn outbound_v4() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        sluice_capture::PORT_OUTBOUND,
    ))
}

pub fn outbound_v6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        sluice_capture::PORT_OUTBOUND,
        0,
        0,
    ))
}

pub fn inbound_any_v6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        sluice_capture::PORT_INBOUND,
        0,
        0,
    ))
}

/// HBONE, on all addresses of the pod (dual-stack).
pub fn hbone_any_v6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        sluice_capture::PORT_HBONE,
        0,
        0,
    ))
}

pub fn inbound_any_v4() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        sluice_capture::PORT_INBOUND,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_folds_v4_mapped_only() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hbone_tries_the_clients_port_first_then_the_dial_range() {
        let mut plan = PortPlan::new(40000, PortChoice::ClientFirst);
        assert_eq!(plan.port(), 40000);
        // Taken (at bind or connect): another, from the dial range.
        assert!(plan.in_use());
        assert!(DIAL_PORTS.contains(&plan.port()), "{}", plan.port());
    }

    #[test]
    fn plaintext_takes_dial_range_ports_never_the_clients() {
        for client_port in [*DIAL_PORTS.start(), 25000, *DIAL_PORTS.end(), 40000] {
            for _ in 0..2000 {
                let plan = PortPlan::new(client_port, PortChoice::NotClients);
                assert!(DIAL_PORTS.contains(&plan.port()));
                assert_ne!(plan.port(), client_port);
            }
        }
        // An unknown client port: anything in the range.
        assert!(DIAL_PORTS.contains(&PortPlan::new(0, PortChoice::ClientFirst).port()));
    }

    #[test]
    fn picks_spread_over_the_range() {
        let picks: std::collections::HashSet<u16> = (0..200).map(|i| pick(0, i)).collect();
        assert!(
            picks.len() > 150,
            "only {} distinct ports in 200 picks",
            picks.len()
        );
    }

    #[test]
    fn every_dial_is_bounded_in_attempts() {
        let mut plan = PortPlan::new(40000, PortChoice::ClientFirst);
        let mut attempts = 1;
        while plan.in_use() {
            attempts += 1;
            assert!(attempts <= MAX_ATTEMPTS + 1, "unbounded");
        }
        assert_eq!(attempts, MAX_ATTEMPTS);
    }

    #[test]
    fn only_a_unicast_client_of_the_apps_family_is_carried() {
        let source = |a: &str| ClientSource {
            addr: addr(a),
            port: PortChoice::NotClients,
        };
        let app4 = addr("10.1.0.5:8080");
        let app6 = addr("[fd00::5]:8080");
        let carried =
            |client: &str, app: SocketAddr| carriable(source(client), app).map(|s| s.addr);
        assert_eq!(
            carried("10.2.0.7:40000", app4),
            Some(addr("10.2.0.7:40000"))
        );
        assert_eq!(
            carried("[::ffff:10.2.0.7]:40000", app4),
            Some(addr("10.2.0.7:40000")),
            "an IPv4 client on a dual-stack listener"
        );
        assert_eq!(
            carried("[fd00::7]:40000", app6),
            Some(addr("[fd00::7]:40000"))
        );
        for (client, app) in [
            ("10.2.0.7:40000", app6),
            ("[::ffff:10.2.0.7]:40000", app6),
            ("[fd00::7]:40000", app4),
            ("127.0.0.1:40000", app4),
            ("127.9.9.9:40000", app4),
            ("0.0.0.0:40000", app4),
            ("255.255.255.255:40000", app4),
            ("224.0.0.1:40000", app4),
            ("[::1]:40000", app6),
            ("[::]:40000", app6),
            ("[ff02::1]:40000", app6),
            ("[fe80::7]:40000", app6),
            ("[::ffff:127.0.0.1]:40000", app4),
        ] {
            assert_eq!(carried(client, app), None, "{client} to {app}");
        }
        let kept = carriable(
            ClientSource {
                addr: addr("10.2.0.7:1"),
                port: PortChoice::ClientFirst,
            },
            app4,
        );
        assert_eq!(kept.map(|s| s.port), Some(PortChoice::ClientFirst));
    }

    #[test]
    fn live_dials_are_known_until_their_connection_ends() {
        let dials = AppDials::new(None, 1);
        let (client, app) = (addr("192.0.2.7:40000"), addr("10.1.0.5:8080"));
        assert!(!dials.is_own(client, app));
        let first = dials.hold(client, app);
        let second = dials.hold(addr("[::ffff:192.0.2.7]:40000"), app);
        assert!(dials.is_own(client, app));
        assert!(dials.is_own(
            addr("[::ffff:192.0.2.7]:40000"),
            addr("[::ffff:10.1.0.5]:8080")
        ));
        assert!(!dials.is_own(addr("192.0.2.7:40001"), app));
        assert!(!dials.is_own(client, addr("10.1.0.5:8081")));
        drop(first);
        assert!(
            dials.is_own(client, app),
            "the second dial with the tuple still lives"
        );
        drop(second);
        assert!(!dials.is_own(client, app));
        assert!(dials.live.lock().unwrap().is_empty());
    }
}
