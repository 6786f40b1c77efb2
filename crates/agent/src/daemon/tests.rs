use std::collections::BTreeMap;

use cilium_abi::{EndpointFlag, POLICY_KEY_GEN};
use cilium_datapath::fake::FakeDatapath;

use super::*;

fn config() -> DaemonConfig {
    DaemonConfig {
        node_name: "n1".into(),
        pod_cidr: "10.0.1.0/24".parse().unwrap(),
        pod_cidr6: None,
        mtu: 1500,
        routing_mode: cilium_api::RoutingMode::Native,
        policy: PolicyOptions::default(),
        audit_mode: false,
        extended_ip_protocols: false,
        node_selector_labels: false,
        host_firewall: false,
        lb_algorithm: cilium_lb::Algorithm::Random,
        maglev_size: 251,
        fqdn_min_ttl: 0,
        fqdn_max_ips: 50,
    }
}

fn daemon(store: Option<StateStore>) -> Daemon<FakeDatapath> {
    let mut dp = FakeDatapath::default();
    for i in 0..10u32 {
        dp.links.insert(format!("lxc{i}"), 100 + i);
    }
    let mut d = Daemon::new(config(), dp, store, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.reconcile_datapath().unwrap();
    d
}

fn pod(d: &mut Daemon<FakeDatapath>, name: &str, app: &str) {
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), app.to_string());
    d.pod_upsert(PodMeta { namespace: "default".into(), name: name.into(), labels, service_account: "default".into(), ports: vec![], workload: None, ip: None, ip6: None, node: None }).unwrap();
}

fn create(d: &mut Daemon<FakeDatapath>, name: &str, n: u32) -> u16 {
    let owner = format!("c-{name}/eth0");
    let (ip, ip6) = d.ipam_allocate(&owner).unwrap();
    d.endpoint_create(&EndpointCreate {
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        netns: format!("/var/run/netns/{name}"),
        host_ifname: format!("lxc{n}"),
        ipv4: ip,
        ipv6: ip6,
        mac: "02:00:00:00:00:01".into(),
        namespace: "default".into(),
        pod_name: name.into(),
    })
    .unwrap()
}

const SEED_001: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-to-backend}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: backend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

#[test]
fn endpoint_creation_wires_the_datapath() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    let id = create(&mut d, "fe", 1);
    let v = d.endpoint_view(id).unwrap();
    assert!(v.identity >= 256);
    assert!(v.labels.contains(&"k8s:app=frontend".to_string()));
    let dp = d.datapath();
    assert!(dp.attached.contains("lxc1"));
    assert!(dp.up.contains("lxc1"));
    assert_eq!(dp.routes.get(&IpNet::from(IpAddr::V4(v.ipv4))).map(String::as_str), Some("lxc1"));
    let info = dp.endpoints[&101];
    assert_eq!(info.sec_identity, v.identity);
    assert_eq!(info.flags & (EndpointFlag::IngressEnforce as u16 | EndpointFlag::EgressEnforce as u16), 0);
    assert_eq!(dp.ipcache[&IpNet::from(IpAddr::V4(v.ipv4))].sec_identity, v.identity);
    assert_eq!(dp.ipcache[&"172.30.0.11/32".parse().unwrap()].sec_identity, 1, "node addresses are the host");
}

#[test]
fn policy_import_switches_generation_atomically() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    pod(&mut d, "be", "backend");
    let fe = create(&mut d, "fe", 1);
    let be = create(&mut d, "be", 2);
    let before = d.datapath().endpoints[&101].flags;
    d.policy_import(SEED_001, "p.yaml", false).unwrap();
    let dp = d.datapath();
    let after = dp.endpoints[&101].flags;
    assert_ne!(after & EndpointFlag::IngressEnforce as u16, 0);
    assert_eq!(after & EndpointFlag::EgressEnforce as u16, 0);
    assert_ne!(before & EndpointFlag::PolicyGen as u16, after & EndpointFlag::PolicyGen as u16, "generation flipped");
    let live_gen = after & EndpointFlag::PolicyGen as u16 != 0;
    let fe_keys: Vec<_> = dp.policy.keys().map(|k| k.key()).filter(|k| k.ep_id == fe).collect();
    assert!(!fe_keys.is_empty());
    assert!(fe_keys.iter().all(|k| (k.gen_dir & POLICY_KEY_GEN != 0) == live_gen), "old generation removed");
    let be_identity = d.endpoint_view(be).unwrap().identity;
    assert!(fe_keys.iter().any(|k| k.identity == be_identity && k.dport == 8080u16.to_be() && k.protocol == 6));
    assert!(fe_keys.iter().any(|k| k.identity == 1), "localhost allowed");
    assert!(!dp.policy.keys().any(|k| k.key().ep_id == be), "backend is not selected");
    let v = d.endpoint_view(fe).unwrap();
    assert!(v.ingress_enforced && !v.egress_enforced);
    assert_eq!(v.selected_by, vec!["CiliumNetworkPolicy/default/frontend-to-backend"]);
}

#[test]
fn invalid_policy_changes_nothing() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    create(&mut d, "fe", 1);
    d.policy_import(SEED_001, "p.yaml", false).unwrap();
    let rev = d.repository().revision();
    let before = d.datapath().policy.clone();
    let flags = d.datapath().endpoints[&101].flags;
    let bad = format!("{SEED_001}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: b}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toPorts: [{{ports: [{{port: \"99999\"}}]}}]\n");
    let e = d.policy_import(&bad, "bad.yaml", false).unwrap_err();
    let DaemonError::Policy(pe) = e else { panic!("{e}") };
    assert_eq!(pe.field, "spec.egress[0].toPorts[0].ports[0].port");
    assert_eq!(pe.value, "99999");
    assert_eq!(d.repository().revision(), rev);
    assert_eq!(d.datapath().policy, before);
    assert_eq!(d.datapath().endpoints[&101].flags, flags);
    assert_eq!(d.repository().len(), 1);
}

#[test]
fn pod_labels_are_kubernetes_labels() {
    let mut d = daemon(None);
    for (k, v) in [("app", "x;node:zone=a"), ("app", "a b"), ("-bad", "x")] {
        let labels = [(k.to_string(), v.to_string())].into();
        let e = d.pod_upsert(PodMeta { namespace: "default".into(), name: "p".into(), labels, service_account: "default".into(), ports: vec![], workload: None, ip: None, ip6: None, node: None }).unwrap_err();
        assert!(e.to_string().contains(&format!("labels.{k}")), "{e}");
    }
    let e = d.pod_upsert(PodMeta { namespace: "default".into(), name: "p".into(), labels: BTreeMap::new(), service_account: "a;b".into(), ports: vec![], workload: None, ip: None, ip6: None, node: None }).unwrap_err();
    assert!(e.to_string().contains("service_account"), "{e}");
    let e = d.namespace_upsert(NamespaceMeta { name: "ns".into(), labels: [("team".to_string(), "x;y".to_string())].into() }).unwrap_err();
    assert!(e.to_string().contains("labels.team"), "{e}");
    pod(&mut d, "ok", "web");
}

