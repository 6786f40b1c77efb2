use std::collections::BTreeMap;

use cilium_labels::{LabelSet, k8s_pod_labels};
use crate::rule;

use super::*;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// A small cluster: identities of pods by (namespace, app), plus reserved ones.
struct World {
    ids: BTreeMap<u32, LabelSet>,
    by_name: BTreeMap<String, u32>,
}

impl World {
    fn new(pods: &[(&str, &str)]) -> World {
        let mut ids = BTreeMap::new();
        ids.insert(1, LabelSet::parse_all(["reserved:host"]));
        ids.insert(2, LabelSet::parse_all(["reserved:world", "reserved:world-ipv4"]));
        ids.insert(6, LabelSet::parse_all(["reserved:remote-node"]));
        let mut by_name = BTreeMap::new();
        for (i, (ns, app)) in pods.iter().enumerate() {
            let mut l = BTreeMap::new();
            l.insert("app".to_string(), app.to_string());
            let id = 256 + i as u32;
            ids.insert(id, k8s_pod_labels(ns, &l, &BTreeMap::new(), "default", "default"));
            by_name.insert(format!("{ns}/{app}"), id);
        }
        World { ids, by_name }
    }

    fn id(&self, name: &str) -> u32 {
        self.by_name[name]
    }

    fn policy(&self, yaml: &str, pod: &str) -> EndpointPolicy {
        let parsed = parse_policies(yaml, "test.yaml").unwrap();
        let rules: Vec<Rule> = parsed.into_iter().flat_map(|(_, r)| r).collect();
        self.policy_for_rules(&rules, pod)
    }

    fn policy_for_rules(&self, rules: &[Rule], pod: &str) -> EndpointPolicy {
        let labels = self.ids[&self.id(pod)].clone();
        compute(&Input {
            rules,
            labels: &labels,
            identities: &self.ids,
            own_ports: &NamedPorts::new(),
            peer_ports: &BTreeMap::new(),
            options: PolicyOptions { allow_localhost: false, ..Default::default() },
        })
    }
}

/// What the datapath would do: None = no enforcement or allowed.
fn allowed(p: &EndpointPolicy, peer: u32, egress: bool, proto: u8, port: u16) -> bool {
    let enforced = if egress { p.egress_enforced } else { p.ingress_enforced };
    if !enforced {
        return true;
    }
    matches!(p.entries.lookup(peer, egress, proto, port), Some((_, v)) if !v.deny && v.proxy_port != cilium_abi::POLICY_PROXY_PORT_PENDING)
}

const SEED_001: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "frontend-to-backend"
spec:
  endpointSelector:
    matchLabels:
      app: frontend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: backend
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#;

#[test]
fn seed_001_policy_means_what_upstream_means() {
    let w = World::new(&[("default", "frontend"), ("default", "backend")]);
    let fe = w.policy(SEED_001, "default/frontend");
    assert!(fe.ingress_enforced);
    assert!(!fe.egress_enforced, "an ingress-only policy never restricts the frontend's own egress");
    assert!(allowed(&fe, w.id("default/backend"), false, TCP, 8080));
    assert!(!allowed(&fe, w.id("default/backend"), false, TCP, 80));
    assert!(!allowed(&fe, w.id("default/backend"), false, UDP, 8080));
    assert!(!allowed(&fe, 2, false, TCP, 8080), "world is not backend");
    // the backend is not selected at all
    let be = w.policy(SEED_001, "default/backend");
    assert!(!be.ingress_enforced && !be.egress_enforced);
    assert_eq!(fe.selected_by, vec!["CiliumNetworkPolicy/default/frontend-to-backend".to_string()]);
}

#[test]
fn cnp_peers_are_scoped_to_the_policy_namespace() {
    let w = World::new(&[("prod", "web"), ("prod", "db"), ("dev", "web")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
"#,
        "prod/db",
    );
    assert!(allowed(&p, w.id("prod/web"), false, TCP, 5432));
    assert!(!allowed(&p, w.id("dev/web"), false, TCP, 5432), "other namespace's web is not selected");
}

#[test]
fn explicit_namespace_in_peer_is_respected() {
    let w = World::new(&[("prod", "db"), ("dev", "web")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: web, "k8s:io.kubernetes.pod.namespace": dev}
"#,
        "prod/db",
    );
    assert!(allowed(&p, w.id("dev/web"), false, TCP, 1));
}

#[test]
fn cnp_endpoint_selector_only_selects_own_namespace() {
    let w = World::new(&[("prod", "web"), ("dev", "web")]);
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  endpointSelector: {}
  ingress: [{}]
"#;
    assert!(w.policy(yaml, "prod/web").ingress_enforced);
    assert!(!w.policy(yaml, "dev/web").ingress_enforced);
}

#[test]
fn empty_ingress_rule_denies_all_in_cnp_but_allows_all_in_knp() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let cnp = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress: [{}]
"#,
        "default/a",
    );
    assert!(cnp.ingress_enforced);
    assert!(!allowed(&cnp, w.id("default/b"), false, TCP, 80));
    assert!(!allowed(&cnp, 2, false, TCP, 80));

    let knp = w.policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{}]
"#,
        "default/a",
    );
    assert!(knp.ingress_enforced);
    assert!(allowed(&knp, w.id("default/b"), false, TCP, 80));
    assert!(allowed(&knp, 2, false, UDP, 53));
}

