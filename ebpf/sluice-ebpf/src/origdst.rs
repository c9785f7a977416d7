//! `SO_ORIGINAL_DST` for the proxy: a getsockopt program on the proxy's own cgroup answers the
//! question conntrack answers after an iptables REDIRECT, from what sockops recorded. The answer
//! is keyed by the peer's (ip, port), which only the pod owning that ip can have filed.

use core::ptr::write_volatile;

use aya_ebpf::macros::cgroup_sockopt;
use aya_ebpf::programs::SockoptContext;
use sluice_common::{
    AF_INET, AF_INET6, OrigDst, PairKey, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6, Verdict,
};

use crate::addr::{key4, key6, v4_mapped};
use crate::maps::{PEER_ORIG, count};

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn original_dst(ctx: SockoptContext) -> i32 {
    answer(&ctx);
    1
}

#[inline(always)]
fn answer(ctx: &SockoptContext) {
    // SAFETY: the kernel passes a valid, writable context for the program's lifetime.
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return;
    }
    // The kernel already answered (conntrack after a real REDIRECT): leave it alone.
    if so.retval == 0 {
        return;
    }
    // SAFETY: `sk` is the active member for getsockopt programs.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: the verifier checked that `sk` is a readable bpf_sock.
    let (family, peer, peer_port) = unsafe {
        let peer = match (*sk).family {
            AF_INET => key4((*sk).dst_ip4),
            AF_INET6 => key6((*sk).dst_ip6),
            _ => return,
        };
        // dst_port holds the port in network byte order in its first two bytes.
        let port_be = *(&raw const (*sk).dst_port).cast::<u16>();
        ((*sk).family, peer, u16::from_be(port_be))
    };
    let key = PairKey {
        family: peer.family,
        port: u32::from(peer_port),
        addr: peer.addr,
    };
    // SAFETY: map values are valid while the program runs.
    let Some(orig) = (unsafe { PEER_ORIG.get(key) }).map(|e| e.orig) else {
        count(Verdict::OrigDstMiss);
        return;
    };
    // Not removed here: a pod that puts another pod's address on its own `lo` can reach its own
    // 15001 from that (ip, port) and make the proxy ask; a read that removed the entry would
    // take the owner's destination away. sockops removes it when the owner's connection closes.
    let written = if so.level == SOL_IP && orig.family == AF_INET {
        write_sockaddr_in(so, &orig)
    } else if so.level == SOL_IPV6 && family == AF_INET6 {
        write_sockaddr_in6(so, &orig)
    } else {
        false
    };
    if written {
        count(Verdict::OrigDstFound);
    }
}

fn write_sockaddr_in(so: &mut aya_ebpf::bindings::bpf_sockopt, orig: &OrigDst) -> bool {
    // SAFETY: optval/optval_end are the bounds of the user's buffer copy; the check below is
    // what lets the verifier accept the stores.
    unsafe {
        let start = so.__bindgen_anon_2.optval as *mut u8;
        let end = so.__bindgen_anon_3.optval_end as *mut u8;
        if start.add(SOCKADDR_IN_LEN) > end {
            return false;
        }
        write_volatile(start.cast::<u16>(), AF_INET as u16);
        write_volatile(start.add(2).cast::<u16>(), (orig.port as u16).to_be());
        write_volatile(start.add(4).cast::<u32>(), orig.addr[0]);
        write_volatile(start.add(8).cast::<u64>(), 0);
        // Separate stores: LLVM would merge adjacent optlen+retval into one 8-byte store, which
        // the verifier refuses.
        write_volatile(&raw mut so.optlen, SOCKADDR_IN_LEN as i32);
        write_volatile(&raw mut so.retval, 0);
    }
    true
}

fn write_sockaddr_in6(so: &mut aya_ebpf::bindings::bpf_sockopt, orig: &OrigDst) -> bool {
    let ip = if orig.family == AF_INET6 {
        orig.addr
    } else {
        v4_mapped(orig.addr[0])
    };
    // SAFETY: as in write_sockaddr_in.
    unsafe {
        let start = so.__bindgen_anon_2.optval as *mut u8;
        let end = so.__bindgen_anon_3.optval_end as *mut u8;
        if start.add(SOCKADDR_IN6_LEN) > end {
            return false;
        }
        write_volatile(start.cast::<u16>(), AF_INET6 as u16);
        write_volatile(start.add(2).cast::<u16>(), (orig.port as u16).to_be());
        write_volatile(start.add(4).cast::<u32>(), 0); // flowinfo
        for (i, word) in ip.iter().enumerate() {
            write_volatile(start.add(8 + 4 * i).cast::<u32>(), *word);
        }
        write_volatile(start.add(24).cast::<u32>(), 0); // scope id
        write_volatile(&raw mut so.optlen, SOCKADDR_IN6_LEN as i32);
        write_volatile(&raw mut so.retval, 0);
    }
    true
}
