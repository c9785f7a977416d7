//! The CNI plugin as a container runtime drives it: an environment and a network configuration
//! on stdin, with the agent unreachable.
//!
//! Input: `NAME=VALUE` lines (the environment) up to the first empty line, then stdin as it
//! is. A line that is not UTF-8 is a variable the process could not read (`std::env::var`
//! fails), i.e. unset.

use std::collections::BTreeMap;

use serde_json::Value;
use serde_json::value::RawValue;
use sluice_cni::agent_api::{Command, Request};
use sluice_cni::plugin::{Output, run};
use sluice_cni::spec::{CniError, ErrorCode, Invocation, NetConf, SUPPORTED_VERSIONS, Verb};

/// Where every configuration is pointed for the whole-invocation check: nothing listens there
/// (the directory does not exist), so the plugin behaves as with its agent away, and no input
/// can make the fuzzer talk to a real agent on this machine.
const UNREACHABLE: &str = "/nonexistent/sluice-fuzz/agent.sock";

pub fn check(data: &[u8]) {
    let (env, stdin) = split(data);
    let get = |name: &str| env.get(name).cloned();

    let invocation = Invocation::from_env(get);
    if let Ok(invocation) = &invocation {
        check_invocation(invocation, &env);
    }
    let conf = NetConf::parse(stdin, true);
    check_conf(stdin, &conf);

    let stdin = unreachable_agent(stdin);
    let elsewhere =
        NetConf::parse(&stdin, false).is_ok_and(|c| c.agent_socket.to_str() != Some(UNREACHABLE));
    assert!(
        !elsewhere,
        "the harness would let the plugin reach a real agent"
    );
    let output = run(get, &stdin);
    check_output(&output);
    match invocation {
        Err(e) => assert_error(&output, e.code, "an unusable environment"),
        Ok(invocation) => check_verb(&invocation, &stdin, &output),
    }
}

/// The environment (`NAME=VALUE` lines before the first empty one) and stdin (the rest).
fn split(data: &[u8]) -> (BTreeMap<String, String>, &[u8]) {
    let (env, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &data[data.len()..]),
    };
    let env = env
        .split(|b| *b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (env, stdin)
}

/// A configuration that parses as a JSON object gets `agentSocket` pointed at [`UNREACHABLE`];
/// anything else is left as it is (the plugin cannot read a socket path from it). The values
/// are kept as raw text, not read: serde_json checks only what it keeps, so the plugin reads a
/// configuration whose ignored keys hold numbers out of range (or, replaced first here, bytes
/// that are not UTF-8), and so must this.
fn unreachable_agent(stdin: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(stdin);
    match serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(&text) {
        Ok(mut conf) => {
            let socket = serde_json::value::to_raw_value(UNREACHABLE).expect("a string");
            conf.insert("agentSocket".into(), socket);
            serde_json::to_vec(&conf).expect("a JSON object serializes")
        }
        Err(_) => stdin.to_vec(),
    }
}

fn check_invocation(invocation: &Invocation, env: &BTreeMap<String, String>) {
    if matches!(invocation.verb, Verb::Add | Verb::Del | Verb::Check) {
        // The spec's container id rule, written out again: alphanumeric first, then also _.-
        let id = invocation.container_id.as_bytes();
        assert!(
            id.first().is_some_and(u8::is_ascii_alphanumeric)
                && id
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b)),
            "container id {:?} accepted",
            invocation.container_id
        );
        assert!(!invocation.ifname.is_empty(), "empty CNI_IFNAME accepted");
        assert!(
            invocation.netns.is_some() || invocation.verb == Verb::Del,
            "no CNI_NETNS accepted for {:?}",
            invocation.verb
        );
    }
    // CNI_ARGS written back out reads as the same arguments.
    let rendered: Vec<String> = invocation
        .args
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut env = env.clone();
    env.insert("CNI_ARGS".into(), rendered.join(";"));
    let again = Invocation::from_env(|name| env.get(name).cloned())
        .expect("the same environment with CNI_ARGS written back is accepted");
    assert_eq!(again.args, invocation.args, "CNI_ARGS does not round-trip");
    if let Some(pod) = invocation.pod() {
        assert_eq!(
            Some(&pod.namespace),
            invocation.args.get("K8S_POD_NAMESPACE")
        );
        assert_eq!(Some(&pod.name), invocation.args.get("K8S_POD_NAME"));
    }
}

