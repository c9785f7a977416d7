//! The few `bpf(2)` commands aya 0.14 does not expose for every link type: creating a link from a
//! loaded program, pinning it, opening a pin and force-detaching. Links made here are plain fds,
//! so sk_lookup, cgroup sockopt and sock_addr links are all pinned the same way.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `enum bpf_attach_type` values sluice uses.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    GetSockopt = 21,
    Inet4GetPeerName = 29,
    Inet6GetPeerName = 30,
    SockRelease = 34,
    SkLookup = 36,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    // The kernel requires every byte past what it reads to be zero; keep room for the
    // type-specific tail of the union.
    tail: [u64; 4],
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// Runs a loaded program once on a synthetic context (`BPF_PROG_TEST_RUN`, context-only program
/// types such as sk_lookup); returns the program's return value, `ctx` holds the context after.
pub fn prog_test_run_ctx(prog: BorrowedFd<'_>, ctx: &mut [u8]) -> io::Result<u32> {
    let mut out = vec![0u8; ctx.len()];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_size_out: out.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ctx_out: out.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    ctx.copy_from_slice(&out);
    Ok(attr.retval)
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr points to a live, initialised, #[repr(C)] struct of the given size, laid out as
    // the kernel's `union bpf_attr` member for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// Attaches `prog` to `target` (a netns fd or a cgroup dir fd) as a bpf_link. Cgroup links
/// always allow other programs beside them (BPF_F_ALLOW_MULTI semantics), so sluice composes
/// with whatever else is attached (e.g. Cilium's socket LB on the root cgroup).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type: attach as u32,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object (link, map, program) at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a link now, even while other fds or pins still refer to it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
        pad: 0,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Before Linux 5.11 BPF maps and programs are charged against `RLIMIT_MEMLOCK` (often 64 KiB
/// or 8 MiB), which the SOCKHASH and the per-pod maps exceed; 5.11+ charges the memory cgroup
/// instead and ignores the limit. Raising it needs CAP_SYS_RESOURCE, which the agent has; if it
/// fails, the load that follows reports EPERM with the map's name.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct and has no other effect on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// A socket's cookie (`SO_COOKIE`, Linux 4.12), the key BPF programs see for it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the given size; the fd is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
