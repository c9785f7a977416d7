//! `cargo xtask bench` with no subcommand: the whole matrix in one run. Every configuration
//! is the same two-node cluster (client pod on node-a, server pod on node-b):
//! - `direct`: no capture, no proxy (the baseline);
//! - `iptables` / `ebpf` × `passthrough`: both pods captured, both proxies in L4 passthrough;
//! - `iptables` / `ebpf` × `hbone`: both pods meshed, traffic in an HBONE tunnel.
//!
//! Each configuration, per round, in a fresh cluster: iperf3 with 1 and 4 streams, 64-byte
//! request/response latency (p50, p99), short connections per second. Configurations rotate per
//! round so the machine's drift hits them alike; medians and ratios at the end. Results in
//! `target/bench/results.json` (the earlier benchmarks' shape plus `path`) and
//! `target/bench/results.svg`.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sluice_capture::Backend;

use super::{chart, median, pair_metrics};
use crate::cluster::{CLIENT_AND_SERVER, Cluster};

/// (mode, path), in the order tables and the chart show them.
pub const CONFIGS: [(&str, &str); 5] = [
    ("direct", "none"),
    ("iptables", "passthrough"),
    ("ebpf", "passthrough"),
    ("iptables", "hbone"),
    ("ebpf", "hbone"),
];

/// (metric, what it is, higher is better).
pub const METRICS: [(&str, &str, bool); 5] = [
    ("throughput_gbps", "Throughput, 1 stream (Gbit/s)", true),
    ("throughput_4_gbps", "Throughput, 4 streams (Gbit/s)", true),
    ("connections_per_s", "New connections per second", true),
    ("rr_p50_us", "Request/response p50 (µs)", false),
    ("rr_p99_us", "Request/response p99 (µs)", false),
];

#[derive(Serialize, Clone, Debug)]
pub struct Result1 {
    pub mode: &'static str,
    pub path: &'static str,
    pub metric: &'static str,
    pub median: f64,
    pub runs: Vec<f64>,
}

/// Where and when the numbers were taken.
#[derive(Serialize, Clone, Debug)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
}

impl Machine {
    fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Self {
            date,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{}, Linux {}, {} × {}",
            self.date, self.kernel, self.cpus, self.cpu
        )
    }
}

fn cluster_for(mode: &str, path: &str) -> Result<Cluster> {
    let pods = CLIENT_AND_SERVER;
    let backend = if mode == "iptables" {
        Backend::Iptables
    } else {
        Backend::Ebpf
    };
    match (mode, path) {
        ("direct", _) => Cluster::unmeshed(&pods),
        (_, "passthrough") => Cluster::passthrough(backend, &pods),
        _ => Cluster::new(backend, &pods, &[]),
    }
}

