//! Which pods are meshed: Istio ambient's rules, applied to what a source (the Kubernetes API or
//! the standalone file) says about namespaces and pods.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Namespace (or pod) label that meshes its pods when set to `ambient`; on a pod, `none` opts out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Pod annotation: `disabled` opts the pod out; the agent writes `enabled` on pods it captured.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Pods with a sidecar already have their traffic handled.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceInfo {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What the agent needs to know about a pod on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub host_network: bool,
    /// The pod's addresses as the cluster assigned them (`status.podIPs`; in the pods file,
    /// `ips`). A running pod is captured with these, never with addresses read from inside it.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Everything a source knows at one moment: the agent reconciles against the whole of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct World {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// By uid.
    pub pods: BTreeMap<String, PodInfo>,
}

impl World {
    /// A pod by namespace and name (the CNI plugin may not know the uid).
    pub fn pod_named(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Enrol,
    Skip(String),
}

/// The node-wide part of the selection.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// Never meshed, whatever their labels (the system's own namespaces).
    pub excluded_namespaces: Vec<String>,
}

impl Selector {
    /// Istio ambient's rules: opt-outs first, then a pod or namespace opt-in.
    pub fn decide(&self, namespace: Option<&NamespaceInfo>, pod: &PodInfo) -> Decision {
        let skip = |why: &str| Decision::Skip(why.to_owned());
        if pod.host_network {
            return skip("hostNetwork pods share the node's network namespace");
        }
        if self.excluded_namespaces.contains(&pod.namespace) {
            return skip("its namespace is excluded from the mesh");
        }
        let pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
        if pod_mode == Some("none") {
            return skip("the pod opts out with istio.io/dataplane-mode=none");
        }
        if pod
            .annotations
            .get(REDIRECTION_ANNOTATION)
            .map(String::as_str)
            == Some("disabled")
        {
            return skip("the pod opts out with ambient.istio.io/redirection: disabled");
        }
        if pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
            return skip("the pod has an Istio sidecar");
        }
        if pod_mode == Some("ambient") {
            return Decision::Enrol;
        }
        let ns_mode = namespace.and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL));
        if ns_mode.map(String::as_str) == Some("ambient") {
            Decision::Enrol
        } else {
            skip("neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient")
        }
    }

    /// The pods of `world` that should be meshed, by uid.
    pub fn desired<'w>(&self, world: &'w World) -> BTreeMap<&'w str, &'w PodInfo> {
        world
            .pods
            .values()
            .filter(|pod| self.decide(world.namespaces.get(&pod.namespace), pod) == Decision::Enrol)
            .map(|pod| (pod.uid.as_str(), pod))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ns(name: &str, pairs: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels(pairs),
        }
    }

    fn pod(namespace: &str) -> PodInfo {
        PodInfo {
            uid: "u1".into(),
            name: "p".into(),
            namespace: namespace.into(),
            ..PodInfo::default()
        }
    }

    const AMBIENT: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, "ambient")];

    #[test]
    fn a_labelled_namespace_meshes_its_pods_and_an_unlabelled_one_does_not() {
        let s = Selector::default();
        assert_eq!(
            s.decide(Some(&ns("shop", AMBIENT)), &pod("shop")),
            Decision::Enrol
        );
        assert!(matches!(
            s.decide(Some(&ns("shop", &[])), &pod("shop")),
            Decision::Skip(_)
        ));
        assert!(matches!(s.decide(None, &pod("shop")), Decision::Skip(_)));
        let other = ns("shop", &[(DATAPLANE_MODE_LABEL, "sidecar")]);
        assert!(matches!(
            s.decide(Some(&other), &pod("shop")),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn opt_outs_win_over_the_namespace_label() {
        let s = Selector::default();
        let shop = ns("shop", AMBIENT);
        let mut p = pod("shop");
        p.labels = labels(&[(DATAPLANE_MODE_LABEL, "none")]);
        assert!(matches!(s.decide(Some(&shop), &p), Decision::Skip(_)));
        let mut p = pod("shop");
        p.annotations = labels(&[(REDIRECTION_ANNOTATION, "disabled")]);
        assert!(matches!(s.decide(Some(&shop), &p), Decision::Skip(_)));
        let mut p = pod("shop");
        p.annotations = labels(&[(SIDECAR_STATUS_ANNOTATION, "{}")]);
        assert!(matches!(s.decide(Some(&shop), &p), Decision::Skip(_)));
        let mut p = pod("shop");
        p.host_network = true;
        let Decision::Skip(why) = s.decide(Some(&shop), &p) else {
            panic!("hostNetwork pods are never captured")
        };
        assert!(why.contains("hostNetwork"));
        // The agent's own "enabled" annotation is not an opt-out.
        let mut p = pod("shop");
        p.annotations = labels(&[(REDIRECTION_ANNOTATION, "enabled")]);
        assert_eq!(s.decide(Some(&shop), &p), Decision::Enrol);
    }

    #[test]
    fn a_pod_label_opts_in_and_excluded_namespaces_never_mesh() {
        let mut p = pod("tools");
        p.labels = labels(AMBIENT);
        assert_eq!(
            Selector::default().decide(Some(&ns("tools", &[])), &p),
            Decision::Enrol
        );
        let s = Selector {
            excluded_namespaces: vec!["kube-system".into()],
        };
        let mut p = pod("kube-system");
        p.labels = labels(AMBIENT);
        assert!(matches!(
            s.decide(Some(&ns("kube-system", AMBIENT)), &p),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn desired_lists_exactly_the_selected_pods() {
        let mut world = World::default();
        world.namespaces.insert("shop".into(), ns("shop", AMBIENT));
        world.namespaces.insert("web".into(), ns("web", &[]));
        for (uid, namespace) in [("a", "shop"), ("b", "web"), ("c", "shop")] {
            let mut p = pod(namespace);
            p.uid = uid.into();
            world.pods.insert(uid.into(), p);
        }
        let desired: Vec<_> = Selector::default().desired(&world).into_keys().collect();
        assert_eq!(desired, ["a", "c"]);
    }
}
