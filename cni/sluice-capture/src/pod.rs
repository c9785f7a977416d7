use std::net::IpAddr;
use std::path::PathBuf;

use sluice_common::{MAX_EXCLUDED_PORTS, MAX_UID_LEN, PodConfig, PodUidKey};

use crate::CaptureError;

/// A pod's uid, checked to be usable as a bpffs directory name and a map key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    pub fn parse(uid: &str) -> Result<Self, CaptureError> {
        let invalid = |why| CaptureError::InvalidUid {
            uid: uid.to_owned(),
            why,
        };
        if uid.is_empty() {
            return Err(invalid("it is empty"));
        }
        if uid.len() > MAX_UID_LEN {
            return Err(invalid("it is longer than 63 bytes"));
        }
        if uid.starts_with('.') {
            return Err(invalid("it starts with a dot"));
        }
        if !uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ));
        }
        Ok(Self(uid.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn key(&self) -> PodUidKey {
        let mut bytes = [0u8; MAX_UID_LEN + 1];
        bytes[..self.0.len()].copy_from_slice(self.0.as_bytes());
        PodUidKey { bytes }
    }

    pub(crate) fn from_key(key: &PodUidKey) -> Option<Self> {
        let len = key.bytes.iter().position(|b| *b == 0)?;
        let s = std::str::from_utf8(&key.bytes[..len]).ok()?;
        Self::parse(s).ok()
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything a backend needs to capture one pod.
#[derive(Clone, Debug)]
pub struct PodCapture {
    pub uid: PodUid,
    /// The pod's network namespace (`/var/run/netns/…`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory. Outbound eBPF capture needs it; the iptables backend
    /// ignores it.
    pub cgroup: Option<PathBuf>,
    /// The pod's addresses, as the node assigned them (the CNI result at ADD, the pod's status
    /// otherwise), never read from inside the pod: a pod can add any address to its own
    /// interfaces. Each has one owner on the node; enrolling a pod with an address another
    /// enrolled pod owns is refused.
    pub addrs: Vec<IpAddr>,
    /// How many captured outbound sockets the pod may have open at once (eBPF).
    pub max_tracked_sockets: u32,
    /// Inbound ports delivered straight to the app (15008 always is).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports that bypass the proxy.
    pub exclude_outbound_ports: Vec<u16>,
}

impl PodCapture {
    pub fn new(uid: PodUid, netns: impl Into<PathBuf>) -> Self {
        Self {
            uid,
            netns: netns.into(),
            cgroup: None,
            addrs: Vec::new(),
            max_tracked_sockets: sluice_common::DEFAULT_MAX_TRACKED_PER_POD,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
        }
    }

    pub(crate) fn config(&self) -> Result<PodConfig, CaptureError> {
        let mut config = PodConfig::default();
        for (list, slots, dir) in [
            (
                &self.exclude_inbound_ports,
                &mut config.exclude_inbound_ports,
                "excluded inbound ports",
            ),
            (
                &self.exclude_outbound_ports,
                &mut config.exclude_outbound_ports,
                "excluded outbound ports",
            ),
        ] {
            if list.len() > MAX_EXCLUDED_PORTS {
                return Err(CaptureError::TooMany {
                    uid: self.uid.to_string(),
                    what: dir,
                    count: list.len(),
                    max: MAX_EXCLUDED_PORTS,
                });
            }
            slots[..list.len()].copy_from_slice(list);
        }
        config.max_tracked = self.max_tracked_sockets;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_accepts_kubernetes_uids_and_rejects_path_tricks() {
        assert!(PodUid::parse("0b9b1c52-5d6e-4b8e-9a7c-3f0d2e1a4b5c").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "a b", &"x".repeat(64)] {
            assert!(PodUid::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn uid_round_trips_through_its_map_key() {
        let uid = PodUid::parse("pod-1.default").unwrap();
        assert_eq!(PodUid::from_key(&uid.key()), Some(uid));
        let longest = PodUid::parse(&"a".repeat(63)).unwrap();
        assert_eq!(PodUid::from_key(&longest.key()), Some(longest));
    }

    #[test]
    fn exclusions_fill_fixed_slots_and_reject_overflow() {
        let mut pod = PodCapture::new(PodUid::parse("p").unwrap(), "/x");
        pod.exclude_inbound_ports = vec![22, 9090];
        let cfg = pod.config().unwrap();
        assert!(cfg.excludes_inbound(22) && cfg.excludes_inbound(9090));
        assert!(!cfg.excludes_outbound(22));
        pod.exclude_outbound_ports = (1..=9).collect();
        assert!(pod.config().is_err());
    }
}