#[test]
fn extended_protocols_need_the_flag() {
    let vrrp = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: v}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{protocol: VRRP}]}]\n";
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    create(&mut d, "fe", 1);
    let e = d.policy_import(vrrp, "v.yaml", false).unwrap_err();
    let DaemonError::Policy(pe) = e else { panic!("{e}") };
    assert_eq!((pe.field.as_str(), pe.value.as_str()), ("spec.ingress[0].toPorts", "VRRP"), "{pe}");
    assert!(pe.message.contains("--enable-extended-ip-protocols"));
    assert!(d.repository().is_empty());
    assert_eq!(d.datapath().endpoints[&101].flags & EndpointFlag::ExtendedProtocols as u16, 0);

    let mut cfg = config();
    cfg.extended_ip_protocols = true;
    let mut dp = FakeDatapath::default();
    dp.links.insert("lxc1".into(), 101);
    let mut d = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.reconcile_datapath().unwrap();
    pod(&mut d, "fe", "frontend");
    create(&mut d, "fe", 1);
    d.policy_import(vrrp, "v.yaml", false).unwrap();
    let ep = &d.datapath().endpoints[&101];
    assert_ne!(ep.flags & EndpointFlag::ExtendedProtocols as u16, 0);
    assert!(d.datapath().policy.keys().any(|k| k.4 == 112 && k.5 == 0), "a VRRP entry");
}

#[test]
fn overflowing_policy_fails_closed() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    let fe = create(&mut d, "fe", 1);
    d.datapath_mut().policy_max = Some(2);
    let many = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: many}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toPorts: [{ports: [{port: "1"}, {port: "2"}, {port: "3"}, {port: "4"}]}]
"#;
    d.policy_import(many, "many.yaml", false).unwrap();
    let v = d.endpoint_view(fe).unwrap();
    assert_eq!(v.state, "policy-error");
    assert!(v.ingress_enforced && v.egress_enforced, "deny all, both ways");
    let flags = d.datapath().endpoints[&101].flags;
    assert_ne!(flags & EndpointFlag::IngressEnforce as u16, 0);
    assert_ne!(flags & EndpointFlag::EgressEnforce as u16, 0);
    let generation = flags & EndpointFlag::PolicyGen as u16 != 0;
    assert!(!d.datapath().policy.keys().any(|k| k.key().ep_id == fe && (k.key().gen_dir & POLICY_KEY_GEN != 0) == generation), "live generation is empty");
    assert!(!d.warnings().is_empty());
    // once it fits again, the endpoint recovers
    d.datapath_mut().policy_max = None;
    d.regenerate_all();
    assert_eq!(d.endpoint_view(fe).unwrap().state, "ready");
    assert!(d.warnings().is_empty());
}

#[test]
fn delete_is_idempotent_and_releases() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    let id = create(&mut d, "fe", 1);
    let v = d.endpoint_view(id).unwrap();
    assert_eq!(d.endpoint_delete("c-fe", "eth0").unwrap(), Some(id));
    assert_eq!(d.endpoint_delete("c-fe", "eth0").unwrap(), None);
    assert!(d.ipam().owner(v.ipv4).is_none());
    assert!(d.identities().get(v.identity).is_none());
    let dp = d.datapath();
    assert!(dp.endpoints.is_empty());
    assert!(dp.ct_flushed.contains(&IpAddr::V4(v.ipv4)), "its connections are forgotten");
    assert!(!dp.routes.contains_key(&IpNet::from(IpAddr::V4(v.ipv4))));
    assert!(!dp.ipcache.contains_key(&IpNet::from(IpAddr::V4(v.ipv4))));
}

#[test]
fn restart_restores_state_and_datapath() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path());
    let mut d = daemon(Some(store.clone()));
    pod(&mut d, "fe", "frontend");
    pod(&mut d, "be", "backend");
    let fe = create(&mut d, "fe", 1);
    create(&mut d, "be", 2);
    d.policy_import(SEED_001, "p.yaml", false).unwrap();
    let view = d.endpoint_view(fe).unwrap();
    let dp_before = d.datapath().clone();
    let pending = d.ipam_allocate("c-pending/eth0").unwrap();

    // a new agent process over the same kernel state
    let mut d2 = Daemon::new(config(), dp_before.clone(), Some(store.clone()), vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d2.restore(store.load().unwrap().unwrap()).unwrap();
    let view2 = d2.endpoint_view(fe).unwrap();
    assert_eq!(view.identity, view2.identity);
    assert_eq!(view.ipv4, view2.ipv4);
    assert!(view2.ingress_enforced);
    assert_eq!(d2.repository().len(), 1);
    // no double allocation after restart
    let next = d2.ipam_allocate("c-new/eth0").unwrap().0;
    assert_ne!(next, pending.0);
    assert_ne!(next, view.ipv4);
    assert_eq!(d2.ipam_allocate("c-pending/eth0").unwrap(), pending);
    // enforcement unchanged: same entries for the live generation
    let live = |dp: &FakeDatapath| {
        let generation = dp.endpoints[&101].flags & EndpointFlag::PolicyGen as u16 != 0;
        let mut v: Vec<_> = dp
            .policy
            .iter()
            .map(|(k, e)| (k.key(), *e))
            .filter(|(k, _)| k.ep_id == fe && (k.gen_dir & POLICY_KEY_GEN != 0) == generation)
            .map(|(mut k, e)| {
                k.gen_dir &= !POLICY_KEY_GEN;
                (cilium_datapath::fake::PolicyKeyOrd::from(&k), e)
            })
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    };
    assert_eq!(live(&dp_before), live(d2.datapath()));
    assert_eq!(d2.datapath().endpoints[&101].flags & 3, dp_before.endpoints[&101].flags & 3);
}

#[test]
fn endpoint_with_vanished_interface_is_dropped_on_restore() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path());
    let mut d = daemon(Some(store.clone()));
    pod(&mut d, "fe", "frontend");
    let id = create(&mut d, "fe", 1);
    let ip = d.endpoint_view(id).unwrap().ipv4;
    let mut dp = d.datapath().clone();
    dp.links.remove("lxc1");
    let mut d2 = Daemon::new(config(), dp, Some(store.clone()), vec![]).unwrap();
    d2.restore(store.load().unwrap().unwrap()).unwrap();
    assert!(d2.endpoint_view(id).is_none());
    assert!(d2.ipam().owner(ip).is_none());
    assert!(d2.datapath().endpoints.is_empty());
}

#[test]
fn relabel_moves_identity() {
    let mut d = daemon(None);
    pod(&mut d, "x", "frontend");
    let id = create(&mut d, "x", 1);
    let old = d.endpoint_view(id).unwrap().identity;
    pod(&mut d, "x", "other");
    let v = d.endpoint_view(id).unwrap();
    assert_ne!(v.identity, old);
    assert_eq!(d.datapath().endpoints[&101].sec_identity, v.identity);
    assert_eq!(d.datapath().ipcache[&IpNet::from(IpAddr::V4(v.ipv4))].sec_identity, v.identity);
    assert!(d.identities().get(old).is_none());
}

#[test]
fn cidr_mismatch_on_restore_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path());
    let d = daemon(Some(store.clone()));
    d.save().unwrap();
    let mut cfg = config();
    cfg.pod_cidr = "10.0.9.0/24".parse().unwrap();
    let mut d2 = Daemon::new(cfg, FakeDatapath::default(), Some(store.clone()), vec![]).unwrap();
    let e = d2.restore(store.load().unwrap().unwrap()).unwrap_err();
    assert!(e.to_string().contains("10.0.1.0/24"), "{e}");
}

