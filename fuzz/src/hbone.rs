//! The HBONE server's request handling: `hbone::serve` on one end of an in-memory pipe, the
//! fuzzer on the other as an authenticated peer, with an `Inbound` whose app either refuses or
//! echoes (over a socket pair: no network, no ports).
//!
//! Input: one byte of set-up flags, then either raw bytes written as the client side of the
//! HTTP/2 connection (after a valid preface, optionally) or a script of client operations
//! driven through the real h2 client (CONNECTs to chosen targets with chosen `forwarded`
//! headers, data, resets, a policy change, a drain).
//!
//! Time is paused (tokio's test clock): it moves only when every task waits, straight to the
//! next timer. So a hang costs nothing to detect: once the client is gone, the server, its
//! streams and their apps must all have ended before [`BOUND`] of virtual time, shorter than
//! any of the proxy's own timers (idle close, keepalive), which therefore cannot mask one.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use sluice_proxy::hbone::{self, Inbound, ServerStats};
use sluice_proxy::identity::Identity;
use sluice_proxy::socket::AppStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// How long (virtual time) the server and everything it started may take to end once its
/// client has closed, and any one step of a script may take.
const BOUND: Duration = Duration::from_secs(5);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
/// Operations of one script, at most.
const MAX_OPS: usize = 48;
/// Bytes one DATA operation sends, at most.
const MAX_DATA: usize = 16 * 1024;

pub fn check(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let setup = Setup::from_flags(flags);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let session = Session::start(&setup);
        if setup.scripted {
            script(&setup, &session, rest).await;
        } else {
            raw(&setup, &session, rest).await;
        }
        session.finish(&setup).await;
    });
}

/// What the first byte chooses.
#[derive(Debug)]
struct Setup {
    scripted: bool,
    /// Raw mode: a valid client preface and SETTINGS first, so the fuzzer starts past them.
    preface: bool,
    /// The policy allows every (well-formed, local) tunnel.
    allow: bool,
    /// The app accepts (and echoes) instead of refusing.
    app_accepts: bool,
    /// The address the tunnel arrived on, as `accept` would pass it (maybe IPv4-mapped).
    local: SocketAddr,
    /// The peer's address.
    source: IpAddr,
    /// Raw mode: the policy changes to deny everything before the client closes.
    revoke: bool,
    /// Raw mode: the proxy drains before the client closes.
    drain: bool,
}

impl Setup {
    fn from_flags(flags: u8) -> Self {
        let bit = |n: u8| flags & (1 << n) != 0;
        let (local, source) = match (flags >> 4) & 0b11 {
            0 => ("10.1.0.5:15008", "10.1.0.9"),
            1 => ("[fd00::5]:15008", "fd00::9"),
            2 => ("[::ffff:10.1.0.5]:15008", "10.1.0.9"),
            _ => ("10.1.0.5:15008", "::ffff:10.1.0.9"),
        };
        Self {
            scripted: bit(0),
            preface: bit(1),
            allow: bit(2),
            app_accepts: bit(3),
            local: local.parse().expect("an address"),
            source: source.parse().expect("an address"),
            revoke: bit(6),
            drain: bit(7),
        }
    }

    /// The status a request must get, worked out independently of the server.
    fn expected(&self, connect: bool, uri: &str, allowed: bool) -> u16 {
        // The request's :authority, as the client derives it from the URI it was given.
        let authority = uri
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.into_parts().authority);
        let target = authority.and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target.filter(|_| connect) else {
            return 400;
        };
        let ip = canonical(target.ip());
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            return 400;
        }
        if ip != canonical(self.local.ip()) || [15001, 15006, 15008].contains(&target.port()) {
            return 400;
        }
        if !allowed {
            return 401;
        }
        if !self.app_accepts {
            return 503;
        }
        200
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One server, its client end and what it reported.
struct Session {
    client: Mutex<Option<tokio::io::DuplexStream>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    inbound: Arc<FuzzInbound>,
    stats: Arc<ServerStats>,
    drain: watch::Sender<bool>,
}

