//! The parts of the CNI specification (1.0.0, plus 1.1.0's STATUS and GC) a chained plugin
//! needs: the environment a runtime sets, the network configuration on stdin, the result
//! passed through, and the error object with the spec's codes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

/// The spec versions whose configuration and result formats this plugin understands. 0.2.0 and
/// older have a different result shape (`ip4`/`ip6`) and are refused.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Where the agent listens unless the network configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/sluice/cni.sock";

/// How long ADD waits for the agent unless the configuration says otherwise. Pod start is
/// blocked meanwhile, so it stays well under the runtime's own CNI timeout.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;

/// The spec's well-known error codes (section "Error"); 100 and up are the plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    PluginNotAvailable = 50,
    /// The agent refused to enrol the pod (capture or proxy hand-off failed).
    EnrolmentFailed = 100,
}

/// A CNI error: printed as the spec's error object on stdout, with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code: code as u32,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object in the configuration's version (1.0.0 when the configuration could not
    /// be read), worded so that runtimes do not misread it (see [`reword_for_runtimes`]).
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": reword_for_runtimes(&self.msg),
            "details": reword_for_runtimes(&self.details),
        })
    }
}

/// C library error strings that container runtimes take for their own: podman matches
/// "no such file or directory" anywhere in a CNI error and exits 127 ("command not found"), and
/// "permission denied" or "operation not permitted" as 126. The plugin's own messages never
/// use them; these replace them where they arrive in another component's error (the agent's
/// reply quoting the kernel), keeping the meaning.
const MISREAD_BY_RUNTIMES: &[(&str, &str)] = &[
    ("no such file or directory", "does not exist"),
    ("permission denied", "access refused"),
    ("operation not permitted", "not permitted for this process"),
];

/// `text` with every [`MISREAD_BY_RUNTIMES`] phrase replaced, whatever its case.
pub fn reword_for_runtimes(text: &str) -> String {
    let mut out = text.to_owned();
    for (phrase, words) in MISREAD_BY_RUNTIMES {
        // ASCII lowercasing keeps byte offsets, so a match in the lowercase copy is a match in
        // `out` at the same place.
        while let Some(at) = out.to_ascii_lowercase().find(phrase) {
            out.replace_range(at..at + phrase.len(), words);
        }
    }
    out
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {}): {}", self.msg, self.code, self.details)
    }
}

/// The verb the runtime asked for (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The runtime's request, from the process environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub verb: Verb,
    pub container_id: String,
    /// Empty on DEL when the runtime no longer has the netns (allowed by the spec).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, `KEY=VALUE` pairs separated by `;`.
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads and checks the environment. `get` is `std::env::var` in the binary, a map in tests.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let missing = |name: &str| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("{name} is not set"),
                "sluice-cni is a CNI plugin: a container runtime runs it with the CNI_* \
                 environment of the CNI specification",
            )
        };
        let command = get("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))?;
        let verb = match command.as_str() {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "VERSION" => Verb::Version,
            "STATUS" => Verb::Status,
            "GC" => Verb::Gc,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                    "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
                ));
            }
        };
        let per_container = matches!(verb, Verb::Add | Verb::Del | Verb::Check);
        let mut container_id = String::new();
        let mut ifname = String::new();
        let mut netns = None;
        if per_container {
            container_id = get("CNI_CONTAINERID")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("CNI_CONTAINERID"))?;
            check_container_id(&container_id)?;
            ifname = get("CNI_IFNAME")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("CNI_IFNAME"))?;
            netns = get("CNI_NETNS")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
            if netns.is_none() && verb != Verb::Del {
                return Err(missing("CNI_NETNS"));
            }
        }
        let args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            verb,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The Kubernetes pod this sandbox belongs to, from the `K8S_POD_*` arguments kubelet's
    /// runtimes pass; `None` for a container that is not a Kubernetes pod.
    pub fn pod(&self) -> Option<crate::agent_api::PodRef> {
        Some(crate::agent_api::PodRef {
            namespace: self.args.get("K8S_POD_NAMESPACE")?.clone(),
            name: self.args.get("K8S_POD_NAME")?.clone(),
            uid: self.args.get("K8S_POD_UID").cloned(),
        })
    }
}

/// The spec's rule for container ids: at least one character, alphanumerics first, then also
/// `_`, `.` and `-`.
fn check_container_id(id: &str) -> Result<(), CniError> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_CONTAINERID {id:?} is not a valid container id"),
            "a container id starts with a letter or digit and contains only letters, digits, \
             '_', '.' and '-'",
        ))
    }
}

