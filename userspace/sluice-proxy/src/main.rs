//! `sluice-proxy`: the node proxy. Serves each enrolled pod from listeners inside the pod's
//! netns and carries its captured connections: through HBONE (mutual TLS, HTTP/2 CONNECT) to
//! meshed workloads when given a mesh file and a CA, by plain passthrough otherwise.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sluice_capture::inbound_map::{InboundSocketMap, ProxyDials};
use sluice_capture::netns::Netns;
use sluice_capture::{DEFAULT_PIN_ROOT, PodUid};
use tracing::{info, warn};

use sluice_proxy::admin::{self, Endpoints, Port, Readiness};
use sluice_proxy::copy::CopyMode;
use sluice_proxy::hbone::ServerStats;
use sluice_proxy::inpod::{Carry, HandedOver, MeshContext, PodProxy};
use sluice_proxy::limits::{Admission, Limits};
use sluice_proxy::mesh::MeshWatch;
use sluice_proxy::route::Balancer;
use sluice_proxy::stats::Stats;
use sluice_proxy::tls::CertStore;
use sluice_proxy::zds;

/// sluice's node proxy: captured pod traffic in, original destinations out.
#[derive(Parser, Debug)]
#[command(name = "sluice-proxy", version)]
struct Args {
    /// A pod to serve, as UID=NETNS_PATH (repeatable). The CNI agent hand-off replaces this.
    #[arg(long = "pod", value_parser = parse_pod, env = "SLUICE_PODS", value_delimiter = ' ')]
    pods: Vec<(PodUid, PathBuf)>,

    /// The agent's hand-off socket (ZDS protocol): pods arrive and leave as the agent says,
    /// each with its netns fd. With it, --pod is optional.
    #[arg(long, env = "SLUICE_ZDS_SOCKET")]
    zds_socket: Option<PathBuf>,

    /// The cgroup v2 directory to run in. With eBPF capture this is where the agent attached
    /// the SO_ORIGINAL_DST emulation; the proxy joins it before creating any socket.
    #[arg(long, env = "SLUICE_PROXY_CGROUP")]
    cgroup: Option<PathBuf>,

    /// Where the eBPF capture is pinned (to register inbound listeners); ignored when nothing
    /// is pinned there (iptables capture).
    #[arg(long, default_value = DEFAULT_PIN_ROOT, env = "SLUICE_PIN_ROOT")]
    pin_root: PathBuf,

    /// How bytes are moved between the two sockets of a connection.
    #[arg(long, value_enum, default_value_t = CopyMode::Splice, env = "SLUICE_COPY")]
    copy: CopyMode,

    /// Whether apps see the client's address on inbound connections (plaintext on 15006 and
    /// HBONE on 15008), as without a mesh; `false`: they see the pod's own address. Needs
    /// CAP_NET_ADMIN and the capture's reply routing (the agent sets it up); where either is
    /// missing, connections go from the pod's address and are counted as
    /// `source_not_preserved`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "SLUICE_PRESERVE_SOURCE")]
    preserve_source: bool,

    /// The mesh file (workloads, services, policies; see `mesh.rs`). With it, connections
    /// between meshed workloads go through HBONE with mutual TLS; without it, everything is
    /// passed through. Re-read when it changes.
    #[arg(long, env = "SLUICE_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,

    /// Also take Istio's AuthorizationPolicy and PeerAuthentication objects from the Kubernetes
    /// API (in-cluster service account or kubeconfig), next to the mesh file's. Until they are
    /// listed, nothing is allowed.
    #[arg(long, requires = "mesh_config", env = "SLUICE_KUBE_POLICIES")]
    kube_policies: bool,

    /// The CA directory (root-cert.pem, root-key.pem, optional trust-bundle.pem); needed with
    /// --mesh-config.
    #[arg(long, env = "SLUICE_CA_DIR")]
    ca_dir: Option<PathBuf>,

    /// Create a new mesh CA in --ca-dir and exit (refuses to overwrite one).
    #[arg(long, requires = "ca_dir")]
    init_ca: bool,

