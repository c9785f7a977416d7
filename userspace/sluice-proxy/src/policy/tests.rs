use std::net::IpAddr;

use super::*;

fn objects(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::from_str(yaml).expect("test YAML")
}

fn read(yaml: &str) -> (Policies, Vec<String>) {
    Policies::read(&objects(yaml))
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).expect("identity")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

struct Case {
    namespace: &'static str,
    /// `None`: unknown, as for a pod handed over by the agent that the mesh file does not list.
    labels: Option<BTreeMap<String, String>>,
}

impl Case {
    fn new(namespace: &'static str, labels: &[(&str, &str)]) -> Self {
        Self {
            namespace,
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
        }
    }

    /// A workload of `namespace` whose labels are unknown.
    fn unlabelled(namespace: &'static str) -> Self {
        Self {
            namespace,
            labels: None,
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            namespace: self.namespace,
            labels: self.labels.as_ref(),
        }
    }
}

/// Authorizes `from` (identity or plaintext) at 10.1.0.9:`port` from `src`.
fn decide(p: &Policies, case: &Case, from: Option<&Identity>, src: &str, port: u16) -> Verdict {
    p.authorize(
        &case.target(),
        &Connection {
            source_ip: ip(src),
            source: from,
            destination_ip: ip("10.1.0.9"),
            destination_port: port,
        },
    )
}

fn allowed(v: &Verdict) -> bool {
    *v == Verdict::Allow
}

/// Istio's getting-started policy: sleep and the gateway may reach productpage.
const PRODUCTPAGE: &str = r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: productpage-viewer, namespace: default}
  spec:
    selector: {matchLabels: {app: productpage}}
    action: ALLOW
    rules:
      - from:
          - source:
              principals:
                - cluster.local/ns/default/sa/sleep
                - cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account
"#;

#[test]
fn allow_lists_principals_and_everything_else_is_denied() {
    let (p, warnings) = read(PRODUCTPAGE);
    assert!(warnings.is_empty(), "{warnings:?}");
    let productpage = Case::new("default", &[("app", "productpage")]);
    let (sleep, notsleep) = (id("default", "sleep"), id("default", "notsleep"));
    let gateway = id("istio-system", "istio-ingressgateway-service-account");
    assert!(allowed(&decide(
        &p,
        &productpage,
        Some(&sleep),
        "10.1.0.2",
        9080
    )));
    assert!(allowed(&decide(
        &p,
        &productpage,
        Some(&gateway),
        "10.1.0.3",
        9080
    )));
    assert_eq!(
        decide(&p, &productpage, Some(&notsleep), "10.1.0.4", 9080),
        Verdict::Deny {
            policy: "no ALLOW policy matched".into()
        }
    );
    assert!(
        !allowed(&decide(&p, &productpage, None, "10.1.0.4", 9080)),
        "plaintext has no principal"
    );
    // Other workloads have no ALLOW policy: allowed.
    let reviews = Case::new("default", &[("app", "reviews")]);
    assert!(allowed(&decide(
        &p,
        &reviews,
        Some(&notsleep),
        "10.1.0.4",
        9080
    )));
}

#[test]
fn deny_wins_over_allow_and_names_the_policy() {
    let (p, _) = read(&format!(
        "{PRODUCTPAGE}{}",
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-9081, namespace: default}
  spec:
    action: DENY
    rules: [{to: [{operation: {ports: ["9081"]}}]}]
"#
    ));
    let productpage = Case::new("default", &[("app", "productpage")]);
    let sleep = id("default", "sleep");
    assert!(allowed(&decide(
        &p,
        &productpage,
        Some(&sleep),
        "10.1.0.2",
        9080
    )));
    assert_eq!(
        decide(&p, &productpage, Some(&sleep), "10.1.0.2", 9081),
        Verdict::Deny {
            policy: "default/no-9081".into()
        }
    );
}

#[test]
fn every_source_field_and_its_not_form_matches() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: fields, namespace: shop}
  spec:
    rules:
      - from: [{source: {principals: ["cluster.local/ns/shop/*"], notPrincipals: ["*/sa/intruder"]}}]
      - from: [{source: {namespaces: ["front*"], notNamespaces: ["frontdoor"]}}]
      - from: [{source: {ipBlocks: ["192.168.0.0/16", "fd00::/8"], notIpBlocks: ["192.168.9.0/24"]}}]
      - from: [{source: {remoteIpBlocks: ["172.16.0.1"]}}]
        to: [{operation: {ports: ["8080"], notPorts: ["8443"]}}]
