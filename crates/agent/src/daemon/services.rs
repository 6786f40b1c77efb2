//! Services: Kubernetes Services (with their endpoints) and services made
//! through the API become one [`ServiceTable`], and the table becomes the
//! service maps one service at a time: a change writes only the entries of
//! the service it touches, and a resync (start-up, restore) is a diff against
//! what the maps hold.
//!
//! Write order keeps every lookup valid while a service changes: backends
//! first, then Maglev slots and backend slots, then the service entry (with
//! the new count), then surplus slots, then backends nobody uses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use cilium_abi::{Lb4Backend, Lb4Key, Lb4Service, Lb4SrcRangeKey, LbBackendFlag, LbFlag, LbMaglevKey};
use cilium_api::{BackendView, FrontendView, K8sService, LbMapView, LbServiceEntry, ServiceUpdate, ServiceView};
use cilium_datapath::{Datapath, be_to_ip, ip_to_be};
use cilium_lb::{Algorithm, Backend, BackendState, Frontend, FrontendKind, L4, Service};

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
    }

    /// Adds or replaces a Kubernetes Service: all its ports or none.
    pub fn k8s_service_upsert(&mut self, k: K8sService) -> Result<Vec<u16>, DaemonError> {
        let r = self.upsert_k8s(k);
        self.services_dirty = true;
        self.services_to_policy()?;
        r
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

    fn upsert_k8s(&mut self, k: K8sService) -> Result<Vec<u16>, DaemonError> {
        let wanted = k8s_services(&k, &self.cfg.node_name, &self.node_ips, self.cfg.lb_algorithm)?;
        let key = format!("{}/{}", k.namespace, k.name);
        let old_ids = self.k8s_service_ids(&key);
        self.check_services(&wanted, &old_ids)?;
        if self.k8s_services.get(&key) == Some(&k) && old_ids.len() == wanted.len() {
            return Ok(old_ids);
        }
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
        self.k8s_services.insert(key.clone(), k);
        if let Err(e) = touched.iter().try_for_each(|id| self.sync_service(*id)) {
            // not recorded as applied, so the same Service again retries
            self.k8s_services.remove(&key);
            return Err(e);
        }
        Ok(ids)
    }

    /// The Kubernetes Services, all of them (a watcher's re-list): each is
    /// applied whole or rejected whole, and those not listed are removed.
    /// Returns the rejected ones with their errors.
    pub fn k8s_services_sync(&mut self, list: Vec<K8sService>) -> Result<Vec<(String, DaemonError)>, DaemonError> {
        self.services_dirty = true;
        let listed: BTreeSet<String> = list.iter().map(|k| format!("{}/{}", k.namespace, k.name)).collect();
        let gone: Vec<String> = self.k8s_services.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for key in gone {
            let (ns, name) = key.split_once('/').expect("namespace/name");
            self.remove_k8s(ns, name)?;
        }
        let mut rejected = Vec::new();
        for k in list {
            let key = format!("{}/{}", k.namespace, k.name);
            match self.upsert_k8s(k) {
                Ok(_) => {}
                Err(e @ (DaemonError::Invalid { .. } | DaemonError::Service(_))) => rejected.push((key, e)),
                Err(e) => return Err(e),
            }
        }
        self.services_to_policy()?;
        Ok(rejected)
    }

    /// Removes a Kubernetes Service. Returns whether it existed.
    pub fn k8s_service_delete(&mut self, namespace: &str, name: &str) -> Result<bool, DaemonError> {
        self.services_dirty = true;
        let r = self.remove_k8s(namespace, name);
        self.services_to_policy()?;
        r
    }

    fn remove_k8s(&mut self, namespace: &str, name: &str) -> Result<bool, DaemonError> {
        let key = format!("{namespace}/{name}");
        let existed = self.k8s_services.remove(&key).is_some();
        let ids = self.k8s_service_ids(&key);
        for id in &ids {
            self.services.remove(*id)?;
        }
        ids.iter().try_for_each(|id| self.sync_service(*id))?;
        Ok(existed || !ids.is_empty())
    }

    /// IDs of the services made from the Kubernetes Service `ns/name`.
    fn k8s_service_ids(&self, key: &str) -> Vec<u16> {
        self.services.ids_with_prefix(&format!("{key}:"))
    }

    /// Checks a set of services before any is stored: frontends free (or
    /// held by `replacing`) and room in the Maglev map.
    fn check_services(&self, wanted: &[Service], replacing: &[u16]) -> Result<(), DaemonError> {
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
        self.sync_service(id)?;
        Ok(id)
    }

    /// `cilium service delete`.
    pub fn service_delete(&mut self, id: u16) -> Result<(), DaemonError> {
        self.services.remove(id)?;
        self.services_dirty = true;
        self.sync_service(id)
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
        let mut active: BTreeMap<L4, Vec<(u32, String)>> = BTreeMap::new();
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
                    active.entry(*p).or_default().push((bid, format!("{}:{}", b.ip, b.port)));
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
                out.maglev = cilium_lb::maglev::table(list, self.cfg.maglev_size);
            }
        }
        out.backends = backends.keys().copied().collect();
        (out, backends)
    }

    /// Makes the maps hold what service `id` needs, writing only what differs
    /// from what was written. The one place service entries change.
    pub(super) fn sync_service(&mut self, id: u16) -> Result<(), DaemonError> {
        let old = self.lb_written.remove(&id).unwrap_or_default();
        let (new, backends) = self.desired_service(id);
        let mut cur = old.clone();
        let r = self.write_service(id, &old, &new, &backends, &mut cur);
        if r.is_ok() {
            cur.backends = new.backends.clone();
            self.drop_unused_backends(old.backends.difference(&new.backends).copied().collect())?;
        } else {
            cur.backends = old.backends.union(&new.backends).copied().collect();
        }
        if !cur.is_empty() {
            self.lb_written.insert(id, cur);
        }
        r
    }

    fn write_service(
        &mut self,
        id: u16,
        old: &LbWritten,
        new: &LbWritten,
        backends: &BTreeMap<u32, Lb4Backend>,
        cur: &mut LbWritten,
    ) -> Result<(), DaemonError> {
        for (bid, b) in backends {
            if self.lb_backends_written.get(bid) != Some(b) {
                self.dp.lb_backend_set(*bid, b)?;
                self.lb_backends_written.insert(*bid, *b);
            }
        }
        for (len, addr) in new.src_ranges.difference(&old.src_ranges) {
            self.dp.lb_src_range_set(&src_range_key(id, *len, *addr))?;
            cur.src_ranges.insert((*len, *addr));
        }
        for (slot, bid) in new.maglev.iter().enumerate() {
            if old.maglev.get(slot) != Some(bid) {
                self.dp.lb_maglev_set(&LbMaglevKey { rev_nat_index: id, pad: 0, slot: slot as u32 }, *bid)?;
                set_at(&mut cur.maglev, slot, *bid);
            }
        }
        for (fe, (master, slots)) in &new.frontends {
            let prev = old.frontends.get(fe).cloned();
            let entry = cur.frontends.entry(*fe).or_insert_with(|| (Lb4Service::default(), vec![]));
            for (i, bid) in slots.iter().enumerate() {
                if prev.as_ref().and_then(|p| p.1.get(i)) != Some(bid) {
                    let v = Lb4Service { backend_id: *bid, rev_nat_index: id, ..Default::default() };
                    self.dp.lb_service_set(&lb_key(*fe, i as u16 + 1), &v)?;
                    set_at(&mut entry.1, i, *bid);
                }
            }
            if prev.as_ref().map(|p| &p.0) != Some(master) {
                self.dp.lb_service_set(&lb_key(*fe, 0), master)?;
                entry.0 = *master;
            }
            let had = prev.map(|p| p.1.len()).unwrap_or(0);
            for i in (slots.len()..had).rev() {
                self.dp.lb_service_del(&lb_key(*fe, i as u16 + 1))?;
                entry.1.truncate(i);
            }
        }
        for (fe, (_, slots)) in &old.frontends {
            if new.frontends.contains_key(fe) {
                continue;
            }
            self.dp.lb_service_del(&lb_key(*fe, 0))?;
            for i in (0..slots.len()).rev() {
                self.dp.lb_service_del(&lb_key(*fe, i as u16 + 1))?;
                if let Some(e) = cur.frontends.get_mut(fe) {
                    e.1.truncate(i);
                }
            }
            cur.frontends.remove(fe);
        }
        for slot in (new.maglev.len()..old.maglev.len()).rev() {
            self.dp.lb_maglev_del(&LbMaglevKey { rev_nat_index: id, pad: 0, slot: slot as u32 })?;
            cur.maglev.truncate(slot);
        }
        // ranges go after the service entry stopped asking for them
        for (len, addr) in old.src_ranges.difference(&new.src_ranges) {
            self.dp.lb_src_range_del(&src_range_key(id, *len, *addr))?;
            cur.src_ranges.remove(&(*len, *addr));
        }
        Ok(())
    }

    /// Deletes backend entries no service uses any more.
    fn drop_unused_backends(&mut self, candidates: Vec<u32>) -> Result<(), DaemonError> {
        for bid in candidates {
            let Some(b) = self.lb_backends_written.get(&bid).copied() else { continue };
            let Some(p) = L4::parse(proto_name(b.proto)) else { continue };
            if self.services.backend_id(be_to_ip(b.address), u16::from_be(b.port), p) != Some(bid) {
                self.dp.lb_backend_del(bid)?;
                self.lb_backends_written.remove(&bid);
            }
        }
        Ok(())
    }

    /// Reads what the service maps hold and makes them match the table:
    /// start-up and restore. Entries of unknown services and backends go.
    pub(super) fn reconcile_services(&mut self) -> Result<(), DaemonError> {
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
        let ids: BTreeSet<u16> = self.lb_written.keys().copied().chain(self.services.iter().map(|(id, _)| id)).collect();
        for id in ids {
            self.sync_service(id)?;
        }
        let all: Vec<u32> = self.lb_backends_written.keys().copied().collect();
        self.drop_unused_backends(all)
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
