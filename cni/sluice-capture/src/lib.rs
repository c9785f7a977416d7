//! Capturing a pod's TCP traffic into sluice's node proxy.
//!
//! Two backends behind one [`Redirector`] interface:
//! - [`ebpf::EbpfCapture`]: sk_lookup on the pod's netns (inbound) and cgroup programs on the
//!   pod's cgroup (outbound), loaded once per node and pinned under `/sys/fs/bpf/sluice/`;
//! - [`iptables::IptablesCapture`]: Istio's in-pod rule set, applied inside the pod's netns.
//!
//! Either way the proxy's listeners are the same (`15001` outbound, `15006` inbound) and the
//! proxy recovers the original destination with `SO_ORIGINAL_DST`.

pub mod cgroup;
pub mod ebpf;
mod error;
pub mod inbound_map;
pub mod iptables;
pub mod kernel;
pub mod netns;
pub mod node;
mod pod;
pub mod reply;
mod sys;

pub use error::CaptureError;
pub use pod::{PodCapture, PodUid};
pub use sluice_common::{
    DEFAULT_MAX_TRACKED_PER_POD, MAX_TRACKED, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND,
    PROBE_SOURCE_V4, PROBE_SOURCE_V6, Verdict,
};

/// Where the eBPF backend pins its maps and links unless told otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sluice";

/// Istio's mark on the proxy's in-pod sockets (1337); the iptables rules let it through.
pub const PROXY_MARK: u32 = 0x539;

/// The proxy's connections to an app that carry the client's address: the low 12 bits are
/// PROXY_MARK (iptables lets them through and connmarks their replies back, Istio's way); bit 12
/// routes the app's replies back to the proxy under eBPF capture, where the app's socket
/// inherits the SYN's mark (`tcp_fwmark_accept`).
pub const APP_DIAL_MARK: u32 = PROXY_MARK | 0x1000;

/// The capture mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ebpf,
    Iptables,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Ebpf => "ebpf",
            Backend::Iptables => "iptables",
        })
    }
}

/// Puts a pod's traffic through the proxy and takes it out again.
///
/// Both operations are idempotent: enrolling an enrolled pod re-applies its settings, removing a
/// pod that is not enrolled succeeds. Neither touches other pods.
pub trait Redirector {
    fn backend(&self) -> Backend;

    /// Captures the pod's traffic. When this returns, new connections of the pod go to the
    /// proxy's listeners, or are refused if the proxy has none there (fail closed).
    fn enroll(&mut self, pod: &PodCapture) -> Result<(), CaptureError>;

    /// Stops capturing the pod's traffic and removes every trace of it.
    fn remove(&mut self, pod: &PodCapture) -> Result<(), CaptureError>;
}