"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let w = Case::new("shop", &[]);
    let ok = |from: Option<&Identity>, src: &str, port| allowed(&decide(&p, &w, from, src, port));
    // principals with a prefix wildcard, notPrincipals with a suffix one
    assert!(ok(Some(&id("shop", "cart")), "10.0.0.1", 80));
    assert!(!ok(Some(&id("shop", "intruder")), "10.0.0.1", 80));
    // namespaces and notNamespaces
    assert!(ok(Some(&id("frontend", "web")), "10.0.0.1", 80));
    assert!(!ok(Some(&id("frontdoor", "web")), "10.0.0.1", 80));
    assert!(!ok(Some(&id("backend", "web")), "10.0.0.1", 80));
    // ipBlocks, IPv4 and IPv6 (plaintext too), and notIpBlocks
    assert!(ok(None, "192.168.1.1", 80));
    assert!(ok(None, "fd00::7", 80));
    assert!(
        ok(None, "::ffff:192.168.1.1", 80),
        "v4-mapped addresses are v4"
    );
    assert!(!ok(None, "192.168.9.1", 80));
    assert!(!ok(None, "10.9.9.9", 80));
    // remoteIpBlocks (= ipBlocks at L4) combined with ports / notPorts
    assert!(ok(None, "172.16.0.1", 8080));
    assert!(!ok(None, "172.16.0.1", 8081));
}

#[test]
fn when_conditions_at_l4() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: when, namespace: shop}
  spec:
    action: DENY
    rules:
      - when:
          - {key: source.namespace, values: ["legacy"]}
          - {key: destination.port, notValues: ["22"]}
      - when: [{key: source.ip, values: ["10.66.0.0/16"]}]
      - when: [{key: destination.ip, values: ["10.1.0.9"]}, {key: source.principal, values: ["*/sa/robot"]}]
"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let w = Case::new("shop", &[]);
    let denied =
        |from: Option<&Identity>, src: &str, port| !allowed(&decide(&p, &w, from, src, port));
    assert!(denied(Some(&id("legacy", "a")), "10.0.0.1", 80));
    assert!(!denied(Some(&id("legacy", "a")), "10.0.0.1", 22));
    assert!(!denied(Some(&id("modern", "a")), "10.0.0.1", 80));
    assert!(denied(None, "10.66.1.1", 80));
    assert!(denied(Some(&id("x", "robot")), "10.0.0.1", 80));
}

