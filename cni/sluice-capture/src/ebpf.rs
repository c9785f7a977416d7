//! The eBPF backend: loads sluice's object once, attaches its programs per pod and pins every
//! link and map under one directory on bpffs, so capture outlives the process that set it up.
//!
//! Pin layout under the root (default `/sys/fs/bpf/sluice`):
//! - `maps/SLUICE_*`: every map, shared by all pods and by every instance of the loader;
//! - `pods/<uid>/<program>`: one link per attached program of an enrolled pod;
//! - `proxy/original_dst`: the `SO_ORIGINAL_DST` emulation on the proxy's cgroup;
//! - `node/bind_node_probe4`, `node/bind_node_probe6`: the node's probe source, on the node's
//!   cgroup (normally the cgroup v2 root).
//!
//! Architecture invariant: a pod is enrolled exactly when `SLUICE_PODS` has its uid; its links,
//! address and config entries are created after that entry and removed before it, so a crash
//! in between leaves a record that the next `remove` or `enroll` cleans up.
//!
//! Isolation: the cgroup programs are one shared instance (they find the pod from the calling
//! task's cgroup), but `steer_inbound` is loaded once per pod with the pod's key in its own
//! `SLUICE_POD_SELF` map, so it steers by the netns it runs in and never by an address a pod
//! could claim. Every address has one owner: the loader refuses an address another enrolled
//! pod holds.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::Program;
use aya::{Ebpf, EbpfLoader};
use sluice_common::{
    AddrKey, CgroupKey, DialKey, PairKey, PeerOrig, PodConfig, PodKey, PodState, PodUidKey,
    SockOrig, Verdict, maps, programs,
};
use tracing::{debug, info, warn};

use crate::netns::Netns;
use crate::sys::{self, AttachType};
use crate::{Backend, CaptureError, PodCapture, PodUid, Redirector};

pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Marks a pin root laid out by this version of the programs and maps (a directory: bpffs holds
/// no regular files). Bump it when a map's definition or a program's contract changes: pins
/// from an earlier layout are refused, never mixed with new programs.
const LAYOUT: &str = "layout-3";

/// Where a program attaches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Netns,
    PodCgroup,
}

/// The per-pod programs, in attach order: inbound first, then outbound (connect last, so the
/// helpers that restore the peer, record the pair and forget released sockets are in place
/// before any redirect).
const POD_PROGRAMS: [(&str, AttachType, Target); 7] = [
    (programs::STEER_INBOUND, AttachType::SkLookup, Target::Netns),
    (
        programs::GETPEERNAME4,
        AttachType::Inet4GetPeerName,
        Target::PodCgroup,
    ),
    (
        programs::GETPEERNAME6,
        AttachType::Inet6GetPeerName,
        Target::PodCgroup,
    ),
    (programs::SOCKOPS, AttachType::SockOps, Target::PodCgroup),
    (
        programs::SOCK_RELEASE,
        AttachType::SockRelease,
        Target::PodCgroup,
    ),
    (
        programs::CONNECT4,
        AttachType::Inet4Connect,
        Target::PodCgroup,
    ),
    (
        programs::CONNECT6,
        AttachType::Inet6Connect,
        Target::PodCgroup,
    ),
];

/// How many links a pod captured with a cgroup has, once its capture is complete.
pub const POD_LINKS: usize = POD_PROGRAMS.len();

/// The loaded object plus the pin directory it manages.
pub struct EbpfCapture {
    ebpf: Ebpf,
    root: PathBuf,
    /// Loads each pod's own `steer_inbound` instance. Kept, because making a loader parses the
    /// kernel's BTF (about 20 ms, most of a pod's capture time otherwise).
    instances: Box<EbpfLoader<'static>>,
}

/// One enrolled pod as recorded in the pins.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EnrolledPod {
    pub uid: String,
    pub netns_ino: u64,
    /// 0 when enrolled without a cgroup (inbound capture only).
    pub cgroup_id: u64,
    pub addrs: Vec<IpAddr>,
    /// Names of the programs whose links are pinned for this pod.
    pub links: Vec<String>,
    /// Captured outbound sockets of the pod the programs track now (its bound is
    /// `PodCapture::max_tracked_sockets`).
    pub tracked_sockets: u64,
}

