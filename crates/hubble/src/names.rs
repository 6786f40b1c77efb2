//! What the agent knows about addresses, as a snapshot the parser reads
//! without locking the agent: local endpoints by IP, identities' labels,
//! services by frontend, interface names.

use std::collections::HashMap;
use std::net::Ipv4Addr;

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

/// The snapshot.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub node_name: String,
    pub endpoints: HashMap<Ipv4Addr, EndpointName>,
    /// Identity -> its labels (`source:key=value`, sorted).
    pub identities: HashMap<u32, Vec<String>>,
    /// (frontend IP, port) -> service.
    pub services: HashMap<(Ipv4Addr, u16), ServiceName>,
    /// ifindex -> name.
    pub interfaces: HashMap<u32, String>,
}

/// The namespace a label list names (`k8s:io.kubernetes.pod.namespace=…`).
pub fn namespace_of(labels: &[String]) -> Option<&str> {
    labels
        .iter()
        .find_map(|l| l.strip_prefix("k8s:io.kubernetes.pod.namespace="))
}
