//! The pod hand-off between the node agent and the proxy, wire-compatible with Istio's ZDS
//! (ztunnel discovery service) so sluice's proxy could be driven by istio-cni and sluice's agent
//! could drive ztunnel (DESIGN §5).
//!
//! - [`messages`]: the protobuf messages, field numbers as in Istio's `zds.proto`;
//! - [`Channel`]: one `SOCK_SEQPACKET` connection (the agent listens, the proxy connects), one
//!   message per datagram, a pod's netns fd riding along by `SCM_RIGHTS`.
//!
//! Both ends are root: the agent binds the socket 0600 in a directory of mode 0700 that it owns
//! ([`Listener::bind`] refuses any other), and each end checks the other's credentials
//! (`SO_PEERCRED`, [`Channel::root_peer`]) before trusting a message.
//!
//! The exchange: the proxy sends `ZdsHello{version: V1}`; the agent sends every enrolled pod
//! (`add`, each with exactly one netns fd), then `snapshot_sent`, then changes as they happen
//! (`add`, `del`, `keep`); the proxy answers every request with one `WorkloadResponse{ack}`,
//! whose `error` is empty on success.

pub mod messages;
mod transport;

pub use transport::{Channel, Listener, PeerCred, Received, peer_cred};

/// Why a hand-off message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed ZDS message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("ZDS message of {0} bytes or more does not fit one datagram (limit {MAX_MESSAGE})")]
    TooLarge(usize),
    #[error("ZDS message carried {0} file descriptors; {1}")]
    Fds(usize, &'static str),
    /// The hand-off socket's directory would let others than its owner reach the socket.
    #[error(
        "the ZDS socket's directory {}: {why}; it must be a directory of mode 0700 owned by the \
         agent's user (root), so that no one else can reach the socket: fix it (chmod 0700, \
         chown) or pass a socket path in a private directory",
        dir.display()
    )]
    UnsafeDir {
        dir: std::path::PathBuf,
        why: String,
    },
    /// The process at the other end is not root: neither a real agent nor a real proxy.
    #[error(
        "the ZDS peer (pid {pid}) runs as uid {uid}, not root: refused (only the node agent and \
         the node proxy, both root, may use the hand-off socket)"
    )]
    PeerNotRoot { pid: u32, uid: u32 },
}

/// Largest datagram either side sends or accepts. Real messages are a few hundred bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
