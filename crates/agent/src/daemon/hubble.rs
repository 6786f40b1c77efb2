//! What Hubble needs from the daemon: a snapshot of names, rebuilt only
//! after something it names changed.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cilium_datapath::Datapath;
use cilium_hubble::names::{Attribution, Attributor, EndpointName, Names, PolicyName, PolicyQuery, ServiceName, Workload};
use cilium_labels::LabelSet;
use cilium_policy::trace::{Party, trace};
use cilium_policy::{NamedPorts, PolicyOptions, Protocol, Rule};

use super::Daemon;

/// Queries remembered per snapshot before the cache starts over.
const ATTRIBUTION_CACHE: usize = 16_384;

/// Policy attribution with the same trace `cilium policy trace` runs, over
/// a copy of the rules taken with the snapshot; answers are cached, since
/// one connection's verdicts repeat the same question.
#[derive(Debug)]
struct PolicyAttributor {
    rules: Vec<Rule>,
    identities: HashMap<u32, LabelSet>,
    named_ports: HashMap<Ipv4Addr, NamedPorts>,
    options: PolicyOptions,
    cache: Mutex<HashMap<PolicyQuery, Attribution>>,
}

impl Attributor for PolicyAttributor {
    fn attribute(&self, q: &PolicyQuery) -> Attribution {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cache.get(q) {
            return a.clone();
        }
        let protocol = match q.protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            1 => Protocol::Icmp,
            _ => return Attribution::default(),
        };
        let empty = LabelSet::default();
        let no_ports = NamedPorts::new();
        let src_labels = self.identities.get(&q.src_identity).unwrap_or(&empty);
        let dst_labels = self.identities.get(&q.dst_identity).unwrap_or(&empty);
        let local_ports = self.named_ports.get(&q.local).unwrap_or(&no_ports);
        let src = Party { labels: src_labels, is_endpoint: q.egress, named_ports: &no_ports };
        let dst = Party { labels: dst_labels, is_endpoint: !q.egress, named_ports: if q.egress { &no_ports } else { local_ports } };
        let t = trace(&self.rules, &src, &dst, protocol, q.port, self.options);
        let d = if q.egress { t.egress } else { t.ingress };
        let name = |r: cilium_policy::PolicyRef| PolicyName { kind: r.kind.as_str().to_string(), namespace: r.namespace.unwrap_or_default(), name: r.name };
        let a = d.map(|d| Attribution { allowed_by: d.allowed_by.into_iter().map(name).collect(), denied_by: d.denied_by.into_iter().map(name).collect() }).unwrap_or_default();
        if cache.len() >= ATTRIBUTION_CACHE {
            cache.clear();
        }
        cache.insert(*q, a.clone());
        a
    }
}

impl<D: Datapath> Daemon<D> {
    /// Marks the names Hubble shows as changed.
    pub(crate) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// A counter that moves whenever [`Daemon::hubble_names`] would change,
    /// readable without the daemon's lock.
    pub fn change_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.changes.clone()
    }

    /// Endpoints, identities, services and interfaces, by the keys flows
    /// carry.
    pub fn hubble_names(&self) -> Names {
        let mut n = Names {
            node_name: self.cfg.node_name.clone(),
            ..Default::default()
        };
        let mut named_ports = HashMap::new();
        for e in self.endpoints.values() {
            let r = &e.rec;
            let meta = self.pods.get(&Self::pod_key(&r.namespace, &r.pod_name));
            let mut ports = NamedPorts::new();
            Self::named_ports(meta, &mut ports);
            named_ports.insert(r.ipv4, ports);
            let workloads = meta
                .and_then(|m| m.workload.as_deref())
                .and_then(|w| w.split_once('/'))
                .map(|(kind, name)| {
                    vec![Workload {
                        kind: kind.to_string(),
                        name: name.to_string(),
                    }]
                })
                .unwrap_or_default();
            n.endpoints.insert(
                r.ipv4,
                EndpointName {
                    id: u32::from(r.id),
                    identity: r.identity,
                    namespace: r.namespace.clone(),
                    pod_name: r.pod_name.clone(),
                    labels: r.labels.to_strings(),
                    workloads,
                },
            );
            n.interfaces.insert(r.host_ifindex, r.host_ifname.clone());
        }
        let mut identities = HashMap::new();
        for id in self.identities.iter() {
            n.identities.insert(id.id, id.labels.to_strings());
            identities.insert(id.id, id.labels.clone());
        }
        n.policies = Some(Arc::new(PolicyAttributor { rules: self.repo.rules().to_vec(), identities, named_ports, options: self.cfg.policy, cache: Mutex::new(HashMap::new()) }));
        for (_, svc) in self.services.iter() {
            let Some((ns, name)) = svc.name.split_once('/') else {
                continue;
            };
            for fe in &svc.frontends {
                n.services.insert(
                    (fe.ip, fe.port),
                    ServiceName {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                    },
                );
            }
        }
        n
    }
}
