//! The rest of the cluster as this agent sees it: the other nodes (what
//! upstream learns from CiliumNode objects) and the other nodes' pods with
//! their addresses (CiliumEndpoints). A pod of another node gets the
//! identity of its labels and an ipcache entry, so policy applies to it by
//! identity wherever it runs; another node's address is `remote-node`.
//!
//! Identities are allocated by each agent for the labels it sees, so the
//! same labels get the same meaning on every node but not necessarily the
//! same number: with native routing the receiving node looks the source up
//! in its own ipcache, so numbers never cross the wire. Tunnel mode puts
//! the number in the VNI, so it needs the kvstore's cluster-wide numbers
//! as soon as there are other nodes.
//!
//! Tunnel mode: every other node's pod CIDR is routed into the VXLAN
//! device, and the ipcache names the node behind each address there (its
//! tunnel endpoint), which the device's tc egress program reads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use cilium_api::{NodeMeta, NodeView, RoutingMode};
use cilium_datapath::Datapath;
use cilium_labels::LabelSet;
use ipnet::Ipv4Net;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{Daemon, DaemonError, invalid};

/// What the kvstore says of the other nodes and their endpoints (in
/// kvstore mode the only source: entries of a node whose lease expired
/// are gone from it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvView {
    pub nodes: BTreeMap<String, NodeMeta>,
    /// Endpoint address (IPv4, or IPv6 in a dual-stack cluster) -> (labels, node).
    pub endpoints: BTreeMap<IpAddr, (LabelSet, String)>,
}

/// The identity labels of another node: remote-node, and each of its
/// labels with the `node:` source.
fn node_identity_labels(n: &NodeMeta) -> LabelSet {
    let mut set = LabelSet::new();
    set.insert(cilium_labels::Label::reserved("remote-node"));
    for (k, v) in &n.labels {
        set.insert(cilium_labels::Label::new(cilium_labels::SOURCE_NODE, k, v));
    }
    set
}

impl<D: Datapath> Daemon<D> {
    /// Addresses of other nodes that need an identity, with its labels:
    /// their pods, and with --enable-node-selector-labels the nodes
    /// themselves. A local endpoint's address is never another node's pod.
    fn wanted_remote_endpoints(&self) -> BTreeMap<IpAddr, LabelSet> {
        let local: BTreeSet<IpAddr> = self.endpoints.values().flat_map(|e| std::iter::once(IpAddr::V4(e.rec.ipv4)).chain(e.rec.ipv6.map(IpAddr::V6))).collect();
        // another node's pod is neither a local endpoint nor in this
        // node's pod CIDRs; IPv6 addresses only matter with IPv6 enabled
        let remote = |ip: &IpAddr| {
            !local.contains(ip)
                && match ip {
                    IpAddr::V4(v4) => !self.cfg.pod_cidr.contains(v4),
                    IpAddr::V6(v6) => self.cfg.pod_cidr6.is_some_and(|c| !c.contains(v6)),
                }
        };
        let mut out: BTreeMap<IpAddr, LabelSet> = if self.cfg.node_selector_labels {
            self.other_nodes()
                .filter(|n| !self.node_ips.contains(&n.ip))
                .flat_map(|n| std::iter::once(IpAddr::V4(n.ip)).chain(n.ip6.filter(|_| self.ipam6.is_some()).map(IpAddr::V6)).map(move |ip| (ip, node_identity_labels(n))))
                .collect()
        } else {
            BTreeMap::new()
        };
        if let Some(kv) = &self.kv {
            out.extend(
                kv.endpoints
                    .iter()
                    .filter(|(ip, (_, node))| *node != self.cfg.node_name && remote(ip))
                    .map(|(ip, (labels, _))| (*ip, labels.clone())),
            );
            return out;
        }
        for p in self.pods.values() {
            if p.node.as_ref().is_none_or(|n| *n == self.cfg.node_name) {
                continue;
            }
            for ip in p.ip.map(IpAddr::V4).into_iter().chain(p.ip6.map(IpAddr::V6)).filter(|ip| remote(ip)) {
                out.insert(ip, self.labels_for(&p.namespace, &p.name));
            }
        }
        out
    }

    /// Gives every pod of another node its identity, releasing those of
    /// pods gone or relabelled. Returns whether anything changed.
    fn sync_remote_endpoints(&mut self) -> Result<bool, DaemonError> {
        let wanted = self.wanted_remote_endpoints();
        let stale: Vec<IpAddr> = self.remote_endpoints.iter().filter(|(ip, (labels, _))| wanted.get(ip) != Some(labels)).map(|(ip, _)| *ip).collect();
        let mut changed = !stale.is_empty();
        for ip in stale {
            let (_, id) = self.remote_endpoints.remove(&ip).expect("listed");
            let _ = self.identities.release(id);
        }
        for (ip, labels) in wanted {
            if self.remote_endpoints.contains_key(&ip) {
                continue;
            }
            let (id, _) = self.identities.allocate(&labels)?;
            self.remote_endpoints.insert(ip, (labels, id));
            changed = true;
        }
        Ok(changed)
    }

