//! Bounds on what peers and pods can make the proxy hold: how long a handshake, a dial or an
//! idle connection may take, how many connections and descriptors a source, a pod and the
//! whole node may hold, and how fast handshakes may be started. Every bound is a flag with a
//! default (see `main.rs`); every refusal is counted.
//!
//! Invariants:
//! - a connection is admitted (accepted and kept) only under a [`Permit`], taken before any
//!   byte is read from it and released when its task ends, so the counts cannot drift; every
//!   further descriptor a connection needs (its upstream or app socket, splice pipes, a pooled
//!   HBONE connection) is charged to the node's descriptor budget under an [`FdCharge`] the same
//!   way, before it is created;
//! - connections are counted per (pod served, source address): a pod's own outbound under its
//!   own key, a peer's connections into a pod under that pod and the peer's address. Loopback
//!   sources (only the pod itself can use them) count as one. So a pod that puts other
//!   addresses on its loopback and connects to itself from each only spends its own pod's
//!   bound ([`Limits::max_per_pod`]), never another pod's or another source's;
//! - one (pod, source) never holds more than [`Limits::max_per_source`] connections nor more
//!   than [`Limits::max_handshakes_per_source`] unauthenticated 15008 handshakes; one source
//!   address starts at most [`Limits::handshake_rate_per_source`] handshakes a second node-wide
//!   and one pod's 15008 accepts at most [`Limits::handshake_rate_per_pod`]: a flood is refused
//!   at its own bound, before any cryptography, while other sources and pods are served;
//! - the node-wide bounds sit below the open-file limit with [`FD_HEADROOM`] to spare, so the
//!   proxy refuses new work before `accept()` or a dial ever fails with EMFILE.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

/// Descriptors kept free below the open-file limit for everything that is not a proxied
/// connection: listeners of new pods, the agent's socket, certificates, logs, admin clients.
pub const FD_HEADROOM: u64 = 1024;
/// The node-wide default when the open-file limit allows more.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// Descriptors a plaintext connection adds to its own socket: the upstream (or app) socket
/// and, for splice, two pipes of two ends each.
pub const PLAINTEXT_EXTRA_FDS: usize = 5;

/// How long a connection refused for its handshake rate is held before its reset.
pub const SLOW_REFUSAL: Duration = Duration::from_secs(1);
/// Refused connections held at once, node-wide (each one descriptor, within [`FD_HEADROOM`]);
/// past it refusals are reset at once.
pub const MAX_SLOW_REFUSALS: usize = 256;

/// Which pod a connection is served in: its netns inode (0 outside any pod, in tests).
pub type PodKey = u64;

/// The proxy's bounds. [`Limits::default`] is what the flags default to.
#[derive(Clone, Debug)]
pub struct Limits {
    /// TLS + HTTP/2 handshake of an HBONE connection, each side: a peer that has not finished
    /// by then is closed (server) or given up on (client).
    pub handshake_timeout: Duration,
    /// An outbound tunnel in all: waiting for a pooled connection (or its dial), the dial
    /// itself and the CONNECT's answer.
    pub connect_timeout: Duration,
    /// A 15008 connection that has carried no stream for this long is sent GOAWAY, and closed
    /// outright if the peer has not let it go within a keepalive interval and timeout more.
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
    /// Descriptors the proxy may hold for connections (sockets and pipes), all together:
    /// the open-file limit less [`FD_HEADROOM`].
    pub fd_budget: usize,
    /// Connections served in one pod at once (its outbound and everything into it).
    pub max_per_pod: usize,
    /// Connections one source address may hold into one pod (or a pod's own outbound) at once.
    pub max_per_source: usize,
    /// 15008 connections of one source into one pod still in their TLS / HTTP/2 handshake.
    pub max_handshakes_per_source: usize,
    /// 15008 connections still in their handshake, node-wide.
    pub max_handshakes: usize,
    /// New 15008 handshakes one source address may start per second, node-wide (sustained;
    /// twice as many in a burst). A handshake costs the proxy a signature and a key exchange:
    /// a peer that may start thousands a second takes the node's CPU from the tunnels it
    /// carries.
    pub handshake_rate_per_source: u32,
    /// New handshakes one pod's 15008 accepts per second, from every source together.
    pub handshake_rate_per_pod: u32,
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
            fd_budget: usize::MAX,
            max_per_pod: 16_384,
            max_per_source: 4096,
            max_handshakes_per_source: 64,
            max_handshakes: 1024,
            handshake_rate_per_source: 100,
            handshake_rate_per_pod: 500,
        }
    }
}

