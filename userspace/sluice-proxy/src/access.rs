//! The access log: one line per connection on the `access` target, with the same fields for
//! every kind of connection (captured plaintext, outbound through HBONE or direct, inbound
//! HBONE), written through the non-blocking log writer so it never stalls the data path.
//!
//! Fields: `direction`, `src`, `dst` (what the client asked for), `upstream` (where it went: a
//! service VIP's endpoint; `-` when the same), `src_identity`, `dst_identity` (`-` when there is none:
//! plaintext), `hbone`, `bytes_sent` (client → server), `bytes_received` (server → client),
//! `duration_ms`, and `error` on a failed one.

use std::time::Instant;

use tracing::info;

/// What is known of a connection when it starts; logged once when it ends.
pub struct Access {
    pub direction: &'static str,
    pub src: String,
    pub dst: String,
    pub upstream: Option<String>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub hbone: bool,
    pub started: Instant,
}

impl Access {
    /// Logs the end of the connection, with what `result` says moved (or why it failed).
    pub fn closed(&self, result: &std::io::Result<(u64, u64)>) {
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let src_identity = self.src_identity.as_deref().unwrap_or("-");
        let dst_identity = self.dst_identity.as_deref().unwrap_or("-");
        let upstream = self.upstream.as_deref().unwrap_or("-");
        match result {
            Ok((sent, received)) => info!(
                target: "access",
                direction = self.direction, src = %self.src, dst = %self.dst, upstream = %upstream,
                src_identity = %src_identity, dst_identity = %dst_identity, hbone = self.hbone,
                bytes_sent = sent, bytes_received = received, duration_ms,
                "connection closed"
            ),
            Err(e) => info!(
                target: "access",
                direction = self.direction, src = %self.src, dst = %self.dst, upstream = %upstream,
                src_identity = %src_identity, dst_identity = %dst_identity, hbone = self.hbone,
                duration_ms, error = %e,
                "connection failed"
            ),
        }
    }
}
