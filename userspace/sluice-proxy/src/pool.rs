//! The HBONE connection pool of one pod: tunnels multiplexed as streams over shared HTTP/2
//! connections, so a burst of new TCP connections costs one TLS handshake, not one each.
//!
//! Invariants:
//! - connections are keyed by (source identity, destination identity, destination address); a
//!   connection is never used for another key, so the identities proven in its handshake hold
//!   for every stream on it;
//! - per key, at most one handshake is in flight: callers that find no connection with room
//!   wait for that dial and then share its connection. No lock is held across a dial (a
//!   tarpit peer delays only the callers for its own key, each up to its own deadline), and a
//!   dial whose caller went away is dropped, the next waiter dialling afresh;
//! - a dial (TCP + TLS + HTTP/2) is given up after the handshake timeout, and a whole
//!   [`Pool::open`] (waiting, dialling, the CONNECT's answer) after the connect timeout: every
//!   caller gets an answer within its deadline;
//! - a connection carries at most [`MAX_STREAMS`] of our streams; the next one opens a new
//!   connection;
//! - a connection with no stream for the idle timeout is dropped from the pool, which closes it
//!   (h2 sends GOAWAY once the last handle is gone); one whose peer stops answering PINGs is
//!   closed at once;
//! - a connection whose driver stopped (peer GOAWAY, I/O error, PING unanswered) is never
//!   handed out again.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::hbone::{self, H2Stream, MAX_STREAMS, OpenError};
use crate::identity::Identity;
use crate::limits::{Admission, LimitStats, Limits};

/// Which connections a tunnel may share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: Identity,
    pub destination: Identity,
    /// The destination's HBONE address (`ip:15008`).
    pub addr: SocketAddr,
}

/// Makes the authenticated byte stream of a new HBONE connection (TCP + TLS).
pub trait Dial: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Boxed (one allocation per handshake) because an `impl Future` here trips rustc's
    /// higher-ranked `Send` inference once the pool's futures are spawned.
    fn dial<'a>(&'a self, key: &'a PoolKey) -> BoxFuture<'a, io::Result<Self::Io>>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr} for {destination}: {source}")]
    Dial {
        addr: SocketAddr,
        destination: Identity,
        source: io::Error,
    },
    #[error("HTTP/2 handshake with {addr}: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error(
        "no HBONE tunnel to {addr} within {after:?}: the peer took the connection but did not \
         finish its handshake or answer the CONNECT in time (is its proxy overloaded or not \
         HBONE?)"
    )]
    TimedOut { addr: SocketAddr, after: Duration },
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// How a shared dial ended, as every caller that waited for it learns it.
#[derive(Clone, Debug)]
enum DialFailure {
    Dial(io::ErrorKind, String),
    Handshake(String),
    TimedOut(Duration),
}

impl DialFailure {
    fn of(e: &PoolError) -> Self {
        match e {
            PoolError::Dial { source, .. } => DialFailure::Dial(source.kind(), source.to_string()),
            PoolError::TimedOut { after, .. } => DialFailure::TimedOut(*after),
            other => DialFailure::Handshake(other.to_string()),
        }
    }

    fn into_error(self, key: &PoolKey) -> PoolError {
        match self {
            DialFailure::Dial(kind, message) => PoolError::Dial {
                addr: key.addr,
                destination: key.destination.clone(),
                source: io::Error::new(kind, message),
            },
            DialFailure::Handshake(reason) => PoolError::Handshake {
                addr: key.addr,
                reason,
            },
            DialFailure::TimedOut(after) => PoolError::TimedOut {
                addr: key.addr,
                after,
            },
        }
    }
}

type DialOutcome = Option<Result<(), DialFailure>>;

pub struct Pool<D: Dial> {
    dialer: D,
    idle_timeout: Duration,
    limits: Limits,
    slots: Arc<Slots>,
    /// TLS + HTTP/2 handshakes done, for metrics and tests (may be shared between pools).
    pub handshakes: Arc<AtomicU64>,
    /// Where deadlines hit are counted (the node's admission counters in the proxy).
    counters: Option<Arc<Admission>>,
}

