//! A long-running sluice binary (proxy, agent) run as a lab process: ready when its first stdout
//! line says so, its stderr log kept for assertions, killed on drop.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::WAIT;
use crate::app::ProcessGuard;

pub struct Daemon {
    process: ProcessGuard,
    log: Arc<Mutex<Vec<String>>>,
    /// The first stdout line, which said it was ready.
    pub ready_line: String,
}

impl Daemon {
    /// Spawns `cmd` and waits for its first stdout line to start with `ready_prefix`. Its stderr
    /// is collected (and echoed when `echo_env` is set in the environment).
    pub fn spawn(mut cmd: Command, name: &str, ready_prefix: &str, echo_env: &str) -> Result<Self> {
        // Its own process group: a Ctrl-C at the terminal reaches the lab only, which stops its
        // daemons in order when it cleans up.
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let mut process = ProcessGuard {
            child,
            name: name.to_owned(),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let echo = std::env::var_os(echo_env).is_some();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{tag}: {line}");
                }
                if let Ok(mut log) = sink.lock() {
                    log.push(line);
                }
            }
        });
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready)?;
        if !ready.starts_with(ready_prefix) {
            process.kill();
            // Let the stderr reader catch up with the dead process's last words.
            std::thread::sleep(Duration::from_millis(100));
            let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
            bail!("{name} did not become ready; its log:\n{log}");
        }
        Ok(Self {
            process,
            log,
            ready_line: ready.trim().to_owned(),
        })
    }

    /// Stops the process abruptly, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Asks the process to stop, as the kubelet does (SIGTERM).
    pub fn terminate(&self) -> Result<()> {
        // SAFETY: kill(2) with a pid we own (our child, not yet reaped).
        if unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) } != 0 {
            bail!(
                "SIGTERM to {}: {}",
                self.process.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }

    /// Waits (bounded by `within`) for the process to exit; how long it took.
    pub fn wait_exit(&mut self, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if !self.running() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{} did not exit within {within:?}", self.process.name)
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many log lines contain every one of `needles`.
    pub fn count_log(&self, needles: &[&str]) -> usize {
        self.log()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits (bounded) until `count` log lines each contain every one of `needles`.
    pub fn wait_for_log_lines(&self, needles: &[&str], count: usize) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.count_log(needles) >= count {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} {} log lines with {needles:?} within {WAIT:?}, wanted {count}; log:\n{}",
            self.count_log(needles),
            self.process.name,
            self.log().join("\n")
        )
    }

    /// Waits (bounded) until a log line contains every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str]) -> Result<String> {
        self.wait_for_log_lines(needles, 1)?;
        self.log()
            .into_iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .context("log line vanished")
    }
}

/// One HTTP/1.1 request to a sluice endpoint (bounded by `WAIT`): (status, body).
pub fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: sluice\r\ncontent-length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response from {addr}: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
