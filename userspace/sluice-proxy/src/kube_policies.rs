//! Kubernetes mode for policies: Istio's `AuthorizationPolicy` and `PeerAuthentication`
//! (security.istio.io/v1) watched in every namespace and put in force next to the mesh file's,
//! so the objects users already have apply unchanged. Until both lists have arrived nothing is
//! allowed (the mesh's policies are "pending"), so a restart never opens a window.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};

use crate::mesh::MeshWatch;

pub const GROUP: &str = "security.istio.io";
pub const VERSION: &str = "v1";
pub const KINDS: [&str; 2] = ["AuthorizationPolicy", "PeerAuthentication"];

/// Watches both kinds until the runtime stops, updating `mesh` after every change.
pub async fn run(client: kube::Client, mesh: Arc<MeshWatch>) {
    mesh.expect_external_policies();
    let streams = KINDS.iter().enumerate().map(|(i, kind)| {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind));
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |event| (i, event))
    });
    let mut events = futures::stream::select_all(streams.map(Box::pin));
    // Per kind: the objects in force, and those of a relist in progress.
    let mut live: [BTreeMap<(String, String), serde_yaml::Value>; 2] = Default::default();
    let mut relist: [BTreeMap<(String, String), serde_yaml::Value>; 2] = Default::default();
    let mut synced = [false, false];
    while let Some((i, event)) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                warn!(kind = KINDS[i], error = %e, "policy watch failed; retrying with backoff");
                continue;
            }
        };
        match event {
            watcher::Event::Apply(object) => {
                if let Some((key, value)) = entry(KINDS[i], &object) {
                    live[i].insert(key, value);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some((key, _)) = entry(KINDS[i], &object) {
                    live[i].remove(&key);
                }
            }
            watcher::Event::Init => relist[i].clear(),
            watcher::Event::InitApply(object) => {
                if let Some((key, value)) = entry(KINDS[i], &object) {
                    relist[i].insert(key, value);
                }
            }
            watcher::Event::InitDone => {
                live[i] = std::mem::take(&mut relist[i]);
                if !synced[i] {
                    info!(kind = KINDS[i], objects = live[i].len(), "policies listed");
                }
                synced[i] = true;
            }
        }
        if synced == [true, true] {
            let objects: Vec<serde_yaml::Value> =
                live.iter().flat_map(|m| m.values().cloned()).collect();
            mesh.set_external_policies(objects);
        }
    }
}

/// The object as the policy reader takes it: with its apiVersion and kind (list items may
/// come without them), keyed by namespace and name.
fn entry(kind: &str, object: &DynamicObject) -> Option<((String, String), serde_yaml::Value)> {
    let mut json = serde_json::to_value(object).ok()?;
    json["apiVersion"] = serde_json::Value::String(format!("{GROUP}/{VERSION}"));
    json["kind"] = serde_json::Value::String(kind.to_owned());
    let key = (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    );
    Some((key, serde_yaml::to_value(json).ok()?))
}