#[test]
fn relabelling_one_pod_touches_only_its_entries() {
    let mut d = daemon(None);
    for i in 0..8u32 {
        pod(&mut d, &format!("p{i}"), &format!("app{i}"));
        create(&mut d, &format!("p{i}"), i);
    }
    // every pod accepts every other pod by label `tier: web`, so each endpoint
    // holds one entry per web identity
    for i in 0..8u32 {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), format!("app{i}"));
        labels.insert("tier".to_string(), "web".to_string());
        d.pod_upsert(PodMeta { namespace: "default".into(), name: format!("p{i}"), labels, service_account: "default".into(), ports: vec![], workload: None, ip: None, ip6: None, node: None }).unwrap();
    }
    d.policy_import(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {tier: web}}]}]\n",
        "p.yaml",
        false,
    )
    .unwrap();
    let before = d.datapath().policy.len();
    d.datapath_mut().policy_log.clear();
    // one pod leaves the web tier
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), "app3".to_string());
    d.pod_upsert(PodMeta { namespace: "default".into(), name: "p3".into(), labels, service_account: "default".into(), ports: vec![], workload: None, ip: None, ip6: None, node: None }).unwrap();
    let writes = d.datapath().policy_log.len();
    // each of the 8 endpoints (p3 included: the policy selects every pod)
    // drops the entry of p3's old identity: 8 writes, not a rewrite of all
    // 8 × 9 entries
    assert_eq!(writes, 8, "{writes} writes for one relabel");
    assert_eq!(d.datapath().policy.len(), before - 8);
    assert!(d.datapath().policy_log.iter().all(|(inserted, _)| !inserted));
}

#[test]
fn cidr_rules_never_relabel_the_node_or_pods() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    let id = create(&mut d, "fe", 1);
    let v = d.endpoint_view(id).unwrap();
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: c}}\nspec:\n  endpointSelector: {{}}\n  egress: [{{toCIDR: [172.30.0.11/32, {}/32, 10.0.0.0/8]}}]\n",
        v.ipv4
    );
    d.policy_import(&yaml, "c.yaml", false).unwrap();
    let ipc = |d: &Daemon<FakeDatapath>, p: &str| d.datapath().ipcache.get(&p.parse().unwrap()).map(|v| v.sec_identity);
    assert_eq!(ipc(&d, "172.30.0.11/32"), Some(1), "the node stays the host");
    assert_eq!(ipc(&d, &format!("{}/32", v.ipv4)), Some(v.identity), "the pod keeps its identity");
    assert!(ipc(&d, "10.0.0.0/8").unwrap() >= 1 << 24);
    d.policy_delete(|_| true).unwrap();
    assert_eq!(ipc(&d, "172.30.0.11/32"), Some(1), "deleting the policy keeps the node's entry");
    assert_eq!(ipc(&d, &format!("{}/32", v.ipv4)), Some(v.identity));
    assert_eq!(ipc(&d, "10.0.0.0/8"), None);
}

#[test]
fn restart_keeps_cidr_identity_numbers_and_bumps_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path());
    let mut d = daemon(Some(store.clone()));
    // import order differs from sorted order on purpose
    d.policy_import("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: c}\nspec:\n  endpointSelector: {}\n  egress: [{toCIDR: [192.168.0.0/16]}]\n", "a.yaml", false).unwrap();
    d.policy_import("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: d}\nspec:\n  endpointSelector: {}\n  egress: [{toCIDR: [10.0.0.0/8]}]\n", "b.yaml", false).unwrap();
    let before = d.datapath().ipcache.clone();
    let rev = d.datapath().policy_rev;
    let mut d2 = Daemon::new(config(), d.datapath().clone(), Some(store.clone()), vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d2.restore(store.load().unwrap().unwrap()).unwrap();
    assert_eq!(d2.datapath().ipcache, before, "same prefixes, same identities");
    assert!(d2.datapath().policy_rev > rev, "established connections re-check after a restart");
}

// ---------------------------------------------------------------- services ---

fn k8s_svc(name: &str, cluster_ip: &str, backends: &[(&str, bool)]) -> cilium_api::K8sService {
    cilium_api::K8sService {
        namespace: "default".into(),
        name: name.into(),
        service_type: "ClusterIP".into(),
        cluster_ip: Some(cluster_ip.into()),
        ports: vec![
            cilium_api::K8sServicePort { name: Some("http".into()), protocol: "TCP".into(), port: 80, node_port: None },
            cilium_api::K8sServicePort { name: Some("dns".into()), protocol: "UDP".into(), port: 53, node_port: None },
        ],
        endpoints: backends
            .iter()
            .map(|(ip, terminating)| cilium_api::K8sEndpoint {
                ip: ip.to_string(),
                node_name: Some("n1".into()),
                terminating: *terminating,
                ports: vec![
                    cilium_api::K8sEndpointPort { name: Some("http".into()), protocol: "TCP".into(), port: 8080 },
                    cilium_api::K8sEndpointPort { name: Some("dns".into()), protocol: "UDP".into(), port: 5353 },
                ],
            })
            .collect(),
        ..Default::default()
    }
}

fn be(ip: &str) -> u32 {
    cilium_datapath::ip_to_be(ip.parse().unwrap())
}

/// (slot 0 count, backend IDs of slots 1..) of a frontend in the fake maps.
fn frontend(dp: &FakeDatapath, ip: &str, port: u16, proto: u8) -> Option<(u16, Vec<u32>)> {
    let master = dp.lb_services.get(&(be(ip), port.to_be(), 0, proto))?;
    let slots = (1..=master.count).map(|s| dp.lb_services[&(be(ip), port.to_be(), s, proto)].backend_id).collect();
    Some((master.count, slots))
}

#[test]
fn a_k8s_service_becomes_one_service_per_port() {
    let mut d = daemon(None);
    let ids = d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", false)])).unwrap();
    assert_eq!(ids.len(), 2);
    let dp = d.datapath();
    let (count, slots) = frontend(dp, "10.96.0.10", 80, 6).unwrap();
    assert_eq!(count, 2);
    for id in &slots {
        let b = dp.lb_backends[id];
        assert_eq!((u16::from_be(b.port), b.proto), (8080, 6));
    }
    let (count, slots) = frontend(dp, "10.96.0.10", 53, 17).unwrap();
    assert_eq!(count, 2);
    assert!(slots.iter().all(|id| u16::from_be(dp.lb_backends[id].port) == 5353));
    assert_eq!(dp.lb_backends.len(), 4, "a backend address is one backend per protocol");
    let list = d.service_list();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|s| s.name.starts_with("default/web:")));
}

#[test]
fn terminating_backends_keep_their_entry_but_get_no_slot() {
    let mut d = daemon(None);
    d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", false)])).unwrap();
    d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", true)])).unwrap();
    let dp = d.datapath();
    let (count, slots) = frontend(dp, "10.96.0.10", 80, 6).unwrap();
    assert_eq!(count, 1);
    assert_eq!(dp.lb_backends[&slots[0]].address, be("10.0.1.2"));
    let term = dp.lb_backends.values().find(|b| b.address == be("10.0.1.3") && b.proto == 6).expect("terminating backend stays");
    assert_eq!(term.flags, cilium_abi::LbBackendFlag::Terminating as u8);
    assert!(!dp.lb_services.contains_key(&(be("10.96.0.10"), 80u16.to_be(), 2, 6)), "surplus slot removed");
    // removed for good: the entry goes
    d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false)])).unwrap();
    assert!(!d.datapath().lb_backends.values().any(|b| b.address == be("10.0.1.3")));
}

