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
use tracing::{debug, info};

use crate::identity::Identity;

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
    /// Connects to the app at `target` on behalf of `peer`.
    fn connect(
        &self,
        target: SocketAddr,
        peer: &Identity,
    ) -> Pin<Box<dyn Future<Output = io::Result<tokio::net::TcpStream>> + Send + '_>>;
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

/// Terminates mutual TLS on an accepted 15008 connection, reads the client's identity and
/// serves the connection if that identity belongs to `trust_domain`. Failures are counted and
/// close the connection.
pub async fn accept(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    trust_domain: &str,
    inbound: Arc<impl Inbound>,
    stats: Arc<ServerStats>,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let remote = tcp.peer_addr().ok();
    // The address the client dialled: the only one its streams may name as their target.
    let local = match tcp.local_addr() {
        Ok(local) => crate::socket::canonical(local),
        Err(e) => {
            stats.not_local.fetch_add(1, Ordering::Relaxed);
            info!(remote = ?remote, error = %e, "HBONE connection without a local address; closed");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
            info!(remote = ?remote, error = %e, "HBONE TLS handshake failed");
            return;
        }
    };
    tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::tls::peer_identity);
    match peer {
        Some(peer) if peer.trust_domain == trust_domain => {
            let source = remote.map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |r| {
                crate::socket::canonical(r).ip()
            });
            serve(tls, peer, (source, local), inbound, stats, drain).await
        }
        other => {
            stats.bad_identity.fetch_add(1, Ordering::Relaxed);
            info!(remote = ?remote, identity = ?other.map(|p| p.to_string()), trust_domain, "HBONE client is not of this mesh");
        }
    }
}

/// Serves one authenticated HBONE connection from `peer` at `source` that arrived on `local`
/// until the client closes it. Each stream runs on its own task; errors close the stream and
/// are counted, never panic.
///
/// When `drain` turns true the connection sends GOAWAY: the client opens no new stream on it,
/// the streams already open run to their end, and then the connection closes.
pub async fn serve<IO, I>(
    io: IO,
    peer: Identity,
    (source, local): (IpAddr, SocketAddr),
    inbound: Arc<I>,
    stats: Arc<ServerStats>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Inbound,
{
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let mut conn = match server_builder().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(e) => {
            debug!(peer = %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let peer = Arc::new(peer);
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept() => accepted,
            _ = drain.wait_for(|d| *d), if !draining => {
                debug!(peer = %peer, "draining: GOAWAY");
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        let (request, respond) = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                debug!(peer = %peer, error = %e, "HBONE connection ended");
                break;
            }
            None => break,
        };
        stats.streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve_stream(
            request,
            respond,
            (peer.clone(), source, local),
            inbound.clone(),
            stats.clone(),
        ));
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

async fn serve_stream<I: Inbound>(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    (peer, source, local): (Arc<Identity>, IpAddr, SocketAddr),
    inbound: Arc<I>,
    stats: Arc<ServerStats>,
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
    let mut upstream = match inbound.connect(target, &peer).await {
        Ok(upstream) => upstream,
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
    let access = crate::access::Access {
        direction: "inbound",
        src: source.to_string(),
        dst: target.to_string(),
        upstream: None,
        src_identity: Some(peer.to_string()),
        dst_identity: inbound.local_identity(),
        hbone: true,
        started: std::time::Instant::now(),
    };
    let mut tunnel = H2Stream::new(send, request.into_body());
    let _ = upstream.set_nodelay(true);
    let copied = tokio::select! {
        copied = copy(&mut tunnel, &mut upstream) => copied,
        policy = revoked(&*inbound, target, &peer, source) => {
            stats.denied.fetch_add(1, Ordering::Relaxed);
            inbound.tunnel_closed(target, &peer, source, 0, 0);
            info!(target: "access", peer = %peer, src = %source, dst = %target, policy, "tunnel closed: a policy change denies it");
            return;
        }
    };
    let (from_client, to_client) = copied.as_ref().map_or((0, 0), |c| *c);
    inbound.tunnel_closed(target, &peer, source, from_client, to_client);
    if let Ok((from_client, to_client)) = &copied {
        stats.bytes_in.fetch_add(*from_client, Ordering::Relaxed);
        stats.bytes_out.fetch_add(*to_client, Ordering::Relaxed);
    }
    access.closed(&copied);
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
            buf.reserve(COPY_BUFFER);
            let n = tcp_read.read_buf(&mut buf).await?;
            if n == 0 {
                // The app half-closed: END_STREAM (already ended or reset is fine).
                match send.send_data(Bytes::new(), true) {
                    Err(e) if e.is_io() => return Err(h2_io(e)),
                    _ => return Ok(total),
                }
            }
            total += n as u64;
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?
                    .map_err(h2_io)?;
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(h2_io)?;
            }
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