impl Limits {
    /// Fits the node-wide bounds under `nofile` (the open-file limit) with [`FD_HEADROOM`] to
    /// spare, and keeps the narrower bounds a fraction of the wider ones, so a few sources or
    /// pods can never take the whole node; says so when it had to lower what was asked.
    pub fn fit_to_open_files(mut self, nofile: u64) -> Self {
        let budget = usize::try_from(nofile.saturating_sub(FD_HEADROOM))
            .unwrap_or(usize::MAX)
            .max(1);
        self.fd_budget = budget;
        let asked = (self.max_connections, self.max_per_pod, self.max_per_source);
        self.max_connections = self.max_connections.min(budget);
        self.max_per_pod = self.max_per_pod.min((self.max_connections / 2).max(1));
        self.max_per_source = self.max_per_source.min((self.max_per_pod / 2).max(1));
        self.max_handshakes = self.max_handshakes.min(self.max_connections);
        if asked != (self.max_connections, self.max_per_pod, self.max_per_source) {
            warn!(
                nofile,
                max_connections = self.max_connections,
                max_per_pod = self.max_per_pod,
                max_per_source = self.max_per_source,
                "connection bounds lowered to fit the open-file limit (each narrower bound at \
                 most half the wider one); raise the container's nofile limit to hold more"
            );
        }
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

/// Why a connection (or a descriptor it needed) was refused. Each is counted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The node holds [`Limits::max_connections`].
    Node,
    /// The node's descriptor budget is spent.
    Fds,
    /// The pod holds [`Limits::max_per_pod`].
    Pod,
    /// The source holds [`Limits::max_per_source`] into this pod.
    Source,
    /// The node has [`Limits::max_handshakes`] 15008 handshakes in flight.
    NodeHandshakes,
    /// The source has [`Limits::max_handshakes_per_source`] handshakes in flight into this pod.
    SourceHandshakes,
    /// The source started more than [`Limits::handshake_rate_per_source`] handshakes a second.
    SourceHandshakeRate,
    /// The pod's 15008 was asked more than [`Limits::handshake_rate_per_pod`] a second.
    PodHandshakeRate,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Node => "the node holds its maximum of connections (--max-connections)",
            Refused::Fds => {
                "the proxy's descriptors are spent (the open-file limit, less headroom)"
            }
            Refused::Pod => "the pod holds its maximum of connections (--max-connections-per-pod)",
            Refused::Source => {
                "this source holds its maximum of connections into the pod \
                 (--max-connections-per-source)"
            }
            Refused::NodeHandshakes => {
                "the node has its maximum of HBONE handshakes in flight (--max-handshakes)"
            }
            Refused::SourceHandshakes => {
                "this source has its maximum of HBONE handshakes in flight \
                 (--max-handshakes-per-source)"
            }
            Refused::SourceHandshakeRate => {
                "this source starts HBONE handshakes faster than it may \
                 (--handshake-rate-per-source)"
            }
            Refused::PodHandshakeRate => {
                "the pod is asked for HBONE handshakes faster than it takes them \
                 (--handshake-rate-per-pod)"
            }
        }
    }
}

