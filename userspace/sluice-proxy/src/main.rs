//! `sluice-proxy`: the node proxy. Serves each enrolled pod from listeners inside the pod's
//! netns and carries its captured connections; this first capability is L4 passthrough.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sluice_capture::inbound_map::InboundSocketMap;
use sluice_capture::netns::Netns;
use sluice_capture::{DEFAULT_PIN_ROOT, PodUid};
use tracing::{info, warn};

use sluice_proxy::copy::CopyMode;
use sluice_proxy::inpod::PodProxy;
use sluice_proxy::stats::Stats;

/// sluice's node proxy: captured pod traffic in, original destinations out.
#[derive(Parser, Debug)]
#[command(name = "sluice-proxy", version)]
struct Args {
    /// A pod to serve, as UID=NETNS_PATH (repeatable). The CNI agent hand-off replaces this.
    #[arg(long = "pod", value_parser = parse_pod, env = "SLUICE_PODS", value_delimiter = ' ')]
    pods: Vec<(PodUid, PathBuf)>,

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

fn main() -> Result<()> {
    let args = Args::parse();
    let _log_guard = init_logging(args.log_json);
    info!(pods = args.pods.len(), cgroup = ?args.cgroup, pin_root = %args.pin_root.display(), copy = ?args.copy, "effective configuration");
    if args.check_config {
        return Ok(());
    }
    // Before any thread or socket exists: a socket belongs to the cgroup it was created in.
    if let Some(cgroup) = &args.cgroup {
        sluice_capture::cgroup::join(cgroup, std::process::id())
            .with_context(|| format!("join cgroup {}", cgroup.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let stats = Arc::new(Stats::default());
    let mut sockets = InboundSocketMap::open(&args.pin_root)?;
    let mut pods = Vec::new();
    for (uid, netns_path) in &args.pods {
        let netns = Netns::open(netns_path)
            .with_context(|| format!("open netns {} of pod {uid}", netns_path.display()))?;
        pods.push(PodProxy::start(
            uid.clone(),
            netns,
            sockets.as_mut(),
            args.copy,
            stats.clone(),
        )?);
    }
    if pods.is_empty() {
        bail!("no pods to serve; pass --pod UID=NETNS_PATH");
    }
    // Tests and scripts wait for this line: every pod's listeners are up.
    println!("sluice-proxy ready pods={}", pods.len());

    shutdown_signal().await;
    for pod in pods {
        pod.stop(sockets.as_mut());
    }
    let counters: Vec<String> = stats
        .snapshot()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    info!(stats = %counters.join(" "), "sluice-proxy stopped");
    Ok(())
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

/// Logs go through a non-blocking writer so a slow stderr never stalls the data path.
fn init_logging(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}
