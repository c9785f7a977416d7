//! Bounds on what peers and pods can make the proxy hold: how long a handshake, a dial or an
//! idle connection may take, and how many connections one source and the whole node may have
//! open. Every bound is a flag with a default (see `main.rs`); every refusal is counted.
//!
//! Invariants:
//! - a connection is admitted (accepted and kept) only under a [`Permit`], taken before any
//!   byte is read from it and released when its task ends, so the counts can never drift;
//! - one source address never holds more than [`Limits::max_per_source`] of the node's
//!   connections, nor more than [`Limits::max_handshakes_per_source`] unauthenticated 15008
//!   handshakes: a flood from one pod or peer is refused at its own bound while every other
//!   source keeps being served;
//! - the node-wide bound ([`Limits::max_connections`]) is chosen below the open-file limit
//!   with room to spare ([`FD_HEADROOM`], and each connection's worst case of descriptors), so
//!   the proxy refuses new connections before `accept()` or an app dial ever fails with EMFILE.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::warn;

/// Descriptors kept free below the open-file limit for everything that is not a proxied
/// connection: listeners of new pods, the agent's socket, certificates, logs, admin clients.
pub const FD_HEADROOM: u64 = 1024;
/// Descriptors one proxied connection may hold at worst: its client, its upstream, and for
/// splice two pipes of two ends each.
pub const FDS_PER_CONNECTION: u64 = 6;
/// The node-wide default when the open-file limit allows more.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;

/// The proxy's bounds. [`Limits::default`] is what the flags default to.
#[derive(Clone, Debug)]
pub struct Limits {
    /// TLS + HTTP/2 handshake of an HBONE connection, each side: a peer that has not finished
    /// by then is closed (server) or given up on (client).
    pub handshake_timeout: Duration,
    /// An outbound tunnel in all: waiting for a pooled connection (or its dial), the dial
    /// itself and the CONNECT's answer.
    pub connect_timeout: Duration,
    /// A 15008 connection that has carried no stream for this long is sent GOAWAY and closed.
    pub server_idle_timeout: Duration,
    /// How often an HBONE connection (either side) PINGs its peer, and how long the PONG may
    /// take before the connection is closed as dead.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// `TCP_USER_TIMEOUT` on HBONE sockets: data unacknowledged for this long kills the
    /// connection; TCP keepalive probes start after the same idle time.
    pub tcp_user_timeout: Duration,
    /// Connections the proxy holds at once, all pods and listeners together.
    pub max_connections: usize,
    /// Connections one source address may hold at once (a pod's own outbound, or what a peer
    /// opens to the node's pods, plaintext or HBONE).
    pub max_per_source: usize,
    /// 15008 connections of one source address still in their TLS / HTTP/2 handshake.
    pub max_handshakes_per_source: usize,
    /// 15008 connections still in their handshake, node-wide.
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            server_idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            tcp_user_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_source: 4096,
            max_handshakes_per_source: 64,
            max_handshakes: 1024,
        }
    }
}

impl Limits {
    /// Lowers the node-wide bound to what `nofile` (the open-file limit) can hold with
    /// [`FD_HEADROOM`] to spare; says so when it had to.
    pub fn fit_to_open_files(mut self, nofile: u64) -> Self {
        let fits = nofile.saturating_sub(FD_HEADROOM) / FDS_PER_CONNECTION;
        let fits = usize::try_from(fits).unwrap_or(usize::MAX).max(1);
        if fits < self.max_connections {
            warn!(
                nofile,
                asked = self.max_connections,
                max_connections = fits,
                "the open-file limit cannot hold --max-connections; lowered (raise the \
                 container's nofile limit to hold more)"
            );
            self.max_connections = fits;
        }
        self.max_handshakes = self.max_handshakes.min(self.max_connections);
        self
    }
}

/// The soft open-file limit (after `main` raised it to the hard one).
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Why a connection was not admitted. Each is counted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The node holds [`Limits::max_connections`].
    Node,
    /// The source holds [`Limits::max_per_source`].
    Source,
    /// The node has [`Limits::max_handshakes`] 15008 handshakes in flight.
    NodeHandshakes,
    /// The source has [`Limits::max_handshakes_per_source`] 15008 handshakes in flight.
    SourceHandshakes,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Node => "the node holds its maximum of connections (--max-connections)",
            Refused::Source => {
                "this source holds its maximum of connections (--max-connections-per-source)"
            }
            Refused::NodeHandshakes => {
                "the node has its maximum of HBONE handshakes in flight (--max-handshakes)"
            }
            Refused::SourceHandshakes => {
                "this source has its maximum of HBONE handshakes in flight \
                 (--max-handshakes-per-source)"
            }
        }
    }
}