/// Refusals and deadlines hit, for metrics and tests.
#[derive(Debug, Default)]
pub struct LimitStats {
    pub refused_node: AtomicU64,
    pub refused_fds: AtomicU64,
    pub refused_pod: AtomicU64,
    pub refused_source: AtomicU64,
    pub refused_node_handshakes: AtomicU64,
    pub refused_source_handshakes: AtomicU64,
    pub refused_source_handshake_rate: AtomicU64,
    pub refused_pod_handshake_rate: AtomicU64,
    /// Streams refused because their connection already runs [`crate::hbone::MAX_STREAMS`]
    /// (streams the peer reset but whose work has not ended count too).
    pub refused_streams: AtomicU64,
    /// HBONE handshakes not done within the deadline (server side).
    pub handshake_timeouts: AtomicU64,
    /// 15008 connections closed for carrying no stream for the idle timeout.
    pub idle_closed: AtomicU64,
    /// HBONE connections (either side) closed because a PING went unanswered.
    pub keepalive_failed: AtomicU64,
    /// Outbound tunnels not open within the connect timeout.
    pub connect_timeouts: AtomicU64,
    /// Outbound tunnels given up because the captured client reset while waiting.
    pub client_gone: AtomicU64,
    /// Refusals for a handshake rate held [`SLOW_REFUSAL`] before their reset.
    pub slow_refusals: AtomicU64,
}

impl LimitStats {
    pub fn snapshot(&self) -> [(&'static str, u64); 15] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("refused_node", get(&self.refused_node)),
            ("refused_fds", get(&self.refused_fds)),
            ("refused_pod", get(&self.refused_pod)),
            ("refused_source", get(&self.refused_source)),
            (
                "refused_node_handshakes",
                get(&self.refused_node_handshakes),
            ),
            (
                "refused_source_handshakes",
                get(&self.refused_source_handshakes),
            ),
            (
                "refused_source_handshake_rate",
                get(&self.refused_source_handshake_rate),
            ),
            (
                "refused_pod_handshake_rate",
                get(&self.refused_pod_handshake_rate),
            ),
            ("refused_streams", get(&self.refused_streams)),
            ("handshake_timeout", get(&self.handshake_timeouts)),
            ("idle_closed", get(&self.idle_closed)),
            ("keepalive_failed", get(&self.keepalive_failed)),
            ("connect_timeout", get(&self.connect_timeouts)),
            ("client_gone", get(&self.client_gone)),
            ("slow_refusals", get(&self.slow_refusals)),
        ]
    }

