//! Reading `AuthorizationPolicy` and `PeerAuthentication` objects in Istio's shape.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    Action, AuthorizationPolicy, Condition, Field, IpBlock, MtlsMode, Operation, Pattern,
    PeerAuthentication, Policies, Rule, Scope, Source,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

/// Only what is read; other metadata (labels, annotations, uid, …) is allowed and ignored.
#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthorizationSpec {
    selector: Option<SelectorSpec>,
    action: Option<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
    provider: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Vec<FromSpec>,
    #[serde(default)]
    to: Vec<ToSpec>,
    #[serde(default)]
    when: Vec<ConditionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    source: SourceSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceSpec {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    operation: OperationSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionSpec {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerSpec {
    selector: Option<SelectorSpec>,
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    port_level_mtls: BTreeMap<u16, MtlsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    mode: Option<MtlsMode>,
}

/// Whether `value` has the shape [`read_object`] needs to put it anywhere (`apiVersion`,
/// `kind` and `metadata.name` strings, `metadata.namespace` a string or absent); `Err` says
/// what is wrong. An object without it is skipped with a warning, so a mesh file that has one
/// is refused whole instead (see `mesh.rs`): the skipped object could be a DENY.
pub(crate) fn readable(value: &serde_yaml::Value) -> Result<(), String> {
    serde_yaml::from_value::<Object>(value.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Reads object `i` into `into`, reporting problems in `warnings`.
pub(super) fn read_object(
    i: usize,
    value: &serde_yaml::Value,
    into: &mut Policies,
    warnings: &mut Vec<String>,
) {
    let object: Object = match serde_yaml::from_value(value.clone()) {
        Ok(object) => object,
        Err(e) => {
            // Without a name and namespace there is no scope to fail closed in.
            warnings.push(format!(
                "policies[{i}]: not a Kubernetes object ({e}); ignored"
            ));
            return;
        }
    };
    let id = format!(
        "{} {}/{}",
        object.kind, object.metadata.namespace, object.metadata.name
    );
    if !object.api_version.starts_with("security.istio.io/") {
        warnings.push(format!(
            "policies[{i}] ({id}): apiVersion {} is not security.istio.io; ignored",
            object.api_version
        ));
        return;
    }
    let name = object.metadata.name.clone();
    let namespace = object.metadata.namespace.clone();
    match object.kind.as_str() {
        // Bound to gateways or waypoints, not to workloads: ztunnel does not enforce these,
        // and neither does sluice (reading it as a workload policy would be wrong either way).
        "AuthorizationPolicy"
            if object.spec.get("targetRefs").is_some()
                || object.spec.get("targetRef").is_some() =>
        {
            warnings.push(format!(
                "{id}: applies to gateways or waypoints (targetRefs), not to workloads; ignored, as ztunnel does"
            ));
        }
        "AuthorizationPolicy" => {
            let policy = match authorization(&name, &namespace, object.spec, &id, warnings) {
                Ok(policy) => policy,
                Err((scope, why)) => {
                    warnings.push(format!(
                        "{id}: {why}; it denies every connection it could apply to until fixed"
                    ));
                    AuthorizationPolicy {
                        name,
                        scope,
                        action: Action::Deny,
                        rules: Vec::new(),
                        broken: Some(why),
                    }
                }
            };
            into.authorization.push(policy);
        }
        "PeerAuthentication" => match peer(&name, &namespace, object.spec) {
            Ok(policy) => into.peer.push(policy),
            Err((scope, why)) => {
                // Fail closed: an unreadable PeerAuthentication is taken as STRICT.
                warnings.push(format!("{id}: {why}; taken as STRICT until fixed"));
                into.peer.push(PeerAuthentication {
                    name,
                    scope,
                    mode: MtlsMode::Strict,
                    ports: BTreeMap::new(),
                });
            }
        },
        other => warnings.push(format!(
            "policies[{i}] ({id}): kind {other} is not AuthorizationPolicy or PeerAuthentication; ignored"
        )),
    }
}

/// The scope of a spec whose `selector` may be unreadable: then the whole namespace.
fn scope_of(namespace: &str, spec: &serde_yaml::Value) -> Scope {
    let selector = spec
        .get("selector")
        .and_then(|s| serde_yaml::from_value::<SelectorSpec>(s.clone()).ok())
        .map(|s| s.match_labels);
    Scope {
        namespace: namespace.to_owned(),
        selector,
    }
}

type Broken = (Scope, String);

fn authorization(
    name: &str,
    namespace: &str,
    spec: serde_yaml::Value,
    id: &str,
    warnings: &mut Vec<String>,
) -> Result<AuthorizationPolicy, Broken> {
    let fallback = scope_of(namespace, &spec);
    let broken = |why: String| (fallback.clone(), why);
    let spec: AuthorizationSpec = if spec.is_null() {
        AuthorizationSpec {
            selector: None,
            action: None,
            rules: Vec::new(),
            provider: None,
        }
    } else {
        serde_yaml::from_value(spec).map_err(|e| broken(format!("spec: {e}")))?
    };
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => {
            return Err(broken(
                "spec.action: CUSTOM needs an external authorizer, which sluice does not have"
                    .into(),
            ));
        }
        other => return Err(broken(format!("spec.action: unknown action {other:?}"))),
    };
    let _ = spec.provider;
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let (rule, l7) = read_rule(rule, &at).map_err(broken)?;
        if l7.is_empty() {
            rules.push(rule);
        } else if action == Action::Allow {
            warnings.push(format!(
                "{id}: {at} uses {} (L7, needs a waypoint): the ALLOW rule is dropped",
                l7.join(", ")
            ));
        } else {
            warnings.push(format!(
                "{id}: {at} uses {} (L7, needs a waypoint): only its L4 parts are enforced",
                l7.join(", ")
            ));
            rules.push(rule);
        }
    }
    Ok(AuthorizationPolicy {
        name: name.to_owned(),
        scope: Scope {
            namespace: namespace.to_owned(),
            selector: spec.selector.map(|s| s.match_labels),
        },
        action,
        rules,
        broken: None,
    })
}

/// The rule's L4 parts, and the names of the L7 fields it uses.
fn read_rule(spec: RuleSpec, at: &str) -> Result<(Rule, Vec<&'static str>), String> {
    let mut l7 = Vec::new();
    let mut rule = Rule::default();
    for (f, from) in spec.from.into_iter().enumerate() {
        let s = from.source;
        let at = format!("{at}.from[{f}].source");
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            l7.push("requestPrincipals");
        }
        let mut ip_blocks = blocks(&s.ip_blocks, &format!("{at}.ipBlocks"))?;
        ip_blocks.extend(blocks(
            &s.remote_ip_blocks,
            &format!("{at}.remoteIpBlocks"),
        )?);
        let mut not_ip_blocks = blocks(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?;
        not_ip_blocks.extend(blocks(
            &s.not_remote_ip_blocks,
            &format!("{at}.notRemoteIpBlocks"),
        )?);
        rule.from.push(Source {
            principals: patterns(s.principals, s.not_principals),
            namespaces: patterns(s.namespaces, s.not_namespaces),
            ip_blocks: Field {
                values: ip_blocks,
                not: not_ip_blocks,
            },
        });
    }
    for (t, to) in spec.to.into_iter().enumerate() {
        let o = to.operation;
        let at = format!("{at}.to[{t}].operation");
        for (field, used) in [
            ("hosts", !o.hosts.is_empty() || !o.not_hosts.is_empty()),
            (
                "methods",
                !o.methods.is_empty() || !o.not_methods.is_empty(),
            ),
            ("paths", !o.paths.is_empty() || !o.not_paths.is_empty()),
        ] {
            if used {
                l7.push(field);
            }
        }
        rule.to.push(Operation {
            ports: Field {
                values: ports(&o.ports, &format!("{at}.ports"))?,
                not: ports(&o.not_ports, &format!("{at}.notPorts"))?,
            },
        });
    }
    for (w, when) in spec.when.into_iter().enumerate() {
        let at = format!("{at}.when[{w}]");
        let condition = match when.key.as_str() {
            "source.ip" | "remote.ip" => Condition::SourceIp(Field {
                values: blocks(&when.values, &at)?,
                not: blocks(&when.not_values, &at)?,
            }),
            "source.namespace" => {
                Condition::SourceNamespace(patterns(when.values, when.not_values))
            }
            "source.principal" => {
                Condition::SourcePrincipal(patterns(when.values, when.not_values))
            }
            "destination.ip" => Condition::DestinationIp(Field {
                values: blocks(&when.values, &at)?,
                not: blocks(&when.not_values, &at)?,
            }),
            "destination.port" => Condition::DestinationPort(Field {
                values: ports(&when.values, &at)?,
                not: ports(&when.not_values, &at)?,
            }),
            _ => {
                l7.push("a `when` key other than source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port");
                continue;
            }
        };
        rule.when.push(condition);
    }
    Ok((rule, l7))
}

fn patterns(values: Vec<String>, not: Vec<String>) -> Field<Pattern> {
    Field {
        values: values.into_iter().map(Pattern).collect(),
        not: not.into_iter().map(Pattern).collect(),
    }
}

fn blocks(values: &[String], at: &str) -> Result<Vec<IpBlock>, String> {
    values
        .iter()
        .map(|v| IpBlock::parse(v).map_err(|e| format!("{at}: {e}")))
        .collect()
}

fn ports(values: &[String], at: &str) -> Result<Vec<u16>, String> {
    values
        .iter()
        .map(|v| match v.parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(format!("{at}: {v:?} is not a port (1-65535)")),
        })
        .collect()
}

fn peer(
    name: &str,
    namespace: &str,
    spec: serde_yaml::Value,
) -> Result<PeerAuthentication, Broken> {
    let fallback = scope_of(namespace, &spec);
    let spec: PeerSpec = if spec.is_null() {
        PeerSpec {
            selector: None,
            mtls: None,
            port_level_mtls: BTreeMap::new(),
        }
    } else {
        serde_yaml::from_value(spec).map_err(|e| (fallback.clone(), format!("spec: {e}")))?
    };
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        return Err((
            fallback,
            "spec.portLevelMtls needs a workload selector (as in Istio)".into(),
        ));
    }
    Ok(PeerAuthentication {
        name: name.to_owned(),
        scope: Scope {
            namespace: namespace.to_owned(),
            selector: spec.selector.map(|s| s.match_labels),
        },
        mode: spec.mtls.and_then(|m| m.mode).unwrap_or(MtlsMode::Unset),
        ports: spec
            .port_level_mtls
            .into_iter()
            .map(|(port, m)| (port, m.mode.unwrap_or(MtlsMode::Unset)))
            .collect(),
    })
}
