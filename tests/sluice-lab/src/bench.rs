//! `cargo xtask bench capture`: what capture costs, measured side by side in one run.
//! `cargo xtask bench hbone`: what the mesh costs, pod to pod across two nodes (see
//! [`run_hbone`]).
//!
//! A client in a pod talks to a server on the peer host: iperf3 single-stream throughput and a
//! short-connection rate test, in each mode: `direct` (no capture, no proxy), `iptables`,
//! `ebpf` (both through the proxy in passthrough, splice copy) and `ebpf-buffered` (the same
//! with the proxy copying through userspace buffers, to measure splice). Modes are interleaved
//! and rotated per round so drift on this noisy machine hits all of them alike.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sluice_capture::Backend;

use crate::app::{self, Placement};
use crate::lab::{Lab, PEER_IP};
use crate::proxy::ProxyProcess;

pub mod chart;
pub mod matrix;
mod pod_start;
pub mod soak;

/// The matrix's options (`cargo xtask bench` with no subcommand).
#[derive(clap::Args, Clone, Debug)]
pub struct MatrixArgs {
    /// Rounds; each round measures every configuration once.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Seconds per connection-rate and request/response run.
    #[arg(long, default_value_t = 2.0)]
    pub rate_seconds: f64,
    /// Where results.json and results.svg go (default: target/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The whole matrix: direct, iptables and eBPF × passthrough and HBONE, every metric.
pub fn run_matrix(args: &MatrixArgs) -> Result<()> {
    check_bounds(args.runs, args.seconds, args.rate_seconds)?;
    require_tool("iperf3")?;
    let out = out_dir(args.out.as_ref())?;
    matrix::run(args.runs, args.seconds, args.rate_seconds, &out)
}

/// Where a benchmark writes: `out` if given, else `target/bench`.
fn out_dir(out: Option<&PathBuf>) -> Result<PathBuf> {
    match out {
        Some(dir) => Ok(dir.clone()),
        None => Ok(output_path()?
            .parent()
            .context("bench output dir")?
            .to_path_buf()),
    }
}

fn check_bounds(runs: usize, seconds: u32, rate_seconds: f64) -> Result<()> {
    if runs == 0
        || runs > 20
        || seconds == 0
        || seconds > 60
        || !(0.5..=60.0).contains(&rate_seconds)
    {
        bail!("--runs must be 1..=20, --seconds 1..=60, --rate-seconds 0.5..=60");
    }
    Ok(())
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum Which {
    /// Capture cost: direct vs iptables vs eBPF (client pod → peer server).
    Capture {
        /// Rounds; each round measures every mode once.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Seconds per connection-rate run.
        #[arg(long, default_value_t = 3.0)]
        rate_seconds: f64,
    },
    /// Pod start cost: how long a sandbox's CNI ADD takes through the node's chain, without
    /// sluice (`direct`: bridge + host-local) and with it meshing the pod (`iptables`, `ebpf`:
    /// capture in place and the proxy's ack).
    PodStart {
        /// Rounds; each round starts `pods` pods in every mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Pods started per mode and round.
        #[arg(long, default_value_t = 10)]
        pods: usize,
    },
    /// Mesh cost: a client pod on one node to a server pod on the other, `direct` (no mesh)
    /// vs HBONE with `iptables` or `ebpf` capture.
    /// Under load: thousands of held tunnels with a trickle and churn, then an unauthenticated
    /// handshake flood; each proxy's RSS and fds before, at the peak and after, and the
    /// latency of a behaving client throughout (`target/bench/soak.json`).
    Soak(soak::SoakArgs),
    Hbone {
        /// Rounds; each round measures every mode once.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Seconds per connection-rate and request/response run.
        #[arg(long, default_value_t = 3.0)]
        rate_seconds: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Direct,
    Iptables,
    Ebpf,
    EbpfBuffered,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Ebpf, Mode::EbpfBuffered];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
            Mode::EbpfBuffered => "ebpf-buffered",
        }
    }
}