#[test]
fn scope_namespace_selector_and_mesh_wide_root_namespace() {
    let (p, _) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-legacy, namespace: istio-system}
  spec:
    action: DENY
    rules: [{from: [{source: {namespaces: ["legacy"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: allow-nothing, namespace: vault}
  spec: {}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: db-only-shop, namespace: data}
  spec:
    selector: {matchLabels: {app: db}}
    rules: [{from: [{source: {namespaces: ["shop"]}}]}]
"#,
    );
    let legacy = id("legacy", "x");
    let shop = id("shop", "x");
    let anywhere = Case::new("web", &[]);
    assert!(
        !allowed(&decide(&p, &anywhere, Some(&legacy), "10.0.0.1", 80)),
        "mesh-wide DENY"
    );
    assert!(allowed(&decide(&p, &anywhere, Some(&shop), "10.0.0.1", 80)));
    let vault = Case::new("vault", &[]);
    assert!(
        !allowed(&decide(&p, &vault, Some(&shop), "10.0.0.1", 80)),
        "ALLOW with no rules"
    );
    let db = Case::new("data", &[("app", "db")]);
    let cache = Case::new("data", &[("app", "cache")]);
    assert!(allowed(&decide(&p, &db, Some(&shop), "10.0.0.1", 80)));
    assert!(!allowed(&decide(
        &p,
        &db,
        Some(&id("web", "x")),
        "10.0.0.1",
        80
    )));
    assert!(
        allowed(&decide(&p, &cache, Some(&id("web", "x")), "10.0.0.1", 80)),
        "selector"
    );
}

#[test]
fn l7_allow_rules_are_dropped_and_l7_deny_parts_ignored_with_warnings() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: get-only, namespace: shop}
  spec:
    rules: [{to: [{operation: {methods: ["GET"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-admin, namespace: web}
  spec:
    action: DENY
    rules: [{from: [{source: {namespaces: ["legacy"]}}], to: [{operation: {paths: ["/admin"]}}]}]
"#,
    );
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("shop/get-only") && warnings[0].contains("dropped"));
    assert!(warnings[1].contains("only its L4 parts"));
    // The ALLOW policy is left with no rule: nothing is allowed.
    let shop = Case::new("shop", &[]);
    assert!(!allowed(&decide(
        &p,
        &shop,
        Some(&id("shop", "a")),
        "10.0.0.1",
        80
    )));
    // The DENY denies legacy on every path.
    let web = Case::new("web", &[]);
    assert!(!allowed(&decide(
        &p,
        &web,
        Some(&id("legacy", "a")),
        "10.0.0.1",
        80
    )));
    assert!(allowed(&decide(
        &p,
        &web,
        Some(&id("shop", "a")),
        "10.0.0.1",
        80
    )));
}

#[test]
fn a_broken_object_fails_closed_in_its_scope_only() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: typo, namespace: shop}
  spec:
    selector: {matchLabels: {app: cart}}
    rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: unknown-field, namespace: web}
  spec:
    rules: [{form: []}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: fine, namespace: shop}
  spec:
    selector: {matchLabels: {app: checkout}}
    rules: [{from: [{source: {namespaces: ["shop"]}}]}]
- {kind: ConfigMap}
"#,
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings[0].contains("shop/typo") && warnings[0].contains("ipBlocks"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].contains("web/unknown-field") && warnings[1].contains("form"),
        "{}",
        warnings[1]
    );
    let shop = id("shop", "a");
    let cart = Case::new("shop", &[("app", "cart")]);
    assert!(
        !allowed(&decide(&p, &cart, Some(&shop), "10.0.0.1", 80)),
        "broken: closed"
    );
    let checkout = Case::new("shop", &[("app", "checkout")]);
    assert!(
        allowed(&decide(&p, &checkout, Some(&shop), "10.0.0.1", 80)),
        "the valid one works"
    );
    let web = Case::new("web", &[]);
    assert!(
        !allowed(&decide(&p, &web, Some(&shop), "10.0.0.1", 80)),
        "unreadable selector: namespace"
    );
    let other = Case::new("other", &[]);
    assert!(
        allowed(&decide(&p, &other, Some(&shop), "10.0.0.1", 80)),
        "no other scope touched"
    );
}

#[test]
fn peer_authentication_is_resolved_workload_then_namespace_then_mesh() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec: {mtls: {mode: STRICT}}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: relaxed, namespace: legacy}
  spec: {mtls: {mode: PERMISSIVE}}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: db, namespace: legacy}
  spec:
    selector: {matchLabels: {app: db}}
    mtls: {mode: UNSET}
    portLevelMtls: {5432: {mode: STRICT}}
"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let web = Case::new("web", &[]);
    assert_eq!(p.mtls(&web.target(), 80).mode, MtlsMode::Strict);
    assert_eq!(p.mtls(&web.target(), 80).policy, "istio-system/default");
    let legacy = Case::new("legacy", &[]);
    assert_eq!(p.mtls(&legacy.target(), 80).mode, MtlsMode::Permissive);
    let db = Case::new("legacy", &[("app", "db")]);
    assert_eq!(p.mtls(&db.target(), 5432).mode, MtlsMode::Strict);
    assert_eq!(
        p.mtls(&db.target(), 80).mode,
        MtlsMode::Permissive,
        "UNSET inherits"
    );
    let (none, _) = read("[]");
    assert_eq!(none.mtls(&web.target(), 80).mode, MtlsMode::Permissive);
    assert_eq!(none.mtls(&web.target(), 80).policy, "default");
    let (bad, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: oops, namespace: web}
  spec: {mtls: {mode: STRICTLY}}
"#,
    );
    assert!(
        warnings[0].contains("web/oops") && warnings[0].contains("STRICT"),
        "{warnings:?}"
    );
    assert_eq!(
        bad.mtls(&web.target(), 80).mode,
        MtlsMode::Strict,
        "fails closed"
    );
}

