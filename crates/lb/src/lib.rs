//! Service load balancing as pure data.
//!
//! A [`Service`] has frontends (ClusterIP, NodePort, LoadBalancer and external
//! addresses) and backends; [`ServiceTable`] keeps every service, gives each a
//! stable numeric ID (the reverse-NAT index the datapath stores with a
//! connection) and each backend a stable ID shared across services, and
//! [`maglev`] computes consistent-hashing tables. The datapath writer turns
//! this into map entries. No IO, no kernel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub mod maglev;

/// Default Maglev table size (a prime), as upstream.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16381;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum L4 {
    Tcp,
    Udp,
    Sctp,
}

impl L4 {
    pub fn number(self) -> u8 {
        match self {
            L4::Tcp => 6,
            L4::Udp => 17,
            L4::Sctp => 132,
        }
    }

    pub fn parse(s: &str) -> Option<L4> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(L4::Tcp),
            "UDP" => Some(L4::Udp),
            "SCTP" => Some(L4::Sctp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "TCP",
            L4::Udp => "UDP",
            L4::Sctp => "SCTP",
        }
    }
}

/// Where a service is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "ExternalIP",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: L4,
    pub kind: FrontendKind,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BackendState {
    /// Receives new connections.
    Active,
    /// Keeps its established connections, receives no new ones.
    Terminating,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)?;
        if self.state == BackendState::Terminating {
            write!(f, " (terminating)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    #[default]
    Random,
    Maglev,
}

/// One service: what the datapath needs to translate its frontends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// `namespace/name`, or empty for services made through the API.
    pub name: String,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    pub algorithm: Algorithm,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
}

/// Why a service cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("frontend {frontend} already belongs to service {owner}")]
    FrontendTaken { frontend: String, owner: String },
    #[error("no service IDs left")]
    Exhausted,
    #[error("service {id} does not exist")]
    NoSuchService { id: u16 },
}

/// Every service, with stable service and backend IDs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceTable {
    services: BTreeMap<u16, Service>,
    /// (ip, port, protocol) -> backend ID; shared by services.
    backend_ids: BTreeMap<(Ipv4Addr, u16, L4), u32>,
    next_backend: u32,
}

impl ServiceTable {
    pub fn new() -> ServiceTable {
        ServiceTable { next_backend: 1, ..Default::default() }
    }

    /// Adds or replaces a service. An existing service with the same name (or,
    /// for unnamed ones, the same first frontend) keeps its ID. Returns the ID.
    pub fn upsert(&mut self, svc: Service, id: Option<u16>) -> Result<u16, ServiceError> {
        let existing = match id {
            Some(i) => Some(i),
            None => self
                .services
                .iter()
                .find(|(_, s)| (!svc.name.is_empty() && s.name == svc.name) || (svc.name.is_empty() && s.frontends.first() == svc.frontends.first()))
                .map(|(i, _)| *i),
        };
        for f in &svc.frontends {
            if let Some((oid, other)) = self.services.iter().find(|(oid, s)| Some(**oid) != existing && s.frontends.iter().any(|o| o.ip == f.ip && o.port == f.port && o.protocol == f.protocol)) {
                return Err(ServiceError::FrontendTaken {
                    frontend: f.to_string(),
                    owner: if other.name.is_empty() { format!("id {oid}") } else { other.name.clone() },
                });
            }
        }
        let id = match existing {
            Some(i) => i,
            None => (1..=u16::MAX).find(|i| !self.services.contains_key(i)).ok_or(ServiceError::Exhausted)?,
        };
        for b in &svc.backends {
            for p in svc.frontends.iter().map(|f| f.protocol) {
                self.backend_ids.entry((b.ip, b.port, p)).or_insert_with(|| {
                    let n = self.next_backend;
                    self.next_backend += 1;
                    n
                });
            }
        }
        self.services.insert(id, svc);
        self.gc_backends();
        Ok(id)
    }

    pub fn remove(&mut self, id: u16) -> Result<Service, ServiceError> {
        let s = self.services.remove(&id).ok_or(ServiceError::NoSuchService { id })?;
        self.gc_backends();
        Ok(s)
    }

    pub fn remove_named(&mut self, name: &str) -> Option<u16> {
        let id = self.services.iter().find(|(_, s)| s.name == name).map(|(i, _)| *i)?;
        self.services.remove(&id);
        self.gc_backends();
        Some(id)
    }

    fn gc_backends(&mut self) {
        let used: std::collections::BTreeSet<(Ipv4Addr, u16, L4)> = self
            .services
            .values()
            .flat_map(|s| s.backends.iter().flat_map(move |b| s.frontends.iter().map(move |f| (b.ip, b.port, f.protocol))))
            .collect();
        self.backend_ids.retain(|k, _| used.contains(k));
    }

    pub fn get(&self, id: u16) -> Option<&Service> {
        self.services.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, &Service)> {
        self.services.iter().map(|(i, s)| (*i, s))
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The ID of a backend address for a protocol.
    pub fn backend_id(&self, ip: Ipv4Addr, port: u16, protocol: L4) -> Option<u32> {
        self.backend_ids.get(&(ip, port, protocol)).copied()
    }

    /// Every backend: (id, ip, port, protocol).
    pub fn backends(&self) -> impl Iterator<Item = (u32, Ipv4Addr, u16, L4)> + '_ {
        self.backend_ids.iter().map(|((ip, port, p), id)| (*id, *ip, *port, *p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: [u8; 4], backends: &[[u8; 4]]) -> Service {
        Service {
            name: name.into(),
            frontends: vec![Frontend { ip: Ipv4Addr::from(ip), port: 80, protocol: L4::Tcp, kind: FrontendKind::ClusterIp }],
            backends: backends.iter().map(|b| Backend { ip: Ipv4Addr::from(*b), port: 8080, state: BackendState::Active }).collect(),
            algorithm: Algorithm::Random,
            affinity_timeout: None,
        }
    }

    #[test]
    fn ids_are_stable_and_backends_shared() {
        let mut t = ServiceTable::new();
        let a = t.upsert(svc("ns/a", [10, 96, 0, 1], &[[10, 0, 1, 2], [10, 0, 1, 3]]), None).unwrap();
        let b = t.upsert(svc("ns/b", [10, 96, 0, 2], &[[10, 0, 1, 3]]), None).unwrap();
        assert_ne!(a, b);
        let shared = t.backend_id(Ipv4Addr::new(10, 0, 1, 3), 8080, L4::Tcp).unwrap();
        assert_eq!(t.upsert(svc("ns/a", [10, 96, 0, 1], &[[10, 0, 1, 3]]), None).unwrap(), a, "same name, same ID");
        assert_eq!(t.backend_id(Ipv4Addr::new(10, 0, 1, 3), 8080, L4::Tcp), Some(shared), "backend IDs are stable");
        assert!(t.backend_id(Ipv4Addr::new(10, 0, 1, 2), 8080, L4::Tcp).is_none(), "unused backends are forgotten");
        t.remove(b).unwrap();
        assert!(t.get(b).is_none());
    }

    #[test]
    fn a_frontend_belongs_to_one_service() {
        let mut t = ServiceTable::new();
        t.upsert(svc("ns/a", [10, 96, 0, 1], &[]), None).unwrap();
        let e = t.upsert(svc("ns/b", [10, 96, 0, 1], &[]), None).unwrap_err();
        assert!(matches!(e, ServiceError::FrontendTaken { .. }), "{e}");
    }
}