impl Session {
    fn start(setup: &Setup) -> Self {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let inbound = Arc::new(FuzzInbound::new(setup));
        let stats = Arc::new(ServerStats::default());
        let (drain, drained) = watch::channel(false);
        let peer = Identity::new("cluster.local", "fuzz", "client").expect("an identity");
        let served = tokio::spawn(hbone::serve(
            server,
            peer,
            (setup.source, setup.local),
            inbound.clone(),
            stats.clone(),
            drained,
        ));
        Self {
            client: Mutex::new(Some(client)),
            server: Mutex::new(Some(served)),
            inbound,
            stats,
            drain,
        }
    }

    fn take_client(&self) -> tokio::io::DuplexStream {
        lock(&self.client).take().expect("the client end, once")
    }

    /// The client is gone: the server ends, then every task it started, within the bound;
    /// then the counts must add up.
    async fn finish(&self, setup: &Setup) {
        drop(lock(&self.client).take());
        let server = lock(&self.server).take().expect("the server task");
        tokio::time::timeout(BOUND, server)
            .await
            .expect("the HBONE server did not end after its client closed")
            .expect("the HBONE server task failed");
        let handle = tokio::runtime::Handle::current();
        let ended = tokio::time::timeout(BOUND, async {
            while handle.metrics().num_alive_tasks() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "{} task(s) (streams, apps) outlived their connection",
            handle.metrics().num_alive_tasks()
        );
        if std::env::var_os("SLUICE_FUZZ_DEBUG").is_some() {
            eprintln!("{setup:?}\n{:?}\n{:?}", self.stats, lock(&self.inbound.log));
        }
        self.check_counts(setup);
    }

    fn check_counts(&self, setup: &Setup) {
        let s = &*self.stats;
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(n(&s.connections), 1);
        let refused =
            n(&s.bad_request) + n(&s.not_local) + n(&s.proxy_port) + n(&s.special_address);
        let outcomes = refused + n(&s.upstream_failed) + n(&s.tunnelled);
        assert!(
            outcomes <= n(&s.streams),
            "more outcomes ({outcomes}) than streams ({}): {s:?}",
            n(&s.streams)
        );
        let log = lock(&self.inbound.log);
        assert_eq!(n(&s.tunnelled), log.opened, "tunnels counted vs opened");
        assert_eq!(
            log.opened, log.closed,
            "a tunnel opened was never reported closed"
        );
        if !setup.allow || !setup.app_accepts {
            assert_eq!(
                log.opened, 0,
                "a tunnel opened that policy or the app refused"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Raw bytes as the client side, then the client closes.
async fn raw(setup: &Setup, session: &Session, bytes: &[u8]) {
    let (mut read, mut write) = tokio::io::split(session.take_client());
    // Whatever the server writes is read, so it never waits on us.
    let reader = tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let written = tokio::time::timeout(BOUND, async {
        if setup.preface {
            write.write_all(PREFACE).await?;
            write.write_all(EMPTY_SETTINGS).await?;
        }
        write.write_all(bytes).await?;
        // Let the server act on all of it before the close.
        tokio::task::yield_now().await;
        if setup.revoke {
            session.inbound.revoke();
        }
        if setup.drain {
            let _ = session.drain.send(true);
        }
        tokio::task::yield_now().await;
        write.shutdown().await
    })
    .await;
    // The server may have closed first (a protocol error): that is an answer, not a hang.
    assert!(
        written.is_ok(),
        "the HBONE server stopped reading its client"
    );
    drop(write);
    reader.abort();
}

/// A tunnel the script opened.
struct Tunnel {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    sent: Vec<u8>,
    ended: bool,
    reset: bool,
}

/// A script of client operations through the real h2 client.
async fn script(setup: &Setup, session: &Session, bytes: &[u8]) {
    let client = session.take_client();
    let (send_request, connection) =
        tokio::time::timeout(BOUND, hbone::client_builder().handshake::<_, Bytes>(client))
            .await
            .expect("the HTTP/2 handshake with the server hung")
            .expect("the server refused a valid HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut u = Unstructured::new(bytes);
    let mut tunnels = Vec::new();
    let mut revoked = false;
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(step) = run_op(
            setup,
            session,
            &mut u,
            &send_request,
            &mut tunnels,
            &mut revoked,
        )
        .await
        else {
            break;
        };
        if step == Step::Stop {
            break;
        }
    }
    // Each tunnel the client ended (and neither side cut) is echoed back whole, then ended.
    if setup.app_accepts && !revoked {
        for t in tunnels.iter_mut().filter(|t| t.ended && !t.reset) {
            let echoed = tokio::time::timeout(BOUND, read_body(&mut t.recv))
                .await
                .expect("a tunnel the client ended was never ended by the server");
            if let Ok(echoed) = echoed {
                assert_eq!(echoed.len(), t.sent.len(), "the tunnel lost or added bytes");
                assert!(echoed == t.sent, "the tunnel changed the bytes");
            }
        }
    }
    drop(tunnels);
    drop(send_request);
    driver.abort();
    let _ = driver.await;
}

#[derive(PartialEq)]
enum Step {
    Next,
    Stop,
}

async fn run_op(
    setup: &Setup,
    session: &Session,
    u: &mut Unstructured<'_>,
    send_request: &h2::client::SendRequest<Bytes>,
    tunnels: &mut Vec<Tunnel>,
    revoked: &mut bool,
) -> ArbResult<Step> {
    match u.int_in_range(0u8..=6)? {
        0 | 1 => {
            let connect = u.int_in_range(0u8..=7)? != 0;
            let authority = authority(setup, u)?;
            let forwarded = forwarded(setup, u)?;
            let allowed = setup.allow && !*revoked;
            return request(
                setup,
                session,
                send_request,
                tunnels,
                (connect, allowed),
                &authority,
                forwarded,
            )
            .await;
        }
        2 => {
            let Some(t) = pick(u, tunnels)? else {
                return Ok(Step::Next);
            };
            let len = u.int_in_range(0..=MAX_DATA)?;
            let data = u.bytes(len.min(u.len()))?.to_vec();
            let end = u.arbitrary::<bool>()?;
            if !t.ended && !t.reset && t.send.send_data(Bytes::from(data.clone()), end).is_ok() {
                t.sent.extend_from_slice(&data);
                t.ended = end;
            }
        }
        3 => {
            if let Some(t) = pick(u, tunnels)?
                && !t.ended
                && !t.reset
            {
                t.ended = t.send.send_data(Bytes::new(), true).is_ok();
            }
        }
        4 => {
            if let Some(t) = pick(u, tunnels)? {
                t.send.send_reset(h2::Reason::CANCEL);
                t.reset = true;
            }
        }
        5 => {
            session.inbound.revoke();
            *revoked = true;
        }
        _ => {
            let _ = session.drain.send(true);
        }
    }
    // Let the server catch up with what was sent.
    tokio::task::yield_now().await;
    Ok(Step::Next)
}

fn pick<'t>(
    u: &mut Unstructured<'_>,
    tunnels: &'t mut [Tunnel],
) -> ArbResult<Option<&'t mut Tunnel>> {
    if tunnels.is_empty() {
        return Ok(None);
    }
    let i = u.choose_index(tunnels.len())?;
    Ok(tunnels.get_mut(i))
}

/// Opens one stream and checks the answer against [`Setup::expected`].
async fn request(
    setup: &Setup,
    session: &Session,
    send_request: &h2::client::SendRequest<Bytes>,
    tunnels: &mut Vec<Tunnel>,
    (connect, allowed): (bool, bool),
    authority: &str,
    forwarded: Forwarded,
) -> ArbResult<Step> {
    let builder = if connect {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
    } else {
        http::Request::builder()
            .method(http::Method::GET)
            .uri(format!("http://{authority}/"))
    };
    let builder = match &forwarded {
        Forwarded::None => builder,
        Forwarded::Client(value, _) | Forwarded::Other(value) => {
            builder.header("forwarded", value.as_str())
        }
    };
    let Ok(req) = builder.body(()) else {
        return Ok(Step::Next);
    };
    let Ok(Ok(mut ready)) = tokio::time::timeout(BOUND, send_request.clone().ready()).await else {
        // The connection is closing (drained or broken): nothing more to send.
        return Ok(Step::Stop);
    };
    let Ok((response, send)) = ready.send_request(req, false) else {
        return Ok(Step::Next);
    };
    let response = tokio::time::timeout(BOUND, response)
        .await
        .expect("a request got no answer");
    let Ok(response) = response else {
        // Refused at the HTTP/2 level (GOAWAY, a stream limit): no status to check.
        return Ok(Step::Next);
    };
    let status = response.status().as_u16();
    let expected = setup.expected(connect, authority, allowed);
    assert_eq!(
        status, expected,
        "CONNECT {authority} (connect: {connect}, {setup:?})"
    );
    if status == 200 {
        let dialled = lock(&session.inbound.log)
            .dialled
            .last()
            .copied()
            .expect("a dial for a 200");
        if let Forwarded::Client(_, port) = forwarded {
            assert_eq!(
                dialled.port(),
                port,
                "the client's port from `forwarded` was not kept"
            );
        }
        tunnels.push(Tunnel {
            send,
            recv: response.into_body(),
            sent: Vec::new(),
            ended: false,
            reset: false,
        });
    }
    Ok(Step::Next)
}

/// A `forwarded` header the script sends.
enum Forwarded {
    None,
    /// sluice's own form naming the tunnel's source address, and the port it names.
    Client(String, u16),
    Other(String),
}

fn forwarded(setup: &Setup, u: &mut Unstructured<'_>) -> ArbResult<Forwarded> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => Forwarded::None,
        1 => {
            let port = u.arbitrary::<u16>()?;
            let client = SocketAddr::new(setup.source, port);
            Forwarded::Client(format!("for=\"{client}\""), port)
        }
        2 => {
            let port = u.arbitrary::<u16>()?;
            Forwarded::Other(format!("for=\"10.7.7.7:{port}\""))
        }
        _ => Forwarded::Other(u.arbitrary::<&str>()?.to_owned()),
    })
}

fn authority(setup: &Setup, u: &mut Unstructured<'_>) -> ArbResult<String> {
    let port = u.arbitrary::<u16>()?;
    let local = setup.local.ip();
    let ip: String = match u.int_in_range(0u8..=7)? {
        0 | 1 => local.to_string(),
        2 => match canonical(local) {
            IpAddr::V4(v4) => format!("::ffff:{v4}"),
            v6 => v6.to_string(),
        },
        3 => "10.1.0.6".into(),
        4 => ["127.0.0.1", "::1", "0.0.0.0", "::"][u.choose_index(4)?].into(),
        5 => ["224.0.0.1", "ff02::1", "fd00::5", "10.1.0.5"][u.choose_index(4)?].into(),
        6 => {
            return Ok(format!(
                "{local}:{}",
                [15001, 15006, 15008][u.choose_index(3)?]
            ));
        }
        _ => return Ok(u.arbitrary::<&str>()?.to_owned()),
    };
    Ok(SocketAddr::new(ip.parse().expect("an address"), port).to_string())
}

async fn read_body(recv: &mut h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What the server told its surroundings.
#[derive(Debug, Default)]
struct Log {
    /// Targets the policy allowed.
    authorized: Vec<SocketAddr>,
    /// Client addresses the app was dialled as.
    dialled: Vec<SocketAddr>,
    opened: u64,
    closed: u64,
}

/// A trivial surroundings: one policy decision for everything, an app that refuses or echoes.
/// It asserts what the server must have checked before asking it anything.
struct FuzzInbound {
    allow: Mutex<bool>,
    app_accepts: bool,
    local: IpAddr,
    source: IpAddr,
    changes: watch::Sender<u64>,
    log: Mutex<Log>,
}

impl FuzzInbound {
    fn new(setup: &Setup) -> Self {
        Self {
            allow: Mutex::new(setup.allow),
            app_accepts: setup.app_accepts,
            local: canonical(setup.local.ip()),
            source: setup.source,
            changes: watch::Sender::new(0),
            log: Mutex::default(),
        }
    }

    /// The policy now denies everything; open tunnels are told.
    fn revoke(&self) {
        *lock(&self.allow) = false;
        self.changes.send_modify(|v| *v += 1);
    }

    /// Only a tunnel to the address it arrived on, on a port that is not the proxy's, is ever
    /// put to the policy or dialled.
    fn assert_checked(&self, target: SocketAddr) {
        let ip = target.ip();
        assert_eq!(
            ip, self.local,
            "a tunnel to {target} reached the policy (arrived on {})",
            self.local
        );
        assert!(
            !hbone::is_proxy_port(target.port()),
            "a tunnel to the proxy's own port {target}"
        );
        assert!(!ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast());
    }
}

impl Inbound for FuzzInbound {
    fn authorize(
        &self,
        target: SocketAddr,
        _peer: &Identity,
        source: IpAddr,
    ) -> Result<(), String> {
        self.assert_checked(target);
        assert_eq!(canonical(source), canonical(self.source));
        if *lock(&self.allow) {
            lock(&self.log).authorized.push(target);
            Ok(())
        } else {
            Err("fuzz: denied".into())
        }
    }

    fn policy_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn tunnel_opened(&self, target: SocketAddr, _peer: &Identity, _source: IpAddr) {
        self.assert_checked(target);
        lock(&self.log).opened += 1;
    }

    fn tunnel_closed(&self, _: SocketAddr, _: &Identity, _: IpAddr, _: u64, _: u64) {
        let mut log = lock(&self.log);
        log.closed += 1;
        assert!(log.closed <= log.opened, "a tunnel closed twice");
    }

    fn local_identity(&self) -> Option<String> {
        Some("spiffe://cluster.local/ns/fuzz/sa/server".into())
    }

    fn connect(
        &self,
        target: SocketAddr,
        _peer: &Identity,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<AppStream>> + Send + '_>> {
        self.assert_checked(target);
        {
            let mut log = lock(&self.log);
            assert!(
                log.authorized.contains(&target),
                "dialled {target} without the policy's allow"
            );
            // A peer can only ever name a port of its own address.
            assert_eq!(client.ip(), canonical(self.source), "dialled as {client}");
            log.dialled.push(client);
        }
        Box::pin(async move {
            if !self.app_accepts {
                return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
            }
            echo_app()
        })
    }
}

/// An app that echoes until its client half-closes, then closes: one end of a Unix socket
/// pair, the other handed to the server as its "TCP" stream (the copy only reads, writes and
/// shuts down, which a stream socket of any family does).
fn echo_app() -> io::Result<AppStream> {
    let (ours, app) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    app.set_nonblocking(true)?;
    let ours = std::net::TcpStream::from(std::os::fd::OwnedFd::from(ours));
    let app = tokio::net::UnixStream::from_std(app)?;
    tokio::spawn(async move {
        let (mut read, mut write) = app.into_split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
        let _ = write.shutdown().await;
    });
    Ok(AppStream::from(tokio::net::TcpStream::from_std(ours)?))
}
