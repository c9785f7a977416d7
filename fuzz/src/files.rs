//! The two files an operator (or a control plane) writes: the agent's pods file and the proxy's
//! mesh file. Each is read whole; what is accepted must hold together and write back out to a
//! file that reads as the same thing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Value, json};
use sluice_agent::selection::{Decision, Selector, World};
use sluice_agent::standalone;
use sluice_capture::PodUid;
use sluice_proxy::identity::Identity;
use sluice_proxy::mesh::Mesh;

/// The agent's pods file (`standalone::parse`).
pub fn pods_file(data: &[u8]) {
    // The agent reads the file with `read_to_string`: bytes that are not UTF-8 never get here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("pods.yaml");
    let world = match standalone::parse(path, text) {
        Ok(world) => world,
        Err(e) => {
            assert!(e.to_string().starts_with("pods file pods.yaml: "), "{e}");
            return;
        }
    };
    for (uid, pod) in &world.pods {
        assert_eq!(uid, &pod.uid);
        assert!(PodUid::parse(uid).is_ok(), "pod uid {uid:?} accepted");
        assert!(!pod.name.is_empty() && !pod.namespace.is_empty());
        let named = world.pod_named(&pod.namespace, &pod.name);
        assert_eq!(named.map(|p| &p.uid), Some(uid), "two pods with one name");
    }
    for (name, ns) in &world.namespaces {
        assert_eq!(name, &ns.name);
        assert!(!name.is_empty());
    }
    let selector = Selector {
        excluded_namespaces: vec!["kube-system".into()],
    };
    for (uid, pod) in selector.desired(&world) {
        assert_eq!(uid, pod.uid);
        assert!(!pod.host_network, "a hostNetwork pod selected");
        assert_ne!(
            pod.namespace, "kube-system",
            "an excluded namespace's pod selected"
        );
        assert_eq!(
            selector.decide(world.namespaces.get(&pod.namespace), pod),
            Decision::Enrol
        );
    }
    let rendered = render_pods(&world);
    let again = standalone::parse(path, &rendered)
        .unwrap_or_else(|e| panic!("the world written back is refused: {e}\n{rendered}"));
    assert_eq!(
        again, world,
        "the pods file does not round-trip:\n{rendered}"
    );
}

