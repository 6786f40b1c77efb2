//! Services: Kubernetes Services (with their endpoints) and services made
//! through the API become one [`ServiceTable`], and the table becomes the
//! service maps one service at a time: a change writes only the entries of
//! the service it touches, and a resync (start-up, restore) is a diff against
//! what the maps hold.
//!
//! Write order keeps every lookup valid while services change: backends
//! first, then source ranges, Maglev slots and backend slots, then service
//! entries (with their new counts), then removed services, surplus slots and
//! Maglev slots, then backends nobody uses. The writes of one change (one
//! Service, or a whole re-list) go to the kernel as one batch per phase.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use cilium_abi::{Lb4Backend, Lb4Key, Lb4Service, Lb4SrcRangeKey, LbBackendFlag, LbFlag, LbMaglevKey};
use cilium_api::{BackendView, FrontendView, K8sService, LbMapView, LbServiceEntry, ServiceUpdate, ServiceView};
use cilium_datapath::{Datapath, LbOp, be_to_ip, ip_to_be};
use cilium_lb::{Algorithm, Backend, BackendState, Frontend, FrontendKind, L4, Service};

use tracing::error;

use super::{Daemon, DaemonError, STATE_VERSION, ServiceState, invalid};

/// The annotation that picks a service's backend selection.
pub const ALGORITHM_ANNOTATION: &str = "service.cilium.io/lb-algorithm";
/// sessionAffinityConfig.clientIP.timeoutSeconds default, as Kubernetes.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Entries of cilium_lb4_maglev (bpf/lib/lb.h): all Maglev tables together.
pub const MAGLEV_MAP_MAX: u32 = 262_144;

/// A frontend as the maps key it: (address, port, protocol), network order.
type FeKey = (u32, u16, u8);

/// One service as last written to the maps.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct LbWritten {
    /// Per frontend: the service entry and the backend ID of slots 1..
    frontends: BTreeMap<FeKey, (Lb4Service, Vec<u32>)>,
    maglev: Vec<u32>,
    /// Backends this service uses (active and terminating).
    backends: BTreeSet<u32>,
    /// loadBalancerSourceRanges: (LPM prefix length, address).
    src_ranges: BTreeSet<(u32, u32)>,
}

impl LbWritten {
    fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.maglev.is_empty() && self.backends.is_empty() && self.src_ranges.is_empty()
    }
}

fn l4(field: &str, s: &str) -> Result<L4, DaemonError> {
    match L4::parse(s) {
        Some(L4::Sctp) => Err(invalid(field, s, "SCTP services are not supported by the datapath yet")),
        Some(p) => Ok(p),
        None => Err(invalid(field, s, "want TCP or UDP")),
    }
}

fn ipv4(field: &str, s: &str) -> Result<Ipv4Addr, DaemonError> {
    s.parse().map_err(|_| invalid(field, s, "not an IPv4 address"))
}

fn ip_port(field: &str, s: &str) -> Result<(Ipv4Addr, u16), DaemonError> {
    let (ip, port) = s.rsplit_once(':').ok_or_else(|| invalid(field, s, "want IP:PORT"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| invalid(field, s, "not an IPv4 address and port"))?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| invalid(field, s, "port must be 1-65535"))?;
    Ok((ip, port))
}