#[test]
fn l4_only_rule_applies_to_every_peer() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#,
        "default/a",
    );
    assert!(allowed(&p, w.id("default/b"), false, TCP, 80));
    assert!(allowed(&p, 2, false, TCP, 80));
    assert!(!allowed(&p, 2, false, TCP, 81));
    let k = p.entries.lookup(2, false, TCP, 80).unwrap().0;
    assert_eq!(k.identity, 0, "wildcard identity");
    assert_eq!(k.match_type(), cilium_abi::PolicyMatch::L4Only);
}

#[test]
fn deny_beats_allow() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "80"}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: b}}]
"#,
        "default/a",
    );
    assert!(!allowed(&p, w.id("default/b"), false, TCP, 80));
    assert!(p.entries.lookup(w.id("default/b"), false, TCP, 80).unwrap().1.deny);
}

#[test]
fn trace_names_the_deny_policy_not_the_allow() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allow}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: b}}]}]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: b}}]}]\n";
    let rules: Vec<Rule> = parse_policies(yaml, "x").unwrap().into_iter().flat_map(|(_, r)| r).collect();
    let named = NamedPorts::new();
    let party = |l| trace::Party { labels: l, is_endpoint: true, named_ports: &named };
    let t = trace::trace(&rules, &party(&w.ids[&w.id("default/b")]), &party(&w.ids[&w.id("default/a")]), Protocol::Tcp, 80, PolicyOptions::default());
    let ing = t.ingress.unwrap();
    assert_eq!(ing.verdict, trace::Verdict::Denied);
    assert_eq!(ing.denied_by.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), vec!["deny"]);
    assert!(ing.allowed_by.is_empty());
}

#[test]
fn deny_of_all_peers_on_a_port_beats_specific_allow() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: b}}]
  egressDeny:
  - toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"#,
        "default/a",
    );
    let b = w.id("default/b");
    assert!(!allowed(&p, b, true, TCP, 22));
    assert!(allowed(&p, b, true, TCP, 23));
    assert!(!allowed(&p, 2, true, TCP, 443));
}

#[test]
fn entities() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let yaml = |e: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a}}}}\n  egress:\n  - toEntities: [{e}]\n"
        )
    };
    let b = w.id("default/b");
    let world = w.policy(&yaml("world"), "default/a");
    assert!(allowed(&world, 2, true, TCP, 443));
    assert!(!allowed(&world, b, true, TCP, 443));
    assert!(!allowed(&world, 1, true, TCP, 443));
    let host = w.policy(&yaml("host"), "default/a");
    assert!(allowed(&host, 1, true, TCP, 1));
    assert!(!allowed(&host, 2, true, TCP, 1));
    let cluster = w.policy(&yaml("cluster"), "default/a");
    assert!(allowed(&cluster, b, true, TCP, 1));
    assert!(allowed(&cluster, 1, true, TCP, 1));
    assert!(allowed(&cluster, 6, true, TCP, 1));
    assert!(!allowed(&cluster, 2, true, TCP, 1));
    let all = w.policy(&yaml("all"), "default/a");
    assert!(allowed(&all, 2, true, UDP, 53) && allowed(&all, b, true, TCP, 1));
    let none = w.policy(&yaml("none"), "default/a");
    assert!(none.egress_enforced && !allowed(&none, b, true, TCP, 1));
}

#[test]
fn match_expressions_and_port_ranges() {
    let w = World::new(&[("default", "a"), ("default", "b"), ("default", "c")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: app, operator: In, values: [b]}
    toPorts:
    - ports: [{port: "8000", endPort: 8100, protocol: TCP}]
"#,
        "default/a",
    );
    let b = w.id("default/b");
    assert!(allowed(&p, b, false, TCP, 8000));
    assert!(allowed(&p, b, false, TCP, 8050));
    assert!(allowed(&p, b, false, TCP, 8100));
    assert!(!allowed(&p, b, false, TCP, 8101));
    assert!(!allowed(&p, b, false, TCP, 7999));
    assert!(!allowed(&p, w.id("default/c"), false, TCP, 8000));
}

#[test]
fn default_deny_off_allows_what_is_not_denied() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: b}}]
"#,
        "default/a",
    );
    assert!(!allowed(&p, w.id("default/b"), false, TCP, 1));
    assert!(allowed(&p, 2, false, TCP, 1));
}

#[test]
fn knp_defaults_and_selectors() {
    let w = World::new(&[("prod", "db"), ("prod", "web"), ("dev", "web")]);
    let p = w.policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    ports:
    - port: 5432
"#,
        "prod/db",
    );
    assert!(p.ingress_enforced && !p.egress_enforced, "policyTypes defaults to Ingress only");
    assert!(allowed(&p, w.id("prod/web"), false, TCP, 5432));
    assert!(!allowed(&p, w.id("prod/web"), false, UDP, 5432), "protocol defaults to TCP");
    assert!(!allowed(&p, w.id("dev/web"), false, TCP, 5432));

    let ns = w.policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}
