//! The node agent end to end: pods started through the real CNI chain (bridge + host-local +
//! sluice-cni), namespaces labelled in the pods file, agent and proxy restarts, with traffic.

use std::net::SocketAddr;

use anyhow::{Context, Result, ensure};
use sluice_capture::{Backend, ebpf};
use sluice_lab::agent::{AgentLab, CgroupDriver, Runtime};
use sluice_lab::app::{self, ProcessGuard, Session};

/// A node whose pods file has `namespaces` (name, meshed) and lists `pods` (name, namespace),
/// with the agent running, and the proxy too if `proxy`.
fn node(
    backend: Backend,
    driver: CgroupDriver,
    namespaces: &[(&str, bool)],
    pods: &[(&str, &str)],
    proxy: bool,
) -> Result<AgentLab> {
    let mut lab = AgentLab::new(backend, driver)?;
    for (name, meshed) in namespaces {
        lab.set_namespace(name, *meshed)?;
    }
    for (name, namespace) in pods {
        lab.list_pod(name, namespace)?;
    }
    lab.start_agent()?;
    if proxy {
        lab.start_proxy()?;
    }
    Ok(lab)
}

/// Starts pod sandboxes through the CNI chain; a CNI error fails the test.
fn start(lab: &mut AgentLab, pods: &[(&str, &str)]) -> Result<()> {
    for (name, namespace) in pods {
        lab.start_pod(name, namespace)?
            .map_err(|e| anyhow::anyhow!("starting {namespace}/{name}: {e}"))?;
    }
    Ok(())
}

/// Echo servers on `addr`, in the pod `name` of the lab.
fn serve(lab: &AgentLab, name: &str, port: u16) -> Result<(ProcessGuard, SocketAddr)> {
    let pod = lab.pod(name)?;
    let addr = pod.addr(port);
    Ok((app::spawn_server(&pod.place(), &[addr])?, addr))
}

/// A client connection from pod `from` to `to`; whether it worked.
fn connect(lab: &AgentLab, from: &str, to: SocketAddr) -> Result<app::Outcome> {
    app::run_client(&lab.pod(from)?.place(), to, 32 * 1024)
}

/// Fails with what the client saw unless a connection from `from` to `to` works.
fn connects(lab: &AgentLab, from: &str, to: SocketAddr, when: &str) -> Result<()> {
    let outcome = connect(lab, from, to)?;
    ensure!(outcome.ok, "{from} -> {to} {when}: {outcome:?}");
    Ok(())
}

fn proxied(lab: &AgentLab, direction: &str, to: SocketAddr) -> Result<usize> {
    Ok(lab.proxy()?.count_log(&[
        &format!("direction=\"{direction}\""),
        &format!("dst={to}"),
        "connection closed",
    ]))
}

/// `shop` is meshed, `web` is not.
const MESHED_AND_NOT: &[(&str, bool)] = &[("shop", true), ("web", false)];
/// A client in the meshed namespace, a server in the other.
const CLIENT_AND_SERVER: &[(&str, &str)] = &[("client", "shop"), ("server", "web")];

/// Whether the eBPF pins hold state for pod `uid` (always false with iptables).
fn pinned(lab: &AgentLab, uid: &str) -> Result<bool> {
    if lab.backend != Backend::Ebpf {
        return Ok(false);
    }
    Ok(ebpf::list_pods(&lab.pin_root())?
        .iter()
        .any(|p| p.uid == uid))
}

fn conflist_types(lab: &AgentLab) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(lab.conf_dir().join("10-lab.conflist"))?;
    let list: serde_json::Value = serde_json::from_str(&text)?;
    Ok(list["plugins"]
        .as_array()
        .context("plugins")?
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
        .collect())
}

