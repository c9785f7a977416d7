//! The real `sluice-cni` binary run as a container runtime runs it, against a socket that plays
//! the agent's part with canned answers (the real agent is exercised by the end-to-end tests).

#![allow(clippy::unwrap_used)] // helpers of tests: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_cni::agent_api::{Reply, Request};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-cni-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers each connection with the next reply (or never, for `None`) and reports the requests.
fn fake_agent(socket: &Path, replies: Vec<Option<Reply>>) -> mpsc::Receiver<Request> {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for reply in replies {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let _ = tx.send(serde_json::from_str(&line).unwrap());
            match reply {
                Some(reply) => {
                    let mut out = serde_json::to_vec(&reply).unwrap();
                    out.push(b'\n');
                    (&stream).write_all(&out).unwrap();
                }
                None => held.push(stream),
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    rx
}

fn conf(socket: &Path, extra: Value) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "sluice-cni",
        "agentSocket": socket,
        "timeoutSeconds": 2,
        "excludeNamespaces": ["kube-system"],
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [{"address": "10.1.0.7/24", "gateway": "10.1.0.1", "interface": 0}]
        }
    });
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    conf.to_string()
}

/// The plugin binary with the CNI environment of sandbox `3f2a9c0d` (`netns` empty: unset, as
/// a runtime may on DEL).
fn runtime(command: &str, args: &str, netns: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "3f2a9c0d")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args);
    cmd
}

/// Runs the binary; returns (exit success, stdout as JSON or Null when empty).
fn plugin(command: &str, args: &str, stdin: &str) -> (bool, Value) {
    plugin_in(command, args, "/var/run/netns/cni-1", stdin)
}

/// As [`plugin`], with the sandbox's `CNI_NETNS`.
fn plugin_in(command: &str, args: &str, netns: &str, stdin: &str) -> (bool, Value) {
    let mut child = runtime(command, args, netns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout {stdout:?}: {e}"))
    };
    (out.status.success(), value)
}

const POD: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-1;IgnoreUnknown=1";

