//! `sluice-cni-agent`: the per-node agent. Installs the CNI plugin, learns which pods to mesh,
//! captures their traffic (eBPF or iptables) and hands each pod's netns to the proxy.
//!
//! Kubernetes mode watches Namespaces and this node's Pods; standalone mode (no Kubernetes)
//! reads them from `--pods-file`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use sluice_agent::health::{self, Health};
use sluice_agent::install::{Install, PLUGIN_TYPE};
use sluice_agent::node::{Capture, Config, Event, Node};
use sluice_agent::record::Records;
use sluice_agent::selection::Selector;
use sluice_agent::{cluster, cni_server::CniServer, find, standalone};
use sluice_capture::ebpf::EbpfCapture;
use sluice_capture::iptables::IptablesCapture;
use sluice_capture::netns::Netns;
use sluice_capture::{Backend, DEFAULT_PIN_ROOT};
use tracing::{info, warn};

/// The sluice node agent.
///
/// Installs the sluice CNI plugin into the node's CNI configuration, decides which pods are
/// meshed (namespace label istio.io/dataplane-mode=ambient, opt-outs as in Istio ambient),
/// captures their traffic and hands them to sluice-proxy over the ZDS socket. Capture stays in
/// place when the agent stops, so pods never bypass the mesh while it restarts.
#[derive(Parser, Debug)]
#[command(name = "sluice-cni-agent", version, verbatim_doc_comment)]
struct Args {
    /// Standalone mode: the YAML file listing namespaces (with labels) and this node's pods,
    /// re-read when it changes. Without it the agent runs in Kubernetes mode.
    #[arg(long, env = "SLUICE_PODS_FILE")]
    pods_file: Option<PathBuf>,

    /// Kubernetes mode: this node's name (the downward API's spec.nodeName); only its pods are
    /// watched.
    #[arg(long, env = "NODE_NAME", required_unless_present_any = ["pods_file", "uninstall"])]
    node_name: Option<String>,

    /// The capture mechanism.
    #[arg(long, value_enum, default_value_t = Backend::Ebpf, env = "SLUICE_BACKEND")]
    backend: Backend,

    /// Where the eBPF backend pins its maps and links.
    #[arg(long, default_value = DEFAULT_PIN_ROOT, env = "SLUICE_PIN_ROOT")]
    pin_root: PathBuf,