fn parse_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut args = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                "CNI_ARGS is a ';'-separated list of KEY=VALUE pairs",
            ));
        };
        args.insert(key.to_owned(), value.to_owned());
    }
    Ok(args)
}

/// This plugin's entry in a network configuration list, as the runtime hands it over (with
/// `cniVersion`, `name` and, when chained, `prevResult` filled in).
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The previous plugin's result, passed through unchanged.
    pub prev_result: Option<Value>,
    pub agent_socket: PathBuf,
    pub timeout_seconds: u64,
    /// Pods in these namespaces start without asking the agent (the node's own system pods must
    /// be able to start while the agent is not there yet).
    pub exclude_namespaces: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    prev_result: Option<Value>,
    agent_socket: Option<PathBuf>,
    timeout_seconds: Option<u64>,
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    // Other keys (runtimeConfig, capabilities, args, …) are the runtime's and are ignored.
}

impl NetConf {
    /// Parses stdin. Only the version is needed for VERSION, so `full` is false there.
    pub fn parse(stdin: &[u8], full: bool) -> Result<Self, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "cannot decode the network configuration on stdin",
                format!("{e}; the runtime must pass this plugin's JSON configuration on stdin"),
            )
        })?;
        let invalid = |msg: String, details: &str| {
            CniError::new(ErrorCode::InvalidConfig, msg, details.to_owned())
        };
        let cni_version = raw
            .cni_version
            .ok_or_else(|| invalid("cniVersion is missing".into(), "set \"cniVersion\""))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("CNI version {cni_version:?} is not supported"),
                format!("sluice-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let conf = Self {
            name: raw.name.unwrap_or_default(),
            prev_result: raw.prev_result,
            agent_socket: raw
                .agent_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET)),
            timeout_seconds: raw.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS),
            exclude_namespaces: raw.exclude_namespaces,
            cni_version,
        };
        if !full {
            return Ok(conf);
        }
        if conf.name.is_empty() {
            return Err(invalid(
                "the network name is missing".into(),
                "the runtime sets \"name\" from the network configuration list",
            ));
        }
        if raw.plugin_type.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(
                "\"type\" is missing".into(),
                "set \"type\": \"sluice-cni\"",
            ));
        }
        if !(1..=300).contains(&conf.timeout_seconds) {
            return Err(invalid(
                format!("timeoutSeconds {} is out of range", conf.timeout_seconds),
                "use 1 to 300 seconds",
            ));
        }
        if conf.prev_result.as_ref().is_some_and(|p| !p.is_object()) {
            return Err(invalid(
                "prevResult is not an object".into(),
                "a chained plugin's prevResult is the previous plugin's result object",
            ));
        }
        Ok(conf)
    }

    /// The pod addresses the previous plugins assigned (`ips[].address`, without the prefix).
    pub fn prev_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(ips) = self.prev_result.as_ref().and_then(|p| p.get("ips")) else {
            return Ok(Vec::new());
        };
        let bad = |what: String| {
            CniError::new(
                ErrorCode::InvalidConfig,
                format!("prevResult: {what}"),
                "prevResult.ips[].address must be an address with a prefix length, e.g. \
                 10.0.0.2/24",
            )
        };
        let ips = ips
            .as_array()
            .ok_or_else(|| bad("ips is not a list".into()))?;
        ips.iter()
            .map(|ip| {
                let address = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an ips entry has no address".into()))?;
                let host = address.split_once('/').map_or(address, |(h, _)| h);
                host.parse()
                    .map_err(|_| bad(format!("{address:?} is not an address")))
            })
            .collect()
    }

    /// What ADD prints: the previous result unchanged, or an empty result of this version when
    /// this plugin runs first (nothing to pass on).
    pub fn result(&self) -> Value {
        self.prev_result
            .clone()
            .unwrap_or_else(|| json!({ "cniVersion": self.cni_version }))
    }

    /// CHECK appeared in 0.4.0; a runtime must not send it for older configurations.
    pub fn supports_check(&self) -> bool {
        !matches!(self.cni_version.as_str(), "0.3.0" | "0.3.1")
    }
}

/// VERSION's answer.
pub fn version_result(requested: Option<&str>) -> Value {
    let version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or("1.0.0");
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests;
