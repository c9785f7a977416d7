//! In-pod reply routing for the eBPF backend.
//!
//! The proxy dials a pod's app from the client's address (`IP_TRANSPARENT`) with a socket mark
//! that has [`REPLY_MARK_BIT`] set. With `net.ipv4.tcp_fwmark_accept=1` the app's accepted
//! socket inherits the SYN's mark, so its replies carry the bit too; without help they would be
//! routed out of the pod towards the client, which never sent the SYN. A policy rule
//! (`fwmark 0x1000/0x1000 lookup 100 pref 32763`) and a `local default dev lo` route in table
//! 100 deliver them locally instead, where the proxy's transparent socket picks them up.
//! `fwmark_reflect=1` gives the RST that answers a SYN to a closed port the SYN's mark, so the
//! proxy sees ECONNREFUSED at once instead of a connect timeout.
//!
//! This runs on every pod start, so it speaks rtnetlink directly instead of spawning `ip`: a
//! handful of syscalls, well under a millisecond. Everything acts on the calling thread's
//! network namespace: the netlink socket and the `/proc/sys/net` files are opened inside each
//! call, and both resolve to the netns of the thread that opens them (the caller is inside
//! [`crate::netns::Netns::run`]).

use std::ffi::CStr;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::CaptureError;

/// The bit of the proxy's dial mark (`0x1539`) that routes the app's replies back to the proxy.
pub const REPLY_MARK_BIT: u32 = 0x1000;
/// The routing table holding the `local default dev lo` route.
pub const REPLY_TABLE: u32 = 100;
/// The rule's priority: just below the kernel's `main` rule (32766) and below 32765/32764,
/// which other tooling (Istio's tproxy mode, Calico) tends to use.
pub const REPLY_RULE_PREF: u32 = 32763;

/// How long one netlink answer may take. The kernel answers route changes synchronously, so
/// this only bounds a wedged kernel or a dump that never ends.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(1);

// <linux/netlink.h>
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
// Flags the kernel sets on an NLMSG_ERROR it sends back.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;

// <linux/rtnetlink.h>
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;

// <linux/fib_rules.h>
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_SUPPRESS_IFGROUP: u16 = 13;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_PROTOCOL: u16 = 21;

const FIB_RULE_HDR_LEN: usize = 12;
const RTMSG_LEN: usize = 12;

const TCP_FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const FWMARK_REFLECT_V4: &str = "/proc/sys/net/ipv4/fwmark_reflect";
const FWMARK_REFLECT_V6: &str = "/proc/sys/net/ipv6/fwmark_reflect";
const IPV6_SYSCTLS: &str = "/proc/sys/net/ipv6";
const LO_DISABLE_IPV6: &str = "/proc/sys/net/ipv6/conf/lo/disable_ipv6";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add,
    Delete,
}

/// Installs reply routing in the calling thread's network namespace: for IPv4 and IPv6 the rule
/// `fwmark 0x1000/0x1000 lookup 100 pref 32763` and the route `local default dev lo table 100`,
/// then `net.ipv4.tcp_fwmark_accept`, `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect`
/// set to 1.
///
/// Idempotent: what is already there counts as done. IPv6 is skipped when the netns has none
/// (no `/proc/sys/net/ipv6`, IPv6 disabled on `lo`, or no IPv6 policy routing in the kernel).
pub fn install_current() -> Result<(), CaptureError> {
    let mut nl = Rtnl::open().map_err(|e| in_netns("open a NETLINK_ROUTE socket", e))?;
    let lo = loopback_index()?;
    let v6 = ipv6_routable();
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !v6 {
            continue;
        }
        // The rule goes first. A rule pointing at a still-empty table 100 is harmless (the
        // lookup falls through to `main`), while a kernel without policy routing for the family
        // refuses the rule with EAFNOSUPPORT but would put a "table 100" route into `main`,
        // delivering all of the pod's traffic locally.
        match nl.request(|seq| rule_message(Op::Add, family, seq)) {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) if family == Family::V6 && errno(&e) == Some(libc::EAFNOSUPPORT) => continue,
            Err(e) => return Err(in_netns(what(Step::AddRule, family), e)),
        }
        match nl.request(|seq| route_message(Op::Add, family, lo, seq)) {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(in_netns(what(Step::AddRoute, family), e)),
        }
    }
    write_sysctl(TCP_FWMARK_ACCEPT, b"1\n").map_err(|e| {
        in_netns(
            "set net.ipv4.tcp_fwmark_accept=1 (accepted sockets inherit the proxy's mark; \
             needs root and a writable /proc/sys)",
            e,
        )
    })?;
    write_sysctl(FWMARK_REFLECT_V4, b"1\n").map_err(|e| {
        in_netns(
            "set net.ipv4.fwmark_reflect=1 (RSTs carry the SYN's mark; needs root and a \
             writable /proc/sys)",
            e,
        )
    })?;
    if Path::new(IPV6_SYSCTLS).exists() {
        write_sysctl(FWMARK_REFLECT_V6, b"1\n").map_err(|e| {
            in_netns(
                "set net.ipv6.fwmark_reflect=1 (RSTs carry the SYN's mark; needs root and a \
                 writable /proc/sys)",
                e,
            )
        })?;
    }
    Ok(())
}

