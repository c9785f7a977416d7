//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams inside mutual TLS on port 15008,
//! wire-compatible with Istio's ztunnel (DESIGN §6).
//!
//! - [`H2Stream`] turns one CONNECT stream into an `AsyncRead + AsyncWrite` byte pipe, with
//!   HTTP/2 flow control released as the reader consumes data.
//! - [`open_stream`] is the client side of one tunnelled connection over a pooled connection.
//! - [`serve`] is the server side: each stream's `:authority` must be the very address the
//!   tunnel arrived on (in a pod's netns, the pod's own), on a port that is not the proxy's
//!   ([`check_target`]); the app is dialled first, and 200 is answered only once that worked
//!   (400 for a malformed or refused target, 503 when the app refuses).
//! - [`client_address`] is whom the app is dialled as: the tunnel's source address, with the
//!   port the `forwarded` header names only when the header names that same address.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{Instrument, debug, info};

use crate::identity::Identity;
use crate::limits::{Admission, Limits};
use crate::socket::AppStream;

/// Flow-control windows and stream limit of DESIGN §6.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_STREAMS: u32 = 100;
/// Larger frames than HTTP/2's 16 KiB default: fewer frame headers and wake-ups per byte.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Copy buffer between a tunnel and its TCP socket. Large on purpose: every buffer's worth is
/// one DATA frame, one wake-up of the connection task and one TLS write, and with tokio's 8 KiB
/// default those per-chunk costs, not the cipher, capped a tunnel's throughput.
pub const COPY_BUFFER: usize = 256 * 1024;
/// rustls buffers at most this much encrypted data before it must be written out (64 KiB by
/// default): room for a whole copy buffer's worth of records per write.
pub const TLS_BUFFER: usize = 1024 * 1024;
/// A CONNECT request's headers are small; anything bigger is refused by h2 itself.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// One CONNECT stream as a byte pipe. Dropping it resets the stream if it is still open.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    /// Kept alive for as long as the stream: the pool counts streams through it.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            _guard: None,
        }
    }

    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Credit the peer as soon as the bytes are ours: the window bounds what is
                    // buffered here, not what the app has read.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(granted)) => {
                let n = granted.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(h2_io(e))),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM: the TCP half-close of the tunnelled connection.
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already ended (or reset by the peer): nothing left to close.
            Err(e) if !e.is_io() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_io(e))),
        }
    }
}

/// Why a tunnel could not be opened, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the HBONE connection failed: {0}")]
    H2(#[from] h2::Error),
    #[error("the destination proxy answered {0}")]
    Status(StatusCode),
    #[error("build the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

/// The HTTP/2 client settings of an HBONE connection.
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false);
    builder
}

/// Opens one tunnel to `target` over an established HBONE connection.
pub async fn open_stream(
    send: h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    source: SocketAddr,
) -> Result<H2Stream, OpenError> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for=\"{source}\""))
        .body(())?;
    let mut send = send.ready().await?;
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(OpenError::Status(response.status()));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}

/// What the server side needs from its surroundings.
pub trait Inbound: Send + Sync + 'static {
    /// Whether `peer`, connecting from `source`, may reach `target`; `Err` names the policy
    /// that denies it (the stream is answered 401).
    fn authorize(&self, target: SocketAddr, peer: &Identity, source: IpAddr) -> Result<(), String>;
    /// Changes whenever the policies may have changed: open tunnels are authorized again then,
    /// and closed if no longer allowed.
    fn policy_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>>;
    /// A tunnel from `peer` (at `source`) to `target` was established, and later ended with
    /// `from_client` / `to_client` bytes: for metrics.
    fn tunnel_opened(&self, target: SocketAddr, peer: &Identity, source: IpAddr);
    fn tunnel_closed(
        &self,
        target: SocketAddr,
        peer: &Identity,
        source: IpAddr,
        from_client: u64,
        to_client: u64,
    );
    /// The identity of the workload behind this server, for the access log.
    fn local_identity(&self) -> Option<String>;
    /// Connects to the app at `target` on behalf of `peer`, whose client is at `client` (see
    /// [`client_address`]; port 0 when the client's port is not known).
    fn connect(
        &self,
        target: SocketAddr,
        peer: &Identity,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<AppStream>> + Send + '_>>;
}

/// Server-side counters, by outcome. Every refused stream lands in exactly one.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TLS handshakes that failed: untrusted or expired client certificate, none at all,
    /// TLS 1.2, or a client that rejected our certificate.
    pub handshake_failed: AtomicU64,
    /// Handshakes that succeeded but whose client certificate names no identity of our trust
    /// domain.
    pub bad_identity: AtomicU64,
    pub connections: AtomicU64,
    /// Connections that ended (the client closed them, or they drained).
    pub closed: AtomicU64,
    pub streams: AtomicU64,
    pub tunnelled: AtomicU64,
    pub bad_request: AtomicU64,
    /// CONNECTs to an address other than the one the tunnel arrived on: another pod's,
    /// another node's, anything the peer should have dialled itself.
    pub not_local: AtomicU64,
    /// CONNECTs to one of the proxy's own ports (15001, 15006, 15008): a tunnel into the
    /// proxy itself, to nest tunnels or to skip the policy of the port behind.
    pub proxy_port: AtomicU64,
    /// CONNECTs to a loopback, unspecified or multicast address: never a pod's app.
    pub special_address: AtomicU64,
    /// Streams refused by an authorization policy (401), and tunnels closed by a policy change.
    pub denied: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// The HTTP/2 server settings of an HBONE connection.
