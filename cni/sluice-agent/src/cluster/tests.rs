//! The Kubernetes source against kube-rs's mock service: a `kube::Client` over an in-memory API
//! server (`sluice-kube-fake`) that lists, watches (resourceVersion-ordered events, field
//! selectors), gets and merge-patches realistic Namespace and Pod objects.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_kube_fake::FakeApi;

use super::*;
use crate::node::Event;
use crate::selection::{DATAPLANE_MODE_LABEL, Selector};

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";

fn fake() -> FakeApi {
    FakeApi::with_collections(&[NAMESPACES, PODS])
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels,
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

fn pod(namespace: &str, name: &str, node: &str, extra_spec: Value) -> Value {
    let mut spec = json!({
        "nodeName": node,
        "serviceAccountName": name,
        "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9",
                        "env": [{"name": "SECRET_LOOKING", "value": "x"}]}],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(e.clone());
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "labels": {"app": name}, "annotations": {}},
        "spec": spec,
        "status": {"phase": "Running", "podIP": "10.1.0.7"}
    })
}

/// Waits (bounded) for a world that satisfies `want`, returning it.
fn world_where(rx: &Receiver<Event>, what: &str, want: impl Fn(&World) -> bool) -> World {
    let deadline = Instant::now() + Duration::from_secs(10);
    tokio::task::block_in_place(|| {
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Event::World(world)) if want(&world) => return world,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no world where {what} within 10 s")
    })
}

fn desired(world: &World) -> Vec<String> {
    let selector = Selector {
        excluded_namespaces: vec!["kube-system".into()],
    };
    selector
        .desired(world)
        .into_keys()
        .map(str::to_owned)
        .collect()
}

