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

impl Algorithm {
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "random" => Some(Algorithm::Random),
            "maglev" => Some(Algorithm::Maglev),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        }
    }
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
    /// Clients allowed by the per-packet load balancer, as (address,
    /// prefix length); empty: every client.
    #[serde(default)]
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
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

type AddrKey = (Ipv4Addr, u16, L4);

fn frontend_key(f: &Frontend) -> AddrKey {
    (f.ip, f.port, f.protocol)
}

/// Every service, with stable service and backend IDs. Lookups by name,
/// frontend and backend address are indexed, so one change costs the size of
/// that service, not of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SavedTable", into = "SavedTable")]
pub struct ServiceTable {
    services: BTreeMap<u16, Service>,
    names: BTreeMap<String, u16>,
    frontends: BTreeMap<AddrKey, u16>,
    /// (ip, port, protocol) -> (backend ID, services using it); shared by services.
    backend_ids: BTreeMap<AddrKey, (u32, usize)>,
    next_backend: u32,
    /// Where the search for a free service ID starts (after the last one
    /// handed out), so allocating stays O(1) as the table grows.
    next_id: u16,
}

/// What is persisted: the services and the backend IDs; indexes are rebuilt.
#[derive(Serialize, Deserialize)]
struct SavedTable {
    services: BTreeMap<u16, Service>,
    backend_ids: Vec<(AddrKey, u32)>,
    next_backend: u32,
}

impl From<ServiceTable> for SavedTable {
    fn from(t: ServiceTable) -> SavedTable {
        SavedTable { backend_ids: t.backend_ids.iter().map(|(k, (id, _))| (*k, *id)).collect(), services: t.services, next_backend: t.next_backend }
    }
}

impl From<SavedTable> for ServiceTable {
    fn from(s: SavedTable) -> ServiceTable {
        let mut t = ServiceTable { next_backend: s.next_backend.max(1), ..ServiceTable::new() };
        for (k, id) in s.backend_ids {
            t.backend_ids.insert(k, (id, 0));
        }
        for (id, svc) in s.services {
            t.index(id, &svc);
            t.services.insert(id, svc);
        }
        t.backend_ids.retain(|_, (_, refs)| *refs > 0);
        t
    }
}

impl Default for ServiceTable {
    fn default() -> ServiceTable {
        ServiceTable::new()
    }
}

fn backend_keys(svc: &Service) -> std::collections::BTreeSet<AddrKey> {
    svc.backends.iter().flat_map(|b| svc.frontends.iter().map(move |f| (b.ip, b.port, f.protocol))).collect()
}

impl ServiceTable {
    pub fn new() -> ServiceTable {
        ServiceTable {
            services: BTreeMap::new(),
            names: BTreeMap::new(),
            frontends: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            next_backend: 1,
            next_id: 1,
        }
    }

    /// The ID `svc` would replace: `id` if given, else the service with the
    /// same name or, for unnamed ones, the same first frontend.
    fn existing(&self, svc: &Service, id: Option<u16>) -> Option<u16> {
        match id {
            Some(i) => Some(i),
            None if !svc.name.is_empty() => self.names.get(&svc.name).copied(),
            None => svc.frontends.first().and_then(|f| self.frontends.get(&frontend_key(f))).copied(),
        }
    }

    /// Checks that `svc` can be stored without taking a frontend of a service
    /// other than the one it replaces or those in `replacing`.
    pub fn check(&self, svc: &Service, id: Option<u16>, replacing: &[u16]) -> Result<(), ServiceError> {
        let existing = self.existing(svc, id);
        let mut seen = std::collections::BTreeSet::new();
        for f in &svc.frontends {
            if !seen.insert(frontend_key(f)) {
                return Err(ServiceError::FrontendTaken { frontend: f.to_string(), owner: "the same service".into() });
            }
            if let Some(oid) = self.frontends.get(&frontend_key(f)) {
                if Some(*oid) != existing && !replacing.contains(oid) {
                    let other = &self.services[oid];
                    return Err(ServiceError::FrontendTaken {
                        frontend: f.to_string(),
                        owner: if other.name.is_empty() { format!("id {oid}") } else { other.name.clone() },
                    });
                }
            }
        }
        Ok(())
    }

    /// Adds or replaces a service (see [`ServiceTable::check`]). Returns its ID.
    pub fn upsert(&mut self, svc: Service, id: Option<u16>) -> Result<u16, ServiceError> {
        self.check(&svc, id, &[])?;
        let id = match self.existing(&svc, id) {
            Some(i) => i,
            None => self.free_id()?,
        };
        // new backend references first, so backends the old and the new
        // service share keep their IDs
        self.ref_backends(&svc);
        if let Some(old) = self.services.remove(&id) {
            self.unindex(id, &old);
        }
        self.index_addresses(id, &svc);
        self.services.insert(id, svc);
        Ok(id)
    }

    fn free_id(&mut self) -> Result<u16, ServiceError> {
        let start = self.next_id.max(1);
        let id = (start..=u16::MAX).chain(1..start).find(|i| !self.services.contains_key(i)).ok_or(ServiceError::Exhausted)?;
        self.next_id = id.wrapping_add(1).max(1);
        Ok(id)
    }

