//! Network namespaces: the one place in sluice that calls `setns(2)`.
//!
//! The proxy lives in the host netns and creates sockets inside pods' netns; the iptables
//! backend runs `iptables-restore` inside them. A socket keeps the netns it was created in, so
//! only socket creation has to happen "inside".

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `SIOCGSKNS` (Linux 4.9): opens the network namespace a socket lives in.
const SIOCGSKNS: libc::c_ulong = 0x894c;

thread_local! {
    /// The netns each thread started in, where `Netns::run` returns it.
    static HOME: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the netns at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`, a CNI `CNI_NETNS`).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(Self { file, path })
    }

    /// Adopts a netns fd received from elsewhere (the agent's hand-off); `label` names it in
    /// logs and errors.
    pub fn from_fd(fd: std::os::fd::OwnedFd, label: impl Into<PathBuf>) -> Self {
        Self {
            file: File::from(fd),
            path: label.into(),
        }
    }

    /// Resolves `--netns` style arguments: a path, or a name under `/var/run/netns`.
    pub fn open_named_or_path(arg: &str) -> io::Result<Self> {
        if arg.contains('/') {
            Self::open(arg)
        } else {
            Self::open(Path::new("/var/run/netns").join(arg))
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this netns, then moves the thread back.
    ///
    /// `f` must not block for long (on a tokio worker it holds the thread) and must not call
    /// `run` itself. If moving back fails the process aborts, because a thread silently left in
    /// a pod's netns would create every later socket there.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        HOME.with(|home| {
            // Opened on the thread's first call, while it is still in its own netns: the
            // per-connection path then costs two setns(2) calls and nothing else.
            let home = match home.get() {
                Some(home) => home,
                None => {
                    let file = File::open("/proc/thread-self/ns/net")?;
                    let _ = home.set(file);
                    home.get()
                        .ok_or_else(|| io::Error::other("thread-local netns handle unset"))?
                }
            };
            setns(self.file.as_fd())?;
            let out = f();
            if let Err(e) = setns(home.as_fd()) {
                eprintln!("sluice: cannot return to the original network namespace: {e}; aborting");
                std::process::abort();
            }
            Ok(out)
        })
    }

    /// A command that starts inside this netns (the child joins it before `exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> io::Result<Command> {
        let fd = self.file.try_clone()?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd that the
        // closure owns.
        unsafe {
            cmd.pre_exec(move || setns(fd.as_fd()));
        }
        Ok(cmd)
    }

    /// The namespace's inode number: sluice's per-pod key in the BPF maps (see
    /// `sluice_common::PodKey` for why not the netns cookie).
    pub fn inode(&self) -> io::Result<u64> {
        Ok(std::os::unix::fs::MetadataExt::ino(&self.file.metadata()?))
    }

    /// The addresses configured inside the netns, except loopback and IPv6 link-local.
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        self.run(interface_addresses)?
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The inode number of the network namespace a socket lives in, as [`Netns::inode`] gives it.
pub fn socket_netns_inode(socket: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd (or -1), which we own.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS as _) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    let netns = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Ok(std::os::unix::fs::MetadataExt::ino(&netns.metadata()?))
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the fd; CLONE_NEWNET checks it is a network namespace.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        let link_local_v6 = matches!(addr, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if !addr.is_loopback() && !link_local_v6 && !out.contains(&addr) {
            out.push(addr);
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
