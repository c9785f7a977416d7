//! The proxy driven by the agent's hand-off (ZDS): pods arrive with their netns fd, every
//! request gets one ack, bad requests get an error ack, and a removed pod is refused again.

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sluice_capture::Backend;
use sluice_lab::app;
use sluice_lab::lab::{DirGuard, Lab, POD_IP};
use sluice_lab::proxy::ProxyProcess;
use sluice_zds::messages::workload_request::Payload;
use sluice_zds::messages::*;
use sluice_zds::{Channel, Listener};

fn request(payload: Payload) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(payload),
    }
}

/// Sends a request and returns the ack's error ("" = done).
fn ask(
    agent: &Channel,
    payload: Payload,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<String> {
    agent.send(&request(payload), fd)?;
    let response: WorkloadResponse = agent.recv().context("await the ack")?.decode()?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) => Ok(ack.error),
        None => anyhow::bail!("a response without an ack"),
    }
}

fn add(uid: &str) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.to_owned(),
        workload_info: Some(WorkloadInfo {
            name: "pod".into(),
            namespace: "default".into(),
            service_account: "default".into(),
        }),
    })
}

pub fn the_agent_hands_pods_to_the_proxy_over_zds(backend: Backend) -> Result<()> {
    let mut lab = Lab::new(backend)?;
    lab.capture()?;
    // The agent's socket lives in a private (0700) directory, which `bind` creates.
    let dir = DirGuard::new(&format!("sluice-{}-zds", lab.id))?;
    let socket = dir.0.join("zds").join("zds.sock");
    let listener = Listener::bind(&socket)?;
    let socket_arg = socket.to_str().context("socket path")?;
    let proxy = ProxyProcess::spawn(
        &[],
        &lab.proxy_cgroup.path,
        &lab.pin_root(),
        &["--zds-socket", socket_arg],
    )?;
    let agent = listener.accept()?;
    agent.set_timeout(Some(Duration::from_secs(10)))?;
    let hello: ZdsHello = agent.recv()?.decode()?;
    ensure!(hello.version == Version::V1 as i32, "hello: {hello:?}");

    let uid = lab.pod.uid.to_string();
    let netns = std::fs::File::open(lab.pod_ns.path())?;
    ensure!(
        ask(&agent, add(&uid), Some(netns.as_fd()))?.is_empty(),
        "add refused"
    );
    ensure!(
        ask(&agent, Payload::SnapshotSent(SnapshotSent {}), None)?.is_empty(),
        "snapshot_sent refused"
    );

    let target = SocketAddr::V4(SocketAddrV4::new(POD_IP, 8080));
    let _server = app::spawn_server(&lab.in_pod(), &[target])?;
    let served = app::run_client(&lab.in_peer(), target, 64 * 1024)?;
    ensure!(
        served.ok && served.echoed == 64 * 1024,
        "inbound through the proxy: {served:?}"
    );
    proxy.wait_for_log(&[
        "direction=\"inbound\"",
        "dst=10.99.0.2:8080",
        "connection closed",
    ])?;

    // The same pod again (as after an agent restart) is kept as it is.
    ensure!(
        ask(&agent, add(&uid), Some(netns.as_fd()))?.is_empty(),
        "re-add refused"
    );
    let ready = |want: u16| -> Result<String> {
        let (status, body) = proxy.get("readiness", "/healthz/ready")?;
        ensure!(status == want, "readiness {status} ({body}), wanted {want}");
        Ok(body)
    };
    ready(200)?;
    // A pod the proxy cannot serve (its netns's ports are taken by the first pod) is refused
    // and keeps the proxy not ready until the agent removes it.
    let clash = ask(&agent, add("pod-clash"), Some(netns.as_fd()))?;
    ensure!(
        !clash.is_empty(),
        "a pod whose listeners cannot be created must be refused"
    );
    ensure!(ready(503)?.contains("pod-clash"), "readiness names the pod");
    ensure!(
        ask(
            &agent,
            Payload::Del(DelWorkload {
                uid: "pod-clash".into()
            }),
            None
        )?
        .is_empty()
    );
    ready(200)?;
    // Bad requests: an error ack each, and the proxy keeps going.
    let no_fd = ask(&agent, add("pod-without-netns"), None)?;
    ensure!(
        no_fd.contains("exactly one netns fd"),
        "ack for an add without fd: {no_fd:?}"
    );
    let bad_uid = ask(&agent, add("../etc"), Some(netns.as_fd()))?;
    ensure!(!bad_uid.is_empty(), "an invalid uid must be refused");
    agent.send(&ZdsHello { version: 7 }, None)?; // not a WorkloadRequest at all
    let garbage: WorkloadResponse = agent.recv()?.decode()?;
    ensure!(garbage.payload.is_some(), "garbage still gets an ack");

    // Removing the pod closes its listeners: inbound is refused again (capture stays).
    ensure!(ask(&agent, Payload::Del(DelWorkload { uid: uid.clone() }), None)?.is_empty());
    let refused = app::run_client(&lab.in_peer(), target, 1024)?;
    ensure!(
        !refused.ok,
        "a removed pod must be refused, not passed around: {refused:?}"
    );
    Ok(())
}
