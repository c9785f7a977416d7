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

/// Runs the binary; returns (exit success, stdout as JSON or Null when empty).
fn plugin(command: &str, args: &str, stdin: &str) -> (bool, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "3f2a9c0d")
        .env("CNI_NETNS", "/var/run/netns/cni-1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
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
    assert_try_again(ok, &out, "cannot reach the sluice agent");

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
