//! `sluice-load` (run as `cargo xtask load`): attach or detach sluice's capture on an existing
//! network namespace and cgroup by hand, and show what is pinned. For debugging; in a cluster
//! the CNI agent does this.
//!
//! Example:
//!   ip netns add demo && cargo xtask load --netns demo --cgroup /sys/fs/cgroup/unified/demo
//!   cargo xtask load --status
//!   cargo xtask load --netns demo --detach

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sluice_capture::ebpf::{self, EbpfCapture};
use sluice_capture::iptables::IptablesCapture;
use sluice_capture::netns::Netns;
use sluice_capture::{Backend, DEFAULT_PIN_ROOT, PodCapture, PodUid, Redirector};

/// Attach, detach or inspect sluice's pod traffic capture by hand.
///
/// With --netns: capture that netns's traffic (inbound via sk_lookup, outbound via --cgroup);
/// with --detach: release it again; with --status: list pinned pods and verdict counters.
/// The proxy must run with listeners in the netns for captured traffic to flow; without it,
/// captured connections are refused (fail closed).
#[derive(Parser, Debug)]
#[command(name = "cargo xtask load", version, verbatim_doc_comment)]
struct Args {
    /// The pod's network namespace: a name under /var/run/netns (as made by `ip netns add`) or
    /// a path such as /proc/PID/ns/net.
    #[arg(long, env = "SLUICE_NETNS", required_unless_present_any = ["status", "proxy_cgroup", "node_cgroup", "check_kernel"])]
    netns: Option<String>,

    /// The pod's cgroup v2 directory; outbound capture (eBPF) attaches there. Without it only
    /// inbound traffic is captured by the eBPF backend.
    #[arg(long, env = "SLUICE_CGROUP")]
    cgroup: Option<PathBuf>,

    /// The capture mechanism.
    #[arg(long, value_enum, default_value_t = Backend::Ebpf, env = "SLUICE_BACKEND")]
    backend: Backend,

    /// The pod's uid, the key of its pinned state; defaults to the netns's file name.
    #[arg(long, env = "SLUICE_POD")]
    pod: Option<String>,

    /// A pod address, as the node assigned it (repeatable). Without any, this debugging tool
    /// reads them from inside the netns and says so: the agent never does (a pod can add any
    /// address to its own interfaces), it takes them from the CNI result or the pod's status.
    #[arg(long = "addr")]
    addrs: Vec<IpAddr>,

    /// An inbound port delivered straight to the app (repeatable, at most 8).
    #[arg(long = "exclude-inbound-port")]
    exclude_inbound_ports: Vec<u16>,

    /// An outbound destination port that bypasses the proxy (repeatable, at most 8).
    #[arg(long = "exclude-outbound-port")]
    exclude_outbound_ports: Vec<u16>,

    /// Also attach the SO_ORIGINAL_DST emulation to this cgroup, the one the proxy runs in
    /// (eBPF backend; the proxy must join it before creating its listeners).
    #[arg(long, env = "SLUICE_PROXY_CGROUP")]
    proxy_cgroup: Option<PathBuf>,

    /// Make the node's own connections to captured pods (kubelet's probes) leave from Istio's
    /// probe address, which capture lets through (eBPF): attach the bind programs to this
    /// cgroup and put the probe addresses on the node's `lo`. This process must run inside the
    /// cgroup's subtree (the programs learn the node's netns from its socket).
    #[arg(long, env = "SLUICE_NODE_CGROUP")]
    node_cgroup: Option<PathBuf>,

    /// The node's netns for --node-cgroup (a name or a path); defaults to this process's.
    #[arg(long, env = "SLUICE_NODE_NETNS")]
    node_netns: Option<String>,

    /// Release the pod instead of capturing it (idempotent).
    #[arg(long)]
    detach: bool,

    /// List the pinned pods and the verdict counters, then exit.
    #[arg(long)]
    status: bool,

    /// Check what this kernel can do for sluice: version floor, BTF, cgroup v2, and every
    /// program through the verifier (with the verifier's log of any rejection). Exits non-zero
    /// if anything sluice needs is missing.
    #[arg(long)]
    check_kernel: bool,

    /// Print --status or --check-kernel as JSON.
    #[arg(long)]
    json: bool,

    /// Where the eBPF backend pins its maps and links.
    #[arg(long, default_value = DEFAULT_PIN_ROOT, env = "SLUICE_PIN_ROOT")]
    pin_root: PathBuf,
}