pub fn a_pod_started_through_the_cni_chain_runs_only_once_captured_and_served(
    backend: Backend,
) -> Result<()> {
    let mut lab = node(
        backend,
        CgroupDriver::Cgroupfs,
        MESHED_AND_NOT,
        CLIENT_AND_SERVER,
        false,
    )?;
    ensure!(
        conflist_types(&lab)? == ["bridge", "sluice-cni"],
        "the agent inserts its plugin last in the primary conflist: {:?}",
        conflist_types(&lab)?
    );
    lab.wait_readyz(503, "no proxy connected")?;

    // Without a proxy a meshed pod does not start: the ADD waits (bounded), then fails.
    let failure = lab
        .start_pod("client", "shop")?
        .err()
        .context("a meshed pod started with no proxy to serve it")?;
    ensure!(
        failure.plugin == "sluice-cni"
            && failure.code == 11
            && failure.msg.contains("did not take"),
        "{failure}"
    );
    // The agent says so too, naming the sandbox and the pod.
    lab.agent()?.wait_for_log(&[
        "CNI ADD failed",
        &lab.container_id("client"),
        "shop/client",
        "did not take",
    ])?;

    lab.start_proxy()?;
    lab.wait_ready(200)?;
    start(&mut lab, &[("server", "web")])?;
    ensure!(
        !lab.captured("server")?,
        "an unlabelled namespace's pod is not captured"
    );
    start(&mut lab, &[("client", "shop")])?;
    // No waiting: ADD returned, so capture is in place and the proxy has the pod.
    ensure!(
        lab.captured("client")?,
        "ADD returned before capture was in place"
    );
    let (_in, client_addr) = serve(&lab, "client", 8080)?;
    let inbound = connect(&lab, "server", client_addr)?;
    ensure!(inbound.ok, "inbound to the new pod: {inbound:?}");
    let (_out, server_addr) = serve(&lab, "server", 9090)?;
    let outbound = connect(&lab, "client", server_addr)?;
    ensure!(outbound.ok, "outbound from the new pod: {outbound:?}");
    lab.proxy()?
        .wait_for_log(&["direction=\"inbound\"", &format!("dst={client_addr}")])?;
    lab.proxy()?
        .wait_for_log(&["direction=\"outbound\"", &format!("dst={server_addr}")])?;

    for pod in ["client", "server"] {
        lab.check_pod(pod)?
            .map_err(|e| anyhow::anyhow!("CHECK {pod}: {e}"))?;
    }
    let uid = lab.pod("client")?.uid.clone();
    lab.stop_pod("client")?
        .map_err(|e| anyhow::anyhow!("DEL: {e}"))?;
    lab.agent()?
        .wait_for_log(&["pod released", &uid, "CNI DEL"])?;
    lab.proxy()?.wait_for_log(&["removed by the agent", &uid])?;
    ensure!(!pinned(&lab, &uid)?, "DEL leaves no pinned state");
    lab.wait_ready(200)?;
    Ok(())
}

pub fn labelling_a_namespace_meshes_its_running_pods_and_unlabelling_releases_them(
    backend: Backend,
) -> Result<()> {
    let pods = [("client", "shop"), ("server", "shop")];
    let mut lab = node(
        backend,
        CgroupDriver::Systemd,
        &[("shop", false)],
        &pods,
        true,
    )?;
    start(&mut lab, &pods)?;
    for (pod, _) in pods {
        ensure!(!lab.captured(pod)?, "{pod} is not meshed yet");
    }
    let (_server, to) = serve(&lab, "server", 9090)?;
    connects(&lab, "client", to, "before labelling")?;
    ensure!(
        proxied(&lab, "outbound", to)? == 0,
        "unmeshed traffic bypasses the proxy"
    );

    // Label the namespace: both running pods are meshed, without a restart.
    lab.set_namespace("shop", true)?;
    lab.wait_captured("client", true)?;
    lab.wait_captured("server", true)?;
    lab.wait_ready(200)?;
    connects(&lab, "client", to, "after labelling")?;
    lab.proxy()?
        .wait_for_log(&["direction=\"outbound\"", &format!("dst={to}")])?;
    lab.proxy()?
        .wait_for_log(&["direction=\"inbound\"", &format!("dst={to}")])?;

    // Remove the label: both are released, traffic flows directly again.
    lab.set_namespace("shop", false)?;
    lab.wait_captured("client", false)?;
    lab.wait_captured("server", false)?;
    let before = proxied(&lab, "outbound", to)?;
    let released = connect(&lab, "client", to)?;
    ensure!(released.ok, "after unlabelling: {released:?}");
    ensure!(
        proxied(&lab, "outbound", to)? == before,
        "released pods bypass the proxy"
    );
    lab.wait_ready(200)?;
    Ok(())
}

