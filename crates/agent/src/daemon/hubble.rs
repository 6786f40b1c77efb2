//! What Hubble needs from the daemon: a snapshot of names, rebuilt only
//! after something it names changed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cilium_datapath::Datapath;
use cilium_hubble::names::{Attribution, Attributor, EndpointName, Names, PolicyQuery, ServiceName, Workload};

use super::Daemon;
use super::proxy::ProxySnapshot;

/// Queries remembered per snapshot before the cache starts over.
const ATTRIBUTION_CACHE: usize = 16_384;

/// Policy attribution with the same trace `cilium policy trace` runs, over
/// the snapshot the L7 proxy decides with; answers are cached, since one
/// connection's verdicts repeat the same question.
#[derive(Debug)]
struct PolicyAttributor {
    snapshot: ProxySnapshot,
    cache: Mutex<HashMap<PolicyQuery, Attribution>>,
}

impl Attributor for PolicyAttributor {
    fn attribute(&self, q: &PolicyQuery) -> Attribution {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cache.get(q) {
            return a.clone();
        }
        let a = self.snapshot.attribute(q);
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
        for e in self.endpoints.values() {
            let r = &e.rec;
            let meta = self.pods.get(&Self::pod_key(&r.namespace, &r.pod_name));
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
            let name = EndpointName {
                id: u32::from(r.id),
                identity: r.identity,
                namespace: r.namespace.clone(),
                pod_name: r.pod_name.clone(),
                labels: r.labels.to_strings(),
                workloads,
            };
            if let Some(ip6) = r.ipv6 {
                n.endpoints.insert(ip6.into(), name.clone());
            }
            n.endpoints.insert(r.ipv4.into(), name);
            n.interfaces.insert(r.host_ifindex, r.host_ifname.clone());
        }
        for id in self.identities.iter() {
            n.identities.insert(id.id, id.labels.to_strings());
        }
        n.policies = Some(Arc::new(PolicyAttributor { snapshot: self.proxy_snapshot(), cache: Mutex::new(HashMap::new()) }));
        for (_, svc) in self.services.iter() {
            let Some((ns, name)) = svc.name.split_once('/') else {
                continue;
            };
            for fe in &svc.frontends {
                n.services.insert(
                    (fe.ip.into(), fe.port),
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
