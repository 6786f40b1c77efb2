//! The agent's core: endpoints, identities, IPAM, policies and pods, and how
//! they become datapath state. Synchronous and generic over the datapath, so
//! it runs against [`cilium_datapath::fake::FakeDatapath`] in tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use cilium_abi::{
    EndpointFlag, EndpointInfo, HOST_ENDPOINT_ID, HOST_ENDPOINT_IFINDEX, IpcacheValue, POLICY_KEY_DIR_EGRESS, POLICY_KEY_GEN,
    PolicyEntry, PolicyKey, ReservedIdentity,
};
use cilium_api::{EndpointCreate, NamespaceMeta, PodMeta};
use cilium_datapath::{Datapath, DatapathError, ip_to_be};
use cilium_identity::{Allocator, IdentityError};
use cilium_ipam::{Ipam, Ipam6, IpamError};
use cilium_labels::{LabelSet, k8s_pod_labels};
use cilium_policy::{
    EndpointPolicy, Input, MapKey, NamedPorts, PolicyDocument, PolicyError, PolicyOptions, PolicyRef, Protocol,
    Repository, compute, parse_policies, parse_value,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::{error, info, warn};

use crate::state::{EndpointRecord, STATE_VERSION, ServiceState, State, StateError, StateStore};

pub mod cluster;
pub mod fqdn;
pub mod hubble;
pub mod proxy;
pub mod services;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{field}: {message} (got {value:?})")]
    Invalid { field: String, value: String, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("saving state: {0}")]
    State(#[from] StateError),
    #[error(transparent)]
    Service(#[from] cilium_lb::ServiceError),
}

/// The one-address prefix of an address (/32 or /128).
fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn invalid(field: &str, value: impl ToString, message: impl Into<String>) -> DaemonError {
    DaemonError::Invalid { field: field.to_string(), value: value.to_string(), message: message.into() }
}

/// What the daemon needs from the configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    /// The node's IPv6 pod CIDR: pods get IPv6 addresses too (--enable-ipv6).
    pub pod_cidr6: Option<Ipv6Net>,
    /// The node network's MTU (pods get less in tunnel mode: `pod_mtu`).
    pub mtu: u32,
    pub routing_mode: cilium_api::RoutingMode,
    pub policy: PolicyOptions,
    pub audit_mode: bool,
    /// Pods may use IP protocols without ports beyond ICMP (VRRP, GRE, …).
    pub extended_ip_protocols: bool,
    /// Other nodes get identities of their own from their labels, for
    /// fromNodes/toNodes (otherwise all are remote-node).
    pub node_selector_labels: bool,
    /// Host policies (CCNP nodeSelector) are enforced on the node's own
    /// traffic, through the host endpoint.
    pub host_firewall: bool,
    /// Default backend selection of services.
    pub lb_algorithm: cilium_lb::Algorithm,
    /// Slots of each Maglev table.
    pub maglev_size: u32,
    /// Seconds a learned DNS address is allowed at least.
    pub fqdn_min_ttl: u32,
    /// Addresses kept per DNS name.
    pub fqdn_max_ips: usize,
}

impl DaemonConfig {
    /// Pods' MTU: the network's, less the tunnel's headers in tunnel mode.
    pub fn pod_mtu(&self) -> u32 {
        match self.routing_mode {
            cilium_api::RoutingMode::Native => self.mtu,
            cilium_api::RoutingMode::Tunnel => self.mtu - cilium_api::RoutingMode::VXLAN_OVERHEAD,
        }
    }
}

/// Policy as written to the datapath for one endpoint.
#[derive(Debug, Clone)]
struct Realized {
    policy: EndpointPolicy,
    generation: bool,
    keys: Vec<PolicyKey>,
    flags: u16,
}

/// An endpoint's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpState {
    Ready,
    /// Its policy could not be written; it denies everything until it can.
    PolicyError,
}

#[derive(Debug, Clone)]
struct Endpoint {
    rec: EndpointRecord,
    realized: Option<Realized>,
    state: EpState,
    error: Option<String>,
    /// Policy keys found in the map at restore, not yet owned by a generation.
    stale: Vec<PolicyKey>,
}

/// The agent's core state.
pub struct Daemon<D: Datapath> {
    cfg: DaemonConfig,
    dp: D,
    store: Option<StateStore>,
    ipam: Ipam,
    ipam6: Option<Ipam6>,
    identities: Allocator,
    endpoints: BTreeMap<u16, Endpoint>,
    /// The host endpoint (--enable-host-firewall): the node itself, under
    /// host policies. Endpoint table key 0, policy entries under
    /// HOST_ENDPOINT_ID; rebuilt from the node's labels at every start.
    host_ep: Option<Endpoint>,
    repo: Repository,
    policy_sources: BTreeMap<PolicyRef, String>,
    pods: BTreeMap<String, PodMeta>,
    namespaces: BTreeMap<String, NamespaceMeta>,
    next_endpoint_id: u16,
    node_ips: Vec<Ipv4Addr>,
    /// The node's own IPv6 addresses (with IPv6 enabled).
    node_ips6: Vec<Ipv6Addr>,
    started: Instant,
    warnings: BTreeMap<String, String>,
    /// Identities of the CIDRs policies name (node-local range).
    cidr_identities: BTreeMap<IpNet, u32>,
    /// Pods of other nodes with an address: their labels and identity.
    remote_endpoints: BTreeMap<IpAddr, (LabelSet, u32)>,
    /// The other nodes of the cluster, by name.
    nodes: BTreeMap<String, cilium_api::NodeMeta>,
    /// In kvstore mode, what the kvstore says of the rest of the cluster.
    kv: Option<cluster::KvView>,
    /// The ipcache as last written.
    ipcache_written: BTreeMap<IpNet, IpcacheValue>,
    /// Tunnel mode: the other nodes' pod CIDRs routed into the tunnel.
    tunnel_routes: BTreeSet<Ipv4Net>,
    /// Every service, from Kubernetes and from the API.
    services: cilium_lb::ServiceTable,
    /// Kubernetes Services as received (`namespace/name`).
    k8s_services: BTreeMap<String, cilium_api::K8sService>,
    /// The service maps as last written, per service ID.
    lb_written: BTreeMap<u16, services::LbWritten>,
    lb_backends_written: BTreeMap<u32, cilium_abi::Lb4Backend>,
    /// Services changed since they were last handed out for saving.
    services_dirty: bool,
    /// Bumped by every change of what Hubble names (endpoints, identities,
    /// pods, services), so its snapshot is rebuilt only when needed.
    changes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// DNS names -> learned addresses -> expiry (Unix seconds).
    fqdn: BTreeMap<String, BTreeMap<IpAddr, u64>>,
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (i, part) in s.split(':').take(6).enumerate() {
        out[i] = u8::from_str_radix(part, 16).unwrap_or(0);
    }
    out
}

/// The datapath key of a computed policy map key.
pub fn datapath_key(ep_id: u16, generation: bool, k: &MapKey) -> PolicyKey {
    PolicyKey {
        prefixlen: k.prefixlen(),
        ep_id,
        gen_dir: if k.egress { POLICY_KEY_DIR_EGRESS } else { 0 } | if generation { POLICY_KEY_GEN } else { 0 },
        pad0: 0,
        identity: k.identity,
        protocol: k.protocol,
        pad1: 0,
        dport: k.port.to_be(),
    }
}

/// The host endpoint's labels: `reserved:host` and the node's security
/// relevant labels (as `k8s:`; `kubernetes.io/...` ones are not, as for
/// pods), which host policies' nodeSelector matches.
pub(crate) fn host_endpoint_labels(node_labels: &BTreeMap<String, String>) -> LabelSet {
    let mut set = LabelSet::new();
    set.insert(cilium_labels::Label::reserved("host"));
    for (k, v) in node_labels.iter().filter(|(k, _)| cilium_labels::is_security_relevant(k)) {
        set.insert(cilium_labels::Label::k8s(k, v));
    }
    set
}

