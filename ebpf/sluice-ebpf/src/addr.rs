//! Address helpers shared by the programs. Addresses stay in network byte order throughout.

use sluice_common::{AF_INET, AF_INET6, AddrKey};

const V4_MAPPED_PREFIX: u32 = 0x0000_ffff;

/// Builds the map key of an IPv4 address (network byte order).
#[inline(always)]
pub fn key4(ip: u32) -> AddrKey {
    AddrKey {
        family: AF_INET,
        addr: [ip, 0, 0, 0],
    }
}

/// Builds the map key of an IPv6 address, folding IPv4-mapped addresses into IPv4 keys so a
/// dual-stack socket and an IPv4 socket reach the same entries.
#[inline(always)]
pub fn key6(ip: [u32; 4]) -> AddrKey {
    if is_v4_mapped(ip) {
        key4(ip[3])
    } else {
        AddrKey {
            family: AF_INET6,
            addr: ip,
        }
    }
}

#[inline(always)]
pub fn is_v4_mapped(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && u32::from_be(ip[2]) == V4_MAPPED_PREFIX
}

/// 127.0.0.0/8 or 0.0.0.0 (which the kernel turns into a loopback connection).
#[inline(always)]
pub fn is_local4(ip: u32) -> bool {
    let host = u32::from_be(ip);
    host >> 24 == 127 || host == 0
}

/// `::1`, `::` or an IPv4-mapped local address.
#[inline(always)]
pub fn is_local6(ip: [u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        return is_local4(ip[3]);
    }
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || u32::from_be(ip[3]) == 1)
}

/// The IPv6 form of an IPv4 address: `::ffff:a.b.c.d`.
#[inline(always)]
pub fn v4_mapped(ip: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX.to_be(), ip]
}

/// 127.0.0.0/8: a destination only reachable from inside the netns.
#[inline(always)]
pub fn is_loopback4(ip: u32) -> bool {
    u32::from_be(ip) >> 24 == 127
}

/// `::1` or an IPv4-mapped loopback address.
#[inline(always)]
pub fn is_loopback6(ip: [u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        return is_loopback4(ip[3]);
    }
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && u32::from_be(ip[3]) == 1
}