pub fn an_agent_restart_adopts_its_pods_without_disturbing_live_traffic(
    backend: Backend,
) -> Result<()> {
    let pods = [("client", "shop"), ("server", "shop"), ("gone", "shop")];
    let mut lab = node(
        backend,
        CgroupDriver::Cgroupfs,
        &[("shop", true)],
        &pods,
        true,
    )?;
    start(&mut lab, &pods)?;
    let (_server, to) = serve(&lab, "server", 9090)?;
    let mut session = Session::open(&lab.pod("client")?.place(), to)?;
    session.round_trip(16 * 1024)?;

    // The agent crashes. Capture stays, the proxy keeps serving.
    lab.agent.take().context("agent")?.kill();
    ensure!(lab.captured("client")?, "capture outlives the agent");
    connects(&lab, "client", to, "without the agent")?;
    session.round_trip(16 * 1024)?;
    // A meshed pod cannot start meanwhile (fail closed); an excluded namespace's pod can.
    let refused = lab
        .start_pod("late", "shop")?
        .err()
        .context("a meshed pod started without the agent")?;
    ensure!(
        refused.code == 11
            && refused
                .msg
                .contains("nothing listens on the sluice agent's socket"),
        "{refused}"
    );
    start(&mut lab, &[("dns", "kube-system")])?; // excluded namespaces start without the agent
    // A pod goes away while the agent is down (DEL succeeds without the agent).
    let gone = lab.pod("gone")?.uid.clone();
    lab.stop_pod("gone")?
        .map_err(|e| anyhow::anyhow!("DEL without agent: {e}"))?;
    lab.unlist_pod("gone")?;

    lab.start_agent()?;
    let client = lab.pod("client")?.uid.clone();
    lab.agent()?
        .wait_for_log(&["adopted a captured pod", &client])?;
    lab.agent()?
        .wait_for_log(&["released a pod captured before the restart", &gone])?;
    lab.wait_ready(200)?;
    ensure!(
        lab.agent()?.count_log(&["pod captured", &client]) == 0,
        "the restarted agent adopted the pod rather than capturing it again"
    );
    ensure!(!pinned(&lab, &gone)?, "the gone pod's pins were removed");
    session.round_trip(16 * 1024)?;
    connects(&lab, "client", to, "after the agent restarted")?;
    Ok(())
}

pub fn a_proxy_restart_keeps_capture_fails_closed_then_resumes(backend: Backend) -> Result<()> {
    let mut lab = node(
        backend,
        CgroupDriver::Systemd,
        MESHED_AND_NOT,
        CLIENT_AND_SERVER,
        true,
    )?;
    start(&mut lab, CLIENT_AND_SERVER)?;
    let (_server, to) = serve(&lab, "server", 9090)?;
    connects(&lab, "client", to, "before the proxy restart")?;

    lab.proxy.take().context("proxy")?.kill();
    lab.wait_readyz(503, "no proxy connected")?;
    ensure!(
        lab.captured("client")?,
        "capture stays while the proxy is away"
    );
    let refused = connect(&lab, "client", to)?;
    ensure!(
        !refused.ok,
        "traffic must be refused, not passed around the mesh: {refused:?}"
    );

    lab.start_proxy()?;
    lab.wait_ready(200)?;
    connects(&lab, "client", to, "with the new proxy")?;
    lab.proxy()?
        .wait_for_log(&["direction=\"outbound\"", &format!("dst={to}")])?;
    Ok(())
}