"#,
        "prod/db",
    );
    assert!(ns.egress_enforced, "Egress listed: deny all egress");
    assert!(!allowed(&ns, w.id("prod/web"), true, TCP, 80));
    assert!(allowed(&ns, w.id("dev/web"), false, TCP, 80));
    assert!(!allowed(&ns, w.id("prod/web"), false, TCP, 80));
    assert!(!allowed(&ns, 2, false, TCP, 80), "namespaceSelector selects pods, not the world");
}

#[test]
fn enforcement_modes() {
    let w = World::new(&[("default", "a")]);
    let rules: Vec<Rule> = vec![];
    let labels = w.ids[&w.id("default/a")].clone();
    let run = |mode| {
        compute(&Input {
            rules: &rules,
            labels: &labels,
            identities: &w.ids,
            own_ports: &NamedPorts::new(),
            peer_ports: &BTreeMap::new(),
            options: PolicyOptions { mode, allow_localhost: true, l7_proxy: false },
        })
    };
    let d = run(EnforcementMode::Default);
    assert!(!d.ingress_enforced && !d.egress_enforced);
    let a = run(EnforcementMode::Always);
    assert!(a.ingress_enforced && a.egress_enforced);
    assert!(allowed(&a, 1, false, TCP, 80), "localhost allowed into the endpoint");
    assert!(!allowed(&a, 2, false, TCP, 80));
    let parsed = parse_policies(SEED_001, "x").unwrap();
    let rules2: Vec<Rule> = parsed.into_iter().flat_map(|(_, r)| r).collect();
    let n = compute(&Input {
        rules: &rules2,
        labels: &labels,
        identities: &w.ids,
        own_ports: &NamedPorts::new(),
        peer_ports: &BTreeMap::new(),
        options: PolicyOptions { mode: EnforcementMode::Never, allow_localhost: true, l7_proxy: false },
    });
    assert!(!n.ingress_enforced && n.entries.is_empty());
}

#[test]
fn named_ports_resolve_against_the_endpoint() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let parsed = parse_policies(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - toPorts: [{ports: [{port: http, protocol: TCP}]}]
"#,
        "x",
    )
    .unwrap();
    let rules: Vec<Rule> = parsed.into_iter().flat_map(|(_, r)| r).collect();
    let mut own = NamedPorts::new();
    own.entry("http".into()).or_default().insert((Protocol::Tcp, 8080));
    let labels = w.ids[&w.id("default/a")].clone();
    let p = compute(&Input {
        rules: &rules,
        labels: &labels,
        identities: &w.ids,
        own_ports: &own,
        peer_ports: &BTreeMap::new(),
        options: PolicyOptions { allow_localhost: false, ..Default::default() },
    });
    assert!(allowed(&p, w.id("default/b"), false, TCP, 8080));
    assert!(!allowed(&p, w.id("default/b"), false, TCP, 80));
}

fn parse_err(yaml: &str) -> PolicyError {
    parse_policies(yaml, "bad.yaml").unwrap_err()
}

#[test]
fn errors_name_the_field_and_value() {
    let e = parse_err(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCPX}]}]
"#,
    );
    assert_eq!(e.field, "spec.ingress[0].toPorts[0].ports[0].protocol");
    assert_eq!(e.value, "TCPX");
    assert!(e.document.contains("bad.yaml document 1"), "{e}");
    assert!(e.document.contains("\"p\""), "{e}");

    let e = parse_err(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoint: []\n",
    );
    assert_eq!(e.field, "spec.ingress[0].fromEndpoint");
    assert!(e.message.contains("fromEndpoint"), "{e}");

    let e = parse_err(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"70000\"}]}]\n",
    );
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.egress[0].toPorts[0].ports[0].port", "70000"));

    let e = parse_err(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toEntities: [wrld]\n",
    );
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.egress[0].toEntities[0]", "wrld"));

    let e = parse_err("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress: []\n");
    assert_eq!(e.field, "spec");

    let e = parse_err(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector:\n    matchExpressions: [{key: a, operator: Equals, values: [x]}]\n",
    );
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.endpointSelector.matchExpressions[0].operator", "Equals"));

    let e = parse_err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n");
    assert_eq!((e.field.as_str(), e.value.as_str()), ("kind", "Pod"));

    let e = parse_err(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.300/8]\n",
    );
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.egress[0].toCIDR[0]", "10.0.0.300/8"));
}

#[test]
fn second_invalid_document_fails_the_whole_text() {
    let text = format!("{SEED_001}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: q}}\nspec: {{endpointSelector: {{}}, ingress: [{{fromEntities: [nope]}}]}}\n");
    let e = parse_policies(&text, "two.yaml").unwrap_err();
    assert!(e.document.starts_with("two.yaml document 2"), "{e}");
}

#[test]
fn repository_replaces_by_name_and_bumps_revision() {
    let mut repo = Repository::new();
    let r0 = repo.revision();
    let r1 = repo.apply(parse_policies(SEED_001, "a").unwrap());
    assert!(r1 > r0);
    let r2 = repo.apply(parse_policies(SEED_001, "a").unwrap());
    assert!(r2 > r1);
    assert_eq!(repo.len(), 1, "same name replaces");
    let key = repo.documents().next().unwrap().key();
    assert!(repo.delete(&key));
    assert!(!repo.delete(&key));
    assert!(repo.rules().is_empty());
}