/// The services a Kubernetes Service stands for: per service port, the
/// frontends its type gives it (ClusterIP; NodePort on every node address;
/// LoadBalancer ingress IPs; externalIPs) and the endpoints serving that
/// port's name. Frontends whose backends differ (a Local traffic policy keeps
/// only this node's endpoints) or that admit only some clients
/// (loadBalancerSourceRanges, LoadBalancer IPs only) become separate
/// services, named after the port with `/external` or `/loadbalancer`.
/// Headless and ExternalName services have none. Pure: every field of the
/// input is checked and a bad one is named.
pub fn k8s_services(k: &K8sService, node_name: &str, node_ips: &[Ipv4Addr], default_algorithm: Algorithm) -> Result<Vec<Service>, DaemonError> {
    if k.namespace.is_empty() || k.name.is_empty() {
        return Err(invalid("metadata.name", format!("{}/{}", k.namespace, k.name), "namespace and name are required"));
    }
    let (node_port, load_balancer) = match k.service_type.as_str() {
        "ClusterIP" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        "ExternalName" => return Ok(vec![]),
        other => return Err(invalid("spec.type", other, "want ClusterIP, NodePort, LoadBalancer or ExternalName")),
    };
    let cluster_ip = match k.cluster_ip.as_deref() {
        Some("None") => return Ok(vec![]),
        None | Some("") => None,
        Some(s) => Some(ipv4("spec.clusterIP", s)?),
    };
    let external_ips: Vec<Ipv4Addr> =
        k.external_ips.iter().enumerate().map(|(i, s)| ipv4(&format!("spec.externalIPs[{i}]"), s)).collect::<Result<_, _>>()?;
    let lb_ips: Vec<Ipv4Addr> = k
        .load_balancer_ips
        .iter()
        .enumerate()
        .map(|(i, s)| ipv4(&format!("status.loadBalancer.ingress[{i}].ip"), s))
        .collect::<Result<_, _>>()?;
    let algorithm = match k.annotations.get(ALGORITHM_ANNOTATION) {
        None => default_algorithm,
        Some(v) => Algorithm::parse(v).ok_or_else(|| invalid(&format!("metadata.annotations.{ALGORITHM_ANNOTATION}"), v, "want random or maglev"))?,
    };
    let affinity_timeout = match k.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = k.session_affinity_timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            if !(1..=86_400).contains(&t) {
                return Err(invalid("spec.sessionAffinityConfig.clientIP.timeoutSeconds", t, "must be 1-86400"));
            }
            Some(t)
        }
        Some(other) => return Err(invalid("spec.sessionAffinity", other, "want ClientIP or None")),
    };
    let local_only = |field: &str, v: &Option<String>| -> Result<bool, DaemonError> {
        match v.as_deref() {
            None | Some("Cluster") => Ok(false),
            Some("Local") => Ok(true),
            Some(other) => Err(invalid(field, other, "want Cluster or Local")),
        }
    };
    let etp_local = local_only("spec.externalTrafficPolicy", &k.external_traffic_policy)?;
    let itp_local = local_only("spec.internalTrafficPolicy", &k.internal_traffic_policy)?;
    let source_ranges: Vec<(Ipv4Addr, u8)> = k
        .load_balancer_source_ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.parse::<ipnet::Ipv4Net>()
                .map(|n| (n.trunc().network(), n.prefix_len()))
                .map_err(|_| invalid(&format!("spec.loadBalancerSourceRanges[{i}]"), r, "want an IPv4 CIDR"))
        })
        .collect::<Result<_, _>>()?;
    let mut endpoints = Vec::new();
    for (i, e) in k.endpoints.iter().enumerate() {
        let ip = ipv4(&format!("endpoints[{i}].ip"), &e.ip)?;
        let local = e.node_name.as_deref() == Some(node_name);
        for (j, p) in e.ports.iter().enumerate() {
            let proto = l4(&format!("endpoints[{i}].ports[{j}].protocol"), &p.protocol)?;
            if p.port == 0 {
                return Err(invalid(&format!("endpoints[{i}].ports[{j}].port"), 0, "must be 1-65535"));
            }
            endpoints.push((ip, p.name.as_deref(), proto, p.port, e.terminating, local));
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in k.ports.iter().enumerate() {
        let protocol = l4(&format!("spec.ports[{i}].protocol"), &p.protocol)?;
        if p.port == 0 {
            return Err(invalid(&format!("spec.ports[{i}].port"), 0, "must be 1-65535"));
        }
        if !seen.insert((p.port, protocol)) {
            return Err(invalid(&format!("spec.ports[{i}].port"), p.port, "duplicate port and protocol"));
        }
        let fe = |ip: Ipv4Addr, port: u16, kind: FrontendKind| Frontend { ip, port, protocol, kind };
        let internal: Vec<Frontend> = cluster_ip.iter().map(|ip| fe(*ip, p.port, FrontendKind::ClusterIp)).collect();
        let mut external: Vec<Frontend> = Vec::new();
        if node_port {
            let np = p.node_port.filter(|n| *n != 0).ok_or_else(|| invalid(&format!("spec.ports[{i}].nodePort"), "", "required for NodePort and LoadBalancer services"))?;
            external.extend(node_ips.iter().map(|ip| fe(*ip, np, FrontendKind::NodePort)));
        }
        external.extend(external_ips.iter().map(|ip| fe(*ip, p.port, FrontendKind::ExternalIp)));
        let balancers: Vec<Frontend> = if load_balancer { lb_ips.iter().map(|ip| fe(*ip, p.port, FrontendKind::LoadBalancer)).collect() } else { vec![] };
        let backends = |local_only: bool| -> Vec<Backend> {
            let mut v: Vec<Backend> = Vec::new();
            for (ip, name, proto, port, terminating, local) in &endpoints {
                if *name == p.name.as_deref() && *proto == protocol && (!local_only || *local) && !v.iter().any(|b| b.ip == *ip && b.port == *port) {
                    let state = if *terminating { BackendState::Terminating } else { BackendState::Active };
                    v.push(Backend { ip: *ip, port: *port, state });
                }
            }
            v
        };
        // frontends sharing backends and source ranges make one service;
        // the Local traffic policies and source ranges split them
        let base = format!("{}/{}:{}/{}", k.namespace, k.name, p.port, protocol.name());
        let mut groups: Vec<(String, Vec<Frontend>, Vec<Backend>, Vec<(Ipv4Addr, u8)>)> = vec![(base.clone(), internal, backends(itp_local), vec![])];
        for (suffix, fes, ranges) in [("external", external, vec![]), ("loadbalancer", balancers, source_ranges.clone())] {
            if fes.is_empty() {
                continue;
            }
            let b = backends(etp_local);
            match groups.iter_mut().find(|g| g.2 == b && g.3 == ranges) {
                Some(g) => g.1.extend(fes),
                None => groups.push((format!("{base}/{suffix}"), fes, b, ranges)),
            }
        }
        for (name, frontends, backends, source_ranges) in groups {
            if frontends.is_empty() {
                continue;
            }
            out.push(Service { name, frontends, backends, algorithm, affinity_timeout, source_ranges });
        }
    }
    Ok(out)
}

impl<D: Datapath> Daemon<D> {
    /// Services as saved (before `restore` or `reconcile_datapath`).
    pub fn set_services(&mut self, saved: ServiceState) {
        self.services = saved.services;
        self.k8s_services = saved.k8s_services;
    }

    /// The services to save, if they changed since last asked. Services are
    /// saved behind the change, off the request path (see [`ServiceState`]).
    pub fn services_snapshot(&mut self) -> Option<ServiceState> {
        if !std::mem::take(&mut self.services_dirty) {
            return None;
        }
        Some(ServiceState { version: STATE_VERSION, services: self.services.clone(), k8s_services: self.k8s_services.clone() })
    }

    /// Marks the services for saving again (after a failed write).
    pub fn services_unsaved(&mut self) {
        self.services_dirty = true;
        self.changed();
    }

    /// After a Service change: when `toServices` rules select something
    /// else now, every endpoint's policy is recomputed.
    fn services_to_policy(&mut self) -> Result<(), DaemonError> {
        if self.refresh_repo_services() {
            self.sync_cidr_identities()?;
            self.regenerate_all();
            self.sync_ipcache()?;
            self.dp.bump_policy_revision()?;
            self.save()?;
        }
        Ok(())
    }

    /// Gives the policy repository the Services its `toServices` rules
    /// resolve against (only when it has such rules: at 10,000 Services this
    /// costs milliseconds). Returns whether the resolved rules changed.
    pub(super) fn refresh_repo_services(&mut self) -> bool {
        if !self.repo.references_services() {
            return false;
        }
        let infos: BTreeMap<(String, String), cilium_policy::rule::ServiceInfo> = self
            .k8s_services
            .values()
            .map(|k| {
                let endpoints = k.endpoints.iter().filter_map(|e| e.ip.parse::<std::net::IpAddr>().ok()).collect();
                ((k.namespace.clone(), k.name.clone()), cilium_policy::rule::ServiceInfo { labels: k.labels.clone(), selector: k.selector.clone(), endpoints })
            })
            .collect();
        self.repo.set_services(infos)
    }

    /// Stores a Kubernetes Service's services in the table (not yet the
    /// maps). Returns their IDs and every ID whose entries must be synced.
    fn upsert_k8s(&mut self, k: K8sService) -> Result<(Vec<u16>, Vec<u16>), DaemonError> {
        let wanted = k8s_services(&k, &self.cfg.node_name, &self.node_ips, self.cfg.lb_algorithm)?;
        let key = format!("{}/{}", k.namespace, k.name);
        let old_ids = self.k8s_service_ids(&key);
        if self.k8s_services.get(&key) == Some(&k) && old_ids.len() == wanted.len() {
            return Ok((old_ids, vec![]));
        }
        self.check_services(&wanted, &old_ids)?;
        let names: BTreeSet<&str> = wanted.iter().map(|s| s.name.as_str()).collect();
        let mut touched = Vec::new();
        for id in &old_ids {
            if self.services.get(*id).is_some_and(|s| !names.contains(s.name.as_str())) {
                self.services.remove(*id)?;
                touched.push(*id);
            }
        }
        let mut ids = Vec::new();
        for svc in wanted {
            let id = self.services.upsert(svc, None)?;
            ids.push(id);
            touched.push(id);
        }
        self.k8s_services.insert(key, k);
        Ok((ids, touched))
    }

    /// Syncs the maps for Kubernetes Services just stored; on failure they
    /// are not recorded as applied, so the same Services again retry.
    fn sync_k8s(&mut self, keys: &[String], touched: &[u16]) -> Result<(), DaemonError> {
        let r = self.sync_services(touched, vec![]);
        if r.is_err() {
            for k in keys {
                self.k8s_services.remove(k);
            }
        }
        r
    }

    /// Adds or replaces a Kubernetes Service: all its ports or none.
    pub fn k8s_service_upsert(&mut self, k: K8sService) -> Result<Vec<u16>, DaemonError> {
        self.services_dirty = true;
        self.changed();
        let key = format!("{}/{}", k.namespace, k.name);
        let (ids, touched) = self.upsert_k8s(k)?;
        self.sync_k8s(&[key], &touched)?;
        self.services_to_policy()?;
        Ok(ids)
    }

    /// The Kubernetes Services, all of them (a watcher's re-list): each is
    /// applied whole or rejected whole, and those not listed are removed;
    /// the maps are written in one batch. Returns the rejected ones with
    /// their errors.
    pub fn k8s_services_sync(&mut self, list: Vec<K8sService>) -> Result<Vec<(String, DaemonError)>, DaemonError> {
        self.services_dirty = true;
        self.changed();
        let listed: BTreeSet<String> = list.iter().map(|k| format!("{}/{}", k.namespace, k.name)).collect();
        let gone: Vec<String> = self.k8s_services.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        let mut touched = Vec::new();
        for key in gone {
            touched.extend(self.remove_k8s(&key)?);
        }
        let mut rejected = Vec::new();
        let mut applied = Vec::new();
        for k in list {
            let key = format!("{}/{}", k.namespace, k.name);
            match self.upsert_k8s(k) {
                Ok((_, t)) => {
                    if !t.is_empty() {
                        applied.push(key);
                    }
                    touched.extend(t);
                }
                Err(e @ (DaemonError::Invalid { .. } | DaemonError::Service(_))) => rejected.push((key, e)),
                Err(e) => return Err(e),
            }
        }
        self.sync_k8s(&applied, &touched)?;
        self.services_to_policy()?;
        Ok(rejected)
    }

    /// Removes a Kubernetes Service. Returns whether it existed.
    pub fn k8s_service_delete(&mut self, namespace: &str, name: &str) -> Result<bool, DaemonError> {
        self.services_dirty = true;
        self.changed();
        let key = format!("{namespace}/{name}");
        let existed = self.k8s_services.contains_key(&key);
        let touched = self.remove_k8s(&key)?;
        self.sync_services(&touched, vec![])?;
        self.services_to_policy()?;
        Ok(existed || !touched.is_empty())
    }

    /// Removes a Kubernetes Service from the table; returns the IDs to sync.
    fn remove_k8s(&mut self, key: &str) -> Result<Vec<u16>, DaemonError> {
        self.k8s_services.remove(key);
        let ids = self.k8s_service_ids(key);
        for id in &ids {
            self.services.remove(*id)?;
        }
        Ok(ids)
    }

    /// IDs of the services made from the Kubernetes Service `ns/name`.
    fn k8s_service_ids(&self, key: &str) -> Vec<u16> {
        self.services.ids_with_prefix(&format!("{key}:"))
    }

    /// Checks a set of services before any is stored: frontends free (or
    /// held by `replacing`) and room in the Maglev map.
    fn check_services(&self, wanted: &[Service], replacing: &[u16]) -> Result<(), DaemonError> {
        // two ports of one Service on the same frontend (the same nodePort
        // twice, say): refused before any of them is stored
        let mut seen = BTreeSet::new();
        for f in wanted.iter().flat_map(|s| &s.frontends) {
            if !seen.insert(f.to_string()) {
                return Err(cilium_lb::ServiceError::FrontendTaken { frontend: f.to_string(), owner: "another port of the same service".into() }.into());
            }
        }
        for s in wanted {
            let id = self.services.id_of(&s.name).filter(|_| !s.name.is_empty());
            self.services.check(s, id, replacing)?;
        }
        let add = wanted.iter().filter(|s| s.algorithm == Algorithm::Maglev).count() as u32;
        if add == 0 {
            return Ok(());
        }
        let m = self.cfg.maglev_size.max(1);
        let keep = self
            .services
            .iter()
            .filter(|(id, s)| s.algorithm == Algorithm::Maglev && !replacing.contains(id) && !wanted.iter().any(|w| !w.name.is_empty() && w.name == s.name))
            .count() as u32;
        if (keep + add) * m > MAGLEV_MAP_MAX {
            return Err(invalid(
                ALGORITHM_ANNOTATION,
                "maglev",
                format!("the Maglev map holds {} tables of {m} slots; lower --bpf-lb-maglev-table-size or use random", MAGLEV_MAP_MAX / m),
            ));
        }
        Ok(())
    }

    /// `cilium service update`: creates or replaces the service with one
    /// frontend. Returns its ID.
    pub fn service_update(&mut self, req: &ServiceUpdate) -> Result<u16, DaemonError> {
        let (ip, port) = ip_port("frontend", &req.frontend)?;
        let protocol = l4("protocol", &req.protocol)?;
        let backends = req
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| ip_port(&format!("backends[{i}]"), b).map(|(ip, port)| Backend { ip, port, state: BackendState::Active }))
            .collect::<Result<Vec<_>, _>>()?;
        let algorithm = match &req.algorithm {
            None => self.cfg.lb_algorithm,
            Some(a) => Algorithm::parse(a).ok_or_else(|| invalid("algorithm", a, "want random or maglev"))?,
        };
        if req.id == Some(0) {
            return Err(invalid("id", 0, "service IDs start at 1"));
        }
        let kind = if self.node_ips.contains(&ip) { FrontendKind::NodePort } else { FrontendKind::ClusterIp };
        let svc = Service {
            name: String::new(),
            frontends: vec![Frontend { ip, port, protocol, kind }],
            backends,
            algorithm,
            affinity_timeout: None,
            source_ranges: vec![],
        };
        self.check_services(std::slice::from_ref(&svc), &req.id.into_iter().collect::<Vec<_>>())?;
        let id = self.services.upsert(svc, req.id)?;
        self.services_dirty = true;
        self.changed();
        self.sync_services(&[id], vec![])?;
        Ok(id)
    }

    /// `cilium service delete`.
    pub fn service_delete(&mut self, id: u16) -> Result<(), DaemonError> {
        self.services.remove(id)?;
        self.services_dirty = true;
        self.changed();
        self.sync_services(&[id], vec![])
    }

    pub fn service_list(&self) -> Vec<ServiceView> {
        self.services
            .iter()
            .map(|(id, s)| ServiceView {
                id,
                name: s.name.clone(),
                frontends: s.frontends.iter().map(|f| FrontendView { address: f.to_string(), kind: f.kind.name().to_string() }).collect(),
                backends: s
                    .backends
                    .iter()
                    .flat_map(|b| {
                        s.frontends.iter().map(|f| f.protocol).collect::<BTreeSet<_>>().into_iter().map(move |p| (b, p))
                    })
                    .map(|(b, p)| BackendView {
                        id: self.services.backend_id(b.ip, b.port, p).unwrap_or(0),
                        address: format!("{}:{}/{}", b.ip, b.port, p.name()),
                        state: match b.state {
                            BackendState::Active => "active",
                            BackendState::Terminating => "terminating",
                        }
                        .to_string(),
                    })
                    .collect(),
                algorithm: s.algorithm.name().to_string(),
                affinity_timeout: s.affinity_timeout,
            })
            .collect()
    }

    /// The service maps as they are (`cilium bpf lb list`).
    pub fn lb_map_view(&self, maglev: bool) -> Result<LbMapView, DaemonError> {
        let dump = self.dp.lb_dump()?;
        let backends: BTreeMap<u32, Lb4Backend> = dump.backends.into_iter().collect();
        let mut by_fe: BTreeMap<FeKey, (Option<Lb4Service>, BTreeMap<u16, u32>)> = BTreeMap::new();
        for (k, v) in dump.services {
            let e = by_fe.entry((k.address, k.dport, k.proto)).or_default();
            if k.backend_slot == 0 {
                e.0 = Some(v);
            } else {
                e.1.insert(k.backend_slot, v.backend_id);
            }
        }
        let services = by_fe
            .into_iter()
            .map(|((addr, port, proto), (master, slots))| {
                let master = master.unwrap_or_default();
                let mut flags = Vec::new();
                if master.flags & LbFlag::Affinity as u8 != 0 {
                    flags.push(format!("affinity={}s", master.affinity_timeout));
                }
                if master.flags & LbFlag::Maglev as u8 != 0 {
                    flags.push("maglev".to_string());
                }
                LbServiceEntry {
                    frontend: format!("{}:{}/{}", be_to_ip(addr), u16::from_be(port), proto_name(proto)),
                    service_id: master.rev_nat_index,
                    count: master.count,
                    flags,
                    slots: slots
                        .values()
                        .map(|id| (*id, backends.get(id).map(|b| format!("{}:{}", be_to_ip(b.address), u16::from_be(b.port))).unwrap_or_default()))
                        .collect(),
                }
            })
            .collect();
        let mut tables: BTreeMap<u16, Vec<(u32, u32)>> = BTreeMap::new();
        if maglev {
            for (k, b) in dump.maglev {
                tables.entry(k.rev_nat_index).or_default().push((k.slot, b));
            }
        }
        let maglev = tables
            .into_iter()
            .map(|(id, mut slots)| {
                slots.sort();
                (id, slots.into_iter().map(|(_, b)| b).collect())
            })
            .collect();
        Ok(LbMapView { services, maglev })
    }

    /// What the maps must hold for service `id` (nothing once it is gone),
    /// and the backends it needs.
    fn desired_service(&self, id: u16) -> (LbWritten, BTreeMap<u32, Lb4Backend>) {
        let mut out = LbWritten::default();
        let mut backends = BTreeMap::new();
        let Some(s) = self.services.get(id) else { return (out, backends) };
        let mut flags = 0u8;
        if s.affinity_timeout.is_some() {
            flags |= LbFlag::Affinity as u8;
        }
        if s.algorithm == Algorithm::Maglev {
            flags |= LbFlag::Maglev as u8;
        }
        if !s.source_ranges.is_empty() {
            flags |= LbFlag::SourceRange as u8;
        }
        out.src_ranges = s.source_ranges.iter().map(|(ip, len)| (32 + *len as u32, ip_to_be(*ip))).collect();
        let protocols: BTreeSet<L4> = s.frontends.iter().map(|f| f.protocol).collect();
        let mut active: BTreeMap<L4, Vec<(u32, &Backend)>> = BTreeMap::new();
        for p in &protocols {
            for b in &s.backends {
                let Some(bid) = self.services.backend_id(b.ip, b.port, *p) else { continue };
                let terminating = b.state == BackendState::Terminating;
                backends.insert(
                    bid,
                    Lb4Backend {
                        address: ip_to_be(b.ip),
                        port: b.port.to_be(),
                        proto: p.number(),
                        flags: if terminating { LbBackendFlag::Terminating as u8 } else { 0 },
                    },
                );
                if !terminating {
                    active.entry(*p).or_default().push((bid, b));
                }
            }
        }
        for f in &s.frontends {
            let slots: Vec<u32> = active.get(&f.protocol).map(|v| v.iter().map(|(id, _)| *id).collect()).unwrap_or_default();
            let master = Lb4Service {
                count: slots.len() as u16,
                rev_nat_index: id,
                affinity_timeout: s.affinity_timeout.unwrap_or(0),
                flags,
                ..Default::default()
            };
            out.frontends.insert((ip_to_be(f.ip), f.port.to_be(), f.protocol.number()), (master, slots));
        }
        // one Maglev table per service: its frontends share one protocol
        // unless made through the API, which makes one frontend
        if s.algorithm == Algorithm::Maglev {
            if let Some(list) = s.frontends.first().and_then(|f| active.get(&f.protocol)) {
                let named: Vec<(u32, String)> = list.iter().map(|(id, b)| (*id, format!("{}:{}", b.ip, b.port))).collect();
                out.maglev = cilium_lb::maglev::table(&named, self.cfg.maglev_size);
            }
        }
        out.backends = backends.keys().copied().collect();
        (out, backends)
    }

    /// Makes the maps hold what the services `ids` need, writing only what
    /// differs from what was written, all in one batch of ordered phases
    /// (see the module comment). `backend_candidates` are backends to drop
    /// if no service uses them, besides those these services stopped using.
    /// The one place service entries change.
    pub(super) fn sync_services(&mut self, ids: &[u16], backend_candidates: Vec<u32>) -> Result<(), DaemonError> {
        let mut plan: Vec<(Phase, LbOp)> = Vec::new();
        let mut planned: BTreeMap<u32, Lb4Backend> = BTreeMap::new();
        let mut results: Vec<(u16, LbWritten)> = Vec::new();
        let mut candidates: BTreeSet<u32> = backend_candidates.into_iter().collect();
        // keys some service of the batch wants: never deleted by another
        // (a frontend moving between services in one change)
        let mut wanted: BTreeSet<(FeKey, u16)> = BTreeSet::new();
        let mut olds: Vec<(u16, LbWritten)> = Vec::new();
        let unique: BTreeSet<u16> = ids.iter().copied().collect();
        for id in unique {
            let old = self.lb_written.remove(&id).unwrap_or_default();
            let (new, backends) = self.desired_service(id);
            for (bid, b) in &backends {
                if self.lb_backends_written.get(bid) != Some(b) && planned.get(bid) != Some(b) {
                    plan.push((Phase::BackendSet, LbOp::BackendSet(*bid, *b)));
                    planned.insert(*bid, *b);
                }
            }
            for (fe, (_, slots)) in &new.frontends {
                wanted.extend((0..=slots.len() as u16).map(|slot| (*fe, slot)));
            }
            candidates.extend(old.backends.difference(&new.backends));
            results.push((id, new));
            olds.push((id, old));
        }
        for ((id, old), (_, new)) in olds.iter().zip(&results) {
            plan_service(*id, old, new, &wanted, &mut plan);
        }
        for bid in candidates {
            let Some(b) = self.lb_backends_written.get(&bid).copied() else { continue };
            let used = L4::parse(proto_name(b.proto)).and_then(|p| self.services.backend_id(be_to_ip(b.address), u16::from_be(b.port), p)) == Some(bid);
            if !used {
                plan.push((Phase::BackendDel, LbOp::BackendDel(bid)));
            }
        }
        plan.sort_by_key(|(phase, _)| *phase);
        let ops: Vec<LbOp> = plan.into_iter().map(|(_, op)| op).collect();
        if let Err(e) = self.dp.lb_apply(&ops) {
            // a prefix was applied: only the maps know what they hold now
            if let Err(reload) = self.load_lb_written() {
                error!(error = %reload, "reading the service maps back after a failed write");
            }
            return Err(e.into());
        }
        for (id, w) in results {
            if !w.is_empty() {
                self.lb_written.insert(id, w);
            }
        }
        for op in &ops {
            match op {
                LbOp::BackendSet(id, b) => {
                    self.lb_backends_written.insert(*id, *b);
                }
                LbOp::BackendDel(id) => {
                    self.lb_backends_written.remove(id);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// What the service maps hold, as written state.
    fn load_lb_written(&mut self) -> Result<(), DaemonError> {
        let dump = self.dp.lb_dump()?;
        self.lb_written.clear();
        self.lb_backends_written = dump.backends.into_iter().collect();
        for (k, v) in dump.services {
            let w = self.lb_written.entry(v.rev_nat_index).or_default();
            let e = w.frontends.entry((k.address, k.dport, k.proto)).or_insert_with(|| (Lb4Service::default(), vec![]));
            if k.backend_slot == 0 {
                e.0 = v;
            } else {
                set_at(&mut e.1, k.backend_slot as usize - 1, v.backend_id);
            }
        }
        let mut maglev: Vec<(LbMaglevKey, u32)> = dump.maglev;
        maglev.sort_by_key(|(k, _)| (k.rev_nat_index, k.slot));
        for (k, b) in maglev {
            set_at(&mut self.lb_written.entry(k.rev_nat_index).or_default().maglev, k.slot as usize, b);
        }
        for k in dump.source_ranges {
            self.lb_written.entry(k.rev_nat_index).or_default().src_ranges.insert((k.prefixlen, k.addr));
        }
        // holes (a crash mid-write) read as backend 0, which no slot wants,
        // so they are rewritten
        Ok(())
    }

    /// Reads what the service maps hold and makes them match the table:
    /// start-up and restore. Entries of unknown services and backends go.
    pub(super) fn reconcile_services(&mut self) -> Result<(), DaemonError> {
        self.load_lb_written()?;
        let ids: Vec<u16> = self.lb_written.keys().copied().chain(self.services.iter().map(|(id, _)| id)).collect();
        let all: Vec<u32> = self.lb_backends_written.keys().copied().collect();
        self.sync_services(&ids, all)
    }
}

/// Write phases: every lookup the datapath makes stays valid between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    BackendSet,
    SrcRangeSet,
    MaglevSet,
    SlotSet,
    ServiceSet,
    ServiceDel,
    SlotDel,
    MaglevDel,
    SrcRangeDel,
    BackendDel,
}

/// The writes that turn service `id` from `old` into `new`, by phase.
/// Keys in `wanted` belong to a service of the batch and are not deleted.
fn plan_service(id: u16, old: &LbWritten, new: &LbWritten, wanted: &BTreeSet<(FeKey, u16)>, plan: &mut Vec<(Phase, LbOp)>) {
    for (len, addr) in new.src_ranges.difference(&old.src_ranges) {
        plan.push((Phase::SrcRangeSet, LbOp::SrcRangeSet(src_range_key(id, *len, *addr))));
    }
    for (slot, bid) in new.maglev.iter().enumerate() {
        if old.maglev.get(slot) != Some(bid) {
            plan.push((Phase::MaglevSet, LbOp::MaglevSet(LbMaglevKey { rev_nat_index: id, pad: 0, slot: slot as u32 }, *bid)));
        }
    }
    let del = |phase: Phase, fe: FeKey, slot: u16, plan: &mut Vec<(Phase, LbOp)>| {
        if !wanted.contains(&(fe, slot)) {
            plan.push((phase, LbOp::ServiceDel(lb_key(fe, slot))));
        }
    };
    for (fe, (master, slots)) in &new.frontends {
        let prev = old.frontends.get(fe);
        for (i, bid) in slots.iter().enumerate() {
            if prev.and_then(|p| p.1.get(i)) != Some(bid) {
                let v = Lb4Service { backend_id: *bid, rev_nat_index: id, ..Default::default() };
                plan.push((Phase::SlotSet, LbOp::ServiceSet(lb_key(*fe, i as u16 + 1), v)));
            }
        }
        if prev.map(|p| &p.0) != Some(master) {
            plan.push((Phase::ServiceSet, LbOp::ServiceSet(lb_key(*fe, 0), *master)));
        }
        for i in slots.len()..prev.map(|p| p.1.len()).unwrap_or(0) {
            del(Phase::SlotDel, *fe, i as u16 + 1, plan);
        }
    }
    for (fe, (_, slots)) in &old.frontends {
        if new.frontends.contains_key(fe) {
            continue;
        }
        del(Phase::ServiceDel, *fe, 0, plan);
        for i in 0..slots.len() {
            del(Phase::SlotDel, *fe, i as u16 + 1, plan);
        }
    }
    for slot in new.maglev.len()..old.maglev.len() {
        plan.push((Phase::MaglevDel, LbOp::MaglevDel(LbMaglevKey { rev_nat_index: id, pad: 0, slot: slot as u32 })));
    }
    for (len, addr) in old.src_ranges.difference(&new.src_ranges) {
        plan.push((Phase::SrcRangeDel, LbOp::SrcRangeDel(src_range_key(id, *len, *addr))));
    }
}

fn set_at(v: &mut Vec<u32>, i: usize, value: u32) {
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] = value;
}

fn src_range_key(id: u16, prefixlen: u32, addr: u32) -> Lb4SrcRangeKey {
    Lb4SrcRangeKey { prefixlen, rev_nat_index: id, pad: 0, addr }
}

fn lb_key(fe: FeKey, slot: u16) -> Lb4Key {
    Lb4Key { address: fe.0, dport: fe.1, backend_slot: slot, proto: fe.2, ..Default::default() }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "ANY",
    }
}