pub fn server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST);
    builder
}

/// What a pod's 15008 listener serves with: its certificate, the mesh it admits, the node's
/// counters and admission control.
pub struct Listener {
    /// The pod served (its netns inode): whose bounds the connections count against.
    pub pod: crate::limits::PodKey,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub trust_domain: String,
    pub stats: Arc<ServerStats>,
    pub admission: Arc<Admission>,
}

/// Why a 15008 connection never got to its first stream.
enum Unserved {
    NoLocalAddress(io::Error),
    Tls(io::Error),
    NotOfThisMesh(Option<Identity>),
    Http2(h2::Error),
}

/// Serves an accepted 15008 connection:
/// 1. admission: the source's and the node's bounds on connections and on handshakes in
///    flight (refused: reset at once, counted);
/// 2. within [`Limits::handshake_timeout`], all of: mutual TLS, the client's identity (of
///    `trust_domain`), the HTTP/2 preface and settings. A peer that dawdles is closed and
///    counted (`handshake_timeout`), so unauthenticated connections cannot pile up;
/// 3. [`serve_connection`]: streams until the client closes the connection, the pod drains,
///    it sits idle too long or stops answering PINGs.
pub async fn accept(
    tcp: tokio::net::TcpStream,
    listener: Arc<Listener>,
    inbound: Arc<impl Inbound>,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let remote = match tcp.peer_addr() {
        Ok(remote) => crate::socket::canonical(remote),
        Err(e) => {
            debug!(error = %e, "HBONE connection gone before it was served");
            return;
        }
    };
    let mut permit = match listener.admission.admit(listener.pod, remote.ip(), true) {
        Ok(permit) => permit,
        Err(refused) => {
            debug!(%remote, reason = refused.reason(), "HBONE connection refused");
            // RST, not FIN: nothing lingers in TIME_WAIT on our side for a flood.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
            // A source over its handshake rate is answered slowly (while there is room to
            // hold it): a flooding loop then waits on each refusal instead of spinning through
            // them, and spends neither its CPU nor ours on the node's other tunnels.
            if matches!(
                refused,
                crate::limits::Refused::SourceHandshakeRate
                    | crate::limits::Refused::PodHandshakeRate
            ) && let Some(slow) = listener.admission.slow_refusal()
            {
                tokio::time::sleep(crate::limits::SLOW_REFUSAL).await;
                drop(slow);
            }
            return;
        }
    };
    let limits = listener.admission.limits().clone();
    crate::limits::tune_hbone_socket(&tcp, &limits);
    let stats = &listener.stats;
    let handshake = tokio::time::timeout(
        limits.handshake_timeout,
        handshake(tcp, &listener.acceptor, &listener.trust_domain),
    )
    .await;
    permit.handshake_done();
    let (conn, peer, local) = match handshake {
        Ok(Ok(done)) => done,
        Ok(Err(unserved)) => {
            match unserved {
                Unserved::NoLocalAddress(e) => {
                    stats.not_local.fetch_add(1, Ordering::Relaxed);
                    info!(%remote, error = %e, "HBONE connection without a local address; closed");
                }
                Unserved::Tls(e) => {
                    stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                    info!(%remote, error = %e, "HBONE TLS handshake failed");
                }
                Unserved::NotOfThisMesh(identity) => {
                    stats.bad_identity.fetch_add(1, Ordering::Relaxed);
                    info!(%remote, identity = ?identity.map(|p| p.to_string()), trust_domain = listener.trust_domain, "HBONE client is not of this mesh");
                }
                Unserved::Http2(e) => {
                    stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                    info!(%remote, error = %e, "HBONE HTTP/2 handshake failed");
                }
            }
            return;
        }
        Err(_) => {
            listener
                .admission
                .stats
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            info!(%remote, deadline = ?limits.handshake_timeout, "HBONE handshake not done in time; closed");
            return;
        }
    };
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let bounds = ConnectionBounds {
        limits,
        counters: Some(listener.admission.clone()),
    };
    serve_connection(
        conn,
        peer,
        (remote.ip(), local),
        inbound,
        stats.clone(),
        drain,
        bounds,
    )
    .await;
    drop(permit);
}

/// Mutual TLS, the peer's identity, and the HTTP/2 handshake of one 15008 connection.
async fn handshake(
    tcp: tokio::net::TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    trust_domain: &str,
) -> Result<
    (
        h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Bytes>,
        Identity,
        SocketAddr,
    ),
    Unserved,
> {
    // The address the client dialled: the only one its streams may name as their target.
    let local = tcp
        .local_addr()
        .map(crate::socket::canonical)
        .map_err(Unserved::NoLocalAddress)?;
    let mut tls = acceptor.accept(tcp).await.map_err(Unserved::Tls)?;
    tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::tls::peer_identity);
    let peer = match peer {
        Some(peer) if peer.trust_domain == trust_domain => peer,
        other => return Err(Unserved::NotOfThisMesh(other)),
    };
    let conn = server_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(Unserved::Http2)?;
    Ok((conn, peer, local))
}