    /// Lifetime of the workload certificates the CA issues; each is renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "SLUICE_CERT_LIFETIME")]
    cert_lifetime: std::time::Duration,

    /// On SIGTERM, how long open connections may carry on (HBONE peers get GOAWAY at once)
    /// before the rest are cut.
    #[arg(long, default_value = "10s", value_parser = parse_drain, env = "SLUICE_DRAIN_TIMEOUT")]
    drain_timeout: std::time::Duration,

    /// Prometheus metrics (`/metrics`), Istio's port.
    #[arg(long, default_value = "0.0.0.0:15020", env = "SLUICE_METRICS_ADDR")]
    metrics_addr: std::net::SocketAddr,

    /// Readiness (`/healthz/ready`), Istio's port.
    #[arg(long, default_value = "0.0.0.0:15021", env = "SLUICE_READINESS_ADDR")]
    readiness_addr: std::net::SocketAddr,

    /// Admin (`/config_dump`, `POST /logging?level=`); loopback only.
    #[arg(long, default_value = "127.0.0.1:15000", env = "SLUICE_ADMIN_ADDR")]
    admin_addr: std::net::SocketAddr,

    /// An HBONE connection's TLS + HTTP/2 handshake, on either side, must be done within this.
    #[arg(long, default_value = "10s", value_parser = parse_bound, env = "SLUICE_HBONE_HANDSHAKE_TIMEOUT")]
    hbone_handshake_timeout: std::time::Duration,

    /// An outbound tunnel (a pooled connection or a new one, and the CONNECT's answer) must be
    /// open within this, or the captured connection is closed.
    #[arg(long, default_value = "15s", value_parser = parse_bound, env = "SLUICE_HBONE_CONNECT_TIMEOUT")]
    hbone_connect_timeout: std::time::Duration,

    /// A 15008 connection that has carried no stream for this long is closed (GOAWAY).
    #[arg(long, default_value = "5m", value_parser = parse_bound, env = "SLUICE_HBONE_IDLE_TIMEOUT")]
    hbone_idle_timeout: std::time::Duration,

    /// A pooled outbound HBONE connection with no stream for this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_bound, env = "SLUICE_POOL_IDLE_TIMEOUT")]
    pool_idle_timeout: std::time::Duration,

    /// HBONE connections PING their peer this often; one not answered within
    /// --hbone-keepalive-timeout closes the connection.
    #[arg(long, default_value = "30s", value_parser = parse_bound, env = "SLUICE_HBONE_KEEPALIVE_INTERVAL")]
    hbone_keepalive_interval: std::time::Duration,

    #[arg(long, default_value = "10s", value_parser = parse_bound, env = "SLUICE_HBONE_KEEPALIVE_TIMEOUT")]
    hbone_keepalive_timeout: std::time::Duration,

    /// TCP_USER_TIMEOUT (and the TCP keepalive idle time) of HBONE sockets.
    #[arg(long, default_value = "30s", value_parser = parse_bound, env = "SLUICE_TCP_USER_TIMEOUT")]
    tcp_user_timeout: std::time::Duration,

    /// Connections the proxy holds at once, every pod and listener together; lowered to fit
    /// the open-file limit.
    #[arg(long, default_value_t = sluice_proxy::limits::DEFAULT_MAX_CONNECTIONS, value_parser = parse_count, env = "SLUICE_MAX_CONNECTIONS")]
    max_connections: usize,

    /// Connections served in one pod at once (its outbound and everything into it).
    #[arg(long, default_value_t = 16_384, value_parser = parse_count, env = "SLUICE_MAX_CONNECTIONS_PER_POD")]
    max_connections_per_pod: usize,

    /// Connections one source address may hold into one pod (or a pod's own outbound) at once;
    /// loopback sources count as one.
    #[arg(long, default_value_t = 4096, value_parser = parse_count, env = "SLUICE_MAX_CONNECTIONS_PER_SOURCE")]
    max_connections_per_source: usize,

