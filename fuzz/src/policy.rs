//! Istio `AuthorizationPolicy` and `PeerAuthentication` objects, as the mesh file or the
//! Kubernetes watch hands them to `Policies::read`, and the decisions made from them.
//!
//! Input: YAML, a list of objects (or one object, or a mesh file's `policies:`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;
use sluice_proxy::identity::Identity;
use sluice_proxy::policy::{Connection, MtlsMode, Policies, ROOT_NAMESPACE, Target, Verdict};

/// Decisions are checked exhaustively for up to this many objects (each check is a product of
/// targets, label sets and connections).
const DECIDED: usize = 6;

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return;
    };
    let objects = match value {
        serde_yaml::Value::Sequence(objects) => objects,
        serde_yaml::Value::Mapping(m) => match m.get("policies") {
            Some(serde_yaml::Value::Sequence(objects)) => objects.clone(),
            _ => vec![serde_yaml::Value::Mapping(m)],
        },
        other => vec![other],
    };
    let (policies, _warnings) = Policies::read(&objects);
    assert!(
        policies.len() <= objects.len(),
        "more policies than objects"
    );
    check_each_object_alone(&objects, &policies);
    if objects.len() > DECIDED {
        return;
    }
    let world = World::of(&objects, &policies);
    world.check_broken_deny(&policies);
    world.check_unknown_labels_fail_closed(&policies);
    world.check_pending(&policies);
    world.check_mtls(&policies);
    for (i, object) in objects.iter().enumerate() {
        if !may_allow(object) {
            let mut without = objects.clone();
            without.remove(i);
            let (fewer, _) = Policies::read(&without);
            world.check_only_denies_more(&fewer, &policies, i);
        }
    }
}

