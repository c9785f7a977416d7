//! The iptables backend: Istio ambient's in-pod rule set (istio-cni ≥ 1.24), applied inside the
//! pod's netns with `iptables-restore`, the baseline the eBPF backend is measured against.
//!
//! sluice owns exactly the chains `ISTIO_PRERT` and `ISTIO_OUTPUT`, the jumps to them, one policy
//! routing rule and one route per family; removal deletes exactly those.

use std::io::Write;
use std::process::{Output, Stdio};

use tracing::info;

use crate::netns::Netns;
use crate::{
    Backend, CaptureError, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND, PROXY_MARK, PodCapture,
    Redirector,
};

/// Marks connections that came in for the proxy so their replies route back through it.
const CONNMARK: u32 = 0x111;
const MASK: u32 = 0xfff;
const ROUTE_TABLE: &str = "100";
const RULE_PREF: &str = "32764";

/// Applies and removes Istio's in-pod iptables capture.
#[derive(Debug, Default)]
pub struct IptablesCapture;

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn probe_source(self) -> String {
        match self {
            Family::V4 => format!("{}/32", crate::node::PROBE_V4),
            Family::V6 => format!("{}/128", crate::node::PROBE_V6),
        }
    }

    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The `iptables-restore --noflush` input that installs capture.
fn install_rules(family: Family, pod: &PodCapture) -> String {
    let lo = family.loopback();
    let mut r = String::new();
    r.push_str("*mangle\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n");
    r.push_str("-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n");
    r.push_str(&format!(
        "-A ISTIO_PRERT -m mark --mark {PROXY_MARK:#x}/{MASK:#x} -j CONNMARK --set-xmark {CONNMARK:#x}/{MASK:#x}\n"
    ));
    r.push_str(&format!(
        "-A ISTIO_OUTPUT -m connmark --mark {CONNMARK:#x}/{MASK:#x} -j CONNMARK --restore-mark --nfmask {MASK:#x} --ctmask {MASK:#x}\n"
    ));
    r.push_str("COMMIT\n*nat\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n");
    r.push_str("-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n");
    // The node's own connections (kubelet's probes), SNATed to the probe address on the node
    // (`crate::node::sync_probe_snat`), reach the app uncaptured, as with Istio.
    r.push_str(&format!(
        "-A ISTIO_PRERT -s {} -p tcp -m tcp -j ACCEPT\n",
        family.probe_source()
    ));
    for port in &pod.exclude_inbound_ports {
        r.push_str(&format!("-A ISTIO_PRERT -p tcp --dport {port} -j RETURN\n"));
    }
    r.push_str(&format!(
        "-A ISTIO_PRERT ! -d {lo} -p tcp ! --dport {PORT_HBONE} -m mark ! --mark {PROXY_MARK:#x}/{MASK:#x} -j REDIRECT --to-ports {PORT_INBOUND}\n"
    ));
    r.push_str(&format!(
        "-A ISTIO_OUTPUT -p tcp -m mark --mark {CONNMARK:#x}/{MASK:#x} -j ACCEPT\n"
    ));
    r.push_str(&format!("-A ISTIO_OUTPUT ! -d {lo} -o lo -j ACCEPT\n"));
    for port in &pod.exclude_outbound_ports {
        r.push_str(&format!(
            "-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN\n"
        ));
    }
    r.push_str(&format!(
        "-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {PROXY_MARK:#x}/{MASK:#x} -j REDIRECT --to-ports {PORT_OUTBOUND}\n"
    ));
    r.push_str("COMMIT\n");
    r
}

