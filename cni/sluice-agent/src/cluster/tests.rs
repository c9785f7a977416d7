//! The Kubernetes source against kube-rs's mock service: a `kube::Client` over an in-memory API
//! server (a `tower::service_fn`) that lists, watches (resourceVersion-ordered events, field
//! selectors), gets and merge-patches realistic Namespace and Pod objects.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request as HttpRequest, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::node::Event;
use crate::selection::{DATAPLANE_MODE_LABEL, Selector};

#[derive(Default)]
struct State {
    rv: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    /// (resourceVersion, kind, event type, object)
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// Every request as "METHOD path?query".
    requests: Vec<String>,
}

/// The in-memory API server.
#[derive(Clone, Default)]
struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
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

impl FakeApi {
    fn record(&self, kind: &'static str, kind_event: &'static str, mut object: Value) -> Value {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let rv = state.rv;
        state.events.push((rv, kind, kind_event, object.clone()));
        match kind {
            "Namespace" => {
                let name = object["metadata"]["name"].as_str().unwrap().to_owned();
                if kind_event == "DELETED" {
                    state.namespaces.remove(&name);
                } else {
                    state.namespaces.insert(name, object.clone());
                }
            }
            _ => {
                let key = (
                    object["metadata"]["namespace"].as_str().unwrap().to_owned(),
                    object["metadata"]["name"].as_str().unwrap().to_owned(),
                );
                if kind_event == "DELETED" {
                    state.pods.remove(&key);
                } else {
                    state.pods.insert(key, object.clone());
                }
            }
        }
        drop(state);
        self.changed.notify_waiters();
        object
    }

    fn put_namespace(&self, name: &str, labels: Value) {
        let exists = self.state.lock().unwrap().namespaces.contains_key(name);
        let kind_event = if exists { "MODIFIED" } else { "ADDED" };
        self.record("Namespace", kind_event, namespace(name, labels));
    }

    fn put_pod(&self, object: Value) {
        self.record("Pod", "ADDED", object);
    }

    fn edit_pod(&self, namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = self.state.lock().unwrap().pods[&key].clone();
        edit(&mut object);
        self.record("Pod", "MODIFIED", object);
    }

    fn delete_pod(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let object = self.state.lock().unwrap().pods[&key].clone();
        self.record("Pod", "DELETED", object);
    }

    fn pod_object(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = (namespace.to_owned(), name.to_owned());
        self.state.lock().unwrap().pods.get(&key).cloned()
    }

    fn client(&self) -> Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: HttpRequest<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request).await) }
        });
        Client::new(service, "default")
    }

    async fn handle(&self, request: HttpRequest<Body>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query: BTreeMap<String, String> = request
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%2F", "/")))
            .collect();
        self.state.lock().unwrap().requests.push(format!(
            "{method} {path}?{}",
            request.uri().query().unwrap_or("")
        ));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let node = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        match (method, parts.as_slice()) {
            (Method::GET, ["api", "v1", "namespaces"]) => {
                self.collection("Namespace", &query, None).await
            }
            (Method::GET, ["api", "v1", "pods"]) => self.collection("Pod", &query, node).await,
            (Method::GET, ["api", "v1", "namespaces", name]) => {
                let found = self.state.lock().unwrap().namespaces.get(*name).cloned();
                object_or_404(found)
            }
            (Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
                object_or_404(self.pod_object(ns, name))
            }
            (Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
                let (ns, name) = ((*ns).to_owned(), (*name).to_owned());
                let body = request.into_body().collect_bytes().await.unwrap();
                let patch: Value = serde_json::from_slice(&body).unwrap();
                if self.pod_object(&ns, &name).is_none() {
                    return object_or_404(None);
                }
                self.edit_pod(&ns, &name, |pod| {
                    let annotations = pod["metadata"]["annotations"].as_object_mut().unwrap();
                    for (k, v) in patch["metadata"]["annotations"].as_object().unwrap() {
                        if v.is_null() {
                            annotations.remove(k);
                        } else {
                            annotations.insert(k.clone(), v.clone());
                        }
                    }
                });
                object_or_404(self.pod_object(&ns, &name))
            }
            _ => respond(StatusCode::NOT_FOUND, status_404()),
        }
    }

    /// A list, or with `watch=true` the events after `resourceVersion` (waiting up to a second
    /// for one, as a real watch would stay open), as newline-delimited JSON.
    async fn collection(
        &self,
        kind: &'static str,
        query: &BTreeMap<String, String>,
        node: Option<String>,
    ) -> Response<Body> {
        let on_node = |object: &Value| {
            node.as_deref()
                .is_none_or(|n| object["spec"]["nodeName"] == n)
        };
        if query.get("watch").map(String::as_str) != Some("true") {
            let state = self.state.lock().unwrap();
            let items: Vec<Value> = match kind {
                "Namespace" => state.namespaces.values().cloned().collect(),
                _ => state
                    .pods
                    .values()
                    .filter(|p| on_node(p))
                    .cloned()
                    .collect(),
            };
            let list = json!({"apiVersion": "v1", "kind": format!("{kind}List"),
                              "metadata": {"resourceVersion": state.rv.to_string()}, "items": items});
            return respond(StatusCode::OK, list.to_string());
        }
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let notified = self.changed.notified();
            let lines: Vec<String> = self
                .state
                .lock()
                .unwrap()
                .events
                .iter()
                .filter(|(rv, k, _, object)| *rv > since && *k == kind && on_node(object))
                .map(|(_, _, event, object)| json!({"type": event, "object": object}).to_string())
                .collect();
            if !lines.is_empty() || Instant::now() >= deadline {
                let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
                return respond(StatusCode::OK, body);
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

fn status_404() -> String {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
           "message": "not found", "code": 404})
    .to_string()
}

