//! Standalone mode's source: namespaces and this node's pods from a local YAML file, re-read
//! when it changes. Labelling a namespace in the file meshes its running pods, as labelling it
//! in Kubernetes would.
//!
//! ```yaml
//! namespaces:
//!   - name: shop
//!     labels: { istio.io/dataplane-mode: ambient }
//! pods:
//!   - { uid: 3c1e…, name: cart, namespace: shop, serviceAccount: cart }
//! ```

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sluice_capture::PodUid;
use tracing::{info, warn};

use crate::selection::{NamespaceInfo, PodInfo, World};

/// How often the file is checked for changes.
pub const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("read pods file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pods file {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    namespaces: Vec<NamespaceInfo>,
    #[serde(default)]
    pods: Vec<PodInfo>,
}

/// Parses the file's text into a world, refusing duplicates and unusable uids.
pub fn parse(path: &Path, text: &str) -> Result<World, FileError> {
    let invalid = |msg: String| FileError::Invalid {
        path: path.to_path_buf(),
        msg,
    };
    // An empty file is an empty world, not a YAML error.
    let file: File = if text.trim().is_empty() {
        File {
            namespaces: Vec::new(),
            pods: Vec::new(),
        }
    } else {
        serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?
    };
    let mut world = World::default();
    for (i, ns) in file.namespaces.into_iter().enumerate() {
        if ns.name.is_empty() {
            return Err(invalid(format!("namespaces[{i}]: name is empty")));
        }
        let name = ns.name.clone();
        if world.namespaces.insert(name.clone(), ns).is_some() {
            return Err(invalid(format!("namespaces[{i}]: {name} is listed twice")));
        }
    }
    for (i, pod) in file.pods.into_iter().enumerate() {
        PodUid::parse(&pod.uid).map_err(|e| invalid(format!("pods[{i}]: {e}")))?;
        if pod.name.is_empty() || pod.namespace.is_empty() {
            return Err(invalid(format!(
                "pods[{i}]: name and namespace are required"
            )));
        }
        if let Some(other) = world.pod_named(&pod.namespace, &pod.name) {
            return Err(invalid(format!(
                "pods[{i}]: {}/{} is listed twice (uids {} and {})",
                pod.namespace, pod.name, other.uid, pod.uid
            )));
        }
        let uid = pod.uid.clone();
        if world.pods.insert(uid.clone(), pod).is_some() {
            return Err(invalid(format!("pods[{i}]: uid {uid} is listed twice")));
        }
    }
    Ok(world)
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<World, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Sends the world to `out` now and again after every change to the file. A broken file is
/// reported and the last good world stays in force. Returns when `out`'s receiver is gone.
pub fn watch<T: From<World> + Send + 'static>(
    path: PathBuf,
    first: World,
    out: Sender<T>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut stamp = stamp_of(&path);
        let mut last = first.clone();
        if out.send(T::from(first)).is_err() {
            return;
        }
        loop {
            std::thread::sleep(POLL);
            let now = stamp_of(&path);
            if now == stamp {
                continue;
            }
            // Stamp first: a write that lands while we read is seen by the next poll.
            stamp = now;
            match load(&path) {
                Ok(world) if world == last => {}
                Ok(world) => {
                    info!(file = %path.display(), pods = world.pods.len(), "pods file changed");
                    last = world.clone();
                    if out.send(T::from(world)).is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "pods file refused; keeping the last good one"),
            }
        }
    })
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<World, FileError> {
        parse(Path::new("pods.yaml"), text)
    }

    #[test]
    fn namespaces_and_pods_are_read_with_defaults() {
        let world = parse_str(
            "namespaces:\n  - name: shop\n    labels: { istio.io/dataplane-mode: ambient }\n\
             pods:\n  - { uid: u-1, name: cart, namespace: shop }\n  \
             - { uid: u-2, name: db, namespace: shop, serviceAccount: db, hostNetwork: true }\n",
        )
        .unwrap();
        assert_eq!(
            world.namespaces["shop"].labels["istio.io/dataplane-mode"],
            "ambient"
        );
        assert_eq!(world.pods["u-1"].service_account, "default");
        assert!(
            world.pods["u-1"].ips.is_empty(),
            "no address until the file lists one"
        );
        assert!(world.pods["u-2"].host_network);
        assert_eq!(world.pod_named("shop", "db").unwrap().uid, "u-2");
        assert_eq!(parse_str("").unwrap(), World::default());
    }

    #[test]
    fn pod_addresses_are_read_and_bad_ones_refused() {
        let world = parse_str(
            "pods:\n  - { uid: u-1, name: cart, namespace: shop, ips: [10.1.0.7, 'fd00::7'] }\n",
        )
        .unwrap();
        let ips: Vec<String> = world.pods["u-1"]
            .ips
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["10.1.0.7", "fd00::7"]);
        let e =
            parse_str("pods:\n  - { uid: u-1, name: cart, namespace: shop, ips: [10.1.0.999] }\n");
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn mistakes_are_refused_with_where_they_are() {
        let e = parse_str("pods:\n  - { uid: u-1, name: cart, namespace: shop, sa: x }\n");
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("unknown field `sa`") && msg.contains("line 2"),
            "{msg}"
        );
        let e = parse_str("pods:\n  - { uid: ../x, name: cart, namespace: shop }\n");
        assert!(e.unwrap_err().to_string().contains("pods[0]"));
        let twice = "pods:\n  - { uid: a, name: cart, namespace: shop }\n  \
                     - { uid: b, name: cart, namespace: shop }\n";
        assert!(
            parse_str(twice)
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
        let twice = "pods:\n  - { uid: a, name: x, namespace: shop }\n  \
                     - { uid: a, name: y, namespace: shop }\n";
        assert!(parse_str(twice).unwrap_err().to_string().contains("uid a"));
        let twice = "namespaces: [ { name: shop }, { name: shop } ]\n";
        assert!(parse_str(twice).is_err());
    }
}
