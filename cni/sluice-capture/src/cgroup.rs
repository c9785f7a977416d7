//! Finding and using cgroup v2 directories.

use std::io;
use std::path::{Path, PathBuf};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones (like these VMs).
pub fn v2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted"))
}

/// Moves process `pid` into the cgroup at `dir`.
pub fn join(dir: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}
