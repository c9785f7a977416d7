//! The proxy's only contact with BPF: registering its in-pod 15006 listener in the pinned
//! `SLUICE_PROXY_INBOUND` socket map, keyed by the pod's netns inode, so sk_lookup can hand it
//! the pod's inbound connections. The kernel drops the entry when the socket closes, so a dead
//! proxy leaves an empty slot and inbound connections are refused, never passed around it.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{Map, MapData, SockHash};
use sluice_common::{PodKey, maps};

use crate::CaptureError;
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
