//! The lab's guards leave nothing behind, even when a scenario fails half-way.

use sluice_capture::Backend;
use sluice_lab::lab::Lab;
use sluice_lab::proxy::ProxyProcess;

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(name).exists()
}

#[test]
fn a_dropped_lab_removes_its_namespaces_cgroups_pins_and_processes() {
    crate::require_root();
    for backend in [Backend::Ebpf, Backend::Iptables] {
        let mut lab = Lab::new(backend).unwrap();
        lab.capture().unwrap();
        let proxy = ProxyProcess::start(&lab, &[]).unwrap();
        let names = [lab.pod_ns.name.clone(), lab.peer_ns.name.clone()];
        let cgroups = [lab.pod_cgroup.path.clone(), lab.proxy_cgroup.path.clone()];
        let pins = lab.pin_root();
        // Dropped in the middle of a capture, as a failing test would.
        drop(proxy);
        drop(lab);
        for name in &names {
            assert!(!netns_exists(name), "netns {name} left behind ({backend})");
        }
        for cgroup in &cgroups {
            assert!(
                !cgroup.exists(),
                "cgroup {} left behind ({backend})",
                cgroup.display()
            );
        }
        assert!(
            !pins.exists(),
            "pins left at {} ({backend})",
            pins.display()
        );
    }
}
