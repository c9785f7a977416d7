//! `cargo xtask bench soak`: the proxies under many held tunnels, a trickle and churn, and an
//! unauthenticated handshake flood, on the two-node lab with eBPF capture and HBONE.
//!
//! Client pods on node 0 open `connections` tunnels in all to an echo server pod on node 1 and
//! hold them with a trickle of round trips and some churn; a probe pod measures 64-byte
//! request/response latency before, during the load, and during a flood of TLS handshakes
//! without a certificate against the server pod's :15008 from an attacker pod beside it.
//! Reported (`target/bench/soak.json`): connections held by each proxy at the peak, each
//! proxy's RSS and fds before / at the peak / after everything closed, RSS per held
//! connection, the p99s, and every error the workloads saw.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{ChildStdout, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use sluice_capture::Backend;

use crate::app::{self, Placement, ProcessGuard};
use crate::cluster::{Cluster, PodSpec};
use crate::proxy::ProxyProcess;
use crate::soak::{FloodOutcome, HoldOutcome};

/// The soak's options.
#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    /// Tunnels held at once, in all (spread over the client pods).
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Client pods holding them (each under the proxy's per-source bound).
    #[arg(long, default_value_t = 4)]
    pub pods: usize,
    /// Seconds the load is held (trickle and churn) after the measurements under it.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Trickle round trips per second, per client pod.
    #[arg(long, default_value_t = 200)]
    pub trickle: u32,
    /// Connections closed and opened anew per second, per client pod.
    #[arg(long, default_value_t = 20)]
    pub churn: u32,
    /// Seconds of each request/response latency measurement.
    #[arg(long, default_value_t = 5.0)]
    pub rr_seconds: f64,
    /// Concurrent unauthenticated handshakes in the flood.
    #[arg(long, default_value_t = 32)]
    pub flood_concurrency: usize,
    /// Where soak.json goes (default: target/bench).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

const CLIENT_NAMES: [&str; 8] = [
    "client-0", "client-1", "client-2", "client-3", "client-4", "client-5", "client-6", "client-7",
];
const ECHO_PORT: u16 = 7070;

/// One proxy's resources at a moment.
#[derive(Clone, Copy, Debug, Serialize)]
struct Usage {
    rss_kb: u64,
    fds: u64,
    /// `sluice_connections_held`: connections the proxy counts as held.
    held: u64,
}

fn usage(proxy: &ProxyProcess) -> Result<Usage> {
    let pid = proxy.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("read the proxy's /proc status")?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc status")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .context("list the proxy's fds")?
        .count() as u64;
    let (status, metrics) = proxy.get("metrics", "/metrics")?;
    ensure!(status == 200, "the proxy's metrics answered {status}");
    let held = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_connections_held "))
        .and_then(|v| v.trim().parse().ok())
        .context("sluice_connections_held in the proxy's metrics")?;
    Ok(Usage { rss_kb, fds, held })
}

/// The sum of a proxy's counter series `name{…label…}`.
fn counter(proxy: &ProxyProcess, name: &str, label: &str) -> Result<u64> {
    let (status, metrics) = proxy.get("metrics", "/metrics")?;
    ensure!(status == 200, "the proxy's metrics answered {status}");
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// A running `app soak-hold`: its first line said how many opened; closing its stdin ends it
/// and it prints its [`HoldOutcome`].
struct Holder {
    guard: ProcessGuard,
    stdout: BufReader<ChildStdout>,
    opened: usize,
}

impl Holder {
    fn start(place: &Placement, to: SocketAddr, count: usize, args: &SoakArgs) -> Result<Self> {
        let mut cmd = app::command_in(&app::binary()?, place)?;
        cmd.args([
            "app",
            "soak-hold",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--trickle-per-s",
            &args.trickle.to_string(),
            "--churn-per-s",
            &args.churn.to_string(),
            "--max-seconds",
            "600",
        ]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut guard = ProcessGuard {
            child: cmd.spawn().context("start app soak-hold")?,
            name: "app soak-hold".to_owned(),
        };
        let stdout = BufReader::new(guard.child.stdout.take().context("stdout")?);
        Ok(Self {
            guard,
            stdout,
            opened: 0,
        })
    }

    /// Waits for the `open N` line.
    fn opened(&mut self) -> Result<usize> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        self.opened = line
            .trim()
            .strip_prefix("open ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the holder printed {line:?}"))?;
        Ok(self.opened)
    }

    /// Closes its stdin and reads its outcome.
    fn finish(mut self) -> Result<HoldOutcome> {
        drop(self.guard.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let _ = self.guard.child.wait();
        serde_json::from_str(line.trim()).with_context(|| format!("the holder printed {line:?}"))
    }
}

/// 64-byte request/response p99 (and p50) in µs from `place` to `to` for `seconds`.
fn rr(place: &Placement, to: SocketAddr, seconds: f64) -> Result<(f64, f64)> {
    let mut cmd = app::command_in(&app::binary()?, place)?;
    cmd.args([
        "app",
        "rr",
        "--to",
        &to.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    let out = cmd.output().context("run the request/response client")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rr output: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok((
        v["p50_us"].as_f64().context("p50_us")?,
        v["p99_us"].as_f64().context("p99_us")?,
    ))
}

/// Each proxy's usage once its memory has settled after a load closed: read every second
/// until two readings in a row are within 2% (the proxy returns freed memory a few seconds
/// after its load falls), at most 20 s.
fn settled(cluster: &Cluster) -> Result<Vec<Usage>> {
    let mut last: Vec<Usage> = cluster.proxies.iter().map(usage).collect::<Result<_>>()?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(1));
        let now: Vec<Usage> = cluster.proxies.iter().map(usage).collect::<Result<_>>()?;
        let steady = now
            .iter()
            .zip(&last)
            .all(|(n, l)| n.rss_kb.abs_diff(l.rss_kb) * 50 <= l.rss_kb.max(1));
        last = now;
        if steady {
            break;
        }
    }
    Ok(last)
}

/// Starts a holder per client pod, `args.connections` spread over them, and waits until each
/// has opened what it could: the holders and the tunnels opened in all.
fn open_load(cluster: &Cluster, echo: SocketAddr, args: &SoakArgs) -> Result<(Vec<Holder>, usize)> {
    let per_pod = args.connections.div_ceil(args.pods);
    let mut left = args.connections;
    let mut holders = Vec::new();
    for name in &CLIENT_NAMES[..args.pods] {
        let count = per_pod.min(left);
        left -= count;
        holders.push(Holder::start(
            &cluster.pod(name).place(),
            echo,
            count,
            args,
        )?);
    }
    let mut opened = 0;
    for holder in &mut holders {
        opened += holder.opened()?;
    }
    Ok((holders, opened))
}

/// Opens the load once and closes it: the warm-up round.
fn warm_up(cluster: &Cluster, echo: SocketAddr, args: &SoakArgs) -> Result<()> {
    let (holders, opened) = open_load(cluster, echo, args)?;
    for holder in holders {
        holder.finish()?;
    }
    eprintln!("soak: warm-up round: {opened} tunnels opened and closed");
    Ok(())
}

/// Waits (bounded) until both proxies hold at most `want` connections each.
fn wait_released(cluster: &Cluster, want: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<u64> = cluster
            .proxies
            .iter()
            .map(|p| usage(p).map(|u| u.held))
            .collect::<Result<_>>()?;
        if held.iter().all(|h| *h <= want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the proxies still hold {held:?} connections a minute after the load closed");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Serialize)]
struct ProxyReport {
    node: usize,
    /// Before any load.
    cold: Usage,
    /// After the warm-up round closed.
    before: Usage,
    peak: Usage,
    after: Usage,
    /// (peak − cold) RSS over the tunnels held at the peak.
    rss_per_connection_kb: f64,
    /// after / before RSS (after the measured round vs after the warm-up round).
    rss_after_ratio: f64,
}

pub fn run(args: &SoakArgs, out_dir: &std::path::Path) -> Result<()> {
    ensure!(
        (1..=CLIENT_NAMES.len()).contains(&args.pods),
        "--pods must be 1..={}",
        CLIENT_NAMES.len()
    );
    ensure!(
        (1..=40_000).contains(&args.connections),
        "--connections must be 1..=40000"
    );
    ensure!(
        args.connections.div_ceil(args.pods) <= 4000,
        "at most 4000 connections per client pod (the proxy's and capture's per-pod bounds are \
         4096): raise --pods"
    );
    ensure!(
        (1..=600).contains(&args.seconds) && (0.5..=60.0).contains(&args.rr_seconds),
        "--seconds must be 1..=600 and --rr-seconds 0.5..=60"
    );
    let open_files = raise_open_files()?;
    let mut pods: Vec<PodSpec> = CLIENT_NAMES[..args.pods]
        .iter()
        .enumerate()
        .map(|(i, name)| PodSpec::new(name, 0, 10 + i as u8, true))
        .collect();
    pods.push(PodSpec::new("probe", 0, 3, true));
    pods.push(PodSpec::new("attacker", 0, 4, false));
    pods.push(PodSpec::new("server", 1, 2, true));
    eprintln!("soak: a two-node cluster (eBPF capture, HBONE)");
    // Pooled tunnels close 5 s after their last stream, so "after" is measured with nothing
    // of the load left open, not a minute later.
    let cluster = Cluster::with_proxy_args(Backend::Ebpf, &pods, &[], &["--pool-idle-timeout=5s"])?;
    let server = cluster.pod("server");
    let echo = server.addr(ECHO_PORT);
    let _echo = soak_server(&server.place_server(), echo)?;
    let probe = cluster.pod("probe").place();
    // One round trip first, so the probe's tunnel pool exists in "before".
    rr(&probe, echo, 0.5)?;
    let cold: Vec<Usage> = cluster.proxies.iter().map(usage).collect::<Result<_>>()?;
    eprintln!("soak: cold (before any load): {cold:?}");
    // A warm-up round of the same size, opened and closed: the allocator keeps what it once
    // needed (glibc's arenas), so the leak check compares the proxies after the measured round
    // with the proxies after this one. A leak would grow round over round.
    warm_up(&cluster, echo, args)?;
    let baseline_held = cold.iter().map(|u| u.held).max().unwrap_or(0);
    wait_released(&cluster, baseline_held)?;
    std::thread::sleep(Duration::from_secs(6));
    let before = settled(&cluster)?;
    eprintln!("soak: before (after a warm-up round): {before:?}");
    let (rr_idle_p50, rr_idle_p99) = rr(&probe, echo, args.rr_seconds)?;
    eprintln!("soak: 64-byte RR without load: p50 {rr_idle_p50:.0} µs, p99 {rr_idle_p99:.0} µs");

    let started = Instant::now();
    let (holders, opened) = open_load(&cluster, echo, args)?;
    let open_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "soak: {opened} of {} tunnels open in {open_seconds:.1} s",
        args.connections
    );
    let peak: Vec<Usage> = cluster.proxies.iter().map(usage).collect::<Result<_>>()?;
    eprintln!("soak: at the peak: {peak:?}");
    let (rr_load_p50, rr_load_p99) = rr(&probe, echo, args.rr_seconds)?;
    eprintln!("soak: RR under the load: p50 {rr_load_p50:.0} µs, p99 {rr_load_p99:.0} µs");

    // The flood: unauthenticated handshakes against the server pod's 15008, while the probe
    // measures again.
    let handshakes_before = counter(
        &cluster.proxies[1],
        "sluice_hbone_server_total",
        "outcome=\"handshake_failed\"",
    )?;
    let flood_seconds = args.rr_seconds + 2.0;
    let flood = start_flood(
        &cluster.pod("attacker").place(),
        server.addr(sluice_capture::PORT_HBONE),
        flood_seconds,
        args.flood_concurrency,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let (rr_flood_p50, rr_flood_p99) = rr(&probe, echo, args.rr_seconds)?;
    let flood: FloodOutcome = flood.finish(Duration::from_secs_f64(flood_seconds + 30.0))?;
    let refused_by_server = counter(
        &cluster.proxies[1],
        "sluice_hbone_server_total",
        "outcome=\"handshake_failed\"",
    )? - handshakes_before;
    eprintln!(
        "soak: RR under the load and a flood of {} handshakes ({:.0}/s): p50 {rr_flood_p50:.0} µs, p99 {rr_flood_p99:.0} µs",
        flood.attempts,
        flood.attempts as f64 / flood_seconds
    );
    ensure!(
        flood.accepted == 0,
        "the flood got {} handshakes through without a certificate",
        flood.accepted
    );

    std::thread::sleep(Duration::from_secs(args.seconds));
    let mut outcomes = Vec::new();
    for holder in holders {
        outcomes.push(holder.finish()?);
    }
    let held_seconds = started.elapsed().as_secs_f64();
    // The probe's own pooled tunnel stays: the proxies come back to what they held before.
    let baseline = before.iter().map(|u| u.held).max().unwrap_or(0);
    wait_released(&cluster, baseline)?;
    // The proxies give freed memory back within 5 s of their load falling
    // (`trim_memory_when_connections_fall`): "after" is measured once they had the chance.
    std::thread::sleep(Duration::from_secs(6));
    let after = settled(&cluster)?;
    eprintln!("soak: after everything closed: {after:?}");

    let proxies: Vec<ProxyReport> = (0..cluster.proxies.len())
        .map(|node| {
            let (c, b, p, a) = (cold[node], before[node], peak[node], after[node]);
            // Each proxy carries every tunnel (node 0 as client sockets, node 1 as app
            // sockets), whatever its own count of accepted connections.
            let held = opened.max(1) as u64;
            ProxyReport {
                node,
                cold: c,
                before: b,
                peak: p,
                after: a,
                // From cold: what holding the tunnels costs a proxy that never held them.
                rss_per_connection_kb: p.rss_kb.saturating_sub(c.rss_kb) as f64 / held as f64,
                rss_after_ratio: a.rss_kb as f64 / b.rss_kb.max(1) as f64,
            }
        })
        .collect();
    let errors: u64 = outcomes
        .iter()
        .map(|o| o.open_errors + o.trickle_errors + o.churn_errors)
        .sum();
    let report = serde_json::json!({
        "benchmark": "soak",
        "command": format!(
            "cargo xtask bench soak --connections {} --pods {} --seconds {} --trickle {} --churn {} --rr-seconds {} --flood-concurrency {}",
            args.connections, args.pods, args.seconds, args.trickle, args.churn, args.rr_seconds, args.flood_concurrency
        ),
        "connections": args.connections,
        "open_file_limit": open_files,
        "opened": opened,
        "open_seconds": open_seconds,
        "held_seconds": held_seconds,
        "proxies": proxies,
        "rr_us": {
            "idle": {"p50": rr_idle_p50, "p99": rr_idle_p99},
            "load": {"p50": rr_load_p50, "p99": rr_load_p99},
            "load_and_flood": {"p50": rr_flood_p50, "p99": rr_flood_p99},
        },
        "flood": {
            "attempts": flood.attempts,
            "per_second": flood.attempts as f64 / flood_seconds,
            "refused_by_server": refused_by_server,
            "connect_errors": flood.connect_errors,
            "accepted": flood.accepted,
        },
        "workload": outcomes,
        "errors": errors,
    });
    std::fs::create_dir_all(out_dir)?;
    let path = out_dir.join("soak.json");
    std::fs::File::create(&path)?.write_all(serde_json::to_string_pretty(&report)?.as_bytes())?;
    print_summary(&report);
    println!("wrote {}", path.display());
    Ok(())
}

fn print_summary(report: &serde_json::Value) {
    println!(
        "\nsoak: {} tunnels opened of {} ({} errors)",
        report["opened"], report["connections"], report["errors"]
    );
    if let Some(proxies) = report["proxies"].as_array() {
        for p in proxies {
            println!(
                "node {} proxy: held {} at the peak; RSS {} cold, {} → {} → {} kB ({:.1} kB per connection, after/before {:.2}); fds {} → {} → {}",
                p["node"],
                p["peak"]["held"],
                p["cold"]["rss_kb"],
                p["before"]["rss_kb"],
                p["peak"]["rss_kb"],
                p["after"]["rss_kb"],
                p["rss_per_connection_kb"].as_f64().unwrap_or(0.0),
                p["rss_after_ratio"].as_f64().unwrap_or(0.0),
                p["before"]["fds"],
                p["peak"]["fds"],
                p["after"]["fds"],
            );
        }
    }
    let rr = &report["rr_us"];
    let p99 = |k: &str| rr[k]["p99"].as_f64().unwrap_or(0.0);
    println!(
        "64-byte RR p99: {:.0} µs idle, {:.0} µs under load, {:.0} µs under load + flood ({:.2}x of under load)",
        p99("idle"),
        p99("load"),
        p99("load_and_flood"),
        p99("load_and_flood") / p99("load").max(1.0)
    );
    println!(
        "flood: {} unauthenticated handshakes ({:.0}/s), {} refused by the server, {} accepted",
        report["flood"]["attempts"],
        report["flood"]["per_second"].as_f64().unwrap_or(0.0),
        report["flood"]["refused_by_server"],
        report["flood"]["accepted"]
    );
}

/// As a node's container runtime does (containerd gives 1,048,576), lifts this process's
/// open-file limit, hard and soft, so the proxies and workloads it starts inherit room for
/// tens of thousands of sockets (the proxy fits its bounds under its limit). Where the hard
/// limit cannot be raised (no `CAP_SYS_RESOURCE`), the soft one goes up to it; returns the
/// limit the soak runs with.
fn raise_open_files() -> Result<u64> {
    let want: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!(
                "read the open-file limit: {}",
                std::io::Error::last_os_error()
            );
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!(
                "raise the open-file limit to {}: {}",
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    eprintln!(
        "soak: the open-file limit stays at {} here (raising it needs CAP_SYS_RESOURCE); each \
         proxy fits its bounds under it",
        limit.rlim_max
    );
    Ok(limit.rlim_max)
}

/// Starts `app soak-serve` on `addr` in `place` and waits until it listens.
fn soak_server(place: &Placement, addr: SocketAddr) -> Result<ProcessGuard> {
    let mut cmd = app::command_in(&app::binary()?, place)?;
    cmd.args(["app", "soak-serve", "--listen", &addr.to_string()]);
    let (guard, line) = app::spawn_held(cmd, "app soak-serve")?;
    ensure!(
        line.trim() == "listening",
        "the soak server printed {line:?}"
    );
    Ok(guard)
}

/// A running flood; its outcome is its one line.
struct Flood {
    guard: ProcessGuard,
}

impl Flood {
    fn finish(mut self, limit: Duration) -> Result<FloodOutcome> {
        let stdout = self.guard.child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(limit)
            .with_context(|| format!("the flood did not finish within {limit:?}"))?;
        serde_json::from_str(line.trim()).with_context(|| format!("the flood printed {line:?}"))
    }
}

fn start_flood(
    place: &Placement,
    to: SocketAddr,
    seconds: f64,
    concurrency: usize,
) -> Result<Flood> {
    let mut cmd = app::command_in(&app::binary()?, place)?;
    cmd.args([
        "app",
        "tls-flood",
        "--to",
        &to.to_string(),
        "--seconds",
        &seconds.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ]);
    cmd.stdout(Stdio::piped());
    Ok(Flood {
        guard: ProcessGuard {
            child: cmd.spawn().context("start app tls-flood")?,
            name: "app tls-flood".to_owned(),
        },
    })
}