#[derive(Serialize)]
struct MetricResult {
    mode: &'static str,
    metric: &'static str,
    median: f64,
    runs: Vec<f64>,
}

pub fn run(which: Which) -> Result<()> {
    let (hbone, runs, seconds, rate_seconds) = match which {
        Which::PodStart { runs, pods } => return pod_start::run(runs, pods),
        Which::Soak(args) => {
            let out = out_dir(args.out.as_ref())?;
            return soak::run(&args, &out);
        }
        Which::Capture {
            runs,
            seconds,
            rate_seconds,
        } => (false, runs, seconds, rate_seconds),
        Which::Hbone {
            runs,
            seconds,
            rate_seconds,
        } => (true, runs, seconds, rate_seconds),
    };
    check_bounds(runs, seconds, rate_seconds)?;
    require_tool("iperf3")?;
    if hbone {
        return run_hbone(runs, seconds, rate_seconds);
    }
    let mut gbps: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    for round in 0..runs {
        for k in 0..Mode::ALL.len() {
            let i = (round + k) % Mode::ALL.len();
            let mode = Mode::ALL[i];
            let (g, r) = measure(mode, seconds, rate_seconds)
                .with_context(|| format!("mode {}", mode.name()))?;
            eprintln!(
                "round {}/{runs} {:<14} {g:>7.2} Gbit/s {r:>9.0} conn/s",
                round + 1,
                mode.name()
            );
            gbps[i].push(g);
            rate[i].push(r);
        }
    }
    let mut results = Vec::new();
    for (i, mode) in Mode::ALL.iter().enumerate() {
        results.push(MetricResult {
            mode: mode.name(),
            metric: "throughput_gbps",
            median: median(&gbps[i]),
            runs: gbps[i].clone(),
        });
        results.push(MetricResult {
            mode: mode.name(),
            metric: "connections_per_s",
            median: median(&rate[i]),
            runs: rate[i].clone(),
        });
    }
    print_table(&results);
    write_results(
        "capture",
        &format!(
            "cargo xtask bench capture --runs {runs} --seconds {seconds} --rate-seconds {rate_seconds}"
        ),
        &results,
    )
}

