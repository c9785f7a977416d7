//! The mesh as the proxy knows it: workloads, services (and, later, policies) from a local YAML
//! file in standalone mode. The file is re-read when it changes; a file that does not parse or
//! does not hold together is refused with the line it failed at, and the last good mesh stays.
//!
//! ```yaml
//! trustDomain: cluster.local
//! workloads:
//!   - uid: pod-productpage-1        # the pod's uid, as enrolled
//!     name: productpage-v1-6c9f
//!     namespace: default
//!     serviceAccount: bookinfo-productpage
//!     ips: [10.99.1.2]
//!     node: node-b
//!     protocol: HBONE               # or TCP: not meshed, reached by plain passthrough
//! services:
//!   - hostname: productpage.default.svc.cluster.local
//!     vips: [10.96.0.10]
//!     ports: {9080: 9080}           # service port: target port
//!     endpoints: [pod-productpage-1]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tracing::{info, warn};

use crate::identity::Identity;
use crate::policy::Policies;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Protocol {
    /// Meshed: reached through an HBONE tunnel to its node's proxy.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not meshed: reached directly.
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Defaults to the file's `trustDomain`.
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub node: String,
    pub protocol: Protocol,
    /// The pod's labels: what policy selectors match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// Service port → target port on the endpoints.
    pub ports: BTreeMap<u16, u16>,
    /// Workload uids.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
    /// Istio `AuthorizationPolicy` and `PeerAuthentication` objects, as in Kubernetes.
    #[serde(default)]
    policies: Vec<serde_yaml::Value>,
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

/// Why a mesh file was refused: what and where.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One consistent view of the mesh, indexed for the data path.
#[derive(Clone, Debug, Default)]
pub struct Mesh {
    pub trust_domain: String,
    workloads: Vec<Workload>,
    identities: Vec<Identity>,
    by_uid: HashMap<String, usize>,
    by_ip: HashMap<IpAddr, usize>,
    services: Vec<Service>,
    by_vip: HashMap<SocketAddr, (usize, u16)>,
    pub policies: Policies,
    /// Problems with policy objects (unreadable ones fail closed), reported at load.
    pub policy_warnings: Vec<String>,
    /// The file's own policy objects, kept to combine with those from Kubernetes.
    file_policies: Vec<serde_yaml::Value>,
}

impl Mesh {
    /// Parses and checks a mesh file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, MeshError> {
        let invalid = |message: String| MeshError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        // serde_yaml's messages end with "at line L column C".
        let file: File = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (i, object) in file.policies.iter().enumerate() {
            if let Err(why) = classify(object) {
                // Skipping it would be worse than refusing the file: a DENY with a typo in its
                // kind would silently open the door. The last good mesh stays in force.
                return Err(invalid(format!(
                    "policies[{i}]: {why}; the file is refused (a policy skipped could be a DENY)"
                )));
            }
        }
        let (policies, policy_warnings) = Policies::read(&file.policies);
        let mut mesh = Mesh {
            trust_domain: file.trust_domain.clone(),
            policies,
            policy_warnings,
            file_policies: file.policies.clone(),
            ..Mesh::default()
        };
        for (i, w) in file.workloads.into_iter().enumerate() {
            let at = || format!("workloads[{i}] ({})", line_hint(text, &w.uid));
            let td = w.trust_domain.as_deref().unwrap_or(&file.trust_domain);
            let identity = Identity::new(td, &w.namespace, &w.service_account)
                .map_err(|e| invalid(format!("{}: {e}", at())))?;
            if w.uid.is_empty() {
                return Err(invalid(format!("{}: uid is empty", at())));
            }
            if let Some(&j) = mesh.by_uid.get(&w.uid) {
                return Err(invalid(format!(
                    "{}: uid {:?} is also workloads[{j}]'s",
                    at(),
                    w.uid
                )));
            }
            if w.ips.is_empty() {
                return Err(invalid(format!("{}: ips is empty", at())));
            }
            for ip in &w.ips {
                if let Some(&j) = mesh.by_ip.get(ip) {
                    return Err(invalid(format!(
                        "{}: ip {ip} also belongs to workloads[{j}] ({})",
                        at(),
                        mesh.workloads[j].uid
                    )));
                }
                mesh.by_ip.insert(*ip, i);
            }
            mesh.by_uid.insert(w.uid.clone(), i);
            mesh.identities.push(identity);
            mesh.workloads.push(w);
        }
        for (i, s) in file.services.into_iter().enumerate() {
            let at = || format!("services[{i}] ({})", line_hint(text, &s.hostname));
            if s.vips.is_empty() {
                return Err(invalid(format!("{}: vips is empty", at())));
            }
            for (&port, &target) in &s.ports {
                if port == 0 || target == 0 {
                    return Err(invalid(format!("{}: port 0 in ports", at())));
                }
                for vip in &s.vips {
                    let key = SocketAddr::new(*vip, port);
                    if mesh.by_vip.insert(key, (i, target)).is_some() {
                        return Err(invalid(format!("{}: {key} is already a service", at())));
                    }
                }
            }
            for uid in &s.endpoints {
                if !mesh.by_uid.contains_key(uid) {
                    return Err(invalid(format!(
                        "{} ({}): endpoint {uid:?} is not a workload",
                        at(),
                        line_hint(text, uid)
                    )));
                }
            }
            mesh.services.push(s);
        }
        Ok(mesh)
    }

    pub fn load(path: &Path) -> Result<Self, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// This mesh with the policies of the file and `external` (from Kubernetes) in force;
    /// `None` for external means "not synced yet": then nothing is allowed (fail closed).
    pub fn with_external(&self, external: Option<&[serde_yaml::Value]>) -> Mesh {
        let mut mesh = self.clone();
        let mut objects = self.file_policies.clone();
        objects.extend_from_slice(external.unwrap_or_default());
        let (mut policies, warnings) = Policies::read(&objects);
        if external.is_none() {
            policies.set_pending("policies from Kubernetes are not synced yet");
        }
        mesh.policies = policies;
        mesh.policy_warnings = warnings;
        mesh
    }

    pub fn workload(&self, uid: &str) -> Option<(&Workload, &Identity)> {
        let &i = self.by_uid.get(uid)?;
        Some((&self.workloads[i], &self.identities[i]))
    }

    pub fn workload_at(&self, ip: IpAddr) -> Option<(&Workload, &Identity)> {
        let &i = self.by_ip.get(&ip)?;
        Some((&self.workloads[i], &self.identities[i]))
    }

    /// The service behind `vip:port`, with its endpoints' target addresses.
    pub fn service_at(&self, addr: SocketAddr) -> Option<(&Service, Vec<SocketAddr>)> {
        let &(i, target) = self.by_vip.get(&addr)?;
        let service = &self.services[i];
        let family_matches = |ip: &IpAddr| ip.is_ipv4() == addr.is_ipv4();
        let endpoints = service
            .endpoints
            .iter()
            .filter_map(|uid| self.workload(uid))
            .filter_map(|(w, _)| w.ips.iter().copied().find(family_matches))
            .map(|ip| SocketAddr::new(ip, target))
            .collect();
        Some((service, endpoints))
    }

    /// What the config dump shows of the mesh: workloads with their identities, services,
    /// policies as enforced, and the problems found in policy objects.
    pub fn describe(&self) -> serde_json::Value {
        let workloads: Vec<serde_json::Value> = self
            .workloads
            .iter()
            .zip(&self.identities)
            .map(|(w, id)| {
                let mut v = serde_json::to_value(w).unwrap_or_default();
                v["identity"] = serde_json::Value::String(id.to_string());
                v
            })
            .collect();
        serde_json::json!({
            "trustDomain": self.trust_domain,
            "workloads": workloads,
            "services": self.services,
            "policies": self.policies.describe(),
            "policyWarnings": self.policy_warnings,
        })
    }

    pub fn workloads(&self) -> usize {
        self.workloads.len()
    }
}