    /// 15008 connections still in their handshake, node-wide.
    #[arg(long, default_value_t = 1024, value_parser = parse_count, env = "SLUICE_MAX_HANDSHAKES")]
    max_handshakes: usize,

    /// 15008 connections of one source address still in their handshake.
    #[arg(long, default_value_t = 64, value_parser = parse_count, env = "SLUICE_MAX_HANDSHAKES_PER_SOURCE")]
    max_handshakes_per_source: usize,

    /// New 15008 handshakes one source address may start per second (twice that in a burst).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "SLUICE_HANDSHAKE_RATE_PER_SOURCE")]
    handshake_rate_per_source: u32,

    /// New handshakes one pod's 15008 accepts per second from all sources (twice that in a
    /// burst).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "SLUICE_HANDSHAKE_RATE_PER_POD")]
    handshake_rate_per_pod: u32,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "SLUICE_LOG_JSON")]
    log_json: bool,

    /// Validate the arguments, print the effective configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn parse_pod(arg: &str) -> Result<(PodUid, PathBuf), String> {
    let (uid, netns) = arg.split_once('=').ok_or_else(|| {
        format!("{arg:?}: expected UID=NETNS_PATH, e.g. pod-1=/var/run/netns/pod-1")
    })?;
    let uid = PodUid::parse(uid).map_err(|e| e.to_string())?;
    if netns.is_empty() {
        return Err(format!("{arg:?}: the netns path is empty"));
    }
    Ok((uid, PathBuf::from(netns)))
}

