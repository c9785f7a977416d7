//! The agent binary with its output gone: a log collector that went away, or a human piping it
//! into `head`. Logging must never take the agent down.

#![allow(clippy::unwrap_used)] // helpers of tests: a panic is the failure report

use std::process::{Command, Stdio};

/// The write end of a pipe nobody reads: every write fails with EPIPE.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

#[test]
fn a_closed_stdout_and_stderr_never_make_the_agent_panic() {
    let dir = std::env::temp_dir().join(format!("sluice-agent-epipe-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("net.d")).unwrap();
    // `--uninstall` logs what it did (at info) and exits: the smallest run that writes a log line.
    let status = Command::new(env!("CARGO_BIN_EXE_sluice-cni-agent"))
        .arg("--uninstall")
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .status()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "{status}");
}