impl EbpfCapture {
    /// Loads the object, reusing maps already pinned under `root` (so a restarted agent adopts
    /// the pods an earlier one enrolled) or creating and pinning them.
    pub fn load(root: impl Into<PathBuf>) -> Result<Self, CaptureError> {
        let root = root.into();
        if !crate::kernel::supported() {
            return Err(CaptureError::Unsupported {
                feature: "eBPF capture (sk_lookup, netns and cgroup BPF links)",
                since: "5.10",
                kernel: crate::kernel::release(),
            });
        }
        ensure_bpffs(&root)?;
        check_layout(&root)?;
        for dir in ["maps", "pods", "proxy", "node", LAYOUT] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir)
                .map_err(|source| CaptureError::Pin { path: dir, source })?;
        }
        sys::raise_memlock_limit();
        let mut instances = Box::new(EbpfLoader::new());
        instances.default_map_pin_directory(root.join("maps"));
        let mut ebpf = instances.load(OBJECT)?;
        for (name, _, _) in POD_PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        load_program(&mut ebpf, programs::GETSOCKOPT)?;
        load_program(&mut ebpf, programs::NODE_PROBE4)?;
        load_program(&mut ebpf, programs::NODE_PROBE6)?;
        info!(root = %root.display(), "ebpf capture loaded");
        Ok(Self {
            ebpf,
            root,
            instances,
        })
    }

    /// Attaches the `SO_ORIGINAL_DST` emulation to the proxy's cgroup. The proxy must join that
    /// cgroup before it creates its listeners: a socket's cgroup is fixed when it is created.
    pub fn attach_proxy(&mut self, cgroup: &Path) -> Result<(), CaptureError> {
        let dir = open_cgroup(cgroup)?;
        let link = self.link(programs::GETSOCKOPT, AttachType::GetSockopt, &dir, cgroup)?;
        let pin = self.root.join("proxy").join(programs::GETSOCKOPT);
        // Attach the new link before dropping an old one, so there is no moment without it.
        unpin_link(&pin)?;
        sys::obj_pin(link.as_fd(), &pin)
            .map_err(|source| CaptureError::Pin { path: pin, source })?;
        info!(cgroup = %cgroup.display(), "original-destination emulation attached to the proxy cgroup");
        Ok(())
    }

    /// Removes the proxy's `SO_ORIGINAL_DST` emulation.
    pub fn detach_proxy(&mut self) -> Result<(), CaptureError> {
        unpin_link(&self.root.join("proxy").join(programs::GETSOCKOPT))
    }

    /// Makes the node's own connections to captured pods (kubelet's probes, hostNetwork pods)
    /// leave from Istio's probe address, which inbound capture lets through to the app: attaches
    /// `bind_node_probe4/6` to `cgroup` (the cgroup v2 root on a real node: kubelet and
    /// hostNetwork pods may sit anywhere below it) and teaches them `node`, the netns whose
    /// sockets they bind. The caller must be below that cgroup (the agent is: every process is
    /// below the root). The probe addresses must be on the node
    /// (`node::ensure_probe_addresses`), or the binds fail and probes are captured.
    /// Returns the node's netns cookie.
    pub fn attach_node(&mut self, cgroup: &Path, node: &Netns) -> Result<u64, CaptureError> {
        let dir = open_cgroup(cgroup)?;
        for (program, attach) in [
            (programs::NODE_PROBE4, AttachType::Inet4Connect),
            (programs::NODE_PROBE6, AttachType::Inet6Connect),
        ] {
            let link = self.link(program, attach, &dir, cgroup)?;
            let pin = self.root.join("node").join(program);
            unpin_link(&pin)?;
            sys::obj_pin(link.as_fd(), &pin)
                .map_err(|source| CaptureError::Pin { path: pin, source })?;
        }
        let cookie = self.learn_node_netns(cgroup, node)?;
        info!(cgroup = %cgroup.display(), netns_cookie = cookie, "node probes leave from the probe address");
        Ok(cookie)
    }

    /// Removes the node probe programs (the node's connections to pods are then captured).
    pub fn detach_node(&mut self) -> Result<(), CaptureError> {
        for program in [programs::NODE_PROBE4, programs::NODE_PROBE6] {
            unpin_link(&self.root.join("node").join(program))?;
        }
        Ok(())
    }

    /// The node's netns cookie as the programs know it, learning it first if they do not yet:
    /// one of the caller's own sockets is filed in `NODE_LEARN` and connected, and the program
    /// writes back the netns cookie it ran in (userspace cannot read one before Linux 5.14).
    fn learn_node_netns(&mut self, cgroup: &Path, node: &Netns) -> Result<u64, CaptureError> {
        // Learnt again on every attach (a node netns given wrongly once must not stick): the
        // programs answer the learning socket only while they know no node. Binding stops for
        // the moment this takes (well under a millisecond); a probe then is captured like any
        // connection, and kubelet tries again.
        {
            let mut netns: aya::maps::Array<&mut MapData, u64> = self.typed(maps::NODE_NETNS)?;
            netns.set(0, 0, 0).map_err(map_err(maps::NODE_NETNS))?;
        }
        {
            // Leftovers of a learner that died between filing and removing its socket.
            let mut learn: HashMap<&mut MapData, u64, u64> = self.hash(maps::NODE_LEARN)?;
            let stale: Vec<u64> = learn.keys().filter_map(Result::ok).collect();
            for cookie in stale {
                ignore_missing(learn.remove(&cookie), maps::NODE_LEARN)?;
            }
        }
        let in_node = |what: &'static str| {
            move |source| CaptureError::InNetns {
                what,
                netns: node.path().to_path_buf(),
                source,
            }
        };
        // Created in the node's netns (a socket's netns is fixed at creation), then used here.
        let socket = node
            .run(|| std::net::UdpSocket::bind("127.0.0.1:0"))
            .and_then(|s| s)
            .map_err(in_node("open a socket to learn the node's netns"))?;
        let cookie = sys::socket_cookie(socket.as_fd())
            .map_err(in_node("read the learning socket's cookie (SO_COOKIE)"))?;
        {
            let mut learn: HashMap<&mut MapData, u64, u64> = self.hash(maps::NODE_LEARN)?;
            learn
                .insert(cookie, 0, 0)
                .map_err(map_err(maps::NODE_LEARN))?;
        }
        // A UDP connect sends nothing; it only runs the connect hooks.
        let connected = socket.connect("127.0.0.1:9");
        let learnt = {
            let mut learn: HashMap<&mut MapData, u64, u64> = self.hash(maps::NODE_LEARN)?;
            let value = learn.get(&cookie, 0).unwrap_or(0);
            let _ = learn.remove(&cookie);
            value
        };
        connected.map_err(in_node("connect the learning socket"))?;
        if learnt == 0 {
            return Err(CaptureError::NodeNetns {
                cgroup: cgroup.to_path_buf(),
            });
        }
        let mut netns: aya::maps::Array<&mut MapData, u64> = self.typed(maps::NODE_NETNS)?;
        netns.set(0, learnt, 0).map_err(map_err(maps::NODE_NETNS))?;
        Ok(learnt)
    }

    /// The pods enrolled under this pin root.
    pub fn pods(&self) -> Result<Vec<EnrolledPod>, CaptureError> {
        list_pods(&self.root)
    }

    /// Runs `steer_inbound` once, through `BPF_PROG_TEST_RUN` (Linux 5.14), as the instance
    /// of enrolled pod `uid` would, on a synthetic TCP SYN from `src` to `dst`, against the live
    /// maps: what would inbound capture in that pod's netns do with it? Counts in the verdict
    /// counters like real traffic.
    pub fn simulate_inbound(
        &mut self,
        uid: &PodUid,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<InboundDecision, CaptureError> {
        let netns_ino = self.state(uid)?.map_or(0, |s| s.netns_ino);
        let instance = self.inbound_instance(netns_ino)?;
        let prog = instance
            .program(programs::STEER_INBOUND)
            .ok_or(CaptureError::Program {
                program: programs::STEER_INBOUND,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
        let fd = prog.fd().map_err(|source| CaptureError::Program {
            program: programs::STEER_INBOUND,
            source,
        })?;
        let mut ctx = sk_lookup_ctx(src, dst);
        let action = sys::prog_test_run_ctx(fd.as_fd(), &mut ctx).map_err(|source| {
            // Before 5.14 sk_lookup programs have no test_run: the kernel says ENOTSUPP (524).
            if source.raw_os_error() == Some(ENOTSUPP) {
                CaptureError::Unsupported {
                    feature: "BPF_PROG_TEST_RUN of sk_lookup programs",
                    since: "5.14",
                    kernel: crate::kernel::release(),
                }
            } else {
                CaptureError::Attach {
                    program: programs::STEER_INBOUND,
                    target: PathBuf::from("BPF_PROG_TEST_RUN"),
                    source,
                }
            }
        })?;
        let cookie = u64::from_ne_bytes(ctx[..8].try_into().unwrap_or_default());
        Ok(match (action, cookie) {
            (SK_DROP, _) => InboundDecision::Refused,
            (_, 0) => InboundDecision::Passed,
            (_, socket_cookie) => InboundDecision::Steered { socket_cookie },
        })
    }

    fn enroll_pod(&mut self, pod: &PodCapture) -> Result<(), CaptureError> {
        let netns = Netns::open(&pod.netns).map_err(|source| CaptureError::Netns {
            path: pod.netns.clone(),
            source,
        })?;
        let in_netns = |what, source| CaptureError::InNetns {
            what,
            netns: pod.netns.clone(),
            source,
        };
        let netns_ino = netns.inode().map_err(|e| in_netns("stat the netns", e))?;
        if pod.addrs.is_empty() {
            return Err(CaptureError::NoAddresses {
                uid: pod.uid.to_string(),
            });
        }
        let addrs = pod.addrs.clone();
        let mut config = pod.config()?;
        set_redirect_addrs(&mut config, &addrs);
        let cgroup = pod
            .cgroup
            .as_deref()
            .map(|p| open_cgroup(p).map(|f| (f, p)))
            .transpose()?;
        let cgroup_id = match &cgroup {
            Some((file, path)) => file
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(|source| CaptureError::Cgroup {
                    path: path.to_path_buf(),
                    source,
                })?,
            None => 0,
        };

        if let Some(prev) = self.state(&pod.uid)?
            && (prev.netns_ino != netns_ino || prev.cgroup_id != cgroup_id)
        {
            // Same uid, new sandbox (the runtime recreated the pod's netns or cgroup): start over.
            self.remove_uid(&pod.uid)?;
        }
        let key = PodKey { netns_ino };
        // Refuse before writing anything: an address already held by another pod stays its.
        self.check_owners(&pod.uid, key, &addrs)?;
        // Map entries before links: a program never runs for the pod without its entries.
        self.hash::<PodUidKey, PodState>(maps::PODS)?
            .insert(
                pod.uid.key(),
                PodState {
                    netns_ino,
                    cgroup_id,
                },
                0,
            )
            .map_err(map_err(maps::PODS))?;
        self.hash(maps::POD_CONFIG)?
            .insert(key, config, 0)
            .map_err(map_err(maps::POD_CONFIG))?;
        if cgroup_id != 0 {
            self.hash(maps::POD_CGROUPS)?
                .insert(CgroupKey { id: cgroup_id }, key, 0)
                .map_err(map_err(maps::POD_CGROUPS))?;
        }
        self.set_addrs(key, &addrs)?;
        // The pod's count of tracked sockets; kept (not reset) when an enrolled pod is
        // enrolled again, since its sockets' entries are still there.
        match self
            .hash::<PodKey, u64>(maps::POD_TRACKED)?
            .insert(key, 0, BPF_NOEXIST)
        {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(CaptureError::Map {
                    map: maps::POD_TRACKED,
                    source,
                });
            }
        }

        // The app's replies to the proxy's dials from a client's address come back to the proxy
        // (`reply.rs`); in place before inbound is steered, so the first dial already works.
        netns
            .run(crate::reply::install_current)
            .map_err(|e| in_netns("enter the netns for reply routing", e))??;

        let dir = self.pod_dir(&pod.uid);
        std::fs::create_dir_all(&dir).map_err(|source| CaptureError::Pin {
            path: dir.clone(),
            source,
        })?;
        for (name, attach, target) in POD_PROGRAMS {
            let pin = dir.join(name);
            if pin.exists() {
                continue;
            }
            let link = match (target, &cgroup) {
                (Target::Netns, _) => {
                    // This pod's own instance, which knows the netns it is attached to.
                    let instance = self.inbound_instance(netns_ino)?;
                    link_program(&instance, name, attach, &netns, &pod.netns)?
                }
                (Target::PodCgroup, Some((file, path))) => self.link(name, attach, file, path)?,
                (Target::PodCgroup, None) => continue,
            };
            sys::obj_pin(link.as_fd(), &pin)
                .map_err(|source| CaptureError::Pin { path: pin, source })?;
        }
        if cgroup.is_none() {
            warn!(pod = %pod.uid, "no cgroup given: only inbound traffic is captured");
        }
        info!(pod = %pod.uid, netns_ino, cgroup_id, addrs = ?addrs, "pod captured (ebpf)");
        Ok(())
    }

    /// Removes everything recorded for `uid`: links first (capture stops), then map entries.
    fn remove_uid(&mut self, uid: &PodUid) -> Result<(), CaptureError> {
        let dir = self.pod_dir(uid);
        if dir.exists() {
            let entries = std::fs::read_dir(&dir).map_err(|source| CaptureError::Pin {
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                unpin_link(&entry.path())?;
            }
            std::fs::remove_dir(&dir).map_err(|source| CaptureError::Pin {
                path: dir.clone(),
                source,
            })?;
        }
        if let Some(state) = self.state(uid)? {
            let key = PodKey {
                netns_ino: state.netns_ino,
            };
            let owned = self.owned_addrs(key)?;
            self.forget_tracked(key, &owned)?;
            self.set_addrs(key, &[])?;
            if state.cgroup_id != 0 {
                ignore_missing(
                    self.hash::<CgroupKey, PodKey>(maps::POD_CGROUPS)?
                        .remove(&CgroupKey {
                            id: state.cgroup_id,
                        }),
                    maps::POD_CGROUPS,
                )?;
            }
            ignore_missing(
                self.hash::<PodKey, sluice_common::PodConfig>(maps::POD_CONFIG)?
                    .remove(&key),
                maps::POD_CONFIG,
            )?;
            let mut sockets: SockHash<&mut MapData, PodKey> = self.typed(maps::PROXY_INBOUND)?;
            ignore_missing(sockets.remove(&key), maps::PROXY_INBOUND)?;
            ignore_missing(
                self.hash::<PodUidKey, PodState>(maps::PODS)?
                    .remove(&uid.key()),
                maps::PODS,
            )?;
            info!(pod = %uid, "pod released (ebpf)");
        }
        Ok(())
    }

    /// Refuses `addrs` if any is owned by another enrolled pod. An entry whose owner is no
    /// longer enrolled (a crash between steps) is not an owner.
    fn check_owners(
        &mut self,
        uid: &PodUid,
        pod: PodKey,
        addrs: &[IpAddr],
    ) -> Result<(), CaptureError> {
        let owners: Vec<(AddrKey, PodKey)> = {
            let map = self.hash::<AddrKey, PodKey>(maps::POD_ADDRS)?;
            addrs
                .iter()
                .filter_map(|a| {
                    let k = addr_key(*a);
                    map.get(&k, 0).ok().map(|owner| (k, owner))
                })
                .filter(|(_, owner)| *owner != pod)
                .collect()
        };
        if owners.is_empty() {
            return Ok(());
        }
        let enrolled: Vec<(String, u64)> = self
            .hash::<PodUidKey, PodState>(maps::PODS)?
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, s)| Some((PodUid::from_key(&k)?.to_string(), s.netns_ino)))
            .collect();
        for (addr, owner) in owners {
            if let Some((owner_uid, _)) = enrolled
                .iter()
                .find(|(u, ino)| *ino == owner.netns_ino && u != uid.as_str())
            {
                warn!(pod = %uid, addr = %ip_of(&addr), owner = %owner_uid,
                      "refused: the address belongs to another enrolled pod");
                return Err(CaptureError::AddressOwned {
                    uid: uid.to_string(),
                    addr: ip_of(&addr),
                    owner: owner_uid.clone(),
                });
            }
        }
        Ok(())
    }

    /// The addresses `pod` owns in `SLUICE_POD_ADDRS`.
    fn owned_addrs(&mut self, pod: PodKey) -> Result<Vec<AddrKey>, CaptureError> {
        Ok(self
            .hash::<AddrKey, PodKey>(maps::POD_ADDRS)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, owner)| *owner == pod)
            .map(|(k, _)| k)
            .collect())
    }

    /// Removes what the programs tracked for a pod whose links are gone (so its sockets'
    /// releases will not): its sockets' entries, the destinations filed under its addresses,
    /// its counter.
    fn forget_tracked(&mut self, pod: PodKey, owned: &[AddrKey]) -> Result<(), CaptureError> {
        let mut socks = self.hash::<u64, SockOrig>(maps::SOCK_ORIG)?;
        let cookies: Vec<u64> = socks
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| s.pod == pod)
            .map(|(c, _)| c)
            .collect();
        for cookie in &cookies {
            ignore_missing(socks.remove(cookie), maps::SOCK_ORIG)?;
        }
        let mut peers = self.hash::<PairKey, PeerOrig>(maps::PEER_ORIG)?;
        // Under its addresses now, or filed by its sockets (under an address it has since
        // dropped).
        let pairs: Vec<PairKey> = peers
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                cookies.contains(&v.cookie)
                    || owned
                        .iter()
                        .any(|a| a.family == k.family && a.addr == k.addr)
            })
            .map(|(k, _)| k)
            .collect();
        for pair in pairs {
            ignore_missing(peers.remove(&pair), maps::PEER_ORIG)?;
        }
        // Dials the proxy registered for the pod and never removed (it died mid-dial): void by
        // their deadline already, gone with the pod so a reused netns inode inherits nothing.
        let mut dials = self.hash::<DialKey, u64>(maps::PROXY_DIALS)?;
        let left: Vec<DialKey> = dials
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pod == pod)
            .collect();
        for key in left {
            ignore_missing(dials.remove(&key), maps::PROXY_DIALS)?;
        }
        ignore_missing(
            self.hash::<PodKey, u64>(maps::POD_TRACKED)?.remove(&pod),
            maps::POD_TRACKED,
        )
    }

    /// A `steer_inbound` instance for the pod whose netns inode is `netns_ino`, sharing the
    /// pinned maps, with its own `SLUICE_POD_SELF` holding the pod's key. Once its link is
    /// pinned the instance (and its map) lives as long as the link.
    fn inbound_instance(&mut self, netns_ino: u64) -> Result<Ebpf, CaptureError> {
        let mut ebpf = self.instances.load(OBJECT)?;
        let map = ebpf.map_mut(maps::POD_SELF).ok_or(CaptureError::Map {
            map: maps::POD_SELF,
            source: MapError::InvalidName {
                name: maps::POD_SELF.to_owned(),
            },
        })?;
        let mut own: aya::maps::Array<&mut MapData, PodKey> =
            aya::maps::Array::try_from(map).map_err(map_err(maps::POD_SELF))?;
        own.set(0, PodKey { netns_ino }, 0)
            .map_err(map_err(maps::POD_SELF))?;
        load_program(&mut ebpf, programs::STEER_INBOUND)?;
        Ok(ebpf)
    }

    /// Makes `addrs` exactly the addresses owned by `pod`.
    fn set_addrs(&mut self, pod: PodKey, addrs: &[IpAddr]) -> Result<(), CaptureError> {
        let mut map = self.hash::<AddrKey, PodKey>(maps::POD_ADDRS)?;
        let wanted: Vec<AddrKey> = addrs.iter().map(|a| addr_key(*a)).collect();
        let stale: Vec<AddrKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| *v == pod && !wanted.contains(k))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            ignore_missing(map.remove(&k), maps::POD_ADDRS)?;
        }
        for k in wanted {
            map.insert(k, pod, 0).map_err(map_err(maps::POD_ADDRS))?;
        }
        Ok(())
    }

    fn state(&mut self, uid: &PodUid) -> Result<Option<PodState>, CaptureError> {
        match self
            .hash::<PodUidKey, PodState>(maps::PODS)?
            .get(&uid.key(), 0)
        {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(CaptureError::Map {
                map: maps::PODS,
                source,
            }),
        }
    }

    fn pod_dir(&self, uid: &PodUid) -> PathBuf {
        self.root.join("pods").join(uid.as_str())
    }

    fn link(
        &self,
        program: &'static str,
        attach: AttachType,
        target: &impl AsFd,
        target_path: &Path,
    ) -> Result<std::os::fd::OwnedFd, CaptureError> {
        link_program(&self.ebpf, program, attach, target, target_path)
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, CaptureError> {
        self.typed(name)
    }

    fn typed<'a, T>(&'a mut self, name: &'static str) -> Result<T, CaptureError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(CaptureError::Map {
            map: name,
            source: MapError::InvalidName {
                name: name.to_owned(),
            },
        })?;
        T::try_from(map).map_err(map_err(name))
    }
}

