use std::os::unix::fs::PermissionsExt;

use super::*;

struct Dirs {
    root: PathBuf,
    install: Install,
}

impl Dirs {
    fn new(tag: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("sluice-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        let binary = root.join("sluice-cni-build");
        std::fs::write(&binary, b"#!/bin/true\n").unwrap();
        let install = Install {
            bin_dir: root.join("bin"),
            conf_dir: root.join("net.d"),
            plugin_binary: binary,
            entry: json!({"type": PLUGIN_TYPE, "agentSocket": "/run/sluice/cni.sock"}),
        };
        Self { root, install }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.root.join("net.d").join(name)
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.conf(name)).unwrap()).unwrap()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn types(list: &Value) -> Vec<&str> {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect()
}

const CALICO: &str = r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[
    {"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

#[test]
fn sluice_goes_last_in_the_primary_list_and_comes_back_after_a_rewrite() {
    let d = Dirs::new("list");
    std::fs::write(d.conf("10-calico.conflist"), CALICO).unwrap();
    std::fs::write(d.conf("20-other.conflist"), CALICO).unwrap();
    assert!(matches!(d.install.ensure().unwrap(), Outcome::Written(_)));
    assert_eq!(
        types(&d.read("10-calico.conflist")),
        ["calico", "portmap", PLUGIN_TYPE]
    );
    assert_eq!(
        types(&d.read("20-other.conflist")),
        ["calico", "portmap"],
        "only the primary"
    );
    assert_eq!(
        d.read("10-calico.conflist")["cniVersion"],
        "0.3.1",
        "the list keeps its version"
    );
    assert!(matches!(d.install.ensure().unwrap(), Outcome::Unchanged(_)));

    // The primary CNI rewrites its file without us: we are put back, once.
    std::fs::write(d.conf("10-calico.conflist"), CALICO).unwrap();
    assert!(matches!(d.install.ensure().unwrap(), Outcome::Written(_)));
    assert_eq!(
        types(&d.read("10-calico.conflist")),
        ["calico", "portmap", PLUGIN_TYPE]
    );

    let binary = d.install.bin_dir.join(PLUGIN_TYPE);
    assert_eq!(std::fs::read(&binary).unwrap(), b"#!/bin/true\n");
    assert_eq!(
        std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let leftovers: Vec<_> = std::fs::read_dir(d.conf(""))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");

    d.install.uninstall().unwrap();
    assert_eq!(types(&d.read("10-calico.conflist")), ["calico", "portmap"]);
    assert!(!binary.exists());
}

#[test]
fn a_single_plugin_conf_becomes_a_list() {
    let d = Dirs::new("single");
    std::fs::write(
        d.conf("10-bridge.conf"),
        r#"{"cniVersion":"1.0.0","name":"podnet","type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}}"#,
    )
    .unwrap();
    d.install.ensure().unwrap();
    assert!(!d.conf("10-bridge.conf").exists());
    let list = d.read("10-bridge.conflist");
    assert_eq!(
        (list["name"].as_str(), list["cniVersion"].as_str()),
        (Some("podnet"), Some("1.0.0"))
    );
    assert_eq!(types(&list), ["bridge", PLUGIN_TYPE]);
    assert_eq!(list["plugins"][0]["bridge"], "cni0");
}

#[test]
fn without_a_primary_sluice_writes_its_own_list_until_one_appears() {
    let d = Dirs::new("none");
    d.install.ensure().unwrap();
    assert_eq!(types(&d.read(OWN_CONFLIST)), [PLUGIN_TYPE]);
    std::fs::write(d.conf("05-cilium.conflist"), CALICO).unwrap();
    d.install.ensure().unwrap();
    assert!(!d.conf(OWN_CONFLIST).exists(), "the primary takes over");
    assert_eq!(
        types(&d.read("05-cilium.conflist")).last(),
        Some(&PLUGIN_TYPE)
    );
}

#[test]
fn a_broken_primary_is_reported_and_left_alone() {
    let d = Dirs::new("broken");
    std::fs::write(d.conf("10-calico.conflist"), "{\"plugins\": [").unwrap();
    let e = d.install.ensure().unwrap_err().to_string();
    assert!(
        e.contains("10-calico.conflist") && e.contains("not valid JSON"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(d.conf("10-calico.conflist")).unwrap(),
        "{\"plugins\": ["
    );
}
