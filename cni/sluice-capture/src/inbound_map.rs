//! The proxy's only contact with BPF: registering its in-pod 15006 listener in the pinned
//! `SLUICE_PROXY_INBOUND` socket map, keyed by the pod's netns inode, so sk_lookup can hand it
//! the pod's inbound connections. The kernel drops the entry when the socket closes, so a dead
//! proxy leaves an empty slot and inbound connections are refused, never passed around it.
//!
//! And [`ProxyDials`]: the proxy's dials to an app that carry the client's address, which
//! sk_lookup would otherwise take for inbound traffic and steer back to the proxy.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{Map, MapData, SockHash};
use sluice_common::{DialKey, PodKey, maps};

use crate::CaptureError;
use crate::ebpf::addr_key;
use crate::netns::socket_netns_inode;

/// Handle on the pinned inbound socket map.
pub struct InboundSocketMap {
    map: SockHash<MapData, PodKey>,
}

impl InboundSocketMap {
    /// Opens the map pinned under `pin_root`, or `None` if the eBPF backend never ran on this
    /// node (iptables capture needs no registration).
    pub fn open(pin_root: &Path) -> Result<Option<Self>, CaptureError> {
        let path = pin_root.join("maps").join(maps::PROXY_INBOUND);
        if !path.exists() {
            return Ok(None);
        }
        let map_err = |source| CaptureError::Map {
            map: maps::PROXY_INBOUND,
            source,
        };
        let data = MapData::from_pin(&path).map_err(map_err)?;
        let map = SockHash::try_from(Map::SockHash(data)).map_err(map_err)?;
        Ok(Some(Self { map }))
    }

    /// Registers a listening socket created inside a pod's netns; returns the pod's netns inode.
    pub fn register(&mut self, listener: &impl AsFd) -> Result<u64, CaptureError> {
        let netns_ino =
            socket_netns_inode(listener.as_fd()).map_err(|source| CaptureError::InNetns {
                what: "find the listener's netns (SIOCGSKNS)",
                netns: "(listener)".into(),
                source,
            })?;
        self.map
            .insert(PodKey { netns_ino }, listener.as_fd().as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map {
                map: maps::PROXY_INBOUND,
                source,
            })?;
        Ok(netns_ino)
    }

    /// Removes a pod's registration; removing one that is not there succeeds.
    pub fn unregister(&mut self, netns_ino: u64) -> Result<(), CaptureError> {
        match self.map.remove(&PodKey { netns_ino }) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(CaptureError::Map {
                map: maps::PROXY_INBOUND,
                source,
            }),
        }
    }
}

/// Handle on the pinned `SLUICE_PROXY_DIALS` map: the proxy's connections to an app that carry
/// a client's address as their source. `steer_inbound` lets exactly the SYNs registered here
/// through to the app; any other SYN with a foreign source goes to the proxy's 15006 listener.
/// Updates go through `bpf(2)` on the map's fd, so a shared `&self` suffices and one handle
/// serves every connection task of the proxy.
pub struct ProxyDials {
    map: MapData,
}

/// One registered dial; dropping it removes the entry (a missing entry is fine).
#[must_use = "the entry is removed when the guard is dropped"]
pub struct DialGuard<'a> {
    dials: &'a ProxyDials,
    key: DialKey,
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// Create or replace: a stale entry for the same tuple (a dial whose guard has not run yet)
/// describes the same connection.
const BPF_ANY: u64 = 0;

/// `union bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

impl ProxyDials {
    /// Opens the map pinned under `pin_root`, or `None` if it is not pinned there (an iptables
    /// node, or an eBPF capture from before source preservation). Refuses a map whose key or
    /// value size is not this build's: writing a different layout would let the wrong SYNs by.
    pub fn open(pin_root: &Path) -> Result<Option<Self>, CaptureError> {
        let path = pin_root.join("maps").join(maps::PROXY_DIALS);
        if !path.exists() {
            return Ok(None);
        }
        let map_err = |source| CaptureError::Map {
            map: maps::PROXY_DIALS,
            source,
        };
        let map = MapData::from_pin(&path).map_err(map_err)?;
        let info = map.info().map_err(map_err)?;
        let (key, value) = (
            std::mem::size_of::<DialKey>() as u32,
            std::mem::size_of::<u64>() as u32,
        );
        if info.key_size() != key {
            return Err(map_err(aya::maps::MapError::InvalidKeySize {
                size: info.key_size() as usize,
                expected: key as usize,
            }));
        }
        if info.value_size() != value {
            return Err(map_err(aya::maps::MapError::InvalidValueSize {
                size: info.value_size() as usize,
                expected: value as usize,
            }));
        }
        Ok(Some(Self { map }))
    }