/// Refusals and deadlines hit, for metrics and tests.
#[derive(Debug, Default)]
pub struct LimitStats {
    pub refused_node: AtomicU64,
    pub refused_source: AtomicU64,
    pub refused_node_handshakes: AtomicU64,
    pub refused_source_handshakes: AtomicU64,
    /// HBONE handshakes not done within the deadline (server side).
    pub handshake_timeouts: AtomicU64,
    /// 15008 connections closed for carrying no stream for the idle timeout.
    pub idle_closed: AtomicU64,
    /// HBONE connections (either side) closed because a PING went unanswered.
    pub keepalive_failed: AtomicU64,
    /// Outbound tunnels not open within the connect timeout.
    pub connect_timeouts: AtomicU64,
    /// Outbound tunnels given up because the captured client went away while waiting.
    pub client_gone: AtomicU64,
}

impl LimitStats {
    pub fn snapshot(&self) -> [(&'static str, u64); 9] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("refused_node", get(&self.refused_node)),
            ("refused_source", get(&self.refused_source)),
            (
                "refused_node_handshakes",
                get(&self.refused_node_handshakes),
            ),
            (
                "refused_source_handshakes",
                get(&self.refused_source_handshakes),
            ),
            ("handshake_timeout", get(&self.handshake_timeouts)),
            ("idle_closed", get(&self.idle_closed)),
            ("keepalive_failed", get(&self.keepalive_failed)),
            ("connect_timeout", get(&self.connect_timeouts)),
            ("client_gone", get(&self.client_gone)),
        ]
    }

    fn count(&self, refused: Refused) {
        let counter = match refused {
            Refused::Node => &self.refused_node,
            Refused::Source => &self.refused_source,
            Refused::NodeHandshakes => &self.refused_node_handshakes,
            Refused::SourceHandshakes => &self.refused_source_handshakes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    /// source → (connections, handshakes); an entry goes when both are zero, so the map is
    /// bounded by the connections held.
    by_source: HashMap<IpAddr, (usize, usize)>,
}

/// The node's admission control: one per proxy, shared by every pod's listeners.
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
    pub stats: LimitStats,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
            stats: LimitStats::default(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections held now: (node-wide, handshakes in flight).
    pub fn held(&self) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        (counts.connections, counts.handshakes)
    }

    /// Admits a connection from `source`; for a 15008 connection (`handshake`), also as a
    /// handshake in flight until [`Permit::handshake_done`]. A refusal is counted.
    pub fn admit(self: &Arc<Self>, source: IpAddr, handshake: bool) -> Result<Permit, Refused> {
        let source = crate::socket::canonical(std::net::SocketAddr::new(source, 0)).ip();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (conns, shakes) = counts.by_source.get(&source).copied().unwrap_or_default();
        let refused = if counts.connections >= self.limits.max_connections {
            Some(Refused::Node)
        } else if conns >= self.limits.max_per_source {
            Some(Refused::Source)
        } else if handshake && counts.handshakes >= self.limits.max_handshakes {
            Some(Refused::NodeHandshakes)
        } else if handshake && shakes >= self.limits.max_handshakes_per_source {
            Some(Refused::SourceHandshakes)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(counts);
            self.stats.count(refused);
            return Err(refused);
        }
        counts.connections += 1;
        counts.handshakes += usize::from(handshake);
        let entry = counts.by_source.entry(source).or_default();
        entry.0 += 1;
        entry.1 += usize::from(handshake);
        Ok(Permit {
            admission: self.clone(),
            source,
            handshake,
        })
    }

    fn release(&self, source: IpAddr, connection: bool, handshake: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let counts = &mut *counts;
        if connection {
            counts.connections = counts.connections.saturating_sub(1);
        }
        if handshake {
            counts.handshakes = counts.handshakes.saturating_sub(1);
        }
        if let Some(entry) = counts.by_source.get_mut(&source) {
            if connection {
                entry.0 = entry.0.saturating_sub(1);
            }
            if handshake {
                entry.1 = entry.1.saturating_sub(1);
            }
            if *entry == (0, 0) {
                counts.by_source.remove(&source);
            }
        }
    }
}

/// One admitted connection; dropping it gives its room back.
pub struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
    handshake: bool,
}

