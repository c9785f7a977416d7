//! Installing the plugin on the node: the binary into the CNI bin dir, and sluice's entry as the
//! last plugin of the primary network configuration list (the file the runtime uses: the first
//! `.conf`/`.conflist`/`.json` by name in the CNI config dir). Kept there while the agent runs,
//! because the primary CNI may rewrite its file at any time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tracing::{error, info};

use crate::health::Health;

/// The plugin's `type` (its binary's name in the bin dir).
pub const PLUGIN_TYPE: &str = "sluice-cni";
/// sluice's own list, written only when the node has no CNI configuration; named to sort last
/// so that a primary CNI's file, once it appears, wins.
pub const OWN_CONFLIST: &str = "zz-sluice.conflist";
/// How often the configuration is checked for a rewrite by someone else.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CNI config {path} is not valid JSON ({why}); not touching it. Fix or remove it, \
         sluice inserts itself once it parses"
    )]
    Invalid { path: PathBuf, why: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

#[derive(Clone, Debug)]
pub struct Install {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The `sluice-cni` binary to copy.
    pub plugin_binary: PathBuf,
    /// sluice's entry in the list (`type`, `agentSocket`, `timeoutSeconds`, …).
    pub entry: Value,
}

/// What [`Install::ensure`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was already in place.
    Unchanged(PathBuf),
    /// The configuration at this path was written.
    Written(PathBuf),
}

impl Install {
    /// Puts binary and entry in place if they are not; idempotent, writes only on a change.
    pub fn ensure(&self) -> Result<Outcome, InstallError> {
        self.copy_binary()?;
        let own = self.conf_dir.join(OWN_CONFLIST);
        let Some(primary) = self.primary()? else {
            let list = json!({"cniVersion": "1.0.0", "name": "sluice", "plugins": [self.entry]});
            return write_if_changed(&own, &list);
        };
        let text = std::fs::read_to_string(&primary).map_err(io("read", &primary))?;
        let conf: Value = serde_json::from_str(&text).map_err(|e| InstallError::Invalid {
            path: primary.clone(),
            why: e.to_string(),
        })?;
        let Value::Object(mut conf) = conf else {
            return Err(InstallError::Invalid {
                path: primary,
                why: "not a JSON object".into(),
            });
        };
        let outcome = match conf.get_mut("plugins") {
            Some(Value::Array(plugins)) => {
                plugins.retain(|p| !is_ours(p));
                plugins.push(self.entry.clone());
                write_if_changed(&primary, &Value::Object(conf))?
            }
            Some(_) => {
                return Err(InstallError::Invalid {
                    path: primary,
                    why: "\"plugins\" is not a list".into(),
                });
            }
            // A single-plugin `.conf`: the runtime only chains lists, so it becomes one.
            None => {
                let list = single_to_list(conf, &self.entry);
                let target = primary.with_extension("conflist");
                let outcome = write_if_changed(&target, &list)?;
                std::fs::remove_file(&primary).map_err(io("remove", &primary))?;
                info!(from = %primary.display(), to = %target.display(), "converted a single-plugin config into a list");
                outcome
            }
        };
        if own.exists() {
            std::fs::remove_file(&own).map_err(io("remove", &own))?;
        }
        Ok(outcome)
    }

    /// Takes sluice out of every list in the config dir and removes the binary.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        for path in self.config_files()? {
            if path.file_name().is_some_and(|n| n == OWN_CONFLIST) {
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
                continue;
            }
            let Ok(Value::Object(mut conf)) = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            else {
                continue; // not ours to fix
            };
            if let Some(Value::Array(plugins)) = conf.get_mut("plugins")
                && plugins.iter().any(is_ours)
            {
                plugins.retain(|p| !is_ours(p));
                write_if_changed(&path, &Value::Object(conf))?;
                info!(file = %path.display(), "removed sluice from the CNI config");
            }
        }
        let binary = self.bin_dir.join(PLUGIN_TYPE);
        match std::fs::remove_file(&binary) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &binary)(e)),
            _ => Ok(()),
        }
    }

    /// Installs now, then keeps the installation in place on a thread, reporting to `health`.
    pub fn keep(self, health: Arc<Health>) -> Result<PathBuf, InstallError> {
        let path = match self.ensure()? {
            Outcome::Unchanged(p) | Outcome::Written(p) => p,
        };
        info!(config = %path.display(), bin = %self.bin_dir.display(), "CNI plugin installed");
        health.set_install(Ok(()));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(POLL);
                match self.ensure() {
                    Ok(Outcome::Unchanged(_)) => health.set_install(Ok(())),
                    Ok(Outcome::Written(path)) => {
                        info!(config = %path.display(), "CNI config was changed by someone else; sluice re-inserted");
                        health.set_install(Ok(()));
                    }
                    Err(e) => {
                        error!(error = %e, "cannot keep the CNI plugin installed");
                        health.set_install(Err(e.to_string()));
                    }
                }
            }
        });
        Ok(path)
    }

    fn copy_binary(&self) -> Result<(), InstallError> {
        let target = self.bin_dir.join(PLUGIN_TYPE);
        let source = std::fs::read(&self.plugin_binary)
            .map_err(io("read plugin binary", &self.plugin_binary))?;
        if std::fs::read(&target).is_ok_and(|installed| installed == source) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.bin_dir).map_err(io("create", &self.bin_dir))?;
        // Rename over the old binary: a runtime never executes a half-written file.
        let tmp = self.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
        std::fs::write(&tmp, &source).map_err(io("write", &tmp))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io("chmod", &tmp))?;
        std::fs::rename(&tmp, &target).map_err(io("install", &target))
    }

    /// The configuration files the runtime considers, in its order.
    fn config_files(&self) -> Result<Vec<PathBuf>, InstallError> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.conf_dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("list", &self.conf_dir)(e)),
        };
        files.sort();
        Ok(files)
    }

    /// The first configuration that is not sluice's own.
    fn primary(&self) -> Result<Option<PathBuf>, InstallError> {
        Ok(self
            .config_files()?
            .into_iter()
            .find(|p| p.file_name().is_none_or(|n| n != OWN_CONFLIST)))
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn single_to_list(mut conf: Map<String, Value>, entry: &Value) -> Value {
    let version = conf.remove("cniVersion").unwrap_or_else(|| json!("0.3.1"));
    let name = conf
        .remove("name")
        .unwrap_or_else(|| json!("k8s-pod-network"));
    json!({"cniVersion": version, "name": name, "plugins": [Value::Object(conf), entry]})
}

/// Writes `value` to `path` through a temporary file and a rename (the runtime never reads a
/// half-written config), unless the file already holds exactly that.
fn write_if_changed(path: &Path, value: &Value) -> Result<Outcome, InstallError> {
    if let Ok(current) = std::fs::read_to_string(path)
        && serde_json::from_str::<Value>(&current).is_ok_and(|v| &v == value)
    {
        return Ok(Outcome::Unchanged(path.to_path_buf()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    // No .conf/.conflist/.json suffix: runtimes watching the dir must not pick it up.
    let tmp = dir.join(".sluice-cni-config.tmp");
    let mut text = serde_json::to_string_pretty(value).map_err(|e| InstallError::Invalid {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replace", path))?;
    Ok(Outcome::Written(path.to_path_buf()))
}

#[cfg(test)]
mod tests;
