//! The real `sluice-proxy` binary run as a lab process: started for a lab's pod, ready when it
//! says so, its log kept for assertions, killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::WAIT;
use crate::app::{ProcessGuard, sibling_binary};
use crate::lab::Lab;

pub struct ProxyProcess {
    process: ProcessGuard,
    log: Arc<Mutex<Vec<String>>>,
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
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_LAB_PROXY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawn sluice-proxy")?;
        let stdout = child.stdout.take().context("proxy stdout")?;
        let stderr = child.stderr.take().context("proxy stderr")?;
        let mut process = ProcessGuard {
            child,
            name: "sluice-proxy".into(),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("SLUICE_LAB_ECHO_PROXY").is_some() {
                    eprintln!("proxy: {line}");
                }
                if let Ok(mut log) = sink.lock() {
                    log.push(line);
                }
            }
        });
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready)?;
        if !ready.starts_with("sluice-proxy ready") {
            process.kill();
            let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
            bail!("sluice-proxy did not become ready; its log:\n{log}");
        }
        Ok(Self { process, log })
    }

    /// Stops the proxy abruptly, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Asks the proxy to stop, as the kubelet does (SIGTERM): it drains, then exits.
    pub fn terminate(&self) -> Result<()> {
        // SAFETY: kill(2) with a pid we own (our child, not yet reaped).
        if unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the proxy: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the proxy process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }

    /// Waits (bounded by `within`) for the proxy to exit; how long it took.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Result<std::time::Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if !self.running() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!("the proxy did not exit within {within:?}")
    }

    /// The proxy's process id (for reading its memory use from /proc).
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (bounded) until `count` log lines each contain every one of `needles`.
    pub fn wait_for_log_lines(&self, needles: &[&str], count: usize) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        let matching = || {
            self.log()
                .iter()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .count()
        };
        while Instant::now() < deadline {
            if matching() >= count {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!(
            "{} proxy log lines with {needles:?} within {WAIT:?}, wanted {count}; log:\n{}",
            matching(),
            self.log().join("\n")
        )
    }

    /// Waits (bounded) until a log line contains every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str]) -> Result<String> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(line) = self
                .log()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Ok(line);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!(
            "no proxy log line with {needles:?} within {WAIT:?}; log:\n{}",
            self.log().join("\n")
        )
    }
}
