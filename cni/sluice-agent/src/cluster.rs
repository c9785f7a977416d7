//! Kubernetes mode's source: kube-rs watchers on Namespaces (all) and on the Pods of this node
//! (field selector `spec.nodeName`), turned into the same [`World`] the standalone file gives.
//! Also the two calls the agent makes to the API server: marking captured pods with
//! `ambient.istio.io/redirection: enabled` (and unmarking released ones), and fetching a pod
//! the watch has not delivered yet when its sandbox starts.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use sluice_cni::agent_api::PodRef;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, info, warn};

use crate::selection::{NamespaceInfo, PodInfo, REDIRECTION_ANNOTATION, World};

/// Changes that arrive together are sent as one world.
const SETTLE: Duration = Duration::from_millis(50);

/// What the event loop asks of the API server.
pub enum Request {
    /// Set (`enabled`) or remove the redirection annotation.
    Annotate {
        namespace: String,
        name: String,
        enabled: bool,
    },
    /// Fetch a pod (and its namespace) directly.
    Lookup {
        pod: PodRef,
        reply: Sender<Option<(PodInfo, Option<NamespaceInfo>)>>,
    },
}

/// The event loop's way to the API server; cheap to clone, never blocks except in `lookup`.
#[derive(Clone)]
pub struct Handle {
    tx: UnboundedSender<Request>,
}

impl Handle {
    pub fn channel() -> (Self, UnboundedReceiver<Request>) {
        let (tx, rx) = unbounded_channel();
        (Self { tx }, rx)
    }

    pub fn annotate(&self, pod: &PodInfo, enabled: bool) {
        let _ = self.tx.send(Request::Annotate {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            enabled,
        });
    }

    /// Asks the API server for a pod, waiting at most `timeout`.
    pub fn lookup(
        &self,
        pod: &PodRef,
        timeout: Duration,
    ) -> Option<(PodInfo, Option<NamespaceInfo>)> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx
            .send(Request::Lookup {
                pod: pod.clone(),
                reply,
            })
            .ok()?;
        answer.recv_timeout(timeout).ok().flatten()
    }
}

/// What the agent keeps of a Pod; `None` for pods that no longer run (Succeeded, Failed) or
/// that have no uid yet.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let spec = pod.spec.as_ref();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodInfo {
        uid: pod.uid()?,
        name: pod.name_any(),
        namespace: pod.namespace()?,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        labels: pod.labels().clone(),
        annotations: pod.annotations().clone(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ips: pod_ips(pod),
    })
}

/// `status.podIPs` (or the older `status.podIP`), skipping what does not parse.
fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let ips: Vec<std::net::IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
    if !ips.is_empty() {
        return ips;
    }
    status
        .pod_ip
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

pub fn namespace_info(ns: &Namespace) -> NamespaceInfo {
    NamespaceInfo {
        name: ns.name_any(),
        labels: ns.labels().clone(),
    }
}

fn world(namespaces: &Store<Namespace>, pods: &Store<Pod>) -> World {
    World {
        namespaces: namespaces
            .state()
            .iter()
            .map(|ns| (ns.name_any(), namespace_info(ns)))
            .collect(),
        pods: pods
            .state()
            .iter()
            .filter_map(|p| pod_info(p))
            .map(|p| (p.uid.clone(), p))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Watches until `out`'s receiver is gone, sending a world once both watches have listed and
/// again after every change; serves `requests` meanwhile.
pub async fn run(
    client: Client,
    node: String,
    out: Sender<crate::node::Event>,
    mut requests: UnboundedReceiver<Request>,
) {
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    // Only what the agent reads is kept: managed fields are most of an object's size.
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|ns| ns.managed_fields_mut().clear())
    .reflect(ns_writer);
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff()
    .modify(|pod| {
        pod.managed_fields_mut().clear();
        if let Some(spec) = pod.spec.as_mut() {
            spec.containers.iter_mut().for_each(|c| c.env = None);
        }
    })
    .reflect(pod_writer);
    // Every event counts; each stream's end of its initial list (InitDone) marks it synced. A
    // world goes out only once both are: an unsynced store would read as "no pods" and release
    // every captured pod.
    let changes = futures::stream::select(namespaces.map(tagged(0)), pods.map(tagged(1)));
    let mut changes = std::pin::pin!(changes);

    let mut synced = [false, false];
    let mut last: Option<World> = None;
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok((which, init_done))) => synced[which] |= init_done,
                Some(Err(e)) => {
                    warn!(error = %e, "Kubernetes watch failed; retrying with backoff");
                    continue;
                }
                None => return,
            },
            Some(request) = requests.recv() => {
                serve(&client, request).await;
                continue;
            }
        }
        if synced != [true, true] {
            continue;
        }
        if last.is_none() {
            info!(node, "Kubernetes watches synced");
        }
        // Let a burst of changes (a namespace label touching many pods) land first.
        tokio::time::sleep(SETTLE).await;
        let now = world(&ns_store, &pod_store);
        if last.as_ref() != Some(&now) {
            debug!(
                pods = now.pods.len(),
                namespaces = now.namespaces.len(),
                "cluster changed"
            );
            last = Some(now.clone());
            if out.send(crate::node::Event::World(now)).is_err() {
                return;
            }
        }
    }
}

/// Marks a watch's events with which watch they came from and whether the event ends its
/// initial list.
fn tagged<K>(
    which: usize,
) -> impl Fn(Result<watcher::Event<K>, watcher::Error>) -> Result<(usize, bool), watcher::Error> {
    move |r| r.map(|event| (which, matches!(event, watcher::Event::InitDone)))
}

async fn serve(client: &Client, request: Request) {
    match request {
        Request::Annotate {
            namespace,
            name,
            enabled,
        } => {
            let api = Api::<Pod>::namespaced(client.clone(), &namespace);
            // A JSON merge patch: null removes the key.
            let value = if enabled {
                json!("enabled")
            } else {
                json!(null)
            };
            let patch = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => debug!(pod = %name, namespace = %namespace, enabled, "pod annotated"),
                // A deleted pod needs no annotation.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(pod = %name, namespace = %namespace, error = %e, "cannot annotate the pod")
                }
            }
        }
        Request::Lookup { pod, reply } => {
            let found = lookup(client, &pod).await;
            let _ = reply.send(found);
        }
    }
}

async fn lookup(client: &Client, pod: &PodRef) -> Option<(PodInfo, Option<NamespaceInfo>)> {
    let api = Api::<Pod>::namespaced(client.clone(), &pod.namespace);
    let found = match api.get_opt(&pod.name).await {
        Ok(found) => found?,
        Err(e) => {
            warn!(pod = %pod, error = %e, "cannot fetch the pod");
            return None;
        }
    };
    let info = pod_info(&found)?;
    let namespace = Api::<Namespace>::all(client.clone())
        .get_opt(&pod.namespace)
        .await
        .ok()
        .flatten()
        .map(|ns| namespace_info(&ns));
    Some((info, namespace))
}

#[cfg(test)]
mod tests;
