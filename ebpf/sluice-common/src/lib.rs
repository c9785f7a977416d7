//! The contract between sluice's eBPF programs and userspace: map names, key and value layouts,
//! verdict codes and well-known ports.
//!
//! Every type here is `#[repr(C)]` with explicit padding and no `bool`/`enum`/`Option`, because the
//! kernel and userspace read the same bytes. Addresses and ports are stored exactly as the kernel
//! hands them to the programs (network byte order words) so the hot path never converts.
#![no_std]

/// The proxy's in-pod outbound listener (all addresses; eBPF capture redirects to the pod's own
/// address, iptables REDIRECT to loopback).
pub const PORT_OUTBOUND: u16 = 15001;
/// The proxy's in-pod inbound listener for plaintext captured connections.
pub const PORT_INBOUND: u16 = 15006;
/// HBONE: never captured inbound, it reaches the proxy's own listener directly.
pub const PORT_HBONE: u16 = 15008;
/// How many ports a pod can exclude from capture in each direction.
pub const MAX_EXCLUDED_PORTS: usize = 8;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const SO_ORIGINAL_DST: i32 = 80;

/// How many captured outbound sockets one pod may have open at once, unless the agent is told
/// otherwise (`--max-outbound-per-pod`): well above what a workload keeps open (each is a live
/// connection), and small enough that 128 pods at their bound, more than a kubelet runs (110 by
/// default), cannot fill the node-wide maps ([`MAX_TRACKED`]). A `connect()` past it fails.
pub const DEFAULT_MAX_TRACKED_PER_POD: u32 = 4096;
/// Node-wide bound on tracked captured outbound sockets (entries of `SLUICE_SOCK_ORIG` and
/// `SLUICE_PEER_ORIG`). The maps are not preallocated: memory follows the live entries, plus
/// 8 MiB of hash buckets each.
pub const MAX_TRACKED: u32 = 524_288;

/// How deep below the cgroup v2 root a pod's cgroup may sit (Kubernetes puts it at level 2 or
/// 3, e.g. `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`).
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// The source address the node's own connections to captured pods carry (kubelet's probes,
/// hostNetwork pods): Istio ambient's `169.254.7.127`. Inbound capture lets connections from it
/// through to the app, as Istio's in-pod rules do. With eBPF the node binds such sockets to it
/// (`bind_node_probe4`, the address is on the node's `lo`); with iptables the node SNATs to it.
pub const PROBE_SOURCE_V4: [u8; 4] = [169, 254, 7, 127];
/// The IPv6 counterpart Istio uses, `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`.
pub const PROBE_SOURCE_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];
/// Bound on the proxy's in-flight dials to apps with a client's source (`SLUICE_PROXY_DIALS`);
/// the proxy dials without the client's address when it is full.
pub const MAX_PROXY_DIALS: u32 = 65_536;

/// Map names, shared so the loader can find and pin them.
pub mod maps {
    /// `AddrKey` → `PodKey`: which enrolled pod owns an address. Written only by the loader,
    /// from addresses the node assigned (the CNI result or the pod's status), each with exactly
    /// one owner. Outbound capture reads it to leave a pod's connections to itself alone and to
    /// refuse sockets bound to an address the pod does not own.
    pub const POD_ADDRS: &str = "SLUICE_POD_ADDRS";
    /// `PodKey` → `PodConfig`: per-pod capture exclusions and redirect addresses.
    pub const POD_CONFIG: &str = "SLUICE_POD_CONFIG";
    /// `CgroupKey` → `PodKey`: which pod a cgroup belongs to, for the outbound hooks (they find
    /// the pod from the calling task's cgroup ancestry).
    pub const POD_CGROUPS: &str = "SLUICE_POD_CGROUPS";
    /// `PodKey` → the proxy's inbound (15006) listener inside that pod (a SOCKHASH). The proxy
    /// registers itself here; an empty slot makes inbound capture refuse connections.
    pub const PROXY_INBOUND: &str = "SLUICE_PROXY_INBOUND";
    /// socket cookie → `SockOrig`, written by connect4/6 for the app's socket, removed when
    /// the socket is released (`forget_socket`). Counted against the pod's bound.
    pub const SOCK_ORIG: &str = "SLUICE_SOCK_ORIG";
    /// `PairKey` (client side of the redirected connection) → `PeerOrig`, written by sockops
    /// only for a socket whose local address its own pod owns, read by the proxy's
    /// `SO_ORIGINAL_DST` emulation, removed by sockops when the connection closes.
    pub const PEER_ORIG: &str = "SLUICE_PEER_ORIG";
    /// `PodKey` → `u64`: how many `SOCK_ORIG` entries the pod has (its bound is
    /// `PodConfig::max_tracked`). Created by the loader at enrolment.
    pub const POD_TRACKED: &str = "SLUICE_POD_TRACKED";
    /// Index 0 → `PodKey`: the one pod a `steer_inbound` instance serves. Not pinned: each load
    /// of the object makes its own, written by the loader before the instance is attached
    /// (sk_lookup has no helper that names the netns it runs in).
    pub const POD_SELF: &str = "SLUICE_POD_SELF";
    /// Per-CPU `u64` counters indexed by [`super::Verdict`].
    pub const VERDICTS: &str = "SLUICE_VERDICTS";
    /// `PodUid` → `PodState`: userspace-only bookkeeping of enrolled pods, pinned with the rest
    /// so a restarted agent can clean up what an earlier one enrolled.
    pub const PODS: &str = "SLUICE_PODS";
    /// `DialKey` → `u64` deadline (`CLOCK_MONOTONIC` ns): the proxy's connections to an app that
    /// carry the client's address as source (`IP_TRANSPARENT`), written by the proxy just before
    /// `connect()` and removed once it returns (void past the deadline in any case). `steer_inbound` lets exactly these SYNs through to the app; any
    /// other SYN with a foreign source is captured. No pod can write it.
    pub const PROXY_DIALS: &str = "SLUICE_PROXY_DIALS";
    /// Index 0 → the node's netns cookie, learnt by `bind_node_probe4` from the agent's own
    /// socket (userspace cannot read a netns cookie before Linux 5.14). 0 until learnt.
    pub const NODE_NETNS: &str = "SLUICE_NODE_NETNS";
    /// socket cookie → netns cookie: the agent files one of its own sockets' cookie here and
    /// connects it; `bind_node_probe4` fills in the netns cookie it ran in.
    pub const NODE_LEARN: &str = "SLUICE_NODE_LEARN";
}