/// Removes what [`install_current`] installs from the calling thread's network namespace and
/// sets the three sysctls back to 0. Idempotent: what is already gone counts as done.
pub fn remove_current() -> Result<(), CaptureError> {
    let mut nl = Rtnl::open().map_err(|e| in_netns("open a NETLINK_ROUTE socket", e))?;
    let lo = loopback_index()?;
    // Unlike install, IPv6 disabled on `lo` is no reason to skip: a rule installed before it
    // was disabled is still there.
    let v6 = Path::new(IPV6_SYSCTLS).exists();
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !v6 {
            continue;
        }
        // Rule first, so marked replies never meet a rule whose table is already gone (that
        // would be harmless too, but this order mirrors install).
        match nl.request(|seq| rule_message(Op::Delete, family, seq)) {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            // No policy routing for the family: no table 100 either (see install_current), so
            // there is no route to delete, and a "table 100" delete would hit `main`.
            Err(e) if family == Family::V6 && errno(&e) == Some(libc::EAFNOSUPPORT) => continue,
            Err(e) => return Err(in_netns(what(Step::DeleteRule, family), e)),
        }
        match nl.request(|seq| route_message(Op::Delete, family, lo, seq)) {
            Ok(()) => {}
            // ESRCH: no such route. ENODEV/EACCES: IPv6 off on lo, which flushed the route.
            Err(e) if errno(&e) == Some(libc::ESRCH) || errno(&e) == Some(libc::ENOENT) => {}
            Err(e)
                if family == Family::V6
                    && matches!(errno(&e), Some(libc::ENODEV | libc::EACCES)) => {}
            Err(e) => return Err(in_netns(what(Step::DeleteRoute, family), e)),
        }
    }
    write_sysctl(TCP_FWMARK_ACCEPT, b"0\n").map_err(|e| {
        in_netns(
            "set net.ipv4.tcp_fwmark_accept=0 (needs root and a writable /proc/sys)",
            e,
        )
    })?;
    write_sysctl(FWMARK_REFLECT_V4, b"0\n").map_err(|e| {
        in_netns(
            "set net.ipv4.fwmark_reflect=0 (needs root and a writable /proc/sys)",
            e,
        )
    })?;
    if v6 {
        write_sysctl(FWMARK_REFLECT_V6, b"0\n").map_err(|e| {
            in_netns(
                "set net.ipv6.fwmark_reflect=0 (needs root and a writable /proc/sys)",
                e,
            )
        })?;
    }
    Ok(())
}

/// Whether reply routing is in place in the calling thread's network namespace: the IPv4 rule
/// (exactly ours: pref, mark, mask, table and no further selectors) and route,
/// `tcp_fwmark_accept=1` and `net.ipv4.fwmark_reflect=1`; and when the netns has usable IPv6
/// (see [`install_current`]), the IPv6 rule, route and `net.ipv6.fwmark_reflect=1` as well.
/// `true` means [`install_current`] would change nothing.
pub fn installed_current() -> Result<bool, CaptureError> {
    for (path, name) in [
        (TCP_FWMARK_ACCEPT, "read net.ipv4.tcp_fwmark_accept"),
        (FWMARK_REFLECT_V4, "read net.ipv4.fwmark_reflect"),
    ] {
        if read_sysctl(path).map_err(|e| in_netns(name, e))? != "1" {
            return Ok(false);
        }
    }
    let mut nl = Rtnl::open().map_err(|e| in_netns("open a NETLINK_ROUTE socket", e))?;
    let lo = loopback_index()?;
    let v6 = ipv6_routable();
    if v6
        && read_sysctl(FWMARK_REFLECT_V6)
            .map_err(|e| in_netns("read net.ipv6.fwmark_reflect", e))?
            != "1"
    {
        return Ok(false);
    }
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !v6 {
            continue;
        }
        let rules = match nl.dump(|seq| dump_message(RTM_GETRULE, family, seq)) {
            Ok(rules) => rules,
            // No IPv6 policy routing: install_current skips IPv6 there too.
            Err(e) if family == Family::V6 && errno(&e) == Some(libc::EAFNOSUPPORT) => continue,
            Err(e) => return Err(in_netns(what(Step::DumpRules, family), e)),
        };
        if !rules
            .iter()
            .any(|(ty, body)| *ty == RTM_NEWRULE && rule_is_ours(family, body))
        {
            return Ok(false);
        }
        let routes = nl
            .dump(|seq| dump_message(RTM_GETROUTE, family, seq))
            .map_err(|e| in_netns(what(Step::DumpRoutes, family), e))?;
        if !routes
            .iter()
            .any(|(ty, body)| *ty == RTM_NEWROUTE && route_is_ours(family, lo, body))
        {
            return Ok(false);
        }
    }
    Ok(true)
}

#[derive(Clone, Copy)]
enum Step {
    AddRule,
    AddRoute,
    DeleteRule,
    DeleteRoute,
    DumpRules,
    DumpRoutes,
}

/// The failed step, spelled as the equivalent `ip` command so it can be retried by hand.
fn what(step: Step, family: Family) -> &'static str {
    match (step, family) {
        (Step::AddRule, Family::V4) => {
            "add the reply rule (ip rule add fwmark 0x1000/0x1000 lookup 100 pref 32763)"
        }
        (Step::AddRule, Family::V6) => {
            "add the reply rule (ip -6 rule add fwmark 0x1000/0x1000 lookup 100 pref 32763)"
        }
        (Step::AddRoute, Family::V4) => {
            "add the reply route (ip route add local default dev lo table 100)"
        }
        (Step::AddRoute, Family::V6) => {
            "add the reply route (ip -6 route add local default dev lo table 100)"
        }
        (Step::DeleteRule, Family::V4) => {
            "delete the reply rule (ip rule del fwmark 0x1000/0x1000 lookup 100 pref 32763)"
        }
        (Step::DeleteRule, Family::V6) => {
            "delete the reply rule (ip -6 rule del fwmark 0x1000/0x1000 lookup 100 pref 32763)"
        }
        (Step::DeleteRoute, Family::V4) => {
            "delete the reply route (ip route del local default dev lo table 100)"
        }
        (Step::DeleteRoute, Family::V6) => {
            "delete the reply route (ip -6 route del local default dev lo table 100)"
        }
        (Step::DumpRules, Family::V4) => "list the IPv4 policy rules (ip rule show)",
        (Step::DumpRules, Family::V6) => "list the IPv6 policy rules (ip -6 rule show)",
        (Step::DumpRoutes, Family::V4) => "list the IPv4 routes (ip route show table all)",
        (Step::DumpRoutes, Family::V6) => "list the IPv6 routes (ip -6 route show table all)",
    }
}

fn in_netns(what: &'static str, source: io::Error) -> CaptureError {
    CaptureError::InNetns {
        what,
        netns: current_netns(),
        source,
    }
}

/// Names the calling thread's netns (`net:[INODE]`): the caller knows its path, we only know
/// where we are.
fn current_netns() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net")
        .unwrap_or_else(|_| PathBuf::from("of the calling thread"))
}