/// The `iptables-restore --noflush` input that removes what [`install_rules`] installed, given
/// the current `iptables-save` output (only chains that exist are touched).
fn removal_rules(saved: &str) -> Option<String> {
    let mut r = String::new();
    for table in ["mangle", "nat"] {
        let section = section(saved, table);
        if !section.contains(":ISTIO_PRERT") && !section.contains(":ISTIO_OUTPUT") {
            continue;
        }
        r.push_str(&format!("*{table}\n"));
        for (hook, chain) in [("PREROUTING", "ISTIO_PRERT"), ("OUTPUT", "ISTIO_OUTPUT")] {
            if section.contains(&format!("-A {hook} -j {chain}")) {
                r.push_str(&format!("-D {hook} -j {chain}\n"));
            }
        }
        for chain in ["ISTIO_PRERT", "ISTIO_OUTPUT"] {
            if section.contains(&format!(":{chain}")) {
                r.push_str(&format!("-F {chain}\n-X {chain}\n"));
            }
        }
        r.push_str("COMMIT\n");
    }
    (!r.is_empty()).then_some(r)
}

fn section<'a>(saved: &'a str, table: &str) -> &'a str {
    let header = format!("*{table}\n");
    let Some(start) = saved.find(&header) else {
        return "";
    };
    let rest = &saved[start..];
    let end = rest.find("COMMIT").unwrap_or(rest.len());
    &rest[..end]
}

impl IptablesCapture {
    pub fn new() -> Self {
        Self
    }

    fn apply(&self, netns: &Netns, pod: &PodCapture) -> Result<(), CaptureError> {
        // The reply route for marked connections goes via `lo`; the kernel refuses it while `lo`
        // is down. Pods always have it up; a netns made by hand with `ip netns add` does not.
        let lo = run(netns, "ip", &["-o", "link", "show", "dev", "lo"], None)?;
        let lo = String::from_utf8_lossy(&lo.stdout);
        let flags = lo.split(['<', '>']).nth(1).unwrap_or("");
        if !flags.split(',').any(|f| f == "UP") {
            return Err(CaptureError::Command {
                command: "check lo".into(),
                netns: netns.path().to_path_buf(),
                stderr: "the loopback interface is down; bring it up first (ip netns exec NAME ip link set lo up)".into(),
            });
        }
        self.clear(netns)?;
        for family in [Family::V4, Family::V6] {
            run(
                netns,
                family.restore(),
                &["--noflush"],
                Some(&install_rules(family, pod)),
            )?;
            run(
                netns,
                "ip",
                &[
                    family.ip_flag(),
                    "rule",
                    "add",
                    "fwmark",
                    &format!("{CONNMARK:#x}/{MASK:#x}"),
                    "pref",
                    RULE_PREF,
                    "lookup",
                    ROUTE_TABLE,
                ],
                None,
            )?;
            run(
                netns,
                "ip",
                &[
                    family.ip_flag(),
                    "route",
                    "add",
                    "local",
                    family.any(),
                    "dev",
                    "lo",
                    "table",
                    ROUTE_TABLE,
                ],
                None,
            )?;
        }
        Ok(())
    }

    fn clear(&self, netns: &Netns) -> Result<(), CaptureError> {
        for family in [Family::V4, Family::V6] {
            let saved = run(netns, family.save(), &[], None)?;
            if let Some(rules) = removal_rules(&String::from_utf8_lossy(&saved.stdout)) {
                run(netns, family.restore(), &["--noflush"], Some(&rules))?;
            }
            // `ip rule del` / `ip route flush` of things that are not there fail; that is the
            // state we want, so only "present → removed" matters.
            let rule = format!("{CONNMARK:#x}/{MASK:#x}");
            while run(
                netns,
                "ip",
                &[
                    family.ip_flag(),
                    "rule",
                    "del",
                    "fwmark",
                    &rule,
                    "pref",
                    RULE_PREF,
                    "lookup",
                    ROUTE_TABLE,
                ],
                None,
            )
            .is_ok()
            {}
            let _ = run(
                netns,
                "ip",
                &[family.ip_flag(), "route", "flush", "table", ROUTE_TABLE],
                None,
            );
        }
        Ok(())
    }
}

impl Redirector for IptablesCapture {
    fn backend(&self) -> Backend {
        Backend::Iptables
    }