    fn count(&self, refused: Refused) {
        let counter = match refused {
            Refused::Node => &self.refused_node,
            Refused::Fds => &self.refused_fds,
            Refused::Pod => &self.refused_pod,
            Refused::Source => &self.refused_source,
            Refused::NodeHandshakes => &self.refused_node_handshakes,
            Refused::SourceHandshakes => &self.refused_source_handshakes,
            Refused::SourceHandshakeRate => &self.refused_source_handshake_rate,
            Refused::PodHandshakeRate => &self.refused_pod_handshake_rate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A source as the bounds see it: the pod it is served in and its address, loopback
/// addresses folded into one (only the pod itself reaches its listeners from loopback).
type SourceKey = (PodKey, IpAddr);

fn source_key(pod: PodKey, source: IpAddr) -> SourceKey {
    let source = crate::socket::canonical(std::net::SocketAddr::new(source, 0)).ip();
    if source.is_loopback() {
        (pod, IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        (pod, source)
    }
}

/// Whose handshake rate a source spends: its address node-wide, except loopback, which is the
/// pod's own.
fn rate_key((pod, source): SourceKey) -> SourceKey {
    if source.is_loopback() {
        (pod, source)
    } else {
        (0, source)
    }
}

#[derive(Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    fds: usize,
    /// (pod, source) → (connections, handshakes); an entry goes when both are zero, so the
    /// map is bounded by the connections held.
    by_source: HashMap<SourceKey, (usize, usize)>,
    /// pod → connections; gone at zero.
    by_pod: HashMap<PodKey, usize>,
    /// Handshake token buckets of sources and of pods. They outlive the connections (a
    /// flood's are short); pruned of full buckets, which carry no state.
    source_rates: Rates<SourceKey>,
    pod_rates: Rates<PodKey>,
}

/// Sources (or pods) whose handshake rate is remembered at most; past it (after pruning the
/// ones that went quiet) a new one's handshake is refused, so the map stays bounded.
const MAX_RATE_KEYS: usize = 65_536;

/// A token bucket: `tokens` at `at`, refilled at the rate up to twice the rate.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, rate: f64, now: Instant) -> f64 {
        (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(2.0 * rate)
    }
}

struct Rates<K>(HashMap<K, Bucket>);

impl<K> Default for Rates<K> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq + Copy> Rates<K> {
    /// Whether `key` has a token at `rate` a second (twice that in a burst); does not take it.
    fn has_token(&mut self, key: K, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate.max(1));
        if self.0.len() >= MAX_RATE_KEYS && !self.0.contains_key(&key) {
            self.0.retain(|_, b| b.refilled(rate, now) < 2.0 * rate);
            if self.0.len() >= MAX_RATE_KEYS {
                return false;
            }
        }
        self.0
            .get(&key)
            .is_none_or(|b| b.refilled(rate, now) >= 1.0)
    }

    fn take(&mut self, key: K, rate: u32, now: Instant) {
        let rate = f64::from(rate.max(1));
        let bucket = self.0.entry(key).or_insert(Bucket {
            tokens: 2.0 * rate,
            at: now,
        });
        *bucket = Bucket {
            tokens: bucket.refilled(rate, now) - 1.0,
            at: now,
        };
    }
}

/// The node's admission control: one per proxy, shared by every pod's listeners.
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
    pub stats: LimitStats,
    /// Tunnels served into pods now (streams of accepted HBONE connections): work the
    /// connection counts do not show, for [`trim_memory_when_connections_fall`].
    tunnels: AtomicUsize,
    /// Refused connections held now ([`Admission::slow_refusal`]).
    slow: AtomicUsize,
}

/// One refused connection held before its reset; gives its room back on drop.
pub struct SlowRefusal(Arc<Admission>);

impl Drop for SlowRefusal {
    fn drop(&mut self) {
        self.0.slow.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one inbound tunnel while it lives.
pub struct TunnelGuard(Arc<Admission>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Descriptors charged to the node's budget; given back on drop.
pub struct FdCharge {
    admission: Arc<Admission>,
    fds: usize,
}

impl Drop for FdCharge {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.fds = counts.fds.saturating_sub(self.fds);
    }
}

impl std::fmt::Debug for FdCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdCharge").field("fds", &self.fds).finish()
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
            stats: LimitStats::default(),
            tunnels: AtomicUsize::new(0),
            slow: AtomicUsize::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Room to hold one more refused connection for [`SLOW_REFUSAL`] (at most
    /// [`MAX_SLOW_REFUSALS`] node-wide); `None`: reset it now.
    pub fn slow_refusal(self: &Arc<Self>) -> Option<SlowRefusal> {
        let taken = self
            .slow
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SLOW_REFUSALS).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return None;
        }
        self.stats.slow_refusals.fetch_add(1, Ordering::Relaxed);
        Some(SlowRefusal(self.clone()))
    }

    /// Counts an inbound tunnel until the guard drops.
    pub fn tunnel(self: &Arc<Self>) -> TunnelGuard {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelGuard(self.clone())
    }

    /// Connections held now and inbound tunnels served now, together.
    pub fn load(&self) -> usize {
        self.held().0 + self.tunnels.load(Ordering::Relaxed)
    }

