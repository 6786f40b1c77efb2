use std::collections::BTreeMap;

use cilium_abi::{EndpointFlag, POLICY_KEY_GEN};
use cilium_datapath::fake::FakeDatapath;

use super::*;

fn config() -> DaemonConfig {
    DaemonConfig {
        node_name: "n1".into(),
        pod_cidr: "10.0.1.0/24".parse().unwrap(),
        mtu: 1500,
        policy: PolicyOptions::default(),
        audit_mode: false,
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
    d.pod_upsert(PodMeta { namespace: "default".into(), name: name.into(), labels, service_account: "default".into(), ports: vec![] }).unwrap();
}

fn create(d: &mut Daemon<FakeDatapath>, name: &str, n: u32) -> u16 {
    let owner = format!("c-{name}/eth0");
    let ip = d.ipam_allocate(&owner).unwrap();
    d.endpoint_create(&EndpointCreate {
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        netns: format!("/var/run/netns/{name}"),
        host_ifname: format!("lxc{n}"),
        ipv4: ip,
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
    assert_eq!(dp.routes.get(&v.ipv4).map(String::as_str), Some("lxc1"));
    let info = dp.endpoints[&101];
    assert_eq!(info.sec_identity, v.identity);
    assert_eq!(info.flags & (EndpointFlag::IngressEnforce as u16 | EndpointFlag::EgressEnforce as u16), 0);
    assert_eq!(dp.ipcache[&Ipv4Net::new(v.ipv4, 32).unwrap()].sec_identity, v.identity);
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
    assert!(dp.ct_flushed.contains(&v.ipv4), "its connections are forgotten");
    assert!(!dp.routes.contains_key(&v.ipv4));
    assert!(!dp.ipcache.contains_key(&Ipv4Net::new(v.ipv4, 32).unwrap()));
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
    let next = d2.ipam_allocate("c-new/eth0").unwrap();
    assert_ne!(next, pending);
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
    assert_eq!(d.datapath().ipcache[&Ipv4Net::new(v.ipv4, 32).unwrap()].sec_identity, v.identity);
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
        d.pod_upsert(PodMeta { namespace: "default".into(), name: format!("p{i}"), labels, service_account: "default".into(), ports: vec![] }).unwrap();
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
    d.pod_upsert(PodMeta { namespace: "default".into(), name: "p3".into(), labels, service_account: "default".into(), ports: vec![] }).unwrap();
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
