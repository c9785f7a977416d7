//! Moving bytes between the two halves of a proxied connection.
//!
//! The default path splices: socket → pipe → socket with `splice(2)`, so payload pages move
//! inside the kernel and never cross into userspace. Each direction owns one pipe and always
//! drains it before reading more, so the pipe can never fill and block. The buffered path
//! (tokio's `copy_bidirectional`) is kept to measure the difference (`cargo xtask bench`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// How the proxy copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CopyMode {
    /// splice(2) through a pipe: zero copies through userspace.
    Splice,
    /// read/write through a userspace buffer (tokio's copy_bidirectional).
    Buffered,
}

/// Pipe capacity per direction; bigger pipes mean fewer syscalls per byte. Linux lets an
/// unprivileged process go up to /proc/sys/fs/pipe-max-size (1 MiB by default).
const PIPE_SIZE: usize = 256 * 1024;

/// Bytes moved in each direction: (a → b, b → a).
pub async fn bidirectional(
    mode: CopyMode,
    a: &mut TcpStream,
    b: &mut TcpStream,
) -> io::Result<(u64, u64)> {
    match mode {
        CopyMode::Splice => {
            let (a, b) = (&*a, &*b);
            tokio::try_join!(splice_one_way(a, b), splice_one_way(b, a))
        }
        CopyMode::Buffered => {
            tokio::io::copy_bidirectional_with_sizes(a, b, 64 * 1024, 64 * 1024).await
        }
    }
}

/// Splices `src` into `dst` until `src` reaches EOF, then half-closes `dst`.
async fn splice_one_way(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // Peer finished sending: pass the FIN on, keep the other direction open.
            let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets mean "use and
    // advance the fd's own position", which is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int argument. Failing leaves the default size (64 KiB).
        let set = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let size = if set > 0 { set as usize } else { 64 * 1024 };
        Ok(Self { read, write, size })
    }
}
