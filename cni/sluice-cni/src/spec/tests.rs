use std::collections::HashMap;

use super::*;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "3f2a9c"),
    ("CNI_NETNS", "/var/run/netns/cni-1"),
    ("CNI_IFNAME", "eth0"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9;K8S_POD_UID=0b9b1c52",
    ),
];

#[test]
fn environment_of_a_kubelet_add_is_read_with_the_pod() {
    let inv = Invocation::from_env(env(ADD_ENV)).unwrap();
    assert_eq!(inv.verb, Verb::Add);
    assert_eq!(
        inv.netns.as_deref(),
        Some(std::path::Path::new("/var/run/netns/cni-1"))
    );
    let pod = inv.pod().unwrap();
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("shop", "cart-7d9")
    );
    assert_eq!(pod.uid.as_deref(), Some("0b9b1c52"));
}

#[test]
fn environment_errors_name_the_variable_with_code_4() {
    let without = |name: &str| {
        let pairs: Vec<_> = ADD_ENV
            .iter()
            .copied()
            .filter(|(k, _)| *k != name)
            .collect();
        Invocation::from_env(env(&pairs)).unwrap_err()
    };
    for name in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
        let e = without(name);
        assert_eq!(e.code, 4, "{name}");
        assert!(e.msg.contains(name), "{e}");
    }
    let mut bad = ADD_ENV.to_vec();
    bad[1] = ("CNI_CONTAINERID", "-starts-with-dash");
    assert_eq!(Invocation::from_env(env(&bad)).unwrap_err().code, 4);
    bad[1] = ("CNI_CONTAINERID", "ok");
    bad[0] = ("CNI_COMMAND", "UPGRADE");
    assert!(
        Invocation::from_env(env(&bad))
            .unwrap_err()
            .msg
            .contains("UPGRADE")
    );
    bad[0] = ("CNI_COMMAND", "ADD");
    bad[4] = ("CNI_ARGS", "K8S_POD_NAME");
    assert_eq!(Invocation::from_env(env(&bad)).unwrap_err().code, 4);
}

#[test]
fn del_without_a_netns_is_allowed() {
    let pairs = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "3f2a9c"),
        ("CNI_IFNAME", "eth0"),
    ];
    let inv = Invocation::from_env(env(&pairs)).unwrap();
    assert_eq!((inv.verb, inv.netns.as_deref()), (Verb::Del, None));
    assert!(inv.pod().is_none());
}

#[test]
fn configuration_is_checked_with_the_specs_codes() {
    let conf = |s: &str| NetConf::parse(s.as_bytes(), true);
    let e = conf("{not json").unwrap_err();
    assert_eq!(e.code, 6);
    let e = conf(r#"{"cniVersion":"0.2.0","name":"k8s","type":"sluice-cni"}"#).unwrap_err();
    assert_eq!(e.code, 1);
    assert!(e.details.contains("1.0.0"), "{e}");
    let e = conf(r#"{"cniVersion":"9.9.9","name":"k8s","type":"sluice-cni"}"#).unwrap_err();
    assert_eq!(e.code, 1);
    assert_eq!(
        conf(r#"{"name":"k8s","type":"sluice-cni"}"#)
            .unwrap_err()
            .code,
        7
    );
    assert_eq!(
        conf(r#"{"cniVersion":"1.0.0","type":"sluice-cni"}"#)
            .unwrap_err()
            .code,
        7
    );
    assert_eq!(
        conf(r#"{"cniVersion":"1.0.0","name":"k8s"}"#)
            .unwrap_err()
            .code,
        7
    );
    let e = conf(r#"{"cniVersion":"1.0.0","name":"k","type":"s","timeoutSeconds":0}"#);
    assert_eq!(e.unwrap_err().code, 7);
    let e = conf(r#"{"cniVersion":"1.0.0","name":"k","type":"s","prevResult":[1]}"#);
    assert_eq!(e.unwrap_err().code, 7);
    let e = conf(r#"{"cniVersion":"1.0.0","name":"k","type":"s","agentSocket":7}"#);
    assert_eq!(e.unwrap_err().code, 6);
}

#[test]
fn prev_result_passes_through_unchanged_and_yields_the_pod_ips() {
    let stdin = r#"{"cniVersion":"1.0.0","name":"k8s","type":"sluice-cni",
        "runtimeConfig":{"portMappings":[]},
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],
            "ips":[{"address":"10.1.0.7/24","gateway":"10.1.0.1","interface":0},
                   {"address":"fd00::7/64"}],"dns":{}}}"#;
    let conf = NetConf::parse(stdin.as_bytes(), true).unwrap();
    let raw: Value = serde_json::from_str(stdin).unwrap();
    assert_eq!(conf.result(), raw["prevResult"]);
    let ips = conf.prev_ips().unwrap();
    assert_eq!(
        ips,
        [
            "10.1.0.7".parse::<IpAddr>().unwrap(),
            "fd00::7".parse().unwrap()
        ]
    );
    assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));

    let bad =
        r#"{"cniVersion":"1.0.0","name":"k","type":"s","prevResult":{"ips":[{"address":"x/1"}]}}"#;
    let conf = NetConf::parse(bad.as_bytes(), true).unwrap();
    assert_eq!(conf.prev_ips().unwrap_err().code, 7);
}

#[test]
fn the_first_plugin_in_a_chain_returns_an_empty_result_of_its_version() {
    let conf = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"k","type":"s"}"#, true).unwrap();
    assert_eq!(conf.result(), json!({"cniVersion": "0.4.0"}));
    assert!(conf.supports_check());
    let old = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"k","type":"s"}"#, true).unwrap();
    assert!(!old.supports_check());
}

#[test]
fn version_answers_in_the_requested_version_when_known() {
    assert_eq!(version_result(Some("0.4.0"))["cniVersion"], "0.4.0");
    assert_eq!(version_result(Some("7.0.0"))["cniVersion"], "1.0.0");
    assert_eq!(version_result(None)["supportedVersions"][3], "1.0.0");
}

#[test]
fn errno_strings_runtimes_misread_are_reworded_in_the_error_object() {
    let e = CniError::new(
        ErrorCode::EnrolmentFailed,
        "capture: open /proc/7/ns/net: No such file or directory (os error 2)",
        "attach: Operation not permitted (os error 1); bind: PERMISSION DENIED",
    );
    let out = e.to_json("1.0.0");
    assert_eq!(
        out["msg"],
        "capture: open /proc/7/ns/net: does not exist (os error 2)"
    );
    assert_eq!(
        out["details"],
        "attach: not permitted for this process (os error 1); bind: access refused"
    );
    assert_eq!(
        reword_for_runtimes("nothing to change"),
        "nothing to change"
    );
}
