//! `cargo xtask demo`: sluice's main job, narrated on a small standalone cluster.
//!
//! Two nodes (network namespaces routed over a veth), each with the CNI chain bridge +
//! host-local, its `sluice-cni-agent` (standalone: a pods file stands in for the API server)
//! and its `sluice-proxy`. Pods `sleep` and `notsleep` on node-a and `echo` on node-b start
//! through the CNI chain in namespace `demo`, which is not meshed yet. Then:
//! 1. plain traffic crosses the node link in the clear;
//! 2. labelling `demo` ambient in the pods files meshes the running pods (no restart);
//! 3. the same call now goes through HBONE, with both SPIFFE identities in the proxies' access
//!    logs and nothing readable on the node link;
//! 4. an AuthorizationPolicy allows `sleep` and resets `notsleep`;
//! 5. the metrics that moved.
//!
//! Every outcome is checked, so the demo fails loudly when sluice does not do what it shows.
//! `--keep` leaves the cluster up until Ctrl-C; Ctrl-C or the end removes everything.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use sluice_capture::Backend;

use crate::ambient::{AMBIENT_LABEL, AmbientCluster, NODES};
use crate::app::{self, Outcome};

/// The namespace the demo meshes.
const NAMESPACE: &str = "demo";
/// The echo server's port in the `echo` pod.
const PORT: u16 = 8080;
/// Bytes each client sends (and gets back).
const BYTES: u64 = 16 * 1024;
const STEPS: usize = 7;

/// Istio's getting-started policy, for the demo's server: only `sleep`'s identity may call it.
pub const ECHO_VIEWER: &str = r#"- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: echo-viewer, namespace: demo}
  spec:
    selector: {matchLabels: {app: echo}}
    action: ALLOW
    rules:
      - from:
          - source:
              principals: [cluster.local/ns/demo/sa/sleep]
"#;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub backend: Backend,
    /// Leave the cluster running until Ctrl-C.
    pub keep: bool,
}

/// What the demo showed; the end-to-end test checks it too.
#[derive(Debug, Default)]
pub struct Report {
    pub plain_payload_on_link: bool,
    pub hbone_payload_on_link: bool,
    pub source_identity: String,
    pub destination_identity: String,
    pub notsleep_error: String,
    /// The client address echo saw on the tunnelled call: sleep's own (source preserved).
    pub echo_saw_tunnelled: String,
    /// The client address echo saw on node-b's kubelet probe (Istio's probe address).
    pub echo_saw_probe: String,
    /// `istio_tcp_connections_opened_total` reported by the destination for sleep → echo.
    pub opened_sleep_to_echo: u64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only an atomic store: async-signal-safe. The demo notices between steps and unwinds,
    // so every guard runs.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Lets Ctrl-C (and SIGTERM) end the demo with its clean-up; the binary's `main` calls it.
pub fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: removing everything the demo created");
    }
    Ok(())
}

struct Narrator {
    started: Instant,
    step: usize,
}

impl Narrator {
    fn step(&mut self, title: &str) -> Result<()> {
        check_interrupt()?;
        self.step += 1;
        println!(
            "\n[{}/{STEPS}] {title}  (t={:.1}s)",
            self.step,
            self.started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

fn outcome_line(from: &str, to: SocketAddr, o: &Outcome) -> String {
    if o.ok {
        format!(
            "{from:<8} → echo {to}: ok, {} bytes echoed; echo saw the client as {}",
            o.echoed,
            o.server_saw.as_deref().unwrap_or("?")
        )
    } else {
        format!(
            "{from:<8} → echo {to}: refused: {}",
            o.error.as_deref().unwrap_or("?")
        )
    }
}

/// A `key=value` field of a log line (quotes stripped): the event's own, after the span's.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.rfind(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// The newest access-log line of a proxy with every needle.
fn access_line(cluster: &AmbientCluster, node: usize, needles: &[&str]) -> Result<String> {
    let proxy = cluster.nodes[node].proxy()?;
    proxy.wait_for_log(needles)?;
    proxy
        .log()
        .into_iter()
        .rev()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .ok_or_else(|| anyhow::anyhow!("no log line with {needles:?}"))
}

/// A Prometheus sample: name, labels, value.
type Sample<'a> = (&'a str, Vec<(&'a str, &'a str)>, u64);

/// Reads a Prometheus sample line: `name{a="b",…} 3`.
fn sample(line: &str) -> Option<Sample<'_>> {
    let (series, value) = line.rsplit_once(' ')?;
    let (name, labels) = series.split_once('{')?;
    let labels = labels
        .trim_end_matches('}')
        .split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k, v.trim_end_matches('"')))
        })
        .collect();
    Some((name, labels, value.parse().ok()?))
}

