//! The node agent end to end: pods started through the real CNI chain (bridge + host-local +
//! sluice-cni), namespaces labelled in the pods file, agent and proxy restarts, with traffic.

use std::net::SocketAddr;

use anyhow::{Context, Result, ensure};
use sluice_capture::{Backend, ebpf};
use sluice_lab::agent::{AgentLab, CgroupDriver};
use sluice_lab::app::{self, ProcessGuard, Session};

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
    let mut lab = AgentLab::new(backend, CgroupDriver::Cgroupfs)?;
    lab.set_namespace("shop", true)?;
    lab.set_namespace("web", false)?;
    lab.list_pod("client", "shop")?;
    lab.list_pod("server", "web")?;
    lab.start_agent()?;
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

    lab.start_proxy()?;
    lab.wait_ready(200)?;
    lab.start_pod("server", "web")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        !lab.captured("server")?,
        "an unlabelled namespace's pod is not captured"
    );
    lab.start_pod("client", "shop")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
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
    if backend == Backend::Ebpf {
        ensure!(
            !ebpf::list_pods(&lab.pin_root())?
                .iter()
                .any(|p| p.uid == uid),
            "DEL leaves no pinned state"
        );
    }
    lab.wait_ready(200)?;
    Ok(())
}

pub fn labelling_a_namespace_meshes_its_running_pods_and_unlabelling_releases_them(
    backend: Backend,
) -> Result<()> {
    let mut lab = AgentLab::new(backend, CgroupDriver::Systemd)?;
    lab.set_namespace("shop", false)?;
    lab.list_pod("client", "shop")?;
    lab.list_pod("server", "shop")?;
    lab.start_agent()?;
    lab.start_proxy()?;
    for pod in ["client", "server"] {
        lab.start_pod(pod, "shop")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
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
    let mut lab = AgentLab::new(backend, CgroupDriver::Cgroupfs)?;
    lab.set_namespace("shop", true)?;
    for pod in ["client", "server", "gone"] {
        lab.list_pod(pod, "shop")?;
    }
    lab.start_agent()?;
    lab.start_proxy()?;
    for pod in ["client", "server", "gone"] {
        lab.start_pod(pod, "shop")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
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
        refused.code == 11 && refused.msg.contains("cannot reach"),
        "{refused}"
    );
    lab.start_pod("dns", "kube-system")?
        .map_err(|e| anyhow::anyhow!("excluded namespaces start without the agent: {e}"))?;
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
    if backend == Backend::Ebpf {
        ensure!(
            !ebpf::list_pods(&lab.pin_root())?
                .iter()
                .any(|p| p.uid == gone),
            "the gone pod's pins were removed"
        );
    }
    session.round_trip(16 * 1024)?;
    connects(&lab, "client", to, "after the agent restarted")?;
    Ok(())
}

pub fn a_proxy_restart_keeps_capture_fails_closed_then_resumes(backend: Backend) -> Result<()> {
    let mut lab = AgentLab::new(backend, CgroupDriver::Systemd)?;
    lab.set_namespace("shop", true)?;
    lab.set_namespace("web", false)?;
    lab.list_pod("client", "shop")?;
    lab.list_pod("server", "web")?;
    lab.start_agent()?;
    lab.start_proxy()?;
    lab.start_pod("server", "web")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    lab.start_pod("client", "shop")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
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
    let mut lab = AgentLab::new(backend, CgroupDriver::Cgroupfs)?;
    lab.set_namespace("shop", true)?;
    let uid = lab.list_pod("stray", "shop")?;
    lab.start_agent()?;
    lab.start_proxy()?;
    lab.wait_ready(200)?;
    // Its process runs in the node's netns: capturing it would capture the node.
    lab.start_pod_in_node_netns("stray")?;
    lab.wait_readyz(503, "the node's own network namespace")?;
    let agent = lab.agent()?;
    agent.wait_for_log_lines(&["pod not meshed", &uid, "attempts=2"], 1)?;
    if backend == Backend::Ebpf {
        ensure!(
            !ebpf::list_pods(&lab.pin_root())?
                .iter()
                .any(|p| p.uid == uid),
            "nothing was captured for the refused pod"
        );
    }
    ensure!(
        agent.count_log(&["pod captured", &uid]) == 0,
        "the node's netns was never captured"
    );
    // The pod goes away from the source: the failure goes with it and the agent is ready again.
    lab.unlist_pod("stray")?;
    lab.wait_ready(200)?;
    Ok(())
}
