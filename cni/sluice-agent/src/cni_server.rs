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
            let (tx, rx) = mpsc::channel();
            if events.send(Event::Cni(request, tx)).is_err() {
                stopping()
            } else {
                // The loop answers within `wait` (its waiters expire then); the margin covers
                // the capture work itself.
                rx.recv_timeout(wait + Duration::from_secs(5))
                    .unwrap_or_else(|_| stopping())
            }
        }
        Err(e) => Reply::Failed {
            code: ErrorCode::Decode as u32,
            msg: "the agent cannot decode the plugin's request".into(),
            details: format!("{e}; run the same sluice version for plugin and agent"),
        },
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