#[test]
fn l7_sections_parse_and_validate() {
    let ok = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: GET
          path: "/api/v1/public/.*"
        - method: POST
          path: /api/v1/users
          headers: ["X-API-Key"]
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
  - toFQDNs: [{matchName: api.example.com}]
"#;
    let parsed = parse_policies(ok, "l7.yaml").unwrap();
    assert!(parsed[0].1[0].ingress[0].has_l7);
    let bad = ok.replace("/api/v1/public/.*", "/api/(");
    let e = parse_policies(&bad, "l7.yaml").unwrap_err();
    assert_eq!(e.field, "spec.ingress[0].toPorts[0].rules.http[0].path");
}

#[test]
fn cidr_rules_select_cidr_identities_with_except_and_never_pods() {
    let mut w = World::new(&[("default", "a"), ("default", "b")]);
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.96.0.0/12]
  - toCIDR: [192.0.2.0/24]
"#;
    let parsed = parse_policies(yaml, "x").unwrap();
    let rules: Vec<Rule> = parsed.into_iter().flat_map(|(_, r)| r).collect();
    let cidrs = rule::referenced_cidrs(&rules);
    assert_eq!(cidrs.len(), 3);
    let mut by_net = BTreeMap::new();
    for (i, net) in cidrs.iter().enumerate() {
        let id = (1 << 24) + i as u32;
        w.ids.insert(id, rule::cidr_identity_labels(net));
        by_net.insert(net.to_string(), id);
    }
    // a more specific prefix that only the ipcache knows, inside 10.0.0.0/8
    let inner: ipnet::IpNet = "10.1.0.0/16".parse().unwrap();
    w.ids.insert((1 << 24) + 10, rule::cidr_identity_labels(&inner));
    let p = w.policy_for_rules(&rules, "default/a");
    assert!(allowed(&p, by_net["10.0.0.0/8"], true, TCP, 443));
    assert!(allowed(&p, (1 << 24) + 10, true, TCP, 443), "prefixes inside the CIDR are selected too");
    assert!(!allowed(&p, by_net["10.96.0.0/12"], true, TCP, 443), "except");
    assert!(allowed(&p, by_net["192.0.2.0/24"], true, UDP, 53));
    assert!(!allowed(&p, 2, true, TCP, 443), "the rest of the world");
    assert!(!allowed(&p, w.id("default/b"), true, TCP, 443), "CIDR rules never select pods");
    // and the world entity covers CIDR identities
    let world = w.policy(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: q}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  egress: [{toEntities: [world]}]\n",
        "default/a",
    );
    assert!(allowed(&world, by_net["192.0.2.0/24"], true, TCP, 1));
}

