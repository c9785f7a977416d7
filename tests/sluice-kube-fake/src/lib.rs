//! An in-memory Kubernetes API server for tests, served to a real `kube::Client` through a
//! `tower::service_fn` (kube-rs's mock-service approach). It keeps objects per collection and
//! answers what watchers and controllers send: list, watch from a resourceVersion (events in
//! order, the request held open up to a second as a real watch is), get, JSON merge patch,
//! and `spec.nodeName` field selectors.
//!
//! Collections are API paths: `/api/v1/namespaces` (cluster-scoped), `/api/v1/pods`,
//! `/apis/security.istio.io/v1/authorizationpolicies` (namespaced).

#![allow(clippy::unwrap_used)] // a test fixture: a poisoned lock or bad JSON is a failed test

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    rv: u64,
    /// collection → (namespace, name) → object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// (resourceVersion, collection, event type, object)
    events: Vec<(u64, String, &'static str, Value)>,
    /// Every request as "METHOD path?query".
    requests: Vec<String>,
}

/// The API server. Clones share state.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("").to_owned(),
        meta["name"].as_str().unwrap_or("").to_owned(),
    )
}

impl FakeApi {
    /// A server holding the given collections, empty.
    pub fn with_collections(collections: &[&str]) -> Self {
        let api = Self::default();
        {
            let mut state = api.state.lock().unwrap();
            for c in collections {
                state.objects.entry((*c).to_owned()).or_default();
            }
        }
        api
    }

    /// A `kube::Client` talking to this server.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Serves the API over plain HTTP on `listener`, for another process (the agent binary)
    /// given [`kubeconfig`]; runs on the current tokio runtime.
    pub fn serve_http(&self, listener: tokio::net::TcpListener) {
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let api = api.clone();
                            async move {
                                let (parts, body) = request.into_parts();
                                let bytes = http_body_util::BodyExt::collect(body)
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                let request = Request::from_parts(parts, Body::from(bytes));
                                Ok::<_, Infallible>(api.handle(request).await)
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
    }

    /// Creates or replaces an object in `collection`; returns it with its resourceVersion.
    pub fn put(&self, collection: &str, object: Value) -> Value {
        let exists = self.get(collection, &key_of(&object)).is_some();
        self.record(
            collection,
            if exists { "MODIFIED" } else { "ADDED" },
            object,
        )
    }

    /// Deletes an object, if there.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(object) = self.get(collection, &key) {
            self.record(collection, "DELETED", object);
        }
    }

    /// Edits an object in place (it must exist).
    pub fn edit(
        &self,
        collection: &str,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = self.get(collection, &key).unwrap();
        edit(&mut object);
        self.record(collection, "MODIFIED", object);
    }

    pub fn object(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.get(collection, &(namespace.to_owned(), name.to_owned()))
    }

    /// Every request so far, as "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    fn get(&self, collection: &str, key: &(String, String)) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state.objects.get(collection)?.get(key).cloned()
    }

    fn record(&self, collection: &str, event: &'static str, mut object: Value) -> Value {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let rv = state.rv;
        state
            .events
            .push((rv, collection.to_owned(), event, object.clone()));
        let objects = state.objects.entry(collection.to_owned()).or_default();
        if event == "DELETED" {
            objects.remove(&key_of(&object));
        } else {
            objects.insert(key_of(&object), object.clone());
        }
        drop(state);
        self.changed.notify_waiters();
        object
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let raw_query = request.uri().query().unwrap_or("").to_owned();
        let query: BTreeMap<String, String> = raw_query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%2F", "/")))
            .collect();
        self.state
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {path}?{raw_query}"));
        let collections: Vec<String> = {
            let state = self.state.lock().unwrap();
            state.objects.keys().cloned().collect()
        };
        if method == Method::GET && collections.contains(&path) {
            return self.collection(&path, &query).await;
        }
        // An object: `<prefix>/namespaces/<ns>/<plural>/<name>` or, cluster-scoped,
        // `<collection>/<name>`.
        let Some((collection, key)) = locate(&path, &collections) else {
            return not_found();
        };
        match method {
            Method::GET => object_or_404(self.get(&collection, &key)),
            Method::PATCH => {
                if self.get(&collection, &key).is_none() {
                    return not_found();
                }
                let body = request.into_body().collect_bytes().await.unwrap();
                let patch: Value = serde_json::from_slice(&body).unwrap();
                self.edit(&collection, &key.0, &key.1, |object| merge(object, &patch));
                object_or_404(self.get(&collection, &key))
            }
            _ => not_found(),
        }
    }

    /// A list, or with `watch=true` the events after `resourceVersion` (waiting up to a second
    /// for one), as newline-delimited JSON.
    async fn collection(
        &self,
        collection: &str,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let node = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        let selected = |object: &Value| {
            node.as_deref()
                .is_none_or(|n| object["spec"]["nodeName"] == n)
        };
        if query.get("watch").map(String::as_str) != Some("true") {
            let state = self.state.lock().unwrap();
            let items: Vec<Value> = state
                .objects
                .get(collection)
                .map(|o| o.values().filter(|v| selected(v)).cloned().collect())
                .unwrap_or_default();
            let list =
                json!({"metadata": {"resourceVersion": state.rv.to_string()}, "items": items});
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
                .filter(|(rv, c, _, object)| *rv > since && c == collection && selected(object))
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

/// Which collection and key an object path names.
fn locate(path: &str, collections: &[String]) -> Option<(String, (String, String))> {
    for collection in collections {
        let (prefix, plural) = collection.rsplit_once('/')?;
        let namespaced = format!("{prefix}/namespaces/");
        if let Some(rest) = path.strip_prefix(&namespaced) {
            let mut parts = rest.split('/');
            if let (Some(ns), Some(p), Some(name), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
                && p == plural
            {
                return Some((collection.clone(), (ns.to_owned(), name.to_owned())));
            }
        }
        if let Some(name) = path.strip_prefix(&format!("{collection}/"))
            && !name.contains('/')
        {
            return Some((collection.clone(), (String::new(), name.to_owned())));
        }
    }
    None
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Some(object) = target.as_object_mut() else {
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            object.remove(k);
        } else {
            merge(object.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn not_found() -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "message": "not found", "code": 404});
    respond(StatusCode::NOT_FOUND, status.to_string())
}

fn object_or_404(object: Option<Value>) -> Response<Body> {
    match object {
        Some(o) => respond(StatusCode::OK, o.to_string()),
        None => not_found(),
    }
}

fn respond(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.into_bytes()))
        .unwrap()
}

/// A kubeconfig whose only cluster is this fake, served at `addr` by [`FakeApi::serve_http`].
pub fn kubeconfig(addr: std::net::SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
         user: fake\n    namespace: default\ncurrent-context: fake\n"
    )
}
