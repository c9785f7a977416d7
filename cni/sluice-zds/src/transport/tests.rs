use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use super::*;
use crate::messages::workload_request::Payload;
use crate::messages::*;

/// `nobody`: the unprivileged user the hostile peers below run as.
const NOBODY: u32 = 65534;

/// A directory under the temp dir for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-zds-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The peer tests switch users: they need root, and fail (never skip) without it.
fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (it runs a peer as uid {NOBODY}): run it as root"
    );
}

/// Runs `step` in a child process that has become uid/gid `NOBODY`, then lets the child exec
/// `true` and waits for it. `step`'s error is the spawn's error (std sends it back from the
/// child), so the caller sees exactly what the kernel told the unprivileged process. Returns
/// the child's pid.
fn as_nobody(mut step: impl FnMut() -> io::Result<()> + Send + Sync + 'static) -> io::Result<u32> {
    let mut cmd = std::process::Command::new("true");
    // SAFETY: between fork and exec the closure makes only raw system calls on data prepared
    // before the fork (no allocation, no locks), as a forked child of a threaded process must.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(io::Error::last_os_error());
            }
            step()
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    assert!(
        child.wait().unwrap().success(),
        "`true` failed in the child"
    );
    Ok(pid)
}

/// What an unprivileged process gets from `connect(path)`: the raw socket calls only, as the
/// child may not allocate.
fn connect_as_nobody(path: &Path) -> io::Result<u32> {
    let (addr, len) = unix_addr(path).unwrap();
    as_nobody(move || {
        // SAFETY: plain socket(2) and connect(2) with a valid sockaddr_un of length len; the
        // fd is close-on-exec, so `true` closes it (the peer credentials stay recorded).
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
            if fd < 0 || libc::connect(fd, std::ptr::from_ref(&addr).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

fn ino(fd: BorrowedFd<'_>) -> u64 {
    let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    file.metadata().unwrap().ino()
}

#[test]
fn a_netns_fd_travels_with_its_add() {
    let (agent, proxy) = Channel::pair().unwrap();
    proxy
        .send(
            &ZdsHello {
                version: Version::V1 as i32,
            },
            None,
        )
        .unwrap();
    let hello: ZdsHello = agent.recv().unwrap().decode().unwrap();
    assert_eq!(hello.version, Version::V1 as i32);

    let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let add = WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: "pod-1".into(),
            workload_info: None,
        })),
    };
    agent.send(&add, Some(netns.as_fd())).unwrap();
    let got = proxy.recv().unwrap();
    assert_eq!(got.decode::<WorkloadRequest>().unwrap(), add);
    assert_eq!(got.fds.len(), 1, "exactly the one netns fd");
    assert_eq!(
        ino(got.fds[0].as_fd()),
        ino(netns.as_fd()),
        "the same namespace"
    );

    proxy.send(&WorkloadResponse::ack(Ok(())), None).unwrap();
    let ack = agent.recv().unwrap();
    assert_eq!(ack.bytes, [0x0a, 0x00]);
    assert!(ack.fds.is_empty());
}

