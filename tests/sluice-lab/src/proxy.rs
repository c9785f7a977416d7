//! The real `sluice-proxy` binary run as a lab process: started for a lab's pod, ready when it
//! says so, its log kept for assertions, killed on drop.

use std::process::Command;

use anyhow::Result;

use crate::app::sibling_binary;
use crate::daemon::Daemon;
use crate::lab::Lab;

pub struct ProxyProcess {
    daemon: Daemon,
}

impl std::ops::Deref for ProxyProcess {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for ProxyProcess {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

impl ProxyProcess {
    /// Starts the proxy for the lab's pod with extra arguments (e.g. `--copy buffered`) and waits
    /// until its listeners are up.
    pub fn start(lab: &Lab, extra: &[&str]) -> Result<Self> {
        let pods = [format!("{}={}", lab.pod.uid, lab.pod.netns.display())];
        Self::spawn(&pods, &lab.proxy_cgroup.path, &lab.pin_root(), extra)
    }

    /// Starts a proxy for `pods` (`UID=NETNS_PATH` each) in `cgroup`, registering with the
    /// capture pinned at `pin_root`, and waits until it is ready.
    pub fn spawn(
        pods: &[String],
        cgroup: &std::path::Path,
        pin_root: &std::path::Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(sibling_binary("sluice-proxy")?);
        for pod in pods {
            cmd.arg("--pod").arg(pod);
        }
        cmd.arg("--cgroup")
            .arg(cgroup)
            .arg("--pin-root")
            .arg(pin_root)
            // Many proxies share the test's netns: each takes free ports for its endpoints.
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_LAB_PROXY_LOG").unwrap_or_else(|_| "info".into()),
            );
        let daemon = Daemon::spawn(
            cmd,
            "sluice-proxy",
            "sluice-proxy ready",
            "SLUICE_LAB_ECHO_PROXY",
        )?;
        Ok(Self { daemon })
    }

    /// An endpoint's address (`metrics`, `readiness`, `admin`) from the ready line.
    pub fn endpoint(&self, name: &str) -> Result<std::net::SocketAddr> {
        let prefix = format!("{name}=");
        self.ready_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name} address in {:?}", self.ready_line))
    }

    /// `GET path` on an endpoint: (status, body).
    pub fn get(&self, endpoint: &str, path: &str) -> Result<(u16, String)> {
        crate::daemon::http(self.endpoint(endpoint)?, "GET", path)
    }
}