fn loopback_index() -> Result<u32, CaptureError> {
    // if_nametoindex asks through a socket it creates, so it sees the calling thread's netns.
    // SAFETY: the argument is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 {
        return Err(in_netns(
            "find the loopback interface `lo` (every netns has one; is this a network namespace \
             the caller can see?)",
            io::Error::last_os_error(),
        ));
    }
    Ok(index)
}

/// Whether install_current should set up IPv6. Pods often run with IPv6 disabled; then the
/// kernel refuses routes via `lo` (EACCES) and nothing could use them anyway.
fn ipv6_routable() -> bool {
    if !Path::new(IPV6_SYSCTLS).exists() {
        return false;
    }
    // Unreadable: let netlink decide and report.
    read_sysctl(LO_DISABLE_IPV6).map_or(true, |v| v == "0")
}

fn write_sysctl(path: &str, value: &[u8]) -> io::Result<()> {
    // Opened here, not cached: a /proc/sys file is bound to the netns of the thread that opens
    // it, and the caller moves between namespaces.
    OpenOptions::new().write(true).open(path)?.write_all(value)
}

fn read_sysctl(path: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// A netlink request under construction: header, fixed struct, then 4-byte aligned attributes.
struct Message(Vec<u8>);

impl Message {
    fn new(ty: u16, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0 lets the kernel fill it
        Self(buf)
    }

    fn bytes(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn attr(mut self, ty: u16, payload: &[u8]) -> Self {
        // rta_len counts header and payload but not the padding after it.
        let len = (4 + payload.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
        self
    }

    fn attr_u32(self, ty: u16, value: u32) -> Self {
        self.attr(ty, &value.to_ne_bytes())
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn change_flags(op: Op) -> (u16, u16, u16) {
    match op {
        // EXCL: without it the kernel appends a second identical rule on every install.
        Op::Add => (
            RTM_NEWRULE,
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
        ),
        Op::Delete => (RTM_DELRULE, RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK),
    }
}

/// `ip [-6] rule add|del fwmark 0x1000/0x1000 lookup 100 pref 32763`.
fn rule_message(op: Op, family: Family, seq: u32) -> Vec<u8> {
    let (ty, _, flags) = change_flags(op);
    let hdr = [
        family.af(),
        0,               // dst_len
        0,               // src_len
        0,               // tos
        RT_TABLE_UNSPEC, // table: FRA_TABLE carries it
        0,               // res1
        0,               // res2
        FR_ACT_TO_TBL,   // action
        0,
        0,
        0,
        0, // flags (u32)
    ];
    Message::new(ty, flags, seq)
        .bytes(&hdr)
        .attr_u32(FRA_PRIORITY, REPLY_RULE_PREF)
        .attr_u32(FRA_FWMARK, REPLY_MARK_BIT)
        .attr_u32(FRA_FWMASK, REPLY_MARK_BIT)
        .attr_u32(FRA_TABLE, REPLY_TABLE)
        .finish()
}

/// `ip [-6] route add|del local default dev lo table 100`.
fn route_message(op: Op, family: Family, lo: u32, seq: u32) -> Vec<u8> {
    let (_, ty, flags) = change_flags(op);
    let hdr = [
        family.af(),
        0,               // dst_len: default route
        0,               // src_len
        0,               // tos
        RT_TABLE_UNSPEC, // table: RTA_TABLE carries it
        RTPROT_BOOT,     // protocol, as `ip route add` sets it
        RT_SCOPE_HOST,   // scope
        RTN_LOCAL,       // type: deliver locally
        0,
        0,
        0,
        0, // flags (u32)
    ];
    Message::new(ty, flags, seq)
        .bytes(&hdr)
        .attr_u32(RTA_TABLE, REPLY_TABLE)
        .attr_u32(RTA_OIF, lo)
        .finish()
}

/// A dump of every rule (RTM_GETRULE) or route (RTM_GETROUTE, all tables) of the family. Both
/// headers are 12 bytes with the family first; the rest zero means "no filter".
fn dump_message(ty: u16, family: Family, seq: u32) -> Vec<u8> {
    let mut hdr = [0u8; 12];
    hdr[0] = family.af();
    Message::new(ty, NLM_F_REQUEST | NLM_F_DUMP, seq)
        .bytes(&hdr)
        .finish()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    ty: u16,
    flags: u16,
    seq: u32,
}

/// Splits a datagram into messages: header and payload (after the 16-byte header).
fn split_messages(mut buf: &[u8]) -> io::Result<Vec<(Header, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "malformed netlink answer: message length {len} with {} bytes left",
                    buf.len()
                ),
            ));
        }
        let header = Header {
            ty: u16_at(buf, 4),
            flags: u16_at(buf, 6),
            seq: u32_at(buf, 8),
        };
        out.push((header, &buf[NLMSG_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// Attributes as (type without the nested/byte-order flags, payload). Stops at the first
/// malformed one: the caller only looks for attributes it knows.
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16_at(buf, 0) as usize;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((u16_at(buf, 2) & NLA_TYPE_MASK, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// Whether a RTM_NEWRULE payload is exactly our rule. Any attribute beyond the ones we set
/// (and those the kernel always reports: FRA_PROTOCOL, and the suppressors at -1 meaning
/// "off") is a selector such as `iif` or `sport` that would keep the rule from matching every
/// marked reply.
fn rule_is_ours(family: Family, body: &[u8]) -> bool {
    if body.len() < FIB_RULE_HDR_LEN {
        return false;
    }
    let (hdr, rest) = body.split_at(FIB_RULE_HDR_LEN);
    // family, dst_len, src_len, tos, (table), res1, res2, action, flags.
    if hdr[0] != family.af()
        || hdr[1..4] != [0, 0, 0]
        || hdr[7] != FR_ACT_TO_TBL
        || u32_at(hdr, 8) != 0
    {
        return false;
    }
    let (mut pref, mut mark, mut mask) = (None, None, None);
    let mut table = u32::from(hdr[4]);
    for (ty, payload) in attributes(rest) {
        let value = (payload.len() == 4).then(|| u32_at(payload, 0));
        match ty {
            FRA_PRIORITY => pref = value,
            FRA_FWMARK => mark = value,
            FRA_FWMASK => mask = value,
            FRA_TABLE => table = value.unwrap_or(0),
            FRA_PROTOCOL => {}
            FRA_SUPPRESS_PREFIXLEN | FRA_SUPPRESS_IFGROUP if value == Some(u32::MAX) => {}
            _ => return false,
        }
    }
    pref == Some(REPLY_RULE_PREF)
        && mark == Some(REPLY_MARK_BIT)
        && mask == Some(REPLY_MARK_BIT)
        && table == REPLY_TABLE
}

/// Whether a RTM_NEWROUTE payload is `local default dev lo table 100`.
fn route_is_ours(family: Family, lo: u32, body: &[u8]) -> bool {
    if body.len() < RTMSG_LEN {
        return false;
    }
    let (hdr, rest) = body.split_at(RTMSG_LEN);
    // family, dst_len, src_len, tos, table, protocol, scope, type.
    if hdr[0] != family.af() || hdr[1] != 0 || hdr[2] != 0 || hdr[7] != RTN_LOCAL {
        return false;
    }
    let (mut table, mut oif) = (u32::from(hdr[4]), None);
    for (ty, payload) in attributes(rest) {
        let value = (payload.len() == 4).then(|| u32_at(payload, 0));
        match ty {
            RTA_TABLE => table = value.unwrap_or(0),
            RTA_OIF => oif = value,
            _ => {}
        }
    }
    table == REPLY_TABLE && oif == Some(lo)
}

/// The kernel's answer to a request: Ok for a zero NLMSG_ERROR ("ack"), the errno and the
/// kernel's extended-ack text otherwise.
fn parse_ack(flags: u16, payload: &[u8]) -> Result<(), KernelError> {
    if payload.len() < 4 {
        return Err(KernelError::new(
            libc::EBADMSG,
            Some("truncated NLMSG_ERROR".into()),
        ));
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if code == 0 {
        return Ok(());
    }
    let mut text = None;
    if flags & NLM_F_ACK_TLVS != 0 && payload.len() >= 4 + NLMSG_HDRLEN {
        // The echoed request: just its header when capped, else the whole message.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            align4(u32_at(payload, 4) as usize)
        };
        if let Some(tlvs) = payload.get(4 + echoed..) {
            text = attributes(tlvs)
                .into_iter()
                .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
                .and_then(|(_, s)| CStr::from_bytes_until_nul(s).ok())
                .map(|s| s.to_string_lossy().into_owned());
        }
    }
    Err(KernelError::new(code.saturating_neg(), text))
}

/// A refusal from the kernel, with its own explanation when it gave one.
#[derive(Debug)]
struct KernelError {
    errno: i32,
    text: Option<String>,
}

impl KernelError {
    fn new(errno: i32, text: Option<String>) -> Self {
        Self { errno, text }
    }

    fn into_io(self) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(self.errno).kind(), self)
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(text) = &self.text {
            write!(f, " (kernel: {text})")?;
        }
        match self.errno {
            // EACCES with a text is the kernel's own reason (e.g. IPv6 disabled on the device),
            // not a missing capability.
            libc::EPERM => f.write_str("; needs CAP_NET_ADMIN over this network namespace"),
            libc::EACCES if self.text.is_none() => {
                f.write_str("; needs CAP_NET_ADMIN over this network namespace")
            }
            libc::EAFNOSUPPORT => f.write_str(
                "; the kernel has no policy routing for this family (CONFIG_IP_MULTIPLE_TABLES \
                 / CONFIG_IPV6_MULTIPLE_TABLES)",
            ),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for KernelError {}

/// The errno behind an error from this module, whether it came from a syscall or the kernel's
/// netlink answer.
fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<KernelError>())
            .map(|k| k.errno)
    })
}

/// A dump's answers: message type and payload after the netlink header.
type Dumped = Vec<(u16, Vec<u8>)>;

/// A NETLINK_ROUTE socket in the netns of the thread that opened it.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) returned a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: NETLINK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: NETLINK_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        // Best effort (Linux 4.2 / 4.12): acks without the echoed request, and with the
        // kernel's reason for a refusal, which names e.g. the bad attribute.
        let _ = setsockopt(&fd, SOL_NETLINK, NETLINK_CAP_ACK, &1i32);
        let _ = setsockopt(&fd, SOL_NETLINK, NETLINK_EXT_ACK, &1i32);
        Ok(Self { fd, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one change request and waits for its ack.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&build(seq))?;
        let deadline = Instant::now() + NETLINK_TIMEOUT;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf, deadline)?;
            for (header, payload) in split_messages(&buf[..n])? {
                // Anything else is a leftover of an earlier request on this socket.
                if header.seq == seq && header.ty == NLMSG_ERROR {
                    return parse_ack(header.flags, payload).map_err(KernelError::into_io);
                }
            }
        }
    }

    /// Runs a dump; returns each answer's type and payload. Retries a dump the kernel marks as
    /// interrupted by a concurrent change (its contents may be inconsistent).
    fn dump(&mut self, build: impl Fn(u32) -> Vec<u8>) -> io::Result<Dumped> {
        for _ in 0..3 {
            let seq = self.next_seq();
            self.send(&build(seq))?;
            if let Some(out) = self.read_dump(seq)? {
                return Ok(out);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the dump was interrupted by concurrent routing changes three times in a row; retry",
        ))
    }

    fn read_dump(&mut self, seq: u32) -> io::Result<Option<Dumped>> {
        let deadline = Instant::now() + NETLINK_TIMEOUT;
        // Large enough for the kernel's biggest dump datagram (32 KiB), so none is truncated.
        let mut buf = vec![0u8; 32 * 1024];
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.recv(&mut buf, deadline)?;
            for (header, payload) in split_messages(&buf[..n])? {
                if header.seq != seq {
                    continue;
                }
                interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
                match header.ty {
                    NLMSG_DONE => {
                        // Since Linux 4.x DONE carries the dump's error code.
                        if payload.len() >= 4 {
                            parse_ack(header.flags, payload).map_err(KernelError::into_io)?;
                        }
                        return Ok((!interrupted).then_some(out));
                    }
                    NLMSG_ERROR => {
                        parse_ack(header.flags, payload).map_err(KernelError::into_io)?;
                        return Ok((!interrupted).then_some(out));
                    }
                    ty => out.push((ty, payload.to_vec())),
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel's dump did not end within 1s",
                ));
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl is valid; family set below, pid 0 is the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and kernel are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("netlink send wrote {n} of {} bytes", msg.len()),
            ));
        }
        Ok(())
    }

    /// Receives one datagram from the kernel, waiting at most until `deadline`.
    fn recv(&self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            // SAFETY: an all-zero sockaddr_nl is valid; recvfrom fills it.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: buf and from are valid for the lengths given for the whole call.
            // MSG_TRUNC makes the return value the datagram's real length.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Err(timed_out()),
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            // Only the kernel (port 0) answers requests; anything else is not ours to parse.
            if from.nl_pid != 0 {
                continue;
            }
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "netlink answer of {n} bytes truncated to {}; report this",
                        buf.len()
                    ),
                ));
            }
            return Ok(n);
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no netlink answer from the kernel within 1s; retry, and check the node's load",
    )
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a T valid for size_of::<T>() bytes for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