impl<D: Datapath> Daemon<D> {
    /// A daemon with no state. `node_ips` are the node's own addresses.
    pub fn new(cfg: DaemonConfig, dp: D, store: Option<StateStore>, node_ips: Vec<Ipv4Addr>) -> Result<Self, DaemonError> {
        let ipam = Ipam::new(cfg.pod_cidr)?;
        let ipam6 = cfg.pod_cidr6.map(Ipam6::new).transpose()?;
        let host_ep = cfg.host_firewall.then(|| Endpoint {
            rec: EndpointRecord {
                id: HOST_ENDPOINT_ID,
                container_id: String::new(),
                ifname: String::new(),
                netns: String::new(),
                host_ifname: String::new(),
                host_ifindex: HOST_ENDPOINT_IFINDEX,
                ipv4: node_ips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED),
                ipv6: None,
                mac: String::new(),
                host_mac: String::new(),
                namespace: String::new(),
                pod_name: String::new(),
                labels: host_endpoint_labels(&BTreeMap::new()),
                identity: ReservedIdentity::Host.code(),
            },
            realized: None,
            state: EpState::Ready,
            error: None,
            stale: vec![],
        });
        Ok(Daemon {
            cfg,
            dp,
            store,
            ipam,
            ipam6,
            identities: Allocator::new(),
            endpoints: BTreeMap::new(),
            host_ep,
            repo: Repository::new(),
            policy_sources: BTreeMap::new(),
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            next_endpoint_id: 1,
            node_ips,
            node_ips6: Vec::new(),
            started: Instant::now(),
            warnings: BTreeMap::new(),
            cidr_identities: BTreeMap::new(),
            remote_endpoints: BTreeMap::new(),
            nodes: BTreeMap::new(),
            kv: None,
            ipcache_written: BTreeMap::new(),
            tunnel_routes: BTreeSet::new(),
            services: cilium_lb::ServiceTable::new(),
            k8s_services: BTreeMap::new(),
            lb_written: BTreeMap::new(),
            lb_backends_written: BTreeMap::new(),
            services_dirty: false,
            changes: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
            fqdn: BTreeMap::new(),
        })
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.cfg
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn router_ip(&self) -> Ipv4Addr {
        self.ipam.router()
    }

    pub fn node_ips(&self) -> &[Ipv4Addr] {
        &self.node_ips
    }

    /// The node's router address on the IPv6 pod network, with IPv6 enabled.
    pub fn router_ip6(&self) -> Option<Ipv6Addr> {
        self.ipam6.as_ref().map(|i| i.router())
    }

