//! The proxy's HTTP endpoints, on Istio's ports:
//! - `:15020 /metrics` (also `/stats/prometheus`): Prometheus text format;
//! - `:15021 /healthz/ready`: 200 once every pod the proxy was given is served, 503 otherwise;
//! - `127.0.0.1:15000` admin: `GET /config_dump` (what the proxy enforces: pods, workloads,
//!   services, policies, certificates without keys) and `POST /logging?level=…`.
//!
//! A small HTTP/1.1 responder: one request per connection, a bounded head, no body read.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::hbone::ServerStats;
use crate::inpod::MeshContext;
use crate::metrics::counter_family;
use crate::stats::Stats;

/// Longest request head read; anything longer is refused.
const MAX_HEAD: usize = 8 * 1024;

/// Whether the proxy serves what it was given, and if not, why.
#[derive(Debug)]
pub struct Readiness {
    starting: Mutex<bool>,
    draining: Mutex<bool>,
    /// Pods the agent handed over that could not be served.
    failed: Mutex<BTreeSet<String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            starting: Mutex::new(true),
            draining: Mutex::new(false),
            failed: Mutex::new(BTreeSet::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Readiness {
    pub fn started(&self) {
        *lock(&self.starting) = false;
    }

    pub fn draining(&self) {
        *lock(&self.draining) = true;
    }

    /// Records whether pod `uid` is served (`true`) or failed to start (`false`).
    pub fn pod(&self, uid: &str, served: bool) {
        let mut failed = lock(&self.failed);
        if served {
            failed.remove(uid);
        } else {
            failed.insert(uid.to_owned());
        }
    }

    /// Forgets failures of pods outside `uids` (the agent's snapshot no longer has them).
    pub fn keep_only(&self, uids: &BTreeSet<String>) {
        lock(&self.failed).retain(|uid| uids.contains(uid));
    }

    pub fn check(&self) -> Result<(), String> {
        if *lock(&self.starting) {
            return Err("starting".into());
        }
        if *lock(&self.draining) {
            return Err("draining".into());
        }
        let failed = lock(&self.failed);
        if !failed.is_empty() {
            let list: Vec<&str> = failed.iter().map(String::as_str).collect();
            return Err(format!("pods not served: {}", list.join(", ")));
        }
        Ok(())
    }
}

/// Changes the log filter at runtime (`tracing_subscriber` reload handle).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Everything the endpoints read.
pub struct Endpoints {
    pub stats: Arc<Stats>,
    pub mesh: Option<Arc<MeshContext>>,
    pub pin_root: PathBuf,
    pub readiness: Arc<Readiness>,
    pub served: Arc<Mutex<BTreeSet<String>>>,
    pub set_log_level: SetLogLevel,
    /// The node's connection bounds: what they refused and what is held now.
    pub admission: Arc<crate::limits::Admission>,
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn new(status: &'static str, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body,
        }
    }

    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.into())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Metrics,
    Readiness,
    Admin,
}