#[test]
fn unknown_labels_a_deny_with_a_selector_is_taken_to_select() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-legacy-to-db, namespace: shop}
  spec:
    selector: {matchLabels: {app: db}}
    action: DENY
    rules: [{from: [{source: {namespaces: ["legacy"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-robots, namespace: other}
  spec:
    selector: {matchLabels: {app: db}}
    action: DENY
    rules: [{from: [{source: {principals: ["*/sa/robot"]}}]}]
"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let unknown = Case::unlabelled("shop");
    assert_eq!(
        decide(&p, &unknown, Some(&id("legacy", "a")), "10.0.0.1", 80),
        Verdict::Deny {
            policy: "shop/no-legacy-to-db".into()
        },
        "the DENY may select the workload: it applies"
    );
    assert!(
        allowed(&decide(&p, &unknown, Some(&id("web", "a")), "10.0.0.1", 80)),
        "its rules still decide what it denies"
    );
    assert!(
        allowed(&decide(
            &p,
            &unknown,
            Some(&id("x", "robot")),
            "10.0.0.1",
            80
        )),
        "a DENY of another namespace stays out of scope"
    );
    // Control: with known labels the selector decides.
    let cache = Case::new("shop", &[("app", "cache")]);
    assert!(allowed(&decide(
        &p,
        &cache,
        Some(&id("legacy", "a")),
        "10.0.0.1",
        80
    )));
}

#[test]
fn unknown_labels_an_allow_with_a_selector_must_match_but_never_grants() {
    let (p, _) = read(PRODUCTPAGE);
    let unknown = Case::unlabelled("default");
    let sleep = id("default", "sleep");
    let Verdict::Deny { policy } = decide(&p, &unknown, Some(&sleep), "10.1.0.2", 9080) else {
        panic!("an ALLOW whose selector cannot be checked must not grant");
    };
    assert!(
        policy.contains("default/productpage-viewer") && policy.contains("labels are unknown"),
        "the refusal says which policy and why: {policy}"
    );
    assert_eq!(
        decide(
            &p,
            &unknown,
            Some(&id("default", "notsleep")),
            "10.1.0.4",
            9080
        ),
        Verdict::Deny {
            policy: "no ALLOW policy matched".into()
        },
        "the ALLOW is in scope, so something has to match"
    );
    assert!(!allowed(&decide(&p, &unknown, None, "10.1.0.4", 9080)));
    assert!(
        allowed(&decide(&p, &Case::unlabelled("web"), None, "10.1.0.4", 80)),
        "another namespace has no ALLOW policy"
    );

    // A namespace-wide ALLOW selects the workload for sure: it grants what it matches.
    let (p, _) = read(&format!(
        "{PRODUCTPAGE}{}",
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: from-default, namespace: default}
  spec:
    rules: [{from: [{source: {namespaces: ["default"]}}]}]
"#
    ));
    assert!(allowed(&decide(
        &p,
        &unknown,
        Some(&sleep),
        "10.1.0.2",
        9080
    )));
    assert!(!allowed(&decide(
        &p,
        &unknown,
        Some(&id("web", "a")),
        "10.1.0.2",
        9080
    )));
}

#[test]
fn unknown_labels_namespace_and_mesh_wide_policies_apply_as_to_any_workload() {
    let (p, _) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-legacy, namespace: istio-system}
  spec:
    action: DENY
    rules: [{from: [{source: {namespaces: ["legacy"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: shop-only, namespace: data}
  spec:
    selector: {matchLabels: {}}
    rules: [{from: [{source: {namespaces: ["shop"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: typo, namespace: vault}
  spec:
    selector: {matchLabels: {app: secrets}}
    rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]
"#,
    );
    let web = Case::unlabelled("web");
    assert!(!allowed(&decide(
        &p,
        &web,
        Some(&id("legacy", "a")),
        "10.0.0.1",
        80
    )));
    assert!(allowed(&decide(
        &p,
        &web,
        Some(&id("shop", "a")),
        "10.0.0.1",
        80
    )));
    // An empty matchLabels selects every workload, labels known or not: it grants.
    let data = Case::unlabelled("data");
    assert!(allowed(&decide(
        &p,
        &data,
        Some(&id("shop", "a")),
        "10.0.0.1",
        80
    )));
    assert!(!allowed(&decide(
        &p,
        &data,
        Some(&id("web", "a")),
        "10.0.0.1",
        80
    )));
    // A broken object whose selector cannot be checked denies, as a DENY would.
    let vault = Case::unlabelled("vault");
    assert_eq!(
        decide(&p, &vault, Some(&id("shop", "a")), "10.0.0.1", 80),
        Verdict::Deny {
            policy: "vault/typo".into()
        }
    );
}

#[test]
fn unknown_labels_peer_authentication_with_a_selector_counts_only_when_stricter() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec: {mtls: {mode: STRICT}}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: relaxed, namespace: web}
  spec:
    selector: {matchLabels: {app: legacy}}
    mtls: {mode: PERMISSIVE}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: open, namespace: legacy}
  spec: {mtls: {mode: DISABLE}}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: db, namespace: legacy}
  spec:
    selector: {matchLabels: {app: db}}
    mtls: {mode: UNSET}
    portLevelMtls: {5432: {mode: STRICT}}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: cache, namespace: legacy}
  spec:
    selector: {matchLabels: {app: cache}}
    mtls: {mode: PERMISSIVE}
"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    // The mesh-wide STRICT applies; a PERMISSIVE selecting by labels cannot loosen it.
    let web = Case::unlabelled("web");
    let mtls = p.mtls(&web.target(), 80);
    assert_eq!(mtls.mode, MtlsMode::Strict);
    assert_eq!(mtls.policy, "istio-system/default");
    // Control: with the labels known, the workload's PERMISSIVE wins, as in Istio.
    let legacy_app = Case::new("web", &[("app", "legacy")]);
    assert_eq!(p.mtls(&legacy_app.target(), 80).mode, MtlsMode::Permissive);
    // A port-level STRICT that may select the workload applies on its port...
    let unknown = Case::unlabelled("legacy");
    let db_port = p.mtls(&unknown.target(), 5432);
    assert_eq!(db_port.mode, MtlsMode::Strict);
    assert!(
        db_port.policy.starts_with("legacy/db") && db_port.policy.contains("labels are unknown"),
        "{}",
        db_port.policy
    );
    // ...and elsewhere the strictest of the namespace's DISABLE and a PERMISSIVE that may
    // select it (UNSET inherits: it is no stricter).
    let other_port = p.mtls(&unknown.target(), 80);
    assert_eq!(other_port.mode, MtlsMode::Permissive);
    assert!(other_port.policy.starts_with("legacy/cache"));
    // Control: a workload known not to be selected keeps the namespace's DISABLE.
    let web_app = Case::new("legacy", &[("app", "web")]);
    assert_eq!(p.mtls(&web_app.target(), 5432).mode, MtlsMode::Disable);
}

#[test]
fn ip_blocks_parse_and_contain() {
    let b = IpBlock::parse("10.1.0.0/16").unwrap();
    assert!(b.contains(ip("10.1.200.3")) && !b.contains(ip("10.2.0.1")));
    assert!(IpBlock::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    assert!(IpBlock::parse("::/0").unwrap().contains(ip("fd00::1")));
    assert!(
        !IpBlock::parse("::/0").unwrap().contains(ip("8.8.8.8")),
        "families differ"
    );
    for bad in ["10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/x"] {
        assert!(IpBlock::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn ipv4_mapped_blocks_match_their_ipv4_sources() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: mapped, namespace: shop}
  spec:
    rules:
      - from: [{source: {ipBlocks: ["::ffff:10.1.0.0/112", "::ffff:192.168.7.7"], notIpBlocks: ["::ffff:10.1.9.0/120"]}}]
"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let w = Case::new("shop", &[]);
    let ok = |src: &str| allowed(&decide(&p, &w, None, src, 80));
    assert!(ok("10.1.2.3"), "a mapped /112 is the IPv4 /16");
    assert!(ok("::ffff:10.1.2.3"));
    assert!(ok("192.168.7.7"), "a mapped address is that IPv4 address");
    assert!(
        !ok("10.1.9.9"),
        "a mapped notIpBlocks excludes its IPv4 addresses"
    );
    assert!(!ok("10.2.0.1"));
    assert!(!ok("fd00::1"));
}

#[test]
fn gateway_and_waypoint_policies_are_ignored_by_name_not_failed_closed() {
    let (p, warnings) = read(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: at-the-gateway, namespace: shop}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: web}]
    action: DENY
    rules: [{to: [{operation: {paths: ["/admin"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: at-the-waypoint, namespace: istio-system}
  spec:
    targetRef: {kind: Service, group: "", name: reviews}
    action: ALLOW
"#,
    );
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    for name in ["shop/at-the-gateway", "istio-system/at-the-waypoint"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(name) && w.contains("targetRefs") && w.contains("ignored")),
            "{name} is named: {warnings:?}"
        );
    }
    // Neither denies its namespace nor (in istio-system) the whole mesh.
    let w = Case::new("shop", &[]);
    assert!(allowed(&decide(&p, &w, None, "10.0.0.1", 80)));
    assert!(allowed(&decide(
        &p,
        &w,
        Some(&id("shop", "cart")),
        "10.0.0.1",
        80
    )));
}