#[test]
fn one_change_writes_only_that_services_entries() {
    let mut d = daemon(None);
    for i in 0..200u32 {
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        d.k8s_service_upsert(k8s_svc(&format!("s{i}"), &ip, &[("10.0.1.2", false), ("10.0.1.3", false)])).unwrap();
    }
    let before = d.datapath().lb_writes;
    // the same service again: nothing to write
    d.k8s_service_upsert(k8s_svc("s7", "10.96.0.8", &[("10.0.1.2", false), ("10.0.1.3", false)])).unwrap();
    assert_eq!(d.datapath().lb_writes, before);
    // one backend added to one service: its backend entries, one slot and
    // the service entry, for each of its two ports
    d.k8s_service_upsert(k8s_svc("s7", "10.96.0.8", &[("10.0.1.2", false), ("10.0.1.3", false), ("10.0.1.4", false)])).unwrap();
    assert_eq!(d.datapath().lb_writes - before, 6);
    // a resync (start-up over the same maps) writes nothing
    let before = d.datapath().lb_writes;
    d.reconcile_services().unwrap();
    assert_eq!(d.datapath().lb_writes, before);
}

#[test]
fn resync_repairs_what_the_maps_lost_and_removes_strays() {
    let mut d = daemon(None);
    d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", false)])).unwrap();
    let good = d.datapath().clone();
    let dp = d.datapath_mut();
    dp.lb_services.remove(&(be("10.96.0.10"), 80u16.to_be(), 2, 6));
    dp.lb_services.insert((be("10.96.9.9"), 80u16.to_be(), 0, 6), cilium_abi::Lb4Service { count: 0, rev_nat_index: 999, ..Default::default() });
    dp.lb_backends.insert(777, cilium_abi::Lb4Backend { address: be("10.9.9.9"), port: 80u16.to_be(), proto: 6, flags: 0 });
    d.reconcile_services().unwrap();
    assert_eq!(d.datapath().lb_services, good.lb_services);
    assert_eq!(d.datapath().lb_backends, good.lb_backends);
}

#[test]
fn services_survive_a_restart_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path());
    let mut d = daemon(Some(store.clone()));
    let ids = d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false)])).unwrap();
    let api = d.service_update(&cilium_api::ServiceUpdate { id: Some(300), frontend: "10.96.5.5:443".into(), protocol: "TCP".into(), backends: vec!["10.0.1.9:8443".into()], algorithm: None }).unwrap();
    assert_eq!(api, 300);
    let dp = d.datapath().clone();
    store.save_services(&d.services_snapshot().expect("services changed")).unwrap();
    assert!(d.services_snapshot().is_none(), "handed out once per change");
    let mut d2 = Daemon::new(config(), dp.clone(), Some(store.clone()), vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d2.set_services(store.load_services().unwrap().unwrap());
    assert!(store.load().unwrap().is_none(), "services alone do not write the main state");
    d2.reconcile_datapath().unwrap();
    assert_eq!(d2.datapath().lb_writes, dp.lb_writes, "nothing rewritten");
    assert_eq!(d2.service_list(), d.service_list());
    // the Kubernetes Service updates in place under its old IDs
    let again = d2.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", false)])).unwrap();
    assert_eq!(again, ids);
}

#[test]
fn maglev_tables_follow_the_backends() {
    let mut d = daemon(None);
    let mut k = k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", false), ("10.0.1.4", false)]);
    k.annotations.insert(services::ALGORITHM_ANNOTATION.into(), "maglev".into());
    k.ports.truncate(1);
    let ids = d.k8s_service_upsert(k.clone()).unwrap();
    let table = |dp: &FakeDatapath| -> Vec<u32> { (0..251).map(|s| dp.lb_maglev[&(ids[0], s)]).collect() };
    let t1 = table(d.datapath());
    assert_eq!(t1.iter().collect::<BTreeSet<_>>().len(), 3);
    let master = d.datapath().lb_services[&(be("10.96.0.10"), 80u16.to_be(), 0, 6)];
    assert_eq!(master.flags & cilium_abi::LbFlag::Maglev as u8, cilium_abi::LbFlag::Maglev as u8);
    let before = d.datapath().lb_writes;
    k.endpoints.pop();
    d.k8s_service_upsert(k.clone()).unwrap();
    let t2 = table(d.datapath());
    let moved = t1.iter().zip(&t2).filter(|(a, b)| a != b).count();
    // only the removed backend's slots (about a third) are rewritten
    assert!(moved < 251 / 2, "moved {moved}");
    assert!(d.datapath().lb_writes - before < 251 / 2 + 5);
    k.annotations.clear();
    d.k8s_service_upsert(k).unwrap();
    assert!(d.datapath().lb_maglev.is_empty(), "random again: table removed");
}

#[test]
fn bad_services_are_rejected_whole_with_the_field_named() {
    let mut d = daemon(None);
    d.k8s_service_upsert(k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false)])).unwrap();
    let snapshot = (d.service_list(), d.datapath().lb_services.clone());
    let mut bad = k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false)]);
    bad.endpoints[0].ports[1].protocol = "ICMP".into();
    let e = d.k8s_service_upsert(bad).unwrap_err();
    assert!(matches!(&e, DaemonError::Invalid { field, value, .. } if field == "endpoints[0].ports[1].protocol" && value == "ICMP"), "{e}");
    let mut bad = k8s_svc("other", "10.96.0.10", &[]);
    bad.ports.truncate(1);
    let e = d.k8s_service_upsert(bad).unwrap_err();
    assert!(e.to_string().contains("10.96.0.10:80/TCP") && e.to_string().contains("default/web"), "{e}");
    let mut bad = k8s_svc("x", "10.96.0.11", &[]);
    bad.annotations.insert(services::ALGORITHM_ANNOTATION.into(), "round-robin".into());
    let e = d.k8s_service_upsert(bad).unwrap_err();
    assert!(matches!(&e, DaemonError::Invalid { field, .. } if field.ends_with("lb-algorithm")), "{e}");
    let e = d.service_update(&cilium_api::ServiceUpdate { id: Some(5), frontend: "10.96.0.20:80".into(), protocol: "TCP".into(), backends: vec!["10.0.1.2:80".into(), "10.0.1.300:80".into()], algorithm: None }).unwrap_err();
    assert!(matches!(&e, DaemonError::Invalid { field, value, .. } if field == "backends[1]" && value == "10.0.1.300:80"), "{e}");
    assert_eq!((d.service_list(), d.datapath().lb_services.clone()), snapshot, "nothing applied");
}

#[test]
fn headless_and_nodeport_services() {
    let mut d = daemon(None);
    let mut k = k8s_svc("headless", "None", &[("10.0.1.2", false)]);
    assert!(d.k8s_service_upsert(k.clone()).unwrap().is_empty());
    assert!(d.datapath().lb_services.is_empty(), "headless services are untouched");
    k.name = "np".into();
    k.cluster_ip = Some("10.96.0.20".into());
    k.service_type = "NodePort".into();
    k.ports.truncate(1);
    let e = d.k8s_service_upsert(k.clone()).unwrap_err();
    assert!(matches!(&e, DaemonError::Invalid { field, .. } if field == "spec.ports[0].nodePort"), "{e}");
    k.ports[0].node_port = Some(30080);
    d.k8s_service_upsert(k).unwrap();
    assert_eq!(frontend(d.datapath(), "172.30.0.11", 30080, 6).unwrap().0, 1, "node port on the node address");
    assert_eq!(frontend(d.datapath(), "10.96.0.20", 80, 6).unwrap().0, 1);
    assert!(d.k8s_service_delete("default", "np").unwrap());
    assert!(d.datapath().lb_services.is_empty() && d.datapath().lb_backends.is_empty());
}

