//! The plugin's requests, answered by the event loop.

use std::sync::mpsc::Sender;
use std::time::Instant;

use sluice_capture::netns::Netns;
use sluice_cni::agent_api::{Command, PodRef, Reply, Request};
use sluice_cni::spec::ErrorCode;
use tracing::info;

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

impl Node {
    pub(super) fn cni(&mut self, request: Request, reply: Sender<Reply>) {
        let answer = match request.command {
            Command::Add => match self.cni_add(&request) {
                // Captured, the proxy has not taken it yet: answer when it does.
                Ok(uid) => {
                    self.waiters.push(Waiter {
                        uid,
                        reply,
                        deadline: Instant::now() + self.cfg.cni_wait,
                    });
                    return;
                }
                Err(reply) => reply,
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
                format!("cannot open the sandbox netns {netns_path}"),
                e.to_string(),
            )
        })?;
        let cgroup = find::pod_cgroups(&self.cfg.cgroup_root)
            .ok()
            .and_then(|mut c| c.remove(&pod.uid));
        self.deleted.remove(&pod.uid);
        // The CNI result is the node's word on the sandbox's addresses (the status may still
        // name an earlier sandbox's, or none yet).
        let addrs = if request.ips.is_empty() {
            pod.ips.clone()
        } else {
            request.ips.clone()
        };
        self.capture_pod(&pod, netns, netns_path.into(), cgroup, addrs)
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

    fn cni_del(&mut self, request: &Request) -> Reply {
        let Some(world) = &self.world else {
            return Reply::Done;
        };
        let Some(uid) = request.pod.as_ref().and_then(|pod| {
            pod.uid
                .clone()
                .or_else(|| lookup(world, pod).map(|p| p.uid.clone()))
        }) else {
            return Reply::Done;
        };
        self.fetched.remove(&uid);
        let Some(captured) = self.pods.get(&uid) else {
            return Reply::Done;
        };
        // A DEL for another sandbox of the same pod (one that failed to start) must not release
        // the running one.
        let ino = captured.record.netns_ino;
        let other_sandbox = request
            .netns
            .as_deref()
            .and_then(|p| Netns::open(p).ok())
            .and_then(|n| n.inode().ok())
            .is_some_and(|i| i != ino);
        if !other_sandbox {
            self.deleted.insert(uid.clone(), ino);
            self.release(&uid, "CNI DEL");
        }
        Reply::Done
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
