//! The maps, pinned by name under the loader's pin directory so every pod attachment and every
//! restart of the agent shares one set.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, SockHash};
use sluice_common::{
    AddrKey, CgroupKey, DialKey, MAX_PROXY_DIALS, MAX_TRACKED, PairKey, PeerOrig, PodConfig,
    PodKey, PodState, PodUidKey, SockOrig, Verdict,
};

/// Pods per node are bounded by the kubelet (110 by default); leave ample headroom.
const MAX_PODS: u32 = 4096;

#[map(name = "SLUICE_POD_ADDRS")]
pub static POD_ADDRS: HashMap<AddrKey, PodKey> = HashMap::pinned(MAX_PODS * 4, 0);

#[map(name = "SLUICE_POD_CONFIG")]
pub static POD_CONFIG: HashMap<PodKey, PodConfig> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "SLUICE_POD_CGROUPS")]
pub static POD_CGROUPS: HashMap<CgroupKey, PodKey> = HashMap::pinned(MAX_PODS, 0);

/// The key of the one pod a `steer_inbound` instance serves. Not pinned: every load of the
/// object makes its own, so each pod's instance carries its own (written by the loader before
/// the instance is attached, never after).
#[map(name = "SLUICE_POD_SELF")]
pub static POD_SELF: Array<PodKey> = Array::with_max_entries(1, 0);

#[map(name = "SLUICE_PROXY_INBOUND")]
pub static PROXY_INBOUND: SockHash<PodKey> = SockHash::pinned(MAX_PODS, 0);

// Not LRU: an LRU map lets one pod's connect storm evict every other pod's entries. Entries are
// removed when their socket goes (sock_release, sockops' close) and bounded per pod
// (`POD_TRACKED` against `PodConfig::max_tracked`), so a full map refuses the newcomer and takes
// nothing away from anyone. Not preallocated: memory follows the live entries.
#[map(name = "SLUICE_SOCK_ORIG")]
pub static SOCK_ORIG: HashMap<u64, SockOrig> = HashMap::pinned(MAX_TRACKED, BPF_F_NO_PREALLOC);

#[map(name = "SLUICE_PEER_ORIG")]
pub static PEER_ORIG: HashMap<PairKey, PeerOrig> = HashMap::pinned(MAX_TRACKED, BPF_F_NO_PREALLOC);

#[map(name = "SLUICE_POD_TRACKED")]
pub static POD_TRACKED: HashMap<PodKey, u64> = HashMap::pinned(MAX_PODS, 0);

/// Written by the proxy only (just before it dials an app from a client's address, removed
/// once connected); read by `steer_inbound`. The value is the entry's deadline
/// (`bpf_ktime_get_ns`): a leftover of a proxy killed mid-dial lets nothing by. Not LRU: when
/// full, the proxy dials without the client's address rather than evicting another's entry.
#[map(name = "SLUICE_PROXY_DIALS")]
pub static PROXY_DIALS: HashMap<DialKey, u64> = HashMap::pinned(MAX_PROXY_DIALS, BPF_F_NO_PREALLOC);

/// Index 0: the node's netns cookie, written by the agent once learnt (see `probe.rs`).
#[map(name = "SLUICE_NODE_NETNS")]
pub static NODE_NETNS: Array<u64> = Array::pinned(1, 0);

/// The agent's learning sockets (socket cookie → netns cookie); a handful at most.
#[map(name = "SLUICE_NODE_LEARN")]
pub static NODE_LEARN: HashMap<u64, u64> = HashMap::pinned(16, 0);

#[map(name = "SLUICE_VERDICTS")]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(Verdict::COUNT, 0);

/// Read and written by userspace only; declared here so it is created and pinned with the rest.
#[map(name = "SLUICE_PODS")]
pub static PODS: HashMap<PodUidKey, PodState> = HashMap::pinned(MAX_PODS, 0);

/// Counts one verdict. Per-CPU, so a plain increment is race free.
#[inline(always)]
pub fn count(verdict: Verdict) {
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: the pointer is this CPU's slot of a live map value; programs do not migrate CPU
        // while running.
        unsafe { *counter += 1 };
    }
}

/// Adds `delta` (two's complement for a decrement) to a pod's tracked-socket count, atomically:
/// connects and releases of one pod run on every CPU at once. The result is unused, so LLVM
/// emits the plain `BPF_XADD`, the one BPF atomic Linux 5.10 has (fetching forms came in 5.12).
/// The intrinsic, because the BPF target has no compare-and-swap and so no `AtomicU64::fetch_add`.
#[inline(always)]
pub fn add_tracked(pod: &PodKey, delta: u64) {
    if let Some(counter) = POD_TRACKED.get_ptr_mut(pod) {
        // SAFETY: the pointer is a live, aligned u64 map value; every writer uses this atomic add
        // (userspace only creates and deletes the entry).
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                counter, delta,
            );
        }
        // The host build (a type check only; the programs never run there) has stable atomics.
        // SAFETY: as above.
        #[cfg(not(target_arch = "bpf"))]
        unsafe { core::sync::atomic::AtomicU64::from_ptr(counter) }
            .fetch_add(delta, core::sync::atomic::Ordering::Relaxed);
    }
}

/// How many captured sockets the pod has; `None` if the pod has no counter (not enrolled).
#[inline(always)]
pub fn tracked(pod: &PodKey) -> Option<u64> {
    // SAFETY: map values are valid while the program runs.
    unsafe { POD_TRACKED.get(pod) }.copied()
}