/// Objects are read one by one: the policies of a list are those of each object, in order.
fn check_each_object_alone(objects: &[serde_yaml::Value], policies: &Policies) {
    let mut authorization = Vec::new();
    let mut peer = Vec::new();
    for object in objects {
        let (one, _) = Policies::read(std::slice::from_ref(object));
        let described = one.describe();
        authorization.extend(list(&described["authorization"]).iter().cloned());
        peer.extend(list(&described["peerAuthentication"]).iter().cloned());
    }
    let described = policies.describe();
    assert_eq!(list(&described["authorization"]), authorization.as_slice());
    assert_eq!(list(&described["peerAuthentication"]), peer.as_slice());
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Whether adding this object could allow something: only an AuthorizationPolicy read as an
/// ALLOW. Anything else (DENY, AUDIT, PeerAuthentication, broken, ignored) only denies more.
fn may_allow(object: &serde_yaml::Value) -> bool {
    let (read, _) = Policies::read(std::slice::from_ref(object));
    list(&read.describe()["authorization"])
        .iter()
        .any(|p| p["action"] == "ALLOW")
}

/// Who the decisions are checked for: the objects' namespaces, labels from their selectors,
/// and connections with and without identities from several addresses.
struct World {
    namespaces: Vec<String>,
    label_sets: Vec<BTreeMap<String, String>>,
    identities: Vec<Identity>,
}

const SOURCES: [&str; 3] = ["10.1.0.7", "::ffff:10.1.0.7", "fd00::7"];
const DESTINATIONS: [&str; 2] = ["10.2.0.9:9080", "[fd00::9]:443"];

impl World {
    fn of(objects: &[serde_yaml::Value], policies: &Policies) -> Self {
        // The objects' own namespaces first (at most two), then the default and the root one.
        let mut namespaces: Vec<String> = Vec::new();
        for o in objects {
            let ns = o
                .get("metadata")
                .and_then(|m| m.get("namespace"))
                .and_then(serde_yaml::Value::as_str);
            if let Some(ns) = ns
                && namespaces.len() < 2
                && !namespaces.iter().any(|n| n == ns)
            {
                namespaces.push(ns.to_owned());
            }
        }
        for ns in ["default", ROOT_NAMESPACE] {
            if !namespaces.iter().any(|n| n == ns) {
                namespaces.push(ns.to_owned());
            }
        }
        let described = policies.describe();
        let mut label_sets = vec![BTreeMap::new()];
        for p in list(&described["authorization"])
            .iter()
            .chain(list(&described["peerAuthentication"]))
        {
            if let Ok(labels) = serde_json::from_value(p["scope"]["selector"].clone()) {
                label_sets.push(labels);
            }
        }
        label_sets.sort();
        label_sets.dedup();
        label_sets.truncate(3);
        let mut identities = Vec::new();
        for ns in namespaces.iter().take(2) {
            if let Ok(id) = Identity::new("cluster.local", ns, "sleep") {
                identities.push(id);
            }
        }
        Self {
            namespaces,
            label_sets,
            identities,
        }
    }

    /// Every (target, connection) pair: each namespace with unknown labels and with each label
    /// set, each connection plaintext and with each identity.
    fn each(&self, mut f: impl FnMut(&Target<'_>, &Connection<'_>)) {
        for ns in &self.namespaces {
            let labels = std::iter::once(None).chain(self.label_sets.iter().map(Some));
            for labels in labels {
                let target = Target {
                    namespace: ns,
                    labels,
                };
                self.connections(|c| f(&target, c));
            }
        }
    }

    fn connections(&self, mut f: impl FnMut(&Connection<'_>)) {
        let identities = std::iter::once(None).chain(self.identities.iter().map(Some));
        for source in identities {
            for ip in SOURCES {
                for dst in DESTINATIONS {
                    let dst: SocketAddr = dst.parse().expect("a destination");
                    f(&Connection {
                        source_ip: ip.parse::<IpAddr>().expect("a source"),
                        source,
                        destination_ip: dst.ip(),
                        destination_port: dst.port(),
                    });
                }
            }
        }
    }

    /// An AuthorizationPolicy that could not be read denies everything it could apply to.
    fn check_broken_deny(&self, policies: &Policies) {
        for p in list(&policies.describe()["authorization"]) {
            if p["brokenDeniesAll"].is_null() {
                continue;
            }
            let ns = p["scope"]["namespace"].as_str().expect("a namespace");
            let ns = if ns == ROOT_NAMESPACE { "default" } else { ns };
            let selector: Option<BTreeMap<String, String>> =
                serde_json::from_value(p["scope"]["selector"].clone()).unwrap_or_default();
            for labels in [None, selector.as_ref()] {
                let target = Target {
                    namespace: ns,
                    labels,
                };
                self.connections(|c| {
                    assert!(
                        matches!(policies.authorize(&target, c), Verdict::Deny { .. }),
                        "broken policy {p} allowed {c:?} to {target:?}"
                    );
                });
            }
        }
    }

    /// A workload whose labels are unknown is never allowed what a workload with any labels
    /// would be denied.
    fn check_unknown_labels_fail_closed(&self, policies: &Policies) {
        for ns in &self.namespaces {
            let unknown = Target {
                namespace: ns,
                labels: None,
            };
            self.connections(|c| {
                if policies.authorize(&unknown, c) != Verdict::Allow {
                    return;
                }
                for labels in &self.label_sets {
                    let known = Target {
                        namespace: ns,
                        labels: Some(labels),
                    };
                    assert_eq!(
                        policies.authorize(&known, c),
                        Verdict::Allow,
                        "allowed with unknown labels, denied with {labels:?}: {c:?}"
                    );
                }
            });
        }
    }

    /// Until every policy is known, nothing is allowed and plaintext is refused.
    fn check_pending(&self, policies: &Policies) {
        let mut pending = policies.clone();
        pending.set_pending("fuzz: not synced");
        self.each(|target, c| {
            assert!(matches!(pending.authorize(target, c), Verdict::Deny { .. }));
        });
        for ns in &self.namespaces {
            let target = Target {
                namespace: ns,
                labels: None,
            };
            assert_eq!(pending.mtls(&target, 80).mode, MtlsMode::Strict);
        }
    }

    /// The mode in force is a real one, set by an object that exists (or the default).
    fn check_mtls(&self, policies: &Policies) {
        let described = policies.describe();
        let names: Vec<String> = list(&described["peerAuthentication"])
            .iter()
            .map(|p| {
                let ns = p["scope"]["namespace"].as_str().unwrap_or_default();
                format!("{ns}/{}", p["name"].as_str().unwrap_or_default())
            })
            .collect();
        for ns in &self.namespaces {
            let labels = std::iter::once(None).chain(self.label_sets.iter().map(Some));
            for labels in labels {
                let target = Target {
                    namespace: ns,
                    labels,
                };
                for port in [80, 9080] {
                    let mtls = policies.mtls(&target, port);
                    assert_ne!(mtls.mode, MtlsMode::Unset, "UNSET in force for {target:?}");
                    assert!(
                        mtls.policy == "default"
                            || names.iter().any(|n| mtls.policy.starts_with(n.as_str())),
                        "mode set by {:?}, which is not an object",
                        mtls.policy
                    );
                }
            }
        }
    }

    /// Adding object `i`, which cannot allow anything, never turns a denial into an allow.
    fn check_only_denies_more(&self, without: &Policies, with: &Policies, i: usize) {
        self.each(|target, c| {
            if matches!(without.authorize(target, c), Verdict::Deny { .. }) {
                assert!(
                    matches!(with.authorize(target, c), Verdict::Deny { .. }),
                    "adding policies[{i}] allowed {c:?} to {target:?}"
                );
            }
        });
    }
}
