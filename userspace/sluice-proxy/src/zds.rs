//! The proxy's side of the ZDS hand-off: connect to the agent's socket, say hello, then carry
//! out each request and answer it with one ack. The socket calls are blocking, so they run on
//! their own thread; each request is handed to the runtime, which owns the pods, and the ack
//! waits for its answer.
//!
//! On disconnect the thread reconnects (bounded backoff) and the agent sends a new snapshot;
//! the pods keep running meanwhile, and capture stays in place, so nothing is passed around the
//! proxy while it is away from the agent.
//!
//! What the socket says is trusted only so far: its listener must be root (`SO_PEERCRED`),
//! else it is not the agent and nothing is read from it; and an `add` whose netns is the
//! proxy's own (the node's) is refused, as it would put the proxy's listeners on the node.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sluice_capture::PodUid;
use sluice_capture::netns::Netns;
use sluice_zds::messages::workload_request::Payload;
use sluice_zds::messages::{Version, WorkloadRequest, WorkloadResponse, ZdsHello};
use sluice_zds::{Channel, ZdsError};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::stats::Stats;

/// Hand-off refusals, by reason: `sluice_zds_refused_total{reason}`.
#[derive(Debug, Default)]
pub struct ZdsStats {
    /// Connections to a socket whose listener is not root: not the agent.
    pub peer_not_root: AtomicU64,
    /// `add` requests carrying the proxy's own netns, the node's.
    pub node_netns: AtomicU64,
}

/// What the runtime is asked to do; `reply` carries the ack's error, if any.
pub enum Command {
    /// Serve this pod (idempotent for a pod already served in the same netns).
    Add {
        uid: PodUid,
        netns: Netns,
        /// The pod's name, namespace and service account, as the agent knows them.
        workload: Option<sluice_zds::messages::WorkloadInfo>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Stop serving this pod, closing its connections.
    Del {
        uid: PodUid,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The snapshot is complete: stop every pod it did not name.
    Snapshot {
        keep: HashSet<PodUid>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Starts the client thread. `connected` fires once per (re)connection, after the hello.
pub fn spawn(
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    connected: mpsc::UnboundedSender<()>,
    stats: Arc<Stats>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut backoff = FIRST_RETRY;
        loop {
            let mut established = false;
            match session(&path, &commands, &connected, &stats, &mut established) {
                Ok(()) => return, // the runtime is gone: the proxy is stopping
                Err(e) => {
                    warn!(socket = %path.display(), error = %e, "ZDS session ended; reconnecting")
                }
            }
            // A session that got going starts the backoff over: a restarted agent is found
            // within a second, however long an earlier outage was.
            if established {
                backoff = FIRST_RETRY;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    })
}

/// The first wait before reconnecting to the agent, doubled per failure up to [`MAX_RETRY`]:
/// connecting to a local socket is cheap, and while the agent is away new pods wait for it, so
/// the proxy retries often.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// One connection's worth of requests. `Ok` only when the runtime has shut down; `established`
/// says whether the hello went through.
fn session(
    path: &Path,
    commands: &mpsc::Sender<Command>,
    connected: &mpsc::UnboundedSender<()>,
    stats: &Stats,
    established: &mut bool,
) -> Result<(), ZdsError> {
    let channel = Channel::connect(path)?;
    // For a connected socket SO_PEERCRED names whoever called listen(2): the agent is root.
    if let Err(e) = channel.root_peer() {
        if let ZdsError::PeerNotRoot { pid, uid } = &e {
            Stats::incr(&stats.zds.peer_not_root);
            warn!(socket = %path.display(), peer_pid = pid, peer_uid = uid,
                  "refused the hand-off socket: its listener is not root, so it is not the agent");
        }
        return Err(e);
    }
    channel.send(
        &ZdsHello {
            version: Version::V1 as i32,
        },
        None,
    )?;
    info!(socket = %path.display(), "connected to the agent");
    *established = true;
    let _ = connected.send(());
    let mut snapshot: HashSet<PodUid> = HashSet::new();
    loop {
        let mut received = channel.recv()?;
        let request: WorkloadRequest = match received.decode() {
            Ok(request) => request,
            Err(e) => {
                channel.send(&WorkloadResponse::ack(Err(e.to_string())), None)?;
                continue;
            }
        };
        let (reply, answer) = oneshot::channel();
        let command = match request.payload {
            Some(Payload::Add(add)) => {
                let uid = match PodUid::parse(&add.uid) {
                    Ok(uid) => uid,
                    Err(e) => {
                        channel.send(&WorkloadResponse::ack(Err(e.to_string())), None)?;
                        continue;
                    }
                };
                if received.fds.len() != 1 {
                    let why = format!(
                        "add {uid}: expected exactly one netns fd, got {}",
                        received.fds.len()
                    );
                    channel.send(&WorkloadResponse::ack(Err(why)), None)?;
                    continue;
                }
                let fd = received.fds.remove(0);
                match is_own_netns(&fd) {
                    Ok(false) => {}
                    Ok(true) => {
                        Stats::incr(&stats.zds.node_netns);
                        warn!(pod = %uid, "refused an add carrying the node's own netns (the proxy's): a pod never runs there");
                        let why = format!(
                            "add {uid}: the netns is the node's own (the proxy's); a pod's netns \
                             is never the node's: refused"
                        );
                        channel.send(&WorkloadResponse::ack(Err(why)), None)?;
                        continue;
                    }
                    Err(e) => {
                        let why = format!("add {uid}: read the netns fd: {e}");
                        channel.send(&WorkloadResponse::ack(Err(why)), None)?;
                        continue;
                    }
                }
                snapshot.insert(uid.clone());
                let netns = Netns::from_fd(fd, format!("zds:{uid}"));
                Command::Add {
                    uid,
                    netns,
                    workload: add.workload_info,
                    reply,
                }
            }
            Some(Payload::Keep(keep)) => {
                match PodUid::parse(&keep.uid) {
                    Ok(uid) => {
                        snapshot.insert(uid);
                        channel.send(&WorkloadResponse::ack(Ok(())), None)?;
                    }
                    Err(e) => channel.send(&WorkloadResponse::ack(Err(e.to_string())), None)?,
                }
                continue;
            }
            Some(Payload::Del(del)) => match PodUid::parse(&del.uid) {
                Ok(uid) => {
                    snapshot.remove(&uid);
                    Command::Del { uid, reply }
                }
                Err(e) => {
                    channel.send(&WorkloadResponse::ack(Err(e.to_string())), None)?;
                    continue;
                }
            },
            Some(Payload::SnapshotSent(_)) => Command::Snapshot {
                keep: snapshot.clone(),
                reply,
            },
            None => {
                channel.send(&WorkloadResponse::ack(Err("empty request".into())), None)?;
                continue;
            }
        };
        if commands.blocking_send(command).is_err() {
            return Ok(());
        }
        let result = answer
            .blocking_recv()
            .unwrap_or_else(|_| Err("the proxy is stopping".to_owned()));
        channel.send(&WorkloadResponse::ack(result), None)?;
    }
}

/// Whether `fd` is the netns this thread runs in, the node's. Asked of this thread's own
/// (`thread-self`): the runtime's threads visit pods' netns to make sockets, this one never does.
fn is_own_netns(fd: &OwnedFd) -> std::io::Result<bool> {
    let theirs = std::fs::File::from(fd.try_clone()?).metadata()?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    Ok((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
}