    fn enroll(&mut self, pod: &PodCapture) -> Result<(), CaptureError> {
        let netns = Netns::open(&pod.netns).map_err(|source| CaptureError::Netns {
            path: pod.netns.clone(),
            source,
        })?;
        pod.config()?;
        if let Err(e) = self.apply(&netns, pod) {
            let _ = self.clear(&netns);
            return Err(e);
        }
        info!(pod = %pod.uid, netns = %pod.netns.display(), "pod captured (iptables)");
        Ok(())
    }

    fn remove(&mut self, pod: &PodCapture) -> Result<(), CaptureError> {
        // The rules live in the pod's netns: if that is gone, so are they.
        let netns = match Netns::open(&pod.netns) {
            Ok(netns) => netns,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(CaptureError::Netns {
                    path: pod.netns.clone(),
                    source,
                });
            }
        };
        self.clear(&netns)?;
        info!(pod = %pod.uid, "pod released (iptables)");
        Ok(())
    }
}

/// Runs `program` inside `netns` (stdin fed from `stdin`), failing with its stderr.
pub(crate) fn run(
    netns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, CaptureError> {
    let describe = || format!("{program} {}", args.join(" "));
    let failed = |stderr: String| CaptureError::Command {
        command: describe(),
        netns: netns.path().to_path_buf(),
        stderr,
    };
    let mut cmd = netns.command(program).map_err(|e| failed(e.to_string()))?;
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot start {program}: {e}; is it installed?")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PodUid;

    fn pod() -> PodCapture {
        let mut pod = PodCapture::new(PodUid::parse("p").unwrap(), "/x");
        pod.exclude_inbound_ports = vec![9090];
        pod.exclude_outbound_ports = vec![5432];
        pod
    }

    #[test]
    fn install_rules_are_istios_in_pod_set() {
        let rules = install_rules(Family::V4, &pod());
        for expected in [
            "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
            "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
            "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        ] {
            assert!(rules.contains(expected), "missing {expected:?} in\n{rules}");
        }
        let v6 = install_rules(Family::V6, &pod());
        assert!(v6.contains("! -d ::1/128 -o lo -j ACCEPT"));
        assert!(v6.contains(
            "-A ISTIO_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -m tcp -j ACCEPT"
        ));
        let probe = rules_of(&install_rules(Family::V4, &pod()), "-s 169.254.7.127");
        let redirect = rules_of(&install_rules(Family::V4, &pod()), "--to-ports 15006");
        assert!(
            probe < redirect,
            "the probe exemption must come before the redirect"
        );
    }

    fn rules_of(rules: &str, needle: &str) -> usize {
        rules.find(needle).unwrap_or(usize::MAX)
    }

    #[test]
    fn exclusions_return_before_the_redirects() {
        let rules = install_rules(Family::V4, &pod());
        let excl_in = rules.find("--dport 9090 -j RETURN").unwrap();
        let redirect_in = rules.find("--to-ports 15006").unwrap();
        assert!(excl_in < redirect_in);
        let excl_out = rules.find("--dport 5432 -j RETURN").unwrap();
        let redirect_out = rules.find("--to-ports 15001").unwrap();
        assert!(excl_out < redirect_out);
    }

    #[test]
    fn removal_touches_only_existing_sluice_chains() {
        assert_eq!(
            removal_rules("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
        let saved = "*mangle\n:PREROUTING ACCEPT [0:0]\n:ISTIO_PRERT - [0:0]\n-A PREROUTING -j ISTIO_PRERT\nCOMMIT\n\
                     *nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
        let removal = removal_rules(saved).unwrap();
        assert!(removal.contains(
            "*mangle\n-D PREROUTING -j ISTIO_PRERT\n-F ISTIO_PRERT\n-X ISTIO_PRERT\nCOMMIT"
        ));
        assert!(
            removal.contains(
                "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT"
            )
        );
        assert!(!removal.contains("-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_PRERT"));
    }
}