    /// Connections held now: (node-wide, handshakes in flight).
    pub fn held(&self) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        (counts.connections, counts.handshakes)
    }

    /// Descriptors charged now (accepted sockets included).
    pub fn fds(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fds
    }

    /// Admits a connection from `source` served in `pod` (its accepted socket is charged as
    /// one descriptor); for a 15008 connection (`handshake`), also as a handshake in flight
    /// until [`Permit::handshake_done`]. A refusal is counted.
    pub fn admit(
        self: &Arc<Self>,
        pod: PodKey,
        source: IpAddr,
        handshake: bool,
    ) -> Result<Permit, Refused> {
        let key = source_key(pod, source);
        let limits = &self.limits;
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (conns, shakes) = counts.by_source.get(&key).copied().unwrap_or_default();
        let in_pod = counts.by_pod.get(&pod).copied().unwrap_or_default();
        let refused = if counts.connections >= limits.max_connections {
            Some(Refused::Node)
        } else if counts.fds >= limits.fd_budget {
            Some(Refused::Fds)
        } else if in_pod >= limits.max_per_pod {
            Some(Refused::Pod)
        } else if conns >= limits.max_per_source {
            Some(Refused::Source)
        } else if handshake && counts.handshakes >= limits.max_handshakes {
            Some(Refused::NodeHandshakes)
        } else if handshake && shakes >= limits.max_handshakes_per_source {
            Some(Refused::SourceHandshakes)
        } else if handshake
            && !counts
                .source_rates
                .has_token(rate_key(key), limits.handshake_rate_per_source, now)
        {
            Some(Refused::SourceHandshakeRate)
        } else if handshake
            && !counts
                .pod_rates
                .has_token(pod, limits.handshake_rate_per_pod, now)
        {
            Some(Refused::PodHandshakeRate)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(counts);
            self.stats.count(refused);
            return Err(refused);
        }
        if handshake {
            counts
                .source_rates
                .take(rate_key(key), limits.handshake_rate_per_source, now);
            counts
                .pod_rates
                .take(pod, limits.handshake_rate_per_pod, now);
        }
        counts.connections += 1;
        counts.fds += 1;
        counts.handshakes += usize::from(handshake);
        *counts.by_pod.entry(pod).or_default() += 1;
        let entry = counts.by_source.entry(key).or_default();
        entry.0 += 1;
        entry.1 += usize::from(handshake);
        Ok(Permit {
            admission: self.clone(),
            key,
            handshake,
        })
    }

    /// Charges `fds` more descriptors (an upstream or app socket, splice pipes, a pooled
    /// connection) to the node's budget, or refuses (counted) if it is spent.
    pub fn charge(self: &Arc<Self>, fds: usize) -> Result<FdCharge, Refused> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.fds.saturating_add(fds) > self.limits.fd_budget {
            drop(counts);
            self.stats.count(Refused::Fds);
            return Err(Refused::Fds);
        }
        counts.fds += fds;
        Ok(FdCharge {
            admission: self.clone(),
            fds,
        })
    }

    fn release(&self, (pod, source): SourceKey, connection: bool, handshake: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let counts = &mut *counts;
        if connection {
            counts.connections = counts.connections.saturating_sub(1);
            counts.fds = counts.fds.saturating_sub(1);
            if let Some(n) = counts.by_pod.get_mut(&pod) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.by_pod.remove(&pod);
                }
            }
        }
        if handshake {
            counts.handshakes = counts.handshakes.saturating_sub(1);
        }
        if let Some(entry) = counts.by_source.get_mut(&(pod, source)) {
            if connection {
                entry.0 = entry.0.saturating_sub(1);
            }
            if handshake {
                entry.1 = entry.1.saturating_sub(1);
            }
            if *entry == (0, 0) {
                counts.by_source.remove(&(pod, source));
            }
        }
    }
}

/// One admitted connection; dropping it gives its room back.
pub struct Permit {
    admission: Arc<Admission>,
    key: SourceKey,
    handshake: bool,
}

impl Permit {
    /// The 15008 handshake is over (done or failed): the connection no longer counts against
    /// the handshake bounds.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshake) {
            self.admission.release(self.key, false, true);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.key, true, self.handshake);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("pod", &self.key.0)
            .field("source", &self.key.1)
            .field("handshake", &self.handshake)
            .finish()
    }
}

