//! Sandboxes released by CNI DEL whose processes may still be running: the runtime tears the
//! network down and kills the processes in either order, and the rescan must not capture a
//! dying sandbox again (its address may already be another pod's).
//!
//! A released sandbox is known by its netns inode number, compared with the netns a process of
//! the pod runs in. The kernel reuses a freed number for the next namespace it creates (the
//! lowest free one), so a number alone would also match the pod's *next* sandbox, which would
//! then never be captured. Neither (inode, device) nor a cookie helps here: every namespace
//! file is on the one nsfs device, and `SO_NETNS_COOKIE` needs Linux 5.14 (the floor is 5.10).
//! So the agent holds the released netns open: while it holds it, the namespace exists and no
//! other one can have its number, which makes the comparison exact. It lets go when the
//! comparison can no longer matter: no process of the pod is left (anything that runs later is
//! in a new sandbox), the pod's next sandbox is seen or ADDed, or the pod leaves the world.
//! Holding it costs nothing while the processes linger (they hold it too), and at most one
//! rescan's time after they are gone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_capture::netns::Netns;

/// What the pod's released sandbox is now, as a process of the pod shows it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// The process runs in the released netns: the sandbox is still dying, released this long
    /// ago. It stays uncaptured.
    Lingering(Duration),
    /// The process runs in another netns, a new sandbox: the released one is forgotten.
    Replaced,
    /// The pod has no released sandbox.
    Unknown,
}

/// Released sandboxes by pod uid, each with its netns held open (see the module's comment).
#[derive(Default)]
pub(super) struct Released {
    by_uid: HashMap<String, Tombstone>,
}

struct Tombstone {
    /// Held, never used: it keeps `ino` from being given to another namespace.
    _netns: Netns,
    ino: u64,
    at: Instant,
}

impl Released {
    /// Remembers pod `uid`'s sandbox in `netns`, released just now (replacing an earlier one).
    pub(super) fn insert(&mut self, uid: String, netns: Netns, ino: u64) {
        let tombstone = Tombstone {
            _netns: netns,
            ino,
            at: Instant::now(),
        };
        self.by_uid.insert(uid, tombstone);
    }

    /// Lets go of pod `uid`'s released sandbox: no process of the pod is left, or a new
    /// sandbox of it came (ADD).
    pub(super) fn forget(&mut self, uid: &str) {
        self.by_uid.remove(uid);
    }

    /// Keeps only the pods `keep` says are still in the world.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_uid.retain(|uid, _| keep(uid));
    }

    /// Where a process of pod `uid`, running in netns inode `ino`, stands; forgets the released
    /// sandbox when the process shows a new one. The comparison is exact because the released
    /// netns is held open.
    pub(super) fn seen(&mut self, uid: &str, ino: u64) -> Seen {
        match self.by_uid.get(uid) {
            None => Seen::Unknown,
            Some(tombstone) if tombstone.ino == ino => Seen::Lingering(tombstone.at.elapsed()),
            Some(_) => {
                self.by_uid.remove(uid);
                Seen::Replaced
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_netns() -> (Netns, u64) {
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        let ino = netns.inode().unwrap();
        (netns, ino)
    }

    #[test]
    fn a_process_in_the_released_netns_lingers_one_in_another_is_a_new_sandbox() {
        let mut released = Released::default();
        let (netns, ino) = own_netns();
        assert_eq!(released.seen("uid-1", ino), Seen::Unknown);
        released.insert("uid-1".into(), netns, ino);
        assert!(matches!(released.seen("uid-1", ino), Seen::Lingering(_)));
        assert!(
            matches!(released.seen("uid-1", ino), Seen::Lingering(_)),
            "lingering processes keep the sandbox released"
        );
        assert_eq!(released.seen("uid-2", ino), Seen::Unknown, "per pod");
        assert_eq!(released.seen("uid-1", ino + 1), Seen::Replaced);
        assert_eq!(
            released.seen("uid-1", ino),
            Seen::Unknown,
            "once a new sandbox is seen, the released one is forgotten"
        );
    }

    #[test]
    fn the_released_sandbox_is_forgotten_with_its_processes_or_its_pod() {
        let mut released = Released::default();
        let (netns, ino) = own_netns();
        released.insert("uid-1".into(), netns, ino);
        let (netns, ino) = own_netns();
        released.insert("uid-2".into(), netns, ino);
        released.forget("uid-1");
        assert_eq!(released.seen("uid-1", ino), Seen::Unknown);
        released.retain(|uid| uid != "uid-2");
        assert_eq!(released.seen("uid-2", ino), Seen::Unknown);
    }
}
