//! Hostile peers of the proxy: plaintext into a pod the agent handed over but the mesh file does
//! not list, HBONE CONNECTs the proxy itself never sends (its own ports, other addresses,
//! loopback), an impostor on the agent's socket, and an `add` carrying the node's own netns.
//! Each attack fails, the victim's legitimate traffic is unaffected, and a counter and a log
//! line name the refusal. The test plays the agent over ZDS (as `zds.rs` does) and, for HBONE,
//! a meshed peer with a valid certificate of the mesh.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use sluice_capture::Backend;
use sluice_capture::netns::Netns;
use sluice_lab::WAIT;
use sluice_lab::app::{self, Outcome, ProcessGuard};
use sluice_lab::lab::{DirGuard, Lab, PEER_IP, PEER_IP6, POD_IP, POD_IP6};
use sluice_lab::proxy::ProxyProcess;
use sluice_proxy::ca::Ca;
use sluice_proxy::hbone::OpenError;
use sluice_proxy::identity::Identity;
use sluice_proxy::pool::{BoxFuture, Pool, PoolError, PoolKey, TcpConnect, TlsDialer};
use sluice_proxy::tls::CertStore;
use sluice_zds::messages::workload_request::Payload;
use sluice_zds::messages::*;
use sluice_zds::{Channel, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The namespace and service account the agent (the test) names for the pod.
const NAMESPACE: &str = "shop";
const ACCOUNT: &str = "cart";
const APP_PORT: u16 = 8080;
const TRUST_DOMAIN: &str = "cluster.local";
/// `nobody`: the impostor's user.
const NOBODY: u32 = 65534;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((POD_IP, port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((POD_IP6, port))
}

fn identity(namespace: &str, account: &str) -> Result<Identity> {
    Ok(Identity::new(TRUST_DOMAIN, namespace, account)?)
}

/// One node: the lab's pod (IPv4 and IPv6) captured, its app on 8080 at both addresses, and the
/// real proxy serving it as the test hands it over. Field order is drop order: processes first,
/// then the hand-off socket, then the files, then the lab.
struct Node {
    proxy: ProxyProcess,
    _app: ProcessGuard,
    agent: Option<Channel>,
    listener: Option<Listener>,
    dir: DirGuard,
    lab: Lab,
}

impl Node {
    /// Starts the node; with `mesh` (the mesh file's `workloads:` and `policies:` YAML) the proxy
    /// gets a CA and a mesh file, else it passes traffic through.
    fn start(backend: Backend, mesh: Option<(&str, &str)>) -> Result<Self> {
        let mut lab = Lab::new(backend)?;
        lab.add_ipv6()?;
        lab.capture()?;
        let dir = DirGuard::new(&format!("sluice-{}-hostile", lab.id))?;
        // The agent's socket lives in a directory of its own, which `bind` creates 0700.
        let socket = dir.0.join("zds").join("zds.sock");
        let listener = Listener::bind(&socket)?;
        let mut args = vec!["--zds-socket".to_owned(), path_arg(&socket)?];
        if let Some((workloads, policies)) = mesh {
            Ca::create(&dir.0.join("ca"))?;
            write_mesh(&dir.0.join("mesh.yaml"), workloads, policies)?;
            args.extend([
                "--mesh-config".to_owned(),
                path_arg(&dir.0.join("mesh.yaml"))?,
                "--ca-dir".to_owned(),
                path_arg(&dir.0.join("ca"))?,
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let app = app::spawn_server(&lab.in_pod(), &[v4(APP_PORT), v6(APP_PORT)])?;
        let proxy = ProxyProcess::spawn(&[], &lab.proxy_cgroup.path, &lab.pin_root(), &args)?;
        // The proxy is ready once its hello is sent: its connection waits in the backlog.
        let agent = listener.accept()?;
        agent.set_timeout(Some(WAIT))?;
        let hello: ZdsHello = agent.recv()?.decode()?;
        ensure!(hello.version == Version::V1 as i32, "hello: {hello:?}");
        let node = Self {
            proxy,
            _app: app,
            agent: Some(agent),
            listener: Some(listener),
            dir,
            lab,
        };
        node.hand_over()?;
        Ok(node)
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("zds").join("zds.sock")
    }

    fn agent(&self) -> Result<&Channel> {
        self.agent
            .as_ref()
            .context("the test holds no agent connection")
    }

    /// Sends a request as the agent; returns the ack's error ("" = done).
    fn ask(&self, payload: Payload, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Result<String> {
        let agent = self.agent()?;
        agent.send(
            &WorkloadRequest {
                payload: Some(payload),
            },
            fd,
        )?;
        let response: WorkloadResponse = agent.recv().context("await the ack")?.decode()?;
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) => Ok(ack.error),
            None => bail!("a response without an ack"),
        }
    }

    /// Hands the pod over as the agent does (its netns, namespace and service account), then
    /// says the snapshot is complete.
    fn hand_over(&self) -> Result<()> {
        let netns = std::fs::File::open(self.lab.pod_ns.path())?;
        let added = self.ask(add(&self.lab.pod.uid.to_string()), Some(netns.as_fd()))?;
        ensure!(added.is_empty(), "the pod's add was refused: {added}");
        let done = self.ask(Payload::SnapshotSent(SnapshotSent {}), None)?;
        ensure!(done.is_empty(), "snapshot_sent was refused: {done}");
        Ok(())
    }

    /// Replaces the mesh file and waits until the proxy has reloaded it.
    fn set_mesh(&self, workloads: &str, policies: &str) -> Result<()> {
        let seen = self.proxy.count_log(&["mesh reloaded"]);
        write_mesh(&self.dir.0.join("mesh.yaml"), workloads, policies)?;
        self.proxy.wait_for_log_lines(&["mesh reloaded"], seen + 1)
    }

    /// A plaintext client on the peer host, outside the mesh.
    fn plaintext(&self, to: SocketAddr) -> Result<Outcome> {
        app::run_client(&self.lab.in_peer(), to, 16 * 1024)
    }

    fn plaintext_works(&self, to: SocketAddr) -> Result<()> {
        let outcome = self.plaintext(to)?;
        ensure!(
            outcome.ok && outcome.echoed == 16 * 1024,
            "plaintext to {to} must work: {outcome:?}"
        );
        Ok(())
    }

    /// The sum of the proxy's series `name` with all of `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> Result<u64> {
        let (status, text) = self.proxy.get("metrics", "/metrics")?;
        ensure!(status == 200, "metrics answered {status}");
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}

fn path_arg(path: &Path) -> Result<String> {
    Ok(path.to_str().context("a lab path is not UTF-8")?.to_owned())
}

fn add(uid: &str) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.to_owned(),
        workload_info: Some(WorkloadInfo {
            name: "victim".into(),
            namespace: NAMESPACE.into(),
            service_account: ACCOUNT.into(),
        }),
    })
}

/// Writes the mesh file whole (the lab's writer: aside, then renamed).
fn write_mesh(path: &Path, workloads: &str, policies: &str) -> Result<()> {
    let yaml = format!("trustDomain: {TRUST_DOMAIN}\nworkloads:{workloads}\n");
    sluice_lab::cluster::write_mesh_file(yaml, policies, path)
}

/// A meshed peer on the peer host, with a valid certificate of the mesh, sending hand-made
/// CONNECTs: the real pool and TLS (which check that they reached the pod's identity), none of
/// the real proxy's restraint about what a CONNECT may name.
struct Peer {
    runtime: tokio::runtime::Runtime,
    pool: Arc<Pool<TlsDialer>>,
    me: Identity,
    pod: Identity,
}

/// TCP from the peer host's netns.
struct PeerTcp(Netns);

impl TcpConnect for PeerTcp {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<tokio::net::TcpStream>> {
        Box::pin(sluice_proxy::socket::connect_in(&self.0, addr))
    }
}

impl Peer {
    /// A peer of service account `account` in `namespace`, tunnelling to the lab's pod.
    fn new(node: &Node, namespace: &str, account: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = CertStore::new(Ca::load(&node.dir.0.join("ca"))?, Duration::from_secs(3600))?;
        let tcp = PeerTcp(Netns::open(node.lab.peer_ns.path())?);
        let pool = Pool::new(
            TlsDialer {
                store,
                tcp: Arc::new(tcp),
            },
            Duration::from_secs(60),
        );
        Ok(Self {
            runtime,
            pool,
            me: identity(namespace, account)?,
            pod: identity(NAMESPACE, ACCOUNT)?,
        })
    }

    /// `CONNECT target` through the pod's HBONE listener at `via`: `Ok(Ok(()))` once bytes went
    /// to the app and came back, `Ok(Err(status))` when the proxy refused the stream.
    fn connect(&self, via: SocketAddr, target: SocketAddr) -> Result<Result<(), u16>> {
        let key = PoolKey {
            source: self.me.clone(),
            destination: self.pod.clone(),
            addr: via,
        };
        let source = match via.ip() {
            IpAddr::V4(_) => SocketAddr::from((PEER_IP, 40000)),
            IpAddr::V6(_) => SocketAddr::from((PEER_IP6, 40000)),
        };
        self.runtime.block_on(async {
            let opened = tokio::time::timeout(WAIT, self.pool.open(&key, target, source))
                .await
                .with_context(|| format!("CONNECT {target} via {via}: no answer within {WAIT:?}"))?;
            let mut tunnel = match opened {
                Ok(tunnel) => tunnel,
                Err(PoolError::Open(OpenError::Status(status))) => return Ok(Err(status.as_u16())),
                Err(e) => return Err(e).context(format!("CONNECT {target} via {via}")),
            };
            // The app greets with the peer it saw, then echoes.
            let mut back = Vec::new();
            let exchange = async {
                tunnel.write_all(b"ping").await?;
                tunnel.shutdown().await?;
                tunnel.read_to_end(&mut back).await
            };
            tokio::time::timeout(WAIT, exchange)
                .await
                .with_context(|| format!("CONNECT {target} via {via}: the tunnel went silent"))?
                .with_context(|| format!("CONNECT {target} via {via}: the tunnel broke"))?;
            let back = String::from_utf8_lossy(&back);
            ensure!(
                back.starts_with("peer=") && back.ends_with("ping"),
                "CONNECT {target} via {via} opened a tunnel to something that is not the app: {back:?}"
            );
            Ok(Ok(()))
        })
    }

    /// A legitimate tunnel to the pod's app works.
    fn tunnels(&self, via: SocketAddr, target: SocketAddr) -> Result<()> {
        match self.connect(via, target)? {
            Ok(()) => Ok(()),
            Err(status) => {
                bail!("CONNECT {target} via {via} must work, the proxy answered {status}")
            }
        }
    }

    /// The proxy answers `status` to `CONNECT target` through `via`.
    fn refused(&self, via: SocketAddr, target: SocketAddr, status: u16) -> Result<()> {
        match self.connect(via, target)? {
            Err(got) if got == status => Ok(()),
            Err(got) => bail!("CONNECT {target} via {via}: wanted {status}, got {got}"),
            Ok(()) => bail!("CONNECT {target} via {via} must be refused ({status}), it tunnelled"),
        }
    }
}

const STRICT_MESH_WIDE: &str = r#"- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec: {mtls: {mode: STRICT}}
"#;

/// ALLOW only: namespace-wide (it selects every workload of `shop`, labels or not).
const ALLOW_FRONTEND: &str = r#"- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: frontend-only, namespace: shop}
  spec:
    action: ALLOW
    rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
"#;

/// ALLOW only, for the workloads labelled `app: cart`: the handed-over pod's labels are unknown.
const ALLOW_FRONTEND_TO_CART: &str = r#"- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: frontend-to-cart, namespace: shop}
  spec:
    selector: {matchLabels: {app: cart}}
    action: ALLOW
    rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
"#;

/// Plaintext to `to` is reset by policy, and the proxy logs which policy.
fn plaintext_denied(node: &Node, to: SocketAddr, policy: &str) -> Result<()> {
    let dst = format!("dst={to}");
    let policy = format!("policy=\"{policy}");
    let line = ["plaintext connection denied by policy", &dst, &policy];
    let seen = node.proxy.count_log(&line);
    let outcome = node.plaintext(to)?;
    ensure!(
        !outcome.ok,
        "plaintext to {to} must be refused: {outcome:?}"
    );
    node.proxy.wait_for_log_lines(&line, seen + 1)
}

pub fn plaintext_to_a_handed_over_pod_missing_from_the_mesh_file_is_refused_under_strict_and_allow_only(
    backend: Backend,
) -> Result<()> {
    // The chart's default: `workloads: []`. The pod is meshed only because the agent handed it
    // over, with its namespace and service account.
    let node = Node::start(backend, Some((" []", "")))?;
    let frontend = Peer::new(&node, NAMESPACE, "frontend")?;
    // No policy yet: plaintext passes.
    for to in [v4(APP_PORT), v6(APP_PORT)] {
        node.plaintext_works(to)?;
    }

    // Mesh-wide STRICT: plaintext is refused; a meshed peer still tunnels to the pod's own
    // identity (the one the agent named).
    node.set_mesh(" []", STRICT_MESH_WIDE)?;
    for to in [v4(APP_PORT), v6(APP_PORT)] {
        plaintext_denied(
            &node,
            to,
            "istio-system/default (PeerAuthentication STRICT)",
        )?;
    }
    frontend.tunnels(v4(15008), v4(APP_PORT))?;
    frontend.tunnels(v6(15008), v6(APP_PORT))?;
    ensure!(
        node.metric("sluice_proxy_connections_total", &["outcome=\"denied\""])? == 2,
        "both plaintext attempts are counted as denied"
    );

    // ALLOW-only for the namespace: plaintext has no principal, so nothing allows it; the
    // allowed peer still tunnels, another peer of the mesh gets 401.
    node.set_mesh(" []", ALLOW_FRONTEND)?;
    for to in [v4(APP_PORT), v6(APP_PORT)] {
        plaintext_denied(&node, to, "no ALLOW policy matched")?;
    }
    frontend.tunnels(v4(15008), v4(APP_PORT))?;
    frontend.tunnels(v6(15008), v6(APP_PORT))?;
    let intruder = Peer::new(&node, NAMESPACE, "intruder")?;
    intruder.refused(v4(15008), v4(APP_PORT), 401)?;

    // An ALLOW selecting by labels: the pod's are unknown, so it may select the pod but
    // cannot grant anything: closed for plaintext and tunnels alike, and the log says why.
    node.set_mesh(" []", ALLOW_FRONTEND_TO_CART)?;
    plaintext_denied(&node, v4(APP_PORT), "no ALLOW policy matched")?;
    frontend.refused(v4(15008), v4(APP_PORT), 401)?;
    node.proxy.wait_for_log(&[
        "connection denied by policy (401)",
        "shop/frontend-to-cart would allow",
        "labels are unknown",
    ])?;
    ensure!(
        node.metric("sluice_proxy_connections_total", &["outcome=\"denied\""])? == 5,
        "every denied plaintext attempt is counted"
    );
    ensure!(
        node.metric("sluice_hbone_server_total", &["outcome=\"denied\""])? == 2,
        "every denied tunnel is counted"
    );
    Ok(())
}

/// The pod as the control plane lists it: an HBONE workload at both its addresses.
fn listed_pod(lab: &Lab) -> String {
    format!(
        r#"
  - uid: {}
    name: victim
    namespace: {NAMESPACE}
    serviceAccount: {ACCOUNT}
    ips: [{POD_IP}, "{POD_IP6}"]
    protocol: HBONE
    labels: {{app: cart}}"#,
        lab.pod.uid
    )
}

pub fn hbone_connects_to_proxy_ports_other_addresses_and_loopback_get_400(
    backend: Backend,
) -> Result<()> {
    // Listed in the mesh file at both addresses (once the lab has named the pod) and handed
    // over, as on a cluster.
    let node = Node::start(backend, Some((" []", "")))?;
    node.set_mesh(&listed_pod(&node.lab), "")?;
    // Peer-side servers: what a relay through the pod would reach.
    let _peer_app = app::spawn_server(
        &node.lab.in_peer(),
        &[
            SocketAddr::from((PEER_IP, APP_PORT)),
            SocketAddr::from((PEER_IP6, APP_PORT)),
        ],
    )?;
    let attacker = Peer::new(&node, "other", "attacker")?;
    attacker.tunnels(v4(15008), v4(APP_PORT))?;
    attacker.tunnels(v6(15008), v6(APP_PORT))?;

    let loopback4 = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, APP_PORT));
    let loopback6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, APP_PORT));
    let cases: [(SocketAddr, SocketAddr, &str); 12] = [
        // A nested tunnel, the outbound capture, the inbound capture: the proxy itself.
        (v4(15008), v4(15008), "a port of the proxy itself"),
        (v4(15008), v4(15001), "a port of the proxy itself"),
        (v4(15008), v4(15006), "a port of the proxy itself"),
        (v6(15008), v6(15008), "a port of the proxy itself"),
        (v6(15008), v6(15001), "a port of the proxy itself"),
        (v6(15008), v6(15006), "a port of the proxy itself"),
        // Somewhere else: the peer's own host, and the pod's other address.
        (
            v4(15008),
            SocketAddr::from((PEER_IP, APP_PORT)),
            "not the address the tunnel arrived on",
        ),
        (
            v4(15008),
            v6(APP_PORT),
            "not the address the tunnel arrived on",
        ),
        (
            v6(15008),
            SocketAddr::from((PEER_IP6, APP_PORT)),
            "not the address the tunnel arrived on",
        ),
        (
            v6(15008),
            v4(APP_PORT),
            "not the address the tunnel arrived on",
        ),
        // Loopback: whatever the pod keeps there.
        (v4(15008), loopback4, "loopback"),
        (v6(15008), loopback6, "loopback"),
    ];
    for (via, target, reason) in cases {
        attacker.refused(via, target, 400)?;
        let logged = format!("target={target}");
        node.proxy
            .wait_for_log(&["HBONE target refused (400)", &logged, reason])?;
    }
    for (outcome, count) in [("proxy_port", 6), ("not_local", 4), ("special_address", 2)] {
        let label = format!("outcome=\"{outcome}\"");
        let got = node.metric("sluice_hbone_server_total", &[&label])?;
        ensure!(
            got == count,
            "sluice_hbone_server_total{{{label}}} is {got}, wanted {count}"
        );
    }
    // The victim is unaffected: tunnels and plaintext still reach its app, on both families.
    attacker.tunnels(v4(15008), v4(APP_PORT))?;
    attacker.tunnels(v6(15008), v6(APP_PORT))?;
    node.plaintext_works(v4(APP_PORT))?;
    node.plaintext_works(v6(APP_PORT))?;
    ensure!(
        node.metric("sluice_hbone_server_total", &["outcome=\"tunnelled\""])? == 4,
        "only the legitimate tunnels were carried"
    );
    Ok(())
}

