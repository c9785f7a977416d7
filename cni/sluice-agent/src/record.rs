//! The agent's memory across restarts: one small JSON file per captured pod, written after its
//! capture is in place and removed after it is released. A restarted agent adopts the pods it
//! finds here (the iptables backend has no other record; the eBPF pins are cross-checked).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Where the netns was found (`CNI_NETNS` or `/proc/PID/ns/net`).
    pub netns: PathBuf,
    pub netns_ino: u64,
    pub cgroup: Option<PathBuf>,
    /// The addresses it was captured with (none in records from before they were kept).
    #[serde(default)]
    pub addrs: Vec<std::net::IpAddr>,
    /// The sandbox's container id (`CNI_CONTAINERID`) when its ADD reached the agent: a DEL
    /// names its sandbox by it, with or without pod arguments.
    #[serde(default)]
    pub container_id: Option<String>,
}

pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("pods");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Every readable record; unreadable ones are reported and skipped (their pods are then
    /// treated like unknown ones: captured again if selected).
    pub fn load(&self) -> std::io::Result<Vec<PodRecord>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => out.push(record),
                Err(e) => warn!(file = %path.display(), error = %e, "unreadable pod record"),
            }
        }
        out.sort_by(|a: &PodRecord, b| a.uid.cmp(&b.uid));
        Ok(out)
    }

    /// Writes atomically (a crash leaves the old record or the new one, never half of one).
    pub fn save(&self, record: &PodRecord) -> std::io::Result<()> {
        let path = self.dir.join(format!("{}.json", record.uid));
        let tmp = self.dir.join(format!(".{}.json.tmp", record.uid));
        std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
        std::fs::rename(&tmp, &path)
    }

    pub fn remove(&self, uid: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join(format!("{uid}.json"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