fn render_pods(world: &World) -> String {
    let namespaces: Vec<Value> = world
        .namespaces
        .values()
        .map(|ns| json!({"name": ns.name, "labels": ns.labels}))
        .collect();
    let pods: Vec<Value> = world
        .pods
        .values()
        .map(|p| {
            json!({
                "uid": p.uid, "name": p.name, "namespace": p.namespace,
                "serviceAccount": p.service_account, "labels": p.labels,
                "annotations": p.annotations, "hostNetwork": p.host_network,
                "ips": p.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_yaml::to_string(&json!({"namespaces": namespaces, "pods": pods}))
        .expect("a world serializes")
}

/// The proxy's mesh file (`Mesh::parse`).
pub fn mesh_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("mesh.yaml");
    let mesh = match Mesh::parse(path, text) {
        Ok(mesh) => mesh,
        Err(e) => {
            assert!(e.to_string().starts_with("mesh.yaml: "), "{e}");
            return;
        }
    };
    let described = mesh.describe();
    let workloads = described["workloads"].as_array().expect("workloads listed");
    assert_eq!(workloads.len(), mesh.workloads());
    for w in workloads {
        check_workload(&mesh, w);
    }
    for s in described["services"].as_array().expect("services listed") {
        check_service(&mesh, s);
    }
    check_mesh_policies(&mesh, text);
    // Workloads and services written back out read as the same mesh.
    let rendered = render_mesh(&described);
    let again = Mesh::parse(path, &rendered)
        .unwrap_or_else(|e| panic!("the mesh written back is refused: {e}\n{rendered}"));
    let again = again.describe();
    assert_eq!(again["trustDomain"], described["trustDomain"]);
    assert_eq!(again["workloads"], described["workloads"], "{rendered}");
    assert_eq!(again["services"], described["services"], "{rendered}");
}

fn check_workload(mesh: &Mesh, w: &Value) {
    let uid = w["uid"].as_str().expect("a workload has a uid");
    let (found, identity) = mesh
        .workload(uid)
        .expect("a listed workload is found by uid");
    assert_eq!(found.uid, uid);
    assert!(!found.ips.is_empty());
    for ip in &found.ips {
        let (at, _) = mesh
            .workload_at(*ip)
            .expect("a workload is found by its ip");
        assert_eq!(at.uid, uid, "{ip} is two workloads'");
    }
    let td = found.trust_domain.as_deref().unwrap_or(&mesh.trust_domain);
    assert_eq!(identity.trust_domain, td);
    assert_eq!(identity.namespace, found.namespace);
    assert_eq!(identity.service_account, found.service_account);
    let uri = identity.to_string();
    assert_eq!(w["identity"].as_str(), Some(uri.as_str()));
    assert_eq!(
        Identity::parse(&uri).as_ref(),
        Ok(identity),
        "{uri} does not round-trip"
    );
}

fn check_service(mesh: &Mesh, s: &Value) {
    let hostname = s["hostname"].as_str().expect("a service has a hostname");
    let vips = s["vips"].as_array().expect("a service has vips");
    assert!(!vips.is_empty());
    for (port, target) in s["ports"].as_object().expect("a service has ports") {
        let port: u16 = port.parse().expect("a port");
        let target = target.as_u64().expect("a target port");
        assert!(port != 0 && target != 0);
        for vip in vips {
            let vip = vip.as_str().and_then(|v| v.parse().ok()).expect("a vip");
            let addr = SocketAddr::new(vip, port);
            let (service, endpoints) = mesh.service_at(addr).expect("a service at its vip");
            assert_eq!(service.hostname, hostname, "{addr} is two services'");
            for e in endpoints {
                assert_eq!(u64::from(e.port()), target);
                assert_eq!(e.is_ipv4(), addr.is_ipv4(), "an endpoint of another family");
                let (w, _) = mesh.workload_at(e.ip()).expect("an endpoint is a workload");
                assert!(service.endpoints.contains(&w.uid));
            }
        }
    }
}

/// Every policy object a file is accepted with is in force (enforced, or failing closed): a
/// skipped one could be a DENY. Only gateway and waypoint policies (`targetRefs`) are
/// ignored, by design. Until Kubernetes' policies are synced, nothing is allowed.
fn check_mesh_policies(mesh: &Mesh, text: &str) {
    // The file's policy objects, read as the mesh reads them (other keys may hold scalars that
    // only read as the mesh's own types, e.g. a trust domain of digits past u128).
    #[derive(serde::Deserialize)]
    struct PoliciesOf {
        #[serde(default)]
        policies: Vec<serde_yaml::Value>,
    }
    let objects = serde_yaml::from_str::<PoliciesOf>(text)
        .expect("an accepted file's policies read")
        .policies;
    let for_gateways = objects
        .iter()
        .filter(|o| {
            o.get("kind").and_then(serde_yaml::Value::as_str) == Some("AuthorizationPolicy")
                && o.get("spec")
                    .is_some_and(|s| s.get("targetRefs").is_some() || s.get("targetRef").is_some())
        })
        .count();
    assert_eq!(
        mesh.policies.len() + for_gateways,
        objects.len(),
        "a policy object of an accepted file is not in force; warnings: {:?}",
        mesh.policy_warnings
    );
    let pending = mesh.with_external(None);
    assert!(pending.policies.pending().is_some());
    let synced = mesh.with_external(Some(&[]));
    assert_eq!(synced.policies, mesh.policies);
}

/// A mesh file with the described workloads and services (no policies).
fn render_mesh(described: &Value) -> String {
    let workloads: Vec<Value> = described["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let mut w = w.clone();
            if let Some(w) = w.as_object_mut() {
                w.remove("identity");
            }
            w
        })
        .collect();
    // JSON keys are strings; the file's ports are a map of numbers.
    let services: Vec<serde_yaml::Value> = described["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let ports: BTreeMap<u16, u16> =
                serde_json::from_value::<BTreeMap<String, u16>>(s["ports"].clone())
                    .expect("ports")
                    .into_iter()
                    .map(|(k, v)| (k.parse().expect("a port"), v))
                    .collect();
            let mut s = serde_yaml::to_value(s).expect("a service");
            s["ports"] = serde_yaml::to_value(ports).expect("ports");
            s
        })
        .collect();
    let file = serde_yaml::to_value(json!({
        "trustDomain": described["trustDomain"],
        "workloads": workloads,
    }))
    .expect("a mesh");
    let mut file = file;
    file["services"] = serde_yaml::Value::Sequence(services);
    serde_yaml::to_string(&file).expect("a mesh serializes")
}