    /// On restore: other nodes' pods get back the numbers they had (as
    /// local endpoints and CIDRs do), so a restart renumbers nothing.
    pub(super) fn restore_remote_endpoints(&mut self, saved: &BTreeMap<u32, LabelSet>) -> Result<(), DaemonError> {
        for (ip, labels) in self.wanted_remote_endpoints() {
            let id = match self.identities.lookup(&labels) {
                Some(_) => self.identities.allocate(&labels)?.0,
                None => match saved.iter().find(|(_, l)| **l == labels).map(|(id, _)| *id) {
                    Some(id) if self.identities.restore(id, &labels).is_ok() => id,
                    _ => self.identities.allocate(&labels)?.0,
                },
            };
            self.remote_endpoints.insert(ip, (labels, id));
        }
        Ok(())
    }

    /// After pods or namespaces changed: other nodes' pods follow, and
    /// policy with them when their identities changed.
    pub(super) fn cluster_changed(&mut self) -> Result<(), DaemonError> {
        if self.sync_remote_endpoints()? {
            self.regenerate_all();
            self.sync_ipcache()?;
            self.dp.bump_policy_revision()?;
        }
        Ok(())
    }

    /// Replaces the set of nodes, as the API server lists them. This node's
    /// own entry gives only its labels (what it publishes to the kvstore);
    /// in kvstore mode the other nodes come from there instead. Every entry
    /// is checked before anything changes.
    pub fn nodes_set(&mut self, nodes: Vec<NodeMeta>) -> Result<(), DaemonError> {
        let mut out = BTreeMap::new();
        for (i, n) in nodes.into_iter().enumerate() {
            if n.name.is_empty() {
                return Err(invalid(&format!("nodes[{i}].name"), "", "a node needs a name"));
            }
            n.pod_cidr.parse::<Ipv4Net>().map_err(|e| invalid(&format!("nodes[{i}].pod_cidr"), &n.pod_cidr, e.to_string()))?;
            for (k, v) in &n.labels {
                cilium_labels::check_k8s_label(k, v).map_err(|m| invalid(&format!("nodes[{i}].labels"), format!("{k}={v}"), m))?;
            }
            if out.insert(n.name.clone(), n.clone()).is_some() {
                return Err(invalid(&format!("nodes[{i}].name"), &n.name, "listed twice"));
            }
        }
        let others = out.keys().filter(|n| **n != self.cfg.node_name).count();
        if self.cfg.routing_mode == RoutingMode::Tunnel && self.kv.is_none() && others > 0 {
            return Err(invalid(
                "routing-mode",
                "tunnel",
                "other nodes need cluster-wide identity numbers (the VNI carries them): run the agents with --kvstore=etcd, or use --routing-mode=native",
            ));
        }
        self.nodes = out;
        self.host_labels_changed()?;
        // other nodes' identities follow their labels
        if self.sync_remote_endpoints()? {
            self.regenerate_all();
            self.dp.bump_policy_revision()?;
        }
        self.sync_ipcache()?;
        self.save()
    }

    /// This node's labels, as the API server gave them.
    pub(super) fn own_node_labels(&self) -> BTreeMap<String, String> {
        self.nodes.get(&self.cfg.node_name).map(|n| n.labels.clone()).unwrap_or_default()
    }

    /// Tunnel mode: each other node's pod CIDR with the node's address
    /// (none in native routing, or for a node whose CIDR does not parse).
    pub(super) fn tunnel_cidrs(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        if self.cfg.routing_mode != RoutingMode::Tunnel {
            return Vec::new();
        }
        self.other_nodes().filter_map(|n| Some((n.pod_cidr.parse::<Ipv4Net>().ok()?, n.ip))).filter(|(c, _)| !c.contains(&self.cfg.pod_cidr.network())).collect()
    }

    /// Routes exactly the other nodes' pod CIDRs into the tunnel, from the
    /// node's address (a node's own traffic to another node's pod).
    pub(super) fn sync_tunnel_routes(&mut self) -> Result<(), DaemonError> {
        let want: BTreeSet<Ipv4Net> = self.tunnel_cidrs().into_iter().map(|(c, _)| c).collect();
        if want == self.tunnel_routes {
            return Ok(());
        }
        let src = self.node_ips.first().copied().unwrap_or_else(|| self.ipam.router());
        for c in want.difference(&self.tunnel_routes).copied().collect::<Vec<_>>() {
            self.dp.route(c.into(), crate::node::TUNNEL_DEV, src.into())?;
            self.tunnel_routes.insert(c);
        }
        for c in self.tunnel_routes.difference(&want).copied().collect::<Vec<_>>() {
            self.dp.unroute(c.into())?;
            self.tunnel_routes.remove(&c);
        }
        Ok(())
    }

    /// The other nodes: from the kvstore when it is on, else as announced.
    pub(super) fn other_nodes(&self) -> impl Iterator<Item = &NodeMeta> {
        let own = self.cfg.node_name.as_str();
        match &self.kv {
            Some(kv) => kv.nodes.values(),
            None => self.nodes.values(),
        }
        .filter(move |n| n.name != own)
    }