/// `0s` .. `300s`.
fn parse_drain(arg: &str) -> Result<std::time::Duration, String> {
    let secs: u64 = arg
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{arg:?}: expected seconds, e.g. 10s"))?;
    if secs > 300 {
        return Err(format!("{arg:?}: at most 300s"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// A bound on a number of connections: 1 .. 2^24.
fn parse_count(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if (1..=1 << 24).contains(&n) => Ok(n),
        _ => Err(format!("{arg:?}: expected a count from 1 to 16777216")),
    }
}

/// A deadline: `500ms`, `10s`, `5m`, `1h`; more than zero, at most a day.
fn parse_bound(arg: &str) -> Result<std::time::Duration, String> {
    let split = arg.find(|c: char| !c.is_ascii_digit()).unwrap_or(arg.len());
    let (n, unit) = arg.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{arg:?}: expected a duration, e.g. 500ms, 10s or 5m"))?;
    let millis = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("{arg:?}: the unit must be ms, s, m or h")),
    };
    if millis == 0 || millis > 86_400_000 {
        return Err(format!("{arg:?}: must be more than 0 and at most 24h"));
    }
    Ok(std::time::Duration::from_millis(millis))
}

/// `90s`, `15m`, `24h`.
fn parse_duration(arg: &str) -> Result<std::time::Duration, String> {
    let split = arg.find(|c: char| !c.is_ascii_digit()).unwrap_or(arg.len());
    let (n, unit) = arg.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{arg:?}: expected e.g. 90s, 15m or 24h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{arg:?}: the unit must be s, m or h")),
    };
    if secs < 60 {
        return Err(format!("{arg:?}: certificates must live at least a minute"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (_log_guard, set_log_level) = init_logging(args.log_json);
    if args.init_ca {
        let dir = args.ca_dir.as_deref().context("--init-ca needs --ca-dir")?;
        sluice_proxy::ca::Ca::create(dir)?;
        println!("created a mesh CA in {}", dir.display());
        return Ok(());
    }
    info!(pods = args.pods.len(), cgroup = ?args.cgroup, pin_root = %args.pin_root.display(), copy = ?args.copy, preserve_source = args.preserve_source, "effective configuration");
    if args.check_config {
        return Ok(());
    }
    raise_nofile_limit();
    // Before any thread or socket exists: a socket belongs to the cgroup it was created in.
    if let Some(cgroup) = &args.cgroup {
        sluice_capture::cgroup::join(cgroup, std::process::id())
            .with_context(|| format!("join cgroup {}", cgroup.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, set_log_level))
}

async fn run(args: Args, set_log_level: admin::SetLogLevel) -> Result<()> {
    let stats = Arc::new(Stats::default());
    let mesh = match &args.mesh_config {
        Some(path) => {
            let ca_dir = args
                .ca_dir
                .as_deref()
                .context("--mesh-config needs --ca-dir (create one with --init-ca --ca-dir DIR)")?;
            let ca = sluice_proxy::ca::Ca::load(ca_dir)?;
            let watch = MeshWatch::load(path)?;
            watch.spawn_reloader(std::time::Duration::from_millis(500));
            if args.kube_policies {
                let client = kube::Client::try_default().await.context(
                    "--kube-policies: create the Kubernetes client (from the in-cluster service \
                     account, else $KUBECONFIG or ~/.kube/config); drop the flag to use the mesh \
                     file's policies only",
                )?;
                watch.expect_external_policies();
                tokio::spawn(sluice_proxy::kube_policies::run(client, watch.clone()));
            }
            Some(Arc::new(MeshContext {
                mesh: watch,
                certs: CertStore::new(ca, args.cert_lifetime)?,
                hbone: Arc::new(ServerStats::default()),
                balancer: Balancer::default(),
                idle_timeout: args.pool_idle_timeout,
            }))
        }
        None => None,
    };
    let admission = Admission::new(limits(&args));
    tokio::spawn(sluice_proxy::limits::trim_memory_when_connections_fall(
        admission.clone(),
    ));
    let readiness = Arc::new(Readiness::default());
    let served = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let endpoints = Arc::new(Endpoints {
        stats: stats.clone(),
        mesh: mesh.clone(),
        pin_root: args.pin_root.clone(),
        readiness: readiness.clone(),
        served: served.clone(),
        set_log_level,
        admission: admission.clone(),
    });
    let mut bound = Vec::new();
    for (addr, port) in [
        (args.metrics_addr, Port::Metrics),
        (args.readiness_addr, Port::Readiness),
        (args.admin_addr, Port::Admin),
    ] {
        let listener = admin::bind(addr, port).await?;
        bound.push(listener.local_addr()?);
        endpoints.serve(listener, port);
    }
    let endpoints_line = format!(
        "metrics={} readiness={} admin={}",
        bound[0], bound[1], bound[2]
    );
    let mut sockets = InboundSocketMap::open(&args.pin_root)?;
    let carry = carry(&args, sockets.is_some(), admission.clone());
    let mut pods: HashMap<PodUid, PodProxy> = HashMap::new();
    for (uid, netns_path) in &args.pods {
        let netns = Netns::open(netns_path)
            .with_context(|| format!("open netns {} of pod {uid}", netns_path.display()))?;
        let pod = PodProxy::start(
            uid.clone(),
            netns,
            None,
            sockets.as_mut(),
            &carry,
            stats.clone(),
            mesh.clone(),
        )?;
        pods.insert(uid.clone(), pod);
    }
    let (commands, mut requests) = tokio::sync::mpsc::channel(16);
    let (connected, mut connections) = tokio::sync::mpsc::unbounded_channel();
    match &args.zds_socket {
        Some(path) => {
            zds::spawn(path.clone(), commands, connected, stats.clone());
            // Ready once the agent is reached: its snapshot follows.
            connections.recv().await;
            println!(
                "sluice-proxy ready pods={} zds={} {endpoints_line}",
                pods.len(),
                path.display()
            );
        }
        None if pods.is_empty() => {
            bail!("no pods to serve; pass --pod UID=NETNS_PATH or --zds-socket PATH")
        }
        // Tests and scripts wait for this line: every pod's listeners are up.
        None => println!("sluice-proxy ready pods={} {endpoints_line}", pods.len()),
    }
    set_served(&served, &pods);
    readiness.started();

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(command) = requests.recv() => {
                let ctx = (&mut sockets, &carry, &stats, &mesh, &*readiness);
                handle(command, &mut pods, ctx);
                set_served(&served, &pods);
            }
            Some(()) = connections.recv() => info!("reconnected to the agent; awaiting its snapshot"),
        }
    }
    readiness.draining();
    // Drain every pod at once, all within one bound.
    for pod in pods.values_mut() {
        pod.begin_drain(sockets.as_mut());
    }
    let deadline = tokio::time::Instant::now() + args.drain_timeout;
    while pods.values().any(|p| p.active() > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let cut: usize = pods.values().map(PodProxy::active).sum();
    info!(cut, "drained");
    for (_, pod) in pods {
        pod.stop(sockets.as_mut());
    }
    let counters: Vec<String> = stats
        .snapshot()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let hbone = mesh
        .as_ref()
        .map(|m| format!("{:?}", m.hbone))
        .unwrap_or_default();
    info!(stats = %counters.join(" "), hbone, "sluice-proxy stopped");
    Ok(())
}

type PodEnv<'a> = (
    &'a mut Option<InboundSocketMap>,
    &'a Carry,
    &'a Arc<Stats>,
    &'a Option<Arc<MeshContext>>,
    &'a Readiness,
);

/// How the pods are served. Under eBPF capture (`ebpf`: its inbound map is pinned) a dial
/// carrying the client's address must be registered in `SLUICE_PROXY_DIALS`, or sk_lookup
/// steers it back to the proxy: without that map (a capture from before source preservation,
/// or one this build cannot read), apps see the pod's address.
fn carry(args: &Args, ebpf: bool, admission: Arc<Admission>) -> Carry {
    let mut carry = Carry {
        copy: args.copy,
        preserve_source: args.preserve_source,
        proxy_dials: None,
        admission,
    };
    if !(args.preserve_source && ebpf) {
        return carry;
    }
    match ProxyDials::open(&args.pin_root) {
        Ok(Some(dials)) => {
            // Leftovers of a proxy killed mid-dial: void by their deadline, their room back.
            match dials.sweep_expired() {
                Ok(0) => {}
                Ok(n) => info!(
                    removed = n,
                    "expired dials of an earlier proxy swept from SLUICE_PROXY_DIALS"
                ),
                Err(e) => warn!(error = %e, "cannot sweep SLUICE_PROXY_DIALS"),
            }
            carry.proxy_dials = Some(Arc::new(dials));
        }
        Ok(None) => {
            warn!(pin_root = %args.pin_root.display(), "eBPF capture without SLUICE_PROXY_DIALS (an older capture): apps see the pod's address, not the client's; upgrade the agent to preserve it");
            carry.preserve_source = false;
        }
        Err(e) => {
            warn!(pin_root = %args.pin_root.display(), error = %e, "cannot use SLUICE_PROXY_DIALS: apps see the pod's address, not the client's; is the agent the same version as the proxy?");
            carry.preserve_source = false;
        }
    }
    carry
}

/// The bounds the flags set, the node-wide one fitted under the open-file limit.
fn limits(args: &Args) -> Limits {
    let limits = Limits {
        handshake_timeout: args.hbone_handshake_timeout,
        connect_timeout: args.hbone_connect_timeout,
        server_idle_timeout: args.hbone_idle_timeout,
        keepalive_interval: args.hbone_keepalive_interval,
        keepalive_timeout: args.hbone_keepalive_timeout,
        tcp_user_timeout: args.tcp_user_timeout,
        max_connections: args.max_connections,
        max_per_source: args.max_connections_per_source,
        max_handshakes: args.max_handshakes,
        max_handshakes_per_source: args.max_handshakes_per_source,
        handshake_rate_per_source: args.handshake_rate_per_source,
        handshake_rate_per_pod: args.handshake_rate_per_pod,
        max_per_pod: args.max_connections_per_pod,
        fd_budget: usize::MAX,
    }
    .fit_to_open_files(sluice_proxy::limits::open_file_limit());
    info!(?limits, "connection bounds");
    limits
}

/// What the config dump lists as served.
fn set_served(
    served: &std::sync::Mutex<std::collections::BTreeSet<String>>,
    pods: &HashMap<PodUid, PodProxy>,
) {
    let mut served = served
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *served = pods.keys().map(ToString::to_string).collect();
}

/// Carries out one hand-off request; its result becomes the ack.
fn handle(command: zds::Command, pods: &mut HashMap<PodUid, PodProxy>, env: PodEnv<'_>) {
    let (sockets, carry, stats, mesh, readiness) = env;
    match command {
        zds::Command::Add {
            uid,
            netns,
            workload,
            reply,
        } => {
            let same = match (pods.get(&uid), netns.inode()) {
                (Some(pod), Ok(inode)) => pod.netns_inode() == inode,
                _ => false,
            };
            if same {
                let _ = reply.send(Ok(()));
                return;
            }
            // A new sandbox for a known uid: the old listeners go first.
            if let Some(old) = pods.remove(&uid) {
                old.stop(sockets.as_mut());
            }
            // Handed over by the agent: the pod is captured, so it is in the mesh (as ztunnel
            // treats every pod it is given), with the identity the agent named, and under
            // policy even without that (then nothing is allowed into it in plaintext).
            let workload = workload.unwrap_or_default();
            let handed = Some(HandedOver {
                namespace: workload.namespace,
                service_account: workload.service_account,
            });
            let result = PodProxy::start(
                uid.clone(),
                netns,
                handed,
                sockets.as_mut(),
                carry,
                stats.clone(),
                mesh.clone(),
            )
            .map(|pod| {
                pods.insert(uid.clone(), pod);
            })
            .map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                warn!(pod = %uid, error = %e, "could not serve the pod");
            }
            readiness.pod(uid.as_str(), result.is_ok());
            let _ = reply.send(result);
        }
        zds::Command::Del { uid, reply } => {
            if let Some(pod) = pods.remove(&uid) {
                info!(pod = %uid, "removed by the agent");
                pod.stop(sockets.as_mut());
            }
            readiness.pod(uid.as_str(), true);
            let _ = reply.send(Ok(()));
        }
        zds::Command::Snapshot { keep, reply } => {
            readiness.keep_only(&keep.iter().map(ToString::to_string).collect());
            let gone: Vec<PodUid> = pods.keys().filter(|u| !keep.contains(u)).cloned().collect();
            for uid in gone {
                if let Some(pod) = pods.remove(&uid) {
                    info!(pod = %uid, "not in the agent's snapshot: stopped");
                    pod.stop(sockets.as_mut());
                }
            }
            let _ = reply.send(Ok(()));
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot listen for signals; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Every proxied connection holds two sockets (plus pooled tunnels): lift the soft open-file
/// limit to the hard one, as any proxy must, so a thousand connections do not hit EMFILE.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid rlimit struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if !raised {
        warn!(error = %std::io::Error::last_os_error(), "could not raise the open-file limit");
    }
}

/// Logs go through a non-blocking writer so a slow stderr never stalls the data path. The
/// filter can be changed at runtime through the admin endpoint.
fn init_logging(
    json: bool,
) -> (
    tracing_appender::non_blocking::WorkerGuard,
    admin::SetLogLevel,
) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let layer = fmt::layer().with_writer(writer).with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
    let set: admin::SetLogLevel = Arc::new(move |level: &str| {
        // EnvFilter takes almost anything as a target name; accept only `level` or
        // `target=level` directives, so a typo is an error rather than a silent no-op.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let valid = |d: &str| {
            let (target, lvl) = d.rsplit_once('=').unwrap_or(("", d));
            LEVELS.contains(&lvl)
                && target
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        if level.is_empty() || !level.split(',').all(valid) {
            return Err(format!(
                "invalid level {level:?}: use trace, debug, info, warn, error or off, optionally as target=level, comma-separated"
            ));
        }
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("invalid level {level:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    (guard, set)
}