/// What `steer_inbound` decided for one lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundDecision {
    /// Handed to the socket with this cookie (the proxy's 15006 listener).
    Steered { socket_cookie: u64 },
    /// Left to the normal socket lookup (not captured).
    Passed,
    /// Refused: the pod is captured but its proxy socket is missing.
    Refused,
}

const SK_DROP: u32 = 0;
/// `bpf_map_update_elem` flag: create only.
const BPF_NOEXIST: u64 = 1;
/// The kernel-internal "operation not supported" errno that bpf(2) leaks to userspace.
const ENOTSUPP: i32 = 524;
const IPPROTO_TCP: u32 = 6;

/// A `struct bpf_sk_lookup` for a TCP SYN, as the kernel's test run expects it: no socket,
/// no ingress interface, addresses in network byte order, remote port big endian, local port
/// host order.
fn sk_lookup_ctx(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut ctx = vec![0u8; 72];
    let put = |ctx: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        ctx[at..at + bytes.len()].copy_from_slice(bytes)
    };
    let (src_key, dst_key) = (addr_key(src.ip()), addr_key(dst.ip()));
    put(&mut ctx, 8, &dst_key.family.to_ne_bytes());
    put(&mut ctx, 12, &IPPROTO_TCP.to_ne_bytes());
    if dst_key.family == sluice_common::AF_INET {
        put(&mut ctx, 16, &src_key.addr[0].to_ne_bytes());
        put(&mut ctx, 40, &dst_key.addr[0].to_ne_bytes());
    } else {
        for i in 0..4 {
            put(&mut ctx, 20 + 4 * i, &src_key.addr[i].to_ne_bytes());
            put(&mut ctx, 44 + 4 * i, &dst_key.addr[i].to_ne_bytes());
        }
    }
    put(&mut ctx, 36, &src.port().to_be_bytes());
    put(&mut ctx, 60, &u32::from(dst.port()).to_ne_bytes());
    ctx
}

