//! Liveness and readiness, served over plain HTTP for kubelet's probes:
//! - `GET /healthz`: 200 while the agent's event loop is turning;
//! - `GET /readyz`: 200 once the plugin is installed, the first pod list is in, the proxy is
//!   connected and has every captured pod, no pod is failing and no selected pod runs on the
//!   node uncaptured; otherwise 503 with the reason (naming the pod);
//! - `GET /metrics`: the agent's counters (pods refused, by reason), Prometheus text.

use std::io::{Read, Write};
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
    /// Probe connections closed unanswered because [`MAX_CONNECTIONS`] were open.
    refused_connections: AtomicU64,
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

    /// Counts a probe connection closed unanswered (too many open).
    pub fn count_refused_connection(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
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
        out.push_str(&format!(
            "# HELP sluice_agent_health_connections_refused_total Connections to this port closed unanswered: {MAX_CONNECTIONS} were open.\n\
             # TYPE sluice_agent_health_connections_refused_total counter\n\
             sluice_agent_health_connections_refused_total {}\n",
            self.refused_connections.load(Ordering::Relaxed)
        ));
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

/// How long one probe connection may take, from accept to answer, whatever the client does:
/// a client trickling bytes cannot hold a connection longer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// The longest request line read; the rest of a request is never needed.
const MAX_REQUEST_LINE: usize = 4096;
/// Probe connections served at once, each on its own short-lived thread; past it a connection
/// is closed at once (and counted), so stalled clients cost at most this many threads and never
/// keep kubelet's probes waiting behind them.
const MAX_CONNECTIONS: usize = 64;

/// Binds `addr` and serves the probes, one thread per connection (at most [`MAX_CONNECTIONS`],
/// each under [`REQUEST_DEADLINE`]). Returns the bound address (port 0 picks one).
pub fn serve(addr: SocketAddr, health: std::sync::Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let active = std::sync::Arc::new(AtomicU64::new(0));
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS as u64 {
                    active.fetch_sub(1, Ordering::SeqCst);
                    health.count_refused_connection();
                    drop(stream);
                    continue;
                }
                let (health, active) = (health.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("health-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(stream, &health) {
                            debug!(error = %e, "health probe connection failed");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    debug!(error = %e, "cannot start a health connection thread");
                }
            }
        })?;
    Ok(bound)
}

/// Reads the request line (up to the first `\n`) within the deadline and the size cap.
fn request_line(stream: &TcpStream) -> std::io::Result<String> {
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request line within the deadline",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = (&*stream).read(&mut buf)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_REQUEST_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request line too long",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn answer(stream: TcpStream, health: &Health) -> std::io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let line = request_line(&stream)?;
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

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_trickling_bytes_neither_blocks_probes_nor_holds_on_past_the_deadline() {
        let health = std::sync::Arc::new(Health::new());
        health.beat();
        let addr = serve("127.0.0.1:0".parse().unwrap(), health).unwrap();
        // The attacker: a byte every 300 ms, never a newline.
        let mut slow = TcpStream::connect(addr).unwrap();
        let started = std::time::Instant::now();
        let trickler = std::thread::spawn(move || {
            for _ in 0..20 {
                if slow.write_all(b"G").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            false
        });
        // Probes are answered at once meanwhile.
        for _ in 0..3 {
            let t = std::time::Instant::now();
            assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200 OK"));
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "a probe waited {:?}",
                t.elapsed()
            );
        }
        // The trickler is cut off at the deadline, not after its 6 s of bytes.
        assert!(
            trickler.join().unwrap(),
            "the stalled connection must be closed"
        );
        assert!(started.elapsed() < REQUEST_DEADLINE + Duration::from_secs(2));
    }

    #[test]
    fn an_overlong_request_line_is_refused_and_too_many_connections_are_counted() {
        let health = std::sync::Arc::new(Health::new());
        health.beat();
        let addr = serve("127.0.0.1:0".parse().unwrap(), health.clone()).unwrap();
        let mut long = TcpStream::connect(addr).unwrap();
        long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = long.write_all(&vec![b'a'; MAX_REQUEST_LINE * 2]);
        let mut out = Vec::new();
        let _ = long.read_to_end(&mut out);
        assert!(out.is_empty(), "no answer to an overlong line");
        // Fill every slot with stalled connections; one more is closed and counted.
        let stalled: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = Vec::new();
        let _ = extra.read_to_end(&mut out);
        assert!(out.is_empty());
        assert!(
            health
                .metrics()
                .contains("sluice_agent_health_connections_refused_total 1\n"),
            "{}",
            health.metrics()
        );
        drop(stalled);
        // Once the stalled ones time out, probes are answered again.
        std::thread::sleep(REQUEST_DEADLINE + Duration::from_millis(500));
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200 OK"));
    }
}
