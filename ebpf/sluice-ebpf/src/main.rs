//! sluice's eBPF programs. One object, loaded once per node by `sluice-capture`, attached per pod:
//!
//! - `steer_inbound` (sk_lookup, pod netns, one instance per pod): inbound TCP from outside the
//!   pod, whatever its address → that pod's proxy 15006 socket, or dropped.
//! - `redirect_connect4/6` (cgroup connect, pod cgroup): outbound `connect()` → in-pod 15001.
//! - `record_client_pair` (sockops, pod cgroup): re-keys the original destination by the client's
//!   (ip, port), which is what the proxy sees as the peer, if the pod owns that ip.
//! - `forget_socket` (cgroup sock_release, pod cgroup): a released socket's entry goes.
//! - `restore_peer4/6` (cgroup getpeername, pod cgroup): the app sees its real peer.
//! - `bind_node_probe4/6` (cgroup connect, the node's cgroup): the node's own connections to
//!   captured pods (kubelet's probes) leave from Istio's probe address, which inbound lets by.
//! - `original_dst` (cgroup getsockopt, proxy cgroup): answers `SO_ORIGINAL_DST` like conntrack
//!   would after an iptables REDIRECT, so the proxy code is the same for both backends.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The atomic add intrinsic (see `maps::add_tracked`); this crate is built with nightly only.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod addr;
mod inbound;
mod maps;
mod origdst;
mod outbound;
mod probe;

/// GPL-compatible so the verifier allows every helper; the programs are dual-licensed.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves the programs cannot panic; this is never reached.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