#[test]
fn add_waits_for_the_agent_and_passes_the_previous_result_through() {
    let dir = TempDir::new("add");
    let socket = dir.0.join("cni.sock");
    let requests = fake_agent(
        &socket,
        vec![
            Some(Reply::Enrolled),
            Some(Reply::Skipped {
                reason: "namespace not labelled".into(),
            }),
        ],
    );
    let stdin = conf(&socket, json!({}));
    let (ok, out) = plugin("ADD", POD, &stdin);
    assert!(ok, "{out}");
    let sent: Value = serde_json::from_str(&stdin).unwrap();
    assert_eq!(out, sent["prevResult"]);
    let request = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(request.pod.unwrap().uid.as_deref(), Some("uid-1"));
    assert_eq!(
        request.ips,
        ["10.1.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(request.netns.as_deref(), Some("/var/run/netns/cni-1"));

    let (ok, out) = plugin("ADD", POD, &stdin);
    assert!(
        ok && out == sent["prevResult"],
        "a skipped pod starts: {out}"
    );
}

#[test]
fn add_fails_with_the_agents_error() {
    let dir = TempDir::new("fail");
    let socket = dir.0.join("cni.sock");
    let _requests = fake_agent(
        &socket,
        vec![Some(Reply::Failed {
            code: 100,
            msg: "enrol pod shop/cart".into(),
            details: "no cgroup for pod uid-1".into(),
        })],
    );
    let (ok, out) = plugin("ADD", POD, &conf(&socket, json!({})));
    assert!(!ok);
    assert_eq!(out["code"], 100);
    assert_eq!(out["cniVersion"], "1.0.0");
    assert!(out["details"].as_str().unwrap().contains("no cgroup"));
}

/// A failure with code 11 (try again later) whose message says `why`.
fn assert_try_again(ok: bool, out: &Value, why: &str) {
    assert!(!ok, "{out}");
    assert_eq!(out["code"], 11, "{out}");
    assert!(out["msg"].as_str().unwrap().contains(why), "{out}");
}

#[test]
fn add_with_the_agent_unreachable_or_silent_fails_closed_with_try_again_later() {
    let dir = TempDir::new("down");
    let socket = dir.0.join("cni.sock");
    let (ok, out) = plugin("ADD", POD, &conf(&socket, json!({})));
    assert_try_again(ok, &out, "does not exist");

    let _requests = fake_agent(&socket, vec![None]);
    let started = std::time::Instant::now();
    let (ok, out) = plugin("ADD", POD, &conf(&socket, json!({"timeoutSeconds": 1})));
    assert_try_again(ok, &out, "did not answer within 1 s");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn pods_outside_kubernetes_or_in_excluded_namespaces_pass_without_the_agent() {
    let dir = TempDir::new("pass");
    let socket = dir.0.join("cni.sock"); // nothing listens
    let stdin = conf(&socket, json!({}));
    let (ok, out) = plugin("ADD", "IgnoreUnknown=1", &stdin);
    assert!(ok && out["ips"][0]["address"] == "10.1.0.7/24", "{out}");
    let (ok, _) = plugin(
        "ADD",
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
        &stdin,
    );
    assert!(ok);
}

#[test]
fn bad_input_fails_without_asking_the_agent() {
    let dir = TempDir::new("bad");
    let socket = dir.0.join("cni.sock");
    let requests = fake_agent(&socket, vec![Some(Reply::Enrolled)]);
    let (ok, out) = plugin("ADD", POD, "{\"cniVersion\": \"1.0.0\", ");
    assert!(!ok && out["code"] == 6, "{out}");
    let stdin = conf(&socket, json!({"cniVersion": "0.1.0"}));
    let (ok, out) = plugin("ADD", POD, &stdin);
    assert!(!ok && out["code"] == 1, "{out}");
    let (ok, out) = plugin("ADD", "K8S_POD_NAME", &conf(&socket, json!({})));
    assert!(!ok && out["code"] == 4, "{out}");
    assert!(requests.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn del_succeeds_when_the_agent_is_down_and_version_lists_the_versions() {
    let dir = TempDir::new("del");
    let socket = dir.0.join("cni.sock");
    let (ok, out) = plugin("DEL", POD, &conf(&socket, json!({})));
    assert!(ok && out.is_null(), "{out}");
    let (ok, out) = plugin("VERSION", "", r#"{"cniVersion":"0.4.0"}"#);
    assert!(ok);
    assert_eq!(out["cniVersion"], "0.4.0");
    assert!(
        out["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
    let (ok, out) = plugin("CHECK", POD, &conf(&socket, json!({"cniVersion": "0.3.1"})));
    assert!(!ok && out["code"] == 1, "{out}");
}

/// Podman's CNI backend passes only `K8S_POD_NAME`, and a runtime may pass no arguments and no
/// netns at all on DEL: the DEL still reaches the agent, which finds the sandbox by its
/// container id (or netns), so the pod does not stay captured.
#[test]
fn del_reaches_the_agent_without_pod_arguments() {
    let dir = TempDir::new("del-bare");
    let socket = dir.0.join("cni.sock");
    let requests = fake_agent(&socket, vec![Some(Reply::Done), Some(Reply::Done)]);
    let stdin = conf(&socket, json!({}));
    let (ok, out) = plugin("DEL", "IgnoreUnknown=1;K8S_POD_NAME=web", &stdin);
    assert!(ok && out.is_null(), "{out}");
    let request = requests
        .recv_timeout(Duration::from_secs(5))
        .expect("a DEL without K8S_POD_NAMESPACE must reach the agent");
    assert_eq!(request.command, sluice_cni::agent_api::Command::Del);
    assert_eq!(request.container_id, "3f2a9c0d");
    assert_eq!(request.pod, None);
    assert_eq!(request.netns.as_deref(), Some("/var/run/netns/cni-1"));

    let (ok, out) = plugin_in("DEL", "", "", &stdin);
    assert!(ok && out.is_null(), "{out}");
    let request = requests
        .recv_timeout(Duration::from_secs(5))
        .expect("a DEL with neither arguments nor netns must reach the agent");
    assert_eq!(
        (request.container_id.as_str(), request.netns),
        ("3f2a9c0d", None)
    );
}

/// What container runtimes misread when it appears in a CNI error: podman reports "no such
/// file or directory" as exit 127 (command not found), "permission denied" and "operation not
/// permitted" as 126.
fn assert_worded_for_a_person(out: &Value) {
    for field in ["msg", "details"] {
        let text = out[field].as_str().unwrap().to_lowercase();
        for raw in [
            "no such file or directory",
            "permission denied",
            "operation not permitted",
        ] {
            assert!(!text.contains(raw), "{field} carries {raw:?}: {out}");
        }
    }
}

#[test]
fn an_unreachable_agent_is_reported_with_what_failed_and_what_to_do() {
    let dir = TempDir::new("words");
    let socket = dir.0.join("cni.sock");
    let path = socket.display().to_string();

    // No socket file: the agent is not running (or never ran) on this node.
    let (ok, out) = plugin("ADD", POD, &conf(&socket, json!({})));
    assert_try_again(
        ok,
        &out,
        &format!("the sluice agent's socket {path} does not exist"),
    );
    let details = out["details"].as_str().unwrap();
    assert!(
        details.contains("sluice-cni-agent") && details.contains("sluice-node"),
        "the details say what to check: {out}"
    );
    assert_worded_for_a_person(&out);

    // A socket file nobody listens on: the agent stopped and left it behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (ok, out) = plugin("ADD", POD, &conf(&socket, json!({})));
    assert_try_again(
        ok,
        &out,
        &format!("nothing listens on the sluice agent's socket {path}"),
    );
    assert_worded_for_a_person(&out);
    std::fs::remove_file(&socket).unwrap();

    // The agent's own error, passed through, is reworded where a runtime would misread it.
    let _requests = fake_agent(
        &socket,
        vec![Some(Reply::Failed {
            code: 100,
            msg: "cannot open the sandbox netns /var/run/netns/cni-1".into(),
            details: "No such file or directory (os error 2)".into(),
        })],
    );
    let (ok, out) = plugin("ADD", POD, &conf(&socket, json!({})));
    assert!(!ok && out["code"] == 100, "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("does not exist"),
        "{out}"
    );
    assert_worded_for_a_person(&out);
}

/// A runtime that closed the plugin's stdout and stderr (it gave up waiting, or a human piped
/// the plugin into `head`): the plugin still does its work and exits with its own status,
/// never a panic's 101.
#[test]
fn a_closed_stdout_or_stderr_never_makes_the_plugin_panic() {
    let dir = TempDir::new("epipe");
    let socket = dir.0.join("cni.sock"); // nothing listens: DEL succeeds and says so on stderr
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        Stdio::from(writer)
    };
    for (command, success) in [("DEL", true), ("ADD", false), ("VERSION", true)] {
        let mut child = runtime(command, POD, "/var/run/netns/cni-1")
            .stdin(Stdio::piped())
            .stdout(closed())
            .stderr(closed())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf(&socket, json!({})).as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.success(), success, "{command}: {status}");
        assert_eq!(
            status.code(),
            Some(u8::from(!success).into()),
            "{command}: {status}"
        );
    }
}