fn label<'a>(labels: &[(&'a str, &'a str)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("-", |(_, v)| v)
}

pub fn run(options: Options) -> Result<Report> {
    let result = demo(options);
    if result.is_err() && INTERRUPTED.load(Ordering::SeqCst) {
        println!("\ninterrupted: everything the demo created has been removed");
        return result;
    }
    result
}

fn demo(options: Options) -> Result<Report> {
    let backend = options.backend;
    let mut report = Report::default();
    let mut say = Narrator {
        started: Instant::now(),
        step: 0,
    };
    println!(
        "sluice demo: a two-node ambient mesh in network namespaces, {} capture",
        match backend {
            Backend::Ebpf => "eBPF",
            Backend::Iptables => "iptables",
        }
    );

    say.step("cluster: two nodes, each with its CNI chain, sluice-cni-agent and sluice-proxy")?;
    let mut cluster = AmbientCluster::new(backend)?;
    for (n, node) in cluster.nodes.iter().enumerate() {
        let chain = node.primary_conflist()?["plugins"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["type"].as_str())
                    .collect::<Vec<_>>()
                    .join(" → ")
            })
            .unwrap_or_default();
        println!(
            "  {} (netns {}): pods {}, CNI chain {chain}",
            NODES[n].0, node.node.name, NODES[n].1
        );
        println!(
            "    sluice-cni-agent: pods file {}; sluice-proxy: metrics {}",
            node.path("pods.yaml").display(),
            node.proxy()?.endpoint("metrics")?
        );
        ensure!(
            chain.ends_with("sluice-cni"),
            "the agent did not add sluice-cni to {}'s chain ({chain})",
            NODES[n].0
        );
    }
    println!(
        "  both proxies share one CA and a mesh file: {}",
        cluster.mesh_file().display()
    );

    say.step(&format!(
        "pods start through the CNI chain in namespace {NAMESPACE} (not meshed yet)"
    ))?;
    cluster.nodes[0].set_namespace(NAMESPACE, false)?;
    cluster.nodes[1].set_namespace(NAMESPACE, false)?;
    for (node, name) in [(0, "sleep"), (0, "notsleep"), (1, "echo")] {
        cluster.start_pod(node, name, NAMESPACE)?;
        let (_, pod) = cluster.pod(name)?;
        println!(
            "  {NAMESPACE}/{name:<9} on {}: {} (CNI ADD took {} ms)",
            NODES[node].0,
            pod.ip,
            pod.add_time.as_millis()
        );
    }
    let echo = cluster.pod("echo")?.1.addr(PORT);
    let _server = app::spawn_server(
        &cluster.pod("echo")?.1.place(),
        &[SocketAddr::from(([0, 0, 0, 0], PORT))],
    )?;
    println!("  echo serves on {echo}");

    say.step("before the mesh: plain TCP between the nodes")?;
    let link = cluster.capture_link()?;
    let plain = app::run_client(&cluster.pod("sleep")?.1.place(), echo, BYTES)?;
    println!("  {}", outcome_line("sleep", echo, &plain));
    ensure!(plain.ok, "plain traffic between the pods failed: {plain:?}");
    report.plain_payload_on_link = link.contains(b"peer=");
    println!(
        "  the node link carried the app's bytes in the clear: {}",
        if report.plain_payload_on_link {
            "yes"
        } else {
            "no"
        }
    );
    drop(link);
    ensure!(
        report.plain_payload_on_link,
        "the plain connection's bytes were not seen on the node link"
    );

    say.step(&format!(
        "mesh namespace {NAMESPACE}: label it {AMBIENT_LABEL} in the pods files (no pod restart)"
    ))?;
    let meshing = Instant::now();
    cluster.set_ambient(NAMESPACE, true)?;
    println!(
        "  node-a captured {NAMESPACE}/sleep and {NAMESPACE}/notsleep, node-b {NAMESPACE}/echo, in {} ms; the mesh file now lists them as HBONE",
        meshing.elapsed().as_millis()
    );
    for (n, node) in cluster.nodes.iter().enumerate() {
        if let Some(line) = node
            .agent()?
            .log()
            .iter()
            .rev()
            .find(|l| l.contains("captured") || l.contains("handed"))
        {
            println!("  {} agent: {}", NODES[n].0, tail(line));
        }
    }

    say.step("sleep → echo again: now an HBONE tunnel (HTTP/2 CONNECT in mutual TLS to :15008)")?;
    let link = cluster.capture_link()?;
    let meshed = app::run_client(&cluster.pod("sleep")?.1.place(), echo, BYTES)?;
    println!("  {}", outcome_line("sleep", echo, &meshed));
    ensure!(meshed.ok, "the meshed call failed: {meshed:?}");
    report.echo_saw_tunnelled = meshed.server_saw.clone().unwrap_or_default();
    println!(
        "  echo saw sleep's own address and port ({}), not its proxy's: the source is preserved",
        report.echo_saw_tunnelled
    );
    ensure!(
        meshed.server_saw.is_some() && meshed.server_saw == meshed.local,
        "echo must see sleep's own address and port through the tunnel: echo saw {:?}, sleep's socket was {:?}",
        meshed.server_saw,
        meshed.local
    );
    let outbound = access_line(
        &cluster,
        0,
        &["connection closed", "hbone=true", "direction=\"outbound\""],
    )?;
    let inbound = access_line(&cluster, 1, &["connection closed", "hbone=true"])?;
    for (who, line) in [
        ("node-a proxy (source)", &outbound),
        ("node-b proxy (destination)", &inbound),
    ] {
        println!(
            "  {who}: {} {} → {}, src_identity {}, dst_identity {}, {} bytes sent",
            field(line, "direction").unwrap_or("?"),
            field(line, "src").unwrap_or("?"),
            field(line, "dst").unwrap_or("?"),
            field(line, "src_identity").unwrap_or("?"),
            field(line, "dst_identity").unwrap_or("?"),
            field(line, "bytes_sent").unwrap_or("?"),
        );
    }
    report.source_identity = field(&inbound, "src_identity").unwrap_or("-").to_owned();
    report.destination_identity = field(&inbound, "dst_identity").unwrap_or("-").to_owned();
    ensure!(
        report.source_identity == "spiffe://cluster.local/ns/demo/sa/sleep"
            && report.destination_identity == "spiffe://cluster.local/ns/demo/sa/echo",
        "the destination proxy did not see both identities: {inbound}"
    );
    report.hbone_payload_on_link = link.contains(b"peer=");
    drop(link);
    println!(
        "  the node link carried the app's bytes in the clear: {} (only TLS records to {}:15008)",
        if report.hbone_payload_on_link {
            "yes"
        } else {
            "no"
        },
        echo.ip()
    );
    ensure!(
        !report.hbone_payload_on_link,
        "the meshed connection's bytes appeared in the clear on the node link"
    );

    say.step("policy: an AuthorizationPolicy lets only sleep's identity call echo")?;
    for line in ECHO_VIEWER.lines() {
        println!("    {line}");
    }
    cluster.set_policies(ECHO_VIEWER)?;
    let allowed = app::run_client(&cluster.pod("sleep")?.1.place(), echo, BYTES)?;
    let denied = app::run_client(&cluster.pod("notsleep")?.1.place(), echo, BYTES)?;
    println!("  {}", outcome_line("sleep", echo, &allowed));
    println!("  {}", outcome_line("notsleep", echo, &denied));
    report.notsleep_error = denied.error.clone().unwrap_or_default();
    ensure!(allowed.ok, "sleep must be allowed: {allowed:?}");
    ensure!(
        !denied.ok && report.notsleep_error.contains("reset"),
        "notsleep must be reset: {denied:?}"
    );
    let denial = access_line(&cluster, 1, &["denied by policy", "sa/notsleep"])?;
    println!("  node-b proxy: {}", tail(&denial));
    // Kubelet probes come from the node itself: they reach the app whatever the policy, as in
    // Istio (from its probe address, which capture lets through).
    let probe = cluster.nodes[1].probe(echo)?;
    report.echo_saw_probe = probe.server_saw.clone().unwrap_or_default();
    println!(
        "  node-b's kubelet probe → echo {echo}: {} (echo saw {}, Istio's probe address; not subject to policy)",
        if probe.ok { "ok" } else { "failed" },
        report.echo_saw_probe
    );
    ensure!(
        probe.ok && report.echo_saw_probe.starts_with("169.254.7.127:"),
        "node-b's kubelet probe must reach echo from 169.254.7.127: {probe:?}"
    );

    say.step("metrics that moved (Prometheus, Istio's names)")?;
    for (n, node) in cluster.nodes.iter().enumerate() {
        let (status, body) = node.proxy()?.get("metrics", "/metrics")?;
        ensure!(status == 200, "{} /metrics answered {status}", NODES[n].0);
        println!(
            "  {} {}/metrics:",
            NODES[n].0,
            node.proxy()?.endpoint("metrics")?
        );
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels, value)) = sample(line) else {
                continue;
            };
            if value == 0 {
                continue;
            }
            match name {
                "istio_tcp_connections_opened_total" | "istio_tcp_sent_bytes_total" => {
                    println!(
                        "    {name}{{reporter={}, {} → {}, {}}} {value}",
                        label(&labels, "reporter"),
                        label(&labels, "source_principal"),
                        label(&labels, "destination_principal"),
                        label(&labels, "connection_security_policy"),
                    );
                    if n == 1
                        && name == "istio_tcp_connections_opened_total"
                        && label(&labels, "reporter") == "destination"
                        && label(&labels, "source_workload") == "sleep"
                    {
                        report.opened_sleep_to_echo += value;
                    }
                }
                "sluice_proxy_connections_total" | "sluice_hbone_server_total" => {
                    let mut labels_text = String::new();
                    for (k, v) in &labels {
                        let _ = write!(labels_text, "{k}={v} ");
                    }
                    println!("    {name}{{{}}} {value}", labels_text.trim_end());
                }
                _ => {}
            }
        }
    }
    ensure!(
        report.opened_sleep_to_echo >= 2,
        "node-b's proxy must report the two tunnelled sleep → echo connections, reported {}",
        report.opened_sleep_to_echo
    );

    if options.keep {
        keep(&cluster)?;
    }
    println!(
        "\ndemo done in {:.1}s; removing everything it created (processes, capture, namespaces, cgroups, files)",
        say.started.elapsed().as_secs_f64()
    );
    Ok(report)
}

