//! Guards for the kernel objects a lab creates. Each guard removes its object on drop, in the
//! reverse order of creation (processes, then capture, then cgroups and namespaces).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::app::Placement;
use sluice_capture::ebpf::{self, EbpfCapture};
use sluice_capture::iptables::IptablesCapture;
use sluice_capture::{Backend, PodCapture, PodUid, Redirector};

/// A name no other lab on this machine uses at the same time: pid + per-process counter.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{:x}",
        std::process::id() % 0xfffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and fails with its stderr if it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    pub name: String,
}

impl NetnsGuard {
    pub fn new(name: String) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let guard = Self { name };
        guard.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(guard)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace and fails if it fails.
    pub fn exec(&self, argv: &[&str]) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv))
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn output(&self, argv: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Deleting the netns also deletes the veth ends inside it (and so their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory, removed on drop once its processes are gone.
#[derive(Debug)]
pub struct CgroupGuard {
    pub path: PathBuf,
}

impl CgroupGuard {
    pub fn new(name: &str) -> Result<Self> {
        let root = sluice_capture::cgroup::v2_root().context("find the cgroup v2 mount")?;
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // Processes are killed before this runs; their exit may take a moment to reach the
        // cgroup, so retry briefly (bounded).
        for _ in 0..50 {
            if remove_cgroup_tree(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("lab: could not remove cgroup {}", self.path.display());
    }
}

/// Removes a cgroup and the child cgroups a test made below it, deepest first (a cgroup
/// directory holds only kernel files besides its children, and rmdir takes those with it).
fn remove_cgroup_tree(path: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(path)
}

/// A temporary directory, removed with its contents on drop.
#[derive(Debug)]
pub struct DirGuard(pub PathBuf);

impl DirGuard {
    pub fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bpffs pin root used by one lab; everything under it is detached and removed on drop.
#[derive(Debug)]
pub struct PinRootGuard {
    pub path: PathBuf,
}

impl Drop for PinRootGuard {
    fn drop(&mut self) {
        if let Err(e) = ebpf::remove_pin_root(&self.path) {
            eprintln!(
                "lab: could not remove pin root {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The addresses of the two hosts of a lab, on their own veth link. Labs never share a link,
/// so every lab can use the same addresses.
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// IPv6 addresses added by [`Lab::add_ipv6`].
pub const PEER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
pub const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);

/// Two network namespaces joined by a veth pair: `pod` (the captured workload) and `peer` (a
/// client or server outside the mesh), plus the pod's and the proxy's cgroups.
///
/// Field order is drop order: capture first, then cgroups, then namespaces.
pub struct Lab {
    pub id: String,
    pub backend: Backend,
    pub capture: Option<Box<dyn Redirector>>,
    pub pod: PodCapture,
    pub pins: Option<PinRootGuard>,
    pub pod_cgroup: CgroupGuard,
    pub proxy_cgroup: CgroupGuard,
    pub pod_ns: NetnsGuard,
    pub peer_ns: NetnsGuard,
}

impl Lab {
    /// Builds the namespaces, the link and the cgroups; capture is not on yet.
    pub fn new(backend: Backend) -> Result<Self> {
        let id = unique_id();
        let pod_ns = NetnsGuard::new(format!("sluice-{id}-pod"))?;
        let peer_ns = NetnsGuard::new(format!("sluice-{id}-peer"))?;
        let (pod_if, peer_if) = (format!("sl{id}p"), format!("sl{id}q"));
        run(Command::new("ip").args([
            "link",
            "add",
            &pod_if,
            "netns",
            &pod_ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            &peer_ns.name,
        ]))?;
        pod_ns.exec(&["ip", "addr", "add", &format!("{POD_IP}/24"), "dev", &pod_if])?;
        pod_ns.exec(&["ip", "link", "set", &pod_if, "up"])?;
        peer_ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{PEER_IP}/24"),
            "dev",
            &peer_if,
        ])?;
        peer_ns.exec(&["ip", "link", "set", &peer_if, "up"])?;
        let pod_cgroup = CgroupGuard::new(&format!("sluice-{id}-pod"))?;
        let proxy_cgroup = CgroupGuard::new(&format!("sluice-{id}-proxy"))?;
        let mut pod = PodCapture::new(PodUid::parse(&format!("pod-{id}"))?, pod_ns.path());
        pod.cgroup = Some(pod_cgroup.path.clone());
        // What the node assigned (as a CNI result would say), never read from inside the pod.
        pod.addrs = vec![POD_IP.into()];
        Ok(Self {
            id,
            backend,
            capture: None,
            pod,
            pins: None,
            pod_cgroup,
            proxy_cgroup,
            pod_ns,
            peer_ns,
        })
    }

    /// Gives both hosts an IPv6 address on their link too (before [`Lab::capture`], so the
    /// pod's address list includes it). `nodad`: usable at once, no duplicate detection wait.
    pub fn add_ipv6(&mut self) -> Result<()> {
        self.pod.addrs.push(POD_IP6.into());
        let (pod_if, peer_if) = (format!("sl{}p", self.id), format!("sl{}q", self.id));
        self.pod_ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{POD_IP6}/64"),
            "dev",
            &pod_if,
            "nodad",
        ])?;
        self.peer_ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{PEER_IP6}/64"),
            "dev",
            &peer_if,
            "nodad",
        ])?;
        Ok(())
    }

    /// A server process inside the pod (inbound capture is per netns).
    pub fn in_pod(&self) -> Placement {
        Placement {
            netns: self.pod_ns.path(),
            cgroup: None,
        }
    }

    /// A client process of the pod: its netns and its cgroup (outbound capture is per cgroup).
    pub fn in_pod_cgroup(&self) -> Placement {
        Placement {
            netns: self.pod_ns.path(),
            cgroup: Some(self.pod_cgroup.path.clone()),
        }
    }

    /// A client process in a container of the pod: a child cgroup below the pod's, as the
    /// container runtime makes one per container. Outbound capture must find the pod from there.
    pub fn in_pod_container(&self, container: &str) -> Result<Placement> {
        let path = self.pod_cgroup.path.join(container);
        if !path.exists() {
            std::fs::create_dir(&path)
                .with_context(|| format!("create container cgroup {}", path.display()))?;
        }
        Ok(Placement {
            netns: self.pod_ns.path(),
            cgroup: Some(path),
        })
    }

    /// A process on the peer host, outside the mesh.
    pub fn in_peer(&self) -> Placement {
        Placement {
            netns: self.peer_ns.path(),
            cgroup: None,
        }
    }

    /// The lab's own pin root, so labs never share BPF maps.
    pub fn pin_root(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(format!("sluice-lab-{}", self.id))
    }

    /// Loads the backend (as the agent would) and captures the pod.
    pub fn capture(&mut self) -> Result<()> {
        let mut capture = self.load_backend()?;
        capture.enroll(&self.pod).context("enrol the pod")?;
        self.capture = Some(capture);
        Ok(())
    }

    /// A fresh loader instance, as after an agent restart: adopts what is pinned.
    pub fn load_backend(&mut self) -> Result<Box<dyn Redirector>> {
        Ok(match self.backend {
            Backend::Ebpf => {
                if self.pins.is_none() {
                    self.pins = Some(PinRootGuard {
                        path: self.pin_root(),
                    });
                }
                let mut capture = EbpfCapture::load(self.pin_root())?;
                capture.attach_proxy(&self.proxy_cgroup.path)?;
                Box::new(capture)
            }
            Backend::Iptables => Box::new(IptablesCapture::new()),
        })
    }

    /// Releases the pod (idempotent).
    pub fn release(&mut self) -> Result<()> {
        let mut capture = match self.capture.take() {
            Some(capture) => capture,
            None => self.load_backend()?,
        };
        capture.remove(&self.pod).context("remove the pod")?;
        Ok(())
    }
}
