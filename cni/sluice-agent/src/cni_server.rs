//! The socket the plugin talks to: one JSON request per connection, answered by the event loop.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use sluice_cni::agent_api::{Reply, Request};
use sluice_cni::spec::ErrorCode;
use tracing::{debug, warn};

use crate::node::Event;

/// Longest a request line may be; real ones are a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;

/// The listening socket; its file is removed on drop.
pub struct CniServer {
    listener: UnixListener,
    path: PathBuf,
}

impl CniServer {
    /// Binds `path` (replacing a stale socket file), readable and writable by root only: anyone
    /// who can talk to it can have pods captured.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves connections on a thread each (the plugin blocks on its answer while the proxy
    /// takes the pod), forwarding requests to the event loop.
    pub fn serve(self, events: Sender<Event>, wait: Duration) {
        std::thread::spawn(move || {
            for stream in self.listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "CNI socket accept failed");
                        continue;
                    }
                };
                let events = events.clone();
                std::thread::spawn(move || {
                    if let Err(e) = answer(stream, &events, wait) {
                        debug!(error = %e, "CNI request connection failed");
                    }
                });
            }
        });
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(stream: UnixStream, events: &Sender<Event>, wait: Duration) -> std::io::Result<()> {
    // The runtime runs the plugin as root; anyone else got through a loosened socket file and
    // could have pods captured or released. Nothing it sends is read.
    let peer = sluice_zds::peer_cred(std::os::fd::AsFd::as_fd(&stream))?;
    if peer.uid != 0 {
        warn!(
            peer_pid = peer.pid,
            peer_uid = peer.uid,
            "refused a CNI request: the peer is not root (check the socket's mode)"
        );
        return Ok(());
    }
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (command, container) = (request.command, request.container_id.clone());
            let pod = request.pod.as_ref().map(ToString::to_string);
            let (tx, rx) = mpsc::channel();
            let answer = if events.send(Event::Cni(request, tx)).is_err() {
                None
            } else {
                // The loop answers within `wait` (its waiters expire then); the margin covers
                // the capture work itself.
                rx.recv_timeout(wait + Duration::from_secs(5)).ok()
            };
            answer.unwrap_or_else(|| {
                warn!(
                    ?command,
                    container,
                    pod = pod.as_deref().unwrap_or("-"),
                    "CNI request not answered: the agent is stopping or its event loop is stuck"
                );
                stopping()
            })
        }
        Err(e) => {
            warn!(error = %e, "CNI request undecodable: is the plugin the agent's version?");
            Reply::Failed {
                code: ErrorCode::Decode as u32,
                msg: "the agent cannot decode the plugin's request".into(),
                details: format!("{e}; run the same sluice version for plugin and agent"),
            }
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

fn stopping() -> Reply {
    Reply::Failed {
        code: ErrorCode::TryAgainLater as u32,
        msg: "the sluice agent is stopping or busy".into(),
        details: "the runtime retries the sandbox".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    use sluice_cni::agent_api::Command;

    use super::*;

    const NOBODY: u32 = 65534;

    /// Removes the test's directory, whatever happens.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_non_root_peer_is_never_heard_even_through_a_loosened_socket() {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test runs a peer as uid {NOBODY}: run it as root"
        );
        let dir =
            TempDir(std::env::temp_dir().join(format!("sluice-cni-peer-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("cni.sock");
        let server = CniServer::bind(&path).unwrap();
        // As a careless umask or a hostile chmod would leave it: the peer check must still hold.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (events, heard) = mpsc::channel();
        server.serve(events, Duration::from_secs(1));
        let request = Request {
            command: Command::Status,
            container_id: "c".into(),
            netns: None,
            pod: None,
            ips: Vec::new(),
        };
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');

        // Root (the runtime) is heard and answered.
        let mut root = UnixStream::connect(&path).unwrap();
        root.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        root.write_all(&line).unwrap();
        match heard.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Cni(got, reply)) => {
                assert_eq!(got, request);
                reply.send(Reply::Done).unwrap();
            }
            _ => panic!("root's request did not reach the event loop"),
        }
        let mut answer = String::new();
        BufReader::new(&root).read_line(&mut answer).unwrap();
        assert!(answer.contains("done"), "{answer}");

        // Nobody connects, sends the same request and waits for an answer: none comes, and
        // nothing reaches the loop.
        // SAFETY: sockaddr_un is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let mut child = std::process::Command::new("true");
        // SAFETY: between fork and exec the closure makes only raw system calls on data
        // prepared before the fork, as a forked child of a threaded process must.
        unsafe {
            child.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, std::ptr::from_ref(&addr).cast(), len) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let timeout = libc::timeval {
                    tv_sec: 10,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::from_ref(&timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                libc::write(fd, line.as_ptr().cast(), line.len());
                let mut buf = [0u8; 64];
                if libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {
                    // Answered: the agent listened to a non-root peer.
                    return Err(std::io::Error::from_raw_os_error(libc::EPROTO));
                }
                Ok(())
            });
        }
        let status = child
            .status()
            .expect("the non-root peer connected and got no answer");
        assert!(status.success());
        assert!(
            heard.recv_timeout(Duration::from_millis(300)).is_err(),
            "a non-root peer's request must never reach the event loop"
        );
    }
}