/// How long an established HBONE connection may idle or go unanswered, and where those
/// closes are counted.
pub struct ConnectionBounds {
    pub limits: Limits,
    pub counters: Option<Arc<Admission>>,
}

/// Serves one authenticated HBONE connection from `peer` at `source` that arrived on `local`
/// until the client closes it, with the default bounds (see [`serve_connection`]). The
/// HTTP/2 handshake is done here; [`accept`] does it under its deadline instead.
pub async fn serve<IO, I>(
    io: IO,
    peer: Identity,
    addrs: (IpAddr, SocketAddr),
    inbound: Arc<I>,
    stats: Arc<ServerStats>,
    drain: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Inbound,
{
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let conn = match server_builder().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(e) => {
            debug!(peer = %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let bounds = ConnectionBounds {
        limits: Limits::default(),
        counters: None,
    };
    serve_connection(conn, peer, addrs, inbound, stats, drain, bounds).await;
}

/// Serves the streams of one HBONE connection. Each stream runs on its own task; errors close
/// the stream and are counted, never panic.
///
/// When `drain` turns true the connection sends GOAWAY: the client opens no new stream on it,
/// the streams already open run to their end, and then the connection closes. The same
/// happens once it has carried no stream for the idle timeout (and a peer that does not let go
/// after that GOAWAY is cut a keepalive interval and timeout later). A PING unanswered within
/// the keepalive timeout closes it at once (the peer is gone; its streams with it).
///
/// Stream tasks belong to their connection: at most [`MAX_STREAMS`] run at once, streams the
/// peer reset included (the next is refused with `REFUSED_STREAM` and counted); when the
/// connection fails they are cut with it, and when it closes cleanly they get a keepalive
/// timeout to finish writing to their apps. So nothing a connection started outlives it for
/// long, and its admission permit (held by the caller until this returns) covers them all.
pub async fn serve_connection<IO, I>(
    mut conn: h2::server::Connection<IO, Bytes>,
    peer: Identity,
    (source, local): (IpAddr, SocketAddr),
    inbound: Arc<I>,
    stats: Arc<ServerStats>,
    mut drain: tokio::sync::watch::Receiver<bool>,
    bounds: ConnectionBounds,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Inbound,
{
    let limits = &bounds.limits;
    let count = |pick: fn(&crate::limits::LimitStats) -> &AtomicU64| {
        if let Some(admission) = &bounds.counters {
            pick(&admission.stats).fetch_add(1, Ordering::Relaxed);
        }
    };
    let keepalive = match conn.ping_pong() {
        Some(ping_pong) => futures::future::Either::Left(crate::limits::keepalive(
            ping_pong,
            limits.keepalive_interval,
            limits.keepalive_timeout,
        )),
        None => futures::future::Either::Right(std::future::pending()),
    };
    tokio::pin!(keepalive);
    // Idle is checked a few times per timeout: a connection closes between 1 and 1.25 idle
    // timeouts after its last stream.
    let idle_tick = (limits.server_idle_timeout / 4).max(std::time::Duration::from_millis(10));
    let mut idle_since = Some(tokio::time::Instant::now());
    // Set when the idle close sent GOAWAY: past it, the connection is cut.
    let mut cut_at: Option<tokio::time::Instant> = None;
    let peer = Arc::new(peer);
    let mut draining = false;
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let cut = async {
            match cut_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            accepted = conn.accept() => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = cut => {
                debug!(peer = %peer, "the peer held on past the idle GOAWAY; connection cut");
                failed = true;
                break;
            }
            _ = drain.wait_for(|d| *d), if !draining => {
                debug!(peer = %peer, "draining: GOAWAY");
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
            () = tokio::time::sleep(idle_tick), if !draining => {
                if conn.has_streams() {
                    idle_since = None;
                } else {
                    let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= limits.server_idle_timeout {
                        count(|s| &s.idle_closed);
                        debug!(peer = %peer, "no stream for the idle timeout: GOAWAY");
                        conn.graceful_shutdown();
                        draining = true;
                        cut_at = Some(
                            tokio::time::Instant::now()
                                + limits.keepalive_interval
                                + limits.keepalive_timeout,
                        );
                    }
                }
                continue;
            }
            () = &mut keepalive => {
                count(|s| &s.keepalive_failed);
                info!(peer = %peer, %source, "HBONE peer stopped answering PINGs; connection closed");
                failed = true;
                break;
            }
        };
        let (request, mut respond) = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                debug!(peer = %peer, error = %e, "HBONE connection ended");
                failed = true;
                break;
            }
            None => break,
        };
        idle_since = None;
        stats.streams.fetch_add(1, Ordering::Relaxed);
        if tasks.len() >= MAX_STREAMS as usize {
            count(|s| &s.refused_streams);
            debug!(peer = %peer, "a stream past the connection's limit (reset streams still at work count): refused");
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        let tunnel = bounds.counters.as_ref().map(|a| a.tunnel());
        let admission = bounds.counters.clone();
        let (peer, inbound, stats) = (peer.clone(), inbound.clone(), stats.clone());
        tasks.spawn(
            async move {
                serve_stream(
                    request,
                    respond,
                    (peer, source, local),
                    inbound,
                    stats,
                    admission,
                )
                .await;
                drop(tunnel);
            }
            .in_current_span(),
        );
    }
    drop(conn);
    if !failed && !tasks.is_empty() {
        // Closed cleanly: the streams' apps may still be taking their last bytes.
        let _ = tokio::time::timeout(limits.keepalive_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    tasks.abort_all();
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

async fn serve_stream<I: Inbound>(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    (peer, source, local): (Arc<Identity>, IpAddr, SocketAddr),
    inbound: Arc<I>,
    stats: Arc<ServerStats>,
    admission: Option<Arc<Admission>>,
) {
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let response = Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        let _ = respond.send_response(response, true);
    };
    let target = match connect_target(&request) {
        Ok(target) => target,
        Err(why) => {
            stats.bad_request.fetch_add(1, Ordering::Relaxed);
            info!(peer = %peer, why, "HBONE request refused (400)");
            return refuse(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    let target = match check_target(target, local) {
        Ok(target) => target,
        Err(refused) => {
            refused.counter(&stats).fetch_add(1, Ordering::Relaxed);
            info!(peer = %peer, %target, arrived_on = %local, reason = refused.reason(), "HBONE target refused (400)");
            return refuse(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    if let Err(policy) = inbound.authorize(target, &peer, source) {
        stats.denied.fetch_add(1, Ordering::Relaxed);
        info!(target: "access", peer = %peer, src = %source, dst = %target, policy, "connection denied by policy (401)");
        return refuse(&mut respond, StatusCode::UNAUTHORIZED);
    }
    // The app socket is a descriptor of the node's budget.
    let _fd = match admission.as_ref().map(|a| a.charge(1)).transpose() {
        Ok(fd) => fd,
        Err(refused) => {
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            info!(peer = %peer, %target, reason = refused.reason(), "no room for the app connection (503)");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let client = client_address(request.headers(), source);
    // A peer that resets the stream while the app is dialled gets the dial abandoned at once.
    let dialled = tokio::select! {
        dialled = inbound.connect(target, &peer, client) => dialled,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(peer = %peer, %target, "the peer reset the stream while its app was dialled");
            return;
        }
    };
    let mut app = match dialled {
        Ok(app) => app,
        Err(e) => {
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            info!(peer = %peer, %target, error = %e, "app refused the tunnelled connection (503)");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(e) => {
            debug!(error = %e, "client went away before the 200");
            return;
        }
    };
    stats.tunnelled.fetch_add(1, Ordering::Relaxed);
    inbound.tunnel_opened(target, &peer, source);
    // Reported closed (metrics and access log) however this task ends: the copy done, a
    // policy change, or cut with its connection (the task aborted).
    let mut end = TunnelEnd {
        inbound: &*inbound,
        target,
        peer: &peer,
        source,
        access: crate::access::Access {
            direction: "inbound",
            src: source.to_string(),
            dst: target.to_string(),
            upstream: None,
            src_identity: Some(peer.to_string()),
            dst_identity: inbound.local_identity(),
            hbone: true,
            started: std::time::Instant::now(),
        },
        outcome: None,
        logged: false,
    };
    let mut tunnel = H2Stream::new(send, request.into_body());
    let _ = app.stream.set_nodelay(true);
    let copied = tokio::select! {
        copied = copy(&mut tunnel, &mut app.stream) => copied,
        policy = revoked(&*inbound, target, &peer, source) => {
            stats.denied.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", peer = %peer, src = %source, dst = %target, policy, "tunnel closed: a policy change denies it");
            end.logged = true;
            return;
        }
    };
    if let Ok((from_client, to_client)) = &copied {
        stats.bytes_in.fetch_add(*from_client, Ordering::Relaxed);
        stats.bytes_out.fetch_add(*to_client, Ordering::Relaxed);
    }
    end.outcome = Some(copied);
}

/// The end of an inbound tunnel, reported when dropped: to [`Inbound::tunnel_closed`] with the
/// bytes moved (none if it did not end by itself) and to the access log, unless already
/// logged.
struct TunnelEnd<'a, I: Inbound> {
    inbound: &'a I,
    target: SocketAddr,
    peer: &'a Identity,
    source: IpAddr,
    access: crate::access::Access,
    outcome: Option<io::Result<(u64, u64)>>,
    logged: bool,
}

impl<I: Inbound> Drop for TunnelEnd<'_, I> {
    fn drop(&mut self) {
        let (from_client, to_client) = match &self.outcome {
            Some(Ok(bytes)) => *bytes,
            _ => (0, 0),
        };
        self.inbound
            .tunnel_closed(self.target, self.peer, self.source, from_client, to_client);
        if !self.logged {
            let cut = || Err(io::Error::other("cut: its HBONE connection ended"));
            self.access
                .closed(self.outcome.as_ref().map_or(&cut(), |outcome| outcome));
        }
    }
}

/// Resolves once a policy change denies `peer` → `target`; never without policy changes.
async fn revoked<I: Inbound>(
    inbound: &I,
    target: SocketAddr,
    peer: &Identity,
    source: IpAddr,
) -> String {
    let Some(mut changes) = inbound.policy_changes() else {
        return std::future::pending().await;
    };
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Err(policy) = inbound.authorize(target, peer, source) {
            return policy;
        }
    }
}

/// Why a well-formed CONNECT target is refused (400). Each is counted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetRefused {
    /// Loopback, unspecified or multicast.
    SpecialAddress,
    /// Not the address the tunnel arrived on.
    NotLocal,
    /// 15001, 15006 or 15008.
    ProxyPort,
}

impl TargetRefused {
    /// The reason as logged.
    pub fn reason(self) -> &'static str {
        match self {
            TargetRefused::SpecialAddress => {
                "a loopback, unspecified or multicast address is never a pod's app"
            }
            TargetRefused::NotLocal => {
                "not the address the tunnel arrived on (a tunnel only reaches its own pod)"
            }
            TargetRefused::ProxyPort => "a port of the proxy itself (15001, 15006, 15008)",
        }
    }

    /// The counter this refusal goes to.
    pub fn counter(self, stats: &ServerStats) -> &AtomicU64 {
        match self {
            TargetRefused::SpecialAddress => &stats.special_address,
            TargetRefused::NotLocal => &stats.not_local,
            TargetRefused::ProxyPort => &stats.proxy_port,
        }
    }
}

/// The proxy's own ports: a connection or tunnel to one of them would come straight back into
/// the proxy (a loop, a nested tunnel, or a way around the policy of the port behind).
pub fn is_proxy_port(port: u16) -> bool {
    use sluice_capture::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};
    port == PORT_OUTBOUND || port == PORT_INBOUND || port == PORT_HBONE
}

/// Checks a CONNECT target against `arrived_on`, the local address of the tunnel's TCP
/// connection (in a pod's netns, one of the pod's own addresses): the target must be that very
/// address (IPv4-mapped IPv6 and IPv4 compare equal), not a loopback, unspecified or multicast
/// one, on a port that is not the proxy's. As ztunnel does, a peer may only reach the app of the
/// pod it tunnelled to. Returns the target in canonical form, the one to dial.
pub fn check_target(
    target: SocketAddr,
    arrived_on: SocketAddr,
) -> Result<SocketAddr, TargetRefused> {
    let target = crate::socket::canonical(target);
    let ip = target.ip();
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(TargetRefused::SpecialAddress);
    }
    if ip != crate::socket::canonical(arrived_on).ip() {
        return Err(TargetRefused::NotLocal);
    }
    if is_proxy_port(target.port()) {
        return Err(TargetRefused::ProxyPort);
    }
    Ok(target)
}

/// The longest `forwarded` header value read; a client's proxy sends one short element.
const MAX_FORWARDED: usize = 256;

/// Whom to dial the app as for a tunnel from `tunnel_source`: the client the `forwarded`
/// header names (its first element's `for=`), but only if its address is the tunnel's source
/// address, so a peer can only ever name a port of its own address; else the tunnel's source
/// with port 0 (unknown). The check holds for sluice's tunnels and for Istio's ztunnel in-pod
/// mode: both leave from the client pod's own address.
pub fn client_address(headers: &http::HeaderMap, tunnel_source: IpAddr) -> SocketAddr {
    let tunnel_source = crate::socket::canonical(SocketAddr::new(tunnel_source, 0)).ip();
    let named = headers
        .get_all("forwarded")
        .iter()
        .next()
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    match named {
        Some((ip, port))
            if crate::socket::canonical(SocketAddr::new(ip, 0)).ip() == tunnel_source =>
        {
            SocketAddr::new(tunnel_source, port.unwrap_or(0))
        }
        _ => SocketAddr::new(tunnel_source, 0),
    }
}

/// A `Forwarded` node: an address and, if one is named, a port.
pub type ForwardedNode = (IpAddr, Option<u16>);

/// The node of the first element's `for=` parameter of a `Forwarded` header value (RFC 7239):
/// an address and, if given, a port (`None` for an obfuscated or zero port). `None` for anything
/// else: no `for=`, `unknown`, an obfuscated node (`_hidden`), an IPv6 address without
/// brackets, a port that is not 1-65535, a repeated `for=`, or malformed syntax.
pub fn forwarded_for(value: &str) -> Option<ForwardedNode> {
    if value.len() > MAX_FORWARDED {
        return None;
    }
    let mut rest = value;
    let mut found = None;
    let mut pairs = 0;
    // The pairs of the first element, up to its `,`. Empty pairs and empty leading elements
    // are allowed (RFC 7239 §4, RFC 7230 §7). Every turn consumes input: bounded by its length.
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        match rest.as_bytes().first() {
            None => break,
            Some(b';') => {
                rest = &rest[1..];
                continue;
            }
            Some(b',') if pairs == 0 => {
                rest = &rest[1..];
                continue;
            }
            Some(b',') => break,
            Some(_) => {}
        }
        let (name, after) = rest.split_once('=')?;
        let name = name.trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return None;
        }
        let (node, after) = pair_value(after)?;
        if name.eq_ignore_ascii_case("for") {
            if found.is_some() {
                // RFC 7239 §4: a parameter occurs at most once per element.
                return None;
            }
            found = Some(node);
        }
        pairs += 1;
        let after = after.trim_start_matches([' ', '\t']);
        match after.as_bytes().first() {
            None | Some(b',' | b';') => rest = after,
            Some(_) => return None,
        }
    }
    forwarded_node(&found?)
}

/// A pair's value, quoted or not, and what follows it.
fn pair_value(s: &str) -> Option<(String, &str)> {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s.find([';', ',', ' ', '\t']).unwrap_or(s.len());
        let (token, rest) = s.split_at(end);
        return (!token.is_empty() && !token.contains('"')).then(|| (token.to_owned(), rest));
    };
    let mut out = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &quoted[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    // No closing quote.
    None
}

/// `ip`, `ip:port`, `[v6]` or `[v6]:port`.
fn forwarded_node(node: &str) -> Option<ForwardedNode> {
    let (ip, port) = match node.strip_prefix('[') {
        Some(v6) => {
            let (ip, rest) = v6.split_once(']')?;
            let ip: std::net::Ipv6Addr = ip.parse().ok()?;
            let port = match rest {
                "" => None,
                _ => Some(rest.strip_prefix(':')?),
            };
            (IpAddr::V6(ip), port)
        }
        None => {
            let (ip, port) = match node.split_once(':') {
                Some((ip, port)) => (ip, Some(port)),
                None => (node, None),
            };
            // An IPv6 address must be in brackets; one without would have been split here.
            let ip: std::net::Ipv4Addr = ip.parse().ok()?;
            (IpAddr::V4(ip), port)
        }
    };
    let port = match port {
        None => None,
        // An obfuscated port (RFC 7239 §6.3) says nothing usable.
        Some(p) if p.starts_with('_') && p.len() > 1 && p[1..].bytes().all(is_obf) => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>().ok()? {
                0 => None,
                port => Some(port),
            }
        }
        Some(_) => return None,
    };
    Some((ip, port))
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 7239 `obfnode` / `obfport` characters after the `_`.
fn is_obf(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

/// The target of a well-formed HBONE request: `CONNECT` with an `ip:port` authority.
fn connect_target(request: &Request<RecvStream>) -> Result<SocketAddr, &'static str> {
    if request.method() != Method::CONNECT {
        return Err("method is not CONNECT");
    }
    let authority = request
        .uri()
        .authority()
        .ok_or("CONNECT without :authority")?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .map_err(|_| ":authority is not ip:port")
}

/// Moves bytes both ways between a tunnel and a TCP socket until both sides are done;
/// returns (bytes from the tunnel, bytes to the tunnel).
///
/// Not `copy_bidirectional`: HTTP/2 hands out and takes `Bytes`, so the TCP side reads straight
/// into a `BytesMut` whose filled part becomes the DATA frame, and received frames are written
/// straight to the socket; no intermediate buffer, one memcpy less per byte each way. The read
/// buffer ([`COPY_BUFFER`]) is taken only once the socket is readable, so idle connections hold
/// none.
pub async fn copy(
    tunnel: &mut H2Stream,
    tcp: &mut tokio::net::TcpStream,
) -> io::Result<(u64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let H2Stream {
        send,
        recv,
        pending,
        ..
    } = tunnel;
    let to_tunnel = async {
        let mut total = 0u64;
        let mut buf = bytes::BytesMut::new();
        loop {
            // Only a connection with something to send holds a buffer: idle ones cost nothing.
            AsRef::<tokio::net::TcpStream>::as_ref(&tcp_read)
                .readable()
                .await?;
            // Room in the peer's window first, then read at most that: a stream whose peer
            // stopped reading holds no buffer here, only the app's bytes in the kernel.
            send.reserve_capacity(COPY_BUFFER);
            let mut granted = send.capacity();
            while granted == 0 {
                granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?
                    .map_err(h2_io)?;
            }
            let room = granted.min(COPY_BUFFER);
            buf.reserve(room);
            let n = tcp_read
                .read_buf(&mut bytes::BufMut::limit(&mut buf, room))
                .await?;
            if n == 0 {
                // The app half-closed: END_STREAM (already ended or reset is fine).
                match send.send_data(Bytes::new(), true) {
                    Err(e) if e.is_io() => return Err(h2_io(e)),
                    _ => return Ok(total),
                }
            }
            total += n as u64;
            send.send_data(buf.split().freeze(), false).map_err(h2_io)?;
            // Give back the window reserved and not used: a quiet stream must hold none of its
            // connection's window, or a hundred quiet streams starve the ones that speak.
            send.reserve_capacity(0);
        }
    };
    let from_tunnel = async {
        let mut total = 0u64;
        if !pending.is_empty() {
            tcp_write.write_all(pending).await?;
            total += pending.len() as u64;
            pending.clear();
        }
        while let Some(data) = std::future::poll_fn(|cx| recv.poll_data(cx)).await {
            let data = match data {
                Ok(data) => data,
                Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => break,
                Err(e) => return Err(h2_io(e)),
            };
            tcp_write.write_all(&data).await?;
            total += data.len() as u64;
            // Credit the peer once the bytes are in the socket: the window is the backpressure.
            let _ = recv.flow_control().release_capacity(data.len());
        }
        tcp_write.shutdown().await?;
        Ok::<_, io::Error>(total)
    };
    tokio::try_join!(from_tunnel, to_tunnel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn forwarded_for_reads_the_first_elements_node() {
        let v4 = ip("10.1.0.7");
        let v6 = ip("fd00::7");
        let cases: &[(&str, Option<ForwardedNode>)] = &[
            // What sluice's client sends, and the forms RFC 7239 allows.
            (r#"for="10.1.0.7:43210""#, Some((v4, Some(43210)))),
            (r#"for="[fd00::7]:43210""#, Some((v6, Some(43210)))),
            ("for=10.1.0.7", Some((v4, None))),
            (r#"for="10.1.0.7""#, Some((v4, None))),
            (r#"for="[fd00::7]""#, Some((v6, None))),
            ("for=10.1.0.7:80", Some((v4, Some(80)))),
            ("for=[fd00::7]:80", Some((v6, Some(80)))),
            ("FOR=10.1.0.7", Some((v4, None))),
            ("For=\"10.1.0.7:1\"", Some((v4, Some(1)))),
            ("for=10.1.0.7:65535", Some((v4, Some(65535)))),
            ("  for = 10.1.0.7 ", None),
            (" for=10.1.0.7 ", Some((v4, None))),
            ("by=10.9.9.9;for=10.1.0.7;proto=http", Some((v4, None))),
            (
                "proto=http; for=\"10.1.0.7:5\" ;host=x",
                Some((v4, Some(5))),
            ),
            // Several elements (proxies in a chain): the first.
            ("for=10.1.0.7, for=10.2.0.8", Some((v4, None))),
            ("for=10.1.0.7:9,for=\"[fd00::8]\"", Some((v4, Some(9)))),
            (
                r#"for="[::ffff:10.1.0.7]:9""#,
                Some((ip("::ffff:10.1.0.7"), Some(9))),
            ),
            (r#"for="10.1.0.7\:9""#, Some((v4, Some(9)))),
            // Port 0 and obfuscated ports name no port.
            ("for=10.1.0.7:0", Some((v4, None))),
            (r#"for="10.1.0.7:_abc""#, Some((v4, None))),
            (r#"for="[fd00::7]:_x-1""#, Some((v6, None))),
            // Nothing usable.
            ("", None),
            ("for=", None),
            (r#"for="""#, None),
            ("by=10.1.0.7", None),
            ("proto=http", None),
            ("for=unknown", None),
            (r#"for="unknown""#, None),
            (r#"for="unknown:80""#, None),
            ("for=_hidden", None),
            (r#"for="_hidden:80""#, None),
            ("for=fd00::7", None),
            (r#"for="fd00::7""#, None),
            (r#"for="fd00::7:80""#, None),
            (r#"for="[fd00::7""#, None),
            (r#"for="[fd00::7]80""#, None),
            (r#"for="[fd00::7]:""#, None),
            (r#"for="[fe80::1%eth0]:80""#, None),
            (r#"for="[10.1.0.7]:80""#, None),
            ("for=10.1.0.7:99999", None),
            ("for=10.1.0.7:65536", None),
            ("for=10.1.0.7:-1", None),
            ("for=10.1.0.7:+80", None),
            ("for=10.1.0.7:080000", None),
            ("for=10.1.0.7:", None),
            ("for=10.1.0.7:_", None),
            ("for=10.1.0.7:80:81", None),
            ("for=010.1.0.7", None),
            ("for=10.1.0", None),
            ("for=10.1.0.7.8", None),
            ("for=10.1.0.256", None),
            ("for=host.example", None),
            (" for=\u{ff10}.1.0.7", None),
            // Quotes that do not close, or close early, or hide another address.
            (r#"for="10.1.0.7"#, None),
            (r#"for="10.1.0.7"x"#, None),
            (r#"for="10.1.0.7"":80"#, None),
            (r#"for="\"10.1.0.7\"""#, None),
            (r#"for=10.1.0.7";for=10.2.0.8"#, None),
            (r#"for=10"."1.0.7"#, None),
            (r#"for="10.1.0.7;for=10.2.0.8""#, None),
            (r#"for="10.1.0.7,10.2.0.8""#, None),
            (r#"for="10.1.0.7\""#, None),
            // A parameter repeated in the first element is ambiguous.
            ("for=10.1.0.7;for=10.2.0.8", None),
            ("for=10.1.0.7;FOR=10.1.0.7", None),
            // Broken syntax.
            ("for", None),
            ("=10.1.0.7", None),
            ("f r=10.1.0.7", None),
            ("for=10.1.0.7 junk", None),
            ("for==10.1.0.7", None),
            ("proto=http,for=10.1.0.7", None),
            ("proto=http;;x=y, for=10.1.0.7", None),
            // Empty pairs and empty leading elements are allowed.
            ("for=10.1.0.7;", Some((v4, None))),
            (";for=10.1.0.7", Some((v4, None))),
            (",for=10.1.0.7", Some((v4, None))),
            (" , ;, for=10.1.0.7:3", Some((v4, Some(3)))),
            (",,;;", None),
        ];
        for (value, want) in cases {
            assert_eq!(forwarded_for(value), *want, "forwarded: {value:?}");
        }
        // Overlong values are not read, whatever they hold.
        let long = format!("for=10.1.0.7;x={}", "a".repeat(MAX_FORWARDED));
        assert_eq!(forwarded_for(&long), None);
        let long = format!("for=\"10.1.0.7:9\",{}", "for=10.2.0.8,".repeat(100));
        assert_eq!(forwarded_for(&long), None);
        // Arbitrary bytes never panic.
        for n in 0..2048u32 {
            let bytes: Vec<u8> = (0..(n % 40))
                .map(|i| b"for=\"[]:;,\\_ 1.0f:"[((n * 7 + i * 13) % 18) as usize])
                .collect();
            let _ = forwarded_for(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn the_client_is_the_tunnel_source_with_the_port_forwarded_names_for_it() {
        let headers = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append("forwarded", http::HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let source = ip("10.1.0.7");
        let source6 = ip("fd00::7");
        let cases: &[(&[&str], IpAddr, &str)] = &[
            (&[r#"for="10.1.0.7:43210""#], source, "10.1.0.7:43210"),
            (&[r#"for="[fd00::7]:43210""#], source6, "[fd00::7]:43210"),
            // The mapped form of the same address.
            (&[r#"for="[::ffff:10.1.0.7]:9""#], source, "10.1.0.7:9"),
            (
                &[r#"for="10.1.0.7:9""#],
                ip("::ffff:10.1.0.7"),
                "10.1.0.7:9",
            ),
            // No port named: the address alone.
            (&["for=10.1.0.7"], source, "10.1.0.7:0"),
            // Another address than the tunnel's: never believed, not even its port.
            (&[r#"for="10.1.0.8:43210""#], source, "10.1.0.7:0"),
            (&[r#"for="[fd00::8]:43210""#], source6, "[fd00::7]:0"),
            (&[r#"for="10.1.0.7:9""#], source6, "[fd00::7]:0"),
            // None, garbage, or an unknown client.
            (&[], source, "10.1.0.7:0"),
            (&["for=unknown"], source, "10.1.0.7:0"),
            (&["for=_hidden"], source, "10.1.0.7:0"),
            (&[r#"for="10.1.0.7:99999""#], source, "10.1.0.7:0"),
            // Several header lines: the first is the first element.
            (&["for=10.1.0.7:5", "for=10.1.0.7:6"], source, "10.1.0.7:5"),
            (&["for=10.9.9.9:5", "for=10.1.0.7:6"], source, "10.1.0.7:0"),
        ];
        for (values, tunnel, want) in cases {
            assert_eq!(
                client_address(&headers(values), *tunnel),
                addr(want),
                "{values:?} through a tunnel from {tunnel}"
            );
        }
        // A value that is not visible ASCII is not read.
        let mut h = http::HeaderMap::new();
        h.insert(
            "forwarded",
            http::HeaderValue::from_bytes(b"for=10.1.0.7:5\xff").unwrap(),
        );
        assert_eq!(client_address(&h, source), addr("10.1.0.7:0"));
    }

    #[test]
    fn a_target_is_the_arrival_address_on_a_port_that_is_not_the_proxys() {
        let on = addr("10.1.0.5:15008");
        let mapped_on = addr("[::ffff:10.1.0.5]:15008");
        let on6 = addr("[fd00::5]:15008");
        let app = addr("10.1.0.5:8080");
        assert_eq!(check_target(app, on), Ok(app));
        assert_eq!(
            check_target(app, mapped_on),
            Ok(app),
            "IPv4 on a dual-stack listener"
        );
        assert_eq!(
            check_target(addr("[::ffff:10.1.0.5]:8080"), on),
            Ok(app),
            "the mapped form is the same address, dialled as IPv4"
        );
        assert_eq!(
            check_target(addr("[fd00::5]:8080"), on6),
            Ok(addr("[fd00::5]:8080"))
        );
        for port in [15001, 15006, 15008] {
            for arrived in [on, mapped_on, on6] {
                let target = SocketAddr::new(arrived.ip(), port);
                assert_eq!(
                    check_target(target, arrived),
                    Err(TargetRefused::ProxyPort),
                    "{target}"
                );
            }
        }
        for (target, arrived) in [
            ("10.1.0.6:8080", on),
            ("[fd00::5]:8080", on),
            ("10.1.0.5:8080", on6),
            ("[fd00::6]:8080", on6),
        ] {
            assert_eq!(
                check_target(addr(target), arrived),
                Err(TargetRefused::NotLocal),
                "{target} on {arrived}"
            );
        }
        let loopback = addr("127.0.0.1:15008");
        for target in [
            "127.0.0.1:8080",
            "127.0.0.2:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "0.0.0.0:8080",
            "[::]:8080",
            "224.0.0.1:8080",
            "[ff02::1]:8080",
        ] {
            for arrived in [on, loopback] {
                assert_eq!(
                    check_target(addr(target), arrived),
                    Err(TargetRefused::SpecialAddress),
                    "{target} on {arrived}"
                );
            }
        }
    }
}
