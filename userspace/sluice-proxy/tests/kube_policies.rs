//! Policies from Kubernetes: Istio's objects in an in-memory API server (`sluice-kube-fake`,
//! behind a real `kube::Client`), watched into a mesh loaded from a file.

// A test binary: a failed unwrap in a helper is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_kube_fake::FakeApi;
use sluice_proxy::identity::Identity;
use sluice_proxy::mesh::MeshWatch;
use sluice_proxy::policy::{Connection, MtlsMode, Target, Verdict};

const AUTHZ: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const PEER: &str = "/apis/security.istio.io/v1/peerauthentications";

const MESH: &str = "workloads:\n  - {uid: pp, name: productpage, namespace: default, serviceAccount: productpage, \
                    ips: [10.1.0.9], protocol: HBONE, labels: {app: productpage}}\n";

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn policy(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                        "generation": 1, "managedFields": []},
           "spec": spec})
}

fn decide(mesh: &MeshWatch, sa: &str) -> Verdict {
    let mesh = mesh.current();
    let labels = BTreeMap::from([("app".to_owned(), "productpage".to_owned())]);
    let target = Target {
        namespace: "default",
        labels: Some(&labels),
    };
    let peer = Identity::new("cluster.local", "default", sa).unwrap();
    mesh.policies.authorize(
        &target,
        &Connection {
            source_ip: "10.1.0.2".parse::<IpAddr>().unwrap(),
            source: Some(&peer),
            destination_ip: "10.1.0.9".parse().unwrap(),
            destination_port: 9080,
        },
    )
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_policies_apply_after_the_first_list_and_follow_every_change() {
    let file = TempFile(
        std::env::temp_dir().join(format!("sluice-kube-mesh-{}.yaml", std::process::id())),
    );
    std::fs::write(&file.0, MESH).unwrap();
    let mesh = MeshWatch::load(&file.0).unwrap();
    let api = FakeApi::with_collections(&[AUTHZ, PEER]);
    api.put(
        AUTHZ,
        policy(
            "AuthorizationPolicy",
            "productpage-viewer",
            json!({"selector": {"matchLabels": {"app": "productpage"}},
                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]}),
        ),
    );
    // Before the first list, nothing is allowed.
    mesh.expect_external_policies();
    assert!(
        matches!(decide(&mesh, "sleep"), Verdict::Deny { .. }),
        "fail closed until synced"
    );
    tokio::spawn(sluice_proxy::kube_policies::run(api.client(), mesh.clone()));

    eventually("the ALLOW is in force", || {
        decide(&mesh, "sleep") == Verdict::Allow
    })
    .await;
    assert!(matches!(decide(&mesh, "notsleep"), Verdict::Deny { .. }));

    // A DENY added in the cluster wins; deleting it restores the ALLOW.
    let deny = policy(
        "AuthorizationPolicy",
        "deny-sleep",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["*/sa/sleep"]}}]}]}),
    );
    let changes = mesh.changes();
    api.put(AUTHZ, deny);
    eventually("the DENY is in force", || {
        decide(&mesh, "sleep")
            == Verdict::Deny {
                policy: "default/deny-sleep".into(),
            }
    })
    .await;
    assert!(changes.has_changed().unwrap(), "live connections are told");
    api.delete(AUTHZ, "default", "deny-sleep");
    eventually("the DENY is gone", || {
        decide(&mesh, "sleep") == Verdict::Allow
    })
    .await;

    // PeerAuthentication from the cluster, and a broken object reported by name and field.
    api.put(
        PEER,
        policy(
            "PeerAuthentication",
            "strict",
            json!({"mtls": {"mode": "STRICT"}}),
        ),
    );
    let labels = BTreeMap::new();
    let any = Target {
        namespace: "default",
        labels: Some(&labels),
    };
    eventually("STRICT is in force", || {
        mesh.current().policies.mtls(&any, 80).mode == MtlsMode::Strict
    })
    .await;
    api.put(
        AUTHZ,
        policy(
            "AuthorizationPolicy",
            "typo",
            json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        ),
    );
    eventually("the broken object is reported", || {
        mesh.current()
            .policy_warnings
            .iter()
            .any(|w| w.contains("default/typo") && w.contains("ports"))
    })
    .await;
    // The mesh file's own workloads are untouched by all of this.
    assert!(mesh.current().workload("pp").is_some());
    let _keep: Arc<MeshWatch> = mesh;
}