impl Permit {
    /// The 15008 handshake is over (done or failed): the connection no longer counts against
    /// the handshake bounds.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshake) {
            self.admission.release(self.source, false, true);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.source, true, self.handshake);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("source", &self.source)
            .field("handshake", &self.handshake)
            .finish()
    }
}

/// TCP keepalive and `TCP_USER_TIMEOUT` on an HBONE socket, so a peer that vanished (power
/// off, partition) is noticed by the kernel even with no data in flight. Failures are not
/// fatal (the HTTP/2 PING still bounds the connection) and are not expected on Linux.
pub fn tune_hbone_socket(socket: &tokio::net::TcpStream, limits: &Limits) {
    let sock = socket2::SockRef::from(socket);
    let idle = limits.tcp_user_timeout;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(5).min(idle))
        .with_retries(3);
    let _ = sock.set_tcp_nodelay(true);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(idle)))
    {
        tracing::debug!(error = %e, "cannot set TCP keepalive on an HBONE socket");
    }
}

/// Sends an HTTP/2 PING every `interval` and resolves when one is not answered within
/// `timeout` (or the connection can no longer send PINGs): the connection is then dead and
/// should be dropped. Runs alongside the connection's driver, which receives the PONGs.
pub async fn keepalive(mut ping_pong: h2::PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, per_source: usize, shakes: usize) -> Limits {
        Limits {
            max_connections,
            max_per_source: per_source,
            max_handshakes: shakes,
            max_handshakes_per_source: shakes,
            ..Limits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_source_at_its_bound_is_refused_while_others_are_admitted() {
        let admission = Admission::new(limits(10, 2, 10));
        let a = ip("10.0.0.1");
        let held: Vec<Permit> = (0..2).map(|_| admission.admit(a, false).unwrap()).collect();
        assert_eq!(admission.admit(a, false).unwrap_err(), Refused::Source);
        assert!(admission.admit(ip("10.0.0.2"), false).is_ok());
        assert_eq!(admission.stats.refused_source.load(Ordering::Relaxed), 1);
        drop(held);
        assert!(admission.admit(a, false).is_ok(), "room given back on drop");
        assert_eq!(admission.held(), (0, 0));
    }

    #[test]
    fn the_node_bound_holds_across_sources() {
        let admission = Admission::new(limits(3, 10, 10));
        let _held: Vec<Permit> = (1..=3)
            .map(|i| admission.admit(ip(&format!("10.0.0.{i}")), false).unwrap())
            .collect();
        assert_eq!(
            admission.admit(ip("10.0.0.9"), false).unwrap_err(),
            Refused::Node
        );
    }

    #[test]
    fn handshakes_in_flight_have_their_own_bound_released_when_done() {
        let admission = Admission::new(limits(100, 100, 2));
        let a = ip("fd00::1");
        let mut first = admission.admit(a, true).unwrap();
        let _second = admission.admit(a, true).unwrap();
        assert_eq!(
            admission.admit(a, true).unwrap_err(),
            Refused::NodeHandshakes
        );
        first.handshake_done();
        assert_eq!(admission.held(), (2, 1));
        let _third = admission.admit(a, true).unwrap();
        // A plaintext connection of the same source does not wait for handshakes.
        assert!(admission.admit(a, false).is_ok());
    }

    #[test]
    fn v4_mapped_sources_count_as_their_ipv4_form() {
        let admission = Admission::new(limits(10, 1, 10));
        let _held = admission.admit(ip("10.0.0.1"), false).unwrap();
        assert_eq!(
            admission.admit(ip("::ffff:10.0.0.1"), false).unwrap_err(),
            Refused::Source
        );
    }

    #[test]
    fn the_node_bound_fits_under_the_open_file_limit() {
        let fitted = Limits::default().fit_to_open_files(FD_HEADROOM + 6 * 100);
        assert_eq!(fitted.max_connections, 100);
        assert_eq!(fitted.max_handshakes, 100);
        let roomy = Limits::default().fit_to_open_files(1 << 20);
        assert_eq!(roomy.max_connections, DEFAULT_MAX_CONNECTIONS);
    }
}