/// `policy trace` and the computed map state must always agree.
#[test]
fn trace_agrees_with_the_computed_datapath_state() {
    let w = World::new(&[("default", "a"), ("default", "b"), ("prod", "a"), ("prod", "c")]);
    let policies = [
        SEED_001,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p1}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n    toPorts: [{ports: [{port: \"80\"}]}]\n  egressDeny:\n  - toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]\n  egress:\n  - toEntities: [cluster]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p2}\nspec:\n  endpointSelector: {matchLabels: {app: c}}\n  ingress:\n  - fromEndpoints: [{}]\n    toPorts: [{ports: [{port: \"80\", endPort: 81, protocol: TCP}]}]\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p3, namespace: prod}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {}}]}]\n  egress: [{ports: [{port: 80}]}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p5}\nspec:\n  endpointSelector: {matchLabels: {app: c}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: a}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: GET}]}}]\n  - toEndpoints: [{matchLabels: {app: a, \"k8s:io.kubernetes.pod.namespace\": default}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p4}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  enableDefaultDeny: {egress: false}\n  egressDeny:\n  - toEndpoints: [{matchLabels: {app: a}}]\n    toPorts: [{ports: [{port: \"81\"}]}]\n",
    ];
    let mut rules: Vec<Rule> = Vec::new();
    for p in policies {
        rules.extend(parse_policies(p, "x").unwrap().into_iter().flat_map(|(_, r)| r));
    }
    let names = ["default/a", "default/b", "prod/a", "prod/c"];
    let named = NamedPorts::new();
    let options = PolicyOptions { allow_localhost: true, ..Default::default() };
    let mut checked = 0;
    for src in names {
        for dst in names {
            let (sl, dl) = (&w.ids[&w.id(src)], &w.ids[&w.id(dst)]);
            let sp = compute(&Input { rules: &rules, labels: sl, identities: &w.ids, own_ports: &named, peer_ports: &BTreeMap::new(), options });
            let dp = compute(&Input { rules: &rules, labels: dl, identities: &w.ids, own_ports: &named, peer_ports: &BTreeMap::new(), options });
            for (proto, pnum) in [(Protocol::Tcp, TCP), (Protocol::Udp, UDP)] {
                for port in [53u16, 80, 81, 82] {
                    let datapath = allowed(&sp, w.id(dst), true, pnum, port) && allowed(&dp, w.id(src), false, pnum, port);
                    let t = trace::trace(
                        &rules,
                        &trace::Party { labels: sl, is_endpoint: true, named_ports: &named },
                        &trace::Party { labels: dl, is_endpoint: true, named_ports: &named },
                        proto,
                        port,
                        options,
                    );
                    assert_eq!(t.verdict == trace::Verdict::Allowed, datapath, "{src} -> {dst} {port}/{proto:?}:\n{}", t.render(src, dst));
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 128);
}

#[test]
fn trace_explains_the_seed_policy() {
    let w = World::new(&[("default", "frontend"), ("default", "backend")]);
    let rules: Vec<Rule> = parse_policies(SEED_001, "x").unwrap().into_iter().flat_map(|(_, r)| r).collect();
    let named = NamedPorts::new();
    let (be, fe) = (&w.ids[&w.id("default/backend")], &w.ids[&w.id("default/frontend")]);
    let party = |l| trace::Party { labels: l, is_endpoint: true, named_ports: &named };
    let t = trace::trace(&rules, &party(be), &party(fe), Protocol::Tcp, 80, PolicyOptions::default());
    assert_eq!(t.verdict, trace::Verdict::Denied);
    let ing = t.ingress.as_ref().unwrap();
    assert!(ing.enforced);
    assert!(ing.steps[0].contains("spec.ingress[0]") && ing.steps[0].contains("80/TCP is not in 8080/TCP"), "{:?}", ing.steps);
    assert!(!t.egress.as_ref().unwrap().enforced, "backend's egress is open");
    assert!(ing.allowed_by.is_empty() && ing.denied_by.is_empty(), "default deny names no policy");
    let t = trace::trace(&rules, &party(be), &party(fe), Protocol::Tcp, 8080, PolicyOptions::default());
    assert_eq!(t.verdict, trace::Verdict::Allowed);
    let ing = t.ingress.unwrap();
    assert!(ing.reason.contains("frontend-to-backend spec.ingress[0]"));
    assert_eq!(ing.allowed_by.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), vec!["frontend-to-backend"]);
    // the world: no egress side to trace
    let world = LabelSet::parse_all(["reserved:world"]);
    let t = trace::trace(&rules, &trace::Party { labels: &world, is_endpoint: false, named_ports: &named }, &party(fe), Protocol::Tcp, 8080, PolicyOptions::default());
    assert!(t.egress.is_none());
    assert_eq!(t.verdict, trace::Verdict::Denied);
}

#[test]
fn ccnp_empty_peer_selector_means_every_pod_not_the_world() {
    let w = World::new(&[("default", "a"), ("prod", "b")]);
    let p = w.policy(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress: [{fromEndpoints: [{}]}]\n",
        "default/a",
    );
    assert!(allowed(&p, w.id("prod/b"), false, TCP, 80), "pods of every namespace");
    assert!(!allowed(&p, 2, false, TCP, 80), "not the world");
    assert!(!allowed(&p, 6, false, TCP, 80), "not remote nodes");
}

#[test]
fn knp_empty_egress_list_without_policy_types_leaves_egress_open() {
    let w = World::new(&[("default", "a")]);
    let p = w.policy(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  egress: []\n",
        "default/a",
    );
    assert!(p.ingress_enforced && !p.egress_enforced);
}

#[test]
fn constraints_not_enforceable_yet_are_refused() {
    for (field, snippet) in [
        ("spec.ingress[0].authentication.mode", "  ingress: [{fromEntities: [all], authentication: {mode: required}}]\n"),
        ("spec.egress[0].toPorts[0].serverNames", "  egress: [{toPorts: [{ports: [{port: \"443\"}], serverNames: [a.example]}]}]\n"),
    ] {
        let yaml = format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n{snippet}");
        let e = parse_policies(&yaml, "x").unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
}

#[test]
fn egress_named_ports_resolve_against_the_selected_peer() {
    let w = World::new(&[("default", "fe"), ("default", "db"), ("default", "other")]);
    let rules: Vec<Rule> = parse_policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: fe}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toPorts: [{ports: [{port: db, protocol: TCP}]}]\n",
        "x",
    )
    .unwrap()
    .into_iter()
    .flat_map(|(_, r)| r)
    .collect();
    let mut peer_ports = BTreeMap::new();
    let mut db = NamedPorts::new();
    db.entry("db".into()).or_default().insert((Protocol::Tcp, 5432));
    peer_ports.insert(w.id("default/db"), db);
    let mut other = NamedPorts::new();
    other.entry("db".into()).or_default().insert((Protocol::Tcp, 22));
    peer_ports.insert(w.id("default/other"), other);
    let labels = w.ids[&w.id("default/fe")].clone();
    let p = compute(&Input { rules: &rules, labels: &labels, identities: &w.ids, own_ports: &NamedPorts::new(), peer_ports: &peer_ports, options: PolicyOptions::default() });
    assert!(allowed(&p, w.id("default/db"), true, TCP, 5432));
    assert!(!allowed(&p, w.id("default/db"), true, TCP, 22), "another pod's port of the same name does not count");
}

#[test]
fn l7_rules_fail_closed_until_the_proxy_exists_unless_an_l4_rule_covers_them() {
    let w = World::new(&[("default", "a"), ("default", "b"), ("default", "c")]);
    let p = w.policy(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET, path: "/public/.*"}]}}]
  - fromEndpoints: [{matchLabels: {app: c}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
  - fromEndpoints: [{matchLabels: {app: c}}]
"#,
        "default/a",
    );
    let (k, v) = p.entries.lookup(w.id("default/b"), false, TCP, 80).unwrap();
    assert_eq!((k.identity, v.proxy_port), (w.id("default/b"), cilium_abi::POLICY_PROXY_PORT_PENDING));
    assert!(!allowed(&p, w.id("default/b"), false, TCP, 80), "L7-only access is dropped for now");
    assert!(allowed(&p, w.id("default/c"), false, TCP, 80), "c is allowed at L3, which wildcards its L7 rules");
}

#[test]
fn upstream_validation_rules() {
    let doc = |spec: &str| format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n{spec}");
    // a top-level description, as many of upstream's examples carry, is accepted
    let described = format!("description: \"an example\"\n{}", doc("  ingress: [{}]\n"));
    assert!(parse_policies(&described, "x").is_ok());
    for (spec, field, msg) in [
        ("  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: UDP}], rules: {http: [{method: GET}]}}]\n", "spec.ingress[0].toPorts[0].ports[0].protocol", "TCP only"),
        ("  egress:\n  - toEndpoints: [{}]\n    toCIDR: [10.0.0.0/8]\n", "spec.egress[0]", "combining toEndpoints and toCIDR"),
        ("", "spec", "at least one of"),
        ("  ingress:\n  - toPorts: [{ports: [{port: \"53\", protocol: UDP}], rules: {dns: [{matchName: a.example}]}}]\n", "spec.ingress[0].toPorts[0].rules.dns", "egress only"),
        ("  egress:\n  - toPorts: [{ports: [{port: \"0\", protocol: TCP}], rules: {http: [{}]}}]\n", "spec.egress[0].toPorts[0].ports[0].port", "need a port"),
        ("  egress:\n  - toPorts: [{ports: [{protocol: VRRP, port: \"80\"}]}]\n", "spec.egress[0].toPorts[0].ports[0].port", "empty or 0"),
    ] {
        let e = parse_policies(&doc(spec), "x").unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(msg), "{e}");
    }
}