fn main() -> Result<()> {
    // A closed pipe ends the process quietly, as for any command-line tool
    // (`sluice-load --status | head` must not panic on EPIPE).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.check_kernel {
        return check_kernel(args.json);
    }
    if args.status {
        return status(&args);
    }
    if let Some(netns) = &args.netns {
        let pod = pod_capture(&args, netns)?;
        let mut redirector: Box<dyn Redirector> = match args.backend {
            Backend::Ebpf => Box::new(EbpfCapture::load(&args.pin_root)?),
            Backend::Iptables => Box::new(IptablesCapture::new()),
        };
        if args.detach {
            redirector.remove(&pod)?;
            println!("released {} ({})", pod.uid, args.backend);
        } else {
            redirector.enroll(&pod)?;
            println!(
                "capturing {} ({}) in {}",
                pod.uid,
                args.backend,
                pod.netns.display()
            );
        }
    }
    if let Some(cgroup) = &args.proxy_cgroup {
        if args.backend != Backend::Ebpf {
            bail!(
                "--proxy-cgroup is for the eBPF backend: iptables REDIRECT answers SO_ORIGINAL_DST itself"
            );
        }
        let mut capture = EbpfCapture::load(&args.pin_root)?;
        if args.detach {
            capture.detach_proxy()?;
        } else {
            capture.attach_proxy(cgroup)?;
            println!("SO_ORIGINAL_DST emulation attached to {}", cgroup.display());
        }
    }
    if let Some(cgroup) = &args.node_cgroup {
        if args.backend != Backend::Ebpf {
            bail!(
                "--node-cgroup is for the eBPF backend; the agent SNATs the node's probes for iptables"
            );
        }
        let node = match &args.node_netns {
            Some(arg) => Netns::open_named_or_path(arg),
            None => Netns::open("/proc/self/ns/net"),
        }
        .context("open the node's netns")?;
        let mut capture = EbpfCapture::load(&args.pin_root)?;
        if args.detach {
            capture.detach_node()?;
            sluice_capture::node::remove_probe_addresses(&node)?;
        } else {
            sluice_capture::node::ensure_probe_addresses(&node)?;
            let cookie = capture.attach_node(cgroup, &node)?;
            println!(
                "node probes from {} and {} attached to {} (node netns cookie {cookie})",
                sluice_capture::node::PROBE_V4,
                sluice_capture::node::PROBE_V6,
                cgroup.display()
            );
        }
    }
    Ok(())
}

fn pod_capture(args: &Args, netns_arg: &str) -> Result<PodCapture> {
    let netns =
        Netns::open_named_or_path(netns_arg).with_context(|| format!("open netns {netns_arg}"))?;
    let default_uid = netns
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let uid = PodUid::parse(args.pod.as_deref().unwrap_or(&default_uid))
        .context("--pod (or the netns name)")?;
    let mut pod = PodCapture::new(uid, netns.path());
    pod.cgroup = args.cgroup.clone();
    pod.addrs = args.addrs.clone();
    if pod.addrs.is_empty() && !args.detach {
        pod.addrs = netns
            .addresses()
            .with_context(|| format!("list the addresses in netns {netns_arg}"))?;
        eprintln!(
            "sluice-load: no --addr given; using the addresses found inside the netns: {:?}",
            pod.addrs
        );
    }
    pod.exclude_inbound_ports = args.exclude_inbound_ports.clone();
    pod.exclude_outbound_ports = args.exclude_outbound_ports.clone();
    Ok(pod)
}

fn status(args: &Args) -> Result<()> {
    let pods = ebpf::list_pods(&args.pin_root)?;
    let verdicts = ebpf::verdicts(&args.pin_root)?;
    if args.json {
        let counters: serde_json::Map<String, serde_json::Value> = verdicts
            .iter()
            .map(|(v, n)| (v.name().to_owned(), (*n).into()))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "pods": pods, "verdicts": counters })
        );
        return Ok(());
    }
    println!("pinned pods under {}:", args.pin_root.display());
    if pods.is_empty() {
        println!("  (none)");
    }
    for pod in &pods {
        let addrs: Vec<String> = pod.addrs.iter().map(ToString::to_string).collect();
        println!(
            "  {:<24} netns-ino {:<11} cgroup-id {:<8} addrs {:<28} tracked-sockets {:<6} links {}",
            pod.uid,
            pod.netns_ino,
            pod.cgroup_id,
            addrs.join(","),
            pod.tracked_sockets,
            pod.links.join(",")
        );
    }
    println!("verdicts (all pods, since load):");
    for (verdict, count) in verdicts {
        println!("  {:>2} {:<24} {count}", verdict as u32, verdict.name());
    }
    Ok(())
}

fn check_kernel(json: bool) -> Result<()> {
    let checks = sluice_capture::kernel::check();
    if json {
        println!("{}", serde_json::to_string(&checks)?);
    } else {
        for check in &checks {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            let mut lines = check.detail.lines();
            match lines.next() {
                Some(first) => println!("{mark} {}: {first}", check.what),
                None => println!("{mark} {}", check.what),
            }
            // The rest is a verifier log: print it whole, indented.
            for line in lines {
                println!("       {line}");
            }
        }
    }
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.what.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "this kernel lacks what sluice needs: {}",
            missing.join("; ")
        );
    }
    Ok(())
}
