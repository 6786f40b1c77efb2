//! Scale: a rule selecting ~64k identities, and 10k CIDRs, computed, written
//! to the real maps and enforced (BPF_PROG_RUN). Timings are printed, never
//! asserted (benchmarks measure speed).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use cilium_abi::{EndpointFlag, EndpointInfo, IpcacheValue, PolicyEntry};
use cilium_agent::daemon::datapath_key;
use cilium_datapath::{Datapath, LoadOptions, Loaded, Program, ip_to_be};
use cilium_labels::{Label, LabelSet};
use cilium_policy::{Input, NamedPorts, PolicyOptions, compute, parse_policies};
use cilium_privileged_tests::packet::{self, TCP_SYN};
use cilium_privileged_tests::require_root;

const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);

fn load() -> Loaded {
    require_root();
    Loaded::load(LoadOptions { pin_dir: None, ct_max: 4096, policy_max: 1 << 20, ipcache_max: 1 << 16, endpoints_max: 64, events_bytes: 1 << 16, maglev_size: 251, ..Default::default() }).unwrap()
}

fn write(dp: &mut Loaded, ep: u16, policy: &cilium_policy::EndpointPolicy) {
    for (k, v) in policy.entries.iter() {
        let entry = PolicyEntry { proxy_port: 0, flags: v.deny as u8, match_type: k.match_type().code(), pad: 0 };
        dp.policy_insert(&datapath_key(ep, false, k), &entry).unwrap();
    }
}

fn endpoint(dp: &mut Loaded, flags: u16) {
    dp.endpoint_upsert(&EndpointInfo { ifindex: 1, ipv4: ip_to_be(POD), sec_identity: 300, ep_id: 7, flags, ..Default::default() }).unwrap();
}

#[test]
fn one_rule_selecting_64k_identities_fits_and_enforces() {
    let mut ids = BTreeMap::new();
    ids.insert(2u32, LabelSet::parse_all(["reserved:world", "reserved:world-ipv4"]));
    for id in 256..=65535u32 {
        let mut l = LabelSet::parse_all(["k8s:io.kubernetes.pod.namespace=default", "k8s:tier=web"]);
        l.insert(Label::k8s("app", &format!("app{id}")));
        ids.insert(id, l);
    }
    let me = LabelSet::parse_all(["k8s:io.kubernetes.pod.namespace=default", "k8s:app=db"]);
    let rules: Vec<_> = parse_policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {tier: web}}], toPorts: [{ports: [{port: \"5432\"}]}]}]\n",
        "x",
    )
    .unwrap()
    .into_iter()
    .flat_map(|(_, r)| r)
    .collect();
    let t = Instant::now();
    let p = compute(&Input { rules: &rules, labels: &me, identities: &ids, own_ports: &NamedPorts::new(), peer_ports: &BTreeMap::new(), options: PolicyOptions::default() });
    let computed = t.elapsed();
    // a port without a protocol means TCP, UDP and SCTP: three entries per identity
    assert_eq!(p.entries.len(), 65280 * 3 + 1, "per selected identity, plus localhost");
    let mut dp = load();
    let t = Instant::now();
    write(&mut dp, 7, &p);
    eprintln!("64k identities: computed in {computed:?}, written in {:?}", t.elapsed());
    endpoint(&mut dp, EndpointFlag::IngressEnforce as u16);
    let peer = Ipv4Addr::new(10, 0, 2, 2);
    dp.ipcache_upsert(ipnet::Ipv4Net::new(peer, 32).unwrap().into(), &IpcacheValue { sec_identity: 65000, ..Default::default() }).unwrap();
    let ok = dp.test_run(Program::ToContainer, &packet::tcp(peer, 1000, POD, 5432, TCP_SYN), 1).unwrap().0;
    assert_eq!(ok, 0, "identity 65000 is allowed");
    let world = dp.test_run(Program::ToContainer, &packet::tcp(Ipv4Addr::new(192, 0, 2, 9), 1000, POD, 5432, TCP_SYN), 1).unwrap().0;
    assert_eq!(world, 2, "the world is not in the tier");
    let port = dp.test_run(Program::ToContainer, &packet::tcp(peer, 1001, POD, 5433, TCP_SYN), 1).unwrap().0;
    assert_eq!(port, 2, "other port");
}

#[test]
fn ten_thousand_cidrs_compute_load_and_enforce() {
    let cidrs: Vec<String> = (0..10_000u32).map(|i| format!("198.18.{}.{}/32", i / 250, i % 250 + 1)).collect();
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: many}}\nspec:\n  endpointSelector: {{matchLabels: {{app: db}}}}\n  egress:\n  - toCIDR: [{}]\n",
        cidrs.join(", ")
    );
    let t = Instant::now();
    let rules: Vec<_> = parse_policies(&yaml, "x").unwrap().into_iter().flat_map(|(_, r)| r).collect();
    let parsed = t.elapsed();
    let mut ids = BTreeMap::new();
    let mut prefixes = Vec::new();
    for (i, net) in cilium_policy::rule::referenced_cidrs(&rules).into_iter().enumerate() {
        let id = (1 << 24) + i as u32;
        ids.insert(id, cilium_policy::rule::cidr_identity_labels(&net));
        if let ipnet::IpNet::V4(v4) = net {
            prefixes.push((v4, id));
        }
    }
    assert_eq!(prefixes.len(), 10_000);
    let me = LabelSet::parse_all(["k8s:io.kubernetes.pod.namespace=default", "k8s:app=db"]);
    let t = Instant::now();
    let p = compute(&Input { rules: &rules, labels: &me, identities: &ids, own_ports: &NamedPorts::new(), peer_ports: &BTreeMap::new(), options: PolicyOptions::default() });
    let computed = t.elapsed();
    assert_eq!(p.entries.iter().filter(|(k, _)| k.egress).count(), 10_000);
    let mut dp = load();
    let t = Instant::now();
    for (net, id) in &prefixes {
        dp.ipcache_upsert((*net).into(), &IpcacheValue { sec_identity: *id, ..Default::default() }).unwrap();
    }
    write(&mut dp, 7, &p);
    eprintln!("10k CIDRs: parsed in {parsed:?}, computed in {computed:?}, loaded (ipcache + policy) in {:?}", t.elapsed());
    endpoint(&mut dp, EndpointFlag::EgressEnforce as u16);
    let ok = dp.test_run(Program::FromContainer, &packet::tcp(POD, 1000, Ipv4Addr::new(198, 18, 39, 250), 443, TCP_SYN), 1).unwrap().0;
    assert_eq!(ok, 0, "the last listed address is allowed");
    let no = dp.test_run(Program::FromContainer, &packet::tcp(POD, 1001, Ipv4Addr::new(198, 18, 40, 1), 443, TCP_SYN), 1).unwrap().0;
    assert_eq!(no, 2, "an address just past the list is not");
}