    /// Lets the SYN from `client` to `app` inside pod `netns_ino`'s netns through to the app
    /// (both addresses as the app's side sees them: `client` is the proxy socket's bound
    /// address). Register after `bind` (the port is known) and before `connect`; drop the guard
    /// once `connect` returns.
    pub fn allow(
        &self,
        netns_ino: u64,
        client: SocketAddr,
        app: SocketAddr,
    ) -> Result<DialGuard<'_>, CaptureError> {
        let key = dial_key(netns_ino, client, app);
        // The entry is void past this instant even if it is never removed (a proxy killed in
        // the middle of a dial): a leftover can never become a standing way around capture.
        let value: u64 = monotonic_ns().saturating_add(DIAL_TTL.as_nanos() as u64);
        let mut attr = MapElemAttr {
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: BPF_ANY,
            ..Default::default()
        };
        elem_command(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(|io_error| CaptureError::Map {
            map: maps::PROXY_DIALS,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "BPF_MAP_UPDATE_ELEM",
                io_error,
            }),
        })?;
        Ok(DialGuard { dials: self, key })
    }

    /// Removes the entries past their deadline: leftovers of a proxy killed mid-dial (void
    /// already; this gives their room back). Live dials of another proxy instance (a rollout
    /// with surge) are left alone. Returns how many went.
    pub fn sweep_expired(&self) -> Result<usize, CaptureError> {
        let failed = |call: &'static str| {
            move |io_error| CaptureError::Map {
                map: maps::PROXY_DIALS,
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call,
                    io_error,
                }),
            }
        };
        let now = monotonic_ns();
        let mut expired = Vec::new();
        let mut prev: Option<DialKey> = None;
        // Bounded by the map's size: every turn moves to the next key.
        for _ in 0..=sluice_common::MAX_PROXY_DIALS {
            let mut key = DialKey::default();
            let mut attr = MapElemAttr {
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
                key: prev.as_ref().map_or(0, |p| std::ptr::from_ref(p) as u64),
                value: std::ptr::from_mut(&mut key) as u64,
                ..Default::default()
            };
            match elem_command(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => return Err(failed("BPF_MAP_GET_NEXT_KEY")(e)),
            }
            let mut deadline: u64 = 0;
            let mut attr = MapElemAttr {
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
                key: std::ptr::from_ref(&key) as u64,
                value: std::ptr::from_mut(&mut deadline) as u64,
                ..Default::default()
            };
            match elem_command(BPF_MAP_LOOKUP_ELEM, &mut attr) {
                Ok(()) if deadline <= now => expired.push(key),
                Ok(()) => {}
                // Removed meanwhile by its own dial.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(failed("BPF_MAP_LOOKUP_ELEM")(e)),
            }
            prev = Some(key);
        }
        let mut removed = 0;
        for key in &expired {
            let mut attr = MapElemAttr {
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
                key: std::ptr::from_ref(key) as u64,
                ..Default::default()
            };
            match elem_command(BPF_MAP_DELETE_ELEM, &mut attr) {
                Ok(()) => removed += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(failed("BPF_MAP_DELETE_ELEM")(e)),
            }
        }
        Ok(removed)
    }

    /// Whether `error` (from [`ProxyDials::allow`]) says the map is full: every slot holds a
    /// dial in flight. Expected under a burst; anything else is a fault worth a warning.
    pub fn is_full(error: &CaptureError) -> bool {
        match error {
            CaptureError::Map {
                source: aya::maps::MapError::SyscallError(e),
                ..
            } => matches!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
            ),
            _ => false,
        }
    }
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        let mut attr = MapElemAttr {
            map_fd: self.dials.map.fd().as_fd().as_raw_fd() as u32,
            key: std::ptr::from_ref(&self.key) as u64,
            ..Default::default()
        };
        match elem_command(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            // The entry stays until the same tuple is dialled again (BPF_ANY replaces it); it
            // lets through only a SYN with exactly this tuple, which only the proxy can make.
            Err(e) => tracing::warn!(error = %e, "remove a dial from SLUICE_PROXY_DIALS"),
        }
    }
}