impl Redirector for EbpfCapture {
    fn backend(&self) -> Backend {
        Backend::Ebpf
    }

    fn enroll(&mut self, pod: &PodCapture) -> Result<(), CaptureError> {
        let result = self.enroll_pod(pod);
        if let Err(e) = &result {
            // Leave nothing half-attached: the caller sees the error and the pod stays out.
            warn!(pod = %pod.uid, error = %e, "enrol failed; rolling back");
            if let Err(e) = self.remove_uid(&pod.uid) {
                warn!(pod = %pod.uid, error = %e, "rollback failed");
            }
        }
        result
    }

    fn remove(&mut self, pod: &PodCapture) -> Result<(), CaptureError> {
        self.remove_uid(&pod.uid)?;
        // Capture is gone; the reply routing goes after it (a netns that is gone took it along).
        match Netns::open(&pod.netns) {
            Ok(netns) => {
                netns
                    .run(crate::reply::remove_current)
                    .map_err(|source| CaptureError::InNetns {
                        what: "enter the netns to remove reply routing",
                        netns: pod.netns.clone(),
                        source,
                    })?
            }
            Err(_) => Ok(()),
        }
    }
}

/// Reads the pinned state without loading anything: the status view of `sluice-load`.
pub fn list_pods(root: &Path) -> Result<Vec<EnrolledPod>, CaptureError> {
    let Some(pods_map) = open_pinned(root, maps::PODS)? else {
        return Ok(Vec::new());
    };
    let pods: HashMap<MapData, PodUidKey, PodState> =
        HashMap::try_from(Map::HashMap(pods_map)).map_err(map_err(maps::PODS))?;
    let addrs: Vec<(AddrKey, PodKey)> = match open_pinned(root, maps::POD_ADDRS)? {
        Some(data) => {
            let map: HashMap<MapData, AddrKey, PodKey> =
                HashMap::try_from(Map::HashMap(data)).map_err(map_err(maps::POD_ADDRS))?;
            map.iter().filter_map(Result::ok).collect()
        }
        None => Vec::new(),
    };
    let tracked: Vec<(PodKey, u64)> = match open_pinned(root, maps::POD_TRACKED)? {
        Some(data) => {
            let map: HashMap<MapData, PodKey, u64> =
                HashMap::try_from(Map::HashMap(data)).map_err(map_err(maps::POD_TRACKED))?;
            map.iter().filter_map(Result::ok).collect()
        }
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for (key, state) in pods.iter().filter_map(Result::ok) {
        let Some(uid) = PodUid::from_key(&key) else {
            continue;
        };
        let dir = root.join("pods").join(uid.as_str());
        let mut links: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        links.sort();
        out.push(EnrolledPod {
            uid: uid.to_string(),
            netns_ino: state.netns_ino,
            cgroup_id: state.cgroup_id,
            addrs: addrs
                .iter()
                .filter(|(_, pod)| pod.netns_ino == state.netns_ino)
                .map(|(a, _)| ip_of(a))
                .collect(),
            links,
            tracked_sockets: tracked
                .iter()
                .find(|(pod, _)| pod.netns_ino == state.netns_ino)
                .map_or(0, |(_, n)| *n),
        });
    }
    out.sort_by(|a, b| a.uid.cmp(&b.uid));
    Ok(out)
}

/// The node-wide verdict counters, summed over CPUs, in code order.
pub fn verdicts(root: &Path) -> Result<Vec<(Verdict, u64)>, CaptureError> {
    let Some(data) = open_pinned(root, maps::VERDICTS)? else {
        return Ok(Verdict::ALL.iter().map(|v| (*v, 0)).collect());
    };
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(maps::VERDICTS))?;
    Verdict::ALL
        .iter()
        .map(|v| {
            let per_cpu = map.get(&(*v as u32), 0).map_err(map_err(maps::VERDICTS))?;
            Ok((*v, per_cpu.iter().sum()))
        })
        .collect()
}

