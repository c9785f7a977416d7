//! Istio's L4 authorization (`AuthorizationPolicy`) and `PeerAuthentication`, read from the same
//! objects users already have (security.istio.io/v1) and enforced by the destination proxy.
//!
//! Authorization: any matching DENY denies; with no ALLOW policy for the workload, allow; else an
//! ALLOW must match. Policies in the root namespace (`istio-system`) apply mesh-wide, others to
//! their namespace; a `selector` narrows either to workloads with those labels.
//!
//! Without a waypoint only L4 attributes exist, so rules that need L7 (methods, paths, hosts,
//! request principals, other `when` keys) are handled as Istio's ztunnel does: an ALLOW rule
//! with L7 parts is dropped (it never matches), a DENY rule keeps only its L4 parts (it matches
//! more). Each such case is reported as a warning.
//!
//! An object that cannot be read fails closed: it denies every connection in its scope (its
//! namespace, narrowed by its selector if that part is readable) until it is fixed, and the
//! problem is reported with its name and field. Other objects are unaffected.
//!
//! A workload whose labels are unknown (handed over by the agent, not in the mesh file) is
//! still under every policy of its namespace and the mesh; a selector that cannot be evaluated
//! is read the way that fails closed: a DENY selects it, an ALLOW selects it but cannot grant,
//! a PeerAuthentication counts where it is stricter.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::identity::Identity;

/// Istio's default root namespace: policies there apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    /// Logged by Istio, no effect on the decision.
    Audit,
}

/// A string match with Istio's wildcards: `*`, `prefix*`, `*suffix`, or exact.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern(String);

impl Pattern {
    fn matches(&self, value: &str) -> bool {
        let p = self.0.as_str();
        if p == "*" {
            return true;
        }
        if let Some(prefix) = p.strip_suffix('*') {
            return value.starts_with(prefix);
        }
        if let Some(suffix) = p.strip_prefix('*') {
            return value.ends_with(suffix);
        }
        p == value
    }
}

/// An address block: `10.0.0.0/8`, `fd00::/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IpBlock {
    addr: IpAddr,
    prefix: u8,
}

impl IpBlock {
    fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address or CIDR block");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| bad())?,
                Some(p.parse::<u8>().map_err(|_| bad())?),
            ),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        // An IPv4-mapped block (`::ffff:10.1.0.0/112`) means those IPv4 addresses: sources are
        // matched in their IPv4 form, so the block is kept in it too.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Self {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
        Ok(Self { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(a.to_bits()), u128::from(b.to_bits()), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// One field of a source or operation: any of `values` must match, none of `not` may.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Field<T> {
    values: Vec<T>,
    not: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not.iter().any(matches)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Source {
    principals: Field<Pattern>,
    namespaces: Field<Pattern>,
    ip_blocks: Field<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Operation {
    ports: Field<u16>,
}

/// The `when` keys that exist at L4.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Condition {
    SourceIp(Field<IpBlock>),
    SourceNamespace(Field<Pattern>),
    SourcePrincipal(Field<Pattern>),
    DestinationIp(Field<IpBlock>),
    DestinationPort(Field<u16>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

/// What a connection offers to the rules.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub source_ip: IpAddr,
    /// The client's mesh identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

impl Connection<'_> {
    /// Istio's principal form: `<trust domain>/ns/<namespace>/sa/<account>`.
    fn principal(&self) -> Option<String> {
        self.source.map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        })
    }
}

impl Rule {
    fn matches(&self, c: &Connection<'_>) -> bool {
        let principal = c.principal();
        let namespace = c.source.map(|id| id.namespace.as_str());
        // An identity field needs an identity: plaintext never matches `principals: [x]`, and
        // never fails `notPrincipals` either (there is nothing to exclude).
        let pattern = |field: &Field<Pattern>, value: Option<&str>| match value {
            Some(v) => field.check(|p| p.matches(v)),
            None => field.values.is_empty(),
        };
        let source_ok = |s: &Source| {
            pattern(&s.principals, principal.as_deref())
                && pattern(&s.namespaces, namespace)
                && s.ip_blocks.check(|b| b.contains(c.source_ip))
        };
        let from = self.from.is_empty() || self.from.iter().any(source_ok);
        let to = self.to.is_empty()
            || self
                .to
                .iter()
                .any(|o| o.ports.check(|p| *p == c.destination_port));
        let when = self.when.iter().all(|condition| match condition {
            Condition::SourceIp(f) => f.check(|b| b.contains(c.source_ip)),
            Condition::SourceNamespace(f) => pattern(f, namespace),
            Condition::SourcePrincipal(f) => pattern(f, principal.as_deref()),
            Condition::DestinationIp(f) => f.check(|b| b.contains(c.destination_ip)),
            Condition::DestinationPort(f) => f.check(|p| *p == c.destination_port),
        });
        from && to && when
    }
}

/// The workload a decision is about.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    /// `None` when the labels are unknown: a pod the agent handed over that the mesh file does
    /// not list (ZDS's `WorkloadInfo` carries no labels). A `selector` then cannot be evaluated,
    /// and each kind of object takes the answer that fails closed (see [`Policies::authorize`]
    /// and [`Policies::mtls`]).
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// Whether an object's scope takes in a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Selected {
    Yes,
    No,
    /// In the scope's namespace, but its selector names labels and the workload's are unknown.
    Unknown,
}