pub fn a_pod_that_cannot_be_captured_is_retried_and_keeps_the_agent_unready(
    backend: Backend,
) -> Result<()> {
    let mut lab = node(
        backend,
        CgroupDriver::Cgroupfs,
        &[("shop", true)],
        &[("stray", "shop")],
        true,
    )?;
    let uid = lab.pod_uid("stray");
    lab.wait_ready(200)?;
    // Its process runs in the node's netns: capturing it would capture the node.
    lab.start_pod_in_node_netns("stray")?;
    lab.wait_readyz(503, "the node's own network namespace")?;
    let agent = lab.agent()?;
    agent.wait_for_log_lines(&["pod not meshed", &uid, "attempts=2"], 1)?;
    ensure!(
        !pinned(&lab, &uid)?,
        "nothing was captured for the refused pod"
    );
    ensure!(
        agent.count_log(&["pod captured", &uid]) == 0,
        "the node's netns was never captured"
    );
    // The pod goes away from the source: the failure goes with it and the agent is ready again.
    lab.unlist_pod("stray")?;
    lab.wait_ready(200)?;
    Ok(())
}

pub fn in_kubernetes_mode_labelling_a_namespace_meshes_and_marks_its_pods(
    backend: Backend,
) -> Result<()> {
    const MARK: &str = "ambient.istio.io/redirection";
    let mut lab = AgentLab::new_kube(backend, CgroupDriver::Systemd)?;
    lab.set_namespace("shop", false)?;
    let pods = [("client", "shop"), ("server", "shop")];
    for (name, namespace) in pods {
        lab.list_pod(name, namespace)?;
    }
    lab.start_agent()?;
    lab.start_proxy()?;
    lab.wait_ready(200)?;
    start(&mut lab, &pods)?;
    for (pod, _) in pods {
        ensure!(!lab.captured(pod)?, "{pod} is not meshed yet");
        ensure!(
            lab.pod_annotation(pod, MARK)?.is_none(),
            "{pod} is not marked yet"
        );
    }

    // `kubectl label namespace shop istio.io/dataplane-mode=ambient`: both running pods are
    // captured and marked, without a restart.
    lab.set_namespace("shop", true)?;
    for (pod, _) in pods {
        lab.wait_captured(pod, true)?;
    }
    let deadline = std::time::Instant::now() + sluice_lab::WAIT;
    while pods
        .iter()
        .any(|(pod, _)| lab.pod_annotation(pod, MARK).ok().flatten().as_deref() != Some("enabled"))
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the pods were not marked {MARK}: enabled"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    lab.wait_ready(200)?;
    let (_server, to) = serve(&lab, "server", 9090)?;
    connects(&lab, "client", to, "after labelling the namespace")?;
    lab.proxy()?
        .wait_for_log(&["direction=\"outbound\"", &format!("dst={to}")])?;

    // Removing the label releases them and takes the mark away.
    lab.set_namespace("shop", false)?;
    for (pod, _) in pods {
        lab.wait_captured(pod, false)?;
    }
    let deadline = std::time::Instant::now() + sluice_lab::WAIT;
    while pods
        .iter()
        .any(|(pod, _)| lab.pod_annotation(pod, MARK).ok().flatten().is_some())
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the mark was not removed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    connects(&lab, "client", to, "after removing the label")?;
    Ok(())
}

