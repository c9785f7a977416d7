//! What the plugin asks the node agent, and the answer: one JSON line each way over the agent's
//! Unix stream socket. The agent depends on this module too, so the two cannot drift apart.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The Kubernetes pod behind a sandbox (`K8S_POD_*` in `CNI_ARGS`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// containerd and CRI-O pass it; when absent the agent looks the pod up by name.
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Enrol the pod if it is selected; answer once capture is in place and the proxy acked.
    Add,
    /// The sandbox is going away: release the pod.
    Del,
    /// Is the pod's capture as it should be?
    Check,
    /// Is the agent ready to enrol pods (CNI 1.1 STATUS)?
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    #[serde(default)]
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace.
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// The addresses earlier plugins gave the pod.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Reply {
    /// Capture is in place and the proxy serves the pod.
    Enrolled,
    /// The pod is not selected for the mesh; it starts without capture.
    Skipped { reason: String },
    /// DEL, CHECK or STATUS succeeded.
    Done,
    /// The request failed; `code` is a CNI error code.
    Failed {
        code: u32,
        msg: String,
        details: String,
    },
}

/// An I/O error in words a person acts on, with the errno number kept for searching. Never the
/// C library's string alone: container runtimes misread it (see [`crate::spec::CniError`]).
pub fn describe_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    // Errors made in Rust code (no errno) already carry words.
    let Some(errno) = e.raw_os_error() else {
        return e.to_string();
    };
    let words = match e.kind() {
        ErrorKind::NotFound => "it does not exist",
        ErrorKind::PermissionDenied => "access is refused",
        ErrorKind::ConnectionRefused => "nothing accepts connections there",
        ErrorKind::ConnectionReset => "the other end reset the connection",
        ErrorKind::BrokenPipe => "the other end closed the connection",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "it timed out",
        // The rest are rare here; strerror's words, with the errno, say enough.
        _ => return e.to_string(),
    };
    format!("{words} (os error {errno})")
}

/// Why a call to the agent failed, before any answer came back.
#[derive(Debug)]
pub enum CallError {
    /// Nothing listens on the socket (the agent is not running).
    Unreachable(std::io::Error),
    /// The agent did not answer within the timeout.
    TimedOut,
    /// The connection broke or the answer was not a [`Reply`].
    Broken(String),
}

/// Sends one request and waits up to `timeout` for its reply.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, CallError> {
    let mut stream = UnixStream::connect(socket).map_err(CallError::Unreachable)?;
    let broken = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            CallError::TimedOut
        } else {
            CallError::Broken(describe_io(&e))
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(broken)?;
    stream.set_write_timeout(Some(timeout)).map_err(broken)?;
    let mut line = serde_json::to_vec(request)
        .map_err(|e| CallError::Broken(format!("cannot encode the request: {e}")))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(broken)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(broken)?;
    if answer.is_empty() {
        return Err(CallError::Broken(
            "the agent closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&answer)
        .map_err(|e| CallError::Broken(format!("undecodable answer {answer:?}: {e}")))
}