    /// Every node this agent knows, itself first.
    pub fn nodes(&self) -> Vec<NodeView> {
        let pods_on = |name: &str| match &self.kv {
            // every pod has one IPv4 address (and maybe an IPv6 one)
            Some(kv) => kv.endpoints.iter().filter(|(ip, (_, n))| ip.is_ipv4() && n == name).count(),
            None => self.pods.values().filter(|p| p.ip.is_some() && p.node.as_deref() == Some(name)).count(),
        };
        let own_ip = self.node_ips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mut out = vec![NodeView {
            name: self.cfg.node_name.clone(),
            ip: own_ip,
            pod_cidr: self.cfg.pod_cidr.to_string(),
            local: true,
            pods: self.endpoints.len(),
            labels: self.own_node_labels(),
            identity: cilium_abi::ReservedIdentity::Host.code(),
        }];
        out.extend(self.other_nodes().map(|n| NodeView {
            name: n.name.clone(),
            ip: n.ip,
            pod_cidr: n.pod_cidr.clone(),
            local: false,
            pods: pods_on(&n.name),
            labels: n.labels.clone(),
            identity: self.remote_endpoints.get(&IpAddr::V4(n.ip)).map_or(cilium_abi::ReservedIdentity::RemoteNode.code(), |(_, id)| *id),
        }));
        out
    }
}

impl<D: Datapath> Daemon<D> {
    /// Switches to kvstore mode: other nodes and their endpoints come from
    /// the kvstore (see `kvstore_sync`).
    pub fn set_kvstore(&mut self, numbers: std::sync::Arc<dyn cilium_identity::ClusterNumbers>) {
        self.identities.set_cluster(numbers);
        self.kv.get_or_insert_with(KvView::default);
    }

    /// What this agent publishes: its node, and its endpoints with their
    /// identities and labels.
    pub fn kvstore_published(&self) -> (NodeMeta, Vec<(IpAddr, u32, LabelSet)>) {
        let me = NodeMeta {
            name: self.cfg.node_name.clone(),
            ip: self.node_ips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED),
            pod_cidr: self.cfg.pod_cidr.to_string(),
            ip6: self.node_ips6.first().copied(),
            labels: self.own_node_labels(),
        };
        // each of an endpoint's addresses (its IPv6 one too, when it has one)
        let eps = self
            .endpoints
            .values()
            .flat_map(|e| std::iter::once(IpAddr::V4(e.rec.ipv4)).chain(e.rec.ipv6.map(IpAddr::V6)).map(move |ip| (ip, e.rec.identity, e.rec.labels.clone())))
            .collect();
        (me, eps)
    }

    /// After a restart in kvstore mode: the cluster-scope numbers this
    /// agent restored from its saved state are checked against etcd's, and
    /// any etcd numbers differently moves there, with its endpoints and
    /// other nodes' pods, before anything is published (the VNI and the
    /// published endpoints must carry etcd's meaning). Returns how many
    /// moved; on an error nothing changed and the caller tries again.
    pub fn kvstore_reclaim(&mut self) -> Result<usize, DaemonError> {
        let moves = self.identities.reclaim()?;
        if moves.is_empty() {
            return Ok(0);
        }
        warn!(?moves, "identities renumbered to the kvstore's");
        let ids: Vec<u16> = self.endpoints.iter().filter(|(_, e)| moves.contains_key(&e.rec.identity)).map(|(id, _)| *id).collect();
        for id in ids {
            let ep = self.endpoints.get_mut(&id).expect("listed");
            ep.rec.identity = moves[&ep.rec.identity];
            let info = self.endpoint_info(id);
            self.dp.endpoint_upsert(&info)?;
        }
        for (_, id) in self.remote_endpoints.values_mut() {
            if let Some(n) = moves.get(id) {
                *id = *n;
            }
        }
        self.regenerate_all();
        self.sync_ipcache()?;
        self.dp.bump_policy_revision()?;
        self.changed();
        self.save()?;
        Ok(moves.len())
    }

    /// The cluster-scope identities this agent holds, with their labels as
    /// the kvstore keys them.
    pub fn cluster_identities(&self) -> Vec<(u32, String)> {
        self.identities
            .iter()
            .filter(|i| (cilium_identity::MIN_CLUSTER_IDENTITY..=cilium_identity::MAX_CLUSTER_IDENTITY).contains(&i.id) && cilium_identity::Scope::of(&i.labels) == cilium_identity::Scope::Cluster)
            .map(|i| (i.id, cilium_identity::labels_key(&i.labels)))
            .collect()
    }

    /// Takes what the kvstore holds now (the caller read all of it; on a
    /// read error it keeps the last view and does not call this).
    pub fn kvstore_sync(&mut self, view: KvView) -> Result<(), DaemonError> {
        if self.kv.as_ref() == Some(&view) {
            return Ok(());
        }
        let old = self.kv.replace(view);
        // a failure (an identity etcd could not give) keeps the old view,
        // so the next round tries again; what was allocated still applies
        let applied = self.cluster_changed();
        if applied.is_err() {
            self.kv = old;
            self.regenerate_all();
        }
        self.sync_ipcache()?;
        applied?;
        self.save()
    }
}