/// Program names in the object, shared so the loader can find them.
pub mod programs {
    pub const STEER_INBOUND: &str = "steer_inbound";
    pub const CONNECT4: &str = "redirect_connect4";
    pub const CONNECT6: &str = "redirect_connect6";
    pub const SOCKOPS: &str = "record_client_pair";
    pub const GETPEERNAME4: &str = "restore_peer4";
    pub const GETPEERNAME6: &str = "restore_peer6";
    pub const GETSOCKOPT: &str = "original_dst";
    pub const SOCK_RELEASE: &str = "forget_socket";
    pub const NODE_PROBE4: &str = "bind_node_probe4";
    pub const NODE_PROBE6: &str = "bind_node_probe6";
}

/// Identifies one pod in every per-pod map: the inode number of its network namespace.
///
/// Why not the netns cookie: userspace can read a cookie only from Linux 5.14
/// (`SO_NETNS_COOKIE`) and sockops/sockopt programs only from 5.15, while the inode is known to
/// the loader (`stat` of the netns path) and to the proxy (`SIOCGSKNS` on its listener) on every
/// kernel. No program needs to compute it: sk_lookup maps the destination address to the pod,
/// the outbound hooks map the calling task's cgroup to it. An inode is unique among live
/// namespaces but can be reused once one is freed, so a pod's entries are removed with the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodKey {
    pub netns_ino: u64,
}

/// A cgroup v2 id (the inode number of its directory), as `bpf_get_current_cgroup_id` and
/// `bpf_get_current_ancestor_cgroup_id` return it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CgroupKey {
    pub id: u64,
}

/// An IPv4 or IPv6 address as the kernel presents it: `addr[0]` holds an IPv4 address, the rest is
/// zero. IPv4-mapped IPv6 addresses are stored as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    pub family: u32,
    pub addr: [u32; 4],
}

/// Capture settings of one pod. A zero port is an unused slot; a zero address is none.
///
/// Outbound connections are redirected to the proxy's 15001 listener on the pod's *own*
/// address (`redirect_ip4`/`redirect_ip6`), not on loopback: the client end then carries an
/// address no other pod on the node has, so the proxy's peer (ip, port) alone identifies the
/// connection, with no netns id in the key (which older kernels cannot give the programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodConfig {
    pub exclude_inbound_ports: [u16; MAX_EXCLUDED_PORTS],
    pub exclude_outbound_ports: [u16; MAX_EXCLUDED_PORTS],
    /// Network byte order words, as in [`AddrKey`].
    pub redirect_ip6: [u32; 4],
    pub redirect_ip4: u32,
    /// How many captured outbound sockets the pod may have at once (`SOCK_ORIG` entries);
    /// `connect()` beyond is refused, so one pod cannot fill the node-wide maps.
    pub max_tracked: u32,
}

/// Longest pod uid the pinned state can hold (Kubernetes uids are 36-byte UUIDs).
pub const MAX_UID_LEN: usize = 63;