/// Writes `target/bench/<name>.json`: the benchmark, the command that produced it, the results.
fn write_results(name: &str, command: &str, results: &[MetricResult]) -> Result<()> {
    let path = output_path()?.with_file_name(format!("{name}.json"));
    std::fs::create_dir_all(path.parent().context("output dir")?)?;
    let json = serde_json::json!({ "benchmark": name, "command": command, "results": results });
    std::fs::File::create(&path)?.write_all(serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}

/// One throughput run and one connection-rate run in a fresh lab.
fn measure(mode: Mode, seconds: u32, rate_seconds: f64) -> Result<(f64, f64)> {
    let backend = if mode == Mode::Iptables {
        Backend::Iptables
    } else {
        Backend::Ebpf
    };
    let mut lab = Lab::new(backend)?;
    let _proxy = match mode {
        Mode::Direct => None,
        Mode::Ebpf | Mode::Iptables => {
            lab.capture()?;
            Some(ProxyProcess::start(&lab, &[])?)
        }
        Mode::EbpfBuffered => {
            lab.capture()?;
            Some(ProxyProcess::start(&lab, &["--copy", "buffered"])?)
        }
    };
    let gbps = iperf3(&lab, seconds)?;
    let server = SocketAddr::V4(SocketAddrV4::new(PEER_IP, 7070));
    let _echo = app::spawn_server(&lab.in_peer(), &[server])?;
    let per_second = connrate(&lab.in_pod_cgroup(), server, rate_seconds)?;
    Ok((gbps, per_second))
}

fn iperf3(lab: &Lab, seconds: u32) -> Result<f64> {
    iperf3_between(&lab.in_peer(), PEER_IP, &lab.in_pod_cgroup(), seconds, 1)
}

/// iperf3 from `client` to a server started in `server` on `server_ip`; Gbit/s received.
fn iperf3_between(
    server_place: &Placement,
    server_ip: std::net::Ipv4Addr,
    client_place: &Placement,
    seconds: u32,
    streams: u32,
) -> Result<f64> {
    let port = "5201";
    let mut server = app::command_in(&which("iperf3")?, server_place)?;
    server
        .args(["-s", "-1", "-B", &server_ip.to_string(), "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = app::ProcessGuard {
        child: server.spawn().context("start iperf3 -s")?,
        name: "iperf3 -s".into(),
    };
    // The server needs a moment to bind; retry the client a bounded number of times.
    let mut last = String::new();
    for _ in 0..20 {
        let mut client = app::command_in(&which("iperf3")?, client_place)?;
        client.args([
            "-c",
            &server_ip.to_string(),
            "-p",
            port,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ]);
        let out = client.output().context("run iperf3 -c")?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps / 1e9);
        }
        last = report["error"].as_str().unwrap_or("no report").to_owned();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("iperf3 failed: {last}")
}

fn connrate(place: &Placement, to: SocketAddr, seconds: f64) -> Result<f64> {
    let mut cmd = app::command_in(&app::binary()?, place)?;
    cmd.args([
        "app",
        "connrate",
        "--to",
        &to.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    let out = cmd.output().context("run the connection-rate client")?;
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("connrate output")?;
    let errors = summary["errors"].as_u64().unwrap_or(u64::MAX);
    if errors > 0 {
        bail!("connection-rate run had {errors} failed connections: {summary}");
    }
    summary["per_second"].as_f64().context("per_second missing")
}

/// The HBONE benchmark's modes: the same two-node cluster without the mesh, and with it;
/// `ebpf-own-src` is eBPF with `--preserve-source=false` (the app sees its own pod's address),
/// what source preservation is measured against.
const HBONE_MODES: [&str; 4] = ["direct", "iptables", "ebpf", "ebpf-own-src"];
const HBONE_METRICS: [&str; 6] = [
    "throughput_gbps",
    "throughput_4_gbps",
    "rr_p50_us",
    "rr_p99_us",
    "connections_per_s",
    "rss_mb_1000_idle",
];
const IDLE_CONNECTIONS: usize = 1000;

/// `cargo xtask bench hbone`: client pod on node 0 → server pod on node 1. Per mode and round,
/// a fresh cluster: iperf3 with 1 and 4 streams, 64-byte request/response latency (p50, p99),
/// short connections per second, and (with the mesh) the client node's proxy RSS while 1,000
/// idle tunnelled connections are open. Modes rotate per round; medians and ratios at the end;
/// JSON in `target/bench/hbone.json`, in the capture benchmark's shape. Arguments are checked by
/// [`run`].
fn run_hbone(runs: usize, seconds: u32, rate_seconds: f64) -> Result<()> {
    // samples[mode][metric]
    let mut samples = vec![vec![Vec::new(); HBONE_METRICS.len()]; HBONE_MODES.len()];
    for round in 0..runs {
        for k in 0..HBONE_MODES.len() {
            let m = (round + k) % HBONE_MODES.len();
            let values = measure_hbone(HBONE_MODES[m], seconds, rate_seconds)
                .with_context(|| format!("mode {}", HBONE_MODES[m]))?;
            let v = |i: usize| values[i].map_or("-".to_owned(), |v| format!("{v:.1}"));
            eprintln!(
                "round {}/{runs} {:<9} {:>6} Gbit/s  {:>6} Gbit/s x4  rr p50 {:>6} µs p99 {:>6} µs  {:>7} conn/s  rss {} MB",
                round + 1,
                HBONE_MODES[m],
                v(0),
                v(1),
                v(2),
                v(3),
                v(4),
                v(5),
            );
            for (i, v) in values.iter().enumerate() {
                if let Some(v) = v {
                    samples[m][i].push(*v);
                }
            }
        }
    }
    let mut results = Vec::new();
    for (m, mode) in HBONE_MODES.iter().enumerate() {
        for (i, metric) in HBONE_METRICS.iter().enumerate() {
            if samples[m][i].is_empty() {
                continue;
            }
            results.push(MetricResult {
                mode,
                metric,
                median: median(&samples[m][i]),
                runs: samples[m][i].clone(),
            });
        }
    }
    let get = |mode: &str, metric: &str| {
        results
            .iter()
            .find(|r| r.mode == mode && r.metric == metric)
            .map(|r| r.median)
    };
    println!();
    println!(
        "{:<9} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "mode", "Gbit/s", "Gbit/s x4", "p50 µs", "p99 µs", "conn/s", "RSS MB"
    );
    for mode in HBONE_MODES {
        let cell = |metric: &str| get(mode, metric).map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "{mode:<9} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9}",
            cell("throughput_gbps"),
            cell("throughput_4_gbps"),
            cell("rr_p50_us"),
            cell("rr_p99_us"),
            cell("connections_per_s"),
            cell("rss_mb_1000_idle"),
        );
    }
    println!();
    for mode in ["ebpf", "iptables"] {
        let ratio = |metric: &str| match (get(mode, metric), get("direct", metric)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".to_owned(),
        };
        let added = |metric: &str| match (get(mode, metric), get("direct", metric)) {
            (Some(a), Some(b)) => format!("{:+.0} µs", a - b),
            _ => "-".to_owned(),
        };
        println!(
            "{mode} / direct: throughput {}, 4 streams {}, connections {}; added latency p50 {}, p99 {}",
            ratio("throughput_gbps"),
            ratio("throughput_4_gbps"),
            ratio("connections_per_s"),
            added("rr_p50_us"),
            added("rr_p99_us"),
        );
    }
    if let (Some(e), Some(i)) = (
        get("ebpf", "throughput_gbps"),
        get("iptables", "throughput_gbps"),
    ) {
        println!("ebpf / iptables (HBONE): throughput {:.2}x", e / i);
    }
    let preserved = |metric: &str| match (get("ebpf", metric), get("ebpf-own-src", metric)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}x", a / b),
        _ => "-".to_owned(),
    };
    println!(
        "ebpf, source preserved / not (HBONE): throughput {}, 4 streams {}, connections {}",
        preserved("throughput_gbps"),
        preserved("throughput_4_gbps"),
        preserved("connections_per_s"),
    );
    write_results(
        "hbone",
        &format!(
            "cargo xtask bench hbone --runs {runs} --seconds {seconds} --rate-seconds {rate_seconds}"
        ),
        &results,
    )
}

/// One sample of every HBONE metric, in [`HBONE_METRICS`] order, in a fresh cluster.
fn measure_hbone(mode: &str, seconds: u32, rate_seconds: f64) -> Result<[Option<f64>; 6]> {
    use crate::cluster::{CLIENT_AND_SERVER, Cluster};
    let pods = CLIENT_AND_SERVER;
    let cluster = match mode {
        "direct" => Cluster::unmeshed(&pods)?,
        "iptables" => Cluster::new(Backend::Iptables, &pods, &[])?,
        "ebpf-own-src" => {
            Cluster::with_proxy_args(Backend::Ebpf, &pods, &[], &["--preserve-source=false"])?
        }
        _ => Cluster::new(Backend::Ebpf, &pods, &[])?,
    };
    let ([one, four, per_second, p50, p99], _echo) = pair_metrics(&cluster, seconds, rate_seconds)?;
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let echo_addr = server.addr(7070);
    let rss = match cluster.proxies.first() {
        Some(proxy) => Some(rss_with_idle(&client.place(), echo_addr, proxy.pid())?),
        None => None,
    };
    Ok([one, four, p50, p99, per_second, rss])
}

/// Client pod → server pod of `cluster`: Gbit/s with 1 and 4 iperf3 streams, connections per
/// second, request/response p50 and p99 in µs (the matrix's metric order). The echo server on
/// the server pod's :7070 is handed back running, for further measurements.
fn pair_metrics(
    cluster: &crate::cluster::Cluster,
    seconds: u32,
    rate_seconds: f64,
) -> Result<([Option<f64>; 5], app::ProcessGuard)> {
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let one = iperf3_between(
        &server.place_server(),
        server.ip,
        &client.place(),
        seconds,
        1,
    )?;
    let four = iperf3_between(
        &server.place_server(),
        server.ip,
        &client.place(),
        seconds,
        4,
    )?;
    let echo_addr = server.addr(7070);
    let echo = app::spawn_server(&server.place_server(), &[echo_addr])?;
    let mut rr = app::command_in(&app::binary()?, &client.place())?;
    rr.args([
        "app",
        "rr",
        "--to",
        &echo_addr.to_string(),
        "--seconds",
        &rate_seconds.to_string(),
    ]);
    let out = rr.output().context("run the request/response client")?;
    let rr: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rr output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let per_second = connrate(&client.place(), echo_addr, rate_seconds)?;
    let values = [
        Some(one),
        Some(four),
        Some(per_second),
        rr["p50_us"].as_f64(),
        rr["p99_us"].as_f64(),
    ];
    Ok((values, echo))
}

/// The proxy's resident memory (MB) while the client holds [`IDLE_CONNECTIONS`] open.
fn rss_with_idle(client: &Placement, to: SocketAddr, proxy_pid: u32) -> Result<f64> {
    let _held = app::hold_connections(client, to, IDLE_CONNECTIONS)?;
    let status = std::fs::read_to_string(format!("/proc/{proxy_pid}/status"))
        .context("read the proxy's /proc status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc status")?;
    Ok(kib / 1024.0)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_table(results: &[MetricResult]) {
    let get = |mode: &str, metric: &str| {
        results
            .iter()
            .find(|r| r.mode == mode && r.metric == metric)
            .map_or(0.0, |r| r.median)
    };
    println!(
        "\n{:<14} {:>16} {:>16}",
        "mode", "Gbit/s (median)", "conn/s (median)"
    );
    for mode in Mode::ALL {
        println!(
            "{:<14} {:>16.2} {:>16.0}",
            mode.name(),
            get(mode.name(), "throughput_gbps"),
            get(mode.name(), "connections_per_s")
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "\nebpf / iptables: throughput {:.2}x, connections {:.2}x",
        ratio(
            get("ebpf", "throughput_gbps"),
            get("iptables", "throughput_gbps")
        ),
        ratio(
            get("ebpf", "connections_per_s"),
            get("iptables", "connections_per_s")
        )
    );
    println!(
        "ebpf / direct:   throughput {:.2}x, connections {:.2}x",
        ratio(
            get("ebpf", "throughput_gbps"),
            get("direct", "throughput_gbps")
        ),
        ratio(
            get("ebpf", "connections_per_s"),
            get("direct", "connections_per_s")
        )
    );
    println!(
        "splice / buffered copy (ebpf): throughput {:.2}x",
        ratio(
            get("ebpf", "throughput_gbps"),
            get("ebpf-buffered", "throughput_gbps")
        )
    );
}

/// `target/bench/capture.json`, next to the binaries' profile dir.
fn output_path() -> Result<PathBuf> {
    let bin = app::binary()?;
    let target = bin
        .parent()
        .and_then(|p| p.parent())
        .context("binary is not under a target dir")?;
    Ok(target.join("bench").join("capture.json"))
}

fn which(tool: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.exists())
        .with_context(|| format!("{tool} not found; `cargo xtask setup` installs it"))
}

fn require_tool(tool: &str) -> Result<()> {
    which(tool).map(drop)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
