//! Services through the agent: any JSON list of Kubernetes Services (as the
//! watchers deliver them) is applied or rejected whole, and afterwards the
//! service maps are consistent: every slot names a backend that exists, and
//! every service entry's count matches its slots.
#![no_main]
use std::net::Ipv4Addr;

use cilium_agent::daemon::{Daemon, DaemonConfig};
use cilium_datapath::fake::FakeDatapath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(list) = serde_json::from_slice::<Vec<cilium_api::K8sService>>(data) else { return };
    let cfg = DaemonConfig {
        node_name: "n".into(),
        pod_cidr: "10.0.1.0/24".parse().unwrap(),
        pod_cidr6: None,
        mtu: 1500,
        routing_mode: cilium_api::RoutingMode::Native,
        policy: Default::default(),
        audit_mode: false,
        extended_ip_protocols: false,
        node_selector_labels: false,
        host_firewall: false,
        lb_algorithm: cilium_lb::Algorithm::Random,
        maglev_size: 251,
        fqdn_min_ttl: 0,
        fqdn_max_ips: 50,
    };
    let mut d = Daemon::new(cfg, FakeDatapath::default(), None, vec![Ipv4Addr::new(172, 30, 0, 11)]).unwrap();
    for k in list {
        let (ns, name) = (k.namespace.clone(), k.name.clone());
        let before = d.service_list();
        if d.k8s_service_upsert(k).is_err() {
            assert_eq!(d.service_list(), before, "a rejected service changes nothing");
        }
        if name.len() % 3 == 0 {
            let _ = d.k8s_service_delete(&ns, &name);
        }
    }
    let dp = d.datapath();
    for ((addr, port, slot, proto), v) in &dp.lb_services {
        if *slot == 0 {
            for s in 1..=v.count {
                let e = dp.lb_services.get(&(*addr, *port, s, *proto)).expect("slot of the count exists");
                assert!(dp.lb_backends.contains_key(&e.backend_id), "slot names an existing backend");
            }
            assert!(!dp.lb_services.contains_key(&(*addr, *port, v.count + 1, *proto)), "no slot beyond the count");
        }
    }
    for (_, b) in &dp.lb_maglev {
        assert!(dp.lb_backends.contains_key(b), "maglev slot names an existing backend");
    }
});