#[test]
fn a_closed_peer_reads_as_end_of_file() {
    let (agent, proxy) = Channel::pair().unwrap();
    drop(proxy);
    match agent.recv() {
        Err(ZdsError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
        other => panic!("expected EOF, got {other:?}"),
    }
}

#[test]
fn listener_and_connect_over_a_socket_file() {
    let dir = TempDir::new("listener");
    let path = dir.0.join("zds").join("zds.sock");
    let listener = Listener::bind(&path).unwrap();
    let proxy = Channel::connect(&path).unwrap();
    let agent = listener.accept().unwrap();
    agent
        .send(
            &WorkloadRequest {
                payload: Some(Payload::SnapshotSent(SnapshotSent {})),
            },
            None,
        )
        .unwrap();
    assert_eq!(proxy.recv().unwrap().bytes, [0x1a, 0x00]);
    assert_eq!(agent.peer_pid().unwrap(), std::process::id());
    assert!(!agent.peer_gone(), "the proxy is still connected");
    drop(proxy);
    assert!(
        agent.peer_gone(),
        "a hung-up proxy is noticed without a request"
    );
    drop(listener);
    assert!(!path.exists(), "the socket file goes with the listener");
}

#[test]
fn the_socket_is_0600_in_a_directory_created_0700() {
    let dir = TempDir::new("modes");
    let private = dir.0.join("zds");
    let path = private.join("zds.sock");
    let listener = Listener::bind(&path).unwrap();
    assert_eq!(
        mode(&private),
        0o700,
        "the missing directory is created 0700"
    );
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    assert_eq!(mode(&path), 0o600, "the socket is 0600 whatever the umask");
    drop(listener);
    // Binding again (a restarted agent) keeps the existing private directory.
    let again = Listener::bind(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    drop(again);
}

#[test]
fn a_directory_others_can_enter_or_that_is_not_ours_is_refused() {
    let dir = TempDir::new("unsafe-dir");
    let shared = dir.0.join("shared");
    std::fs::create_dir(&shared).unwrap();
    for loose in [0o755, 0o710, 0o701, 0o1777] {
        chmod(&shared, loose);
        let path = shared.join("zds.sock");
        match Listener::bind(&path) {
            Err(ZdsError::UnsafeDir { dir, why }) => {
                assert_eq!(dir, shared);
                assert!(why.contains(&format!("{loose:04o}")), "{loose:o}: {why}");
            }
            other => panic!("a {loose:o} directory must be refused, got {other:?}"),
        }
        assert!(!path.exists(), "nothing is bound in a refused directory");
    }
    let text = Listener::bind(&shared.join("zds.sock"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("0700") && text.contains(&shared.display().to_string()),
        "the error says what to fix: {text}"
    );

    let file = dir.0.join("file");
    std::fs::write(&file, b"").unwrap();
    assert!(
        matches!(Listener::bind(&file.join("zds.sock")), Err(ZdsError::UnsafeDir { why, .. }) if why.contains("not a directory"))
    );
}

#[test]
fn a_private_directory_of_another_user_is_refused() {
    require_root();
    let dir = TempDir::new("foreign-dir");
    let theirs = dir.0.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chmod(&theirs, 0o700);
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    match Listener::bind(&theirs.join("zds.sock")) {
        Err(ZdsError::UnsafeDir { why, .. }) => {
            assert!(why.contains(&format!("uid {NOBODY}")), "{why}")
        }
        other => panic!("a directory owned by uid {NOBODY} must be refused, got {other:?}"),
    }
}

#[test]
fn a_non_root_process_cannot_connect_to_the_socket() {
    require_root();
    let dir = TempDir::new("nonroot-connect");
    let private = dir.0.join("zds");
    let path = private.join("zds.sock");
    let listener = Listener::bind(&path).unwrap();
    // The temp dir above it must let the child reach `private` at all.
    chmod(&dir.0, 0o755);
    let refused = connect_as_nobody(&path).expect_err("the 0700 directory keeps nobody out");
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    // With the directory opened up, the socket's own 0600 still refuses.
    chmod(&private, 0o755);
    let refused = connect_as_nobody(&path).expect_err("the 0600 socket keeps nobody out");
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    // Control: root gets through, and is seen as root.
    let proxy = Channel::connect(&path).unwrap();
    let agent = listener.accept().unwrap();
    let peer = agent.root_peer().unwrap();
    assert_eq!((peer.pid, peer.uid), (std::process::id(), 0));
    assert_eq!(
        proxy.root_peer().unwrap().uid,
        0,
        "the listener is root too"
    );
}

#[test]
fn the_agent_refuses_a_non_root_peer_that_got_through() {
    require_root();
    let dir = TempDir::new("nonroot-peer");
    let private = dir.0.join("zds");
    let path = private.join("zds.sock");
    let listener = Listener::bind(&path).unwrap();
    // Loosened by hand (as a misconfigured node might be): now nobody can connect...
    chmod(&dir.0, 0o755);
    chmod(&private, 0o755);
    chmod(&path, 0o666);
    let child = connect_as_nobody(&path).unwrap();
    // ...and the credentials check is what refuses it.
    let channel = listener.accept().unwrap();
    let peer = channel.peer().unwrap();
    assert_eq!((peer.pid, peer.uid, peer.gid), (child, NOBODY, NOBODY));
    match channel.root_peer() {
        Err(ZdsError::PeerNotRoot { pid, uid }) => assert_eq!((pid, uid), (child, NOBODY)),
        other => panic!("a non-root peer must be refused, got {other:?}"),
    }
    let text = channel.root_peer().unwrap_err().to_string();
    assert!(
        text.contains(&format!("pid {child}")) && text.contains(&format!("uid {NOBODY}")),
        "the refusal names the peer: {text}"
    );
}

#[test]
fn the_proxy_refuses_a_listener_that_is_not_root() {
    require_root();
    let dir = TempDir::new("nonroot-listener");
    let private = dir.0.join("zds");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let path = private.join("zds.sock");
    // Bound by root, but listening as nobody: SO_PEERCRED on the connecting side reports
    // whoever called listen(2).
    let fd = seqpacket().unwrap();
    let (addr, len) = unix_addr(&path).unwrap();
    // SAFETY: addr is a valid sockaddr_un of length len, fd our own socket.
    assert_eq!(
        unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) },
        0
    );
    let raw = fd.as_raw_fd();
    let listener_pid = as_nobody(move || {
        // SAFETY: listen(2) on the socket the child inherited from the test.
        if unsafe { libc::listen(raw, 4) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
    .unwrap();
    let proxy = Channel::connect(&path).unwrap();
    let peer = proxy.peer().unwrap();
    assert_eq!((peer.pid, peer.uid), (listener_pid, NOBODY));
    match proxy.root_peer() {
        Err(ZdsError::PeerNotRoot { pid, uid }) => assert_eq!((pid, uid), (listener_pid, NOBODY)),
        other => panic!("a listener that is not root must be refused, got {other:?}"),
    }
    drop(fd);
}

#[test]
fn only_uid_zero_is_root() {
    let peer = |uid| PeerCred {
        pid: 42,
        uid,
        gid: 0,
    };
    assert_eq!(peer(0).require_root().unwrap(), peer(0));
    for uid in [1, 1000, NOBODY, u32::MAX] {
        assert!(
            matches!(peer(uid).require_root(), Err(ZdsError::PeerNotRoot { pid: 42, uid: u }) if u == uid),
            "uid {uid}"
        );
    }
}
