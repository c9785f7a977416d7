//! The deployment, checked without a cluster:
//! - the checked-in plain manifests are exactly what the chart renders (no drift);
//! - every object parses into its Kubernetes API type with no unknown field (a typo such as
//!   `mountPropogation` would otherwise be dropped silently by the API server);
//! - the RBAC rules are exactly what the code calls;
//! - every container runs a binary the image holds, with flags that binary accepts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use sluice_deploy::{MANIFESTS, render};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// Installed by `cargo xtask setup` (which `cargo xtask test` runs first).
fn helm() -> PathBuf {
    let helm = sluice_deploy::helm_path(&workspace());
    assert!(
        helm.exists(),
        "helm is not installed at {}; run `cargo xtask setup` (cargo xtask test does)",
        helm.display()
    );
    helm
}

fn rendered(extra: &[&str]) -> String {
    render(&helm(), &workspace(), extra).unwrap_or_else(|e| panic!("{e}"))
}

/// The YAML documents of a multi-document stream, without empty ones.
fn documents(text: &str) -> Vec<String> {
    text.split("\n---")
        .map(str::to_owned)
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Deserializes `doc` as `T`, failing on any field `T` does not have.
fn strict<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, String> {
    let mut unknown = Vec::new();
    let value: T = serde_ignored::deserialize(serde_yaml::Deserializer::from_str(doc), |path| {
        unknown.push(path.to_string())
    })
    .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(value)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

/// Every object of a rendered stream, parsed strictly into its API type; returns the kinds.
fn check_objects(stream: &str) -> Result<Vec<String>, String> {
    let mut kinds = Vec::new();
    for doc in documents(stream) {
        let header: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(|e| e.to_string())?;
        let kind = header["kind"].as_str().unwrap_or_default().to_owned();
        let name = header["metadata"]["name"].as_str().unwrap_or_default();
        let parsed = match kind.as_str() {
            "ServiceAccount" => strict::<ServiceAccount>(&doc).map(drop),
            "ConfigMap" => strict::<ConfigMap>(&doc).map(drop),
            "Secret" => strict::<Secret>(&doc).map(drop),
            "ClusterRole" => strict::<ClusterRole>(&doc).map(drop),
            "ClusterRoleBinding" => strict::<ClusterRoleBinding>(&doc).map(drop),
            "DaemonSet" => strict::<DaemonSet>(&doc).map(drop),
            other => Err(format!("a kind this test does not know: {other:?}")),
        };
        parsed.map_err(|e| format!("{kind} {name}: {e}"))?;
        kinds.push(kind);
    }
    Ok(kinds)
}

#[test]
fn the_checked_in_manifests_are_what_the_chart_renders() {
    let path = workspace().join(MANIFESTS);
    let checked_in = std::fs::read_to_string(&path).expect("read the manifests");
    let fresh = rendered(&[]);
    if checked_in != fresh {
        let line = checked_in
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or(checked_in.lines().count().min(fresh.lines().count()), |i| i)
            + 1;
        panic!(
            "{} differs from the chart (first at line {line}); run `cargo xtask render-manifests` and commit the result",
            path.display()
        );
    }
    let lint = Command::new(helm())
        .args(["lint", "--strict", sluice_deploy::CHART])
        .current_dir(workspace())
        .output()
        .expect("run helm lint");
    assert!(
        lint.status.success(),
        "helm lint --strict: {}",
        String::from_utf8_lossy(&lint.stdout)
    );
}

#[test]
fn every_object_parses_into_its_kubernetes_type_without_unknown_fields() {
    let manifests = std::fs::read_to_string(workspace().join(MANIFESTS)).expect("manifests");
    let kinds = check_objects(&manifests).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        kinds.iter().cloned().collect::<BTreeSet<_>>(),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ]
        .map(String::from)
        .into(),
    );
    // The chart's other paths: the CA Secret made from files, the iptables backend, cleanup.
    let with_ca = rendered(&[
        "--set",
        "ca.rootCert=CERT,ca.rootKey=KEY,backend=iptables,cleanup=true",
    ]);
    let kinds = check_objects(&with_ca).unwrap_or_else(|e| panic!("{e}"));
    assert!(kinds.iter().any(|k| k == "Secret"), "{kinds:?}");
    // Half a CA is refused, not rendered into a broken Secret.
    assert!(render(&helm(), &workspace(), &["--set", "ca.rootCert=CERT"]).is_err());

    // The check itself catches a misspelt field.
    let typo = manifests.replacen("mountPropagation:", "mountPropogation:", 1);
    let error = check_objects(&typo).expect_err("a misspelt field must be caught");
    assert!(error.contains("mountPropogation"), "{error}");
}