/// The agent's socket path taken over by an impostor: bound by root (the directory is root's
/// alone) but listening as `nobody`, so a connection to it reports an unprivileged listener
/// (`SO_PEERCRED`), as a socket a non-root process put there would. Removed on drop.
struct Impostor {
    fd: OwnedFd,
    path: PathBuf,
    pid: u32,
}

impl Impostor {
    fn bind(path: &Path) -> Result<Self> {
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        ensure!(bytes.len() < addr.sun_path.len(), "socket path too long");
        for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        // SAFETY: socket(2), then bind(2) with a valid sockaddr_un of length len; the fd is
        // owned right after it is made. Non-blocking: the test's accept must never wait.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error()).context("impostor socket");
            }
            let fd = OwnedFd::from_raw_fd(raw);
            if libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) != 0 {
                return Err(io::Error::last_os_error()).context("bind the impostor socket");
            }
            fd
        };
        let raw = fd.as_raw_fd();
        let mut cmd = std::process::Command::new("true");
        // SAFETY: between fork and exec the closure makes only raw system calls on values
        // copied before the fork, as a forked child of a threaded process must.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                    || libc::listen(raw, 16) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("listen as nobody")?;
        let pid = child.id();
        let mut child = ProcessGuard {
            child,
            name: "impostor listen".into(),
        };
        ensure!(
            child.child.wait()?.success(),
            "the impostor's listen failed"
        );
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            pid,
        })
    }

    /// What the first connection to the impostor sent before it closed: nothing, if the
    /// proxy refused it at once.
    fn first_connection_sent(&self) -> Result<usize> {
        // SAFETY: accept4 on our own non-blocking listener; the fd is owned right after.
        let conn = unsafe {
            let raw = libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error()).context("no connection to the impostor");
            }
            OwnedFd::from_raw_fd(raw)
        };
        let timeout = libc::timeval {
            tv_sec: WAIT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        let mut buf = [0u8; 1024];
        // SAFETY: setsockopt with a timeval of its size, then recv into a buffer of its size,
        // on a socket we own.
        let n = unsafe {
            libc::setsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            libc::recv(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("read from the proxy's connection");
        }
        Ok(n as usize)
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn the_proxy_refuses_an_agent_socket_whose_listener_is_not_root(
    backend: Backend,
) -> Result<()> {
    let mut node = Node::start(backend, None)?;
    node.plaintext_works(v4(APP_PORT))?;
    let connected = node.proxy.count_log(&["connected to the agent"]);

    // The agent goes away and an unprivileged process takes its socket's place.
    node.listener = None;
    let impostor = Impostor::bind(&node.socket())?;
    node.agent = None;
    let pid = format!("peer_pid={}", impostor.pid);
    let uid = format!("peer_uid={NOBODY}");
    node.proxy
        .wait_for_log(&["refused the hand-off socket", &pid, &uid])?;
    ensure!(
        node.metric("sluice_zds_refused_total", &["reason=\"peer_not_root\""])? >= 1,
        "the refusal is counted"
    );
    ensure!(
        impostor.first_connection_sent()? == 0,
        "the proxy must not say anything to a listener that is not root"
    );
    ensure!(
        node.proxy.count_log(&["connected to the agent"]) == connected,
        "the proxy must not take the impostor for its agent"
    );
    // Meanwhile the pod is served as before, on both families.
    node.plaintext_works(v4(APP_PORT))?;
    node.plaintext_works(v6(APP_PORT))?;

    // The real agent comes back: the proxy reconnects, takes its snapshot, and serves on.
    drop(impostor);
    let listener = Listener::bind(&node.socket())?;
    node.proxy
        .wait_for_log_lines(&["connected to the agent"], connected + 1)?;
    let agent = listener.accept()?;
    agent.set_timeout(Some(WAIT))?;
    let hello: ZdsHello = agent.recv()?.decode()?;
    ensure!(hello.version == Version::V1 as i32, "hello: {hello:?}");
    node.listener = Some(listener);
    node.agent = Some(agent);
    node.hand_over()?;
    node.plaintext_works(v4(APP_PORT))?;
    Ok(())
}

pub fn the_proxy_refuses_an_add_carrying_the_nodes_own_netns(backend: Backend) -> Result<()> {
    let node = Node::start(backend, None)?;
    // The node's netns: this test runs in it, as the proxy does.
    let own = std::fs::File::open("/proc/thread-self/ns/net")?;
    let refused = node.ask(add("pod-on-the-node"), Some(own.as_fd()))?;
    ensure!(
        refused.contains("node's own"),
        "an add carrying the node's netns must be refused: ack {refused:?}"
    );
    node.proxy.wait_for_log(&[
        "refused an add carrying the node's own netns",
        "pod-on-the-node",
    ])?;
    ensure!(
        node.metric("sluice_zds_refused_total", &["reason=\"node_netns\""])? == 1,
        "the refusal is counted"
    );
    // Nothing of it is served: no listeners on the node, the config dump does not list it.
    let (_, dump) = node.proxy.get("admin", "/config_dump")?;
    ensure!(!dump.contains("pod-on-the-node"), "served anyway: {dump}");
    for port in [15001, 15006] {
        let addr = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        ensure!(
            std::net::TcpStream::connect_timeout(&addr, WAIT).is_err(),
            "something listens on the node's {addr}"
        );
    }
    // The victim is unaffected: still served, the proxy still ready, the agent still heard.
    node.plaintext_works(v4(APP_PORT))?;
    node.plaintext_works(v6(APP_PORT))?;
    let (status, body) = node.proxy.get("readiness", "/healthz/ready")?;
    ensure!(status == 200, "readiness {status}: {body}");
    node.hand_over()?;
    Ok(())
}
