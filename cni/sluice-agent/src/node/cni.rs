//! The plugin's requests, answered by the event loop.

use std::sync::mpsc::Sender;
use std::time::Instant;

use sluice_capture::netns::Netns;
use sluice_cni::agent_api::{Command, PodRef, Reply, Request};
use sluice_cni::spec::ErrorCode;
use tracing::{info, warn};

use super::{Node, Waiter};
use crate::find;
use crate::selection::{Decision, PodInfo};

/// How long a sandbox start waits for the API server when the watch has not seen its pod.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

fn failed(code: ErrorCode, msg: String, details: impl Into<String>) -> Reply {
    Reply::Failed {
        code: code as u32,
        msg,
        details: details.into(),
    }
}

/// The pod a request names, for the log: `namespace/name`, or `-` without pod arguments.
fn pod_label(request: &Request) -> String {
    request
        .pod
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// Logs how an ADD ended unless it enrolled its pod: the runtime reports the plugin's error in
/// its own log, which says neither which sandbox nor what the agent saw.
pub(super) fn log_add(container: &str, pod: &str, reply: &Reply) {
    match reply {
        Reply::Failed { code, msg, details } => {
            warn!(container, pod, code, reason = %msg, details = %details, "CNI ADD failed");
        }
        Reply::Skipped { reason } => {
            info!(container, pod, reason = %reason, "CNI ADD: pod not selected, it starts without capture");
        }
        Reply::Enrolled | Reply::Done => {}
    }
}

impl Node {
    pub(super) fn cni(&mut self, request: Request, reply: Sender<Reply>) {
        let answer = match request.command {
            Command::Add => match self.cni_add(&request) {
                // Captured, the proxy has not taken it yet: answer when it does.
                Ok(uid) => {
                    self.waiters.push(Waiter {
                        uid,
                        container: request.container_id.clone(),
                        pod: pod_label(&request),
                        reply,
                        deadline: Instant::now() + self.cfg.cni_wait,
                    });
                    return;
                }
                Err(reply) => {
                    log_add(&request.container_id, &pod_label(&request), &reply);
                    reply
                }
            },
            Command::Del => self.cni_del(&request),
            Command::Check => self.cni_check(&request),
            Command::Status => match self.readiness() {
                Ok(()) => Reply::Done,
                Err(why) => failed(
                    ErrorCode::PluginNotAvailable,
                    "the sluice agent is not ready".into(),
                    why,
                ),
            },
        };
        let _ = reply.send(answer);
    }

    /// `Ok(uid)`: captured, waiting for the proxy. `Err(reply)`: the answer now (which may be a
    /// success: skipped, or already served).
    fn cni_add(&mut self, request: &Request) -> Result<String, Reply> {
        let pod = self.cni_pod(request)?;
        let Some(netns_path) = request.netns.as_deref() else {
            return Err(failed(
                ErrorCode::InvalidEnvironment,
                format!("ADD for pod {}/{} without a netns", pod.namespace, pod.name),
                "the runtime must set CNI_NETNS on ADD",
            ));
        };
        let netns = Netns::open(netns_path).map_err(|e| {
            failed(
                ErrorCode::UnknownContainer,
                format!(
                    "cannot open the sandbox netns {netns_path}: {}",
                    sluice_cni::agent_api::describe_io(&e)
                ),
                "the runtime creates the sandbox's netns before ADD; was the sandbox removed \
                 meanwhile?",
            )
        })?;
        let cgroup = find::pod_cgroups(&self.cfg.cgroup_root)
            .ok()
            .and_then(|mut c| c.remove(&pod.uid));
        // A new sandbox of the pod: a released one is no longer worth telling apart.
        self.released.forget(&pod.uid);
        // The CNI result is the node's word on the sandbox's addresses (the status may still
        // name an earlier sandbox's, or none yet).
        let addrs = if request.ips.is_empty() {
            pod.ips.clone()
        } else {
            request.ips.clone()
        };
        let container = Some(request.container_id.as_str()).filter(|c| !c.is_empty());
        self.capture_pod(&pod, netns, netns_path.into(), cgroup, addrs, container)
            .map_err(|e| {
                failed(
                    ErrorCode::EnrolmentFailed,
                    format!(
                        "sluice could not capture pod {}/{}",
                        pod.namespace, pod.name
                    ),
                    e,
                )
            })?;
        info!(pod = %pod.uid, container = %request.container_id, "CNI ADD: pod captured");
        match self.pods.get(&pod.uid) {
            Some(captured) if captured.acked => Err(Reply::Enrolled),
            Some(_) => Ok(pod.uid),
            None => Err(failed(
                ErrorCode::EnrolmentFailed,
                "internal error: the pod was captured but is not recorded".into(),
                "report this with the agent's log",
            )),
        }
    }

    /// The selected pod a request is about; `Err` carries the answer when it is not selected
    /// (Skipped) or cannot be known.
    fn cni_pod(&mut self, request: &Request) -> Result<PodInfo, Reply> {
        let Some(pod) = &request.pod else {
            return Err(Reply::Skipped {
                reason: "not a Kubernetes pod".into(),
            });
        };
        let Some(world) = &self.world else {
            return Err(failed(
                ErrorCode::TryAgainLater,
                "the sluice agent has no pod list yet".into(),
                "retry shortly",
            ));
        };
        if lookup(world, pod).is_none() {
            self.fetch(pod);
        }
        let Some(world) = &self.world else {
            return Err(failed(
                ErrorCode::TryAgainLater,
                "the sluice agent has no pod list yet".into(),
                "retry shortly",
            ));
        };
        let namespace = world.namespaces.get(&pod.namespace);
        let known = lookup(world, pod);
        let info = match (known, &pod.uid) {
            (Some(info), Some(uid)) if &info.uid != uid => {
                return Err(failed(
                    ErrorCode::InvalidConfig,
                    format!(
                        "pod {pod} has uid {uid} at the runtime but {} in the pod list",
                        info.uid
                    ),
                    "the pod list is stale or wrong; fix it and the runtime retries",
                ));
            }
            (Some(info), _) => info.clone(),
            (None, _) => {
                // Unknown pod: fine to skip in an unmeshed namespace, never in a meshed one.
                let probe = PodInfo {
                    uid: pod.uid.clone().unwrap_or_default(),
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    ..PodInfo::default()
                };
                return Err(match self.cfg.selector.decide(namespace, &probe) {
                    Decision::Skip(reason) => Reply::Skipped { reason },
                    Decision::Enrol => failed(
                        ErrorCode::TryAgainLater,
                        format!(
                            "pod {pod} is in a meshed namespace but not in the agent's pod list"
                        ),
                        "in standalone mode add it to the pods file (uid, name, namespace, \
                         serviceAccount); the runtime retries the sandbox",
                    ),
                });
            }
        };
        match self.cfg.selector.decide(namespace, &info) {
            Decision::Enrol => Ok(info),
            Decision::Skip(reason) => Err(Reply::Skipped { reason }),
        }
    }

    /// Kubernetes mode: a sandbox can start before the watch delivers its pod; ask the API
    /// server and remember the answer until the watch catches up.
    fn fetch(&mut self, pod: &PodRef) {
        let Some(cluster) = &self.cfg.cluster else {
            return;
        };
        let Some((info, namespace)) = cluster.lookup(pod, FETCH_TIMEOUT) else {
            return;
        };
        self.fetched.insert(info.uid.clone(), (info, namespace));
        self.merge_fetched();
    }

    /// Releases the sandbox a DEL names. DEL is idempotent: a sandbox the agent does not hold
    /// is a success too.
    fn cni_del(&mut self, request: &Request) -> Reply {
        if let Some(uid) = self.pod_uid(request) {
            self.fetched.remove(&uid);
        }
        let netns = request.netns.as_deref().and_then(|p| Netns::open(p).ok());
        let ino = netns.as_ref().and_then(|n| n.inode().ok());
        let Some(uid) = self.captured_sandbox(request, ino) else {
            info!(container = %request.container_id, pod = %pod_label(request),
                  "CNI DEL: no captured sandbox by that container id or netns; nothing to release");
            return Reply::Done;
        };
        if let Some(netns) = self.release(&uid, "CNI DEL") {
            match netns.inode() {
                Ok(ino) => self.released.insert(uid, netns, ino),
                Err(e) => warn!(pod = %uid, error = %e, "cannot stat a released netns"),
            }
        }
        Reply::Done
    }

    /// The captured pod whose sandbox a DEL names: the one captured at ADD with its container
    /// id, else the one captured in its netns (`ino`), else, by its pod arguments, a pod whose
    /// sandbox could be this one (no other container id, no other netns known). Never another
    /// sandbox of the same pod (one that failed to start, one kubelet replaced): that would
    /// release the running one.
    fn captured_sandbox(&self, request: &Request, ino: Option<u64>) -> Option<String> {
        let container = Some(request.container_id.as_str()).filter(|c| !c.is_empty());
        if let Some((uid, _)) = self
            .pods
            .iter()
            .find(|(_, p)| container.is_some() && p.record.container_id.as_deref() == container)
        {
            return Some(uid.clone());
        }
        // Exact: the agent holds every captured pod's netns open, so no other namespace can
        // have one of their inode numbers.
        if let Some((uid, _)) = self
            .pods
            .iter()
            .find(|(_, p)| Some(p.record.netns_ino) == ino)
        {
            return Some(uid.clone());
        }
        let uid = self.pod_uid(request)?;
        let captured = self.pods.get(&uid)?;
        let other_sandbox = captured.record.container_id.is_some() || ino.is_some();
        (!other_sandbox).then_some(uid)
    }

    /// The uid of the pod a request's arguments name, if the request has them and the agent
    /// knows it.
    fn pod_uid(&self, request: &Request) -> Option<String> {
        let pod = request.pod.as_ref()?;
        pod.uid
            .clone()
            .or_else(|| lookup(self.world.as_ref()?, pod).map(|p| p.uid.clone()))
    }

    fn cni_check(&mut self, request: &Request) -> Reply {
        let pod = match self.cni_pod(request) {
            Ok(pod) => pod,
            Err(Reply::Skipped { .. }) => return Reply::Done,
            Err(reply) => return reply,
        };
        let ino = request
            .netns
            .as_deref()
            .and_then(|p| Netns::open(p).ok())
            .and_then(|n| n.inode().ok());
        match self.pods.get(&pod.uid) {
            Some(c) if Some(c.record.netns_ino) == ino && c.acked => Reply::Done,
            Some(c) if Some(c.record.netns_ino) == ino => failed(
                ErrorCode::TryAgainLater,
                format!(
                    "pod {}/{} is captured but the proxy has not taken it",
                    pod.namespace, pod.name
                ),
                "is sluice-proxy running and connected to the agent?",
            ),
            _ => failed(
                ErrorCode::EnrolmentFailed,
                format!(
                    "pod {}/{} is selected for the mesh but its sandbox is not captured",
                    pod.namespace, pod.name
                ),
                self.failures
                    .get(&pod.uid)
                    .map_or_else(|| "see the agent's log".to_owned(), |f| f.error.clone()),
            ),
        }
    }
}

fn lookup<'w>(world: &'w crate::selection::World, pod: &PodRef) -> Option<&'w PodInfo> {
    pod.uid
        .as_ref()
        .and_then(|uid| world.pods.get(uid))
        .or_else(|| world.pod_named(&pod.namespace, &pod.name))
}