/// Gives memory back to the system after a crowd of connections is gone. glibc keeps freed
/// memory in its arenas for reuse; after ten thousand connections close that is tens of
/// megabytes the node never sees again. Every 5 s: if the proxy carries less than half of what
/// it carried at its peak since the last trim ([`Admission::load`]; and a thousand fewer, so
/// quiet nodes never bother), `malloc_trim` returns the free pages.
pub async fn trim_memory_when_connections_fall(admission: Arc<Admission>) {
    let mut peak = 0usize;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let held = admission.load();
        peak = peak.max(held);
        if held * 2 < peak && peak - held >= 1000 {
            peak = held;
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only walks the allocator's own free lists.
                unsafe { libc::malloc_trim(0) }
            })
            .await;
            tracing::debug!(held, "freed memory returned to the system");
        }
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

    const POD: PodKey = 7;
    const OTHER_POD: PodKey = 8;

    #[test]
    fn a_source_at_its_bound_is_refused_while_others_are_admitted() {
        let admission = Admission::new(limits(10, 2, 10));
        let a = ip("10.0.0.1");
        let held: Vec<Permit> = (0..2)
            .map(|_| admission.admit(POD, a, false).unwrap())
            .collect();
        assert_eq!(admission.admit(POD, a, false).unwrap_err(), Refused::Source);
        assert!(admission.admit(POD, ip("10.0.0.2"), false).is_ok());
        // The same source into another pod is another bound.
        assert!(admission.admit(OTHER_POD, a, false).is_ok());
        assert_eq!(admission.stats.refused_source.load(Ordering::Relaxed), 1);
        drop(held);
        assert!(
            admission.admit(POD, a, false).is_ok(),
            "room given back on drop"
        );
        assert_eq!(admission.held(), (0, 0));
        assert_eq!(admission.fds(), 0);
    }

    #[test]
    fn loopback_sources_are_one_source_and_a_pod_has_its_own_bound() {
        let admission = Admission::new(Limits {
            max_per_source: 2,
            max_per_pod: 5,
            ..Limits::default()
        });
        // A pod connecting to itself from many loopback addresses is one source.
        let _a = admission.admit(POD, ip("127.0.0.2"), false).unwrap();
        let _b = admission.admit(POD, ip("127.9.9.9"), false).unwrap();
        assert_eq!(
            admission.admit(POD, ip("::1"), false).unwrap_err(),
            Refused::Source
        );
        // Addresses it put on its loopback spend only its own pod's bound...
        let _c: Vec<Permit> = (1..=3)
            .map(|i| {
                admission
                    .admit(POD, ip(&format!("10.9.0.{i}")), false)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            admission.admit(POD, ip("10.9.0.4"), false).unwrap_err(),
            Refused::Pod
        );
        // ...never the bound of the pod whose address it claimed.
        for _ in 0..2 {
            admission.admit(OTHER_POD, ip("10.9.0.1"), false).unwrap();
        }
    }

    #[test]
    fn the_node_bound_holds_across_sources() {
        let admission = Admission::new(limits(3, 10, 10));
        let _held: Vec<Permit> = (1..=3)
            .map(|i| {
                admission
                    .admit(POD + i, ip(&format!("10.0.0.{i}")), false)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            admission.admit(POD, ip("10.0.0.9"), false).unwrap_err(),
            Refused::Node
        );
    }

    #[test]
    fn descriptors_are_charged_and_given_back() {
        let admission = Admission::new(Limits {
            fd_budget: 8,
            ..Limits::default()
        });
        let permit = admission.admit(POD, ip("10.0.0.1"), false).unwrap();
        let extra = admission.charge(PLAINTEXT_EXTRA_FDS).unwrap();
        assert_eq!(admission.fds(), 6);
        assert_eq!(admission.charge(3).unwrap_err(), Refused::Fds);
        let _two = admission.charge(2).unwrap();
        assert_eq!(
            admission.admit(POD, ip("10.0.0.2"), false).unwrap_err(),
            Refused::Fds
        );
        drop((permit, extra));
        assert_eq!(admission.fds(), 2);
        assert_eq!(admission.stats.refused_fds.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn handshakes_in_flight_have_their_own_bound_released_when_done() {
        let admission = Admission::new(limits(100, 100, 2));
        let a = ip("fd00::1");
        let mut first = admission.admit(POD, a, true).unwrap();
        let _second = admission.admit(POD, a, true).unwrap();
        assert_eq!(
            admission.admit(POD, a, true).unwrap_err(),
            Refused::NodeHandshakes
        );
        first.handshake_done();
        assert_eq!(admission.held(), (2, 1));
        let _third = admission.admit(POD, a, true).unwrap();
        // A plaintext connection of the same source does not wait for handshakes.
        assert!(admission.admit(POD, a, false).is_ok());
    }

    #[test]
    fn a_source_starting_handshakes_too_fast_is_refused_until_its_bucket_refills() {
        let admission = Admission::new(Limits {
            handshake_rate_per_source: 5,
            ..Limits::default()
        });
        let a = ip("10.0.0.1");
        // A burst of twice the rate, each handshake over at once; into two pods, as the
        // source's rate is node-wide.
        for i in 0..10 {
            admission.admit(POD + i % 2, a, true).unwrap();
        }
        assert_eq!(
            admission.admit(OTHER_POD, a, true).unwrap_err(),
            Refused::SourceHandshakeRate
        );
        // Other sources and plaintext connections are not touched.
        assert!(admission.admit(POD, ip("10.0.0.2"), true).is_ok());
        assert!(admission.admit(POD, a, false).is_ok());
        std::thread::sleep(Duration::from_millis(450));
        assert!(
            admission.admit(POD, a, true).is_ok(),
            "refilled at 5 a second"
        );
        assert_eq!(
            admission
                .stats
                .refused_source_handshake_rate
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_pods_handshakes_are_bounded_whatever_the_sources() {
        let admission = Admission::new(Limits {
            handshake_rate_per_pod: 3,
            ..Limits::default()
        });
        for i in 0..6 {
            admission
                .admit(POD, ip(&format!("10.0.1.{i}")), true)
                .unwrap();
        }
        assert_eq!(
            admission.admit(POD, ip("10.0.1.99"), true).unwrap_err(),
            Refused::PodHandshakeRate
        );
        // A refused handshake takes no token from the source.
        assert!(admission.admit(OTHER_POD, ip("10.0.1.99"), true).is_ok());
    }

    #[test]
    fn slow_refusals_are_bounded_node_wide() {
        let admission = Admission::new(Limits::default());
        let held: Vec<SlowRefusal> = (0..MAX_SLOW_REFUSALS)
            .map(|_| admission.slow_refusal().unwrap())
            .collect();
        assert!(
            admission.slow_refusal().is_none(),
            "past the bound: reset at once"
        );
        drop(held);
        assert!(admission.slow_refusal().is_some());
    }

    #[test]
    fn v4_mapped_sources_count_as_their_ipv4_form() {
        let admission = Admission::new(limits(10, 1, 10));
        let _held = admission.admit(POD, ip("10.0.0.1"), false).unwrap();
        assert_eq!(
            admission
                .admit(POD, ip("::ffff:10.0.0.1"), false)
                .unwrap_err(),
            Refused::Source
        );
    }

    #[test]
    fn the_bounds_fit_under_the_open_file_limit_and_under_each_other() {
        let fitted = Limits::default().fit_to_open_files(FD_HEADROOM + 100);
        assert_eq!(fitted.fd_budget, 100);
        assert_eq!(fitted.max_connections, 100);
        assert_eq!(fitted.max_per_pod, 50);
        assert_eq!(fitted.max_per_source, 25);
        assert_eq!(fitted.max_handshakes, 100);
        let roomy = Limits::default().fit_to_open_files(1 << 20);
        assert_eq!(roomy.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(roomy.max_per_pod, 16_384);
        assert_eq!(roomy.max_per_source, 4096);
    }
}
