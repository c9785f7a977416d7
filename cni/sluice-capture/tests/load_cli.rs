//! `sluice-load` as a command-line tool: its output piped into a reader that goes away early
//! (`sluice-load --status | head`) ends it quietly, never with a panic.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn a_closed_pipe_ends_the_status_quietly() {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fds, owned below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned from here.
    let (read, write) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    // The reader is gone before the tool writes a byte.
    drop(read);
    let pin_root = std::env::temp_dir().join(format!("sluice-load-cli-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-load"))
        .args(["--status", "--pin-root"])
        .arg(&pin_root)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("run sluice-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "sluice-load panicked: {stderr}"
    );
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "sluice-load should end on the closed pipe, ended {:?}: {stderr}",
        out.status
    );
}