fn ambient() -> Value {
    json!({DATAPLANE_MODE_LABEL: "ambient"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_follows_labels_opt_outs_and_deletions_of_this_nodes_pods() {
    let api = fake();
    api.put(NAMESPACES, namespace("shop", json!({})));
    api.put(NAMESPACES, namespace("kube-system", json!({})));
    api.put(PODS, pod("shop", "cart", "node-a", json!({})));
    api.put(PODS, pod("shop", "elsewhere", "node-b", json!({})));
    api.put(
        PODS,
        pod("shop", "agent", "node-a", json!({"hostNetwork": true})),
    );
    api.put(PODS, pod("kube-system", "dns", "node-a", json!({})));
    let (tx, rx) = std::sync::mpsc::channel();
    let (handle, requests) = Handle::channel();
    tokio::spawn(run(api.client(), "node-a".into(), tx, requests));

    let first = world_where(&rx, "the first sync", |_| true);
    let uids: Vec<&str> = first.pods.keys().map(String::as_str).collect();
    assert_eq!(
        uids,
        ["uid-agent", "uid-cart", "uid-dns"],
        "only node-a's pods"
    );
    assert_eq!(first.pods["uid-cart"].service_account, "cart");
    assert!(first.pods["uid-agent"].host_network);
    assert!(desired(&first).is_empty(), "nothing is labelled yet");

    // Label the namespace: its pods are meshed, except hostNetwork ones.
    api.put(NAMESPACES, namespace("shop", ambient()));
    let labelled = world_where(&rx, "shop is labelled", |w| !desired(w).is_empty());
    assert_eq!(desired(&labelled), ["uid-cart"]);
    // Even labelled, kube-system stays out.
    api.put(NAMESPACES, namespace("kube-system", ambient()));
    let system = world_where(&rx, "kube-system is labelled", |w| {
        w.namespaces["kube-system"]
            .labels
            .contains_key(DATAPLANE_MODE_LABEL)
    });
    assert_eq!(desired(&system), ["uid-cart"]);

    // The pod opts out by annotation, then back in.
    api.edit(PODS, "shop", "cart", |p| {
        p["metadata"]["annotations"][REDIRECTION_ANNOTATION] = json!("disabled")
    });
    let opted_out = world_where(&rx, "cart opted out", |w| desired(w).is_empty());
    assert_eq!(
        opted_out.pods["uid-cart"].annotations[REDIRECTION_ANNOTATION],
        "disabled"
    );
    api.edit(PODS, "shop", "cart", |p| {
        p["metadata"]["annotations"] = json!({})
    });
    world_where(&rx, "cart opted back in", |w| desired(w) == ["uid-cart"]);

    // The agent marks the pod it captured, through a merge patch; the watch shows it.
    let cart =
        pod_info(&serde_json::from_value(api.object(PODS, "shop", "cart").unwrap()).unwrap())
            .unwrap();
    handle.annotate(&cart, true);
    let marked = world_where(&rx, "cart is annotated", |w| {
        w.pods["uid-cart"].annotations.get(REDIRECTION_ANNOTATION) == Some(&"enabled".into())
    });
    assert_eq!(
        desired(&marked),
        ["uid-cart"],
        "the agent's own mark is not an opt-out"
    );
    handle.annotate(&cart, false);
    world_where(&rx, "cart's mark is removed", |w| {
        !w.pods["uid-cart"]
            .annotations
            .contains_key(REDIRECTION_ANNOTATION)
    });

    // Unlabel the namespace: released.
    api.put(NAMESPACES, namespace("shop", json!({})));
    world_where(&rx, "shop is unlabelled", |w| desired(w).is_empty());
    api.put(NAMESPACES, namespace("shop", ambient()));
    world_where(&rx, "shop is labelled again", |w| {
        desired(w) == ["uid-cart"]
    });

    // A deleted pod leaves the world; a finished one too.
    api.delete(PODS, "shop", "cart");
    world_where(&rx, "cart is gone", |w| !w.pods.contains_key("uid-cart"));
    api.put(PODS, pod("shop", "job", "node-a", json!({})));
    world_where(&rx, "job runs", |w| desired(w) == ["uid-job"]);
    api.edit(PODS, "shop", "job", |p| {
        p["status"]["phase"] = json!("Succeeded")
    });
    world_where(&rx, "job finished", |w| !w.pods.contains_key("uid-job"));

    let requests = api.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "every pod list and watch is limited to this node: {requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("watch=true")),
        "the watch was used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_watch_has_not_delivered_is_fetched_with_its_namespace() {
    let api = fake();
    api.put(NAMESPACES, namespace("shop", ambient()));
    api.put(PODS, pod("shop", "cart", "node-a", json!({})));
    let (tx, _rx) = std::sync::mpsc::channel();
    let (handle, requests) = Handle::channel();
    tokio::spawn(run(api.client(), "node-a".into(), tx, requests));
    let cart = PodRef {
        namespace: "shop".into(),
        name: "cart".into(),
        uid: None,
    };
    let found = tokio::task::block_in_place(|| handle.lookup(&cart, Duration::from_secs(5)));
    let (info, namespace) = found.expect("the pod exists");
    assert_eq!(
        (info.uid.as_str(), info.service_account.as_str()),
        ("uid-cart", "cart")
    );
    assert_eq!(namespace.unwrap().labels[DATAPLANE_MODE_LABEL], "ambient");
    let missing = PodRef {
        name: "nope".into(),
        ..cart
    };
    let none = tokio::task::block_in_place(|| handle.lookup(&missing, Duration::from_secs(5)));
    assert!(none.is_none(), "a missing pod is None, not an error");
    // Annotating a pod that is gone is not an error either (the agent releases deleted pods).
    handle.annotate(
        &PodInfo {
            namespace: "shop".into(),
            name: "nope".into(),
            ..PodInfo::default()
        },
        false,
    );
}

#[test]
fn pod_addresses_come_from_the_status() {
    let mut object = pod("shop", "cart", "node-a", json!({}));
    let read = |o: &Value| -> Vec<String> {
        pod_info(&serde_json::from_value(o.clone()).unwrap())
            .unwrap()
            .ips
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(read(&object), ["10.1.0.7"], "podIP alone (older clusters)");
    object["status"]["podIPs"] = json!([{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]);
    assert_eq!(
        read(&object),
        ["10.1.0.7", "fd00::7"],
        "podIPs, both families"
    );
    object["status"] = json!({"phase": "Pending"});
    assert!(
        read(&object).is_empty(),
        "no address before the sandbox has one"
    );
}