/// "line N" of the first line that mentions `needle`, for errors the parser cannot place.
/// Whether a policy object of the file says what it is: an Istio security object of a kind
/// sluice enforces, with a name. A spec it cannot read fails closed in its own scope later;
/// this is only about objects that have no scope to fail closed in.
fn classify(object: &serde_yaml::Value) -> Result<(), String> {
    let text = |key: &str| object.get(key).and_then(serde_yaml::Value::as_str);
    let api_version = text("apiVersion").ok_or("no apiVersion")?;
    if !api_version.starts_with("security.istio.io/") {
        return Err(format!(
            "apiVersion {api_version:?} is not security.istio.io/…"
        ));
    }
    match text("kind").ok_or("no kind")? {
        "AuthorizationPolicy" | "PeerAuthentication" => {}
        other => {
            return Err(format!(
                "kind {other:?} is not AuthorizationPolicy or PeerAuthentication"
            ));
        }
    }
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default();
    if name.is_empty() {
        return Err("no metadata.name".to_owned());
    }
    // The reader skips (with a warning) an object it cannot place, one whose namespace is not
    // a string say: such an object must refuse the file as well.
    crate::policy::readable(object).map_err(|e| format!("unreadable metadata: {e}"))
}

fn line_hint(text: &str, needle: &str) -> String {
    if needle.is_empty() {
        return "line unknown".to_owned();
    }
    text.lines()
        .position(|line| line.contains(needle))
        .map_or_else(|| "line unknown".to_owned(), |n| format!("line {}", n + 1))
}

