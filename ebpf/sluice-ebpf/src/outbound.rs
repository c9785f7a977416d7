//! Outbound capture on the pod's cgroup: `connect()` is rewritten to the proxy's 15001 listener
//! on the pod's own address, the original destination is remembered, and `getpeername()` tells
//! the app the truth it expects.
//!
//! Every helper used here exists for these program types on Linux 5.10: the pod is found from
//! the calling task's cgroup ancestry (5.7), never from the netns cookie, which sockops and
//! sockopt programs only get in 5.15.

use core::ptr::write_volatile;

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::BPF_SOCK_OPS_TCP_CONNECT_CB;
use aya_ebpf::helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock_addr, sock_ops};
use aya_ebpf::programs::{SockAddrContext, SockOpsContext};
use sluice_common::{
    AF_INET, AF_INET6, AddrKey, CgroupKey, MAX_CGROUP_DEPTH, OrigDst, PORT_OUTBOUND, PairKey,
    PodConfig, PodKey, Verdict,
};

use crate::addr::{is_local4, is_local6, is_v4_mapped, key4, key6, v4_mapped};
use crate::maps::{COOKIE_ORIG, PAIR_ORIG, POD_ADDRS, POD_CGROUPS, POD_CONFIG, count};

const SOCK_STREAM: u32 = 1;
/// The cgroup hooks return 1 to let the syscall proceed, 0 to fail it with EPERM.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid, writable context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if is_local4(ip) {
        count(Verdict::OutboundPassLoopback);
        return PROCEED;
    }
    let Some((pod, config)) = calling_pod() else {
        count(Verdict::OutboundDropNoPod);
        return REFUSE;
    };
    if let Some(pass) = exempt(pod, &config, key4(ip), port) {
        count(pass);
        return PROCEED;
    }
    if config.redirect_ip4 == 0 {
        count(Verdict::OutboundDropNoPod);
        return REFUSE;
    }
    remember(&ctx, key4(ip), port);
    sa.user_ip4 = config.redirect_ip4;
    sa.user_port = u32::from(PORT_OUTBOUND.to_be());
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in redirect_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let ip = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    if is_local6(ip) {
        count(Verdict::OutboundPassLoopback);
        return PROCEED;
    }
    let Some((pod, config)) = calling_pod() else {
        count(Verdict::OutboundDropNoPod);
        return REFUSE;
    };
    let key = key6(ip);
    if let Some(pass) = exempt(pod, &config, key, port) {
        count(pass);
        return PROCEED;
    }
    // A v4-mapped destination on a dual-stack socket is an IPv4 connection: redirect it to the
    // pod's IPv4 address in mapped form.
    let (proxy, missing) = if is_v4_mapped(ip) {
        (v4_mapped(config.redirect_ip4), config.redirect_ip4 == 0)
    } else {
        (config.redirect_ip6, config.redirect_ip6 == [0; 4])
    };
    if missing {
        count(Verdict::OutboundDropNoPod);
        return REFUSE;
    }
    remember(&ctx, key, port);
    // One 4-byte store per word: the verifier refuses wider stores into user_ip6.
    // SAFETY: user_ip6 is a writable field of the context.
    unsafe {
        for (i, word) in proxy.iter().enumerate() {
            write_volatile(&raw mut sa.user_ip6[i], *word);
        }
    }
    sa.user_port = u32::from(PORT_OUTBOUND.to_be());
    PROCEED
}

/// The enrolled pod the calling task belongs to: the shallowest ancestor of its cgroup that is
/// a pod cgroup (workloads usually sit in a container cgroup below the pod's).
#[inline(always)]
fn calling_pod() -> Option<(PodKey, PodConfig)> {
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: allowed for cgroup sock_addr programs since Linux 5.7; returns 0 past the
        // task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return None;
        }
        // SAFETY: map values are valid while the program runs; both are plain data.
        if let Some(pod) = unsafe { POD_CGROUPS.get(CgroupKey { id }) }.copied() {
            // SAFETY: as above.
            return unsafe { POD_CONFIG.get(pod) }.map(|config| (pod, *config));
        }
    }
    None
}

/// Why a connection is left alone, or `None` if it is captured: the pod's own addresses and its
/// excluded ports are not.
#[inline(always)]
fn exempt(pod: PodKey, config: &PodConfig, dst: AddrKey, port: u16) -> Option<Verdict> {
    // SAFETY: map values are valid while the program runs.
    if unsafe { POD_ADDRS.get(dst) } == Some(&pod) {
        return Some(Verdict::OutboundPassOwnAddr);
    }
    if config.excludes_outbound(port) {
        return Some(Verdict::OutboundPassPort);
    }
    None
}

/// Records the original destination under the socket's cookie. If that fails the connection
/// still goes to the proxy, which cannot find a destination and refuses it (fail closed).
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: AddrKey, port: u16) {
    // SAFETY: bpf_get_socket_cookie is allowed for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        family: dst.family,
        port: u32::from(port),
        addr: dst.addr,
    };
    match COOKIE_ORIG.insert(cookie, orig, 0) {
        Ok(()) => count(Verdict::OutboundRedirected),
        Err(_) => count(Verdict::OutboundRecordFailed),
    }
}

/// Once the kernel has picked the client's local port, files the original destination under the
/// (ip, port) that the proxy will see as its peer.
#[sock_ops]
pub fn record_client_pair(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record_pair(&ctx);
    }
    1
}

#[inline(always)]
fn record_pair(ctx: &SockOpsContext) {
    // SAFETY: bpf_get_socket_cookie is allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values are valid while the program runs.
    let Some(orig) = (unsafe { COOKIE_ORIG.get(cookie) }).copied() else {
        return;
    };
    let local = match ctx.family() {
        AF_INET => key4(ctx.local_ip4()),
        AF_INET6 => key6(ctx.local_ip6()),
        _ => return,
    };
    let key = PairKey {
        family: local.family,
        port: ctx.local_port(),
        addr: local.addr,
    };
    // On failure the proxy finds no destination and refuses the connection (fail closed).
    let _ = PAIR_ORIG.insert(key, orig, 0);
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected(&ctx)
        && orig.family == AF_INET
    {
        // SAFETY: as in redirect_connect4.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.addr[0];
        sa.user_port = u32::from((orig.port as u16).to_be());
        count(Verdict::PeerRestored);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected(&ctx) {
        let ip = if orig.family == AF_INET6 {
            orig.addr
        } else {
            v4_mapped(orig.addr[0])
        };
        // SAFETY: as in redirect_connect4.
        let sa = unsafe { &mut *ctx.sock_addr };
        // SAFETY: user_ip6 is a writable field of the context; one 4-byte store per word.
        unsafe {
            for (i, word) in ip.iter().enumerate() {
                write_volatile(&raw mut sa.user_ip6[i], *word);
            }
        }
        sa.user_port = u32::from((orig.port as u16).to_be());
        count(Verdict::PeerRestored);
    }
    PROCEED
}

#[inline(always)]
fn redirected(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: bpf_get_socket_cookie is allowed for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values are valid while the program runs.
    unsafe { COOKIE_ORIG.get(cookie) }.copied()
}