fn check_conf(stdin: &[u8], conf: &Result<NetConf, CniError>) {
    let version_only = NetConf::parse(stdin, false);
    let Ok(conf) = conf else {
        return;
    };
    let version_only = version_only.expect("a configuration read in full is read for VERSION too");
    assert_eq!(version_only.cni_version, conf.cni_version);
    assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
    assert!(
        !conf.name.is_empty(),
        "a configuration without a name accepted"
    );
    assert!((1..=300).contains(&conf.timeout_seconds));
    assert!(conf.prev_result.as_ref().is_none_or(Value::is_object));
    if let Ok(ips) = conf.prev_ips() {
        let listed = conf
            .prev_result
            .as_ref()
            .and_then(|p| p.get("ips"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        assert_eq!(ips.len(), listed, "prevResult.ips read partially");
    }
    // Pointing it at another agent changes nothing else.
    let moved = NetConf::parse(&unreachable_agent(stdin), true)
        .expect("a readable configuration stays readable with agentSocket replaced");
    assert_eq!(moved.agent_socket.to_str(), Some(UNREACHABLE));
    assert_eq!(moved.cni_version, conf.cni_version);
    assert_eq!(moved.name, conf.name);
    // Floats to within an ulp or so: serde_json's float parsing is not exact (past u64,
    // 22222222222444444444 reads as one f64, written and read again as its neighbour).
    assert!(
        match (&moved.prev_result, &conf.prev_result) {
            (Some(a), Some(b)) => same_json(a, b),
            (a, b) => a == b,
        },
        "prevResult changed: {:?} vs {:?}",
        moved.prev_result,
        conf.prev_result
    );
    assert_eq!(moved.timeout_seconds, conf.timeout_seconds);
    assert_eq!(moved.exclude_namespaces, conf.exclude_namespaces);
    // The request it would send reads back as itself on the agent's side.
    let request = Request {
        command: Command::Add,
        container_id: "c".into(),
        netns: None,
        ips: conf.prev_ips().unwrap_or_default(),
        pod: None,
    };
    let line = serde_json::to_string(&request).expect("a request serializes");
    let back: Request = serde_json::from_str(&line).expect("the agent reads the request");
    assert_eq!(back, request);
}

fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, x), (ky, y))| kx == ky && same_json(x, y))
        }
        _ => a == b,
    }
}

/// What the binary prints is always the spec's shape.
fn check_output(output: &Output) {
    match output {
        Output::Error(v) => {
            let code = v["code"].as_u64().expect("an error has a numeric code");
            assert!(code >= 1, "error code {code}");
            assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            assert!(v["details"].is_string(), "{v}");
            let version = v["cniVersion"].as_str().expect("an error has cniVersion");
            assert!(SUPPORTED_VERSIONS.contains(&version), "{v}");
        }
        // ADD passes the previous plugin's result through as it came (checked in check_verb).
        Output::Result(v) => assert!(v.is_object(), "a result that is not an object: {v}"),
        Output::Nothing => {}
    }
}

fn assert_error(output: &Output, code: u32, why: &str) {
    match output {
        Output::Error(v) => assert_eq!(v["code"].as_u64(), Some(u64::from(code)), "{why}: {v}"),
        other => panic!("{why} gave {other:?}, not error {code}"),
    }
}

/// What each verb must do with its agent away.
fn check_verb(invocation: &Invocation, stdin: &[u8], output: &Output) {
    if invocation.verb == Verb::Version {
        let Output::Result(v) = output else {
            panic!("VERSION gave {output:?}");
        };
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(SUPPORTED_VERSIONS)
        );
        return;
    }
    let conf = match NetConf::parse(stdin, true) {
        Ok(conf) => conf,
        Err(e) => return assert_error(output, e.code, "an unreadable configuration"),
    };
    // A pod that may be meshed never starts (nor passes CHECK) without the agent: fail closed.
    let maybe_meshed = invocation
        .pod()
        .is_some_and(|pod| !conf.exclude_namespaces.contains(&pod.namespace));
    match invocation.verb {
        Verb::Add if maybe_meshed => {
            assert!(
                matches!(output, Output::Error(_)),
                "ADD of a pod succeeded without the agent: {output:?}"
            );
        }
        Verb::Add => match output {
            // Not a pod, or an excluded one: the previous result passes through unchanged.
            Output::Result(v) => assert_eq!(*v, conf.result(), "ADD changed prevResult"),
            Output::Error(_) => {}
            Output::Nothing => panic!("ADD printed no result"),
        },
        Verb::Check if maybe_meshed => {
            assert!(
                matches!(output, Output::Error(_)),
                "CHECK of a pod passed without the agent: {output:?}"
            );
        }
        Verb::Check => assert!(!matches!(output, Output::Result(_)), "{output:?}"),
        // DEL succeeds when there is nothing left to do; an agent that is away holds nothing.
        Verb::Del => assert_eq!(*output, Output::Nothing, "DEL without the agent failed"),
        Verb::Status => assert_error(
            output,
            ErrorCode::PluginNotAvailable as u32,
            "STATUS without the agent",
        ),
        Verb::Gc => assert_eq!(*output, Output::Nothing),
        Verb::Version => unreachable!("checked above"),
    }
}
