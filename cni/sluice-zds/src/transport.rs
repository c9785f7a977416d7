//! `SOCK_SEQPACKET` on a Unix socket: message boundaries kept by the kernel, ordered and
//! reliable, and file descriptors passed with `SCM_RIGHTS`. Blocking calls; async users wrap
//! the fd (it is a plain socket).
//!
//! Whoever reaches the socket can hand the proxy any netns (the agent's side) or learn every
//! pod and refuse them service (the proxy's side), so only root may: the socket is 0600 in a
//! 0700 directory, and each end checks the other's `SO_PEERCRED`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use prost::Message;

use crate::{MAX_MESSAGE, ZdsError};

/// At most this many fds are accepted with one message (ZDS sends at most one); more are closed.
const MAX_FDS: usize = 4;

/// One end of a hand-off connection.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A message as received, with the descriptors that came with it (closed on drop if unused).
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Received {
    /// Decodes the message as `M`.
    pub fn decode<M: Message + Default>(&self) -> Result<M, ZdsError> {
        Ok(M::decode(self.bytes.as_slice())?)
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is longer than {} bytes",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// The credentials the kernel recorded for the other end of a connection (`SO_PEERCRED`): the
/// connecting process's as of its `connect`, or, seen from the connecting side, the listening
/// process's as of its `listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The credentials of the peer of a connected Unix socket (`SO_PEERCRED`): the connecting
/// process's for an accepted socket, the listening one's for a connected one.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain data; all zeroes is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a ucred buffer of the size given, on a socket the caller holds.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

impl PeerCred {
    /// This peer if it is root, else [`ZdsError::PeerNotRoot`]: the agent and the proxy both
    /// run as root, so anyone else at the other end is neither.
    pub fn require_root(self) -> Result<Self, ZdsError> {
        if self.uid == 0 {
            Ok(self)
        } else {
            Err(ZdsError::PeerNotRoot {
                pid: self.pid,
                uid: self.uid,
            })
        }
    }
}

impl Channel {
    /// A connected pair in this process (tests, and an agent and proxy in one process).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two fds into the array.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned from here on.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Connects to the agent's socket (the proxy side).
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let fd = seqpacket()?;
        let (addr, len) = unix_addr(path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        let ret = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Channel { fd })
    }

    /// The process id of the peer when it connected (`SO_PEERCRED`): the agent finds the proxy's
    /// cgroup from it.
    pub fn peer_pid(&self) -> io::Result<u32> {
        Ok(self.peer()?.pid)
    }

    /// The peer's credentials, if it is root (see [`PeerCred::require_root`]). Both ends call
    /// this before trusting anything the other sends.
    pub fn root_peer(&self) -> Result<PeerCred, ZdsError> {
        self.peer()?.require_root()
    }

    /// The peer's credentials (`SO_PEERCRED`).
    pub fn peer(&self) -> io::Result<PeerCred> {
        peer_cred(self.fd.as_fd())
    }

    /// Whether the peer has hung up, without blocking. Used between requests, when nothing is
    /// expected from the peer, to notice a proxy that went away.
    pub fn peer_gone(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let ret = unsafe { libc::poll(&mut pfd, 1, 0) };
        ret < 0 || pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }

    /// Bounds every later `recv` (and `send`) by `timeout`; `None` waits forever. A timed-out
    /// call fails with `WouldBlock`.
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: a valid timeval of the size given, on our own socket.
            let ret = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::from_ref(&tv).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Sends one message, with `fd` attached if given.
    pub fn send(&self, message: &impl Message, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let bytes = message.encode_to_vec();
        if bytes.len() > MAX_MESSAGE {
            return Err(ZdsError::TooLarge(bytes.len()));
        }
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // Room for one fd's control message, u64-aligned as cmsg requires.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; zeroes is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points at `space` bytes of aligned buffer, enough for one
            // cmsghdr carrying one int; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Receives one message and the fds sent with it. A closed peer is `UnexpectedEof`.
    pub fn recv(&self) -> Result<Received, ZdsError> {
        let mut bytes = vec![0u8; MAX_MESSAGE];
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: as in send.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at live, writable buffers; MSG_CMSG_CLOEXEC marks received fds.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // Take ownership of every fd first, so none leaks whatever happens next.
        let mut fds = Vec::new();
        // SAFETY: the kernel filled msg_control; the CMSG_* macros walk it within its length.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let header = libc::CMSG_LEN(0) as usize;
                    let count = ((*cmsg).cmsg_len as usize - header) / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(ZdsError::TooLarge(MAX_MESSAGE));
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
            return Err(ZdsError::Fds(
                fds.len(),
                "more than a ZDS message ever carries",
            ));
        }
        if n == 0 && fds.is_empty() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        bytes.truncate(n as usize);
        Ok(Received { bytes, fds })
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The agent's listening socket. The socket file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: std::path::PathBuf,
}

impl Listener {
    /// Binds `path` with mode 0600, replacing a stale socket file from an earlier run. Its
    /// directory is created with mode 0700 if missing; an existing one must be a directory of
    /// mode 0700 (nothing for group or others) owned by this process's user, else
    /// [`ZdsError::UnsafeDir`] and nothing is bound.
    pub fn bind(path: &Path) -> Result<Listener, ZdsError> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        private_dir(dir)?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let fd = seqpacket()?;
        let (addr, len) = unix_addr(path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        // bind(2) gives the file the umask's mode. Nobody but us can reach it yet (the directory
        // is ours alone, and nothing is accepted before listen), so narrowing it now leaves no
        // window, and a directory loosened later still does not open the socket.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        // SAFETY: listen on our own bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Waits for the next proxy to connect.
    pub fn accept(&self) -> io::Result<Channel> {
        // SAFETY: accept4 with null address arguments; the fd is owned right after.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Channel {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes sure `dir` is a directory only its owner, this process's user, can enter: creates it
/// with mode 0700 if missing; an existing one is refused unless it already is such a directory
/// (it is never loosened nor fixed here: a wrong mode or owner is for the operator to look at).
fn private_dir(dir: &Path) -> Result<(), ZdsError> {
    let unsafe_dir = |why: String| ZdsError::UnsafeDir {
        dir: dir.to_path_buf(),
        why,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        // The umask can only have taken bits off; 0700 exactly, whatever it was.
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("create the ZDS socket's directory {}: {e}", dir.display()),
            )
            .into());
        }
    }
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory".to_owned()));
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not by this process's uid {me}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "mode {mode:04o} lets group or others in"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