/// The part of a log line after its level and target: what it says.
fn tail(line: &str) -> &str {
    line.find(": ").map_or(line, |i| &line[i + 2..])
}

/// Prints how to poke at the running cluster, then waits for Ctrl-C.
fn keep(cluster: &AmbientCluster) -> Result<()> {
    let lab = crate::app::binary()?;
    let (_, sleep) = cluster.pod("sleep")?;
    let (_, echo) = cluster.pod("echo")?;
    println!("\nthe cluster stays up until Ctrl-C. Try:");
    for client in ["sleep", "notsleep"] {
        let (_, pod) = cluster.pod(client)?;
        // A process of the pod is in its netns *and* its cgroup (outbound eBPF capture hooks
        // the cgroup), so the command joins both.
        println!(
            "  sh -c 'echo $$ > {}/cgroup.procs; exec ip netns exec {} {} app connect --to {}'   # {client} → echo",
            pod.app_cgroup.display(),
            pod.ns.name,
            lab.display(),
            echo.addr(PORT)
        );
    }
    println!(
        "  sh -c 'echo $$ > {}/cgroup.procs; exec ip netns exec {} bash'   # a shell in sleep",
        sleep.app_cgroup.display(),
        sleep.ns.name
    );
    for (n, node) in cluster.nodes.iter().enumerate() {
        let proxy = node.proxy()?;
        println!(
            "  curl -s http://{}/metrics; curl -s http://{}/config_dump   # {} proxy",
            proxy.endpoint("metrics")?,
            proxy.endpoint("admin")?,
            NODES[n].0
        );
        println!(
            "  $EDITOR {}   # {}'s pods file: relabel the namespace, watch capture follow",
            node.path("pods.yaml").display(),
            NODES[n].0
        );
    }
    println!(
        "  $EDITOR {}   # workloads and policies (both proxies reload it)",
        cluster.mesh_file().display()
    );
    if cluster.backend == Backend::Ebpf {
        println!(
            "  cargo xtask load --status --pin-root {}   # pinned pods and verdict counters",
            cluster.nodes[0].pin_root().display()
        );
    }
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{field, sample};

    #[test]
    fn reads_log_fields_and_samples() {
        let line = r#"2026 INFO conn{src=10.0.0.1:1}: access: connection closed direction="inbound" src=10.97.1.2:4000 src_identity=spiffe://cluster.local/ns/demo/sa/sleep hbone=true"#;
        assert_eq!(field(line, "direction"), Some("inbound"));
        assert_eq!(field(line, "src"), Some("10.97.1.2:4000"));
        assert_eq!(
            field(line, "src_identity"),
            Some("spiffe://cluster.local/ns/demo/sa/sleep")
        );
        assert_eq!(field(line, "dst"), None);
        let (name, labels, value) = sample(
            r#"istio_tcp_connections_opened_total{reporter="source",source_workload="sleep"} 3"#,
        )
        .expect("a sample");
        assert_eq!(name, "istio_tcp_connections_opened_total");
        assert_eq!(
            labels,
            vec![("reporter", "source"), ("source_workload", "sleep")]
        );
        assert_eq!(value, 3);
    }
}
