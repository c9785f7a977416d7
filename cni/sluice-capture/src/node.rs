//! The node side of Istio's probe exemption: the node's own connections to captured pods
//! (kubelet's HTTP/TCP/gRPC probes, hostNetwork pods) leave from `169.254.7.127` (IPv6:
//! `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`), and each captured pod lets connections from that
//! address through to the app uncaptured, whatever the mesh policy, so probes keep working
//! under STRICT mTLS and ALLOW-only policies.
//!
//! - eBPF: the addresses live on the node's `lo` ([`ensure_probe_addresses`]) and
//!   `bind_node_probe4/6` bind the node's sockets to them when they connect to a captured pod
//!   (`EbpfCapture::attach_node`); replies come back as to any local address.
//! - iptables: Istio's own mechanism, a SNAT in the node's `nat` table for the node's own
//!   sockets (`-m owner --socket-exists`) towards captured pods ([`sync_probe_snat`]).
//!
//! Everything runs in the node's netns, given as a [`Netns`] (the agent's own on a real node).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sluice_common::PROBE_SOURCE_V4;
#[cfg(test)]
use sluice_common::PROBE_SOURCE_V6;

use crate::CaptureError;
use crate::netns::Netns;

pub const PROBE_V4: Ipv4Addr = Ipv4Addr::new(
    PROBE_SOURCE_V4[0],
    PROBE_SOURCE_V4[1],
    PROBE_SOURCE_V4[2],
    PROBE_SOURCE_V4[3],
);
pub const PROBE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// sluice's chain in the node's `nat` table, jumped to from POSTROUTING.
const CHAIN: &str = "SLUICE_POSTRT";

/// Puts the probe addresses on the node's `lo` if they are not there (an operator or a network
/// agent may have removed them: the agent calls this again on every rescan). IPv6 is skipped
/// when the node has it disabled.
pub fn ensure_probe_addresses(node: &Netns) -> Result<(), CaptureError> {
    let present = output(node, "ip", &["-o", "addr", "show", "dev", "lo"])?;
    if !has_addr(&present, &format!("{PROBE_V4}/32")) {
        // Host scope and (IPv6) deprecated: bindable, but never chosen as the source of the
        // node's other traffic (on interfaces without an address of their own the kernel would
        // otherwise pick a global address of `lo`).
        output(
            node,
            "ip",
            &[
                "addr",
                "add",
                &format!("{PROBE_V4}/32"),
                "dev",
                "lo",
                "scope",
                "host",
            ],
        )?;
    }
    if ipv6_enabled(node) && !has_addr(&present, &format!("{PROBE_V6}/128")) {
        output(
            node,
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{PROBE_V6}/128"),
                "dev",
                "lo",
                "nodad",
                "preferred_lft",
                "0",
            ],
        )?;
    }
    Ok(())
}

/// Removes the probe addresses from `lo` (gone already is fine).
pub fn remove_probe_addresses(node: &Netns) -> Result<(), CaptureError> {
    let present = output(node, "ip", &["-o", "addr", "show", "dev", "lo"])?;
    if has_addr(&present, &format!("{PROBE_V4}/32")) {
        output(
            node,
            "ip",
            &["addr", "del", &format!("{PROBE_V4}/32"), "dev", "lo"],
        )?;
    }
    if has_addr(&present, &format!("{PROBE_V6}/128")) {
        output(
            node,
            "ip",
            &["-6", "addr", "del", &format!("{PROBE_V6}/128"), "dev", "lo"],
        )?;
    }
    Ok(())
}

fn has_addr(ip_output: &str, cidr: &str) -> bool {
    ip_output
        .lines()
        .any(|line| line.split_whitespace().any(|word| word == cidr))
}

