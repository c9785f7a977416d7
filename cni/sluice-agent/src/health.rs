//! Liveness and readiness, served over plain HTTP for kubelet's probes:
//! - `GET /healthz`: 200 while the agent's event loop is turning;
//! - `GET /readyz`: 200 once the plugin is installed, the first pod list is in, the proxy is
//!   connected and has every captured pod, and no pod is failing; otherwise 503 with the reason;
//! - `GET /metrics`: the agent's counters (pods refused, by reason), Prometheus text.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::debug;

/// The loop is considered stuck when it has not turned for this long.
const STUCK: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Health {
    beat_ms: AtomicU64,
    /// `None`: ready; `Some(reason)`: not ready, and why.
    pods: Mutex<Option<String>>,
    install: Mutex<Option<String>>,
    /// Pods refused, by reason (`sluice_agent_pods_refused_total`).
    refused: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    pub fn new() -> Self {
        let health = Self::default();
        *lock(&health.pods) = Some("starting".into());
        *lock(&health.install) = Some("the CNI plugin is not installed yet".into());
        health
    }

    /// Called by the event loop on every turn.
    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_pods(&self, state: Result<(), String>) {
        *lock(&self.pods) = state.err();
    }

    pub fn set_install(&self, state: Result<(), String>) {
        *lock(&self.install) = state.err();
    }

    /// Counts a pod refused for `reason` (a stable snake_case label value).
    pub fn count_refusal(&self, reason: &'static str) {
        *lock(&self.refused).entry(reason).or_default() += 1;
    }

    /// The counters in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let mut out = String::from(
            "# HELP sluice_agent_pods_refused_total Pods the agent refused to capture, by reason.\n\
             # TYPE sluice_agent_pods_refused_total counter\n",
        );
        for (reason, n) in lock(&self.refused).iter() {
            out.push_str(&format!(
                "sluice_agent_pods_refused_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
        out
    }

    pub fn alive(&self) -> bool {
        now_ms().saturating_sub(self.beat_ms.load(Ordering::Relaxed)) < STUCK.as_millis() as u64
    }

    pub fn ready(&self) -> Result<(), String> {
        if let Some(why) = lock(&self.install).clone() {
            return Err(why);
        }
        match lock(&self.pods).clone() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the probes down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds `addr` and serves the probes on a thread. Returns the bound address (port 0 picks one).
pub fn serve(addr: SocketAddr, health: std::sync::Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = answer(stream, &health) {
                debug!(error = %e, "health probe connection failed");
            }
        }
    });
    Ok(bound)
}

fn answer(stream: TcpStream, health: &Health) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/healthz" if health.alive() => ("200 OK", "ok\n".to_owned()),
        "/healthz" => ("503 Service Unavailable", "event loop stuck\n".to_owned()),
        "/readyz" => match health.ready() {
            Ok(()) => ("200 OK", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        "/metrics" => ("200 OK", health.metrics()),
        _ => (
            "404 Not Found",
            "try /healthz, /readyz or /metrics\n".to_owned(),
        ),
    };
    write!(
        &stream,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_reason_in_prometheus_text() {
        let health = Health::new();
        assert!(!health.metrics().contains("reason="), "nothing refused yet");
        health.count_refusal("address_conflict");
        health.count_refusal("address_conflict");
        let text = health.metrics();
        assert!(
            text.contains("sluice_agent_pods_refused_total{reason=\"address_conflict\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE sluice_agent_pods_refused_total counter"));
    }
}