/// Removes the whole pin root if nothing is enrolled any more (tests and uninstall).
pub fn remove_pin_root(root: &Path) -> Result<(), CaptureError> {
    if !root.exists() {
        return Ok(());
    }
    unpin_link(&root.join("proxy").join(programs::GETSOCKOPT))?;
    for program in [programs::NODE_PROBE4, programs::NODE_PROBE6] {
        unpin_link(&root.join("node").join(program))?;
    }
    std::fs::remove_dir_all(root).map_err(|source| CaptureError::Pin {
        path: root.to_path_buf(),
        source,
    })
}

fn open_pinned(root: &Path, name: &'static str) -> Result<Option<MapData>, CaptureError> {
    let path = root.join("maps").join(name);
    if !path.exists() {
        return Ok(None);
    }
    MapData::from_pin(&path).map(Some).map_err(map_err(name))
}

fn link_program(
    ebpf: &Ebpf,
    program: &'static str,
    attach: AttachType,
    target: &impl AsFd,
    target_path: &Path,
) -> Result<std::os::fd::OwnedFd, CaptureError> {
    let prog = ebpf.program(program).ok_or(CaptureError::Program {
        program,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    let fd = prog
        .fd()
        .map_err(|source| CaptureError::Program { program, source })?;
    let link = sys::link_create(fd.as_fd(), target.as_fd(), attach).map_err(|source| {
        CaptureError::Attach {
            program,
            target: target_path.to_path_buf(),
            source,
        }
    })?;
    debug!(program, target = %target_path.display(), "link created");
    Ok(link)
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), CaptureError> {
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Program {
        program: name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    let loaded = match prog {
        Program::SkLookup(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    };
    loaded.map_err(|source| CaptureError::Program {
        program: name,
        source,
    })
}

/// Detaches and unpins the link pinned at `path`; a missing pin is already done.
fn unpin_link(path: &Path) -> Result<(), CaptureError> {
    let link = match sys::obj_get(path) {
        Ok(link) => link,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CaptureError::Pin {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // Detach now rather than when the last reference goes, so capture stops at once. A link
    // whose netns or cgroup is already gone is auto-detached and may refuse this: fine.
    if let Err(e) = sys::link_detach(link.as_fd()) {
        debug!(pin = %path.display(), error = %e, "link already detached");
    }
    std::fs::remove_file(path).map_err(|source| CaptureError::Pin {
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses a pin root that holds maps of an earlier layout. aya would reuse a pinned map
/// whatever its definition, and pods captured by the earlier programs would keep them: both
/// would run against maps they were not written for.
fn check_layout(root: &Path) -> Result<(), CaptureError> {
    let maps = root.join("maps");
    let has_maps = std::fs::read_dir(&maps).is_ok_and(|mut d| d.next().is_some());
    if has_maps && !root.join(LAYOUT).exists() {
        return Err(CaptureError::PinLayout {
            root: root.to_path_buf(),
            layout: LAYOUT,
        });
    }
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, CaptureError> {
    File::open(path).map_err(|source| CaptureError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn ensure_bpffs(root: &Path) -> Result<(), CaptureError> {
    let parent = root.parent().unwrap_or(root);
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(parent.as_os_str()))
        .map_err(|_| CaptureError::Pin {
            path: root.to_path_buf(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
    // SAFETY: statfs writes into a zeroed struct of the right type; c is a valid C string.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ret = unsafe { libc::statfs(c.as_ptr(), &mut fs) };
    if ret != 0 || fs.f_type != BPF_FS_MAGIC {
        return Err(CaptureError::Pin {
            path: root.to_path_buf(),
            source: std::io::Error::other(format!(
                "{} is not on bpffs; mount it with `mount -t bpf bpf /sys/fs/bpf`",
                parent.display()
            )),
        });
    }
    Ok(())
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> CaptureError {
    move |source| CaptureError::Map { map, source }
}

fn ignore_missing(result: Result<(), MapError>, map: &'static str) -> Result<(), CaptureError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(CaptureError::Map { map, source }),
    }
}

/// Outbound connections are redirected to the proxy on the pod's first address of each family
/// (why its own address and not loopback: see `PodConfig`).
fn set_redirect_addrs(config: &mut PodConfig, addrs: &[IpAddr]) {
    if let Some(v4) = addrs
        .iter()
        .find(|a| addr_key(**a).family == sluice_common::AF_INET)
    {
        config.redirect_ip4 = addr_key(*v4).addr[0];
    }
    if let Some(v6) = addrs
        .iter()
        .find(|a| addr_key(**a).family == sluice_common::AF_INET6)
    {
        config.redirect_ip6 = addr_key(*v6).addr;
    }
}

pub(crate) fn addr_key(addr: IpAddr) -> AddrKey {
    // Same layout the programs see: network byte order words.
    match addr {
        IpAddr::V4(v4) => AddrKey {
            family: sluice_common::AF_INET,
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        },
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => addr_key(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                AddrKey {
                    family: sluice_common::AF_INET6,
                    addr: [word(0), word(4), word(8), word(12)],
                }
            }
        },
    }
}

fn ip_of(key: &AddrKey) -> IpAddr {
    if key.family == sluice_common::AF_INET {
        IpAddr::from(key.addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in key.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_keys_use_network_byte_order_like_the_kernel() {
        let key = addr_key("10.1.2.3".parse().unwrap());
        // The kernel's user_ip4 / local_ip4 for 10.1.2.3 is the bytes 0a 01 02 03 in memory.
        assert_eq!(key.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(key.family, sluice_common::AF_INET);
    }

    #[test]
    fn v4_mapped_v6_folds_into_the_v4_key() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(addr_key(mapped), addr_key("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn addr_keys_round_trip() {
        for a in ["10.1.2.3", "fd00::1:2", "2001:db8::ff"] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(ip_of(&addr_key(ip)), ip);
        }
    }
}