    fn index(&mut self, id: u16, svc: &Service) {
        self.index_addresses(id, svc);
        self.ref_backends(svc);
    }

    fn index_addresses(&mut self, id: u16, svc: &Service) {
        if !svc.name.is_empty() {
            self.names.insert(svc.name.clone(), id);
        }
        for f in &svc.frontends {
            self.frontends.insert(frontend_key(f), id);
        }
    }

    fn ref_backends(&mut self, svc: &Service) {
        for k in backend_keys(svc) {
            let next = &mut self.next_backend;
            let e = self.backend_ids.entry(k).or_insert_with(|| {
                let n = *next;
                *next += 1;
                (n, 0)
            });
            e.1 += 1;
        }
    }

    fn unindex(&mut self, id: u16, svc: &Service) {
        if self.names.get(&svc.name) == Some(&id) {
            self.names.remove(&svc.name);
        }
        for f in &svc.frontends {
            if self.frontends.get(&frontend_key(f)) == Some(&id) {
                self.frontends.remove(&frontend_key(f));
            }
        }
        for k in backend_keys(svc) {
            if let Some(e) = self.backend_ids.get_mut(&k) {
                e.1 -= 1;
                if e.1 == 0 {
                    self.backend_ids.remove(&k);
                }
            }
        }
    }

    pub fn remove(&mut self, id: u16) -> Result<Service, ServiceError> {
        let s = self.services.remove(&id).ok_or(ServiceError::NoSuchService { id })?;
        self.unindex(id, &s);
        Ok(s)
    }

    /// IDs of the services whose name starts with `prefix`, in name order.
    pub fn ids_with_prefix(&self, prefix: &str) -> Vec<u16> {
        self.names.range(prefix.to_string()..).take_while(|(n, _)| n.starts_with(prefix)).map(|(_, id)| *id).collect()
    }

    pub fn id_of(&self, name: &str) -> Option<u16> {
        self.names.get(name).copied()
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
        self.backend_ids.get(&(ip, port, protocol)).map(|(id, _)| *id)
    }

    /// Every backend: (id, ip, port, protocol).
    pub fn backends(&self) -> impl Iterator<Item = (u32, Ipv4Addr, u16, L4)> + '_ {
        self.backend_ids.iter().map(|((ip, port, p), (id, _))| (*id, *ip, *port, *p))
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
            source_ranges: vec![],
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
        t.upsert(svc("ns/c", [10, 96, 0, 3], &[[10, 0, 1, 9]]), None).unwrap();
        let only_c = t.backend_id(Ipv4Addr::new(10, 0, 1, 9), 8080, L4::Tcp);
        t.upsert(svc("ns/c", [10, 96, 0, 3], &[[10, 0, 1, 9], [10, 0, 1, 10]]), None).unwrap();
        assert_eq!(t.backend_id(Ipv4Addr::new(10, 0, 1, 9), 8080, L4::Tcp), only_c, "kept across an update of its only user");
        assert!(t.backend_id(Ipv4Addr::new(10, 0, 1, 2), 8080, L4::Tcp).is_none(), "unused backends are forgotten");
        t.remove(b).unwrap();
        assert!(t.get(b).is_none());
        assert_eq!(t.id_of("ns/a"), Some(a));
        assert!(t.id_of("ns/b").is_none());
    }

    #[test]
    fn saved_tables_keep_their_ids() {
        let mut t = ServiceTable::new();
        let a = t.upsert(svc("ns/a", [10, 96, 0, 1], &[[10, 0, 1, 2], [10, 0, 1, 3]]), None).unwrap();
        t.upsert(svc("ns/b", [10, 96, 0, 2], &[[10, 0, 1, 3]]), None).unwrap();
        let back: ServiceTable = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.id_of("ns/a"), Some(a));
        let ids: Vec<_> = t.backends().collect();
        assert_eq!(back.backends().collect::<Vec<_>>(), ids);
        let mut back = back;
        let c = back.upsert(svc("ns/c", [10, 96, 0, 3], &[[10, 0, 1, 9]]), None).unwrap();
        assert!(back.backends().filter(|b| ids.iter().any(|o| o.0 == b.0)).count() == ids.len());
        assert!(!ids.iter().any(|o| Some(o.0) == back.backend_id(Ipv4Addr::new(10, 0, 1, 9), 8080, L4::Tcp)), "new backend IDs are fresh");
        back.remove(c).unwrap();
        // removing one user keeps a shared backend
        back.remove(a).unwrap();
        assert!(back.backend_id(Ipv4Addr::new(10, 0, 1, 3), 8080, L4::Tcp).is_some());
        assert!(back.backend_id(Ipv4Addr::new(10, 0, 1, 2), 8080, L4::Tcp).is_none());
    }

    #[test]
    fn a_frontend_belongs_to_one_service() {
        let mut t = ServiceTable::new();
        t.upsert(svc("ns/a", [10, 96, 0, 1], &[]), None).unwrap();
        let e = t.upsert(svc("ns/b", [10, 96, 0, 1], &[]), None).unwrap_err();
        assert!(matches!(e, ServiceError::FrontendTaken { .. }), "{e}");
        let a = t.id_of("ns/a").unwrap();
        t.check(&svc("ns/b", [10, 96, 0, 1], &[]), None, &[a]).expect("allowed when replacing its owner");
    }
}
