//! How `deploy/manifests/sluice.yaml` is made from `deploy/chart/sluice`: one function shared by
//! `cargo xtask render-manifests` (which writes it) and the manifests test (which fails when the
//! checked-in file is not what the chart renders).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The release name and namespace the plain manifests are rendered for.
pub const RELEASE: &str = "sluice";
pub const NAMESPACE: &str = "sluice-system";
/// The checked-in manifests and the chart, relative to the workspace root.
pub const MANIFESTS: &str = "deploy/manifests/sluice.yaml";
pub const CHART: &str = "deploy/chart/sluice";

/// The helm release the chart is rendered with (`cargo xtask setup` installs it).
pub const HELM_VERSION: &str = "v3.17.3";

/// Where `cargo xtask setup` puts helm under the workspace root.
pub fn helm_path(workspace: &Path) -> PathBuf {
    workspace
        .join("target/tools")
        .join(format!("helm-{HELM_VERSION}"))
        .join("helm")
}

const HEADER: &str = "\
# sluice: plain Kubernetes manifests, rendered from deploy/chart/sluice with its default values
# by `cargo xtask render-manifests` (helm template sluice deploy/chart/sluice --namespace
# sluice-system). Do not edit: change the chart and render again; a test fails when they drift.
# Apply with: kubectl create namespace sluice-system && kubectl apply -f deploy/manifests/sluice.yaml
";

/// Renders the chart with `helm` (and `extra` arguments such as `--set k=v`) as the plain
/// manifests hold it.
pub fn render(helm: &Path, workspace: &Path, extra: &[&str]) -> Result<String, String> {
    let out = Command::new(helm)
        .current_dir(workspace)
        .args(["template", RELEASE, CHART, "--namespace", NAMESPACE])
        .args(extra)
        .output()
        .map_err(|e| {
            format!(
                "run {}: {e}; `cargo xtask setup` installs helm",
                helm.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(format!("{HEADER}{}", String::from_utf8_lossy(&out.stdout)))
}
