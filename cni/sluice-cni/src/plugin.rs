//! One plugin invocation: environment and stdin in, what to print out.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::agent_api::{self, CallError, Command, Reply, Request};
use crate::spec::{CniError, ErrorCode, Invocation, NetConf, Verb, version_result};

/// What the binary prints on stdout, and whether it exits non-zero.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Success with a result (ADD, VERSION).
    Result(Value),
    /// Success with nothing to print (DEL, CHECK, STATUS, GC).
    Nothing,
    /// Failure: the spec's error object, in the configuration's version.
    Error(Value),
}

/// Runs one invocation. `env` reads the process environment (a map in tests).
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    // The error object carries the configuration's version when it could be read.
    let version = NetConf::parse(stdin, false)
        .map(|c| c.cni_version)
        .unwrap_or_else(|_| "1.0.0".to_owned());
    match invoke(env, stdin) {
        Ok(Some(result)) => Output::Result(result),
        Ok(None) => Output::Nothing,
        Err(e) => Output::Error(e.to_json(&version)),
    }
}

fn invoke(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let invocation = Invocation::from_env(env)?;
    if invocation.verb == Verb::Version {
        // VERSION may come with a bare {"cniVersion": …} or nothing at all.
        let requested: Option<String> = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned));
        return Ok(Some(version_result(requested.as_deref())));
    }
    let conf = NetConf::parse(stdin, true)?;
    match invocation.verb {
        Verb::Add => add(&invocation, &conf).map(Some),
        Verb::Del => del(&invocation, &conf).map(|()| None),
        Verb::Check => check(&invocation, &conf).map(|()| None),
        Verb::Status => status(&conf).map(|()| None),
        // The agent reconciles its pods against the cluster itself; there is nothing a runtime's
        // list of valid attachments would add.
        Verb::Gc => Ok(None),
        Verb::Version => unreachable!("answered above"),
    }
}

fn add(invocation: &Invocation, conf: &NetConf) -> Result<Value, CniError> {
    let Some(pod) = invocation.pod() else {
        // Not a Kubernetes pod (no K8S_POD_* arguments): never selected.
        return Ok(conf.result());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(conf.result());
    }
    let request = Request {
        command: Command::Add,
        container_id: invocation.container_id.clone(),
        netns: invocation.netns.as_ref().map(|p| p.display().to_string()),
        ips: conf.prev_ips()?,
        pod: Some(pod.clone()),
    };
    match ask(conf, &request)? {
        Reply::Enrolled | Reply::Skipped { .. } => Ok(conf.result()),
        Reply::Done => Err(CniError::new(
            ErrorCode::EnrolmentFailed,
            format!("the agent answered ADD for pod {pod} with \"done\""),
            "the plugin and the agent disagree on the protocol; run the same sluice version",
        )),
        Reply::Failed { code, msg, details } => Err(CniError { code, msg, details }),
    }
}

fn del(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    // Every DEL goes to the agent, with or without pod arguments: a runtime may pass none
    // (podman's CNI backend passes only K8S_POD_NAME), and its sandbox must still be released.
    // The agent knows the sandbox by its container id or netns.
    let request = Request {
        command: Command::Del,
        container_id: invocation.container_id.clone(),
        netns: invocation.netns.as_ref().map(|p| p.display().to_string()),
        ips: Vec::new(),
        pod: invocation.pod(),
    };
    match ask(conf, &request) {
        Ok(Reply::Failed { code, msg, details }) => Err(CniError { code, msg, details }),
        Ok(_) => Ok(()),
        // DEL must succeed when there is nothing left to do, and an agent that is not running
        // holds nothing for this sandbox; the restarted agent releases pods that are gone.
        Err(e) if e.code == ErrorCode::TryAgainLater as u32 => {
            // The runtime may have closed stderr: nothing to do then, and no panic.
            let _ = writeln!(
                std::io::stderr(),
                "sluice-cni: DEL: {e}; the agent will release the pod when it reconciles"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    if !conf.supports_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("CHECK is not defined for CNI version {}", conf.cni_version),
            "CHECK needs cniVersion 0.4.0 or later",
        ));
    }
    let Some(pod) = invocation.pod() else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    let request = Request {
        command: Command::Check,
        container_id: invocation.container_id.clone(),
        netns: invocation.netns.as_ref().map(|p| p.display().to_string()),
        ips: conf.prev_ips()?,
        pod: Some(pod),
    };
    match ask(conf, &request)? {
        Reply::Failed { code, msg, details } => Err(CniError { code, msg, details }),
        _ => Ok(()),
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let request = Request {
        command: Command::Status,
        container_id: String::new(),
        netns: None,
        ips: Vec::new(),
        pod: None,
    };
    match ask(conf, &request) {
        Ok(Reply::Failed { code, msg, details }) => Err(CniError { code, msg, details }),
        Ok(_) => Ok(()),
        Err(e) => Err(CniError::new(
            ErrorCode::PluginNotAvailable,
            e.msg,
            e.details,
        )),
    }
}

fn ask(conf: &NetConf, request: &Request) -> Result<Reply, CniError> {
    let socket = &conf.agent_socket;
    let timeout = Duration::from_secs(conf.timeout_seconds);
    agent_api::call(socket, request, timeout).map_err(|e| match e {
        CallError::Unreachable(e) => unreachable(socket, &e),
        CallError::TimedOut => CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "the sluice agent did not answer within {} s",
                conf.timeout_seconds
            ),
            "capture or the proxy hand-off is still pending; see the agent's log, the runtime \
             retries the sandbox",
        ),
        CallError::Broken(why) => CniError::new(
            ErrorCode::Io,
            format!(
                "the connection to the sluice agent at {} broke",
                socket.display()
            ),
            format!("{why}; see the agent's log (sluice-cni-agent), the runtime retries"),
        ),
    })
}

/// The agent's socket cannot be connected to: what that means, and what to check.
fn unreachable(socket: &Path, e: &std::io::Error) -> CniError {
    const RUNNING: &str = "is sluice-cni-agent running on this node (on Kubernetes: the \
                           sluice-node DaemonSet's pod)? Pods of meshed namespaces do not start \
                           without it (fail closed); the runtime retries the sandbox";
    let socket = socket.display();
    let (msg, details) = match e.kind() {
        std::io::ErrorKind::NotFound => (
            format!("the sluice agent's socket {socket} does not exist"),
            RUNNING.to_owned(),
        ),
        std::io::ErrorKind::ConnectionRefused => (
            format!("nothing listens on the sluice agent's socket {socket}"),
            format!("the agent stopped and left its socket behind; {RUNNING}"),
        ),
        std::io::ErrorKind::PermissionDenied => (
            format!("the sluice agent's socket {socket} refuses this plugin access"),
            "the agent makes its socket 0600 for root: the runtime must run CNI plugins as \
             root (it does by default)"
                .to_owned(),
        ),
        _ => (
            format!(
                "cannot connect to the sluice agent's socket {socket}: {}",
                agent_api::describe_io(e)
            ),
            RUNNING.to_owned(),
        ),
    };
    CniError::new(ErrorCode::TryAgainLater, msg, details)
}