    /// The node's own IPv6 addresses (they are `host` in the ipcache).
    pub fn set_node_ips6(&mut self, ips: Vec<Ipv6Addr>) {
        self.node_ips6 = ips;
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// The IPv6 pool, with IPv6 enabled.
    pub fn ipam6(&self) -> Option<&Ipam6> {
        self.ipam6.as_ref()
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    pub fn identities(&self) -> &Allocator {
        &self.identities
    }

    pub fn warnings(&self) -> Vec<String> {
        self.warnings.values().cloned().collect()
    }

    // ------------------------------------------------------------ state ---

    fn snapshot(&self) -> State {
        State {
            version: STATE_VERSION,
            ipam: self.ipam.clone(),
            ipam6: self.ipam6.clone(),
            endpoints: self.endpoints.iter().map(|(id, e)| (*id, e.rec.clone())).collect(),
            identities: self.identities.iter().filter(|i| i.id >= 256).map(|i| (i.id, i.labels.clone())).collect(),
            policies: self
                .repo
                .documents()
                .map(|d| {
                    let src = self.policy_sources.get(&d.key()).cloned().unwrap_or_default();
                    (src, serde_json::to_value(d).expect("policy serializes"))
                })
                .collect(),
            pods: self.pods.clone(),
            namespaces: self.namespaces.clone(),
            next_endpoint_id: self.next_endpoint_id,
            fqdn: self.fqdn.clone(),
            nodes: self.nodes.clone(),
            kvstore: self.kv.clone(),
        }
    }

    fn save(&self) -> Result<(), DaemonError> {
        self.changed();
        if let Some(store) = &self.store {
            store.save(&self.snapshot())?;
        }
        Ok(())
    }

    /// Rebuilds the daemon from saved state and reconciles the datapath with
    /// it: atomically, endpoint by endpoint, without interrupting traffic.
    pub fn restore(&mut self, state: State) -> Result<(), DaemonError> {
        if state.ipam.cidr() != self.cfg.pod_cidr {
            return Err(invalid(
                "ipv4-range",
                self.cfg.pod_cidr,
                format!("the state directory holds pod CIDR {}; use it or start with an empty state directory", state.ipam.cidr()),
            ));
        }
        self.ipam = state.ipam;
        match (&self.cfg.pod_cidr6, state.ipam6) {
            (Some(want), Some(saved)) if saved.cidr() != *want => {
                return Err(invalid(
                    "ipv6-range",
                    want,
                    format!("the state directory holds IPv6 pod CIDR {}; use it or start with an empty state directory", saved.cidr()),
                ));
            }
            (Some(_), Some(saved)) => self.ipam6 = Some(saved),
            // IPv6 turned on or off: endpoints keep (or lose) their IPv6
            // addresses below
            _ => {}
        }
        self.pods = state.pods;
        self.namespaces = state.namespaces;
        self.next_endpoint_id = state.next_endpoint_id.max(1);
        self.fqdn = state.fqdn;
        for (source, doc) in state.policies {
            let value: serde_yaml::Value = match serde_yaml::to_value(&doc) {
                Ok(v) => v,
                Err(e) => {
                    error!(%source, error = %e, "dropping unreadable saved policy");
                    continue;
                }
            };
            // what this configuration cannot enforce is not brought back
            // silently: dropped, and said so in `cilium status`
            match parse_value(&source, value).and_then(|parsed| self.check_policy_features(std::slice::from_ref(&parsed)).map(|()| parsed)) {
                Ok((d, rules)) => {
                    self.policy_sources.insert(d.key(), source);
                    self.repo.apply(vec![(d, rules)]);
                }
                Err(e) => {
                    error!(%source, error = %e, "dropping saved policy that no longer validates");
                    self.warnings.insert(format!("policy {}", e.document), format!("a saved policy was dropped at start: {e}"));
                }
            }
        }
        self.refresh_repo_services();
        self.refresh_repo_fqdns();
        // CIDR identities keep their numbers across restarts
        for (id, labels) in &state.identities {
            if *id < cilium_identity::MIN_LOCAL_IDENTITY {
                continue;
            }
            let prefix = labels
                .iter()
                .filter(|l| l.source == cilium_labels::SOURCE_CIDR)
                .filter_map(|l| l.key.parse::<IpNet>().ok())
                .max_by_key(|n| n.prefix_len());
            // a CIDR identity saved with other labels than this version
            // gives it (e.g. before `world-ipv4` was among them) is not
            // restored: a new one is allocated with the right labels
            if let Some(net) = prefix.filter(|n| cilium_policy::rule::cidr_identity_labels(n) == *labels) {
                if self.identities.restore(*id, labels).is_ok() {
                    self.cidr_identities.insert(net, *id);
                }
            }
        }
        // Endpoints whose interface vanished while the agent was away are gone.
        for (id, rec) in state.endpoints {
            match self.dp.link(&rec.host_ifname)? {
                Some((ifindex, _)) if ifindex == rec.host_ifindex => {
                    let labels = state.identities.get(&rec.identity);
                    if rec.identity >= 256 {
                        match labels {
                            Some(l) if *l == rec.labels => self.identities.restore(rec.identity, l)?,
                            _ => {
                                let (idn, _) = self.identities.allocate(&rec.labels)?;
                                warn!(endpoint = id, old = rec.identity, new = idn, "identity re-allocated on restore");
                            }
                        }
                    }
                    let identity = self.identities.lookup(&rec.labels).unwrap_or(rec.identity);
                    let mut rec = rec;
                    rec.identity = identity;
                    let owner = format!("{}/{}", rec.container_id, rec.ifname);
                    match (self.ipam6.as_mut(), rec.ipv6) {
                        (Some(ipam6), Some(ip6)) => {
                            if let Err(e) = ipam6.allocate_ip(ip6, &owner) {
                                warn!(endpoint = id, error = %e, "endpoint's IPv6 address not restored");
                                rec.ipv6 = None;
                            }
                        }
                        (None, Some(ip6)) => {
                            // IPv6 turned off: the address and its route go
                            let _ = self.dp.unroute(host_net(ip6.into()));
                            rec.ipv6 = None;
                        }
                        _ => {}
                    }
                    self.endpoints.insert(id, Endpoint { rec, realized: None, state: EpState::Ready, error: None, stale: vec![] });
                }
                _ => {
                    info!(endpoint = id, ifname = %rec.host_ifname, "endpoint interface is gone; removing endpoint");
                    self.ipam.release(rec.ipv4);
                    if let (Some(ipam6), Some(ip6)) = (self.ipam6.as_mut(), rec.ipv6) {
                        ipam6.release(ip6);
                    }
                }
            }
        }
        self.sync_cidr_identities()?;
        self.nodes = state.nodes;
        let host_labels = host_endpoint_labels(&self.own_node_labels());
        if let Some(h) = self.host_ep.as_mut() {
            h.rec.labels = host_labels;
        }
        if let (Some(kv), Some(saved)) = (self.kv.as_mut(), state.kvstore) {
            // the last view, until the kvstore answers again
            *kv = saved;
        }
        self.restore_remote_endpoints(&state.identities)?;
        self.reconcile_datapath()?;
        self.save()
    }

    /// Gives every CIDR the policies name an identity and an ipcache entry,
    /// and removes those no longer named. IPv6 prefixes only with IPv6
    /// enabled. Returns whether anything changed.
    fn sync_cidr_identities(&mut self) -> Result<bool, DaemonError> {
        let ipv6 = self.ipam6.is_some();
        let wanted: BTreeSet<IpNet> = cilium_policy::rule::referenced_cidrs(self.repo.rules())
            .into_iter()
            .filter(|n| ipv6 || matches!(n, IpNet::V4(_)))
            .map(|n| n.trunc())
            .collect();
        let mut changed = false;
        let gone: Vec<IpNet> = self.cidr_identities.keys().filter(|n| !wanted.contains(n)).copied().collect();
        for net in gone {
            let id = self.cidr_identities.remove(&net).expect("listed");
            let _ = self.identities.release(id);
            changed = true;
        }
        for net in wanted {
            if self.cidr_identities.contains_key(&net) {
                continue;
            }
            let labels = cilium_policy::rule::cidr_identity_labels(&net);
            let (id, _) = self.identities.allocate(&labels)?;
            self.cidr_identities.insert(net, id);
            changed = true;
        }
        Ok(changed)
    }

    /// Makes the datapath match the daemon: endpoints, ipcache, policy and
    /// attachments. Used at start-up, after restore.
    pub fn reconcile_datapath(&mut self) -> Result<(), DaemonError> {
        // endpoints in the map that we do not know: their interfaces keep the
        // programs, which now drop everything (no endpoint entry)
        let known: BTreeSet<u32> = self.endpoints.values().chain(self.host_ep.as_ref()).map(|e| e.rec.host_ifindex).collect();
        let existing = self.dp.endpoints()?;
        for info in &existing {
            if !known.contains(&info.ifindex) {
                self.dp.endpoint_delete(info.ifindex)?;
            }
        }
        let gens: BTreeMap<u32, bool> =
            existing.iter().map(|i| (i.ifindex, i.flags & EndpointFlag::PolicyGen as u16 != 0)).collect();
        // policy entries: group by endpoint; drop those of unknown endpoints
        let mut by_ep: BTreeMap<u16, Vec<PolicyKey>> = BTreeMap::new();
        for (k, _) in self.dp.policy_dump()? {
            if self.slot(k.ep_id).is_some() {
                by_ep.entry(k.ep_id).or_default().push(k);
            } else {
                self.dp.policy_delete(&k)?;
            }
        }
        let ids: Vec<u16> = self.endpoint_ids();
        for id in &ids {
            let ep = self.slot_mut(*id).expect("listed");
            let live_gen = gens.get(&ep.rec.host_ifindex).copied().unwrap_or(false);
            let stale = by_ep.remove(id).unwrap_or_default();
            // entries of the live generation stay until the new one is in
            ep.realized = Some(Realized {
                policy: EndpointPolicy::default(),
                generation: live_gen,
                keys: stale.iter().filter(|k| (k.gen_dir & POLICY_KEY_GEN != 0) == live_gen).copied().collect(),
                flags: u16::MAX,
            });
            ep.stale = stale.into_iter().filter(|k| (k.gen_dir & POLICY_KEY_GEN != 0) != live_gen).collect();
        }
        // policy before addresses: while identities may be renumbered, an
        // address can only lose access, never gain it
        for id in &ids {
            if let Err(e) = self.regenerate(*id) {
                error!(endpoint = id, error = %e, "restoring policy");
            }
        }
        self.ipcache_written = self.dp.ipcache_dump()?.into_iter().collect();
        self.tunnel_routes = self
            .dp
            .routes_via(crate::node::TUNNEL_DEV)?
            .into_iter()
            .filter_map(|n| match n {
                IpNet::V4(v4) => Some(v4),
                IpNet::V6(_) => None,
            })
            .collect();
        self.sync_ipcache()?;
        for rec in self.endpoints.values().map(|e| e.rec.clone()).collect::<Vec<_>>() {
            self.dp.attach(&rec.host_ifname)?;
            self.dp.link_up(&rec.host_ifname)?;
            self.route_endpoint(&rec)?;
        }
        self.reconcile_services()?;
        // every established connection re-checks against what is now in force
        self.dp.bump_policy_revision()?;
        Ok(())
    }

    /// Writes the difference between the desired ipcache and what was last
    /// written, and the tunnel routes that go with it. The one place
    /// ipcache entries change. A route into the tunnel exists only while
    /// the ipcache names the node behind it.
    fn sync_ipcache(&mut self) -> Result<(), DaemonError> {
        let desired = self.desired_ipcache();
        let stale: Vec<IpNet> = self.ipcache_written.keys().filter(|p| !desired.contains_key(p)).copied().collect();
        for (prefix, v) in &desired {
            if self.ipcache_written.get(prefix) != Some(v) {
                self.dp.ipcache_upsert(*prefix, v)?;
                self.ipcache_written.insert(*prefix, *v);
            }
        }
        self.sync_tunnel_routes()?;
        for prefix in stale {
            self.dp.ipcache_delete(prefix)?;
            self.ipcache_written.remove(&prefix);
        }
        Ok(())
    }

    /// What the ipcache must hold. A prefix named by several sources takes
    /// the identity of the strongest: the host's own addresses, then local
    /// endpoints, then other nodes' pods, then other nodes, then CIDRs
    /// policies name (so a CIDR rule can never relabel a node or a pod),
    /// then, in tunnel mode, other nodes' pod CIDRs (world: an address
    /// there that is no known pod). In tunnel mode every address in another
    /// node's pod CIDR carries that node as its tunnel endpoint.
    fn desired_ipcache(&self) -> BTreeMap<IpNet, IpcacheValue> {
        let tunnels = self.tunnel_cidrs();
        let tunnel_of = |ip: Ipv4Addr| tunnels.iter().find(|(c, _)| c.contains(&ip)).map(|(_, n)| ip_to_be(*n)).unwrap_or(0);
        let at = |ip: IpAddr, sec_identity: u32| {
            let tunnel_endpoint = match ip {
                IpAddr::V4(v4) => tunnel_of(v4),
                IpAddr::V6(_) => 0,
            };
            (host_net(ip), IpcacheValue { sec_identity, tunnel_endpoint, ..Default::default() })
        };
        let mut m = BTreeMap::new();
        for (cidr, node) in &tunnels {
            m.insert(IpNet::V4(*cidr), IpcacheValue { sec_identity: ReservedIdentity::World.code(), tunnel_endpoint: ip_to_be(*node), ..Default::default() });
        }
        for (net, id) in &self.cidr_identities {
            let tunnel_endpoint = match net {
                IpNet::V4(v4) => tunnel_of(v4.network()),
                IpNet::V6(_) => 0,
            };
            m.entry(*net).or_insert_with(|| IpcacheValue { tunnel_endpoint, ..Default::default() }).sec_identity = *id;
        }
        let remote_node = ReservedIdentity::RemoteNode.code();
        // other nodes (by both addresses, with IPv6)
        let ipv6 = self.ipam6.is_some();
        m.extend(self.other_nodes().flat_map(|n| std::iter::once(IpAddr::V4(n.ip)).chain(n.ip6.filter(|_| ipv6).map(IpAddr::V6))).map(|ip| at(ip, remote_node)));
        m.extend(self.remote_endpoints.iter().map(|(ip, (_, id))| at(*ip, *id)));
        for e in self.endpoints.values() {
            let v = IpcacheValue { sec_identity: e.rec.identity, ..Default::default() };
            m.insert(host_net(e.rec.ipv4.into()), v);
            if let Some(ip6) = e.rec.ipv6 {
                m.insert(host_net(ip6.into()), v);
            }
        }
        let host = IpcacheValue { sec_identity: ReservedIdentity::Host.code(), ..Default::default() };
        m.insert(host_net(self.ipam.router().into()), host);
        for ip in &self.node_ips {
            m.insert(host_net((*ip).into()), host);
        }
        for ip in self.router_ip6().iter().chain(&self.node_ips6) {
            m.insert(host_net((*ip).into()), host);
        }
        m
    }

    /// The host routes of an endpoint's addresses, out of its interface.
    fn route_endpoint(&mut self, rec: &EndpointRecord) -> Result<(), DaemonError> {
        self.dp.route(host_net(rec.ipv4.into()), &rec.host_ifname, self.ipam.router().into())?;
        if let (Some(ip6), Some(router6)) = (rec.ipv6, self.router_ip6()) {
            self.dp.route(host_net(ip6.into()), &rec.host_ifname, router6.into())?;
        }
        Ok(())
    }

    // ------------------------------------------------------------- IPAM ---

    /// Allocates a pod's addresses: IPv4, and IPv6 when enabled (both or
    /// neither).
    pub fn ipam_allocate(&mut self, owner: &str) -> Result<(Ipv4Addr, Option<Ipv6Addr>), DaemonError> {
        if owner.is_empty() {
            return Err(invalid("owner", owner, "must name the container and interface"));
        }
        let had = self.ipam.owner_of(owner);
        let ip = self.ipam.allocate(owner)?;
        let ip6 = match self.ipam6.as_mut().map(|i| i.allocate(owner)).transpose() {
            Ok(ip6) => ip6,
            Err(e) => {
                if had.is_none() {
                    self.ipam.release(ip);
                }
                return Err(e.into());
            }
        };
        self.save()?;
        Ok((ip, ip6))
    }

    /// Releases whatever addresses `owner` holds, in both pools.
    fn ipam_release_owner(&mut self, owner: &str) {
        self.ipam.release_owner(owner);
        if let Some(i) = self.ipam6.as_mut() {
            i.release_owner(owner);
        }
    }

    pub fn ipam_release(&mut self, ip: IpAddr) -> Result<bool, DaemonError> {
        if self.endpoints.values().any(|e| IpAddr::V4(e.rec.ipv4) == ip || e.rec.ipv6.map(IpAddr::V6) == Some(ip)) {
            return Err(invalid("ip", ip, "still used by an endpoint; delete the endpoint first"));
        }
        let released = match ip {
            IpAddr::V4(v4) => self.ipam.release(v4),
            IpAddr::V6(v6) => self.ipam6.as_mut().is_some_and(|i| i.release(v6)),
        };
        self.save()?;
        Ok(released)
    }

    // -------------------------------------------------------- endpoints ---

    fn pod_key(ns: &str, name: &str) -> String {
        format!("{ns}/{name}")
    }

    pub fn labels_for(&self, namespace: &str, pod: &str) -> LabelSet {
        let empty = BTreeMap::new();
        let meta = self.pods.get(&Self::pod_key(namespace, pod));
        let ns_labels = self.namespaces.get(namespace).map(|n| &n.labels).unwrap_or(&empty);
        k8s_pod_labels(
            namespace,
            meta.map(|m| &m.labels).unwrap_or(&empty),
            ns_labels,
            meta.map(|m| m.service_account.as_str()).unwrap_or("default"),
            cilium_policy::rule::CLUSTER_NAME,
        )
    }

    fn alloc_endpoint_id(&mut self) -> Result<u16, DaemonError> {
        for _ in 0..u16::MAX {
            let id = self.next_endpoint_id;
            self.next_endpoint_id = if id >= 65534 { 1 } else { id + 1 };
            if !self.endpoints.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(invalid("endpoint", "", "no endpoint ID left"))
    }

    /// Creates (or returns the existing) endpoint for a wired pod interface.
    pub fn endpoint_create(&mut self, req: &EndpointCreate) -> Result<u16, DaemonError> {
        let owner = format!("{}/{}", req.container_id, req.ifname);
        if let Some((id, ep)) = self.endpoints.iter().find(|(_, e)| e.rec.container_id == req.container_id && e.rec.ifname == req.ifname) {
            let same = ep.rec.ipv4 == req.ipv4 && ep.rec.ipv6 == req.ipv6 && ep.rec.host_ifname == req.host_ifname;
            let id = *id;
            if same && self.dp.link(&req.host_ifname)?.map(|l| l.0) == Some(ep.rec.host_ifindex) {
                return Ok(id);
            }
            self.endpoint_remove(id)?;
        }
        match self.ipam.owner(req.ipv4) {
            Some(o) if o == owner => {}
            Some(o) => return Err(invalid("ipv4", req.ipv4, format!("allocated to {o}, not {owner}"))),
            None => self.ipam.allocate_ip(req.ipv4, &owner)?,
        }
        if let Some(ip6) = req.ipv6 {
            let Some(ipam6) = self.ipam6.as_mut() else {
                return Err(invalid("ipv6", ip6, "IPv6 is not enabled on this node (--enable-ipv6)"));
            };
            match ipam6.owner(ip6) {
                Some(o) if o == owner => {}
                Some(o) => return Err(invalid("ipv6", ip6, format!("allocated to {o}, not {owner}"))),
                None => ipam6.allocate_ip(ip6, &owner)?,
            }
        }
        let (ifindex, host_mac) = self
            .dp
            .link(&req.host_ifname)?
            .ok_or_else(|| invalid("host_ifname", &req.host_ifname, "no such interface on this node"))?;
        let labels = self.labels_for(&req.namespace, &req.pod_name);
        let (identity, new_identity) = self.identities.allocate(&labels)?;
        let id = self.alloc_endpoint_id()?;
        let rec = EndpointRecord {
            id,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            host_ifname: req.host_ifname.clone(),
            host_ifindex: ifindex,
            ipv4: req.ipv4,
            ipv6: req.ipv6,
            mac: req.mac.clone(),
            host_mac: mac_string(&host_mac),
            namespace: req.namespace.clone(),
            pod_name: req.pod_name.clone(),
            labels,
            identity,
        };
        self.endpoints.insert(id, Endpoint { rec: rec.clone(), realized: None, state: EpState::Ready, error: None, stale: vec![] });
        let result = self.wire_endpoint(id, new_identity);
        if let Err(e) = result {
            error!(endpoint = id, error = %e, "endpoint creation failed; rolling back");
            let _ = self.endpoint_remove(id);
            return Err(e);
        }
        self.save()?;
        info!(endpoint = id, pod = %format!("{}/{}", rec.namespace, rec.pod_name), ip = %rec.ipv4, identity, "endpoint created");
        Ok(id)
    }

    fn wire_endpoint(&mut self, id: u16, new_identity: bool) -> Result<(), DaemonError> {
        let rec = self.endpoints[&id].rec.clone();
        if new_identity {
            self.regenerate_all();
        }
        self.regenerate(id)?;
        self.sync_ipcache()?;
        // policy is in place before the first packet can flow
        self.dp.attach(&rec.host_ifname)?;
        self.dp.link_up(&rec.host_ifname)?;
        self.route_endpoint(&rec)?;
        self.dp.bump_policy_revision()?;
        Ok(())
    }

    /// Removes an endpoint from the datapath, best effort through every step
    /// (the first error is returned). The endpoint-table entry goes first, so
    /// from then on the programs still attached to its interface drop
    /// everything (165); deleting the interface removes them.
    fn endpoint_remove(&mut self, id: u16) -> Result<(), DaemonError> {
        let Some(ep) = self.endpoints.remove(&id) else { return Ok(()) };
        let rec = &ep.rec;
        let mut first: Option<DaemonError> = None;
        fn note(first: &mut Option<DaemonError>, id: u16, r: Result<(), DatapathError>) {
            if let Err(e) = r {
                warn!(endpoint = id, error = %e, "removing endpoint");
                first.get_or_insert(e.into());
            }
        }
        note(&mut first, id, self.dp.endpoint_delete(rec.host_ifindex));
        for k in ep.realized.iter().flat_map(|r| r.keys.iter()).chain(ep.stale.iter()) {
            note(&mut first, id, self.dp.policy_delete(k));
        }
        // a later endpoint with this address must not inherit its connections
        for ip in std::iter::once(IpAddr::V4(rec.ipv4)).chain(rec.ipv6.map(IpAddr::V6)) {
            note(&mut first, id, self.dp.ct_flush_ip(ip).map(|_| ()));
            note(&mut first, id, self.dp.unroute(host_net(ip)));
        }
        self.ipam.release(rec.ipv4);
        if let (Some(ipam6), Some(ip6)) = (self.ipam6.as_mut(), rec.ipv6) {
            ipam6.release(ip6);
        }
        self.warnings.remove(&format!("endpoint {id}"));
        if self.identities.release(rec.identity).unwrap_or(false) {
            self.regenerate_all();
        }
        if let Err(e) = self.sync_ipcache() {
            first.get_or_insert(e);
        }
        note(&mut first, id, self.dp.bump_policy_revision().map(|_| ()));
        first.map_or(Ok(()), Err)
    }

    /// Deletes the endpoint of a container interface. Returns its ID when
    /// there was one; deleting nothing is not an error (CNI DEL is idempotent).
    pub fn endpoint_delete(&mut self, container_id: &str, ifname: &str) -> Result<Option<u16>, DaemonError> {
        let owner = format!("{container_id}/{ifname}");
        let found = self.endpoints.iter().find(|(_, e)| e.rec.container_id == container_id && e.rec.ifname == ifname).map(|(id, _)| *id);
        if let Some(id) = found {
            self.endpoint_remove(id)?;
        }
        self.ipam_release_owner(&owner);
        self.save()?;
        if let Some(id) = found {
            info!(endpoint = id, container_id, "endpoint deleted");
        }
        Ok(found)
    }

    /// Deletes every endpoint not in `valid` (CNI GC).
    pub fn endpoint_gc(&mut self, valid: &[(String, String)]) -> Result<Vec<String>, DaemonError> {
        let keep: BTreeSet<(String, String)> = valid.iter().cloned().collect();
        let gone: Vec<(String, String)> = self
            .endpoints
            .values()
            .map(|e| (e.rec.container_id.clone(), e.rec.ifname.clone()))
            .filter(|k| !keep.contains(k))
            .collect();
        let mut out = Vec::new();
        for (c, i) in gone {
            self.endpoint_delete(&c, &i)?;
            out.push(format!("{c}/{i}"));
        }
        // addresses held by containers that never became endpoints (in
        // either pool)
        let owners4 = self.ipam.allocations().map(|(_, o)| o.to_string());
        let owners6 = self.ipam6.iter().flat_map(|i| i.allocations().map(|(_, o)| o.to_string()).collect::<Vec<_>>());
        let orphans: BTreeSet<String> =
            owners4.chain(owners6).filter(|o| o != "router").filter(|o| !keep.iter().any(|(c, i)| *o == format!("{c}/{i}"))).collect();
        for o in orphans {
            self.ipam_release_owner(&o);
            out.push(o);
        }
        self.save()?;
        Ok(out)
    }

    /// Changes the labels of existing endpoints after their pod or namespace
    /// changed, re-allocating identities.
    fn relabel(&mut self, filter: impl Fn(&EndpointRecord) -> bool) -> Result<(), DaemonError> {
        let ids: Vec<u16> = self.endpoints.iter().filter(|(_, e)| filter(&e.rec)).map(|(id, _)| *id).collect();
        let mut changed = false;
        for id in ids {
            let rec = self.endpoints[&id].rec.clone();
            let labels = self.labels_for(&rec.namespace, &rec.pod_name);
            if labels == rec.labels {
                continue;
            }
            let (identity, _) = self.identities.allocate(&labels)?;
            let _ = self.identities.release(rec.identity);
            let ep = self.endpoints.get_mut(&id).expect("listed");
            ep.rec.labels = labels;
            ep.rec.identity = identity;
            let mut info = self.endpoint_info(id);
            info.sec_identity = identity;
            self.dp.endpoint_upsert(&info)?;
            changed = true;
        }
        if changed {
            self.regenerate_all();
            self.sync_ipcache()?;
            self.dp.bump_policy_revision()?;
        }
        Ok(())
    }

    pub fn pod_upsert(&mut self, meta: PodMeta) -> Result<(), DaemonError> {
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(invalid("name", &meta.name, "pods need a namespace and a name"));
        }
        // labels become identity labels, shared with other nodes: only
        // what the API server would accept
        for (k, v) in &meta.labels {
            cilium_labels::check_k8s_label(k, v).map_err(|m| invalid(&format!("labels.{k}"), v, m))?;
        }
        cilium_labels::check_k8s_label("serviceaccount", &meta.service_account).map_err(|m| invalid("service_account", &meta.service_account, m))?;
        let key = Self::pod_key(&meta.namespace, &meta.name);
        let (ns, name) = (meta.namespace.clone(), meta.name.clone());
        self.pods.insert(key, meta);
        self.relabel(|r| r.namespace == ns && r.pod_name == name)?;
        self.cluster_changed()?;
        self.save()
    }

    pub fn pod_delete(&mut self, namespace: &str, name: &str) -> Result<bool, DaemonError> {
        let existed = self.pods.remove(&Self::pod_key(namespace, name)).is_some();
        self.cluster_changed()?;
        self.save()?;
        Ok(existed)
    }

    pub fn namespace_upsert(&mut self, meta: NamespaceMeta) -> Result<(), DaemonError> {
        for (k, v) in &meta.labels {
            cilium_labels::check_k8s_label(k, v).map_err(|m| invalid(&format!("labels.{k}"), v, m))?;
        }
        let name = meta.name.clone();
        self.namespaces.insert(name.clone(), meta);
        self.relabel(|r| r.namespace == name)?;
        self.cluster_changed()?;
        self.save()
    }

    // ----------------------------------------------------------- policy ---

    /// Imports policy text: every document valid, or nothing changes.
    pub fn policy_import(&mut self, text: &str, source: &str, dry_run: bool) -> Result<(u64, Vec<String>), DaemonError> {
        let parsed = parse_policies(text, source)?;
        self.check_policy_features(&parsed)?;
        if parsed.is_empty() {
            return Err(invalid("(document)", source, "no policy documents found"));
        }
        let names: Vec<String> = parsed.iter().map(|(d, _)| d.key().to_string()).collect();
        if dry_run {
            return Ok((self.repo.revision(), names));
        }
        for (d, _) in &parsed {
            self.policy_sources.insert(d.key(), source.to_string());
        }
        self.repo.apply(parsed);
        self.refresh_repo_services();
        let rev = self.repo.revision();
        self.sync_cidr_identities()?;
        self.regenerate_all();
        self.sync_ipcache()?;
        self.dp.bump_policy_revision()?;
        self.save()?;
        info!(revision = rev, policies = ?names, "policies imported");
        Ok((rev, names))
    }

    /// Refuses what the agent's configuration cannot enforce.
    fn check_policy_features(&self, parsed: &[(PolicyDocument, Vec<cilium_policy::Rule>)]) -> Result<(), PolicyError> {
        for (doc, rules) in parsed {
            if let Some(r) = rules.iter().find(|r| r.host).filter(|_| !self.cfg.host_firewall) {
                return Err(PolicyError::new(
                    &doc.key().to_string(),
                    &format!("{}.nodeSelector", r.origin),
                    "",
                    "host policies need the agent started with --enable-host-firewall",
                ));
            }
            if let Some(field) = cilium_policy::rule::node_selector_use(doc).filter(|_| !self.cfg.node_selector_labels) {
                return Err(PolicyError::new(
                    &doc.key().to_string(),
                    &field,
                    "",
                    "selecting nodes by their labels needs the agent started with --enable-node-selector-labels",
                ));
            }
            if let Some((field, proto)) = cilium_policy::rule::extended_protocol_use(rules).filter(|_| !self.cfg.extended_ip_protocols) {
                return Err(PolicyError::new(
                    &doc.key().to_string(),
                    &field,
                    proto.name(),
                    "extended IP protocols need the agent started with --enable-extended-ip-protocols",
                ));
            }
        }
        Ok(())
    }

    /// Deletes policies matching a filter. Returns the revision and names.
    pub fn policy_delete(&mut self, matches: impl Fn(&PolicyRef) -> bool) -> Result<(u64, Vec<String>), DaemonError> {
        let keys: Vec<PolicyRef> = self.repo.documents().map(|d| d.key()).filter(|k| matches(k)).collect();
        for k in &keys {
            self.repo.delete(k);
            self.policy_sources.remove(k);
        }
        if !keys.is_empty() {
            self.refresh_repo_services();
            self.sync_cidr_identities()?;
            self.regenerate_all();
            self.sync_ipcache()?;
            self.dp.bump_policy_revision()?;
            self.save()?;
        }
        Ok((self.repo.revision(), keys.iter().map(|k| k.to_string()).collect()))
    }

    /// Replaces every policy imported from `source` with `text` (the policy
    /// directory watcher). Invalid text changes nothing.
    pub fn policy_replace_source(&mut self, source: &str, text: &str) -> Result<u64, DaemonError> {
        let parsed = if text.trim().is_empty() { vec![] } else { parse_policies(text, source)? };
        self.check_policy_features(&parsed)?;
        let new_keys: BTreeSet<PolicyRef> = parsed.iter().map(|(d, _)| d.key()).collect();
        let old: Vec<PolicyRef> = self.policy_sources.iter().filter(|(k, s)| s.as_str() == source && !new_keys.contains(*k)).map(|(k, _)| k.clone()).collect();
        for k in &old {
            self.repo.delete(k);
            self.policy_sources.remove(k);
        }
        for k in &new_keys {
            self.policy_sources.insert(k.clone(), source.to_string());
        }
        if !parsed.is_empty() {
            self.repo.apply(parsed);
        }
        self.refresh_repo_services();
        self.sync_cidr_identities()?;
        self.regenerate_all();
        self.sync_ipcache()?;
        self.dp.bump_policy_revision()?;
        self.save()?;
        Ok(self.repo.revision())
    }

    pub fn policies(&self) -> Vec<&PolicyDocument> {
        self.repo.documents().collect()
    }

    // ------------------------------------------------------ regeneration ---

    fn identity_map(&self) -> BTreeMap<u32, LabelSet> {
        self.identities.iter().map(|i| (i.id, i.labels.clone())).collect()
    }

    fn named_ports(meta: Option<&PodMeta>, into: &mut NamedPorts) {
        for (name, proto, port) in meta.into_iter().flat_map(|m| m.ports.iter()) {
            let Some(name) = name else { continue };
            let p = match proto.as_str() {
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                _ => Protocol::Tcp,
            };
            into.entry(name.clone()).or_default().insert((p, *port));
        }
    }

    /// Named ports by identity: the container ports of the pods behind it.
    fn peer_ports(&self) -> BTreeMap<u32, NamedPorts> {
        let mut m: BTreeMap<u32, NamedPorts> = BTreeMap::new();
        for e in self.endpoints.values() {
            let pod = self.pods.get(&Self::pod_key(&e.rec.namespace, &e.rec.pod_name));
            Self::named_ports(pod, m.entry(e.rec.identity).or_default());
        }
        m
    }

    /// Regenerates every endpoint's policy.
    pub fn regenerate_all(&mut self) {
        let identities = self.identity_map();
        let peer_ports = self.peer_ports();
        for id in self.endpoint_ids() {
            if let Err(e) = self.regenerate_with(id, &identities, &peer_ports) {
                error!(endpoint = id, error = %e, "regenerating policy");
            }
        }
    }

    /// An endpoint with policy: a pod's, or the host endpoint.
    fn slot(&self, id: u16) -> Option<&Endpoint> {
        if id == HOST_ENDPOINT_ID { self.host_ep.as_ref() } else { self.endpoints.get(&id) }
    }

    fn slot_mut(&mut self, id: u16) -> Option<&mut Endpoint> {
        if id == HOST_ENDPOINT_ID { self.host_ep.as_mut() } else { self.endpoints.get_mut(&id) }
    }

    /// Every endpoint: the pods', then the host endpoint (host firewall).
    pub fn endpoint_ids(&self) -> Vec<u16> {
        self.endpoints.keys().copied().chain(self.host_ep.as_ref().map(|_| HOST_ENDPOINT_ID)).collect()
    }

    /// The host endpoint follows the node's labels.
    fn host_labels_changed(&mut self) -> Result<(), DaemonError> {
        let labels = host_endpoint_labels(&self.own_node_labels());
        match self.host_ep.as_mut() {
            Some(h) if h.rec.labels != labels => h.rec.labels = labels,
            _ => return Ok(()),
        }
        self.regenerate(HOST_ENDPOINT_ID)
    }

    fn regenerate(&mut self, id: u16) -> Result<(), DaemonError> {
        let identities = self.identity_map();
        let peer_ports = self.peer_ports();
        self.regenerate_with(id, &identities, &peer_ports)
    }

    fn endpoint_info(&self, id: u16) -> EndpointInfo {
        let ep = self.slot(id).expect("an endpoint with policy");
        EndpointInfo {
            ifindex: ep.rec.host_ifindex,
            ipv4: ip_to_be(ep.rec.ipv4),
            sec_identity: ep.rec.identity,
            ep_id: id,
            flags: ep.realized.as_ref().map(|r| r.flags).filter(|f| *f != u16::MAX).unwrap_or(0),
            mac: parse_mac(&ep.rec.mac),
            node_mac: parse_mac(&ep.rec.host_mac),
            ipv6: ep.rec.ipv6.map(|a| a.octets()).unwrap_or_default(),
        }
    }

    /// Changes an endpoint's live policy entries in place, in an order that
    /// never allows more than the old or the new policy: new and tightened
    /// denies first, then removed allows go, then new allows come, then
    /// removed denies go. Touches only the entries that differ (a label
    /// change of one pod rewrites only that identity's entries). Returns the
    /// live keys.
    fn apply_diff(&mut self, id: u16, old: &Realized, new: &EndpointPolicy, inserted: &mut Vec<PolicyKey>) -> Result<Vec<PolicyKey>, DaemonError> {
        let generation = old.generation;
        let entry = |k: &MapKey, v: &cilium_policy::MapValue| PolicyEntry {
            proxy_port: v.proxy_port.to_be(),
            flags: v.deny as u8,
            match_type: k.match_type().code(),
            pad: 0,
        };
        let before: BTreeMap<MapKey, cilium_policy::MapValue> = old.policy.entries.iter().map(|(k, v)| (*k, *v)).collect();
        let after: BTreeMap<MapKey, cilium_policy::MapValue> = new.entries.iter().map(|(k, v)| (*k, *v)).collect();
        let changed = |want_deny: bool| -> Vec<(MapKey, cilium_policy::MapValue)> {
            after.iter().filter(|(k, v)| v.deny == want_deny && before.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect()
        };
        let removed = |was_deny: bool| -> Vec<MapKey> {
            before.iter().filter(|(k, v)| v.deny == was_deny && !after.contains_key(k)).map(|(k, _)| *k).collect()
        };
        for (k, v) in changed(true) {
            let key = datapath_key(id, generation, &k);
            self.dp.policy_insert(&key, &entry(&k, &v))?;
            inserted.push(key);
        }
        for k in removed(false) {
            self.dp.policy_delete(&datapath_key(id, generation, &k))?;
        }
        for (k, v) in changed(false) {
            let key = datapath_key(id, generation, &k);
            self.dp.policy_insert(&key, &entry(&k, &v))?;
            inserted.push(key);
        }
        for k in removed(true) {
            self.dp.policy_delete(&datapath_key(id, generation, &k))?;
        }
        Ok(after.keys().map(|k| datapath_key(id, generation, k)).collect())
    }

    /// Computes an endpoint's policy and switches the datapath to it
    /// atomically: the new entries go in under the other generation, one
    /// endpoint-table write flips to them, then the old ones go. If the new
    /// entries do not fit, the endpoint denies everything (never fails open)
    /// and the failure is reported in its state and in `cilium status`.
    fn regenerate_with(&mut self, id: u16, identities: &BTreeMap<u32, LabelSet>, peer_ports: &BTreeMap<u32, NamedPorts>) -> Result<(), DaemonError> {
        let Some(ep) = self.slot(id) else { return Ok(()) };
        let mut own_ports = NamedPorts::new();
        Self::named_ports(self.pods.get(&Self::pod_key(&ep.rec.namespace, &ep.rec.pod_name)), &mut own_ports);
        let policy = compute(&Input {
            rules: self.repo.rules(),
            labels: &ep.rec.labels,
            identities,
            own_ports: &own_ports,
            peer_ports,
            options: self.cfg.policy,
        });
        let mut flags = 0u16;
        if policy.ingress_enforced {
            flags |= EndpointFlag::IngressEnforce as u16;
        }
        if policy.egress_enforced {
            flags |= EndpointFlag::EgressEnforce as u16;
        }
        if self.cfg.audit_mode {
            flags |= EndpointFlag::Audit as u16;
        }
        // the node's own traffic is whatever protocols it speaks
        if self.cfg.extended_ip_protocols || id == HOST_ENDPOINT_ID {
            flags |= EndpointFlag::ExtendedProtocols as u16;
        }
        if let Some(r) = &ep.realized {
            if r.policy == policy && r.flags & !(EndpointFlag::PolicyGen as u16) == flags && ep.state == EpState::Ready && ep.stale.is_empty() {
                return Ok(());
            }
        }
        let old = ep.realized.clone();
        let stale = ep.stale.clone();
        // Same enforcement, healthy, known entries: change only what differs.
        if let Some(r) = &old {
            let same_flags = r.flags != u16::MAX && (r.flags & !(EndpointFlag::PolicyGen as u16)) == flags;
            if same_flags && ep.state == EpState::Ready && stale.is_empty() {
                let mut inserted = Vec::new();
                match self.apply_diff(id, r, &policy, &mut inserted) {
                    Ok(keys) => {
                        let ep = self.slot_mut(id).expect("exists");
                        let generation = r.generation;
                        let flags = r.flags;
                        ep.realized = Some(Realized { policy, generation, keys, flags });
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(endpoint = id, error = %e, "incremental policy update failed; rewriting the endpoint's policy");
                        // what the diff added to the live generation goes with it
                        if let Some(r) = self.slot_mut(id).and_then(|e| e.realized.as_mut()) {
                            r.keys.extend(inserted);
                        }
                    }
                }
            }
        }
        let old = self.slot(id).expect("exists").realized.clone();
        let generation = !old.as_ref().map(|r| r.generation).unwrap_or(true);
        if generation {
            flags |= EndpointFlag::PolicyGen as u16;
        }
        // leftovers of the generation we are about to fill
        for k in &stale {
            let _ = self.dp.policy_delete(k);
        }
        let mut written = Vec::with_capacity(policy.entries.len());
        let mut failure = None;
        for (k, v) in policy.entries.iter() {
            let key = datapath_key(id, generation, k);
            let entry = PolicyEntry { proxy_port: v.proxy_port.to_be(), flags: v.deny as u8, match_type: k.match_type().code(), pad: 0 };
            match self.dp.policy_insert(&key, &entry) {
                Ok(()) => written.push(key),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let ep_state;
        let realized_policy;
        if let Some(e) = failure {
            // Fail closed: the new generation holds nothing, enforcement on.
            for k in &written {
                let _ = self.dp.policy_delete(k);
            }
            written.clear();
            flags |= EndpointFlag::IngressEnforce as u16 | EndpointFlag::EgressEnforce as u16;
            flags &= !(EndpointFlag::Audit as u16);
            let msg = format!("policy for endpoint {id} does not fit the datapath ({e}); the endpoint denies all traffic until it does (raise --bpf-policy-map-max)");
            error!(endpoint = id, error = %e, "policy map full: endpoint fails closed");
            self.warnings.insert(format!("endpoint {id}"), msg.clone());
            ep_state = (EpState::PolicyError, Some(msg));
            realized_policy = EndpointPolicy { ingress_enforced: true, egress_enforced: true, ..Default::default() };
        } else {
            self.warnings.remove(&format!("endpoint {id}"));
            ep_state = (EpState::Ready, None);
            realized_policy = policy;
        }
        // the endpoint-table write is the switch; until it succeeds the old
        // generation stays live
        let mut info = self.endpoint_info(id);
        info.flags = flags;
        if let Err(e) = self.dp.endpoint_upsert(&info) {
            for k in &written {
                let _ = self.dp.policy_delete(k);
            }
            let msg = format!("cannot write endpoint {id} to the endpoint table ({e}); it keeps its previous policy");
            error!(endpoint = id, error = %e, "writing endpoint table");
            self.warnings.insert(format!("endpoint {id}"), msg.clone());
            let ep = self.slot_mut(id).expect("exists");
            ep.state = EpState::PolicyError;
            ep.error = Some(msg);
            return Err(e.into());
        }
        let failed = ep_state.0 == EpState::PolicyError;
        {
            let ep = self.slot_mut(id).expect("exists");
            ep.realized = Some(Realized { policy: realized_policy, generation, keys: written, flags });
            ep.state = ep_state.0;
            ep.error = ep_state.1;
            ep.stale.clear();
        }
        for k in old.iter().flat_map(|r| r.keys.iter()) {
            let _ = self.dp.policy_delete(k);
        }
        if failed {
            return Err(DaemonError::Invalid {
                field: "policy".into(),
                value: format!("endpoint {id}"),
                message: "does not fit the policy map; the endpoint denies all traffic".into(),
            });
        }
        Ok(())
    }

    /// Resolves one side of a trace to labels, whether it is an endpoint, and
    /// its named ports.
    fn trace_party(&self, field: &str, p: &cilium_api::TraceParty) -> Result<(LabelSet, bool, NamedPorts), DaemonError> {
        let mut ports = NamedPorts::new();
        match (&p.pod, p.identity, p.labels.is_empty()) {
            (Some(pod), None, true) => {
                let (ns, name) = pod
                    .split_once('/')
                    .or_else(|| pod.split_once(':'))
                    .ok_or_else(|| invalid(&format!("{field}.pod"), pod, "want namespace/pod or namespace:pod"))?;
                let meta = self.pods.get(&Self::pod_key(ns, name));
                let ep = self.endpoints.values().find(|e| e.rec.namespace == ns && e.rec.pod_name == name);
                if meta.is_none() && ep.is_none() {
                    return Err(DaemonError::NotFound { what: format!("pod {ns}/{name}") });
                }
                Self::named_ports(meta, &mut ports);
                let labels = ep.map(|e| e.rec.labels.clone()).unwrap_or_else(|| self.labels_for(ns, name));
                Ok((labels, true, ports))
            }
            (None, Some(id), true) if id == ReservedIdentity::Host.code() && self.host_ep.is_some() => {
                // the node under the host firewall: its host endpoint
                Ok((self.host_ep.as_ref().expect("checked").rec.labels.clone(), true, ports))
            }
            (None, Some(id), true) => {
                let ident = self.identities.get(id).ok_or_else(|| invalid(&format!("{field}.identity"), id, "no such identity"))?;
                let is_ep = (cilium_identity::MIN_CLUSTER_IDENTITY..cilium_identity::MIN_LOCAL_IDENTITY).contains(&id);
                Ok((ident.labels.clone(), is_ep, ports))
            }
            (None, None, false) => {
                let labels = LabelSet::parse_all(p.labels.iter().map(String::as_str));
                let is_ep = !labels.iter().any(|l| l.source == cilium_labels::SOURCE_RESERVED || l.source == cilium_labels::SOURCE_CIDR);
                Ok((labels, is_ep, ports))
            }
            _ => Err(invalid(field, "", "give exactly one of a pod, an identity or labels")),
        }
    }

    /// `cilium policy trace`.
    pub fn policy_trace(&self, req: &cilium_api::PolicyTraceRequest) -> Result<cilium_api::PolicyTraceResponse, DaemonError> {
        let protocol = match req.protocol.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ICMPV6" => Protocol::Icmpv6,
            other => match Protocol::extended_by_name(other) {
                Some(p) => p,
                None => return Err(invalid("protocol", other, "want TCP, UDP, SCTP, ICMP, ICMPv6, VRRP, IGMP, GRE, IPIP, IPV6, ESP or AH")),
            },
        };
        let (sl, s_ep, sp) = self.trace_party("src", &req.src)?;
        let (dl, d_ep, dp) = self.trace_party("dst", &req.dst)?;
        let t = cilium_policy::trace::trace(
            self.repo.rules(),
            &cilium_policy::trace::Party { labels: &sl, is_endpoint: s_ep, named_ports: &sp },
            &cilium_policy::trace::Party { labels: &dl, is_endpoint: d_ep, named_ports: &dp },
            protocol,
            req.dport,
            self.cfg.policy,
        );
        let mut allowed = t.verdict == cilium_policy::trace::Verdict::Allowed;
        let mut rendered = t.render(&format!("[{sl}]"), &format!("[{dl}]"));
        if let (Some(h), true) = (&req.http, allowed) {
            let (ok, text) = self.trace_http(h, (&sl, s_ep), (&dl, d_ep), &dp, protocol, req.dport);
            allowed = ok;
            rendered.push_str(&text);
        }
        Ok(cilium_api::PolicyTraceResponse {
            src_labels: sl.to_strings(),
            dst_labels: dl.to_strings(),
            verdict: if allowed { "ALLOWED" } else { "DENIED" }.to_string(),
            rendered,
            trace: serde_json::to_value(&t).expect("trace serializes"),
        })
    }

    /// The L7 part of a trace: an HTTP request against the HTTP rules of
    /// the source's egress and the destination's ingress, rule by rule.
    fn trace_http(
        &self,
        h: &cilium_api::TraceHttp,
        src: (&LabelSet, bool),
        dst: (&LabelSet, bool),
        dst_ports: &NamedPorts,
        protocol: Protocol,
        port: u16,
    ) -> (bool, String) {
        use cilium_policy::trace::{L7Policy, l7_policy};
        let mut headers: Vec<(String, Vec<u8>)> = h.headers.iter().filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().as_bytes().to_vec())).collect();
        if !h.host.is_empty() {
            headers.push(("host".into(), h.host.clone().into_bytes()));
        }
        let request = cilium_proxy::http::Request { reencode: false, method: h.method.to_ascii_uppercase(), target: h.path.clone(), version: 1, headers };
        let mut out = format!("\nHTTP {} {}:\n", request.method, request.target);
        let mut allowed = true;
        for (name, labels, peer, egress, is_ep) in [("Egress of the source", src.0, dst.0, true, src.1), ("Ingress of the destination", dst.0, src.0, false, dst.1)] {
            if !is_ep {
                continue;
            }
            match l7_policy(self.repo.rules(), labels, peer, egress, protocol, port, dst_ports, self.cfg.policy) {
                L7Policy::Unrestricted => out.push_str(&format!("  {name}: no HTTP rules apply\n")),
                L7Policy::Denied => {
                    allowed = false;
                    out.push_str(&format!("  {name}: not allowed at L3/L4\n"));
                }
                L7Policy::Dns(_) => out.push_str(&format!("  {name}: DNS rules apply to this port, not HTTP ones\n")),
                L7Policy::Kafka(_) => out.push_str(&format!("  {name}: Kafka rules apply to this port, not HTTP ones\n")),
                L7Policy::Http(rules) => {
                    let mut any = false;
                    for r in &rules {
                        let mut req = request.clone();
                        let desc = format!(
                            "{}{}{}{}",
                            r.method.as_deref().map(|m| format!("method {m} ")).unwrap_or_default(),
                            r.path.as_deref().map(|p| format!("path {p} ")).unwrap_or_default(),
                            r.host.as_deref().map(|p| format!("host {p} ")).unwrap_or_default(),
                            if r.headers.is_empty() { String::new() } else { format!("headers {:?} ", r.headers) },
                        );
                        let hit = cilium_proxy::HttpRules::compile(std::slice::from_ref(r)).map(|c| matches!(c.check(&mut req), cilium_proxy::rules::Verdict::Allowed(_))).unwrap_or(false);
                        any |= hit;
                        out.push_str(&format!("  {name}: rule {}{}\n", if desc.is_empty() { "(any request) ".into() } else { desc }, if hit { "MATCHES" } else { "does not match" }));
                    }
                    if !any {
                        allowed = false;
                        out.push_str(&format!("  => {name}: no HTTP rule matches: the proxy answers 403 Access denied\n"));
                    }
                }
            }
        }
        out.push_str(&format!("\nFinal verdict with the HTTP request: {}\n", if allowed { "ALLOWED" } else { "DENIED" }));
        (allowed, out)
    }

    // ------------------------------------------------------------ views ---

    pub fn endpoint_view(&self, id: u16) -> Option<cilium_api::Endpoint> {
        let e = self.slot(id)?;
        let r = e.realized.as_ref();
        Some(cilium_api::Endpoint {
            id,
            container_id: e.rec.container_id.clone(),
            ifname: e.rec.ifname.clone(),
            netns: e.rec.netns.clone(),
            host_ifname: e.rec.host_ifname.clone(),
            host_ifindex: e.rec.host_ifindex,
            ipv4: e.rec.ipv4,
            ipv6: e.rec.ipv6,
            mac: e.rec.mac.clone(),
            namespace: e.rec.namespace.clone(),
            pod_name: e.rec.pod_name.clone(),
            labels: e.rec.labels.to_strings(),
            identity: e.rec.identity,
            ingress_enforced: r.is_some_and(|r| r.policy.ingress_enforced),
            egress_enforced: r.is_some_and(|r| r.policy.egress_enforced),
            policy_revision: self.repo.revision(),
            state: match e.state {
                EpState::Ready => "ready",
                EpState::PolicyError => "policy-error",
            }
            .to_string(),
            error: e.error.clone(),
            policy_entries: r.map(|r| r.keys.len()).unwrap_or(0),
            selected_by: r.map(|r| r.policy.selected_by.clone()).unwrap_or_default(),
        })
    }

    pub fn endpoint_policy(&self, id: u16) -> Option<&EndpointPolicy> {
        self.slot(id)?.realized.as_ref().map(|r| &r.policy)
    }

    pub fn endpoints_ready(&self) -> usize {
        self.endpoints.values().filter(|e| e.state == EpState::Ready).count()
    }
}

#[cfg(test)]
mod tests;
