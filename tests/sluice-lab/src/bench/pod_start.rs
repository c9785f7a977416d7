//! `cargo xtask bench pod-start`: what meshing costs a pod's start. Each round starts the same
//! number of pods through the node's CNI chain in every mode, alternating modes so that machine
//! noise hits them alike; the figure is the time the runtime waits for the chain's ADD.

use std::time::Duration;

use anyhow::{Result, bail};
use sluice_capture::Backend;

use super::{MetricResult, median, write_results};
use crate::agent::{AgentLab, CgroupDriver};

/// `direct`: the chain without sluice (bridge + host-local); the others mesh every pod.
const MODES: [(&str, Option<Backend>); 3] = [
    ("direct", None),
    ("iptables", Some(Backend::Iptables)),
    ("ebpf", Some(Backend::Ebpf)),
];

pub fn run(runs: usize, pods: usize) -> Result<()> {
    if runs == 0 || runs > 20 || pods == 0 || pods > 100 {
        bail!("--runs must be 1..=20 and --pods 1..=100");
    }
    let mut adds: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut per_round: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 0..runs {
        for (i, (name, backend)) in MODES.iter().enumerate() {
            let times = start_pods(*backend, pods)?;
            let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
            println!(
                "round {}/{runs} {name:<9} sandbox ADD median {:.1} ms over {pods} pods",
                round + 1,
                median(&ms)
            );
            per_round[i].push(median(&ms));
            adds[i].extend(ms);
        }
    }
    let mut results = Vec::new();
    println!(
        "\n{:<10} {:>14} {:>14}",
        "mode", "ADD p50 (ms)", "ADD p90 (ms)"
    );
    for (i, (name, _)) in MODES.iter().enumerate() {
        let p50 = median(&adds[i]);
        let p90 = percentile(&adds[i], 0.9);
        println!("{name:<10} {p50:>14.1} {p90:>14.1}");
        results.push(MetricResult {
            mode: name,
            metric: "sandbox_add_ms",
            median: p50,
            runs: per_round[i].clone(),
        });
        results.push(MetricResult {
            mode: name,
            metric: "sandbox_add_p90_ms",
            median: p90,
            runs: Vec::new(),
        });
    }
    let direct = median(&adds[0]);
    for (i, (name, _)) in MODES.iter().enumerate().skip(1) {
        println!(
            "{name} adds {:+.1} ms to a pod's start (p50)",
            median(&adds[i]) - direct
        );
    }
    write_results(
        "pod-start",
        &format!("cargo xtask bench pod-start --runs {runs} --pods {pods}"),
        &results,
    )
}

/// Starts `pods` pods on a fresh node; `backend` set: a meshed namespace with agent and proxy.
fn start_pods(backend: Option<Backend>, pods: usize) -> Result<Vec<Duration>> {
    let mut lab = AgentLab::new(backend.unwrap_or(Backend::Iptables), CgroupDriver::Cgroupfs)?;
    lab.set_namespace("bench", backend.is_some())?;
    let names: Vec<String> = (0..pods).map(|i| format!("p{i}")).collect();
    for name in &names {
        lab.list_pod(name, "bench")?;
    }
    if backend.is_some() {
        lab.start_agent()?;
        lab.start_proxy()?;
    }
    let mut times = Vec::with_capacity(pods);
    for name in &names {
        let index = match lab.start_pod(name, "bench")? {
            Ok(index) => index,
            Err(e) => bail!("pod {name} did not start: {e}"),
        };
        times.push(lab.pods[index].add_time);
    }
    Ok(times)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}