#[test]
fn to_services_means_the_pods_or_the_endpoints_of_the_service() {
    let mut w = World::new(&[("default", "client"), ("default", "web"), ("other", "web"), ("default", "db")]);
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-services}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices:
    - k8sService: {serviceName: web}
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - toServices:
    - k8sServiceSelector: {selector: {matchLabels: {tier: external}}}
"#;
    let rules: Vec<Rule> = parse_policies(text, "t.yaml").unwrap().into_iter().flat_map(|(_, r)| r).collect();
    assert!(rule::references_services(&rules));
    // before the Services are known, nothing is selected
    let p = w.policy_for_rules(&rule::resolve_services(&rules, &BTreeMap::new()), "default/client");
    assert!(p.egress_enforced);
    assert!(!allowed(&p, w.id("default/web"), true, TCP, 8080));
    let mut services = BTreeMap::new();
    services.insert(
        ("default".to_string(), "web".to_string()),
        rule::ServiceInfo { selector: Some(BTreeMap::from([("app".to_string(), "web".to_string())])), ..Default::default() },
    );
    services.insert(
        ("default".to_string(), "api".to_string()),
        rule::ServiceInfo {
            labels: BTreeMap::from([("tier".to_string(), "external".to_string())]),
            selector: None,
            endpoints: vec!["192.0.2.10".parse().unwrap()],
        },
    );
    let resolved = rule::resolve_services(&rules, &services);
    // the selectorless service's endpoints become CIDR identities
    let cidrs = rule::referenced_cidrs(&resolved);
    assert_eq!(cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(), vec!["192.0.2.10/32"]);
    w.ids.insert(1 << 24, rule::cidr_identity_labels(cidrs.iter().next().unwrap()));
    let p = w.policy_for_rules(&resolved, "default/client");
    assert!(allowed(&p, w.id("default/web"), true, TCP, 8080), "the service's pods, on the rule's port");
    assert!(!allowed(&p, w.id("default/web"), true, TCP, 80));
    assert!(!allowed(&p, w.id("other/web"), true, TCP, 8080), "same labels in another namespace are not the service's pods");
    assert!(!allowed(&p, w.id("default/db"), true, TCP, 8080));
    assert!(allowed(&p, 1 << 24, true, TCP, 443), "endpoints of a selectorless service matched by labels");
}

#[test]
fn each_l7_kind_has_its_proxy_port() {
    use crate::api::{FqdnSelector, HttpRule, KafkaRule, L7Rules};
    let on = PolicyOptions { l7_proxy: true, ..Default::default() };
    let http = L7Rules { http: Some(vec![HttpRule::default()]), ..Default::default() };
    let kafka = L7Rules { kafka: Some(vec![KafkaRule::default()]), ..Default::default() };
    let dns = L7Rules { dns: Some(vec![FqdnSelector { match_name: Some("x".into()), match_pattern: None }]), ..Default::default() };
    let l7proto = L7Rules { l7proto: Some("r2d2".into()), ..Default::default() };
    let port = |r: &L7Rules, egress: bool, o: PolicyOptions| crate::compute::l7_proxy_port(Some(r), egress, o);
    assert_eq!((port(&http, false, on), port(&http, true, on)), (cilium_abi::PROXY_PORT_HTTP_INGRESS, cilium_abi::PROXY_PORT_HTTP_EGRESS));
    assert_eq!((port(&kafka, false, on), port(&kafka, true, on)), (cilium_abi::PROXY_PORT_KAFKA_INGRESS, cilium_abi::PROXY_PORT_KAFKA_EGRESS));
    assert_eq!(port(&dns, true, on), cilium_abi::PROXY_PORT_DNS);
    assert_eq!(port(&l7proto, false, on), cilium_abi::POLICY_PROXY_PORT_PENDING, "no proxy for l7proto: dropped");
    assert_eq!(port(&kafka, false, PolicyOptions::default()), cilium_abi::POLICY_PROXY_PORT_PENDING, "proxy off: dropped");
}