/// A one-line progress bar with the elapsed time and an estimate of what is left.
fn progress(done: usize, total: usize, started: Instant, what: &str) {
    const WIDTH: usize = 30;
    let filled = WIDTH * done / total.max(1);
    let elapsed = started.elapsed().as_secs();
    let left = if done == 0 {
        "?".to_owned()
    } else {
        format!("{}s", elapsed * (total - done) as u64 / done as u64)
    };
    eprintln!(
        "[{}{}] {done:>2}/{total} {elapsed:>4}s elapsed, ~{left} left  {what}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
}

pub fn run(runs: usize, seconds: u32, rate_seconds: f64, dir: &std::path::Path) -> Result<()> {
    let command = format!(
        "cargo xtask bench --runs {runs} --seconds {seconds} --rate-seconds {rate_seconds}"
    );
    let machine = Machine::here();
    eprintln!(
        "bench matrix: {} configurations × {runs} rounds ({command})",
        CONFIGS.len()
    );
    // samples[config][metric]
    let mut samples = vec![vec![Vec::new(); METRICS.len()]; CONFIGS.len()];
    let total = runs * CONFIGS.len();
    let started = Instant::now();
    for round in 0..runs {
        for k in 0..CONFIGS.len() {
            let c = (round + k) % CONFIGS.len();
            let (mode, path) = CONFIGS[c];
            progress(
                round * CONFIGS.len() + k,
                total,
                started,
                &format!("round {}/{runs}: {mode}/{path}", round + 1),
            );
            let cluster = cluster_for(mode, path).with_context(|| format!("{mode}/{path}"))?;
            let (values, echo) = pair_metrics(&cluster, seconds, rate_seconds)
                .with_context(|| format!("{mode}/{path}"))?;
            drop(echo);
            drop(cluster);
            let v = |i: usize| values[i].map_or("-".to_owned(), |v| format!("{v:.1}"));
            eprintln!(
                "    {mode}/{path}: {} Gbit/s, {} Gbit/s x4, {} conn/s, rr p50 {} µs p99 {} µs",
                v(0),
                v(1),
                v(2),
                v(3),
                v(4)
            );
            for (i, v) in values.iter().enumerate() {
                if let Some(v) = v {
                    samples[c][i].push(*v);
                }
            }
        }
    }
    progress(total, total, started, "done");
    let mut results = Vec::new();
    for (c, (mode, path)) in CONFIGS.iter().enumerate() {
        for (i, (metric, _, _)) in METRICS.iter().enumerate() {
            if !samples[c][i].is_empty() {
                results.push(Result1 {
                    mode,
                    path,
                    metric,
                    median: median(&samples[c][i]),
                    runs: samples[c][i].clone(),
                });
            }
        }
    }
    print!("{}", table(&results));
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join("results.json");
    let json = serde_json::json!({
        "benchmark": "matrix",
        "command": command,
        "machine": machine,
        "results": results,
    });
    std::fs::File::create(&json_path)?
        .write_all(serde_json::to_string_pretty(&json)?.as_bytes())?;
    let svg_path = dir.join("results.svg");
    chart::draw(&svg_path, &results, &machine, &command)?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

pub fn get(results: &[Result1], mode: &str, path: &str, metric: &str) -> Option<f64> {
    results
        .iter()
        .find(|r| r.mode == mode && r.path == path && r.metric == metric)
        .map(|r| r.median)
}

/// eBPF over iptables on `path` for `metric`, formatted (`1.23×`, or `-` when not measured).
pub fn ebpf_over_iptables(results: &[Result1], path: &str, metric: &str) -> String {
    match (
        get(results, "ebpf", path, metric),
        get(results, "iptables", path, metric),
    ) {
        (Some(e), Some(i)) if i > 0.0 => format!("{:.2}×", e / i),
        _ => "-".to_owned(),
    }
}

/// The medians as a Markdown table, then the ratios that answer the questions.
pub fn table(results: &[Result1]) -> String {
    let mut out = String::from(
        "\n| mode | path | Gbit/s | Gbit/s, 4 streams | conn/s | RR p50 µs | RR p99 µs |\n|---|---|---|---|---|---|---|\n",
    );
    for (mode, path) in CONFIGS {
        let cell = |metric: &str| {
            get(results, mode, path, metric).map_or("-".to_owned(), |v| {
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
        };
        out.push_str(&format!(
            "| {mode} | {path} | {} | {} | {} | {} | {} |\n",
            cell("throughput_gbps"),
            cell("throughput_4_gbps"),
            cell("connections_per_s"),
            cell("rr_p50_us"),
            cell("rr_p99_us"),
        ));
    }
    out.push('\n');
    for path in ["passthrough", "hbone"] {
        let ratio = |metric: &str| ebpf_over_iptables(results, path, metric);
        out.push_str(&format!(
            "ebpf / iptables, {path}: throughput {}, 4 streams {}, connections {}, p50 latency {}\n",
            ratio("throughput_gbps"),
            ratio("throughput_4_gbps"),
            ratio("connections_per_s"),
            ratio("rr_p50_us"),
        ));
    }
    for path in ["passthrough", "hbone"] {
        let ratio = |metric: &str| match (
            get(results, "ebpf", path, metric),
            get(results, "direct", "none", metric),
        ) {
            (Some(e), Some(d)) if d > 0.0 => format!("{:.2}×", e / d),
            _ => "-".to_owned(),
        };
        let added = match (
            get(results, "ebpf", path, "rr_p50_us"),
            get(results, "direct", "none", "rr_p50_us"),
        ) {
            (Some(e), Some(d)) => format!("{:+.0} µs", e - d),
            _ => "-".to_owned(),
        };
        out.push_str(&format!(
            "ebpf {path} / direct: throughput {}, connections {}, p50 latency {added}\n",
            ratio("throughput_gbps"),
            ratio("connections_per_s"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic() -> Vec<Result1> {
        let mut results = Vec::new();
        for (c, (mode, path)) in CONFIGS.iter().enumerate() {
            for (m, (metric, _, _)) in METRICS.iter().enumerate() {
                let v = (c + 1) as f64 * 10.0 + m as f64;
                results.push(Result1 {
                    mode,
                    path,
                    metric,
                    median: v,
                    runs: vec![v],
                });
            }
        }
        results
    }

    #[test]
    fn the_table_and_chart_show_every_configuration_and_the_ratios() {
        let results = synthetic();
        let table = table(&results);
        assert!(
            table.contains("| ebpf | hbone | 50.00 | 51.00 | 52.00 | 53.00 | 54.00 |"),
            "{table}"
        );
        // eBPF passthrough (30) over iptables passthrough (20).
        assert!(
            table.contains("ebpf / iptables, passthrough: throughput 1.50×"),
            "{table}"
        );
        let dir = std::env::temp_dir().join(format!("sluice-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let svg = dir.join("results.svg");
        let machine = Machine {
            date: "2026-11-23".into(),
            kernel: "6.18".into(),
            cpu: "test CPU".into(),
            cpus: 2,
        };
        chart::draw(&svg, &results, &machine, "cargo xtask bench").expect("draw");
        let text = std::fs::read_to_string(&svg).expect("read the chart");
        let _ = std::fs::remove_dir_all(&dir);
        chart::check(&text).expect("a complete chart");
        assert!(text.contains("higher is better") && text.contains("lower is better"));
        assert!(
            text.contains("2026-11-23"),
            "the chart says when it was measured"
        );
        assert!(text.contains("\n54.00\n"), "bars carry their values");
    }
}