fn object_or_404(object: Option<Value>) -> Response<Body> {
    match object {
        Some(o) => respond(StatusCode::OK, o.to_string()),
        None => respond(StatusCode::NOT_FOUND, status_404()),
    }
}

fn respond(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.into_bytes()))
        .unwrap()
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
    let api = FakeApi::default();
    api.put_namespace("shop", json!({}));
    api.put_namespace("kube-system", json!({}));
    api.put_pod(pod("shop", "cart", "node-a", json!({})));
    api.put_pod(pod("shop", "elsewhere", "node-b", json!({})));
    api.put_pod(pod("shop", "agent", "node-a", json!({"hostNetwork": true})));
    api.put_pod(pod("kube-system", "dns", "node-a", json!({})));
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
    api.put_namespace("shop", ambient());
    let labelled = world_where(&rx, "shop is labelled", |w| !desired(w).is_empty());
    assert_eq!(desired(&labelled), ["uid-cart"]);
    // Even labelled, kube-system stays out.
    api.put_namespace("kube-system", ambient());
    let system = world_where(&rx, "kube-system is labelled", |w| {
        w.namespaces["kube-system"]
            .labels
            .contains_key(DATAPLANE_MODE_LABEL)
    });
    assert_eq!(desired(&system), ["uid-cart"]);

    // The pod opts out by annotation, then back in.
    api.edit_pod("shop", "cart", |p| {
        p["metadata"]["annotations"][REDIRECTION_ANNOTATION] = json!("disabled")
    });
    let opted_out = world_where(&rx, "cart opted out", |w| desired(w).is_empty());
    assert_eq!(
        opted_out.pods["uid-cart"].annotations[REDIRECTION_ANNOTATION],
        "disabled"
    );
    api.edit_pod("shop", "cart", |p| p["metadata"]["annotations"] = json!({}));
    world_where(&rx, "cart opted back in", |w| desired(w) == ["uid-cart"]);

    // The agent marks the pod it captured, through a merge patch; the watch shows it.
    let cart = pod_info(&serde_json::from_value(api.pod_object("shop", "cart").unwrap()).unwrap())
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
    api.put_namespace("shop", json!({}));
    world_where(&rx, "shop is unlabelled", |w| desired(w).is_empty());
    api.put_namespace("shop", ambient());
    world_where(&rx, "shop is labelled again", |w| {
        desired(w) == ["uid-cart"]
    });

    // A deleted pod leaves the world; a finished one too.
    api.delete_pod("shop", "cart");
    world_where(&rx, "cart is gone", |w| !w.pods.contains_key("uid-cart"));
    api.put_pod(pod("shop", "job", "node-a", json!({})));
    world_where(&rx, "job runs", |w| desired(w) == ["uid-job"]);
    api.edit_pod("shop", "job", |p| p["status"]["phase"] = json!("Succeeded"));
    world_where(&rx, "job finished", |w| !w.pods.contains_key("uid-job"));

    let requests = api.state.lock().unwrap().requests.clone();
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
    let api = FakeApi::default();
    api.put_namespace("shop", ambient());
    api.put_pod(pod("shop", "cart", "node-a", json!({})));
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
