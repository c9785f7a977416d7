//! The HBONE connection pool of one pod: tunnels multiplexed as streams over shared HTTP/2
//! connections, so a burst of new TCP connections costs one TLS handshake, not one each.
//!
//! Invariants:
//! - connections are keyed by (source identity, destination identity, destination address); a
//!   connection is never used for another key, so the identities proven in its handshake hold
//!   for every stream on it;
//! - per key, at most one handshake is in flight: callers that find no connection with room
//!   wait for it (the key's async lock is held across the dial) and then share it;
//! - a connection carries at most [`MAX_STREAMS`] of our streams; the next one opens a new
//!   connection;
//! - a connection with no stream for the idle timeout is dropped from the pool, which closes it
//!   (h2 sends GOAWAY once the last handle is gone);
//! - a connection whose driver stopped (peer GOAWAY, I/O error) is never handed out again.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::debug;

use crate::hbone::{self, H2Stream, MAX_STREAMS, OpenError};
use crate::identity::Identity;

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
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: h2::Error },
    #[error(transparent)]
    Open(#[from] OpenError),
}

pub struct Pool<D: Dial> {
    dialer: D,
    idle_timeout: Duration,
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    /// TLS + HTTP/2 handshakes done, for metrics and tests (may be shared between pools).
    pub handshakes: Arc<AtomicU64>,
}

#[derive(Default)]
struct Slot {
    conns: tokio::sync::Mutex<Vec<Arc<Conn>>>,
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
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<D: Dial> Pool<D> {
    pub fn new(dialer: D, idle_timeout: Duration) -> Arc<Self> {
        Self::counting_into(dialer, idle_timeout, Arc::default())
    }

    /// As [`Pool::new`], adding its handshakes to `handshakes` (the proxy's node-wide count).
    pub fn counting_into(
        dialer: D,
        idle_timeout: Duration,
        handshakes: Arc<AtomicU64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            idle_timeout,
            slots: Mutex::new(HashMap::new()),
            handshakes,
        })
    }

    /// Opens a tunnel to `target` through a connection for `key`, reusing one with room.
    pub async fn open(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        source: SocketAddr,
    ) -> Result<H2Stream, PoolError> {
        let slot = self.slot(key);
        let conn = {
            let mut conns = slot.conns.lock().await;
            conns.retain(|c| !c.closed.load(Ordering::Acquire));
            let reusable = conns
                .iter()
                .find(|c| c.active.load(Ordering::Acquire) < MAX_STREAMS as usize)
                .cloned();
            let conn = match reusable {
                Some(conn) => conn,
                None => {
                    let conn = self.connect(key, &slot).await?;
                    conns.push(conn.clone());
                    conn
                }
            };
            conn.active.fetch_add(1, Ordering::AcqRel);
            conn
        };
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

    /// Connections currently pooled for `key` (tests and metrics).
    pub async fn connections(&self, key: &PoolKey) -> usize {
        let slot = self.slot(key);
        let conns = slot.conns.lock().await;
        conns
            .iter()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .count()
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    async fn connect(&self, key: &PoolKey, slot: &Arc<Slot>) -> Result<Arc<Conn>, PoolError> {
        let io = self
            .dialer
            .dial(key)
            .await
            .map_err(|source| PoolError::Dial {
                addr: key.addr,
                destination: key.destination.clone(),
                source,
            })?;
        let (send, connection) = hbone::client_builder()
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| PoolError::Handshake {
                addr: key.addr,
                source,
            })?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        });
        let driver = Arc::downgrade(&conn);
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, error = %e, "HBONE connection ended");
            }
            if let Some(conn) = driver.upgrade() {
                conn.closed.store(true, Ordering::Release);
            }
        });
        tokio::spawn(close_when_idle(
            Arc::downgrade(&conn),
            Arc::downgrade(slot),
            self.idle_timeout,
        ));
        Ok(conn)
    }
}

/// Drops `conn` from its slot once it has carried no stream for `idle`.
async fn close_when_idle(conn: Weak<Conn>, slot: Weak<Slot>, idle: Duration) {
    loop {
        let wake = {
            let Some(conn) = conn.upgrade() else { return };
            if conn.closed.load(Ordering::Acquire) {
                break;
            }
            let last = *conn
                .last_used
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if conn.active.load(Ordering::Acquire) == 0 && last.elapsed() >= idle {
                conn.closed.store(true, Ordering::Release);
                break;
            }
            last + idle
        };
        tokio::time::sleep_until(wake.max(Instant::now() + idle / 4)).await;
    }
    if let (Some(slot), Some(conn)) = (slot.upgrade(), conn.upgrade()) {
        slot.conns.lock().await.retain(|c| !Arc::ptr_eq(c, &conn));
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