#[test]
fn local_traffic_policies_and_source_ranges_split_the_frontends() {
    let mut d = daemon(None);
    let mut k = k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false), ("10.0.1.3", false)]);
    k.endpoints[1].node_name = Some("n2".into());
    k.ports.truncate(1);
    k.ports[0].node_port = Some(30080);
    k.service_type = "LoadBalancer".into();
    k.load_balancer_ips = vec!["172.30.1.1".into()];
    // all Cluster, no ranges: one service
    assert_eq!(d.k8s_service_upsert(k.clone()).unwrap().len(), 1);
    k.external_traffic_policy = Some("Local".into());
    k.load_balancer_source_ranges = vec!["203.0.113.0/24".into()];
    let ids = d.k8s_service_upsert(k.clone()).unwrap();
    assert_eq!(ids.len(), 3, "cluster IP, node port, load balancer");
    let dp = d.datapath();
    assert_eq!(frontend(dp, "10.96.0.10", 80, 6).unwrap().0, 2, "ClusterIP: every endpoint");
    assert_eq!(frontend(dp, "172.30.0.11", 30080, 6).unwrap().0, 1, "NodePort with Local: this node's only");
    assert_eq!(frontend(dp, "172.30.1.1", 80, 6).unwrap().0, 1);
    let lb = dp.lb_services[&(be("172.30.1.1"), 80u16.to_be(), 0, 6)];
    assert_eq!(lb.flags & cilium_abi::LbFlag::SourceRange as u8, cilium_abi::LbFlag::SourceRange as u8);
    assert_eq!(dp.lb_src_ranges.iter().collect::<Vec<_>>(), vec![&(lb.rev_nat_index, 56, be("203.0.113.0"))]);
    let np = dp.lb_services[&(be("172.30.0.11"), 30080u16.to_be(), 0, 6)];
    assert_eq!(np.flags & cilium_abi::LbFlag::SourceRange as u8, 0, "ranges apply to LoadBalancer IPs only");
    // back to Cluster without ranges: merged again, ranges removed
    k.external_traffic_policy = None;
    k.load_balancer_source_ranges.clear();
    assert_eq!(d.k8s_service_upsert(k.clone()).unwrap().len(), 1);
    assert!(d.datapath().lb_src_ranges.is_empty());
    assert_eq!(frontend(d.datapath(), "172.30.1.1", 80, 6).unwrap().0, 2);
    k.load_balancer_source_ranges = vec!["203.0.113.0/33".into()];
    let e = d.k8s_service_upsert(k).unwrap_err();
    assert!(matches!(&e, DaemonError::Invalid { field, .. } if field == "spec.loadBalancerSourceRanges[0]"), "{e}");
}

#[test]
fn a_relist_applies_each_service_whole_and_removes_the_unlisted() {
    let mut d = daemon(None);
    d.k8s_service_upsert(k8s_svc("old", "10.96.0.9", &[("10.0.1.2", false)])).unwrap();
    d.service_update(&cilium_api::ServiceUpdate { id: Some(50), frontend: "10.96.5.5:443".into(), protocol: "TCP".into(), backends: vec!["10.0.1.9:8443".into()], algorithm: None }).unwrap();
    let mut bad = k8s_svc("bad", "10.96.0.11", &[]);
    bad.session_affinity = Some("Sticky".into());
    let rejected = d
        .k8s_services_sync(vec![k8s_svc("a", "10.96.0.10", &[("10.0.1.2", false)]), bad, k8s_svc("c", "10.96.0.12", &[("10.0.1.3", false)])])
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, "default/bad");
    let names: BTreeSet<String> = d.service_list().into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n.starts_with("default/a:")) && names.iter().any(|n| n.starts_with("default/c:")));
    assert!(!names.iter().any(|n| n.starts_with("default/old:")), "not listed: removed");
    assert!(names.contains(""), "services made through the API are not Kubernetes'");
    assert!(frontend(d.datapath(), "10.96.0.9", 80, 6).is_none());
    // the same list again writes nothing
    let before = d.datapath().lb_writes;
    d.k8s_services_sync(vec![k8s_svc("a", "10.96.0.10", &[("10.0.1.2", false)]), k8s_svc("c", "10.96.0.12", &[("10.0.1.3", false)])]).unwrap();
    assert_eq!(d.datapath().lb_writes, before);
}

#[test]
fn to_services_follows_the_service() {
    let mut d = daemon(None);
    pod(&mut d, "client", "client");
    pod(&mut d, "web", "web");
    pod(&mut d, "api", "api");
    let client = create(&mut d, "client", 1);
    let web = create(&mut d, "web", 2);
    let api = create(&mut d, "api", 3);
    let id_of = |d: &Daemon<FakeDatapath>, ep: u16| d.endpoint_view(ep).unwrap().identity;
    let (web_id, api_id) = (id_of(&d, web), id_of(&d, api));
    d.policy_import(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toServices: [{k8sService: {serviceName: svc}}]\n",
        "p.yaml",
        false,
    )
    .unwrap();
    let allows = |d: &Daemon<FakeDatapath>, peer: u32| d.endpoint_policy(client).unwrap().entries.lookup(peer, true, 6, 80).is_some_and(|(_, v)| !v.deny);
    assert!(!allows(&d, web_id), "no such service yet: nothing allowed");
    let mut k = k8s_svc("svc", "10.96.0.10", &[]);
    k.selector = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
    d.k8s_service_upsert(k.clone()).unwrap();
    assert!(allows(&d, web_id) && !allows(&d, api_id), "the service's pods");
    k.selector = Some(BTreeMap::from([("app".to_string(), "api".to_string())]));
    d.k8s_service_upsert(k).unwrap();
    assert!(!allows(&d, web_id) && allows(&d, api_id), "follows the service's selector");
    d.k8s_service_delete("default", "svc").unwrap();
    assert!(!allows(&d, api_id), "service gone: nothing allowed");
}

/// A stand-in for etcd's numbers: one per distinct label set, in order.
#[derive(Debug, Default)]
struct Numbers(std::sync::Mutex<Vec<String>>);
impl cilium_identity::ClusterNumbers for Numbers {
    fn number(&self, labels: &cilium_labels::LabelSet) -> Result<u32, String> {
        let key = cilium_identity::labels_key(labels);
        let mut seen = self.0.lock().unwrap();
        let i = seen.iter().position(|k| *k == key).unwrap_or_else(|| {
            seen.push(key);
            seen.len() - 1
        });
        Ok(1000 + i as u32)
    }
}

fn tunnel_daemon() -> Daemon<FakeDatapath> {
    let mut dp = FakeDatapath::default();
    dp.links.insert("lxc1".into(), 101);
    let cfg = DaemonConfig { routing_mode: cilium_api::RoutingMode::Tunnel, ..config() };
    let mut d = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.reconcile_datapath().unwrap();
    d
}