/// A pod source that names, for one pod, an address another captured pod owns (a stale status
/// after an address was reused, or a wrong pods file): the owner keeps its traffic, the claimer
/// is refused and counted (`sluice_agent_pods_refused_total{reason="address_conflict"}`), and
/// the agent says so in `/readyz`. Fixing the source meshes the claimer with its own address.
pub fn a_pod_claiming_another_pods_address_is_refused(backend: Backend) -> Result<()> {
    let pods = [("a-owner", "shop"), ("b-claimer", "shop")];
    let mut lab = node(
        backend,
        CgroupDriver::Cgroupfs,
        &[("shop", false)],
        &pods,
        true,
    )?;
    start(&mut lab, &pods)?;
    let owner_ip = lab.pod("a-owner")?.ip;
    let claimer_ip = lab.pod("b-claimer")?.ip;
    lab.set_listed_ips("b-claimer", &[owner_ip.into()])?;
    lab.set_namespace("shop", true)?;
    lab.wait_captured("a-owner", true)?;
    lab.wait_readyz(
        503,
        &format!("address {owner_ip} belongs to captured pod shop/a-owner"),
    )?;
    ensure!(
        !lab.captured("b-claimer")?,
        "the claimer must not be captured"
    );
    let metrics = lab.agent_metrics()?;
    ensure!(
        metrics.contains("sluice_agent_pods_refused_total{reason=\"address_conflict\"}"),
        "the refusal is counted: {metrics}"
    );
    let (_server, to) = serve(&lab, "a-owner", 9090)?;
    connects(&lab, "b-claimer", to, "to the owner while the claim stands")?;
    lab.proxy()?
        .wait_for_log(&["direction=\"inbound\"", &format!("dst={to}")])?;

    lab.set_listed_ips("b-claimer", &[claimer_ip.into()])?;
    lab.wait_captured("b-claimer", true)?;
    lab.wait_ready(200)?;
    Ok(())
}

