//! Outbound capture on the pod's cgroup: `connect()` is rewritten to the proxy's 15001 listener
//! on the pod's own address, the original destination is remembered, and `getpeername()` tells
//! the app the truth it expects.
//!
//! Every helper used here exists for these program types on Linux 5.10: the pod is found from
//! the calling task's cgroup ancestry (5.7), never from the netns cookie, which sockops and
//! sockopt programs only get in 5.15.
//!
//! Isolation: what is remembered of a socket is keyed so that no pod can write, overwrite or
//! evict another pod's entries. The socket's entry (`SOCK_ORIG`, by cookie) records the pod that
//! made it; sockops files the original destination under the client's (ip, port) only if the
//! socket's local address is one that pod owns (`POD_ADDRS`), so a pod that binds another pod's
//! address (`IP_TRANSPARENT`) files nothing and the proxy refuses its connection. Each pod has
//! at most `PodConfig::max_tracked` entries; entries go when their socket does.

use core::ptr::write_volatile;

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{
    BPF_ANY, BPF_EXIST, BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    BPF_SOCK_OPS_TCP_CONNECT_CB,
};
use aya_ebpf::helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, sock_ops};
use aya_ebpf::programs::{SockAddrContext, SockContext, SockOpsContext};
use sluice_common::{
    AF_INET, AF_INET6, AddrKey, CgroupKey, MAX_CGROUP_DEPTH, OrigDst, PORT_OUTBOUND, PairKey,
    PeerOrig, PodConfig, PodKey, SockOrig, Verdict,
};

use crate::addr::{is_local4, is_local6, is_v4_mapped, key4, key6, v4_mapped};
use crate::maps::{
    PEER_ORIG, POD_ADDRS, POD_CGROUPS, POD_CONFIG, SOCK_ORIG, add_tracked, count, tracked,
};

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
    if let Err(refused) = remember(&ctx, pod, &config, key4(ip), port) {
        count(refused);
        return REFUSE;
    }
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
    if let Err(refused) = remember(&ctx, pod, &config, key, port) {
        count(refused);
        return REFUSE;
    }
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

/// Records the original destination under the socket's cookie, counted against the pod's bound.
/// `Err` is the verdict of a refusal: the pod is at its bound, or the node-wide map is full
/// (then the newcomer is refused; nobody's entry is evicted).
#[inline(always)]
fn remember(
    ctx: &SockAddrContext,
    pod: PodKey,
    config: &PodConfig,
    dst: AddrKey,
    port: u16,
) -> Result<(), Verdict> {
    // SAFETY: bpf_get_socket_cookie is allowed for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        family: dst.family,
        port: u32::from(port),
        addr: dst.addr,
    };
    // SAFETY: map values are valid while the program runs.
    if let Some(known) = unsafe { SOCK_ORIG.get(cookie) }.copied() {
        // connect() again on a socket whose first attempt failed: same socket, same count. The
        // entry keeps the pod that made it.
        let entry = SockOrig {
            orig,
            pod: known.pod,
        };
        return match SOCK_ORIG.insert(cookie, entry, u64::from(BPF_EXIST)) {
            Ok(()) => {
                count(Verdict::OutboundRedirected);
                Ok(())
            }
            Err(_) => Err(Verdict::OutboundRecordFailed),
        };
    }
    let Some(used) = tracked(&pod) else {
        return Err(Verdict::OutboundDropNoPod);
    };
    if used >= u64::from(config.max_tracked) {
        return Err(Verdict::OutboundDropQuota);
    }
    match SOCK_ORIG.insert(cookie, SockOrig { orig, pod }, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            add_tracked(&pod, 1);
            count(Verdict::OutboundRedirected);
            Ok(())
        }
        Err(_) => Err(Verdict::OutboundRecordFailed),
    }
}

/// Once the kernel has picked the client's local port, files the original destination under the
/// (ip, port) that the proxy will see as its peer; when the connection closes, removes it.
#[sock_ops]
pub fn record_client_pair(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record_pair(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => forget_pair(&ctx),
        _ => {}
    }
    1
}

/// `TCP_CLOSE` in the kernel's TCP state numbering.
const TCP_CLOSE: u32 = 7;

#[inline(always)]
fn pair_of(ctx: &SockOpsContext) -> Option<(PairKey, AddrKey)> {
    let local = match ctx.family() {
        AF_INET => key4(ctx.local_ip4()),
        AF_INET6 => key6(ctx.local_ip6()),
        _ => return None,
    };
    let key = PairKey {
        family: local.family,
        port: ctx.local_port(),
        addr: local.addr,
    };
    Some((key, local))
}

#[inline(always)]
fn record_pair(ctx: &SockOpsContext) {
    // SAFETY: bpf_get_socket_cookie is allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values are valid while the program runs.
    let Some(sock) = (unsafe { SOCK_ORIG.get(cookie) }).copied() else {
        return;
    };
    let Some((key, local)) = pair_of(ctx) else {
        return;
    };
    // Only the pod that owns the client's address may file under it. A pod that bound another
    // pod's address (IP_TRANSPARENT needs only CAP_NET_RAW) or one nobody owns files nothing:
    // the proxy then finds no destination and refuses the connection (fail closed), and the
    // owner's entries are untouched.
    // SAFETY: as above.
    if unsafe { POD_ADDRS.get(local) } != Some(&sock.pod) {
        count(Verdict::OutboundSpoofRefused);
        return;
    }
    let entry = PeerOrig {
        orig: sock.orig,
        cookie,
    };
    // On failure (the node-wide map is full) the proxy finds no destination and refuses the
    // connection (fail closed).
    if PEER_ORIG.insert(key, entry, u64::from(BPF_ANY)).is_err() {
        count(Verdict::OutboundRecordFailed);
        return;
    }
    // Hear about the close, to remove the entry if the proxy never read it (no proxy, or a
    // connect that failed). Since Linux 4.16.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn forget_pair(ctx: &SockOpsContext) {
    // SAFETY: as in record_pair.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some((key, _)) = pair_of(ctx) else {
        return;
    };
    // SAFETY: as above.
    if unsafe { PEER_ORIG.get(key) }.is_some_and(|e| e.cookie == cookie) {
        let _ = PEER_ORIG.remove(key);
    }
}

/// A socket of the pod is released: its entry goes, and with it one unit of the pod's count.
#[cgroup_sock(sock_release)]
pub fn forget_socket(ctx: SockContext) -> i32 {
    // SAFETY: bpf_get_socket_cookie is allowed for cgroup sock programs (Linux 5.7).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values are valid while the program runs.
    if let Some(sock) = unsafe { SOCK_ORIG.get(cookie) }.copied()
        // Only the one caller whose delete succeeds decrements.
        && SOCK_ORIG.remove(cookie).is_ok()
        // Never below zero: an entry made while its pod was being released (a connect racing
        // the removal) may outlive the count it was added to.
        && tracked(&sock.pod).is_some_and(|n| n > 0)
    {
        add_tracked(&sock.pod, u64::MAX);
    }
    PROCEED
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
    unsafe { SOCK_ORIG.get(cookie) }.copied().map(|s| s.orig)
}