#[test]
fn rbac_is_exactly_what_the_code_uses() {
    let manifests = std::fs::read_to_string(workspace().join(MANIFESTS)).expect("manifests");
    let role = documents(&manifests)
        .into_iter()
        .find(|d| d.contains("kind: ClusterRole\n"))
        .expect("a ClusterRole");
    let role: ClusterRole = strict(&role).expect("the ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    // The agent (cni/sluice-agent/src/cluster.rs): watchers on Namespaces and Pods (list,
    // watch), `get_opt` of a pod and of its namespace, a merge patch of the pod's annotation.
    // The proxy (userspace/sluice-proxy/src/kube_policies.rs): watchers on both policy kinds.
    let used: BTreeSet<String> = [
        "/namespaces:get",
        "/namespaces:list",
        "/namespaces:watch",
        "/pods:get",
        "/pods:list",
        "/pods:watch",
        "/pods:patch",
        "security.istio.io/authorizationpolicies:list",
        "security.istio.io/authorizationpolicies:watch",
        "security.istio.io/peerauthentications:list",
        "security.istio.io/peerauthentications:watch",
    ]
    .map(String::from)
    .into();
    assert_eq!(granted, used);
    // And the code still makes those calls (a removed call must take its grant with it).
    let agent = std::fs::read_to_string(workspace().join("cni/sluice-agent/src/cluster.rs"))
        .expect("cluster.rs");
    for call in [
        "Api::<Namespace>::all",
        "Api::<Pod>::all",
        ".get_opt(",
        ".patch(",
    ] {
        assert!(agent.contains(call), "the agent no longer calls {call}");
    }
    let proxy =
        std::fs::read_to_string(workspace().join("userspace/sluice-proxy/src/kube_policies.rs"))
            .expect("kube_policies.rs");
    assert!(proxy.contains("watcher(") && proxy.contains("\"security.istio.io\""));
}

#[test]
fn containers_run_binaries_the_image_holds_with_flags_they_accept() {
    let containerfile =
        std::fs::read_to_string(workspace().join("deploy/Containerfile")).expect("Containerfile");
    let in_image: BTreeSet<String> = containerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|dest| dest.strip_prefix("/usr/local/bin/"))
        .map(str::to_owned)
        .collect();
    let manifests = std::fs::read_to_string(workspace().join(MANIFESTS)).expect("manifests");
    let daemonset = documents(&manifests)
        .into_iter()
        .find(|d| d.contains("kind: DaemonSet"))
        .expect("a DaemonSet");
    let daemonset: DaemonSet = strict(&daemonset).expect("the DaemonSet");
    let spec = daemonset
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    let binaries = workspace().join("target/debug");
    assert_eq!(spec.containers.len(), 2);
    for container in spec.containers {
        let command = container.command.clone().unwrap_or_default();
        let binary = command.first().expect("an explicit command");
        assert!(
            in_image.contains(binary),
            "container {} runs {binary}, which deploy/Containerfile does not copy into the image ({in_image:?})",
            container.name
        );
        let help = Command::new(binaries.join(binary))
            .arg("--help")
            .output()
            .unwrap_or_else(|e| {
                panic!("run {binary} --help: {e}; build the binaries first (cargo xtask test does)")
            });
        let help = String::from_utf8_lossy(&help.stdout);
        for arg in container.args.unwrap_or_default() {
            let Some(flag) = arg.strip_prefix("--") else {
                continue;
            };
            let flag = flag.split('=').next().unwrap_or_default();
            assert!(
                help.contains(&format!("--{flag}")),
                "container {}: {binary} has no --{flag}",
                container.name
            );
        }
        for env in container.env.unwrap_or_default() {
            if env.name != "RUST_LOG" {
                assert!(
                    help.contains(&format!("env: {}", env.name)),
                    "container {}: {binary} reads no {} (its --help lists the variables it reads)",
                    container.name,
                    env.name
                );
            }
        }
    }
}