type Slots = Mutex<HashMap<PoolKey, Arc<Slot>>>;

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    conns: Vec<Arc<Conn>>,
    /// The dial in flight for this key, if any: its outcome is sent once, when it ends.
    dialing: Option<watch::Receiver<DialOutcome>>,
}

struct Conn {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: AtomicBool,
    last_used: Mutex<Instant>,
}

/// Counts one stream on its connection while it lives.
struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *self
            .0
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Clears the slot's dial in flight if its dialler goes away before finishing (its caller
/// was cancelled): the waiters see the channel close and one of them dials again.
struct DialingGuard {
    slot: Arc<Slot>,
    ours: watch::Receiver<DialOutcome>,
}

impl Drop for DialingGuard {
    fn drop(&mut self) {
        let mut state = self.slot.lock();
        if state
            .dialing
            .as_ref()
            .is_some_and(|d| d.same_channel(&self.ours))
        {
            state.dialing = None;
        }
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a caller found in a slot.
enum Found {
    /// A connection with room; the stream is already counted on it.
    Conn(Arc<Conn>),
    /// A dial in flight: wait for it.
    Wait(watch::Receiver<DialOutcome>),
    /// Nothing: this caller dials, and sends the outcome.
    Dial(watch::Sender<DialOutcome>, DialingGuard),
}

impl<D: Dial> Pool<D> {
    /// A pool with the default limits, counting its handshakes on its own.
    pub fn new(dialer: D, idle_timeout: Duration) -> Arc<Self> {
        Self::with_limits(dialer, idle_timeout, Limits::default())
    }

    /// A pool with `limits` (handshake and connect deadlines, keepalive).
    pub fn with_limits(dialer: D, idle_timeout: Duration, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            idle_timeout,
            limits,
            slots: Arc::default(),
            handshakes: Arc::default(),
            counters: None,
        })
    }