/// How long a registered dial lets its SYN through: the proxy's connect deadline (10 s) plus
/// a margin for SYN retransmits that arrive just before it gives up.
pub const DIAL_TTL: std::time::Duration = std::time::Duration::from_secs(12);

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The key `steer_inbound` looks up for a SYN from `client` to `app` in pod `netns_ino`: named
/// as the app's side sees the connection, ports in host byte order.
fn dial_key(netns_ino: u64, client: SocketAddr, app: SocketAddr) -> DialKey {
    DialKey {
        pod: PodKey { netns_ino },
        remote: addr_key(client.ip()),
        local: addr_key(app.ip()),
        remote_port: client.port(),
        local_port: app.port(),
        _pad: 0,
    }
}

fn elem_command(cmd: libc::c_long, attr: &mut MapElemAttr) -> std::io::Result<()> {
    // SAFETY: attr is a live #[repr(C)] struct laid out as the kernel's `union bpf_attr` member
    // for the element commands; its key and value pointers point to live values of the map's
    // key and value sizes (checked at open) for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_keys_name_the_connection_as_the_app_sees_it() {
        let client: SocketAddr = "[::ffff:192.0.2.7]:40000".parse().unwrap();
        let app: SocketAddr = "10.1.0.5:8080".parse().unwrap();
        let key = dial_key(42, client, app);
        assert_eq!(key.pod.netns_ino, 42);
        assert_eq!(key.remote, addr_key("192.0.2.7".parse().unwrap()));
        assert_eq!(key.remote.addr[0].to_ne_bytes(), [192, 0, 2, 7]);
        assert_eq!(key.local, addr_key("10.1.0.5".parse().unwrap()));
        assert_eq!(
            (key.remote_port, key.local_port, key._pad),
            (40000, 8080, 0)
        );
    }

    #[test]
    fn the_handle_is_shared_across_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<ProxyDials>();
        shared::<DialGuard<'static>>();
    }

    #[test]
    fn a_missing_pin_is_no_map() {
        let root = std::env::temp_dir().join(format!("sluice-no-pins-{}", std::process::id()));
        assert!(matches!(ProxyDials::open(&root), Ok(None)));
    }

    /// Against the running kernel, on a map made and pinned here as the loader pins it. Needs
    /// root and bpffs at /sys/fs/bpf, and fails without them: a skipped test proves nothing.
    mod root {
        use super::*;
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::path::PathBuf;

        /// A pin root under bpffs, removed (with its pins) on drop, even on panic.
        struct PinRoot(PathBuf);

        impl PinRoot {
            fn new(tag: &str) -> Self {
                // SAFETY: geteuid has no preconditions.
                let euid = unsafe { libc::geteuid() };
                assert_eq!(
                    euid, 0,
                    "this test creates BPF maps and needs root (it does not skip)"
                );
                let root = PathBuf::from(format!(
                    "/sys/fs/bpf/sluice-test-dials-{tag}-{}",
                    std::process::id()
                ));
                let _ = std::fs::remove_dir_all(&root);
                std::fs::create_dir_all(root.join("maps")).unwrap_or_else(|e| {
                    panic!("create {} (is bpffs mounted?): {e}", root.display())
                });
                Self(root)
            }

            /// Creates a hash map with these sizes and pins it where the proxy looks for
            /// `SLUICE_PROXY_DIALS`.
            fn pin_hash(&self, key_size: u32, value_size: u32, max_entries: u32) {
                #[repr(C)]
                #[derive(Default)]
                struct MapCreateAttr {
                    map_type: u32,
                    key_size: u32,
                    value_size: u32,
                    max_entries: u32,
                    map_flags: u32,
                    tail: [u32; 16],
                }
                const BPF_MAP_CREATE: libc::c_long = 0;
                const BPF_MAP_TYPE_HASH: u32 = 1;
                let mut attr = MapCreateAttr {
                    map_type: BPF_MAP_TYPE_HASH,
                    key_size,
                    value_size,
                    max_entries,
                    ..Default::default()
                };
                crate::sys::raise_memlock_limit();
                // SAFETY: attr is a live #[repr(C)] `union bpf_attr` prefix for BPF_MAP_CREATE,
                // zero past the fields set.
                let fd = unsafe {
                    libc::syscall(
                        libc::SYS_bpf,
                        BPF_MAP_CREATE,
                        std::ptr::from_mut(&mut attr).cast::<libc::c_void>(),
                        std::mem::size_of::<MapCreateAttr>(),
                    )
                };
                assert!(
                    fd >= 0,
                    "BPF_MAP_CREATE: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
                crate::sys::obj_pin(fd.as_fd(), &self.0.join("maps").join(maps::PROXY_DIALS))
                    .unwrap();
            }

            fn entries(&self) -> Vec<DialKey> {
                let path = self.0.join("maps").join(maps::PROXY_DIALS);
                let map = aya::maps::HashMap::<MapData, DialKey, u64>::try_from(Map::HashMap(
                    MapData::from_pin(path).unwrap(),
                ))
                .unwrap();
                map.keys().map(Result::unwrap).collect()
            }
        }

        impl Drop for PinRoot {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        #[test]
        fn a_dial_is_registered_until_its_guard_drops_and_a_full_map_says_so() {
            let root = PinRoot::new("allow");
            root.pin_hash(std::mem::size_of::<DialKey>() as u32, 8, 2);
            let dials = ProxyDials::open(&root.0).unwrap().expect("the pinned map");
            let app: SocketAddr = "10.1.0.5:8080".parse().unwrap();
            let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
                "192.0.2.7:40000".parse().unwrap(),
                "[2001:db8::7]:40000".parse().unwrap(),
                "192.0.2.8:40000".parse().unwrap(),
            );
            let first = dials.allow(7, a, app).unwrap();
            assert_eq!(root.entries(), [dial_key(7, a, app)]);
            // The same tuple again replaces its entry (a dial whose guard has not run yet).
            let again = dials.allow(7, a, app).unwrap();
            let other = dials.allow(7, b, app).unwrap();
            assert_eq!(root.entries().len(), 2);
            let full = dials
                .allow(7, c, app)
                .err()
                .expect("a third tuple in a map of two");
            assert!(ProxyDials::is_full(&full), "{full}");
            drop(first);
            assert_eq!(root.entries(), [dial_key(7, b, app)]);
            // Its entry is gone already: dropping the other guard of the tuple is fine.
            drop(again);
            drop(other);
            assert!(root.entries().is_empty());
        }

        #[test]
        fn an_entry_carries_its_deadline_and_a_sweep_takes_only_expired_ones() {
            let root = PinRoot::new("deadline");
            root.pin_hash(std::mem::size_of::<DialKey>() as u32, 8, 4);
            let dials = ProxyDials::open(&root.0).unwrap().expect("the pinned map");
            let app: SocketAddr = "10.1.0.5:8080".parse().unwrap();
            let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
            let before = monotonic_ns();
            let guard = dials.allow(7, client, app).unwrap();
            let path = root.0.join("maps").join(maps::PROXY_DIALS);
            let map = aya::maps::HashMap::<MapData, DialKey, u64>::try_from(Map::HashMap(
                MapData::from_pin(path).unwrap(),
            ))
            .unwrap();
            let deadline = map.get(&dial_key(7, client, app), 0).unwrap();
            let ttl = DIAL_TTL.as_nanos() as u64;
            assert!(
                deadline >= before + ttl && deadline <= monotonic_ns() + ttl,
                "the deadline is the dial's start plus {DIAL_TTL:?}"
            );
            // A leftover (the guard forgotten, as when the proxy is killed mid-dial) stays
            // until its deadline has passed; then a sweep takes it, and only it.
            std::mem::forget(guard);
            let _live = dials.allow(8, client, app).unwrap();
            assert_eq!(
                dials.sweep_expired().unwrap(),
                0,
                "nothing is past its deadline yet"
            );
            let mut map = map;
            map.insert(dial_key(7, client, app), monotonic_ns() - 1, 0)
                .unwrap();
            assert_eq!(dials.sweep_expired().unwrap(), 1);
            assert_eq!(root.entries(), [dial_key(8, client, app)]);
        }

        #[test]
        fn a_map_of_another_layout_is_refused() {
            let root = PinRoot::new("layout");
            root.pin_hash(8, 8, 2);
            let Err(e) = ProxyDials::open(&root.0) else {
                panic!("a map with 8-byte keys was taken for SLUICE_PROXY_DIALS");
            };
            assert!(e.to_string().contains(maps::PROXY_DIALS), "{e}");
            assert!(!ProxyDials::is_full(&e));
        }
    }
}