#[test]
fn cidr_groups_by_name_and_by_labels_with_except() {
    let mut w = World::new(&[("default", "a")]);
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toCIDRSet:
    - cidrGroupRef: vpn
      except: [10.48.0.128/25]
  - toCIDRSet:
    - cidrGroupSelector: {matchLabels: {role: partner}}
    toPorts: [{ports: [{port: "443"}]}]
"#;
    let groups = r#"
apiVersion: cilium.io/v2alpha1
kind: CiliumCIDRGroup
metadata: {name: vpn}
spec: {externalCIDRs: [10.48.0.0/24, 10.16.0.0/24]}
---
apiVersion: cilium.io/v2
kind: CiliumCIDRGroup
metadata: {name: partners, labels: {role: partner}}
spec: {externalCIDRs: [198.51.100.0/24]}
"#;
    let mut repo = Repository::new();
    repo.apply(parse_policies(policy, "p.yaml").unwrap());
    assert!(rule::referenced_cidrs(repo.rules()).is_empty(), "groups that do not exist yet select nothing");
    let p = w.policy_for_rules(repo.rules(), "default/a");
    assert!(p.egress_enforced);
    repo.apply(parse_policies(groups, "g.yaml").unwrap());
    let cidrs = rule::referenced_cidrs(repo.rules());
    assert_eq!(
        cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        vec!["10.16.0.0/24", "10.48.0.0/24", "10.48.0.128/25", "198.51.100.0/24"]
    );
    let mut by_net = BTreeMap::new();
    for (i, net) in cidrs.iter().enumerate() {
        let id = (1 << 24) + i as u32;
        w.ids.insert(id, rule::cidr_identity_labels(net));
        by_net.insert(net.to_string(), id);
    }
    let p = w.policy_for_rules(repo.rules(), "default/a");
    assert!(allowed(&p, by_net["10.48.0.0/24"], true, TCP, 22));
    assert!(allowed(&p, by_net["10.16.0.0/24"], true, UDP, 53));
    assert!(!allowed(&p, by_net["10.48.0.128/25"], true, TCP, 22), "except");
    assert!(allowed(&p, by_net["198.51.100.0/24"], true, TCP, 443), "selected by the group's labels");
    assert!(!allowed(&p, by_net["198.51.100.0/24"], true, TCP, 80), "only on the rule's port");
    assert!(!allowed(&p, 2, true, TCP, 443));
    // deleting the group takes its prefixes out of the policy
    assert!(repo.delete(&PolicyRef { kind: PolicyKind::CiliumCIDRGroup, namespace: None, name: "vpn".into() }));
    assert_eq!(rule::referenced_cidrs(repo.rules()).iter().map(|c| c.to_string()).collect::<Vec<_>>(), vec!["198.51.100.0/24"]);
    // a bad prefix in a group is refused, naming the field
    let e = parse_policies(&groups.replace("10.16.0.0/24", "10.16.0.0/33"), "g.yaml").unwrap_err();
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.externalCIDRs[1]", "10.16.0.0/33"), "{e}");
    let e = parse_policies(&groups.replace("cilium.io/v2alpha1", "cilium.io/v1"), "g.yaml").unwrap_err();
    assert_eq!(e.field, "apiVersion");
    let e = parse_policies(&policy.replace("cidrGroupRef: vpn", "cidrGroupRef: vpn\n      cidr: 10.0.0.0/8"), "p.yaml").unwrap_err();
    assert_eq!(e.field, "spec.egress[0].toCIDRSet[0]", "{e}");
}

#[test]
fn extended_ip_protocols_have_no_ports() {
    let w = World::new(&[("default", "a"), ("default", "b")]);
    let yaml = |port: &str, proto: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: b}}}}]\n    toPorts: [{{ports: [{{{port}protocol: {proto}}}]}}]\n")
    };
    for (port, proto, number) in [("", "VRRP", 112), ("port: \"0\", ", "igmp", 2), ("", "GRE", 47)] {
        let p = w.policy(&yaml(port, proto), "default/a");
        assert!(allowed(&p, w.id("default/b"), false, number, 0), "{proto}");
        assert!(!allowed(&p, w.id("default/b"), false, TCP, 80), "{proto} rules allow only {proto}");
        let rules: Vec<Rule> = parse_policies(&yaml(port, proto), "x").unwrap().into_iter().flat_map(|(_, r)| r).collect();
        assert_eq!(rule::extended_protocol_use(&rules).map(|(f, p)| (f, p.number())), Some(("spec.ingress[0].toPorts".to_string(), number)));
    }
    let e = parse_err(&yaml("port: \"112\", ", "VRRP"));
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.ingress[0].toPorts[0].ports[0].port", "112"), "{e}");
    let e = parse_err(&yaml("", "OSPF"));
    assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.ingress[0].toPorts[0].ports[0].protocol", "OSPF"), "{e}");
    // ANY means TCP, UDP and SCTP only
    let rules: Vec<Rule> = parse_policies(&yaml("port: \"80\", ", "ANY"), "x").unwrap().into_iter().flat_map(|(_, r)| r).collect();
    assert!(rule::extended_protocol_use(&rules).is_none());
}