    /// A pool of the proxy: the node's limits, its handshakes added to `handshakes` (the
    /// proxy's node-wide count) and the deadlines it hits to the node's counters.
    pub fn for_node(
        dialer: D,
        idle_timeout: Duration,
        handshakes: Arc<AtomicU64>,
        admission: Arc<Admission>,
    ) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            idle_timeout,
            limits: admission.limits().clone(),
            slots: Arc::default(),
            handshakes,
            counters: Some(admission),
        })
    }

    fn count(&self, pick: fn(&LimitStats) -> &AtomicU64) {
        if let Some(admission) = &self.counters {
            pick(&admission.stats).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Opens a tunnel to `target` through a connection for `key`, reusing one with room,
    /// all within the connect timeout.
    pub async fn open(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        source: SocketAddr,
    ) -> Result<H2Stream, PoolError> {
        let after = self.limits.connect_timeout;
        match tokio::time::timeout(after, self.open_unbounded(key, target, source)).await {
            Ok(opened) => opened,
            Err(_) => {
                self.count(|s| &s.connect_timeouts);
                Err(PoolError::TimedOut {
                    addr: key.addr,
                    after,
                })
            }
        }
    }

    async fn open_unbounded(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        source: SocketAddr,
    ) -> Result<H2Stream, PoolError> {
        let conn = self.checkout(key).await?;
        let guard = StreamGuard(conn.clone());
        match hbone::open_stream(conn.send.clone(), target, source).await {
            Ok(stream) => Ok(stream.with_guard(guard)),
            Err(e) => {
                if let OpenError::H2(h2) = &e
                    && (h2.is_io() || h2.is_go_away())
                {
                    conn.closed.store(true, Ordering::Release);
                }
                Err(e.into())
            }
        }
    }

    /// A connection for `key` with room for one more stream (counted on it), dialling one if
    /// none has room and no dial is in flight, else waiting for the one in flight.
    async fn checkout(&self, key: &PoolKey) -> Result<Arc<Conn>, PoolError> {
        let slot = self.slot(key);
        loop {
            let found = {
                let mut state = slot.lock();
                state.conns.retain(|c| !c.closed.load(Ordering::Acquire));
                let room = state
                    .conns
                    .iter()
                    .find(|c| c.active.load(Ordering::Acquire) < MAX_STREAMS as usize)
                    .cloned();
                match (room, &state.dialing) {
                    (Some(conn), _) => {
                        conn.active.fetch_add(1, Ordering::AcqRel);
                        Found::Conn(conn)
                    }
                    (None, Some(dialing)) => Found::Wait(dialing.clone()),
                    (None, None) => {
                        let (tx, rx) = watch::channel(None);
                        state.dialing = Some(rx.clone());
                        Found::Dial(
                            tx,
                            DialingGuard {
                                slot: slot.clone(),
                                ours: rx,
                            },
                        )
                    }
                }
            };
            match found {
                Found::Conn(conn) => return Ok(conn),
                Found::Wait(mut dialing) => {
                    let outcome = dialing.wait_for(Option::is_some).await.map(|o| o.clone());
                    match outcome {
                        // Connected: look again (its room is shared with the other waiters).
                        Ok(Some(Ok(()))) => continue,
                        Ok(Some(Err(failure))) => return Err(failure.into_error(key)),
                        // The dialler went away without an outcome: dial again.
                        Ok(None) | Err(_) => continue,
                    }
                }
                Found::Dial(outcome, guard) => {
                    let dialled = match tokio::time::timeout(
                        self.limits.handshake_timeout,
                        self.connect(key, &slot),
                    )
                    .await
                    {
                        Ok(dialled) => dialled,
                        Err(_) => {
                            self.count(|s| &s.connect_timeouts);
                            Err(PoolError::TimedOut {
                                addr: key.addr,
                                after: self.limits.handshake_timeout,
                            })
                        }
                    };
                    // Clearing the dial and adding its connection is one step, so no caller
                    // sees neither and dials again.
                    let mut state = slot.lock();
                    state.dialing = None;
                    if let Ok(conn) = &dialled {
                        conn.active.fetch_add(1, Ordering::AcqRel);
                        state.conns.push(conn.clone());
                    }
                    drop(state);
                    drop(guard);
                    return match dialled {
                        Ok(conn) => {
                            let _ = outcome.send(Some(Ok(())));
                            Ok(conn)
                        }
                        Err(e) => {
                            prune_slot(&self.slots, key, &slot);
                            info!(addr = %key.addr, destination = %key.destination, error = %e, "HBONE dial failed");
                            let _ = outcome.send(Some(Err(DialFailure::of(&e))));
                            Err(e)
                        }
                    };
                }
            }
        }
    }

    /// Connections currently pooled for `key` (tests and metrics).
    pub async fn connections(&self, key: &PoolKey) -> usize {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned();
        slot.map_or(0, |slot| {
            slot.lock()
                .conns
                .iter()
                .filter(|c| !c.closed.load(Ordering::Acquire))
                .count()
        })
    }

    /// Keys with a slot (tests: slots of keys no longer used go away).
    pub fn keys(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    async fn connect(&self, key: &PoolKey, slot: &Arc<Slot>) -> Result<Arc<Conn>, PoolError> {
        // The connection's socket is a descriptor of the node's budget while it lives.
        let fd = match self.counters.as_ref().map(|a| a.charge(1)).transpose() {
            Ok(fd) => fd,
            Err(refused) => {
                return Err(PoolError::Dial {
                    addr: key.addr,
                    destination: key.destination.clone(),
                    source: io::Error::other(refused.reason()),
                });
            }
        };
        let io = self
            .dialer
            .dial(key)
            .await
            .map_err(|source| PoolError::Dial {
                addr: key.addr,
                destination: key.destination.clone(),
                source,
            })?;
        let (send, mut connection) = hbone::client_builder()
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| PoolError::Handshake {
                addr: key.addr,
                reason: source.to_string(),
            })?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        });
        let keepalive = connection.ping_pong().map(|ping_pong| {
            crate::limits::keepalive(
                ping_pong,
                self.limits.keepalive_interval,
                self.limits.keepalive_timeout,
            )
        });
        let driver = Arc::downgrade(&conn);
        let addr = key.addr;
        let keepalive_failed = self.counters.clone();
        tokio::spawn(async move {
            let _fd = fd;
            let keepalive = async {
                match keepalive {
                    Some(keepalive) => keepalive.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = &mut connection => {
                    if let Err(e) = ended {
                        debug!(%addr, error = %e, "HBONE connection ended");
                    }
                }
                () = keepalive => {
                    if let Some(admission) = keepalive_failed {
                        admission.stats.keepalive_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    info!(%addr, "HBONE peer stopped answering PINGs; connection closed");
                }
            }
            if let Some(conn) = driver.upgrade() {
                conn.closed.store(true, Ordering::Release);
            }
        });
        tokio::spawn(close_when_idle(
            Arc::downgrade(&conn),
            (
                Arc::downgrade(slot),
                Arc::downgrade(&self.slots),
                key.clone(),
            ),
            self.idle_timeout,
        ));
        Ok(conn)
    }
}

/// Removes `key`'s slot from the pool if it is still `slot` and has neither a connection nor
/// a dial in flight. A caller that took the slot just before keeps using it; the next one
/// makes a new slot.
fn prune_slot(slots: &Slots, key: &PoolKey, slot: &Arc<Slot>) {
    // Lock order: the pool's map, then a slot (as `slot()` then `checkout`).
    let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
    let unused = slots.get(key).is_some_and(|s| {
        Arc::ptr_eq(s, slot) && {
            let state = s.lock();
            state.conns.is_empty() && state.dialing.is_none()
        }
    });
    if unused {
        slots.remove(key);
    }
}

/// Drops `conn` from its slot once it has carried no stream for `idle` (or its driver
/// stopped), and the slot from the pool once it has no connection and no dial, so the pool
/// holds only keys in use. Checked under the slot's lock, where streams are counted on, so a
/// connection is never retired just as a caller takes it.
async fn close_when_idle(
    conn: Weak<Conn>,
    (slot, slots, key): (Weak<Slot>, Weak<Slots>, PoolKey),
    idle: Duration,
) {
    loop {
        let wake = {
            let (Some(conn), Some(slot)) = (conn.upgrade(), slot.upgrade()) else {
                return;
            };
            let mut state = slot.lock();
            let last = *conn
                .last_used
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let closed = conn.closed.load(Ordering::Acquire);
            if closed || (conn.active.load(Ordering::Acquire) == 0 && last.elapsed() >= idle) {
                conn.closed.store(true, Ordering::Release);
                state.conns.retain(|c| !Arc::ptr_eq(c, &conn));
                drop(state);
                if let Some(slots) = slots.upgrade() {
                    prune_slot(&slots, &key, &slot);
                }
                return;
            }
            last + idle
        };
        tokio::time::sleep_until(wake.max(Instant::now() + idle / 4)).await;
    }
}

/// How the TCP part of an HBONE connection is made: from the source pod's netns in the proxy,
/// plainly in tests.
pub trait TcpConnect: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<tokio::net::TcpStream>>;
}

/// The production dialer: TCP by [`TcpConnect`], then TLS presenting the source identity and
/// expecting the destination's.
pub struct TlsDialer {
    pub store: Arc<crate::tls::CertStore>,
    pub tcp: Arc<dyn TcpConnect>,
}

impl Dial for TlsDialer {
    type Io = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    fn dial<'a>(&'a self, key: &'a PoolKey) -> BoxFuture<'a, io::Result<Self::Io>> {
        Box::pin(async move {
            let config = self
                .store
                .client_config(&key.source, &key.destination)
                .map_err(io::Error::other)?;
            let tcp = self.tcp.connect(key.addr).await?;
            let _ = tcp.set_nodelay(true);
            // No SNI is sent (HBONE has none); rustls still wants a name for its bookkeeping.
            let name = rustls::pki_types::ServerName::IpAddress(key.addr.ip().into());
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        })
    }
}
