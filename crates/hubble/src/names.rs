//! What the agent knows about addresses, as a snapshot the parser reads
//! without locking the agent: local endpoints by IP, identities' labels,
//! services by frontend, interface names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::proto::flow::Endpoint;

/// A workload owning a pod (upstream: from the pod's owner references).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// A local endpoint, by its IP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointName {
    pub id: u32,
    pub identity: u32,
    pub namespace: String,
    pub pod_name: String,
    /// `source:key=value` strings, sorted.
    pub labels: Vec<String>,
    pub workloads: Vec<Workload>,
}

/// A service, by one of its frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// A policy as flows name it (upstream's `flow.Policy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyName {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// Which traffic to attribute to policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyQuery {
    pub src_identity: u32,
    pub dst_identity: u32,
    /// At the source's egress (true) or the destination's ingress.
    pub egress: bool,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port (ICMP: the type).
    pub port: u16,
    /// The local endpoint's address (for its named ports).
    pub local: IpAddr,
}

/// The policies that allowed and denied some traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    pub allowed_by: Vec<PolicyName>,
    pub denied_by: Vec<PolicyName>,
}

/// Names the policies behind a verdict (the agent implements it with its
/// policy engine; Hubble stays independent of it).
pub trait Attributor: Send + Sync + std::fmt::Debug {
    fn attribute(&self, q: &PolicyQuery) -> Attribution;
}

/// The snapshot.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Names the policies of policy verdicts and policy drops.
    pub policies: Option<std::sync::Arc<dyn Attributor>>,
    pub node_name: String,
    /// By each of the endpoint's addresses (IPv4, and IPv6 when it has one).
    pub endpoints: HashMap<IpAddr, EndpointName>,
    /// Identity -> its labels (`source:key=value`, sorted).
    pub identities: HashMap<u32, Vec<String>>,
    /// (frontend IP, port) -> service.
    pub services: HashMap<(IpAddr, u16), ServiceName>,
    /// ifindex -> name.
    pub interfaces: HashMap<u32, String>,
    /// Flows' endpoints built from this snapshot, shared by the L7 flows
    /// that name them.
    pub endpoint_cache: EndpointCache,
}

/// Endpoints by (address, identity), built once per snapshot (a copy of a
/// snapshot starts empty).
#[derive(Debug, Default)]
pub struct EndpointCache(Mutex<HashMap<(IpAddr, u32), Arc<Endpoint>>>);

/// Entries kept at most (then the cache starts over).
const ENDPOINT_CACHE: usize = 4096;

impl Clone for EndpointCache {
    fn clone(&self) -> Self {
        EndpointCache::default()
    }
}

impl EndpointCache {
    /// The endpoint `make` builds from `names`, built once.
    pub fn get(&self, names: &Names, ip: IpAddr, identity: u32, make: fn(&Names, IpAddr, u32) -> Endpoint) -> Arc<Endpoint> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = m.get(&(ip, identity)) {
            return e.clone();
        }
        if m.len() >= ENDPOINT_CACHE {
            m.clear();
        }
        let e = Arc::new(make(names, ip, identity));
        m.insert((ip, identity), e.clone());
        e
    }
}

/// The namespace a label list names (`k8s:io.kubernetes.pod.namespace=…`).
pub fn namespace_of(labels: &[String]) -> Option<&str> {
    labels
        .iter()
        .find_map(|l| l.strip_prefix("k8s:io.kubernetes.pod.namespace="))
}