/// Which workloads an object applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scope {
    namespace: String,
    /// `matchLabels`; `None`: every workload of the scope.
    selector: Option<BTreeMap<String, String>>,
}

impl Scope {
    fn selects(&self, target: &Target<'_>) -> Selected {
        if self.namespace != ROOT_NAMESPACE && self.namespace != target.namespace {
            return Selected::No;
        }
        // An empty `matchLabels` selects every workload, whatever its labels.
        let Some(selector) = self.selector.as_ref().filter(|s| !s.is_empty()) else {
            return Selected::Yes;
        };
        match target.labels {
            Some(labels) if selector.iter().all(|(k, v)| labels.get(k) == Some(v)) => Selected::Yes,
            Some(_) => Selected::No,
            None => Selected::Unknown,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AuthorizationPolicy {
    name: String,
    scope: Scope,
    action: Action,
    rules: Vec<Rule>,
    /// Set when the object could not be read: it then denies everything in its scope.
    broken: Option<String>,
}

impl AuthorizationPolicy {
    fn id(&self) -> String {
        format!("{}/{}", self.scope.namespace, self.name)
    }

    fn matches(&self, c: &Connection<'_>) -> bool {
        self.broken.is_some() || self.rules.iter().any(|r| r.matches(c))
    }
}

/// The outcome of authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// `policy` is `namespace/name` of the deciding policy, or why none allowed.
    Deny {
        policy: String,
    },
}

/// PeerAuthentication's mTLS modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerAuthentication {
    name: String,
    scope: Scope,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

/// The effective mTLS mode for a workload and port, and the object that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mtls {
    pub mode: MtlsMode,
    /// `namespace/name`, or `default` when no object applies.
    pub policy: String,
}

/// Every policy object of the mesh, read once per mesh version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    authorization: Vec<AuthorizationPolicy>,
    peer: Vec<PeerAuthentication>,
    /// Set while some policies are not known yet (Kubernetes not synced): everything is
    /// denied and plaintext refused, with this reason.
    pending: Option<String>,
}