fn node(name: &str, ip: [u8; 4], cidr: &str) -> cilium_api::NodeMeta {
    cilium_api::NodeMeta { name: name.into(), ip: ip.into(), pod_cidr: cidr.into(), ip6: None, labels: BTreeMap::new() }
}

#[test]
fn host_policies_need_the_host_firewall_and_follow_the_node_labels() {
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: h}\nspec:\n  nodeSelector: {matchLabels: {role: worker}}\n  ingress:\n  - fromEntities: [cluster]\n    toPorts: [{ports: [{port: \"22\"}]}]\n";
    let mut d = daemon(None);
    let DaemonError::Policy(e) = d.policy_import(policy, "h.yaml", false).unwrap_err() else { panic!() };
    assert_eq!(e.field, "spec.nodeSelector", "{e}");
    assert!(e.message.contains("--enable-host-firewall"), "{e}");
    assert!(!d.endpoint_ids().contains(&HOST_ENDPOINT_ID));

    let mut dp = FakeDatapath::default();
    dp.links.insert("lxc1".into(), 101);
    let cfg = DaemonConfig { host_firewall: true, ..config() };
    let mut d = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.reconcile_datapath().unwrap();
    d.policy_import(policy, "h.yaml", false).unwrap();
    let host = d.endpoint_view(HOST_ENDPOINT_ID).expect("the host endpoint is listed");
    assert_eq!((host.identity, host.labels.clone()), (1, vec!["reserved:host".to_string()]));
    assert!(!host.ingress_enforced, "the node has no role=worker label yet");
    let entry = |d: &Daemon<FakeDatapath>| d.datapath().endpoints.get(&HOST_ENDPOINT_IFINDEX).copied().expect("endpoint table key 0");
    assert_eq!(entry(&d).flags & EndpointFlag::IngressEnforce as u16, 0);
    assert_eq!(entry(&d).ep_id, HOST_ENDPOINT_ID);
    // the API server labels the node: the host endpoint is selected
    let own = cilium_api::NodeMeta {
        labels: [("role".to_string(), "worker".to_string()), ("kubernetes.io/hostname".to_string(), "n1".to_string())].into(),
        ..node(&d.config().node_name.clone(), [172, 30, 0, 11], "10.0.1.0/24")
    };
    d.nodes_set(vec![own]).unwrap();
    let host = d.endpoint_view(HOST_ENDPOINT_ID).unwrap();
    assert_eq!(host.labels, vec!["reserved:host".to_string(), "k8s:role=worker".to_string()], "kubernetes.io labels are not security relevant");
    assert!(host.ingress_enforced && !host.egress_enforced);
    assert_ne!(entry(&d).flags & EndpointFlag::IngressEnforce as u16, 0);
    let entries: Vec<_> = d.datapath().policy.keys().filter(|k| k.1 == HOST_ENDPOINT_ID).collect();
    assert!(entries.iter().any(|k| k.5 == 22u16.to_be()), "port 22 for the cluster: {entries:?}");
    // `policy trace` to identity 1 explains the host endpoint's ingress
    let trace = |d: &Daemon<FakeDatapath>, port: u16| {
        let req = cilium_api::PolicyTraceRequest {
            src: cilium_api::TraceParty { pod: None, identity: Some(2), labels: vec![] },
            dst: cilium_api::TraceParty { pod: None, identity: Some(1), labels: vec![] },
            protocol: "TCP".into(),
            dport: port,
            http: None,
        };
        d.policy_trace(&req).unwrap()
    };
    let t = trace(&d, 22);
    assert_eq!(t.verdict, "DENIED", "the world is not the cluster:\n{}", t.rendered);
    assert!(t.rendered.contains("ClusterwideNetworkPolicy/h") || t.rendered.contains("CiliumClusterwideNetworkPolicy/h"), "{}", t.rendered);
    // a restart keeps the host endpoint's entries and finds them again
    let dp = d.datapath().clone();
    let cfg = DaemonConfig { host_firewall: false, ..config() };
    let mut off = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    off.reconcile_datapath().unwrap();
    assert!(!off.datapath().endpoints.contains_key(&HOST_ENDPOINT_IFINDEX), "without the flag the host endpoint goes");
    assert!(!off.datapath().policy.keys().any(|k| k.1 == HOST_ENDPOINT_ID), "and its entries");
}

#[test]
fn other_nodes_get_identities_from_their_labels() {
    let labelled = |name: &str, ip: [u8; 4], cidr: &str, zone: &str| cilium_api::NodeMeta { labels: [("zone".to_string(), zone.to_string())].into(), ..node(name, ip, cidr) };
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: z}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromNodes: [{matchLabels: {zone: a}}]\n";
    // without the flag: every other node is remote-node, node selectors are refused
    let mut d = daemon(None);
    d.nodes_set(vec![labelled("n2", [172, 30, 0, 12], "10.0.2.0/24", "a")]).unwrap();
    assert_eq!(d.datapath().ipcache[&"172.30.0.12/32".parse::<IpNet>().unwrap()].sec_identity, 6);
    let DaemonError::Policy(e) = d.policy_import(policy, "z.yaml", false).unwrap_err() else { panic!() };
    assert_eq!(e.field, "spec.ingress[0].fromNodes", "{e}");
    assert!(e.message.contains("--enable-node-selector-labels"), "{e}");

    let mut dp = FakeDatapath::default();
    dp.links.insert("lxc1".into(), 101);
    let cfg = DaemonConfig { node_selector_labels: true, ..config() };
    let mut d = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.reconcile_datapath().unwrap();
    pod(&mut d, "fe", "frontend");
    create(&mut d, "fe", 1);
    d.policy_import(policy, "z.yaml", false).unwrap();
    let own = cilium_api::NodeMeta { labels: [("zone".to_string(), "a".to_string())].into(), ..node(&d.config().node_name.clone(), [172, 30, 0, 11], "10.0.1.0/24") };
    let n2 = labelled("n2", [172, 30, 0, 12], "10.0.2.0/24", "a");
    let n3 = labelled("n3", [172, 30, 0, 13], "10.0.3.0/24", "b");
    d.nodes_set(vec![own, n2.clone(), n3.clone(), node("n4", [172, 30, 0, 14], "10.0.4.0/24")]).unwrap();
    let id_of = |d: &Daemon<FakeDatapath>, ip: &str| d.datapath().ipcache[&ip.parse::<IpNet>().unwrap()].sec_identity;
    let (a, b) = (id_of(&d, "172.30.0.12/32"), id_of(&d, "172.30.0.13/32"));
    assert!((2 << 24..3 << 24).contains(&a) && (2 << 24..3 << 24).contains(&b) && a != b, "{a} {b}");
    assert_eq!(id_of(&d, "172.30.0.14/32"), 6, "a node without labels is remote-node");
    assert_eq!(id_of(&d, "172.30.0.11/32"), 1, "this node is host, whatever its labels");
    assert_eq!(d.kvstore_published().0.labels["zone"], "a", "its own labels are published");
    let allowed = |d: &Daemon<FakeDatapath>, id: u32| d.datapath().policy.keys().any(|k| k.1 == 1 && k.3 == id && k.2 & 1 == 0);
    assert!(allowed(&d, a) && !allowed(&d, b));
    // a node that moves to another zone leaves the selection
    d.nodes_set(vec![labelled("n2", [172, 30, 0, 12], "10.0.2.0/24", "b"), n3]).unwrap();
    assert_eq!(id_of(&d, "172.30.0.12/32"), b, "the same labels, the same identity");
    assert!(!allowed(&d, b));
    assert!(!d.identities().iter().any(|i| i.id == a), "the unused identity is released");
    let e = d.nodes_set(vec![cilium_api::NodeMeta { labels: [("zone".to_string(), "a b".to_string())].into(), ..n2 }]).unwrap_err();
    assert!(e.to_string().contains("nodes[0].labels"), "{e}");
}

#[test]
fn tunnel_mode_routes_other_nodes_pod_cidrs_into_the_tunnel() {
    let mut d = tunnel_daemon();
    assert_eq!(d.config().pod_mtu(), 1450, "the VXLAN headers come off the pods' MTU");
    // without cluster-wide numbers the VNI would carry this node's own
    let e = d.nodes_set(vec![node("n2", [172, 30, 0, 12], "10.0.2.0/24")]).unwrap_err();
    assert!(e.to_string().contains("routing-mode") && e.to_string().contains("--kvstore"), "{e}");
    assert!(d.datapath().routes.is_empty(), "nothing applied");

    d.set_kvstore(std::sync::Arc::new(Numbers::default()));
    let labels: cilium_labels::LabelSet = [cilium_labels::Label::new("k8s", "app", "db")].into_iter().collect();
    let view = |nodes: Vec<cilium_api::NodeMeta>| cluster::KvView {
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        endpoints: [(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 7)), (labels.clone(), "n2".to_string()))].into_iter().collect(),
    };
    d.kvstore_sync(view(vec![node("n2", [172, 30, 0, 12], "10.0.2.0/24"), node("n3", [172, 30, 0, 13], "10.0.3.0/24")])).unwrap();
    let dp = d.datapath();
    let routed: Vec<String> = dp.routes.iter().filter(|(_, dev)| *dev == crate::node::TUNNEL_DEV).map(|(p, _)| p.to_string()).collect();
    assert_eq!(routed, ["10.0.2.0/24", "10.0.3.0/24"]);
    let at = |p: &str| dp.ipcache[&p.parse::<IpNet>().unwrap()];
    let pod = at("10.0.2.7/32");
    assert_eq!((pod.sec_identity, cilium_datapath::be_to_ip(pod.tunnel_endpoint)), (1000, Ipv4Addr::new(172, 30, 0, 12)), "a remote pod: its cluster-wide number, behind its node");
    let unknown = at("10.0.3.0/24");
    assert_eq!((unknown.sec_identity, cilium_datapath::be_to_ip(unknown.tunnel_endpoint)), (2, Ipv4Addr::new(172, 30, 0, 13)), "an unknown address of n3's CIDR: world, through the tunnel");
    assert_eq!(at("172.30.0.12/32").tunnel_endpoint, 0, "node addresses are reached over the underlay");

    // n3 leaves: its route goes, then its entries
    d.kvstore_sync(view(vec![node("n2", [172, 30, 0, 12], "10.0.2.0/24")])).unwrap();
    let dp = d.datapath();
    assert!(!dp.routes.contains_key(&"10.0.3.0/24".parse::<IpNet>().unwrap()));
    assert!(!dp.ipcache.contains_key(&"10.0.3.0/24".parse::<IpNet>().unwrap()));
    assert!(dp.routes.contains_key(&"10.0.2.0/24".parse::<IpNet>().unwrap()));
}

