//! Connection counters. Traffic-driven failures are counted here by stable reason, never panic.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub completed: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// No original destination: capture state was missing (fail closed).
    pub no_original_dst: AtomicU64,
    /// Inbound connections that would loop: the original destination was one of the proxy's
    /// own ports, or the connection was the proxy's own dial to an app, steered back to it.
    pub loop_refused: AtomicU64,
    pub upstream_connect_failed: AtomicU64,
    pub copy_failed: AtomicU64,
    /// Outbound connections carried through an HBONE tunnel.
    pub tunnelled: AtomicU64,
    /// HBONE tunnels that could not be opened (handshake, identity, or the peer's status).
    pub tunnel_failed: AtomicU64,
    /// Connections reset by policy: plaintext refused by STRICT mTLS or denied by an
    /// AuthorizationPolicy here, outbound ones the destination answered 401, and live ones a
    /// policy change denied.
    pub denied: AtomicU64,
    /// Connections to an app that should have carried the client's address but were made from
    /// the pod's (no `CAP_NET_ADMIN`, no free source port, `SLUICE_PROXY_DIALS` full).
    pub source_not_preserved: AtomicU64,
    /// HBONE client connections set up (TLS + HTTP/2) by every pod's pool.
    pub pool_handshakes: std::sync::Arc<AtomicU64>,
    /// Istio's TCP metrics, per label set.
    pub tcp: crate::metrics::TcpMetrics,
    /// What the proxy refused of the agent's hand-off.
    pub zds: crate::zds::ZdsStats,
}

impl Stats {
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts how a proxied connection's copy ended: completed with its bytes, or failed.
    pub fn count_copy(&self, result: &std::io::Result<(u64, u64)>) {
        match result {
            Ok((sent, received)) => {
                Self::incr(&self.completed);
                self.bytes_out.fetch_add(*sent, Ordering::Relaxed);
                self.bytes_in.fetch_add(*received, Ordering::Relaxed);
            }
            Err(_) => Self::incr(&self.copy_failed),
        }
    }

    pub fn snapshot(&self) -> [(&'static str, u64); 12] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", get(&self.accepted)),
            ("completed", get(&self.completed)),
            ("bytes_out", get(&self.bytes_out)),
            ("bytes_in", get(&self.bytes_in)),
            ("no_original_dst", get(&self.no_original_dst)),
            ("loop_refused", get(&self.loop_refused)),
            (
                "upstream_connect_failed",
                get(&self.upstream_connect_failed),
            ),
            ("copy_failed", get(&self.copy_failed)),
            ("tunnelled", get(&self.tunnelled)),
            ("tunnel_failed", get(&self.tunnel_failed)),
            ("denied", get(&self.denied)),
            ("source_not_preserved", get(&self.source_not_preserved)),
        ]
    }
}