/// A pod uid as a fixed-size, zero-padded map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodUidKey {
    pub bytes: [u8; MAX_UID_LEN + 1],
}

/// What the loader remembers about an enrolled pod. `cgroup_id` is 0 for a pod enrolled
/// without a cgroup (inbound capture only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodState {
    pub netns_ino: u64,
    pub cgroup_id: u64,
}

/// Where a captured outbound connection was going. `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// What connect4/6 remembers of a captured socket: where it was going and which pod (found
/// from the calling task's cgroup) made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockOrig {
    pub orig: OrigDst,
    pub pod: PodKey,
}

/// The original destination filed under a connection's client end, with the cookie of the
/// client socket that filed it (so only that socket's close removes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerOrig {
    pub orig: OrigDst,
    pub cookie: u64,
}

/// The client end of a redirected connection: what the proxy sees as the peer of the socket it
/// accepted on 15001. Unique on the node because the client's address is its pod's own (see
/// [`PodConfig`]) and sockops files an entry only for an address the socket's pod owns (so no
/// pod can file one under another pod's address). `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PairKey {
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// A connection the proxy is about to make, inside pod `pod`'s netns, from the client's address
/// `remote`:`remote_port` to the app at `local`:`local_port` (named as the app's side sees it,
/// which is how sk_lookup sees the SYN). Ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DialKey {
    pub pod: PodKey,
    pub remote: AddrKey,
    pub local: AddrKey,
    pub remote_port: u16,
    pub local_port: u16,
    pub _pad: u32,
}

/// Verdict codes: indexes into the `VERDICTS` counters. The numbers are stable (exported as
/// metrics and shown by `cargo xtask load --status`): only ever append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Verdict {
    /// Inbound SYN assigned to the proxy's 15006 socket.
    InboundSteered = 0,
    /// Inbound to 15008 or an excluded port: left to the pod's own listener.
    InboundPassPort = 1,
    /// Inbound made inside the pod (source = destination address, or loopback): the proxy's
    /// own dial to the app, or the app connecting to itself.
    InboundPassLocal = 2,
    /// An `steer_inbound` instance loaded without a pod (never attached by the loader).
    InboundPassNotPod = 3,
    /// Inbound for an enrolled pod whose proxy socket is missing: refused (fail closed).
    InboundDropNoProxy = 4,
    /// `bpf_sk_assign` failed: refused (fail closed).
    InboundDropAssign = 5,
    /// Outbound `connect()` rewritten to the proxy's 15001 listener.
    OutboundRedirected = 6,
    /// Outbound to loopback: not captured.
    OutboundPassLoopback = 7,
    /// Outbound to one of the pod's own addresses: not captured.
    OutboundPassOwnAddr = 8,
    /// Outbound to an excluded port: not captured.
    OutboundPassPort = 9,
    /// The original destination could not be recorded; the connection still goes to the proxy,
    /// which then refuses it (fail closed).
    OutboundRecordFailed = 10,
    /// `SO_ORIGINAL_DST` answered for the proxy.
    OrigDstFound = 11,
    /// `SO_ORIGINAL_DST` asked for a connection sluice did not redirect.
    OrigDstMiss = 12,
    /// `getpeername()` of a redirected socket answered with the original destination.
    PeerRestored = 13,
    /// Outbound `connect()` refused: the calling cgroup maps to no enrolled pod, or the pod has
    /// no address of the connection's family to redirect to (fail closed).
    OutboundDropNoPod = 14,
    /// Outbound `connect()` refused: the pod already has `max_tracked` captured sockets open.
    OutboundDropQuota = 15,
    /// A captured socket's local address is not one its pod owns (a spoofed source, e.g. with
    /// `IP_TRANSPARENT`): no original destination is filed, so the proxy refuses it.
    OutboundSpoofRefused = 16,
    /// Inbound lookup that is not TCP (ambient captures TCP only).
    InboundPassNotTcp = 17,
    /// Inbound SYN of the proxy's own connection to the app carrying the client's source
    /// address (registered in `PROXY_DIALS`): passed to the app.
    InboundPassProxyDial = 18,
    /// Inbound from the node's own probe address (`PROBE_SOURCE_V4`/`_V6`): kubelet's probes,
    /// passed to the app uncaptured as Istio does.
    InboundPassNodeProbe = 19,
    /// A node socket's connect to a captured pod was bound to the probe source address.
    NodeProbeBound = 20,
    /// Binding a node socket to the probe source failed (already bound, or the address is
    /// missing from the node): the connection goes on from its own address and is captured.
    NodeProbeBindFailed = 21,
}