impl Policies {
    /// Reads the objects; returns the policies and a warning per problem (an object that
    /// could not be read, or an L7 part dropped or ignored).
    pub fn read(objects: &[serde_yaml::Value]) -> (Self, Vec<String>) {
        let mut policies = Self::default();
        let mut warnings = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            read_object(i, object, &mut policies, &mut warnings);
        }
        (policies, warnings)
    }

    /// What the config dump shows: each object as enforced.
    pub fn describe(&self) -> serde_json::Value {
        let scope = |s: &Scope| {
            serde_json::json!({"namespace": s.namespace, "selector": s.selector,
                               "meshWide": s.namespace == ROOT_NAMESPACE})
        };
        let authorization: Vec<serde_json::Value> = self
            .authorization
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "scope": scope(&p.scope),
                    "action": format!("{:?}", p.action).to_uppercase(),
                    "rules": p.rules.len(), "brokenDeniesAll": p.broken,
                })
            })
            .collect();
        let peer: Vec<serde_json::Value> = self
            .peer
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "scope": scope(&p.scope), "mode": format!("{:?}", p.mode).to_uppercase(),
                    "portLevel": p.ports.iter().map(|(k, v)| (k.to_string(), format!("{v:?}").to_uppercase())).collect::<BTreeMap<_, _>>(),
                })
            })
            .collect();
        serde_json::json!({"authorization": authorization, "peerAuthentication": peer})
    }

    pub fn is_empty(&self) -> bool {
        self.authorization.is_empty() && self.peer.is_empty()
    }

    /// How many objects are in force.
    pub fn len(&self) -> usize {
        self.authorization.len() + self.peer.len()
    }

    /// Why nothing is allowed yet, while policies are missing.
    pub fn pending(&self) -> Option<&str> {
        self.pending.as_deref()
    }

    /// Fails closed until the missing policies arrive.
    pub fn set_pending(&mut self, why: &str) {
        self.pending = Some(why.to_owned());
    }

    /// Authorizes a connection to `target`.
    ///
    /// Where `target`'s labels are unknown, a policy whose selector cannot be evaluated is
    /// taken to select the workload (a DENY then denies, an ALLOW then has to match) but never
    /// to grant: with such ALLOW policies in scope, only one that selects the workload for
    /// sure can allow.
    pub fn authorize(&self, target: &Target<'_>, c: &Connection<'_>) -> Verdict {
        if let Some(why) = &self.pending {
            return Verdict::Deny {
                policy: why.clone(),
            };
        }
        let applicable = || {
            self.authorization
                .iter()
                .map(|p| (p, p.scope.selects(target)))
                .filter(|(_, selected)| *selected != Selected::No)
        };
        if let Some((p, _)) = applicable()
            .find(|(p, _)| (p.action == Action::Deny || p.broken.is_some()) && p.matches(c))
        {
            return Verdict::Deny { policy: p.id() };
        }
        let mut allows = applicable()
            .filter(|(p, _)| p.action == Action::Allow)
            .peekable();
        if allows.peek().is_none() {
            return Verdict::Allow;
        }
        let mut unchecked = None;
        for (p, selected) in allows {
            if !p.matches(c) {
                continue;
            }
            if selected == Selected::Yes {
                return Verdict::Allow;
            }
            unchecked.get_or_insert(p);
        }
        let policy = match unchecked {
            Some(p) => format!(
                "{} would allow, but its selector cannot be checked: the workload's labels are \
                 unknown (list the pod in the mesh file)",
                p.id()
            ),
            None => "no ALLOW policy matched".to_owned(),
        };
        Verdict::Deny { policy }
    }

    /// The mTLS mode for `target`'s `port`: a workload-selecting object in its namespace
    /// (port-level first), then its namespace's, then the mesh-wide one; PERMISSIVE by default.
    ///
    /// Where `target`'s labels are unknown, a workload-selecting object that may select it
    /// counts only where it is stricter than what applies otherwise (its STRICT wins, its
    /// PERMISSIVE or DISABLE never loosens a STRICT namespace or mesh).
    pub fn mtls(&self, target: &Target<'_>, port: u16) -> Mtls {
        let resolved = self.mtls_known(target, port);
        let in_ns = |p: &&PeerAuthentication| p.scope.namespace == target.namespace;
        self.peer
            .iter()
            .filter(in_ns)
            .filter(|p| p.scope.selector.is_some() && p.scope.selects(target) == Selected::Unknown)
            .filter_map(|p| {
                let mode = [p.ports.get(&port).copied(), Some(p.mode)]
                    .into_iter()
                    .flatten()
                    .find(|m| *m != MtlsMode::Unset)?;
                Some(Mtls {
                    mode,
                    policy: format!(
                        "{}/{} (its selector taken to match: the workload's labels are unknown)",
                        p.scope.namespace, p.name
                    ),
                })
            })
            .fold(resolved, |strictest, candidate| {
                if strictness(candidate.mode) > strictness(strictest.mode) {
                    candidate
                } else {
                    strictest
                }
            })
    }

    /// [`Policies::mtls`] from the objects known to select `target` (or not to).
    fn mtls_known(&self, target: &Target<'_>, port: u16) -> Mtls {
        if let Some(why) = &self.pending {
            return Mtls {
                mode: MtlsMode::Strict,
                policy: why.clone(),
            };
        }
        let in_ns = |p: &&PeerAuthentication| p.scope.namespace == target.namespace;
        let workload = self
            .peer
            .iter()
            .filter(in_ns)
            .find(|p| p.scope.selector.is_some() && p.scope.selects(target) == Selected::Yes);
        let namespace = self
            .peer
            .iter()
            .filter(in_ns)
            .find(|p| p.scope.selector.is_none());
        let mesh = self
            .peer
            .iter()
            .find(|p| p.scope.namespace == ROOT_NAMESPACE && p.scope.selector.is_none());
        let levels = [
            workload.and_then(|p| p.ports.get(&port).map(|m| (*m, p))),
            workload.map(|p| (p.mode, p)),
            namespace.map(|p| (p.mode, p)),
            mesh.map(|p| (p.mode, p)),
        ];
        levels
            .into_iter()
            .flatten()
            .find(|(mode, _)| *mode != MtlsMode::Unset)
            .map_or(
                Mtls {
                    mode: MtlsMode::Permissive,
                    policy: "default".to_owned(),
                },
                |(mode, p)| Mtls {
                    mode,
                    policy: format!("{}/{}", p.scope.namespace, p.name),
                },
            )
    }
}

/// How much a mode asks of a client: DISABLE < PERMISSIVE < STRICT (UNSET inherits, so it
/// is never chosen on its own).
fn strictness(mode: MtlsMode) -> u8 {
    match mode {
        MtlsMode::Unset | MtlsMode::Disable => 0,
        MtlsMode::Permissive => 1,
        MtlsMode::Strict => 2,
    }
}

mod read;
use read::read_object;
pub(crate) use read::readable;

#[cfg(test)]
mod tests;
