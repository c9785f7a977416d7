//! The maps, pinned by name under the loader's pin directory so every pod attachment and every
//! restart of the agent shares one set.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray, SockHash};
use sluice_common::{
    AddrKey, CgroupKey, OrigDst, PairKey, PodConfig, PodKey, PodState, PodUidKey, Verdict,
};

/// Pods per node are bounded by the kubelet (110 by default); leave ample headroom.
const MAX_PODS: u32 = 4096;
/// In-flight captured outbound connections whose original destination is remembered. LRU: a
/// closed connection's entry ages out instead of needing a close hook.
const MAX_TRACKED: u32 = 65536;

#[map(name = "SLUICE_POD_ADDRS")]
pub static POD_ADDRS: HashMap<AddrKey, PodKey> = HashMap::pinned(MAX_PODS * 4, 0);

#[map(name = "SLUICE_POD_CONFIG")]
pub static POD_CONFIG: HashMap<PodKey, PodConfig> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "SLUICE_POD_CGROUPS")]
pub static POD_CGROUPS: HashMap<CgroupKey, PodKey> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "SLUICE_PROXY_INBOUND")]
pub static PROXY_INBOUND: SockHash<PodKey> = SockHash::pinned(MAX_PODS, 0);

#[map(name = "SLUICE_COOKIE_ORIG")]
pub static COOKIE_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED, 0);

#[map(name = "SLUICE_PAIR_ORIG")]
pub static PAIR_ORIG: LruHashMap<PairKey, OrigDst> = LruHashMap::pinned(MAX_TRACKED, 0);

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
