//! HBONE client ↔ server in one process: the real CA, TLS configs, pool and server, with an
//! echo app behind the server. Bad peers and bad requests must be refused with the right status
//! and counted, never panic.
//!
//! The server and the app listen on one of the host's own non-loopback addresses, as a pod's
//! 15008 listener and app share the pod's address: the server tunnels only to the address a
//! connection arrived on, and never to loopback.

// A test binary: a failed unwrap in a helper is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::hash::Hasher;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sluice_proxy::ca::Ca;
use sluice_proxy::hbone::{self, Inbound, OpenError, ServerStats};
use sluice_proxy::identity::Identity;
use sluice_proxy::limits::{Admission, Limits};
use sluice_proxy::policy::{Connection, Policies, Target, Verdict};
use sluice_proxy::pool::{BoxFuture, Pool, PoolError, PoolKey, TcpConnect, TlsDialer};
use sluice_proxy::socket::AppStream;
use sluice_proxy::tls::CertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa).unwrap()
}

/// A CA directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-hbone-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn store(dir: &TempDir) -> Arc<CertStore> {
    let ca = Ca::load(&dir.0).or_else(|_| Ca::create(&dir.0)).unwrap();
    CertStore::new(ca, Duration::from_secs(3600)).unwrap()
}

/// The pod behind the server: a workload of namespace `default` with no labels, under the real
/// policy engine (no policies: everything is allowed).
#[derive(Default)]
struct Pod {
    policies: std::sync::RwLock<Policies>,
    changes: tokio::sync::watch::Sender<u64>,
    /// The client address each dial to the app was asked to carry.
    clients: std::sync::Mutex<Vec<SocketAddr>>,
    /// Dials never complete (an app whose backlog is full): for streams reset mid-dial.
    hang_dials: std::sync::atomic::AtomicBool,
    /// Dials in progress now.
    dialling: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a dial in progress until dropped (done or abandoned).
struct Dialling(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Dialling {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pod {
    /// Puts new policy objects in force, as a mesh reload does.
    fn set_policies(&self, yaml: &str) {
        let objects: Vec<serde_yaml::Value> = serde_yaml::from_str(yaml).unwrap();
        let (policies, warnings) = Policies::read(&objects);
        assert!(warnings.is_empty(), "{warnings:?}");
        *self.policies.write().unwrap() = policies;
        self.changes.send_modify(|v| *v += 1);
    }
}

impl Inbound for Pod {
    fn authorize(&self, target: SocketAddr, peer: &Identity, source: IpAddr) -> Result<(), String> {
        let labels = std::collections::BTreeMap::new();
        let target_workload = Target {
            namespace: "default",
            labels: Some(&labels),
        };
        let connection = Connection {
            source_ip: source,
            source: Some(peer),
            destination_ip: target.ip(),
            destination_port: target.port(),
        };
        match self
            .policies
            .read()
            .unwrap()
            .authorize(&target_workload, &connection)
        {
            Verdict::Allow => Ok(()),
            Verdict::Deny { policy } => Err(policy),
        }
    }

    fn policy_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn local_identity(&self) -> Option<String> {
        None
    }

    fn tunnel_opened(&self, _: SocketAddr, _: &Identity, _: IpAddr) {}

    fn tunnel_closed(&self, _: SocketAddr, _: &Identity, _: IpAddr, _: u64, _: u64) {}

    fn connect(
        &self,
        target: SocketAddr,
        _peer: &Identity,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<AppStream>> + Send + '_>> {
        self.clients.lock().unwrap().push(client);
        self.dialling.fetch_add(1, Ordering::SeqCst);
        let dialling = Dialling(self.dialling.clone());
        let hang = self.hang_dials.load(Ordering::SeqCst);
        Box::pin(async move {
            let _dialling = dialling;
            if hang {
                std::future::pending::<()>().await;
            }
            TcpStream::connect(target).await.map(AppStream::from)
        })
    }
}

/// One of this host's own IPv4 addresses that is not loopback (nor link-local): where the
/// tests' servers and apps listen, as a pod's do on the pod's address.
fn host_ip() -> IpAddr {
    static HOST: std::sync::OnceLock<IpAddr> = std::sync::OnceLock::new();
    *HOST.get_or_init(|| {
        let mut found = None;
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list` with a linked list that we only read, then free once.
        unsafe {
            assert_eq!(libc::getifaddrs(&mut list), 0, "getifaddrs failed");
            let mut next = list;
            while let Some(ifa) = next.as_ref() {
                next = ifa.ifa_next;
                let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
                let lo = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
                if !up || lo || ifa.ifa_addr.is_null() {
                    continue;
                }
                if i32::from((*ifa.ifa_addr).sa_family) != libc::AF_INET {
                    continue;
                }
                let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                    found = Some(IpAddr::V4(ip));
                    break;
                }
            }
            libc::freeifaddrs(list);
        }
        found.expect(
            "these tests need one non-loopback IPv4 address on an interface that is up \
             (an HBONE server never tunnels to loopback); bring one up, e.g. a dummy interface",
        )
    })
}

/// An echo app on the host's address; returns its address.
async fn echo_app() -> SocketAddr {
    echo_app_on(TcpListener::bind((host_ip(), 0)).await.unwrap())
}

/// A listener on every address, IPv4 and IPv6 alike (`[::]`, dual-stack), at port `port`.
fn dual_stack(port: u16) -> TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    socket.set_only_v6(false).unwrap();
    socket.set_nonblocking(true).unwrap();
    let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    socket.bind(&any.into()).unwrap();
    socket.listen(128).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

/// An echo app accepting on `listener`; returns its address.
fn echo_app_on(listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// The destination proxy's 15008 side; returns its address and counters.
async fn hbone_server(store: &Arc<CertStore>, local: &Identity) -> (SocketAddr, Arc<ServerStats>) {
    let (addr, stats, drain) = draining_server(store, local).await;
    // Never drained: the sender lives as long as the test's runtime.
    std::mem::forget(drain);
    (addr, stats)
}

/// An HBONE server whose connections drain when the returned sender says so.
async fn draining_server(
    store: &Arc<CertStore>,
    local: &Identity,
) -> (
    SocketAddr,
    Arc<ServerStats>,
    tokio::sync::watch::Sender<bool>,
) {
    draining_server_with(store, local, Arc::new(Pod::default())).await
}

/// As [`draining_server`], serving `inbound` (whose policies the test changes).
async fn draining_server_with(
    store: &Arc<CertStore>,
    local: &Identity,
    inbound: Arc<Pod>,
) -> (
    SocketAddr,
    Arc<ServerStats>,
    tokio::sync::watch::Sender<bool>,
) {
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    server_on(listener, store, local, inbound)
}

/// Serves HBONE on `listener` with the default bounds.
fn server_on(
    listener: TcpListener,
    store: &Arc<CertStore>,
    local: &Identity,
    inbound: Arc<Pod>,
) -> (
    SocketAddr,
    Arc<ServerStats>,
    tokio::sync::watch::Sender<bool>,
) {
    let (addr, stats, drain, _) =
        bounded_server_on(listener, store, local, inbound, Limits::default());
    (addr, stats, drain)
}

/// Serves HBONE on `listener` under `limits`; also returns the admission control (its
/// counters and what it holds).
fn bounded_server_on(
    listener: TcpListener,
    store: &Arc<CertStore>,
    local: &Identity,
    inbound: Arc<Pod>,
    limits: Limits,
) -> (
    SocketAddr,
    Arc<ServerStats>,
    tokio::sync::watch::Sender<bool>,
    Arc<Admission>,
) {
    let (drain, draining) = tokio::sync::watch::channel(false);
    let addr = listener.local_addr().unwrap();
    let admission = Admission::new(limits);
    let server = Arc::new(hbone::Listener {
        pod: 0,
        acceptor: tokio_rustls::TlsAcceptor::from(store.server_config(local).unwrap()),
        trust_domain: TD.to_owned(),
        stats: Arc::new(ServerStats::default()),
        admission: admission.clone(),
    });
    let stats = server.stats.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(hbone::accept(
                tcp,
                server.clone(),
                inbound.clone(),
                draining.clone(),
            ));
        }
    });
    (addr, stats, drain, admission)
}

struct PlainTcp;

impl TcpConnect for PlainTcp {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(addr))
    }
}

fn pool(store: &Arc<CertStore>, idle: Duration) -> Arc<Pool<TlsDialer>> {
    Pool::new(
        TlsDialer {
            store: store.clone(),
            tcp: Arc::new(PlainTcp),
        },
        idle,
    )
}

fn key(source: &str, destination: &str, addr: SocketAddr) -> PoolKey {
    PoolKey {
        source: id(source),
        destination: id(destination),
        addr,
    }
}

fn client_addr() -> SocketAddr {
    "10.0.0.7:40000".parse().unwrap()
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// Sends `len` pseudo-random bytes through `stream` while reading the echo back; returns the
/// hashes of what was sent and what came back.
async fn echo_through(stream: hbone::H2Stream, len: usize) -> (u64, u64) {
    let data: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let sent = hash(&data);
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("the echo came back in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), len, "every byte came back");
    (sent, hash(&back))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_cross_the_tunnel_intact_both_ways() {
    let dir = TempDir::new("happy");
    let store = store(&dir);
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let pool = pool(&store, Duration::from_secs(30));
    let stream = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .unwrap();
    let (sent, received) = echo_through(stream, 32 * 1024 * 1024).await;
    assert_eq!(sent, received, "32 MiB up and back, byte for byte");
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_identity_is_refused_by_the_client() {
    let dir = TempDir::new("wrong-id");
    let store = store(&dir);
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("impostor")).await;
    let pool = pool(&store, Duration::from_secs(30));
    let err = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .expect_err("the server is not productpage");
    assert!(
        matches!(&err, PoolError::Dial { source, .. } if source.to_string().contains("certificate")),
        "{err}"
    );
    wait_for(|| stats.handshake_failed.load(Ordering::Relaxed) == 1).await;
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_mesh_root_is_refused_both_ways() {
    let (ours, theirs) = (TempDir::new("root-a"), TempDir::new("root-b"));
    let (our_store, their_store) = (store(&ours), store(&theirs));
    let app = echo_app().await;
    let (server, stats) = hbone_server(&our_store, &id("productpage")).await;
    let pool = pool(&their_store, Duration::from_secs(30));
    let err = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .expect_err("different roots must not talk");
    assert!(matches!(err, PoolError::Dial { .. }), "{err}");
    wait_for(|| stats.handshake_failed.load(Ordering::Relaxed) == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_root_rotation_both_roots_are_trusted() {
    let (old, new) = (TempDir::new("rotate-old"), TempDir::new("rotate-new"));
    let old_ca = Ca::create(&old.0).unwrap();
    let new_ca = Ca::create(&new.0).unwrap();
    drop((old_ca, new_ca));
    // Each side trusts the other's root through its trust bundle, as mid-rotation.
    std::fs::copy(old.0.join("root-cert.pem"), new.0.join("trust-bundle.pem")).unwrap();
    std::fs::copy(new.0.join("root-cert.pem"), old.0.join("trust-bundle.pem")).unwrap();
    let (old_store, new_store) = (store(&old), store(&new));
    let app = echo_app().await;
    let (server, stats) = hbone_server(&new_store, &id("productpage")).await;
    let stream = pool(&old_store, Duration::from_secs(30))
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .unwrap();
    let (sent, received) = echo_through(stream, 4096).await;
    assert_eq!(sent, received);
    assert_eq!(stats.handshake_failed.load(Ordering::Relaxed), 0);

    // Without the bundle the old side no longer trusts the new root.
    std::fs::remove_file(old.0.join("trust-bundle.pem")).unwrap();
    let err = pool(&store(&old), Duration::from_secs(30))
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .expect_err("the new root is not trusted without the bundle");
    assert!(matches!(err, PoolError::Dial { .. }), "{err}");
}

/// A hand-built TLS client, to play peers sluice itself would never be.
async fn raw_client(
    server: SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(server.ip().into()), tcp)
        .await
}

/// Whether a CONNECT through `tls` to `target` gets a 200 (it must not, for a bad peer).
async fn tunnel_works(
    tls: std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    target: SocketAddr,
) -> bool {
    let Ok(tls) = tls else { return false };
    let Ok((send, conn)) = hbone::client_builder().handshake::<_, Bytes>(tls).await else {
        return false;
    };
    tokio::spawn(conn);
    matches!(
        tokio::time::timeout(WAIT, hbone::open_stream(send, target, client_addr())).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_mesh_certificate_or_tls13_are_refused() {
    let dir = TempDir::new("bad-clients");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let valid = || {
        let issued = ca.issue(&id("sleep"), Duration::from_secs(600)).unwrap();
        Some((issued.chain, issued.key))
    };

    // Control: the hand-built client does get through with a valid certificate.
    assert!(tunnel_works(raw_client(server, tls13, valid()).await, app).await);

    let now = SystemTime::now();
    let expired = ca
        .issue_between(
            &id("sleep"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let expired = Some((expired.chain, expired.key));
    let cases: [(&str, &[&'static rustls::SupportedProtocolVersion], _); 3] = [
        ("no client certificate", tls13, None),
        ("an expired client certificate", tls13, expired),
        ("a TLS 1.2-only client", &[&rustls::version::TLS12], valid()),
    ];
    for (n, (what, versions, cert)) in cases.into_iter().enumerate() {
        // One at a time, so each refusal is seen on its own in the counter.
        let tls = raw_client(server, versions, cert).await;
        assert!(!tunnel_works(tls, app).await, "{what} must be refused");
        wait_for(|| stats.handshake_failed.load(Ordering::Relaxed) == n as u64 + 1).await;
    }
    assert_eq!(
        stats.tunnelled.load(Ordering::Relaxed),
        1,
        "only the control got through"
    );
}

/// An HTTP/2 connection to `server` with a valid certificate for `sleep`, for hand-made requests.
async fn h2_as_sleep(ca: &Ca, server: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let issued = ca.issue(&id("sleep"), Duration::from_secs(600)).unwrap();
    let tls = raw_client(
        server,
        &[&rustls::version::TLS13],
        Some((issued.chain, issued.key)),
    )
    .await
    .unwrap();
    let (send, conn) = hbone::client_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends one hand-made request over an authenticated connection; returns the status, or None
/// if the stream was reset instead.
async fn request_status(
    pool_send: h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
) -> Option<http::StatusCode> {
    let mut send = pool_send.ready().await.ok()?;
    let (response, _stream) = send.send_request(request, false).ok()?;
    let response = tokio::time::timeout(WAIT, response).await.ok()?.ok()?;
    Some(response.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_foreign_connects_are_refused_and_counted() {
    let dir = TempDir::new("bad-requests");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let send = h2_as_sleep(&ca, server).await;

    let get = http::Request::get(format!("http://{app}/"))
        .body(())
        .unwrap();
    assert_eq!(
        request_status(send.clone(), get).await,
        Some(http::StatusCode::BAD_REQUEST)
    );
    let by_name = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("productpage.default.svc:9080")
        .body(())
        .unwrap();
    assert_eq!(
        request_status(send.clone(), by_name).await,
        Some(http::StatusCode::BAD_REQUEST)
    );
    assert_eq!(stats.bad_request.load(Ordering::Relaxed), 2);

    let foreign = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.255.0.9:80")
        .body(())
        .unwrap();
    assert_eq!(
        request_status(send.clone(), foreign).await,
        Some(http::StatusCode::BAD_REQUEST)
    );
    assert_eq!(stats.not_local.load(Ordering::Relaxed), 1);

    // A closed port behind a valid, local target: 503, counted.
    let closed = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let refused = hbone::open_stream(send.clone(), closed_addr, client_addr()).await;
    assert!(
        matches!(
            refused,
            Err(OpenError::Status(http::StatusCode::SERVICE_UNAVAILABLE))
        ),
        "{refused:?}"
    );
    assert_eq!(stats.upstream_failed.load(Ordering::Relaxed), 1);

    // After all that the connection still serves good requests.
    let ok = hbone::open_stream(send.clone(), app, client_addr())
        .await
        .unwrap();
    let (sent, received) = echo_through(ok, 64 * 1024).await;
    assert_eq!(sent, received);
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 1);

    // Last, because h2 answers a header list far over the limit by closing the whole
    // connection (GOAWAY ENHANCE_YOUR_CALM): no tunnel either way.
    let oversized = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(app.to_string())
        .header("baggage", "x".repeat(64 * 1024))
        .body(())
        .unwrap();
    let status = request_status(send, oversized).await;
    assert_ne!(
        status,
        Some(http::StatusCode::OK),
        "oversized headers must not open a tunnel"
    );

    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 1);
}

/// A hand-made CONNECT to `target` (as written, so any form can be tried); its status, or None
/// if the stream was reset instead.
async fn connect_status(
    send: &h2::client::SendRequest<Bytes>,
    target: &str,
) -> Option<http::StatusCode> {
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .body(())
        .unwrap();
    request_status(send.clone(), request).await
}

/// Whether a legitimate tunnel to `app` still carries bytes over `send`.
async fn still_tunnels(send: &h2::client::SendRequest<Bytes>, app: SocketAddr) {
    let tunnel = hbone::open_stream(send.clone(), app, client_addr())
        .await
        .unwrap();
    let (sent, received) = echo_through(tunnel, 64 * 1024).await;
    assert_eq!(sent, received, "the legitimate target still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_port_of_the_proxy_itself_is_refused_and_counted() {
    let dir = TempDir::new("proxy-ports");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let send = h2_as_sleep(&ca, server).await;
    // The pod's own address, as a tunnel into the pod's 15008 would name it: a nested tunnel
    // (15008), the outbound capture (15001) or the inbound one (15006), all of the proxy.
    for port in [15008, 15001, 15006] {
        let target = SocketAddr::new(server.ip(), port);
        assert_eq!(
            connect_status(&send, &target.to_string()).await,
            Some(http::StatusCode::BAD_REQUEST),
            "CONNECT {target}"
        );
    }
    assert_eq!(stats.proxy_port.load(Ordering::Relaxed), 3);
    assert_eq!(stats.not_local.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.upstream_failed.load(Ordering::Relaxed),
        0,
        "nothing was dialled"
    );
    still_tunnels(&send, app).await;
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_another_address_than_the_tunnel_arrived_on_is_refused_and_counted() {
    let dir = TempDir::new("foreign");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    // The app listens everywhere: only the server's check keeps the other addresses out.
    let app_port = echo_app_on(dual_stack(0)).port();
    let app = SocketAddr::new(host_ip(), app_port);
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let send = h2_as_sleep(&ca, server).await;
    let foreign = [
        "10.255.0.9:80".to_owned(),
        format!("[::ffff:10.255.0.9]:{app_port}"),
        format!("[fd00:99::77]:{app_port}"),
    ];
    for target in &foreign {
        assert_eq!(
            connect_status(&send, target).await,
            Some(http::StatusCode::BAD_REQUEST),
            "CONNECT {target}"
        );
    }
    assert_eq!(stats.not_local.load(Ordering::Relaxed), 3);
    still_tunnels(&send, app).await;
    // The same address in its IPv4-mapped form is the same address: allowed.
    let mapped = match host_ip() {
        IpAddr::V4(v4) => format!("[{}]:{app_port}", v4.to_ipv6_mapped()),
        IpAddr::V6(_) => unreachable!("host_ip is IPv4"),
    };
    assert_eq!(
        connect_status(&send, &mapped).await,
        Some(http::StatusCode::OK),
        "CONNECT {mapped}"
    );
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_loopback_is_refused_even_where_the_app_listens_and_the_tunnel_arrived() {
    let dir = TempDir::new("loopback");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app_port = echo_app_on(dual_stack(0)).port();
    let specials = [
        format!("127.0.0.1:{app_port}"),
        format!("[::1]:{app_port}"),
        format!("[::ffff:127.0.0.1]:{app_port}"),
        format!("0.0.0.0:{app_port}"),
        format!("224.0.0.1:{app_port}"),
    ];
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let send = h2_as_sleep(&ca, server).await;
    for target in &specials {
        assert_eq!(
            connect_status(&send, target).await,
            Some(http::StatusCode::BAD_REQUEST),
            "CONNECT {target}"
        );
    }
    assert_eq!(stats.special_address.load(Ordering::Relaxed), 5);
    still_tunnels(&send, SocketAddr::new(host_ip(), app_port)).await;

    // A tunnel that arrived on loopback (someone inside the pod dialling its 15008) may not
    // name loopback either: nothing on loopback is ever a tunnel's target.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let (server, stats, _drain) = server_on(listener, &store, &id("productpage"), Arc::default());
    let send = h2_as_sleep(&ca, server).await;
    let target = format!("127.0.0.1:{app_port}");
    assert_eq!(
        connect_status(&send, &target).await,
        Some(http::StatusCode::BAD_REQUEST),
        "CONNECT {target} over loopback"
    );
    assert_eq!(stats.special_address.load(Ordering::Relaxed), 1);
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_into_a_dual_stack_listener_over_ipv4_reaches_the_ipv4_target() {
    let dir = TempDir::new("mapped");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app = echo_app().await;
    // As a pod's 15008 listener: `[::]`, so IPv4 tunnels arrive on `::ffff:a.b.c.d`.
    let listener = dual_stack(0);
    let port = listener.local_addr().unwrap().port();
    let (_, stats, _drain) = server_on(listener, &store, &id("productpage"), Arc::default());
    let send = h2_as_sleep(&ca, SocketAddr::new(host_ip(), port)).await;
    still_tunnels(&send, app).await;
    assert_eq!(
        connect_status(&send, &SocketAddr::new(host_ip(), 15008).to_string()).await,
        Some(http::StatusCode::BAD_REQUEST),
        "the proxy ports stay refused in the mapped form too"
    );
    assert_eq!(stats.proxy_port.load(Ordering::Relaxed), 1);
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_shares_one_handshake_and_the_stream_limit_opens_another() {
    let dir = TempDir::new("pool");
    let store = store(&dir);
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let pool = pool(&store, Duration::from_secs(30));
    let key = key("sleep", "productpage", server);

    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move { pool.open(&key, app, client_addr()).await })
        })
        .collect();
    let mut held = Vec::new();
    for task in burst {
        held.push(task.await.unwrap().unwrap());
    }
    assert_eq!(
        pool.handshakes.load(Ordering::Relaxed),
        1,
        "20 tunnels, 1 handshake"
    );

    while held.len() < hbone::MAX_STREAMS as usize {
        held.push(pool.open(&key, app, client_addr()).await.unwrap());
    }
    assert_eq!(
        pool.handshakes.load(Ordering::Relaxed),
        1,
        "100 streams fit one connection"
    );
    held.push(pool.open(&key, app, client_addr()).await.unwrap());
    assert_eq!(
        pool.handshakes.load(Ordering::Relaxed),
        2,
        "the 101st opens a second one"
    );
    assert_eq!(pool.connections(&key).await, 2);
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 101);

    // The held tunnels all still work.
    let last = held.pop().unwrap();
    let (sent, received) = echo_through(last, 4096).await;
    assert_eq!(sent, received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close() {
    let dir = TempDir::new("idle");
    let store = store(&dir);
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let pool = pool(&store, Duration::from_millis(300));
    let key = key("sleep", "productpage", server);
    let stream = pool.open(&key, app, client_addr()).await.unwrap();
    let (sent, received) = echo_through(stream, 1024).await;
    assert_eq!(sent, received);
    assert_eq!(pool.connections(&key).await, 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while pool.connections(&key).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new tunnel after that takes a new handshake.
    let again = pool.open(&key, app, client_addr()).await.unwrap();
    drop(again);
    assert_eq!(pool.handshakes.load(Ordering::Relaxed), 2);
    assert_eq!(stats.handshake_failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_at_half_life_without_dropping_tunnels() {
    let dir = TempDir::new("renew");
    let store = CertStore::new(Ca::create(&dir.0).unwrap(), Duration::from_secs(4)).unwrap();
    let app = echo_app().await;
    let (server, stats) = hbone_server(&store, &id("productpage")).await;
    let before = store.certified_key(&id("productpage")).unwrap();
    let first = pool(&store, Duration::from_secs(30));
    let key = key("sleep", "productpage", server);
    let held = first.open(&key, app, client_addr()).await.unwrap();

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let after = store.certified_key(&id("productpage")).unwrap();
    assert_ne!(
        before.cert[0], after.cert[0],
        "past half its life the certificate is reissued"
    );

    // A new connection handshakes with the new certificate; the old tunnel is untouched.
    let fresh = pool(&store, Duration::from_secs(30));
    let (sent, received) =
        echo_through(fresh.open(&key, app, client_addr()).await.unwrap(), 8192).await;
    assert_eq!(sent, received);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (sent, received) = echo_through(held, 8192).await;
    assert_eq!(
        sent, received,
        "a tunnel outlives the certificate it was opened with"
    );
    assert_eq!(stats.handshake_failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_sends_goaway_lets_open_tunnels_finish_and_refuses_new_streams() {
    let dir = TempDir::new("drain");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app = echo_app().await;
    let (server, stats, drain) = draining_server(&store, &id("productpage")).await;
    let send = h2_as_sleep(&ca, server).await;
    let open = hbone::open_stream(send.clone(), app, client_addr())
        .await
        .unwrap();

    drain.send(true).unwrap();
    // The GOAWAY reaches the client: no new stream is accepted on this connection.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match hbone::open_stream(send.clone(), app, client_addr()).await {
            Err(OpenError::H2(e)) if e.is_go_away() || e.is_remote() => break,
            Err(e) => panic!("unexpected refusal: {e}"),
            Ok(extra) => {
                drop(extra);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no GOAWAY within {WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(
        stats.closed.load(Ordering::Relaxed),
        0,
        "an open tunnel keeps the connection"
    );
    // The tunnel that was open still carries a full transfer, then the connection ends.
    let (sent, received) = echo_through(open, 1024 * 1024).await;
    assert_eq!(sent, received);
    wait_for(|| stats.closed.load(Ordering::Relaxed) == 1).await;
}

async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const ONLY_SLEEP: &str = r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: only-sleep, namespace: default}
  spec:
    rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]}]
"#;

const DENY_SLEEP: &str = r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-sleep, namespace: default}
  spec:
    action: DENY
    rules: [{from: [{source: {principals: ["*/sa/sleep"]}}]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_peer_gets_401_and_a_policy_change_closes_its_live_tunnel() {
    let dir = TempDir::new("policy");
    let store = store(&dir);
    let app = echo_app().await;
    let inbound = Arc::new(Pod::default());
    inbound.set_policies(ONLY_SLEEP);
    let (server, stats, _drain) =
        draining_server_with(&store, &id("productpage"), inbound.clone()).await;
    let pool = pool(&store, Duration::from_secs(30));

    let tunnel = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .unwrap();
    let Err(denied) = pool
        .open(&key("notsleep", "productpage", server), app, client_addr())
        .await
    else {
        panic!("notsleep must be refused")
    };
    assert!(
        matches!(denied, PoolError::Open(OpenError::Status(s)) if s == http::StatusCode::UNAUTHORIZED),
        "{denied}"
    );
    assert_eq!(stats.denied.load(Ordering::Relaxed), 1);

    // The live tunnel of sleep works, until a policy change denies it.
    let (mut reader, mut writer) = tokio::io::split(tunnel);
    writer.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    inbound.set_policies(DENY_SLEEP);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, reader.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the revoked tunnel must close");
    wait_for(|| stats.denied.load(Ordering::Relaxed) == 2).await;
    // New tunnels of sleep are refused now.
    let again = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await;
    assert!(again.is_err(), "sleep is denied after the change");
}

/// The app is dialled as the tunnel's source address; the port the `forwarded` header names is
/// believed only when the header names that same address, never another one.
#[tokio::test]
async fn the_app_is_dialled_as_the_tunnel_source_with_the_forwarded_port_only_for_it() {
    let dir = TempDir::new("forwarded");
    let store = store(&dir);
    let app = echo_app().await;
    let inbound = Arc::new(Pod::default());
    let (server, _stats, _drain) =
        draining_server_with(&store, &id("productpage"), inbound.clone()).await;
    let pool = pool(&store, Duration::from_secs(30));
    let key = key("sleep", "productpage", server);
    // PlainTcp leaves from the host's address, as a pod's tunnels leave from the pod's.
    let honest = SocketAddr::new(host_ip(), 40123);
    let (sent, received) = echo_through(pool.open(&key, app, honest).await.unwrap(), 1024).await;
    assert_eq!(sent, received);
    // A client naming another address than its own gets neither that address nor its port.
    let foreign: SocketAddr = "192.0.2.9:40124".parse().unwrap();
    let (sent, received) = echo_through(pool.open(&key, app, foreign).await.unwrap(), 16).await;
    assert_eq!(sent, received);
    assert_eq!(
        *inbound.clients.lock().unwrap(),
        [honest, SocketAddr::new(host_ip(), 0)]
    );
}

// ---- Bounds: deadlines, idle, keepalive, admission (what a slow or hostile peer can hold) ----

/// A TCP connection to `server` from the local address `source`.
async fn connect_from(source: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(server).await
}

/// Whether the server closed or reset `tcp` within `within` (reading returns end or error);
/// `false` if it still holds it open.
async fn closed_by_peer(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Whatever the server sent first (a TLS alert, say): keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

fn short_handshakes() -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_never_finished_are_closed_at_the_deadline_while_others_are_served() {
    let dir = TempDir::new("slow-handshakes");
    let store = store(&dir);
    let app = echo_app().await;
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let (server, stats, _drain, admission) = bounded_server_on(
        listener,
        &store,
        &id("productpage"),
        Arc::new(Pod::default()),
        short_handshakes(),
    );
    // 40 connections that never say anything, and 10 that drip a TLS record header a byte at
    // a time: neither ever finishes a handshake.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(server).await.unwrap());
    }
    let drips: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(server).await.unwrap();
                let started = tokio::time::Instant::now();
                for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00]
                    .into_iter()
                    .cycle()
                    .take(100)
                {
                    if tcp.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    if closed_by_peer(&mut tcp, Duration::from_millis(100)).await {
                        return Some(started.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    // A behaving peer is served all the while.
    let pool = pool(&store, Duration::from_secs(30));
    let tunnel = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .unwrap();
    let (sent, received) = echo_through(tunnel, 64 * 1024).await;
    assert_eq!(sent, received);

    for tcp in &mut silent {
        assert!(
            closed_by_peer(tcp, WAIT).await,
            "a connection that never handshook was held past {WAIT:?}"
        );
    }
    for drip in drips {
        let took = drip
            .await
            .unwrap()
            .expect("a dripping handshake was never closed");
        assert!(
            took < Duration::from_secs(3),
            "a dripping handshake was closed only after {took:?} (deadline 500 ms)"
        );
    }
    wait_for(|| admission.stats.handshake_timeouts.load(Ordering::Relaxed) == 50).await;
    assert_eq!(
        admission.held(),
        (1, 0),
        "only the behaving connection is held"
    );
    assert_eq!(stats.tunnelled.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_bound_is_refused_at_once_while_other_sources_are_served() {
    let dir = TempDir::new("per-source");
    let store = store(&dir);
    let app = echo_app().await;
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let limits = Limits {
        max_handshakes_per_source: 8,
        ..Limits::default()
    };
    let (server, _stats, _drain, admission) = bounded_server_on(
        listener,
        &store,
        &id("productpage"),
        Arc::new(Pod::default()),
        limits,
    );
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(attacker, server).await.unwrap());
    }
    wait_for(|| admission.held() == (8, 8)).await;
    // Refused at once: the reset may even beat the connect's own completion.
    let refused = match connect_from(attacker, server).await {
        Ok(mut ninth) => closed_by_peer(&mut ninth, Duration::from_secs(2)).await,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        refused,
        "the source's 9th handshake in flight must be refused at once"
    );
    assert_eq!(
        admission
            .stats
            .refused_source_handshakes
            .load(Ordering::Relaxed),
        1
    );
    // Another source is served while the attacker holds its bound.
    let pool = pool(&store, Duration::from_secs(30));
    let tunnel = pool
        .open(&key("sleep", "productpage", server), app, client_addr())
        .await
        .unwrap();
    let (sent, received) = echo_through(tunnel, 1024).await;
    assert_eq!(sent, received);
    // The attacker's room comes back when its connections go.
    drop(held);
    wait_for(|| admission.held() == (1, 0)).await;
    let mut again = connect_from(attacker, server).await.unwrap();
    assert!(
        !closed_by_peer(&mut again, Duration::from_millis(200)).await,
        "admitted again once its connections closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_streams_is_closed_when_idle_but_one_carrying_a_stream_is_not() {
    let dir = TempDir::new("server-idle");
    let store = store(&dir);
    let app = echo_app().await;
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let limits = Limits {
        server_idle_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let (server, _stats, _drain, admission) = bounded_server_on(
        listener,
        &store,
        &id("productpage"),
        Arc::new(Pod::default()),
        limits,
    );
    // The client's pool would keep the connection for a minute: the server closes it first.
    let pool = pool(&store, Duration::from_secs(60));
    let key = key("sleep", "productpage", server);
    let mut tunnel = pool.open(&key, app, client_addr()).await.unwrap();
    // A stream open for three idle timeouts, quiet between its messages, keeps its connection.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tunnel.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tunnel.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    assert_eq!(admission.stats.idle_closed.load(Ordering::Relaxed), 0);
    drop(tunnel);
    wait_for(|| admission.stats.idle_closed.load(Ordering::Relaxed) == 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while pool.connections(&key).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never saw its idle connection closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(|| admission.held() == (0, 0)).await;
    // The next tunnel simply dials again.
    let again = pool.open(&key, app, client_addr()).await.unwrap();
    let (sent, received) = echo_through(again, 1024).await;
    assert_eq!(sent, received);
}

/// A TCP relay in front of `upstream`. Until [`Relay::freeze`] it forwards both ways; after,
/// the connections it carries go silent without closing (a peer that hung or vanished), so
/// only PINGs can tell.
struct Relay {
    addr: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn new(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (flag_a, flag_b) = (flag.clone(), flag.clone());
                let (client_r, client_w) = client.into_split();
                let (server_r, server_w) = server.into_split();
                tokio::spawn(forward(client_r, server_w, flag_a));
                tokio::spawn(forward(server_r, client_w, flag_b));
            }
        });
        Self { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Hold both ends open, forwarding nothing, until the test's runtime ends.
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed_on_both_sides() {
    let dir = TempDir::new("keepalive");
    let store = store(&dir);
    let app = echo_app().await;
    let quick = Limits {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let (server, stats, _drain, server_side) = bounded_server_on(
        listener,
        &store,
        &id("productpage"),
        Arc::new(Pod::default()),
        quick.clone(),
    );
    let relay = Relay::new(server).await;
    let client_side = Admission::new(quick);
    let pool = Pool::for_node(
        TlsDialer {
            store: store.clone(),
            tcp: Arc::new(PlainTcp),
        },
        Duration::from_secs(60),
        Arc::default(),
        client_side.clone(),
    );
    let key = key("sleep", "productpage", relay.addr);
    let tunnel = pool.open(&key, app, client_addr()).await.unwrap();
    // PINGs answered: the connection lives on past several intervals.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (sent, received) = echo_through(tunnel, 1024).await;
    assert_eq!(sent, received);
    let _held = pool.open(&key, app, client_addr()).await.unwrap();
    assert_eq!(
        client_side.stats.keepalive_failed.load(Ordering::Relaxed),
        0
    );

    relay.freeze();
    wait_for(|| server_side.stats.keepalive_failed.load(Ordering::Relaxed) == 1).await;
    wait_for(|| client_side.stats.keepalive_failed.load(Ordering::Relaxed) == 1).await;
    assert_eq!(
        pool.connections(&key).await,
        0,
        "the dead connection is not handed out"
    );
    wait_for(|| stats.closed.load(Ordering::Relaxed) == 1).await;
    wait_for(|| server_side.held() == (0, 0)).await;
}

/// Accepts TCP connections and never answers on them (a peer stuck before its handshake);
/// counts them.
async fn tarpit() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn tarpit_accepting(
    listener: TcpListener,
) -> (
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (accepted, task)
}

fn deadline_pool(
    store: &Arc<CertStore>,
    handshake: Duration,
    connect: Duration,
) -> Arc<Pool<TlsDialer>> {
    Pool::with_limits(
        TlsDialer {
            store: store.clone(),
            tcp: Arc::new(PlainTcp),
        },
        Duration::from_secs(30),
        Limits {
            handshake_timeout: handshake,
            connect_timeout: connect,
            ..Limits::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tarpit_peer_costs_its_callers_one_deadline_and_wedges_nothing() {
    let dir = TempDir::new("tarpit");
    let store = store(&dir);
    let app = echo_app().await;
    let (good, _) = hbone_server(&store, &id("productpage")).await;
    let (listener, stuck) = tarpit().await;
    let (accepted, tarpit_task) = tarpit_accepting(listener);
    let pool = deadline_pool(&store, Duration::from_millis(500), Duration::from_secs(1));
    let stuck_key = key("sleep", "productpage", stuck);

    let callers: Vec<_> = (0..10)
        .map(|_| {
            let (pool, key) = (pool.clone(), stuck_key.clone());
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let opened = pool.open(&key, app, client_addr()).await;
                (opened.map(drop), started.elapsed())
            })
        })
        .collect();
    // Another destination is served at once while they wait.
    let started = tokio::time::Instant::now();
    let tunnel = pool
        .open(&key("sleep", "productpage", good), app, client_addr())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    drop(tunnel);
    for caller in callers {
        let (opened, took) = tokio::time::timeout(WAIT, caller)
            .await
            .expect("a caller for the tarpit hung")
            .unwrap();
        let err = opened.unwrap_err();
        assert!(
            matches!(err, PoolError::TimedOut { .. }),
            "a clear timeout, not {err}"
        );
        assert!(
            err.to_string().contains("did not finish its handshake"),
            "{err}"
        );
        assert!(
            took < Duration::from_secs(2),
            "answered only after {took:?}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "ten callers for one key share one dial"
    );
    assert_eq!(
        pool.keys(),
        1,
        "the failed key leaves no slot behind; the good one keeps its connection"
    );

    // The peer recovers (a real HBONE server on the same address): the next caller gets in.
    tarpit_task.abort();
    let _ = tarpit_task.await;
    let listener = TcpListener::bind(stuck).await.unwrap();
    let _server = server_on(
        listener,
        &store,
        &id("productpage"),
        Arc::new(Pod::default()),
    );
    let tunnel = pool.open(&stuck_key, app, client_addr()).await.unwrap();
    let (sent, received) = echo_through(tunnel, 1024).await;
    assert_eq!(sent, received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_mid_dial_leaves_the_next_one_to_dial_afresh() {
    let dir = TempDir::new("cancelled-dial");
    let store = store(&dir);
    let (listener, stuck) = tarpit().await;
    let (accepted, _tarpit) = tarpit_accepting(listener);
    let pool = deadline_pool(&store, Duration::from_secs(60), Duration::from_secs(60));
    let key = key("sleep", "productpage", stuck);
    let app: SocketAddr = SocketAddr::new(host_ip(), 9);
    // The first caller dials and gives up (its client went away) mid-handshake.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        pool.open(&key, app, client_addr()),
    )
    .await;
    assert!(gave_up.is_err());
    wait_for(|| accepted.load(Ordering::SeqCst) == 1).await;
    // The next caller does not wait on the abandoned dial: it dials again at once.
    let second = {
        let (pool, key) = (pool.clone(), key.clone());
        tokio::spawn(async move { pool.open(&key, app, client_addr()).await.map(drop) })
    };
    wait_for(|| accepted.load(Ordering::SeqCst) == 2).await;
    second.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_mid_dial_abandon_their_dials_and_a_connection_runs_at_most_its_stream_limit()
{
    let dir = TempDir::new("reset-dials");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    let app = echo_app().await;
    let inbound = Arc::new(Pod::default());
    inbound.hang_dials.store(true, Ordering::SeqCst);
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let (server, _stats, _drain, admission) = bounded_server_on(
        listener,
        &store,
        &id("productpage"),
        inbound.clone(),
        Limits::default(),
    );
    let send = h2_as_sleep(&ca, server).await;
    // Ten rounds of a full connection's worth of CONNECTs, each reset once its dial started:
    // without the reset ending the dial, a thousand would be in flight on one connection.
    for round in 0..10 {
        let mut pending = Vec::new();
        for _ in 0..hbone::MAX_STREAMS {
            let mut ready = send.clone().ready().await.unwrap();
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(app.to_string())
                .body(())
                .unwrap();
            pending.push(ready.send_request(request, false).unwrap());
        }
        let want = hbone::MAX_STREAMS as usize;
        wait_for(|| inbound.dialling.load(Ordering::SeqCst) == want).await;
        drop(pending);
        let deadline = tokio::time::Instant::now() + WAIT;
        while inbound.dialling.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {} dials still run after their streams were reset",
                inbound.dialling.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(
        admission.stats.refused_streams.load(Ordering::Relaxed),
        0,
        "reset streams whose work ended leave room for new ones"
    );
    // Once the dials complete again, the connection still tunnels.
    inbound.hang_dials.store(false, Ordering::SeqCst);
    still_tunnels(&send, app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_into_an_app_that_never_reads_ends_when_its_connection_dies() {
    let dir = TempDir::new("stuck-app");
    let store = store(&dir);
    let ca = Ca::load(&dir.0).unwrap();
    // An app that accepts and never reads, handing its socket to the test.
    let app_listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let app = app_listener.local_addr().unwrap();
    let listener = TcpListener::bind((host_ip(), 0)).await.unwrap();
    let (server, stats, _drain, admission) = bounded_server_on(
        listener,
        &store,
        &id("productpage"),
        Arc::new(Pod::default()),
        Limits::default(),
    );
    let issued = ca.issue(&id("sleep"), Duration::from_secs(600)).unwrap();
    let tls = raw_client(
        server,
        &[&rustls::version::TLS13],
        Some((issued.chain, issued.key)),
    )
    .await
    .unwrap();
    let (send, conn) = hbone::client_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut tunnel = hbone::open_stream(send.clone(), app, client_addr())
        .await
        .unwrap();
    let (mut app_side, _) = app_listener.accept().await.unwrap();
    // Fill the app's receive buffer and the proxy's socket to it: the proxy's stream task is
    // now blocked writing to an app that does not read.
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..64 {
        if tokio::time::timeout(Duration::from_millis(200), tunnel.write_all(&chunk))
            .await
            .is_err()
        {
            break;
        }
    }
    // The peer vanishes: its connection is gone, and with it the permit.
    driver.abort();
    drop((tunnel, send));
    wait_for(|| admission.held() == (0, 0)).await;
    wait_for(|| stats.closed.load(Ordering::Relaxed) == 1).await;
    // The app sees its connection end: nothing of the dead connection lingers in the proxy.
    let mut sink = vec![0u8; 1 << 20];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, app_side.read(&mut sink)).await {
            Err(_) => panic!("the proxy still holds its connection to the app"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => {}
        }
    }
}

/// A connection's hundred streams, each quiet after a first exchange, still all carry their
/// next one: a quiet stream holds none of the connection's flow-control window (had each kept
/// what it reserved for a full copy buffer, the 16 MiB window would have run dry at 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_streams_leave_the_connection_window_to_the_ones_that_speak() {
    let dir = TempDir::new("quiet-streams");
    let store = store(&dir);
    let app = echo_app().await;
    let (server, _stats) = hbone_server(&store, &id("productpage")).await;
    let pool = pool(&store, Duration::from_secs(30));
    let key = key("sleep", "productpage", server);
    let mut tunnels = Vec::new();
    for _ in 0..hbone::MAX_STREAMS {
        tunnels.push(pool.open(&key, app, client_addr()).await.unwrap());
    }
    assert_eq!(
        pool.connections(&key).await,
        1,
        "one connection carries them all"
    );
    for round in 0..3 {
        for (i, tunnel) in tunnels.iter_mut().enumerate() {
            let message = format!("round {round} tunnel {i:03}");
            tunnel.write_all(message.as_bytes()).await.unwrap();
            let mut back = vec![0u8; message.len()];
            tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
                .await
                .unwrap_or_else(|_| panic!("tunnel {i} starved in round {round}"))
                .unwrap();
            assert_eq!(back, message.as_bytes());
        }
    }
}