/// The current mesh, replaced whole when the file changes; readers take an `Arc` snapshot per
/// connection, so a reload never changes a connection's view halfway.
pub struct MeshWatch {
    current: RwLock<Arc<Mesh>>,
    path: PathBuf,
    /// The file's (mtime, size) when the current mesh was read: taken before reading, so a
    /// change racing the read is seen as a change on the next poll, never missed.
    loaded_stamp: Option<(SystemTime, u64)>,
    /// Bumped on every reload: live connections re-check their authorization on it.
    version: tokio::sync::watch::Sender<u64>,
    /// Policy objects from Kubernetes: `None` without Kubernetes mode, `Some(None)` until the
    /// first sync.
    external: RwLock<Option<Option<Vec<serde_yaml::Value>>>>,
}

/// Logs what the mesh's policies made of their objects.
fn report(mesh: &Mesh) {
    for warning in &mesh.policy_warnings {
        warn!(warning = %warning, "policy");
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

impl MeshWatch {
    pub fn load(path: &Path) -> Result<Arc<Self>, MeshError> {
        let loaded_stamp = stamp(path);
        let mesh = Mesh::load(path)?;
        info!(path = %path.display(), workloads = mesh.workloads(), "mesh loaded");
        report(&mesh);
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(mesh)),
            path: path.to_path_buf(),
            loaded_stamp,
            version: tokio::sync::watch::Sender::new(0),
            external: RwLock::new(None),
        }))
    }

    /// Kubernetes mode: policies also come from the cluster. Until the first
    /// [`MeshWatch::set_external_policies`], nothing is allowed.
    pub fn expect_external_policies(&self) {
        *self
            .external
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(None);
        self.replace(|file_mesh| file_mesh.clone());
    }

    /// Puts the cluster's policy objects in force next to the file's.
    pub fn set_external_policies(&self, objects: Vec<serde_yaml::Value>) {
        *self
            .external
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Some(objects));
        self.replace(|mesh| mesh.clone());
        let mesh = self.current();
        info!(
            authorization_and_peer_objects = mesh.policies.len(),
            "policies from Kubernetes in force"
        );
        report(&mesh);
    }

    /// Makes `make(current)` the mesh in force, with the external policies applied, and tells
    /// live connections.
    fn replace(&self, make: impl FnOnce(&Mesh) -> Mesh) {
        let external = self
            .external
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let base = make(&current);
        let mesh = match &external {
            None => base,
            Some(objects) => base.with_external(objects.as_deref()),
        };
        *current = Arc::new(mesh);
        drop(current);
        self.version.send_modify(|v| *v += 1);
    }

    /// Changes whenever a new mesh is in force.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn current(&self) -> Arc<Mesh> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the file whenever its modification time or size changes (checked every
    /// `every`), until the watch is dropped. Polling rather than inotify: it also sees a file
    /// replaced by rename, as a ConfigMap update does.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) {
        let watch = Arc::downgrade(self);
        let path = self.path.clone();
        let mut seen = self.loaded_stamp;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(watch) = watch.upgrade() else { return };
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match Mesh::load(&path) {
                    Ok(mesh) => {
                        watch.replace(|_| mesh);
                        let mesh = watch.current();
                        info!(path = %path.display(), workloads = mesh.workloads(), "mesh reloaded");
                        report(&mesh);
                    }
                    Err(e) => warn!(error = %e, "mesh file refused; keeping the last good mesh"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
trustDomain: cluster.local
workloads:
  - uid: pod-sleep
    name: sleep
    namespace: default
    serviceAccount: sleep
    ips: [10.99.0.2]
    node: a
    protocol: HBONE
  - uid: pod-pp
    name: productpage
    namespace: default
    serviceAccount: bookinfo-productpage
    ips: [10.99.1.2, fd00:99:1::2]
    node: b
    protocol: HBONE
  - uid: pod-legacy
    name: legacy
    namespace: legacy
    serviceAccount: default
    ips: [10.99.1.9]
    protocol: TCP
services:
  - hostname: productpage.default.svc.cluster.local
    vips: [10.96.0.10, fd00:96::10]
    ports: {9080: 8080}
    endpoints: [pod-pp]
";

    fn parse(text: &str) -> Result<Mesh, String> {
        Mesh::parse(Path::new("mesh.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_policy_object_that_does_not_say_what_it_is_refuses_the_file() {
        let with = |policy: &str| {
            format!("trustDomain: cluster.local\nworkloads: []\npolicies:\n{policy}")
        };
        for (policy, says) in [
            (
                "  - {apiVersion: security.istio.io/v1, kind: AuthorisationPolicy, metadata: {name: deny-admin}, spec: {action: DENY}}\n",
                "kind \"AuthorisationPolicy\"",
            ),
            (
                "  - {apiVersion: networking.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny-admin}, spec: {action: DENY}}\n",
                "apiVersion \"networking.istio.io/v1\"",
            ),
            (
                "  - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {namespace: shop}, spec: {action: DENY}}\n",
                "no metadata.name",
            ),
            (
                "  - {kind: AuthorizationPolicy, metadata: {name: x}}\n",
                "no apiVersion",
            ),
            ("  - just a string\n", "no apiVersion"),
            (
                "  - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny-admin, namespace: 5}, spec: {action: DENY}}\n",
                "unreadable metadata",
            ),
            (
                "  - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny-admin, namespace: }, spec: {action: DENY}}\n",
                "unreadable metadata",
            ),
        ] {
            let err = parse(&with(policy))
                .err()
                .unwrap_or_else(|| panic!("accepted {policy}"));
            assert!(
                err.contains("policies[0]") && err.contains(says) && err.contains("refused"),
                "{err}"
            );
        }
        // A well-formed object whose spec cannot be read is not refused here: it fails closed
        // in its own scope (see the policy tests).
        let mesh = parse(&with(
            "  - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: odd, namespace: shop}, spec: {action: MAYBE}}\n",
        ))
        .unwrap();
        assert_eq!(mesh.policy_warnings.len(), 1, "{:?}", mesh.policy_warnings);
    }

    #[test]
    fn indexes_workloads_and_services() {
        let mesh = parse(GOOD).unwrap();
        let (w, id) = mesh.workload_at("10.99.1.2".parse().unwrap()).unwrap();
        assert_eq!(w.uid, "pod-pp");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        let (svc, eps) = mesh.service_at("10.96.0.10:9080".parse().unwrap()).unwrap();
        assert_eq!(svc.hostname, "productpage.default.svc.cluster.local");
        assert_eq!(eps, ["10.99.1.2:8080".parse::<SocketAddr>().unwrap()]);
        let (_, eps6) = mesh
            .service_at("[fd00:96::10]:9080".parse().unwrap())
            .unwrap();
        assert_eq!(eps6, ["[fd00:99:1::2]:8080".parse::<SocketAddr>().unwrap()]);
        assert!(mesh.service_at("10.96.0.10:80".parse().unwrap()).is_none());
        assert_eq!(
            mesh.workload("pod-legacy").unwrap().0.protocol,
            Protocol::Tcp
        );
    }

    #[test]
    fn malformed_files_say_where() {
        for (text, expect) in [
            (GOOD.replace("protocol: TCP", "protocol: UDP"), "line 22"),
            (
                GOOD.replace("ips: [10.99.0.2]", "ips: [10.99.0.300]"),
                "line 7",
            ),
            (GOOD.replace("    node: a\n", "    nodee: a\n"), "line 8"),
            (
                GOOD.replace("ips: [10.99.1.9]", "ips: [10.99.0.2]"),
                "workloads[2] (line 17): ip 10.99.0.2 also belongs to workloads[0] (pod-sleep)",
            ),
            (
                GOOD.replace("uid: pod-legacy", "uid: pod-sleep"),
                "uid \"pod-sleep\" is also workloads[0]'s",
            ),
            (
                GOOD.replace("endpoints: [pod-pp]", "endpoints: [pod-gone]"),
                "endpoint \"pod-gone\" is not a workload",
            ),
            (
                GOOD.replace("serviceAccount: sleep", "serviceAccount: sl/eep"),
                "service account",
            ),
        ] {
            let err = parse(&text).expect_err(expect);
            assert!(err.contains(expect), "{err:?} should mention {expect:?}");
            assert!(err.starts_with("mesh.yaml: "), "{err}");
        }
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_last_good_mesh() {
        struct Removed(std::path::PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let file =
            Removed(std::env::temp_dir().join(format!("sluice-mesh-{}.yaml", std::process::id())));
        let path = file.0.clone();
        let one = "workloads:\n  - {uid: a, name: a, namespace: d, serviceAccount: a, ips: [10.0.0.1], protocol: HBONE}\n";
        let two = format!(
            "{one}  - {{uid: b, name: b, namespace: d, serviceAccount: b, ips: [10.0.0.2], protocol: TCP}}\n"
        );
        std::fs::write(&path, one).unwrap();
        let watch = MeshWatch::load(&path).unwrap();
        watch.spawn_reloader(Duration::from_millis(20));
        let wait_for = |n: usize| {
            let watch = watch.clone();
            async move {
                for _ in 0..250 {
                    if watch.current().workloads() == n {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            }
        };
        std::fs::write(&path, &two).unwrap();
        assert!(wait_for(2).await, "the new workload was not picked up");
        std::fs::write(&path, format!("{two}  - {{uid: c, ips: [not-an-ip]}}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            watch.current().workloads(),
            2,
            "a broken file must not replace the mesh"
        );
        std::fs::write(&path, one).unwrap();
        assert!(wait_for(1).await, "a fixed file is picked up again");
    }
}
