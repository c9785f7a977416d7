//! Finding a running pod on the node by its uid: its cgroup from the layout kubelet gives the
//! cgroup tree, its network namespace from a process in that cgroup.
//!
//! kubelet names a pod's cgroup after its uid with either cgroup driver:
//! - cgroupfs: `…/kubepods/burstable/pod0b9b1c52-5d6e-4b8e-9a7c-3f0d2e1a4b5c/<container>`
//! - systemd: `…/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod0b9b1c52_5d6e_4b8e_9a7c_3f0d2e1a4b5c.slice/cri-containerd-<id>.scope`
//!
//! The pod-level directory exists before the runtime starts the sandbox (kubelet creates it
//! first), so it is there when the CNI plugin runs, even if no process is in it yet.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sluice_capture::netns::Netns;

/// Deeper than any kubelet layout, including nested ones (kind, k3d).
const MAX_DEPTH: usize = 10;
/// Bounds the walk on nodes with very large cgroup trees.
const MAX_DIRS: usize = 200_000;

/// The pod uid a cgroup directory name stands for, with either driver.
pub fn pod_uid_of_cgroup(name: &str) -> Option<String> {
    if let Some(slice) = name.strip_suffix(".slice") {
        // systemd: the uid's dashes became underscores, because '-' nests slices.
        let (_, uid) = slice.rsplit_once("-pod")?;
        return valid_uid(uid).then(|| uid.replace('_', "-"));
    }
    let uid = name.strip_prefix("pod")?;
    valid_uid(uid).then(|| uid.to_owned())
}

fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Every pod cgroup under `root`, by pod uid: one walk for all pods.
pub fn pod_cgroups(root: &Path) -> io::Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut queue = vec![(root.to_path_buf(), 0usize)];
    let mut visited = 0;
    while let Some((dir, depth)) = queue.pop() {
        visited += 1;
        if visited > MAX_DIRS {
            break;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A cgroup removed while we walk is not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if let Some(uid) = entry.file_name().to_str().and_then(pod_uid_of_cgroup) {
                // Containers sit below the pod; nothing further down is another pod.
                found.insert(uid, path);
            } else if depth < MAX_DEPTH {
                queue.push((path, depth + 1));
            }
        }
    }
    Ok(found)
}

/// The network namespace of a process in `cgroup` or below it (a pod's containers share one),
/// or `None` when no process runs there yet.
pub fn netns_of_cgroup(cgroup: &Path) -> io::Result<Option<(Netns, PathBuf)>> {
    let mut queue = vec![cgroup.to_path_buf()];
    while let Some(dir) = queue.pop() {
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(procs) => procs,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // The process may exit between the listing and the open: try the next one.
            if let Ok(netns) = Netns::open(&path) {
                return Ok(Some((netns, path)));
            }
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push(entry.path());
            }
        }
    }
    Ok(None)
}

/// The cgroup v2 directory of process `pid` (the `0::` line of `/proc/PID/cgroup`, which is
/// relative to our cgroup namespace: the host's, see `join_host_cgroup_namespace`) under `root`,
/// the host's cgroup v2 mount.
pub fn cgroup_of_pid(pid: u32, root: &std::path::Path) -> io::Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other(format!("process {pid} is in no cgroup v2 hierarchy")))?;
    Ok(root.join(relative.trim_start_matches('/')))
}

/// In a container the agent has its own cgroup namespace (containerd gives every container one
/// on cgroup v2), where `/proc/PID/cgroup` of other processes reads `/../..`. With the host's
/// pids (hostPID) and privilege it joins pid 1's cgroup namespace, so those paths are the
/// host's again. Called before any thread starts (setns changes only the calling thread).
/// Where nothing differs (a host install, the tests) it does nothing.
pub fn join_host_cgroup_namespace() -> io::Result<bool> {
    let inode = |p: &str| std::fs::metadata(p).map(|m| m.ino());
    if inode("/proc/1/ns/cgroup")? == inode("/proc/self/ns/cgroup")? {
        return Ok(false);
    }
    let host = std::fs::File::open("/proc/1/ns/cgroup")?;
    // SAFETY: setns(2) on an fd we own; it affects only this (still the only) thread.
    if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The network namespaces sluice must never capture: the node's own (pid 1's) and the agent's.
pub fn host_netns_inodes() -> Vec<u64> {
    ["/proc/1/ns/net", "/proc/self/ns/net"]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.ino()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cgroup_drivers_name_the_pod_by_uid() {
        let uid = "0b9b1c52-5d6e-4b8e-9a7c-3f0d2e1a4b5c";
        assert_eq!(
            pod_uid_of_cgroup(&format!("pod{uid}")).as_deref(),
            Some(uid)
        );
        let systemd = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_cgroup(&systemd).as_deref(), Some(uid));
        let besteffort = format!("kubepods-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_cgroup(&besteffort).as_deref(), Some(uid));
        for other in [
            "kubepods",
            "kubepods-burstable.slice",
            "burstable",
            "pod",
            "cri-containerd-ab.scope",
            "podman.slice",
            "pods.d",
        ] {
            assert_eq!(pod_uid_of_cgroup(other), None, "{other}");
        }
    }
}