    /// The hand-off socket the proxy connects to, created 0600. Its directory is created 0700
    /// if missing, and must otherwise be 0700 and owned by root: only the proxy may connect.
    #[arg(
        long,
        default_value = "/var/run/sluice/zds/zds.sock",
        env = "SLUICE_ZDS_SOCKET"
    )]
    zds_socket: PathBuf,

    /// The socket the CNI plugin talks to.
    #[arg(long, default_value = sluice_cni::spec::DEFAULT_AGENT_SOCKET, env = "SLUICE_CNI_SOCKET")]
    cni_socket: PathBuf,

    /// The agent's own records of captured pods, for restarts.
    #[arg(
        long,
        default_value = "/var/run/sluice/agent",
        env = "SLUICE_STATE_DIR"
    )]
    state_dir: PathBuf,

    /// The CNI bin dir the plugin binary is copied into.
    #[arg(long, default_value = "/opt/cni/bin", env = "SLUICE_CNI_BIN_DIR")]
    cni_bin_dir: PathBuf,

    /// The CNI config dir whose primary list gets sluice as its last plugin.
    #[arg(long, default_value = "/etc/cni/net.d", env = "SLUICE_CNI_CONF_DIR")]
    cni_conf_dir: PathBuf,

    /// The plugin binary to install; defaults to `sluice-cni` next to this binary.
    #[arg(long, env = "SLUICE_CNI_PLUGIN")]
    plugin_binary: Option<PathBuf>,

    /// Do not touch the node's CNI configuration (pods are then only captured through the pods
    /// source, not at sandbox start).
    #[arg(long, env = "SLUICE_NO_INSTALL")]
    no_install: bool,

    /// Remove the plugin from the CNI configuration and bin dir, then exit.
    #[arg(long)]
    uninstall: bool,

    /// A namespace never meshed (repeatable); the plugin lets its pods start without the agent.
    #[arg(long = "exclude-namespace", default_values = ["kube-system"], env = "SLUICE_EXCLUDE_NAMESPACES", value_delimiter = ',')]
    exclude_namespaces: Vec<String>,

    /// Where pod cgroups are searched for; defaults to the cgroup v2 mount.
    #[arg(long, env = "SLUICE_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,

    /// The proxy's cgroup, for the eBPF original-destination program; by default found from
    /// the connected proxy's pid.
    #[arg(long, env = "SLUICE_PROXY_CGROUP")]
    proxy_cgroup: Option<PathBuf>,

    /// The cgroup holding the node's own processes (kubelet, hostNetwork pods), whose
    /// connections to captured pods leave from Istio's probe address and reach the app
    /// uncaptured (eBPF: bind programs attached here; iptables: a SNAT for the node's own
    /// sockets). Defaults to the cgroup v2 mount, which holds every process; the agent must
    /// be inside it. `none` turns the exemption off (probes are then captured like any
    /// connection, and refused under STRICT).
    #[arg(long, env = "SLUICE_NODE_CGROUP")]
    node_cgroup: Option<PathBuf>,

    /// The node's network namespace, whose own connections to pods are the node's probes;
    /// defaults to the agent's (it runs with hostNetwork). A path or a name under
    /// /var/run/netns.
    #[arg(long, env = "SLUICE_NODE_NETNS")]
    node_netns: Option<String>,

    /// How long a pod's sandbox start waits for the proxy to take the pod.
    #[arg(
        long,
        default_value = "25",
        value_name = "SECONDS",
        env = "SLUICE_CNI_WAIT"
    )]
    cni_wait: u64,

    /// How many captured outbound connections one pod may have open at once (eBPF); its
    /// `connect()` beyond fails with EPERM and is counted (`outbound_drop_quota`). Bounded so
    /// pods cannot fill the node-wide maps (524,288 entries): keep it × pods per node below that.
    #[arg(
        long,
        default_value_t = sluice_capture::DEFAULT_MAX_TRACKED_PER_POD,
        value_name = "CONNECTIONS",
        env = "SLUICE_MAX_OUTBOUND_PER_POD"
    )]
    max_outbound_per_pod: u32,

    /// Liveness (/healthz) and readiness (/readyz) probes.
    #[arg(long, default_value = "0.0.0.0:15023", env = "SLUICE_HEALTH_ADDR")]
    health_addr: SocketAddr,

    /// Log as JSON lines.
    #[arg(long, env = "SLUICE_LOG_JSON")]
    log_json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_json);
    let install = installation(&args)?;
    if args.uninstall {
        install.uninstall()?;
        info!(conf_dir = %args.cni_conf_dir.display(), "CNI plugin uninstalled");
        return Ok(());
    }
    match find::join_host_cgroup_namespace() {
        Ok(true) => info!("joined the host's cgroup namespace (pid 1's)"),
        Ok(false) => {}
        Err(e) => {
            warn!(error = %e, "cannot join the host's cgroup namespace; the proxy's cgroup may not be found (pass --proxy-cgroup, or run with hostPID and privileges)")
        }
    }
    if !(1..=sluice_capture::MAX_TRACKED).contains(&args.max_outbound_per_pod) {
        bail!(
            "--max-outbound-per-pod {} is out of range: use 1 to {}",
            args.max_outbound_per_pod,
            sluice_capture::MAX_TRACKED
        );
    }
    if !(1..=290).contains(&args.cni_wait) {
        bail!(
            "--cni-wait {} is out of range: use 1 to 290 seconds",
            args.cni_wait
        );
    }
    let world = match &args.pods_file {
        Some(path) => Some(standalone::load(path).context("load the pods file")?),
        None => None,
    };
    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => sluice_capture::cgroup::v2_root().context("find the cgroup v2 mount")?,
    };
    let node_cgroup = match &args.node_cgroup {
        Some(path) if path.as_os_str() == "none" => None,
        Some(path) => Some(path.clone()),
        None => Some(cgroup_root.clone()),
    };
    let node_netns = match &args.node_netns {
        Some(arg) => Netns::open_named_or_path(arg),
        None => Netns::open("/proc/self/ns/net"),
    }
    .with_context(|| format!("open the node's netns ({:?})", args.node_netns))?;
    let capture = match args.backend {
        Backend::Ebpf => {
            Capture::Ebpf(EbpfCapture::load(&args.pin_root).context("load eBPF capture")?)
        }
        Backend::Iptables => Capture::Iptables(IptablesCapture::new()),
    };
    let records = Records::open(&args.state_dir)
        .with_context(|| format!("open the state dir {}", args.state_dir.display()))?;
    info!(backend = %args.backend, pods_file = ?args.pods_file, node = ?args.node_name, zds = %args.zds_socket.display(),
          cni = %args.cni_socket.display(), cgroup_root = %cgroup_root.display(), "starting");

    // Signals are taken by one thread (sigwait), so block them before any thread starts.
    let signals = block_stop_signals()?;
    let health = Arc::new(Health::new());
    let (events, rx) = mpsc::channel();
    let zds = sluice_zds::Listener::bind(&args.zds_socket)
        .with_context(|| format!("bind the hand-off socket {}", args.zds_socket.display()))?;
    let cni = CniServer::bind(&args.cni_socket)
        .with_context(|| format!("bind the CNI socket {}", args.cni_socket.display()))?;
    let wait = Duration::from_secs(args.cni_wait);
    accept_proxies(zds, events.clone());
    cni.serve(events.clone(), wait);
    let health_addr = health::serve(args.health_addr, health.clone())
        .with_context(|| format!("bind the health address {}", args.health_addr))?;
    let cluster = match (&args.pods_file, world) {
        (Some(path), Some(world)) => {
            standalone::watch(path.clone(), world, events.clone());
            None
        }
        _ => Some(kubernetes(&args, events.clone())?),
    };
    if args.no_install {
        health.set_install(Ok(()));
    } else {
        install
            .keep(health.clone())
            .context("install the CNI plugin")?;
    }
    let stop = events.clone();
    std::thread::spawn(move || {
        let signal = wait_for_signal(&signals);
        info!(signal, "stopping");
        let _ = stop.send(Event::Stop);
    });
    // The harness (and humans) wait for this line. Whoever reads our stdout may have gone
    // (EPIPE): the agent carries on regardless, where `println!` would panic.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "sluice-cni-agent started health={health_addr}");
        let _ = stdout.flush();
    }
    let config = Config {
        selector: Selector {
            excluded_namespaces: args.exclude_namespaces.clone(),
        },
        cgroup_root,
        proxy_cgroup: args.proxy_cgroup.clone(),
        cni_wait: wait,
        max_outbound_per_pod: args.max_outbound_per_pod,
        node_cgroup,
        node_netns,
        cluster,
    };
    Node::new(config, capture, records, health).run(rx);
    // The listeners' threads never return; remove their socket files here.
    let _ = std::fs::remove_file(&args.cni_socket);
    let _ = std::fs::remove_file(&args.zds_socket);
    Ok(())
}