impl Verdict {
    pub const COUNT: u32 = 22;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::InboundSteered,
        Verdict::InboundPassPort,
        Verdict::InboundPassLocal,
        Verdict::InboundPassNotPod,
        Verdict::InboundDropNoProxy,
        Verdict::InboundDropAssign,
        Verdict::OutboundRedirected,
        Verdict::OutboundPassLoopback,
        Verdict::OutboundPassOwnAddr,
        Verdict::OutboundPassPort,
        Verdict::OutboundRecordFailed,
        Verdict::OrigDstFound,
        Verdict::OrigDstMiss,
        Verdict::PeerRestored,
        Verdict::OutboundDropNoPod,
        Verdict::OutboundDropQuota,
        Verdict::OutboundSpoofRefused,
        Verdict::InboundPassNotTcp,
        Verdict::InboundPassProxyDial,
        Verdict::InboundPassNodeProbe,
        Verdict::NodeProbeBound,
        Verdict::NodeProbeBindFailed,
    ];

    /// A stable snake_case name for metrics and status output.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::InboundSteered => "inbound_steered",
            Verdict::InboundPassPort => "inbound_pass_port",
            Verdict::InboundPassLocal => "inbound_pass_local",
            Verdict::InboundPassNotPod => "inbound_pass_not_pod",
            Verdict::InboundDropNoProxy => "inbound_drop_no_proxy",
            Verdict::InboundDropAssign => "inbound_drop_assign",
            Verdict::OutboundRedirected => "outbound_redirected",
            Verdict::OutboundPassLoopback => "outbound_pass_loopback",
            Verdict::OutboundPassOwnAddr => "outbound_pass_own_addr",
            Verdict::OutboundPassPort => "outbound_pass_port",
            Verdict::OutboundRecordFailed => "outbound_record_failed",
            Verdict::OrigDstFound => "orig_dst_found",
            Verdict::OrigDstMiss => "orig_dst_miss",
            Verdict::PeerRestored => "peer_restored",
            Verdict::OutboundDropNoPod => "outbound_drop_no_pod",
            Verdict::OutboundDropQuota => "outbound_drop_quota",
            Verdict::OutboundSpoofRefused => "outbound_spoof_refused",
            Verdict::InboundPassNotTcp => "inbound_pass_not_tcp",
            Verdict::InboundPassProxyDial => "inbound_pass_proxy_dial",
            Verdict::InboundPassNodeProbe => "inbound_pass_node_probe",
            Verdict::NodeProbeBound => "node_probe_bound",
            Verdict::NodeProbeBindFailed => "node_probe_bind_failed",
        }
    }
}

impl PodConfig {
    pub fn excludes_inbound(&self, port: u16) -> bool {
        port != 0 && self.exclude_inbound_ports.contains(&port)
    }

    pub fn excludes_outbound(&self, port: u16) -> bool {
        port != 0 && self.exclude_outbound_ports.contains(&port)
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{
        AddrKey, CgroupKey, DialKey, OrigDst, PairKey, PeerOrig, PodConfig, PodKey, PodState,
        PodUidKey, SockOrig,
    };

    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays, with no implicit
    // padding (fields are ordered and sized so every offset is naturally aligned), so every bit
    // pattern is valid and no uninitialised byte is ever exposed.
    unsafe impl aya::Pod for PodKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CgroupKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PairKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodUidKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockOrig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerOrig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DialKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<PodKey>(), 8);
        assert_eq!(core::mem::size_of::<AddrKey>(), 20);
        assert_eq!(core::mem::size_of::<CgroupKey>(), 8);
        assert_eq!(core::mem::size_of::<PodConfig>(), 56);
        assert_eq!(core::mem::size_of::<PodState>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 24);
        assert_eq!(core::mem::size_of::<PairKey>(), 24);
        assert_eq!(core::mem::size_of::<SockOrig>(), 32);
        assert_eq!(core::mem::size_of::<PeerOrig>(), 32);
        assert_eq!(core::mem::size_of::<DialKey>(), 56);
    }

    #[test]
    fn verdict_codes_are_dense_and_stable() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as u32, i as u32, "{} is out of place", v.name());
        }
        assert_eq!(Verdict::PeerRestored as u32, 13);
        assert_eq!(Verdict::OutboundDropNoPod as u32, 14);
        assert_eq!(Verdict::InboundPassNotTcp as u32, 17);
        assert_eq!(Verdict::NodeProbeBindFailed as u32, 21);
    }

    #[test]
    fn zero_is_never_an_excluded_port() {
        let cfg = PodConfig::default();
        assert!(!cfg.excludes_inbound(0));
        let mut cfg = PodConfig::default();
        cfg.exclude_outbound_ports[0] = 5432;
        assert!(cfg.excludes_outbound(5432));
        assert!(!cfg.excludes_inbound(5432));
    }
}