#[test]
fn restored_identities_move_to_the_kvstores_numbers() {
    let mut d = daemon(None);
    pod(&mut d, "a", "a");
    let id = create(&mut d, "a", 1);
    let local = d.endpoint_view(id).unwrap().identity;
    assert!(local < 1000, "numbered by this node: {local}");
    d.set_kvstore(std::sync::Arc::new(Numbers::default()));
    assert_eq!(d.kvstore_reclaim().unwrap(), 1);
    let ep = d.endpoint_view(id).unwrap();
    assert_eq!(ep.identity, 1000, "etcd's number");
    let dp = d.datapath();
    assert_eq!(dp.endpoints.values().find(|e| e.ep_id == id).unwrap().sec_identity, 1000, "the datapath's endpoint entry follows");
    assert_eq!(dp.ipcache[&IpNet::from(IpAddr::V4(ep.ipv4))].sec_identity, 1000, "and the ipcache");
    assert_eq!(d.kvstore_reclaim().unwrap(), 0);
}

#[test]
fn two_ports_on_one_node_port_are_refused_whole() {
    let mut d = daemon(None);
    let mut svc = k8s_svc("web", "10.96.0.10", &[("10.0.1.2", false)]);
    svc.service_type = "NodePort".into();
    svc.ports = vec![
        cilium_api::K8sServicePort { name: Some("http".into()), protocol: "TCP".into(), port: 80, node_port: Some(30080) },
        cilium_api::K8sServicePort { name: None, protocol: "TCP".into(), port: 81, node_port: Some(30080) },
    ];
    let before = d.service_list();
    let e = d.k8s_service_upsert(svc).unwrap_err();
    assert!(e.to_string().contains(":30080"), "{e}");
    assert_eq!(d.service_list(), before, "nothing stored");
}

#[test]
fn ipv6_endpoints_get_both_addresses_in_the_datapath() {
    let mut cfg = config();
    cfg.pod_cidr6 = Some("fd00:10:1::/112".parse().unwrap());
    let mut dp = FakeDatapath::default();
    dp.links.insert("lxc1".into(), 101);
    let mut d = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.set_node_ips6(vec!["fd00:ff::11".parse().unwrap()]);
    d.reconcile_datapath().unwrap();
    pod(&mut d, "fe", "frontend");
    let id = create(&mut d, "fe", 1);
    let v = d.endpoint_view(id).unwrap();
    let ip6: Ipv6Addr = "fd00:10:1::2".parse().unwrap();
    assert_eq!(v.ipv6, Some(ip6), "the second address of the IPv6 pool (the first is the router)");
    let dp = d.datapath();
    assert_eq!(dp.endpoints[&101].ipv6, ip6.octets());
    let net6 = IpNet::from(IpAddr::V6(ip6));
    assert_eq!(dp.ipcache[&net6].sec_identity, v.identity);
    assert_eq!(dp.routes.get(&net6).map(String::as_str), Some("lxc1"));
    let host = |s: &str| dp.ipcache[&s.parse::<IpNet>().unwrap()].sec_identity;
    assert_eq!((host("fd00:10:1::1/128"), host("fd00:ff::11/128")), (1, 1), "router and node addresses are the host");

    // IPv6 CIDRs in policies get identities and ipcache entries, labelled
    // as the IPv6 world
    d.policy_import(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: out}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [\"2001:db8::/32\", \"192.0.2.0/24\"]\n",
        "p.yaml",
        false,
    )
    .unwrap();
    let id6 = d.datapath().ipcache[&"2001:db8::/32".parse::<IpNet>().unwrap()].sec_identity;
    let labels = d.identities().get(id6).unwrap().labels.to_strings();
    assert!(labels.contains(&"reserved:world-ipv6".to_string()) && labels.contains(&"reserved:world".to_string()), "{labels:?}");
    let id4 = d.datapath().ipcache[&"192.0.2.0/24".parse::<IpNet>().unwrap()].sec_identity;
    assert!(d.identities().get(id4).unwrap().labels.to_strings().contains(&"reserved:world-ipv4".to_string()));

    d.endpoint_delete("c-fe", "eth0").unwrap();
    let dp = d.datapath();
    assert!(dp.ct_flushed.contains(&IpAddr::V6(ip6)));
    assert!(!dp.routes.contains_key(&net6) && !dp.ipcache.contains_key(&net6));
    assert!(d.ipam_allocate("c-next/eth0").unwrap().1.is_some());
}