/// Kubernetes mode: connects to the API server (in-cluster service account, else kubeconfig)
/// and starts the watches on their own runtime thread.
fn kubernetes(args: &Args, events: mpsc::Sender<Event>) -> Result<cluster::Handle> {
    let node = args
        .node_name
        .clone()
        .context("Kubernetes mode needs --node-name (NODE_NAME from the downward API)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the Kubernetes runtime")?;
    let client = runtime.block_on(kube::Client::try_default()).context(
        "create the Kubernetes client (from the in-cluster service account, else $KUBECONFIG \
         or ~/.kube/config); run in a pod, or pass --pods-file for standalone mode",
    )?;
    let (handle, requests) = cluster::Handle::channel();
    std::thread::spawn(move || runtime.block_on(cluster::run(client, node, events, requests)));
    Ok(handle)
}

fn installation(args: &Args) -> Result<Install> {
    let plugin_binary = match &args.plugin_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("find this binary's directory")?
            .with_file_name(PLUGIN_TYPE),
    };
    Ok(Install {
        bin_dir: args.cni_bin_dir.clone(),
        conf_dir: args.cni_conf_dir.clone(),
        plugin_binary,
        entry: json!({
            "type": PLUGIN_TYPE,
            "agentSocket": args.cni_socket,
            // The plugin's own bound: the agent answers within --cni-wait, plus capture time.
            "timeoutSeconds": args.cni_wait + 10,
            "excludeNamespaces": args.exclude_namespaces,
        }),
    })
}

/// Hands each proxy that connects to the node loop, once its credentials show it is root: the
/// socket is 0600 root, so anyone else got through a loosened file or directory, and is never
/// sent a pod's netns.
fn accept_proxies(listener: sluice_zds::Listener, events: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        let mut refused: u64 = 0;
        loop {
            match listener.accept() {
                Ok(channel) => match channel.root_peer() {
                    Ok(_) => {
                        if events.send(Event::Proxy(channel)).is_err() {
                            return;
                        }
                    }
                    Err(sluice_zds::ZdsError::PeerNotRoot { pid, uid }) => {
                        refused += 1;
                        tracing::warn!(
                            peer_pid = pid,
                            peer_uid = uid,
                            refused,
                            "refused a hand-off connection: the peer is not root, so it is not the proxy (check the socket's and its directory's modes)"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read a hand-off peer's credentials; connection dropped");
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off socket accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
}

fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; pthread_sigmask
    // only changes this thread's mask (inherited by threads started later).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if ret != 0 {
            bail!(
                "block SIGTERM/SIGINT: {}",
                std::io::Error::from_raw_os_error(ret)
            );
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> &'static str {
    let mut signal = 0;
    // SAFETY: a valid, initialised signal set and an out-parameter.
    unsafe { libc::sigwait(set, &mut signal) };
    if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written is dropped: by default the subscriber reports that on
    // stderr with `eprintln!`, which panics when stderr is the broken pipe, taking the agent
    // (and every pending CNI ADD) down with a log collector that went away.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .log_internal_errors(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