#[test]
fn from_nodes_selects_other_nodes_by_their_labels_never_host_or_pods() {
    let mut w = World::new(&[("default", "a"), ("default", "zone-a-pod")]);
    let node = |labels: &[&str]| {
        let mut l: Vec<&str> = vec!["reserved:remote-node"];
        l.extend(labels);
        LabelSet::parse_all(l)
    };
    w.ids.insert(2 << 24, node(&["node:zone=a", "node:kubernetes.io/hostname=n2"]));
    w.ids.insert((2 << 24) + 1, node(&["node:zone=b", "node:kubernetes.io/hostname=n3"]));
    // a pod labelled like the node is still a pod
    w.ids.insert(300, LabelSet::parse_all(["k8s:zone=a", "k8s:io.kubernetes.pod.namespace=default"]));
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromNodes: [{matchLabels: {zone: a}}]
  egress:
  - toNodes: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [n3]}]}]
    toPorts: [{ports: [{port: "4240"}]}]
"#;
    let p = w.policy(yaml, "default/a");
    assert!(allowed(&p, 2 << 24, false, TCP, 22));
    assert!(!allowed(&p, (2 << 24) + 1, false, TCP, 22), "another zone");
    assert!(!allowed(&p, 6, false, TCP, 22), "a node without labels (remote-node alone)");
    assert!(!allowed(&p, 1, false, TCP, 22), "this node (host) is no other node");
    assert!(!allowed(&p, 300, false, TCP, 22), "pods are never nodes");
    assert!(allowed(&p, (2 << 24) + 1, true, TCP, 4240));
    assert!(!allowed(&p, 2 << 24, true, TCP, 4240));
    // the remote-node entity still covers every node
    let e = w.policy(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: q}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress: [{fromEntities: [remote-node]}]\n",
        "default/a",
    );
    assert!(allowed(&e, 2 << 24, false, TCP, 1) && allowed(&e, (2 << 24) + 1, false, TCP, 1) && allowed(&e, 6, false, TCP, 1));
    let docs = parse_policies(yaml, "x").unwrap();
    assert_eq!(rule::node_selector_use(&docs[0].0).as_deref(), Some("spec.ingress[0].fromNodes"));
    let e = parse_err(&yaml.replace("fromNodes: [{matchLabels: {zone: a}}]", "fromNodes: [{matchLabels: {zone: a}}]\n    fromEntities: [world]"));
    assert_eq!(e.field, "spec.ingress[0]", "{e}");
}

#[test]
fn host_policies_select_only_the_host_endpoint() {
    let mut w = World::new(&[("default", "a")]);
    let host = LabelSet::parse_all(["reserved:host", "k8s:role=worker"]);
    w.ids.insert(7777, host.clone());
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-fw}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  ingress:
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: "22"}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: every-pod}
spec:
  endpointSelector: {}
  egress: [{toEntities: [world]}]
"#;
    let rules: Vec<Rule> = parse_policies(yaml, "x").unwrap().into_iter().flat_map(|(_, r)| r).collect();
    let compute_for = |labels: &LabelSet| {
        compute(&Input {
            rules: &rules,
            labels,
            identities: &w.ids,
            own_ports: &NamedPorts::new(),
            peer_ports: &BTreeMap::new(),
            options: PolicyOptions { allow_localhost: false, ..Default::default() },
        })
    };
    let h = compute_for(&host);
    assert!(h.ingress_enforced && !h.egress_enforced, "the host rule, not the endpointSelector: {{}} one");
    assert!(allowed(&h, w.id("default/a"), false, TCP, 22));
    assert!(!allowed(&h, w.id("default/a"), false, TCP, 80));
    assert!(!allowed(&h, 2, false, TCP, 22), "the world is not the cluster");
    let other_node = compute_for(&LabelSet::parse_all(["reserved:host", "k8s:role=db"]));
    assert!(!other_node.ingress_enforced && !other_node.egress_enforced, "a node the selector does not match");
    let pod = w.policy_for_rules(&rules, "default/a");
    assert!(!pod.ingress_enforced && pod.egress_enforced, "nodeSelector never selects pods");
    for (snippet, field) in [
        ("  ingress: [{toPorts: [{ports: [{port: \"80\"}], rules: {http: [{method: GET}]}}]}]\n", "spec.ingress[0].toPorts[0].rules"),
        ("  egress: [{toFQDNs: [{matchName: a.example}]}]\n", "spec.egress[0].toFQDNs"),
    ] {
        let e = parse_err(&format!("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: h}}\nspec:\n  nodeSelector: {{}}\n{snippet}"));
        assert_eq!(e.field, field, "{e}");
    }
    let e = parse_err("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: h}\nspec:\n  nodeSelector: {}\n  ingress: [{}]\n");
    assert_eq!(e.field, "spec.nodeSelector", "{e}");
}
