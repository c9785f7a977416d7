//! The node's own connections to captured pods (kubelet's probes, hostNetwork pods) leave from
//! Istio's probe address, which the pods' `steer_inbound` lets through to the app uncaptured:
//! `bind_node_probe4/6` (cgroup connect, on the node's cgroup, normally the root) binds such a
//! socket to `169.254.7.127` / `fd16:9254:7127:1337:ffff:ffff:ffff:ffff` (the agent puts both on
//! the node's `lo`, so replies come back without any NAT state).
//!
//! Only sockets of the node's own netns are touched, told apart by the netns cookie: pods'
//! sockets (their cgroups are below the node's) and the proxy's sockets in pod netns keep their
//! source, so no pod and no proxy dial can ever leave from the exempt address. Userspace cannot
//! read a netns cookie before Linux 5.14, so the program learns it from the agent: the agent
//! files one of its own sockets' cookie in `NODE_LEARN`, connects that socket, and the program
//! answers with the netns cookie it ran in; the agent then writes it to `NODE_NETNS`.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::sockaddr;
use aya_ebpf::helpers::generated::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use sluice_common::{AF_INET, AF_INET6, PROBE_SOURCE_V4, PROBE_SOURCE_V6, Verdict};

use crate::addr::{is_v4_mapped, key4, key6};
use crate::maps::{NODE_LEARN, NODE_NETNS, POD_ADDRS, count};

const SOCK_STREAM: u32 = 1;
/// The connect hooks always let the connect proceed: this program only chooses a source.
const PROCEED: i32 = 1;

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

#[cgroup_sock_addr(connect4)]
pub fn bind_node_probe4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if !node_socket(&ctx) || sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    // SAFETY: map values are valid while the program runs.
    if unsafe { POD_ADDRS.get(key4(sa.user_ip4)) }.is_none() {
        return PROCEED;
    }
    let mut addr = SockaddrIn {
        family: AF_INET as u16,
        port: 0,
        addr: u32::from_ne_bytes(PROBE_SOURCE_V4),
        zero: [0; 8],
    };
    // SAFETY: bpf_bind is allowed in connect hooks (Linux 4.17); the address lives on the stack
    // for the call and its length is its size. Port 0 lets connect() choose the port.
    let rc = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut addr).cast::<sockaddr>(),
            size_of::<SockaddrIn>() as i32,
        )
    };
    bound(rc)
}

#[cgroup_sock_addr(connect6)]
pub fn bind_node_probe6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if !node_socket(&ctx) || sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let dst = sa.user_ip6;
    // SAFETY: map values are valid while the program runs.
    if unsafe { POD_ADDRS.get(key6(dst)) }.is_none() {
        return PROCEED;
    }
    // A dual-stack socket connecting to an IPv4 pod binds the IPv4 probe address, mapped.
    let mut source = PROBE_SOURCE_V6;
    if is_v4_mapped(dst) {
        source = [0; 16];
        source[10] = 0xff;
        source[11] = 0xff;
        source[12] = PROBE_SOURCE_V4[0];
        source[13] = PROBE_SOURCE_V4[1];
        source[14] = PROBE_SOURCE_V4[2];
        source[15] = PROBE_SOURCE_V4[3];
    }
    let mut addr = SockaddrIn6 {
        family: AF_INET6 as u16,
        port: 0,
        flowinfo: 0,
        addr: source,
        scope_id: 0,
    };
    // SAFETY: as in bind_node_probe4.
    let rc = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut addr).cast::<sockaddr>(),
            size_of::<SockaddrIn6>() as i32,
        )
    };
    bound(rc)
}

#[inline(always)]
fn bound(rc: i64) -> i32 {
    // A failed bind (the app bound its socket itself, or the address is missing from the node)
    // leaves the connection from its own source: it is then captured like any other.
    count(if rc == 0 {
        Verdict::NodeProbeBound
    } else {
        Verdict::NodeProbeBindFailed
    });
    PROCEED
}

/// Whether the socket lives in the node's own netns. Until the agent has taught the program
/// the node's netns cookie, nothing is (and the agent's own learning socket is answered).
#[inline(always)]
fn node_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: allowed for cgroup sock_addr programs (Linux 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match NODE_NETNS.get(0).copied() {
        Some(node) if node != 0 => netns == node,
        _ => {
            // SAFETY: allowed for cgroup sock_addr programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(slot) = NODE_LEARN.get_ptr_mut(cookie) {
                // SAFETY: a live map value of the agent's own socket; only this write races
                // with the agent's read, which retries.
                unsafe { *slot = netns };
            }
            false
        }
    }
}