#[test]
fn ipv6_needs_enabling() {
    let mut d = daemon(None);
    assert_eq!(d.ipam_allocate("c-x/eth0").unwrap().1, None, "no IPv6 pool: no IPv6 address");
    d.policy_import(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: out}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [\"2001:db8::/32\"]\n",
        "p.yaml",
        false,
    )
    .unwrap();
    assert!(d.datapath().ipcache.keys().all(|n| matches!(n, IpNet::V4(_))), "IPv6 prefixes wait for IPv6");
    let e = d
        .endpoint_create(&EndpointCreate {
            container_id: "c-x".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/x".into(),
            host_ifname: "lxc1".into(),
            ipv4: "10.0.1.2".parse().unwrap(),
            ipv6: Some("fd00::2".parse().unwrap()),
            mac: "02:00:00:00:00:01".into(),
            namespace: "default".into(),
            pod_name: "x".into(),
        })
        .unwrap_err();
    assert!(matches!(&e, DaemonError::Invalid { field, value, .. } if field == "ipv6" && value == "fd00::2"), "{e}");
}

#[test]
fn trace_tells_the_two_worlds_and_icmp_families_apart() {
    let mut d = daemon(None);
    pod(&mut d, "fe", "frontend");
    let fe = create(&mut d, "fe", 1);
    d.policy_import(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: ping6}\nspec:\n  endpointSelector: {matchLabels: {app: frontend}}\n  ingress:\n  - fromEntities: [world-ipv6]\n    icmps: [{fields: [{type: EchoRequest, family: IPv6}]}]\n",
        "p.yaml",
        false,
    )
    .unwrap();
    let dst = d.endpoint_view(fe).unwrap().identity;
    let trace = |d: &Daemon<FakeDatapath>, src: u32, protocol: &str, dport: u16| {
        let req = cilium_api::PolicyTraceRequest {
            src: cilium_api::TraceParty { pod: None, identity: Some(src), labels: vec![] },
            dst: cilium_api::TraceParty { pod: None, identity: Some(dst), labels: vec![] },
            protocol: protocol.into(),
            dport,
            http: None,
        };
        d.policy_trace(&req).unwrap().verdict
    };
    let world6 = ReservedIdentity::WorldIpv6.code();
    assert_eq!(trace(&d, world6, "ICMPv6", 128), "ALLOWED");
    assert_eq!(trace(&d, world6, "ICMP", 8), "DENIED", "an ICMPv6 rule is not an ICMP one");
    assert_eq!(trace(&d, ReservedIdentity::World.code(), "ICMPv6", 128), "DENIED", "world-ipv6 is not the IPv4 world");
    // and the datapath entry is for ICMPv6 (58), type 128, from identity 10
    assert!(d.datapath().policy.keys().any(|k| k.1 == fe && k.3 == world6 && k.4 == 58 && k.5 == 128u16.to_be()), "{:?}", d.datapath().policy.keys().filter(|k| k.1 == fe).collect::<Vec<_>>());
}

fn daemon6() -> Daemon<FakeDatapath> {
    let mut cfg = config();
    cfg.pod_cidr6 = Some("fd00:10:1::/112".parse().unwrap());
    let mut dp = FakeDatapath::default();
    for i in 0..10u32 {
        dp.links.insert(format!("lxc{i}"), 100 + i);
    }
    let mut d = Daemon::new(cfg, dp, None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d.reconcile_datapath().unwrap();
    d
}

#[test]
fn ipv6_addresses_are_released_with_the_endpoint_and_by_gc() {
    let mut d = daemon6();
    // CNI ADD failed after IPAM: DEL releases both addresses
    let (_, ip6) = d.ipam_allocate("c-failed/eth0").unwrap();
    d.endpoint_delete("c-failed", "eth0").unwrap();
    assert!(d.ipam6().unwrap().owner(ip6.unwrap()).is_none());
    // and GC finds orphans in the IPv6 pool too
    let (ip4, ip6) = d.ipam_allocate("c-orphan/eth0").unwrap();
    d.ipam.release(ip4);
    let gone = d.endpoint_gc(&[]).unwrap();
    assert_eq!(gone, vec!["c-orphan/eth0".to_string()]);
    assert!(d.ipam6().unwrap().owner(ip6.unwrap()).is_none());
}

#[test]
fn aaaa_answers_are_ignored_without_ipv6() {
    let learn = |d: &mut Daemon<FakeDatapath>| {
        d.fqdn_learn(vec![("api.example.com".into(), vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()], 60)], 0).unwrap();
        d.fqdn_cache().into_iter().map(|e| e.ip.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(learn(&mut daemon(None)), vec!["192.0.2.1"]);
    assert_eq!(learn(&mut daemon6()), vec!["192.0.2.1", "2001:db8::1"]);
}

#[test]
fn other_nodes_are_remote_node_by_their_ipv6_address_too() {
    let mut d = daemon6();
    let own = node("n1", [172, 30, 0, 11], "10.0.1.0/24");
    let n2 = cilium_api::NodeMeta { ip6: Some("fd00:ff::12".parse().unwrap()), ..node("n2", [172, 30, 0, 12], "10.0.2.0/24") };
    d.nodes_set(vec![own, n2]).unwrap();
    assert_eq!(d.datapath().ipcache[&"fd00:ff::12/128".parse::<IpNet>().unwrap()].sec_identity, ReservedIdentity::RemoteNode.code());
    // without IPv6 the address is not written
    let mut d = daemon(None);
    let n2 = cilium_api::NodeMeta { ip6: Some("fd00:ff::12".parse().unwrap()), ..node("n2", [172, 30, 0, 12], "10.0.2.0/24") };
    d.nodes_set(vec![node("n1", [172, 30, 0, 11], "10.0.1.0/24"), n2]).unwrap();
    assert!(d.datapath().ipcache.keys().all(|n| matches!(n, IpNet::V4(_))));
}

#[test]
fn cidr_identities_saved_with_older_labels_are_renumbered() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path());
    let mut d = daemon(Some(store.clone()));
    d.policy_import("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: out}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [\"192.0.2.0/24\"]\n", "p.yaml", false).unwrap();
    let mut state = store.load().unwrap().unwrap();
    let net: IpNet = "192.0.2.0/24".parse().unwrap();
    let old_id = d.datapath().ipcache[&net].sec_identity;
    // as an earlier version saved it: without reserved:world-ipv4
    let now = cilium_policy::rule::cidr_identity_labels(&net).to_strings();
    let old = LabelSet::parse_all(now.iter().map(String::as_str).filter(|l| *l != "reserved:world-ipv4"));
    state.identities.insert(old_id, old);
    let mut d2 = Daemon::new(config(), d.datapath().clone(), Some(store.clone()), vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    d2.restore(state).unwrap();
    let id = d2.datapath().ipcache[&net].sec_identity;
    let labels = d2.identities().get(id).unwrap().labels.to_strings();
    assert!(labels.contains(&"reserved:world-ipv4".to_string()), "{labels:?}");
}