/// Whether the netns has IPv6 (`/proc/sys/net` shows the reading thread's netns).
fn ipv6_enabled(node: &Netns) -> bool {
    node.run(|| std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6"))
        .is_ok_and(|v| v.is_ok_and(|v| v.trim() == "0"))
}

/// Makes the node's `nat` chain SNAT the node's own TCP connections to exactly `addrs` (the
/// captured pods' addresses) to the probe address: the whole chain is replaced in one
/// `iptables-restore`, so it is never half written.
pub fn sync_probe_snat(node: &Netns, addrs: &[IpAddr]) -> Result<(), CaptureError> {
    for v6 in [false, true] {
        if v6 && !ipv6_enabled(node) {
            continue;
        }
        let (save, restore) = tools(v6);
        let saved = output(node, save, &["-t", "nat"])?;
        let rules = snat_rules(
            addrs,
            v6,
            !saved.contains(&format!("-A POSTROUTING -j {CHAIN}")),
        );
        input(node, restore, &["--noflush"], &rules)?;
    }
    Ok(())
}

/// Removes sluice's SNAT chain and its jump.
pub fn remove_probe_snat(node: &Netns) -> Result<(), CaptureError> {
    for v6 in [false, true] {
        let (save, restore) = tools(v6);
        let Ok(saved) = output(node, save, &["-t", "nat"]) else {
            continue;
        };
        let mut rules = String::from("*nat\n");
        if saved.contains(&format!("-A POSTROUTING -j {CHAIN}")) {
            rules.push_str(&format!("-D POSTROUTING -j {CHAIN}\n"));
        }
        if saved.contains(&format!(":{CHAIN}")) {
            rules.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\n"));
        }
        rules.push_str("COMMIT\n");
        input(node, restore, &["--noflush"], &rules)?;
    }
    Ok(())
}

fn tools(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6tables-save", "ip6tables-restore")
    } else {
        ("iptables-save", "iptables-restore")
    }
}

/// The `iptables-restore --noflush` input: declaring the chain flushes it, then one rule per
/// address of the family (Istio matches an ipset instead; the effect is the same).
fn snat_rules(addrs: &[IpAddr], v6: bool, add_jump: bool) -> String {
    let mut r = format!("*nat\n:{CHAIN} - [0:0]\n");
    if add_jump {
        r.push_str(&format!("-A POSTROUTING -j {CHAIN}\n"));
    }
    for addr in addrs.iter().filter(|a| a.is_ipv6() == v6) {
        let (dst, source) = match addr {
            IpAddr::V4(a) => (format!("{a}/32"), PROBE_V4.to_string()),
            IpAddr::V6(a) => (format!("{a}/128"), PROBE_V6.to_string()),
        };
        r.push_str(&format!(
            "-A {CHAIN} -d {dst} -p tcp -m owner --socket-exists -j SNAT --to-source {source}\n"
        ));
    }
    r.push_str("COMMIT\n");
    r
}

fn output(node: &Netns, program: &str, args: &[&str]) -> Result<String, CaptureError> {
    crate::iptables::run(node, program, args, None)
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn input(node: &Netns, program: &str, args: &[&str], stdin: &str) -> Result<(), CaptureError> {
    crate::iptables::run(node, program, args, Some(stdin)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_addresses_are_istios() {
        assert_eq!(PROBE_V4.to_string(), "169.254.7.127");
        assert_eq!(
            PROBE_V6.to_string(),
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        );
        assert_eq!(
            PROBE_V6.octets(),
            PROBE_SOURCE_V6,
            "the programs' bytes and these agree"
        );
    }

    #[test]
    fn snat_rules_cover_exactly_the_family_s_pod_addresses() {
        let addrs: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let v4 = snat_rules(&addrs, false, true);
        assert_eq!(
            v4,
            "*nat\n:SLUICE_POSTRT - [0:0]\n-A POSTROUTING -j SLUICE_POSTRT\n\
             -A SLUICE_POSTRT -d 10.1.0.5/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             COMMIT\n"
        );
        let v6 = snat_rules(&addrs, true, false);
        assert!(!v6.contains("POSTROUTING -j"), "the jump is added once");
        assert!(v6.contains(
            "-A SLUICE_POSTRT -d fd00::5/128 -p tcp -m owner --socket-exists -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n"
        ));
        assert!(!v6.contains("10.1.0.5"));
    }

    #[test]
    fn address_lines_are_matched_by_whole_word() {
        let out =
            "1: lo    inet 169.254.7.127/32 scope global lo\n1: lo    inet6 ::1/128 scope host\n";
        assert!(has_addr(out, "169.254.7.127/32"));
        assert!(!has_addr(out, "169.254.7.12/32"));
    }
}