/// Polls `check` for up to 10 s (the agent rescans every 2 s).
fn eventually(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if check()? {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("{what}: not within 10 s")
}

/// Kubelet's probe, from the node: it reaches a meshed pod's app uncaptured from Istio's probe
/// address, and the agent keeps the node side current: eBPF, the address on the node's `lo`
/// (put back when removed); iptables, the SNAT to exactly the captured pods (a released pod's
/// rule goes, and its probes come from the node's own address again).
pub fn the_agent_keeps_kubelet_probes_exempt_from_capture(backend: Backend) -> Result<()> {
    let pods = [("server", "shop")];
    let mut lab = node(
        backend,
        CgroupDriver::Cgroupfs,
        &[("shop", true)],
        &pods,
        true,
    )?;
    start(&mut lab, &pods)?;
    lab.wait_ready(200)?;
    let (_server, to) = serve(&lab, "server", 9090)?;
    let probe_ip = sluice_capture::node::PROBE_V4.to_string();
    let probed = |lab: &AgentLab| -> Result<app::Outcome> {
        let before = proxied(lab, "inbound", to)?;
        let outcome = lab.probe(to)?;
        ensure!(
            proxied(lab, "inbound", to)? == before,
            "a probe must bypass the proxy: {outcome:?}"
        );
        Ok(outcome)
    };
    let outcome = probed(&lab)?;
    ensure!(
        outcome.ok
            && outcome
                .server_saw
                .as_deref()
                .is_some_and(|s| s.starts_with(&format!("{probe_ip}:"))),
        "kubelet's probe must reach the app from {probe_ip}: {outcome:?}"
    );
    let pod_ip = lab.pod("server")?.ip.to_string();
    match backend {
        Backend::Ebpf => {
            lab.node
                .exec(&["ip", "addr", "del", &format!("{probe_ip}/32"), "dev", "lo"])?;
            eventually("the agent puts the probe address back on lo", || {
                Ok(lab
                    .node
                    .output(&["ip", "-o", "addr", "show", "dev", "lo"])?
                    .contains(&format!("{probe_ip}/32")))
            })?;
            ensure!(probed(&lab)?.ok, "the probe works again");
        }
        Backend::Iptables => {
            let snat = format!(
                "-d {pod_ip}/32 -p tcp -m owner --socket-exists -j SNAT --to-source {probe_ip}"
            );
            ensure!(
                lab.node
                    .output(&["iptables-save", "-t", "nat"])?
                    .contains(&snat),
                "the node SNATs its own connections to the captured pod"
            );
            lab.set_namespace("shop", false)?;
            lab.wait_captured("server", false)?;
            eventually("the released pod's SNAT rule goes", || {
                Ok(!lab
                    .node
                    .output(&["iptables-save", "-t", "nat"])?
                    .contains(&snat))
            })?;
            let direct = lab.probe(to)?;
            ensure!(
                direct.ok
                    && !direct
                        .server_saw
                        .as_deref()
                        .unwrap_or_default()
                        .starts_with(&probe_ip),
                "a released pod is probed from the node's own address: {direct:?}"
            );
        }
    }
    Ok(())
}

/// Waits until the agent released pod `uid` on a CNI DEL, and checks nothing of it is left:
/// the proxy dropped it, no pins, no record.
fn released_by_del(lab: &AgentLab, uid: &str) -> Result<()> {
    lab.agent()?
        .wait_for_log(&["pod released", uid, "CNI DEL"])?;
    lab.proxy()?.wait_for_log(&["removed by the agent", uid])?;
    ensure!(!pinned(lab, uid)?, "DEL leaves no pinned state");
    ensure!(
        !lab.path(&format!("state/pods/{uid}.json")).exists(),
        "DEL leaves no record of the pod"
    );
    Ok(())
}

/// A runtime that passes no pod arguments on DEL still gets its sandbox released: podman's CNI
/// backend passes only `K8S_POD_NAME`, and any runtime may leave out the netns on DEL. The
/// agent knows the sandbox by the container id it was captured with at ADD, or by its netns.
/// A DEL or ADD for a sandbox it does not hold is answered all the same, and a refused ADD is
/// in the agent's log with the sandbox, the pod and why.
pub fn a_del_without_pod_arguments_releases_the_pod(backend: Backend) -> Result<()> {
    let pods = [("kubelet-started", "shop"), ("podman-started", "shop")];
    let mut lab = node(
        backend,
        CgroupDriver::Cgroupfs,
        &[("shop", true)],
        &pods,
        true,
    )?;
    lab.wait_ready(200)?;

    // Captured at ADD, with kubelet's arguments; then a DEL with neither arguments nor netns.
    start(&mut lab, &pods[..1])?;
    ensure!(lab.captured("kubelet-started")?, "captured at ADD");
    lab.stop_pod_as("kubelet-started", Runtime::Bare)?
        .map_err(|e| anyhow::anyhow!("DEL without arguments: {e}"))?;
    released_by_del(&lab, &lab.pod_uid("kubelet-started"))?;

    // Started as podman starts it (no namespace argument: the plugin lets the ADD by and the
    // agent captures the pod through its cgroup), and stopped likewise.
    lab.start_pod_as("podman-started", "shop", Runtime::Podman)?
        .map_err(|e| anyhow::anyhow!("podman's ADD: {e}"))?;
    lab.wait_captured("podman-started", true)?;
    lab.stop_pod_as("podman-started", Runtime::Podman)?
        .map_err(|e| anyhow::anyhow!("podman's DEL: {e}"))?;
    released_by_del(&lab, &lab.pod_uid("podman-started"))?;

    // A meshed pod the agent does not know is refused (and torn down with a DEL for a sandbox
    // the agent never held, which succeeds); the agent logs the refusal.
    let refused = lab
        .start_pod("unlisted", "shop")?
        .err()
        .context("an unknown pod of a meshed namespace started")?;
    ensure!(refused.code == 11, "{refused}");
    lab.agent()?.wait_for_log(&[
        "CNI ADD failed",
        &lab.container_id("unlisted"),
        "shop/unlisted",
        "not in the agent's pod list",
    ])?;
    lab.wait_ready(200)?;
    Ok(())
}

/// The kernel reuses a freed netns inode number for the next namespace, so a sandbox restarted
/// after its DEL can come back with the released one's number. It is captured all the same,
/// here through its cgroup, as when the runtime's ADD does not reach the agent (podman passes
/// no namespace argument), and into its own netns.
pub fn a_restarted_sandbox_is_captured_even_in_the_released_netns_inode(
    backend: Backend,
) -> Result<()> {
    let pods = [("web", "shop"), ("client", "web")];
    let mut lab = node(backend, CgroupDriver::Cgroupfs, MESHED_AND_NOT, &pods, true)?;
    start(&mut lab, &pods)?;
    lab.wait_ready(200)?;
    let uid = lab.pod_uid("web");
    let released = lab.netns_inode("web")?;
    lab.stop_pod("web")?
        .map_err(|e| anyhow::anyhow!("DEL: {e}"))?;
    released_by_del(&lab, &uid)?;

    let (started, reused) =
        lab.start_pod_reusing_inode("web", "shop", Runtime::Podman, released)?;
    started.map_err(|e| anyhow::anyhow!("restart: {e}"))?;
    let inode = lab.netns_inode("web")?;
    eprintln!(
        "restarted sandbox in netns inode {inode}: {}",
        if reused {
            "the released sandbox's"
        } else {
            "a new one (the released namespace was still held)"
        }
    );
    lab.wait_captured("web", true)?;
    if backend == Backend::Ebpf {
        let pinned = ebpf::list_pods(&lab.pin_root())?;
        ensure!(
            pinned.iter().any(|p| p.uid == uid && p.netns_ino == inode),
            "the restarted sandbox's own netns is captured: {pinned:?}"
        );
    }
    lab.wait_ready(200)?;
    let (_server, to) = serve(&lab, "web", 9090)?;
    connects(&lab, "client", to, "to the restarted pod")?;
    lab.proxy()?
        .wait_for_log(&["direction=\"inbound\"", &format!("dst={to}")])?;
    Ok(())
}

/// A pod the selection meshes that runs on the node uncaptured makes the agent unready, by
/// name: here a sandbox whose processes the runtime did not stop after its DEL. They run on in
/// the released netns, which the agent must not capture again (its address may already be
/// another pod's). An ADD of that same sandbox (same netns path) captures it again; once its
/// processes are gone after a second DEL, the agent is ready again.
pub fn a_selected_pod_running_uncaptured_makes_the_agent_unready(backend: Backend) -> Result<()> {
    let pods = [("web", "shop")];
    let mut lab = node(
        backend,
        CgroupDriver::Systemd,
        &[("shop", true)],
        &pods,
        true,
    )?;
    start(&mut lab, &pods)?;
    lab.wait_ready(200)?;
    let uid = lab.pod_uid("web");
    lab.del_pod("web", Runtime::Kubelet)?
        .map_err(|e| anyhow::anyhow!("DEL: {e}"))?;
    released_by_del(&lab, &uid)?;
    let why = lab.wait_readyz(503, "shop/web")?;
    ensure!(why.contains("uncaptured"), "{why}");
    ensure!(
        !lab.captured("web")?,
        "the released sandbox is not captured again"
    );

    lab.readd_pod("web")?
        .map_err(|e| anyhow::anyhow!("ADD again: {e}"))?;
    ensure!(lab.captured("web")?, "ADD again captures the same sandbox");
    lab.wait_ready(200)?;

    lab.del_pod("web", Runtime::Kubelet)?
        .map_err(|e| anyhow::anyhow!("second DEL: {e}"))?;
    lab.agent()?
        .wait_for_log_lines(&["pod released", &uid, "CNI DEL"], 2)?;
    lab.kill_sandbox("web");
    lab.wait_ready(200)?;
    Ok(())
}