impl Endpoints {
    /// Serves `port`'s endpoints on `listener` until the runtime stops.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, port: Port) {
        let endpoints = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let endpoints = endpoints.clone();
                tokio::spawn(async move {
                    let answered = tokio::time::timeout(
                        Duration::from_secs(5),
                        endpoints.answer(stream, port),
                    )
                    .await;
                    if let Ok(Err(e)) = answered {
                        debug!(error = %e, "HTTP endpoint connection failed");
                    }
                });
            }
        });
    }

    async fn answer(&self, mut stream: TcpStream, port: Port) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head);
        let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
        let (method, target) = (
            request_line.next().unwrap_or(""),
            request_line.next().unwrap_or(""),
        );
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let response = self.route(port, method, path, query);
        let reply = format!(
            "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            response.status,
            response.content_type,
            response.body.len(),
            response.body
        );
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    }

    fn route(&self, port: Port, method: &str, path: &str, query: &str) -> Response {
        match (port, method, path) {
            (Port::Metrics, "GET", "/metrics" | "/stats/prometheus") => {
                Response::new("200 OK", "text/plain; version=0.0.4", self.metrics())
            }
            (Port::Readiness, "GET", "/healthz/ready") => {
                match self.readiness.check().and_then(|()| {
                    match self.mesh.as_ref().map(|m| m.mesh.current()) {
                        Some(mesh) if mesh.policies.pending().is_some() => {
                            Err(mesh.policies.pending().unwrap_or_default().to_owned())
                        }
                        _ => Ok(()),
                    }
                }) {
                    Ok(()) => Response::text("200 OK", "ready\n"),
                    Err(why) => {
                        Response::text("503 Service Unavailable", format!("not ready: {why}\n"))
                    }
                }
            }
            (Port::Admin, "GET", "/config_dump") => {
                Response::new("200 OK", "application/json", self.config_dump())
            }
            (Port::Admin, "POST", "/logging") => {
                let level = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .unwrap_or("");
                match (self.set_log_level)(level) {
                    Ok(()) => {
                        info!(level, "log level changed");
                        Response::text("200 OK", format!("log level: {level}\n"))
                    }
                    Err(e) => Response::text(
                        "400 Bad Request",
                        format!(
                            "{e}\nuse e.g. /logging?level=debug or level=info,sluice_proxy=debug\n"
                        ),
                    ),
                }
            }
            _ => Response::text(
                "404 Not Found",
                "not found; see the proxy's documentation for its endpoints\n",
            ),
        }
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        self.stats.tcp.render(&mut out);
        let snapshot = self.stats.snapshot();
        counter_family(
            &mut out,
            "sluice_proxy_connections_total",
            "Captured connections by outcome (and bytes moved).",
            "outcome",
            &snapshot,
        );
        if let Some(mesh) = &self.mesh {
            use std::sync::atomic::Ordering::Relaxed;
            let h: &ServerStats = &mesh.hbone;
            counter_family(
                &mut out,
                "sluice_hbone_server_total",
                "HBONE server events by outcome: handshakes, streams, refusals.",
                "outcome",
                &[
                    ("connections", h.connections.load(Relaxed)),
                    ("closed", h.closed.load(Relaxed)),
                    ("handshake_failed", h.handshake_failed.load(Relaxed)),
                    ("bad_identity", h.bad_identity.load(Relaxed)),
                    ("streams", h.streams.load(Relaxed)),
                    ("tunnelled", h.tunnelled.load(Relaxed)),
                    ("bad_request", h.bad_request.load(Relaxed)),
                    ("not_local", h.not_local.load(Relaxed)),
                    ("proxy_port", h.proxy_port.load(Relaxed)),
                    ("special_address", h.special_address.load(Relaxed)),
                    ("denied", h.denied.load(Relaxed)),
                    ("upstream_failed", h.upstream_failed.load(Relaxed)),
                ],
            );
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            let z = &self.stats.zds;
            counter_family(
                &mut out,
                "sluice_zds_refused_total",
                "What the proxy refused of the agent's hand-off socket, by reason.",
                "reason",
                &[
                    ("peer_not_root", z.peer_not_root.load(Relaxed)),
                    ("node_netns", z.node_netns.load(Relaxed)),
                ],
            );
        }
        counter_family(
            &mut out,
            "sluice_limits_total",
            "Connections refused at a bound and deadlines hit, by which.",
            "outcome",
            &self.admission.stats.snapshot(),
        );
        {
            use std::fmt::Write as _;
            let (held, handshakes) = self.admission.held();
            let _ = writeln!(
                out,
                "# HELP sluice_connections_held Connections the proxy holds now (all listeners).\n\
                 # TYPE sluice_connections_held gauge\nsluice_connections_held {held}\n\
                 # HELP sluice_hbone_handshakes_in_flight 15008 connections still in their handshake.\n\
                 # TYPE sluice_hbone_handshakes_in_flight gauge\nsluice_hbone_handshakes_in_flight {handshakes}"
            );
        }
        counter_family(
            &mut out,
            "sluice_pool_handshakes_total",
            "HBONE client connections set up (TLS + HTTP/2); one serves a burst of tunnels.",
            "side",
            &[(
                "client",
                self.stats
                    .pool_handshakes
                    .load(std::sync::atomic::Ordering::Relaxed),
            )],
        );
        // The eBPF programs' verdicts, when eBPF capture is pinned on this node.
        if let Ok(verdicts) = sluice_capture::ebpf::verdicts(&self.pin_root)
            && self.pin_root.join("maps").exists()
        {
            let named: Vec<(String, u64)> = verdicts
                .iter()
                .map(|(v, n)| (format!("{v:?}").to_lowercase(), *n))
                .collect();
            let borrowed: Vec<(&str, u64)> = named.iter().map(|(k, n)| (k.as_str(), *n)).collect();
            counter_family(
                &mut out,
                "sluice_capture_verdicts_total",
                "Decisions of the eBPF capture programs on this node, by verdict.",
                "verdict",
                &borrowed,
            );
        }
        out
    }

    fn config_dump(&self) -> String {
        let pods: Vec<String> = lock(&self.served).iter().cloned().collect();
        let dump = match &self.mesh {
            Some(mesh) => serde_json::json!({
                "pods": pods,
                "mesh": mesh.mesh.current().describe(),
                "certificates": mesh.certs.certificates(),
            }),
            None => serde_json::json!({"pods": pods, "mesh": null, "certificates": []}),
        };
        serde_json::to_string_pretty(&dump).unwrap_or_default()
    }
}

/// Binds an endpoint address; the admin one must be loopback (it changes the proxy).
pub async fn bind(addr: SocketAddr, port: Port) -> anyhow::Result<TcpListener> {
    if port == Port::Admin && !addr.ip().is_loopback() {
        anyhow::bail!(
            "--admin-addr {addr} is not a loopback address; the admin endpoint must stay local"
        );
    }
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind {addr}: {e}; is another proxy running on this node?"))
}
