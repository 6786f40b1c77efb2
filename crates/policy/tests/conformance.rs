//! The conformance suite against the pure engine: every case of
//! tests/conformance, every step, the full 9×9 matrix on TCP, UDP and SCTP
//! ports 80 and 81. The lab runs the same cases with real traffic.

use std::collections::BTreeMap;
use std::path::Path;

use cilium_labels::{LabelSet, k8s_pod_labels};
use cilium_policy::conformance::{self, NAMESPACES, PODS, PORTS};
use cilium_policy::{Input, NamedPorts, PolicyOptions, PolicyRef, Protocol, Repository, compute, parse_policies};

fn cluster() -> (BTreeMap<u32, LabelSet>, BTreeMap<String, u32>) {
    let mut ids = BTreeMap::new();
    ids.insert(1, LabelSet::parse_all(["reserved:host"]));
    ids.insert(2, LabelSet::parse_all(["reserved:world", "reserved:world-ipv4"]));
    let mut by_pod = BTreeMap::new();
    let mut next = 256;
    for n in NAMESPACES {
        for p in PODS {
            let pl = BTreeMap::from([("pod".to_string(), p.to_string())]);
            let nl = BTreeMap::from([("ns".to_string(), n.to_string())]);
            ids.insert(next, k8s_pod_labels(n, &pl, &nl, "default", "default"));
            by_pod.insert(format!("{n}/{p}"), next);
            next += 1;
        }
    }
    (ids, by_pod)
}

fn named_ports() -> NamedPorts {
    let mut np = NamedPorts::new();
    for (name, proto, port) in [("serve-80-tcp", Protocol::Tcp, 80), ("serve-81-tcp", Protocol::Tcp, 81), ("serve-80-udp", Protocol::Udp, 80), ("serve-81-udp", Protocol::Udp, 81)] {
        np.entry(name.to_string()).or_default().insert((proto, port));
    }
    np
}

fn allowed(p: &cilium_policy::EndpointPolicy, peer: u32, egress: bool, proto: Protocol, port: u16) -> bool {
    let enforced = if egress { p.egress_enforced } else { p.ingress_enforced };
    !enforced || matches!(p.entries.lookup(peer, egress, proto.number(), port), Some((_, v)) if !v.deny)
}


#[test]
fn conformance_suite_on_the_engine() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance");
    let cases = conformance::load_cases(&dir).unwrap();
    assert!(cases.len() >= 20, "the suite is there");
    let (ids, by_pod) = cluster();
    let np = named_ports();
    let peer_ports: BTreeMap<u32, NamedPorts> = by_pod.values().map(|id| (*id, np.clone())).collect();
    let mut failures = Vec::new();
    for case in &cases {
        let mut repo = Repository::new();
        for (i, step) in case.steps.iter().enumerate() {
            if let Some(text) = &step.apply {
                repo.apply(parse_policies(text, &case.name).unwrap_or_else(|e| panic!("{}: {e}", case.name)));
            }
            for d in &step.delete {
                let parts: Vec<&str> = d.split('/').collect();
                let key = match parts.as_slice() {
                    [k, ns, n] => (k.to_string(), Some(ns.to_string()), n.to_string()),
                    [k, n] => (k.to_string(), None, n.to_string()),
                    _ => panic!("{}: bad delete {d}", case.name),
                };
                let r = repo.documents().map(|d| d.key()).find(|r: &PolicyRef| r.kind.as_str() == key.0 && r.namespace == key.1 && r.name == key.2);
                assert!(repo.delete(&r.unwrap_or_else(|| panic!("{}: no policy {d}", case.name))));
            }
            let want = conformance::expected(step).unwrap();
            let policies: BTreeMap<&String, _> = by_pod
                .iter()
                .map(|(pod, id)| {
                    let p = compute(&Input { rules: repo.rules(), labels: &ids[id], identities: &ids, own_ports: &np, peer_ports: &peer_ports, options: PolicyOptions::default() });
                    (pod, p)
                })
                .collect();
            for port in PORTS {
                let got = |f: &str, t: &str| {
                    f == t || (allowed(&policies[&f.to_string()], by_pod[t], true, port.0, port.1) && allowed(&policies[&t.to_string()], by_pod[f], false, port.0, port.1))
                };
                let w = |f: &str, t: &str| want[&(f.to_string(), t.to_string(), port)];
                let wrong = conformance::pods().iter().any(|f| conformance::pods().iter().any(|t| got(f, t) != w(f, t)));
                if wrong {
                    failures.push(format!("case {} step {}:\n{}", case.name, i + 1, conformance::render(port, &got, &w)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