// Netlink is host byte order; the expected vectors below are spelled out for little-endian.
#[cfg(test)]
#[cfg(target_endian = "little")]
mod tests {
    use super::*;

    #[test]
    fn rule_add_v4_bytes() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            // nlmsghdr
            60, 0, 0, 0,        // nlmsg_len: 16 + 12 + 4 * 8
            32, 0,              // nlmsg_type: RTM_NEWRULE
            0x05, 0x06,         // nlmsg_flags: REQUEST | ACK | EXCL (0x200) | CREATE (0x400)
            1, 0, 0, 0,         // nlmsg_seq
            0, 0, 0, 0,         // nlmsg_pid
            // fib_rule_hdr
            2,                  // family: AF_INET
            0, 0, 0,            // dst_len, src_len, tos
            0,                  // table: RT_TABLE_UNSPEC (FRA_TABLE below)
            0, 0,               // res1, res2
            1,                  // action: FR_ACT_TO_TBL
            0, 0, 0, 0,         // flags
            // attributes: rta_len, rta_type, u32 value
            8, 0, 6, 0,   0xfb, 0x7f, 0, 0,   // FRA_PRIORITY 32763
            8, 0, 10, 0,  0, 0x10, 0, 0,      // FRA_FWMARK 0x1000
            8, 0, 16, 0,  0, 0x10, 0, 0,      // FRA_FWMASK 0x1000
            8, 0, 15, 0,  100, 0, 0, 0,       // FRA_TABLE 100
        ];
        assert_eq!(rule_message(Op::Add, Family::V4, 1), expected);
    }

    #[test]
    fn rule_delete_v6_bytes() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            60, 0, 0, 0,        // nlmsg_len
            33, 0,              // nlmsg_type: RTM_DELRULE
            0x05, 0x00,         // nlmsg_flags: REQUEST | ACK
            7, 0, 0, 0,         // nlmsg_seq
            0, 0, 0, 0,         // nlmsg_pid
            10,                 // family: AF_INET6
            0, 0, 0, 0, 0, 0,   // dst_len, src_len, tos, table, res1, res2
            1,                  // action: FR_ACT_TO_TBL
            0, 0, 0, 0,         // flags
            8, 0, 6, 0,   0xfb, 0x7f, 0, 0,   // FRA_PRIORITY 32763
            8, 0, 10, 0,  0, 0x10, 0, 0,      // FRA_FWMARK 0x1000
            8, 0, 16, 0,  0, 0x10, 0, 0,      // FRA_FWMASK 0x1000
            8, 0, 15, 0,  100, 0, 0, 0,       // FRA_TABLE 100
        ];
        assert_eq!(rule_message(Op::Delete, Family::V6, 7), expected);
    }

    #[test]
    fn route_add_v4_bytes() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            // nlmsghdr
            44, 0, 0, 0,        // nlmsg_len: 16 + 12 + 2 * 8
            24, 0,              // nlmsg_type: RTM_NEWROUTE
            0x05, 0x06,         // nlmsg_flags: REQUEST | ACK | EXCL | CREATE
            2, 0, 0, 0,         // nlmsg_seq
            0, 0, 0, 0,         // nlmsg_pid
            // rtmsg
            2,                  // rtm_family: AF_INET
            0,                  // rtm_dst_len: default
            0,                  // rtm_src_len
            0,                  // rtm_tos
            0,                  // rtm_table: RT_TABLE_UNSPEC (RTA_TABLE below)
            3,                  // rtm_protocol: RTPROT_BOOT
            254,                // rtm_scope: RT_SCOPE_HOST
            2,                  // rtm_type: RTN_LOCAL
            0, 0, 0, 0,         // rtm_flags
            8, 0, 15, 0,  100, 0, 0, 0,       // RTA_TABLE 100
            8, 0, 4, 0,   1, 0, 0, 0,         // RTA_OIF 1 (lo)
        ];
        assert_eq!(route_message(Op::Add, Family::V4, 1, 2), expected);
    }

    #[test]
    fn route_delete_v6_bytes() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            44, 0, 0, 0,        // nlmsg_len
            25, 0,              // nlmsg_type: RTM_DELROUTE
            0x05, 0x00,         // nlmsg_flags: REQUEST | ACK
            9, 0, 0, 0,         // nlmsg_seq
            0, 0, 0, 0,         // nlmsg_pid
            10, 0, 0, 0, 0,     // family AF_INET6, dst_len, src_len, tos, table
            3, 254, 2,          // protocol RTPROT_BOOT, scope host, type RTN_LOCAL
            0, 0, 0, 0,         // rtm_flags
            8, 0, 15, 0,  100, 0, 0, 0,       // RTA_TABLE 100
            8, 0, 4, 0,   5, 0, 0, 0,         // RTA_OIF 5
        ];
        assert_eq!(route_message(Op::Delete, Family::V6, 5, 9), expected);
    }

    #[test]
    fn rule_dump_bytes() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            28, 0, 0, 0,        // nlmsg_len: 16 + 12
            34, 0,              // nlmsg_type: RTM_GETRULE
            0x01, 0x03,         // nlmsg_flags: REQUEST | DUMP (ROOT | MATCH)
            3, 0, 0, 0,         // nlmsg_seq
            0, 0, 0, 0,         // nlmsg_pid
            2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // fib_rule_hdr: AF_INET, no filter
        ];
        assert_eq!(dump_message(RTM_GETRULE, Family::V4, 3), expected);
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            36, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr, len 16 + 4 + 8 + 8
            1, 2, 3, 0,                 // 3 header bytes, 1 byte of padding
            7, 0, 3, 0, b'l', b'o', 0,  // rta_len 7 (no padding counted), "lo\0"
            0,                          // padding
            5, 0, 21, 0, 4, 0, 0, 0,    // a u8 attribute: rta_len 5, 3 bytes of padding
        ];
        let msg = Message::new(1, 0, 0)
            .bytes(&[1, 2, 3])
            .attr(3, b"lo\0")
            .attr(FRA_PROTOCOL, &[4])
            .finish();
        assert_eq!(msg, expected);
        assert_eq!(
            attributes(&msg[20..]),
            vec![(3, &b"lo\0"[..]), (FRA_PROTOCOL, &[4u8][..])]
        );
    }

    fn ack(seq: u32, flags: u16, code: i32, echoed: &[u8], tlv: Option<&[u8]>) -> Vec<u8> {
        let mut msg = Message::new(NLMSG_ERROR, flags, seq)
            .bytes(&code.to_ne_bytes())
            .bytes(echoed);
        if let Some(text) = tlv {
            msg = msg.attr(NLMSGERR_ATTR_MSG, text);
        }
        msg.finish()
    }

    #[test]
    fn ack_zero_is_success() {
        let echoed = rule_message(Op::Add, Family::V4, 4);
        let buf = ack(4, 0, 0, &echoed[..16], None);
        let msgs = split_messages(&buf).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].0.seq, 4);
        assert!(parse_ack(msgs[0].0.flags, msgs[0].1).is_ok());
    }

    #[test]
    fn capped_ack_carries_errno_and_kernel_text() {
        let echoed = rule_message(Op::Add, Family::V4, 4);
        let buf = ack(
            4,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            -libc::EEXIST,
            &echoed[..16],
            Some(b"Rule exists\0"),
        );
        let (header, payload) = split_messages(&buf).unwrap()[0];
        let err = parse_ack(header.flags, payload).unwrap_err().into_io();
        assert_eq!(errno(&err), Some(libc::EEXIST));
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("(kernel: Rule exists)"), "{err}");
    }

    #[test]
    fn uncapped_ack_skips_the_echoed_request() {
        let echoed = route_message(Op::Add, Family::V6, 1, 8);
        let buf = ack(
            8,
            NLM_F_ACK_TLVS,
            -libc::EACCES,
            &echoed,
            Some(b"IPv6 is disabled on nexthop device\0"),
        );
        let (header, payload) = split_messages(&buf).unwrap()[0];
        let err = parse_ack(header.flags, payload).unwrap_err();
        assert_eq!(err.errno, libc::EACCES);
        assert_eq!(
            err.text.as_deref(),
            Some("IPv6 is disabled on nexthop device")
        );
        assert!(!err.to_string().contains("CAP_NET_ADMIN"), "{err}");
        assert!(
            KernelError::new(libc::EPERM, None)
                .to_string()
                .contains("needs CAP_NET_ADMIN")
        );
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let good = ack(1, NLM_F_CAPPED | NLM_F_ACK_TLVS, -1, &[0; 16], Some(b"x\0"));
        for cut in 0..good.len() {
            let part = &good[..cut];
            if let Ok(msgs) = split_messages(part) {
                for (header, payload) in msgs {
                    let _ = parse_ack(header.flags, payload);
                    let _ = rule_is_ours(Family::V4, payload);
                    let _ = route_is_ours(Family::V4, 1, payload);
                }
            }
            let _ = attributes(part);
        }
        let mut bad = good.clone();
        bad[0] = 200; // nlmsg_len past the end
        assert!(split_messages(&bad).is_err());
    }

    /// A rule as the kernel reports it (6.x): table in both places, protocol and the
    /// suppress_prefixlength "off" value always present.
    fn kernel_rule(family: Family, extra: Option<(u16, &[u8])>) -> Vec<u8> {
        let mut msg = Message::new(RTM_NEWRULE, 0, 1)
            .bytes(&[family.af(), 0, 0, 0, 100, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0])
            .attr_u32(FRA_TABLE, 100)
            .attr_u32(FRA_SUPPRESS_PREFIXLEN, u32::MAX)
            .attr(FRA_PROTOCOL, &[RTPROT_BOOT])
            .attr_u32(FRA_PRIORITY, REPLY_RULE_PREF)
            .attr_u32(FRA_FWMARK, REPLY_MARK_BIT)
            .attr_u32(FRA_FWMASK, REPLY_MARK_BIT);
        if let Some((ty, payload)) = extra {
            msg = msg.attr(ty, payload);
        }
        msg.finish()[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn only_our_exact_rule_counts() {
        assert!(rule_is_ours(Family::V4, &kernel_rule(Family::V4, None)));
        assert!(rule_is_ours(Family::V6, &kernel_rule(Family::V6, None)));
        assert!(!rule_is_ours(Family::V4, &kernel_rule(Family::V6, None)));
        // iif eth0: would only catch replies arriving from eth0.
        let iif = kernel_rule(Family::V4, Some((3, b"eth0\0")));
        assert!(!rule_is_ours(Family::V4, &iif));
        // A wider mask selects other packets too; a narrower one misses ours.
        let wide = kernel_rule(Family::V4, Some((FRA_FWMASK, &0xffffu32.to_ne_bytes())));
        assert!(!rule_is_ours(Family::V4, &wide));
        let mut not = kernel_rule(Family::V4, None);
        not[8] = 2; // FIB_RULE_INVERT
        assert!(!rule_is_ours(Family::V4, &not));
    }

    #[test]
    fn only_our_exact_route_counts() {
        let route = |table: u32, ty: u8, oif: u32| {
            Message::new(RTM_NEWROUTE, 0, 1)
                .bytes(&[
                    2,
                    0,
                    0,
                    0,
                    table as u8,
                    RTPROT_BOOT,
                    RT_SCOPE_HOST,
                    ty,
                    0,
                    0,
                    0,
                    0,
                ])
                .attr_u32(RTA_TABLE, table)
                .attr_u32(RTA_OIF, oif)
                .finish()[NLMSG_HDRLEN..]
                .to_vec()
        };
        assert!(route_is_ours(Family::V4, 1, &route(100, RTN_LOCAL, 1)));
        assert!(!route_is_ours(Family::V4, 1, &route(254, RTN_LOCAL, 1)));
        assert!(!route_is_ours(Family::V4, 1, &route(100, 1, 1))); // RTN_UNICAST
        assert!(!route_is_ours(Family::V4, 1, &route(100, RTN_LOCAL, 2)));
        assert!(!route_is_ours(Family::V6, 1, &route(100, RTN_LOCAL, 1)));
    }

    /// Tests against the running kernel. They need root and fail without it: a skipped test
    /// would pass CI while proving nothing.
    mod root {
        use super::super::*;
        use crate::netns::Netns;
        use std::process::Command;
        use std::sync::atomic::{AtomicU32, Ordering};

        fn require_root() {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            assert_eq!(
                euid, 0,
                "this test creates network namespaces and needs root; run it as root (it does \
                 not skip)"
            );
        }

        fn run(program: &str, args: &[&str]) -> String {
            let out = Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("run {program} {args:?}: {e}"));
            assert!(
                out.status.success(),
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// `ip route show table 100`; a table the kernel never created reads as empty (recent
        /// iproute2 reports "FIB table does not exist" instead of printing nothing).
        fn table_100(prefix: &[&str]) -> String {
            let mut args = prefix.to_vec();
            args.extend_from_slice(&["route", "show", "table", "100"]);
            let out = Command::new("ip").args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && stderr.contains("FIB table does not exist") {
                return String::new();
            }
            assert!(out.status.success(), "ip {args:?} failed: {stderr}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// A fresh netns with `lo` up, deleted when dropped (also when the test panics).
        struct TestNetns {
            name: String,
        }

        impl TestNetns {
            fn new() -> Self {
                require_root();
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let name = format!(
                    "sluice-reply-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                );
                run("ip", &["netns", "add", &name]);
                let ns = Self { name };
                ns.ip(&["link", "set", "lo", "up"]);
                ns
            }

            fn ip(&self, args: &[&str]) -> String {
                let mut all = vec!["-n", self.name.as_str()];
                all.extend_from_slice(args);
                run("ip", &all)
            }

            fn sysctl(&self, key: &str) -> String {
                run("ip", &["netns", "exec", &self.name, "sysctl", "-n", key])
                    .trim()
                    .to_owned()
            }

            fn set_sysctl(&self, key_value: &str) {
                run(
                    "ip",
                    &["netns", "exec", &self.name, "sysctl", "-qw", key_value],
                );
            }

            /// Runs `f` inside the netns on a thread of its own, as the agent does.
            fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
                let netns = Netns::open_named_or_path(&self.name).unwrap();
                std::thread::scope(|s| s.spawn(|| netns.run(f).unwrap()).join().unwrap())
            }

            fn rules(&self) -> (String, String) {
                (self.ip(&["rule", "show"]), self.ip(&["-6", "rule", "show"]))
            }

            fn routes(&self) -> (String, String) {
                (
                    table_100(&["-n", &self.name]),
                    table_100(&["-n", &self.name, "-6"]),
                )
            }
        }

        impl Drop for TestNetns {
            fn drop(&mut self) {
                let _ = Command::new("ip")
                    .args(["netns", "delete", &self.name])
                    .status();
            }
        }

        const RULE: &str = "32763:\tfrom all fwmark 0x1000/0x1000 lookup 100";

        fn assert_installed(ns: &TestNetns) {
            let (v4, v6) = ns.rules();
            assert!(v4.contains(RULE), "IPv4 rule missing:\n{v4}");
            assert!(v6.contains(RULE), "IPv6 rule missing:\n{v6}");
            assert_eq!(v4.matches("32763:").count(), 1, "duplicate rule:\n{v4}");
            assert_eq!(v6.matches("32763:").count(), 1, "duplicate rule:\n{v6}");
            let (v4, v6) = ns.routes();
            assert!(
                v4.contains("local default dev lo"),
                "IPv4 route missing:\n{v4}"
            );
            assert!(
                v6.contains("local default dev lo"),
                "IPv6 route missing:\n{v6}"
            );
            assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "1");
            assert_eq!(ns.sysctl("net.ipv4.fwmark_reflect"), "1");
            assert_eq!(ns.sysctl("net.ipv6.fwmark_reflect"), "1");
            assert!(ns.within(installed_current).unwrap());
        }

        fn assert_removed(ns: &TestNetns) {
            let (v4, v6) = ns.rules();
            assert!(!v4.contains("32763"), "IPv4 rule left:\n{v4}");
            assert!(!v6.contains("32763"), "IPv6 rule left:\n{v6}");
            let (v4, v6) = ns.routes();
            assert!(v4.trim().is_empty(), "IPv4 table 100 not empty:\n{v4}");
            assert!(v6.trim().is_empty(), "IPv6 table 100 not empty:\n{v6}");
            assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "0");
            assert_eq!(ns.sysctl("net.ipv4.fwmark_reflect"), "0");
            assert_eq!(ns.sysctl("net.ipv6.fwmark_reflect"), "0");
            assert!(!ns.within(installed_current).unwrap());
        }

        #[test]
        fn root_install_remove_round_trip() {
            let ns = TestNetns::new();
            assert!(!ns.within(installed_current).unwrap());
            ns.within(install_current).unwrap();
            assert_installed(&ns);
            ns.within(install_current).unwrap();
            assert_installed(&ns);

            // What the rule is for: a reply marked by the proxy's dial mark is delivered
            // locally, an unmarked one is not.
            let marked = ns.ip(&["route", "get", "192.0.2.1", "mark", "0x1539"]);
            assert!(
                marked.starts_with("local 192.0.2.1 dev lo table 100"),
                "{marked}"
            );
            let marked6 = ns.ip(&["-6", "route", "get", "2001:db8::1", "mark", "0x1539"]);
            assert!(marked6.starts_with("local 2001:db8::1 "), "{marked6}");
            assert!(marked6.contains("table 100"), "{marked6}");

            ns.within(remove_current).unwrap();
            assert_removed(&ns);
            ns.within(remove_current).unwrap();
            assert_removed(&ns);
        }

        #[test]
        fn root_remove_in_a_fresh_netns_succeeds() {
            let ns = TestNetns::new();
            ns.within(remove_current).unwrap();
            assert_removed(&ns);
        }

        #[test]
        fn root_installed_notices_missing_and_foreign_pieces() {
            let ns = TestNetns::new();
            ns.within(install_current).unwrap();
            ns.ip(&["rule", "del", "pref", "32763"]);
            assert!(!ns.within(installed_current).unwrap());
            ns.within(install_current).unwrap();
            assert!(ns.within(installed_current).unwrap());

            ns.ip(&[
                "-6", "route", "del", "local", "default", "dev", "lo", "table", "100",
            ]);
            assert!(!ns.within(installed_current).unwrap());
            ns.within(install_current).unwrap();
            assert!(ns.within(installed_current).unwrap());

            ns.set_sysctl("net.ipv4.tcp_fwmark_accept=0");
            assert!(!ns.within(installed_current).unwrap());
            ns.within(install_current).unwrap();

            // A look-alike with an extra selector at our pref is not ours: installed says no,
            // install adds the real one next to it.
            ns.ip(&["rule", "del", "pref", "32763"]);
            ns.ip(&[
                "rule",
                "add",
                "fwmark",
                "0x1000/0x1000",
                "iif",
                "eth9",
                "lookup",
                "100",
                "pref",
                "32763",
            ]);
            assert!(!ns.within(installed_current).unwrap());
            ns.within(install_current).unwrap();
            assert!(ns.within(installed_current).unwrap());
            let (v4, _) = ns.rules();
            assert_eq!(v4.matches("32763:").count(), 2, "{v4}");
        }

        #[test]
        fn root_ipv6_disabled_on_lo_installs_ipv4_only() {
            let ns = TestNetns::new();
            ns.set_sysctl("net.ipv6.conf.lo.disable_ipv6=1");
            ns.within(install_current).unwrap();
            let (v4, v6) = ns.rules();
            assert!(v4.contains(RULE), "{v4}");
            assert!(!v6.contains("32763"), "{v6}");
            assert!(ns.routes().0.contains("local default dev lo"));
            assert!(ns.within(installed_current).unwrap());
            ns.within(install_current).unwrap();
            ns.within(remove_current).unwrap();
            ns.within(remove_current).unwrap();
            assert!(!ns.rules().0.contains("32763"));
            assert!(ns.routes().0.trim().is_empty());
        }

        #[test]
        fn root_ipv6_disabled_after_install_still_removes() {
            let ns = TestNetns::new();
            ns.within(install_current).unwrap();
            // Disabling IPv6 on lo flushes the route via lo, but not the rule.
            ns.set_sysctl("net.ipv6.conf.lo.disable_ipv6=1");
            ns.within(remove_current).unwrap();
            let (v4, v6) = ns.rules();
            assert!(!v4.contains("32763"), "{v4}");
            assert!(!v6.contains("32763"), "{v6}");
        }

        /// The module's premise: /proc/sys/net resolves to the netns of the thread that opens
        /// the file, not the process's, so other threads are unaffected.
        #[test]
        fn root_proc_sys_net_follows_the_calling_thread() {
            let ns = TestNetns::new();
            let path = "/proc/sys/net/ipv4/ip_default_ttl";
            let host = read_sysctl(path).unwrap();
            let ours = if host == "77" { "78" } else { "77" };
            ns.set_sysctl(&format!("net.ipv4.ip_default_ttl={ours}"));
            // A thread that is already running in the host netns while another thread is
            // inside. (A thread spawned from inside would start inside: threads inherit the
            // creating thread's netns, not the process's.)
            let (ask, asked) = std::sync::mpsc::channel::<()>();
            let (tell, told) = std::sync::mpsc::channel::<String>();
            let (inside, sibling, spawned) = std::thread::scope(|s| {
                s.spawn(move || {
                    while asked.recv().is_ok() {
                        let _ = tell.send(read_sysctl(path).unwrap());
                    }
                });
                ns.within(move || {
                    let inside = read_sysctl(path).unwrap();
                    ask.send(()).unwrap();
                    let sibling = told.recv().unwrap();
                    let spawned = std::thread::scope(|s| {
                        s.spawn(|| read_sysctl(path).unwrap()).join().unwrap()
                    });
                    drop(ask);
                    (inside, sibling, spawned)
                })
            });
            assert_eq!(spawned, ours, "a thread spawned inside starts inside");
            assert_eq!(inside, ours);
            assert_eq!(sibling, host);
            assert_eq!(read_sysctl(path).unwrap(), host);
            // And writes land in the netns too.
            ns.within(|| write_sysctl(path, b"99\n")).unwrap();
            assert_eq!(ns.sysctl("net.ipv4.ip_default_ttl"), "99");
            assert_eq!(read_sysctl(path).unwrap(), host);
        }

        #[test]
        fn root_host_is_untouched() {
            require_root();
            let host = || {
                (
                    read_sysctl(TCP_FWMARK_ACCEPT).unwrap(),
                    read_sysctl(FWMARK_REFLECT_V4).unwrap(),
                    read_sysctl(FWMARK_REFLECT_V6).ok(),
                    run("ip", &["rule", "show"]),
                    run("ip", &["-6", "rule", "show"]),
                    table_100(&[]),
                    table_100(&["-6"]),
                )
            };
            let before = host();
            let ns = TestNetns::new();
            ns.within(install_current).unwrap();
            assert_installed(&ns);
            assert_eq!(host(), before, "installing in a pod netns changed the host");
            ns.within(remove_current).unwrap();
            assert_eq!(host(), before, "removing in a pod netns changed the host");
        }
    }
}
