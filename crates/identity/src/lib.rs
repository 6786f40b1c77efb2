//! Security identities: a number for a set of security-relevant labels.
//!
//! Reserved identities 1–8 are fixed; cluster identities are allocated from
//! 256; CIDR identities live in the node-local range from 1<<24. Equal label
//! sets get the same identity, which is released when its last user goes.
//!
//! This crate is the allocator as pure data. Persisting it is the agent's job,
//! sharing it across nodes is the kvstore's; it never touches the kernel.

use std::collections::{BTreeMap, HashMap};

use cilium_abi::ReservedIdentity;
use cilium_labels::{Label, LabelSet};
use serde::{Deserialize, Serialize};

/// First cluster-scoped identity.
pub const MIN_CLUSTER_IDENTITY: u32 = 256;
/// Last cluster-scoped identity (upstream: 16 bits of identity per cluster).
pub const MAX_CLUSTER_IDENTITY: u32 = 65535;
/// First node-local identity (CIDR, FQDN).
pub const MIN_LOCAL_IDENTITY: u32 = cilium_abi::IDENTITY_MIN_LOCAL;
/// Last node-local identity.
pub const MAX_LOCAL_IDENTITY: u32 = (1 << 24) + 0xff_ffff;
/// First identity of another node with labels (`reserved:remote-node` plus
/// `node:` labels), numbered by each node for itself.
pub const MIN_REMOTE_NODE_IDENTITY: u32 = cilium_abi::IDENTITY_MIN_REMOTE_NODE;
pub const MAX_REMOTE_NODE_IDENTITY: u32 = (2 << 24) + 0xff_ffff;

/// A numeric security identity.
pub type NumericIdentity = u32;

/// Why an identity could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no free identity left in {scope} range {min}..={max}")]
    Exhausted { scope: &'static str, min: u32, max: u32 },
    #[error("identity {id} is not allocated")]
    NotAllocated { id: u32 },
    #[error("identity {id} already belongs to labels [{existing}], cannot restore it for [{wanted}]")]
    Conflict { id: u32, existing: String, wanted: String },
    #[error("cluster-wide identity for [{labels}]: {reason}")]
    Cluster { labels: String, reason: String },
}

/// Where cluster-scope identities get their numbers when every node must
/// agree on them (the kvstore). Without one, numbers are this node's.
pub trait ClusterNumbers: Send + Sync + std::fmt::Debug {
    /// The cluster-wide number of `labels` (allocating it if needed).
    fn number(&self, labels: &LabelSet) -> Result<NumericIdentity, String>;

    /// As `number`, taking `preferred` when the labels have no number and
    /// `preferred` is free (a restored identity keeps its number).
    fn number_preferring(&self, labels: &LabelSet, preferred: NumericIdentity) -> Result<NumericIdentity, String> {
        let _ = preferred;
        self.number(labels)
    }
}

/// A label set as the kvstore keys it: `source:key=value;` for each label,
/// sorted.
pub fn labels_key(labels: &LabelSet) -> String {
    labels.to_strings().iter().map(|l| format!("{l};")).collect()
}

/// The scope an identity is allocated in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Local,
    RemoteNode,
}

impl Scope {
    fn range(self) -> (u32, u32, &'static str) {
        match self {
            Scope::Cluster => (MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY, "cluster"),
            Scope::Local => (MIN_LOCAL_IDENTITY, MAX_LOCAL_IDENTITY, "local"),
            Scope::RemoteNode => (MIN_REMOTE_NODE_IDENTITY, MAX_REMOTE_NODE_IDENTITY, "remote-node"),
        }
    }

    /// The scope of labels: CIDR and FQDN labels are node-local, and so are
    /// other nodes' (remote-node with `node:` labels).
    pub fn of(labels: &LabelSet) -> Scope {
        if labels.has_reserved("remote-node") && labels.iter().any(|l| l.source == cilium_labels::SOURCE_NODE) {
            Scope::RemoteNode
        } else if labels.iter().any(|l| l.source == cilium_labels::SOURCE_CIDR || l.source == "fqdn") {
            Scope::Local
        } else {
            Scope::Cluster
        }
    }
}

/// One identity: its number, labels and number of users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: NumericIdentity,
    pub labels: LabelSet,
    #[serde(default)]
    pub references: u32,
}

/// The labels of a reserved identity.
pub fn reserved_labels(r: ReservedIdentity) -> LabelSet {
    let mut s = LabelSet::new();
    s.insert(Label::reserved(r.label()));
    // both worlds are `reserved:world` (the `world` entity), each with
    // its family's label (`world-ipv4`, `world-ipv6`)
    if r == ReservedIdentity::World {
        s.insert(Label::reserved("world-ipv4"));
    }
    if r == ReservedIdentity::WorldIpv6 {
        s.insert(Label::reserved("world"));
    }
    s
}

/// The reserved identity a label set names, if it is one.
pub fn lookup_reserved(labels: &LabelSet) -> Option<ReservedIdentity> {
    if labels.len() != 1 && !(labels.len() == 2 && labels.has_reserved("world")) {
        return None;
    }
    ReservedIdentity::ALL
        .iter()
        .copied()
        .filter(|r| *r != ReservedIdentity::Unknown)
        .find(|r| reserved_labels(*r) == *labels || (labels.len() == 1 && labels.has_reserved(r.label())))
}

/// Allocates identities for label sets, with reference counts.
#[derive(Debug, Clone)]
pub struct Allocator {
    by_id: BTreeMap<NumericIdentity, Identity>,
    by_labels: HashMap<LabelSet, NumericIdentity>,
    next: HashMap<&'static str, u32>,
    cluster: Option<std::sync::Arc<dyn ClusterNumbers>>,
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator::new()
    }
}

impl Allocator {
    /// A fresh allocator holding the reserved identities.
    pub fn new() -> Allocator {
        let mut a = Allocator { by_id: BTreeMap::new(), by_labels: HashMap::new(), next: HashMap::new(), cluster: None };
        for r in ReservedIdentity::ALL.iter().copied().filter(|r| *r != ReservedIdentity::Unknown) {
            let labels = reserved_labels(r);
            a.by_labels.insert(labels.clone(), r.code());
            a.by_id.insert(r.code(), Identity { id: r.code(), labels, references: 0 });
        }
        a
    }

    /// Returns the identity for `labels`, allocating one if needed, and takes
    /// a reference. Reserved label sets map to their reserved identity.
    pub fn allocate(&mut self, labels: &LabelSet) -> Result<(NumericIdentity, bool), IdentityError> {
        if let Some(r) = lookup_reserved(labels) {
            return Ok((r.code(), false));
        }
        if let Some(&id) = self.by_labels.get(labels) {
            if let Some(ident) = self.by_id.get_mut(&id) {
                ident.references += 1;
            }
            return Ok((id, false));
        }
        let scope = Scope::of(labels);
        if let (Scope::Cluster, Some(c)) = (scope, &self.cluster) {
            let id = c.number(labels).map_err(|reason| IdentityError::Cluster { labels: labels.to_string(), reason })?;
            if let Some(existing) = self.by_id.get(&id) {
                return Err(IdentityError::Conflict { id, existing: existing.labels.to_string(), wanted: labels.to_string() });
            }
            self.by_labels.insert(labels.clone(), id);
            self.by_id.insert(id, Identity { id, labels: labels.clone(), references: 1 });
            return Ok((id, true));
        }
        let (min, max, name) = scope.range();
        let start = *self.next.get(name).unwrap_or(&min);
        let span = max - min + 1;
        let mut candidate = None;
        for i in 0..span {
            let id = min + (start - min + i) % span;
            if !self.by_id.contains_key(&id) {
                candidate = Some(id);
                break;
            }
        }
        let id = candidate.ok_or(IdentityError::Exhausted { scope: name, min, max })?;
        self.next.insert(name, if id == max { min } else { id + 1 });
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, Identity { id, labels: labels.clone(), references: 1 });
        Ok((id, true))
    }

    /// Re-creates an identity with a known number (after a restart), taking a
    /// reference. Fails if the number belongs to other labels.
    /// Takes cluster-scope numbers from `c` from now on.
    pub fn set_cluster(&mut self, c: std::sync::Arc<dyn ClusterNumbers>) {
        self.cluster = Some(c);
    }

    pub fn restore(&mut self, id: NumericIdentity, labels: &LabelSet) -> Result<(), IdentityError> {
        if let Some(existing) = self.by_id.get_mut(&id) {
            if existing.labels != *labels {
                return Err(IdentityError::Conflict {
                    id,
                    existing: existing.labels.to_string(),
                    wanted: labels.to_string(),
                });
            }
            existing.references += 1;
            return Ok(());
        }
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, Identity { id, labels: labels.clone(), references: 1 });
        Ok(())
    }

    /// With cluster numbers: asks the cluster for the number of every
    /// cluster-scope identity held (restored from saved state, say) and
    /// moves each it numbers differently to the cluster's number, with its
    /// references. Returns old -> new for those moved; nothing changes on
    /// an error (the cluster unreachable, or a new number held by labels
    /// that are not moving).
    pub fn reclaim(&mut self) -> Result<BTreeMap<NumericIdentity, NumericIdentity>, IdentityError> {
        let Some(c) = self.cluster.clone() else { return Ok(BTreeMap::new()) };
        let mut moves = BTreeMap::new();
        for i in self.by_id.values().filter(|i| i.id >= MIN_CLUSTER_IDENTITY && i.id <= MAX_CLUSTER_IDENTITY && Scope::of(&i.labels) == Scope::Cluster) {
            let n = c.number_preferring(&i.labels, i.id).map_err(|reason| IdentityError::Cluster { labels: i.labels.to_string(), reason })?;
            if n != i.id {
                moves.insert(i.id, n);
            }
        }
        for (old, new) in &moves {
            if let Some(holder) = self.by_id.get(new).filter(|h| !moves.contains_key(&h.id)) {
                return Err(IdentityError::Conflict { id: *new, existing: holder.labels.to_string(), wanted: self.by_id[old].labels.to_string() });
            }
        }
        let moved: Vec<Identity> = moves.keys().filter_map(|old| self.by_id.remove(old)).collect();
        for mut i in moved {
            i.id = moves[&i.id];
            self.by_labels.insert(i.labels.clone(), i.id);
            self.by_id.insert(i.id, i);
        }
        Ok(moves)
    }

    /// Drops a reference. Returns true when the identity was freed.
    pub fn release(&mut self, id: NumericIdentity) -> Result<bool, IdentityError> {
        if id < MIN_CLUSTER_IDENTITY {
            return Ok(false);
        }
        let ident = self.by_id.get_mut(&id).ok_or(IdentityError::NotAllocated { id })?;
        ident.references = ident.references.saturating_sub(1);
        if ident.references > 0 {
            return Ok(false);
        }
        let labels = ident.labels.clone();
        self.by_id.remove(&id);
        self.by_labels.remove(&labels);
        Ok(true)
    }

    pub fn get(&self, id: NumericIdentity) -> Option<&Identity> {
        self.by_id.get(&id)
    }

    pub fn lookup(&self, labels: &LabelSet) -> Option<NumericIdentity> {
        lookup_reserved(labels).map(|r| r.code()).or_else(|| self.by_labels.get(labels).copied())
    }

    /// Every identity, reserved ones included, in numeric order.
    pub fn iter(&self) -> impl Iterator<Item = &Identity> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ls(items: &[&str]) -> LabelSet {
        LabelSet::parse_all(items.iter().copied())
    }

    #[test]
    fn only_a_remote_node_with_node_labels_is_in_the_remote_node_range() {
        let mut a = Allocator::new();
        let (n, _) = a.allocate(&ls(&["reserved:remote-node", "node:zone=a"])).unwrap();
        assert!((MIN_REMOTE_NODE_IDENTITY..=MAX_REMOTE_NODE_IDENTITY).contains(&n), "{n}");
        let (p, _) = a.allocate(&ls(&["k8s:app=web", "node:zone=a"])).unwrap();
        assert!((MIN_CLUSTER_IDENTITY..=MAX_CLUSTER_IDENTITY).contains(&p), "a node: label alone does not make a node: {p}");
        assert_eq!(a.allocate(&ls(&["reserved:remote-node"])).unwrap().0, 6, "a node without labels is remote-node");
    }

    #[test]
    fn same_labels_same_identity_and_release() {
        let mut a = Allocator::new();
        let (x, new) = a.allocate(&ls(&["k8s:app=web"])).unwrap();
        assert!(new);
        assert!(x >= MIN_CLUSTER_IDENTITY);
        let (y, new) = a.allocate(&ls(&["k8s:app=web"])).unwrap();
        assert_eq!((x, new), (y, false));
        let (z, _) = a.allocate(&ls(&["k8s:app=db"])).unwrap();
        assert_ne!(x, z);
        assert!(!a.release(x).unwrap());
        assert!(a.release(x).unwrap());
        assert!(a.get(x).is_none());
        assert!(a.lookup(&ls(&["k8s:app=web"])).is_none());
    }

    #[test]
    fn reserved_identities_are_fixed() {
        let mut a = Allocator::new();
        assert_eq!(a.allocate(&ls(&["reserved:host"])).unwrap().0, 1);
        assert_eq!(a.lookup(&ls(&["reserved:world"])), Some(2));
        assert_eq!(a.get(6).unwrap().labels, ls(&["reserved:remote-node"]));
        assert_eq!(a.get(8).unwrap().labels, ls(&["reserved:ingress"]));
        assert!(!a.release(1).unwrap(), "reserved identities are never freed");
    }

    #[test]
    fn cidr_labels_get_local_identities() {
        let mut a = Allocator::new();
        let (id, _) = a.allocate(&ls(&["cidr:10.0.0.0/8", "reserved:world"])).unwrap();
        assert!(id >= MIN_LOCAL_IDENTITY);
    }

    #[test]
    fn restore_keeps_numbers_and_detects_conflicts() {
        let mut a = Allocator::new();
        a.restore(300, &ls(&["k8s:app=web"])).unwrap();
        assert_eq!(a.lookup(&ls(&["k8s:app=web"])), Some(300));
        assert!(matches!(a.restore(300, &ls(&["k8s:app=db"])), Err(IdentityError::Conflict { .. })));
        // new allocations skip the restored number
        let (id, _) = a.allocate(&ls(&["k8s:app=other"])).unwrap();
        assert_ne!(id, 300);
    }

    #[test]
    fn freed_numbers_are_not_reused_immediately() {
        let mut a = Allocator::new();
        let (x, _) = a.allocate(&ls(&["k8s:a=1"])).unwrap();
        a.release(x).unwrap();
        let (y, _) = a.allocate(&ls(&["k8s:a=2"])).unwrap();
        assert_ne!(x, y, "a freed identity is not handed out again right away");
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    /// A stand-in for the kvstore: numbers by label key, counting calls.
    #[derive(Debug, Default)]
    struct Fixed(std::sync::Mutex<Vec<String>>);
    impl ClusterNumbers for Fixed {
        fn number(&self, labels: &LabelSet) -> Result<NumericIdentity, String> {
            let key = labels_key(labels);
            self.0.lock().unwrap().push(key.clone());
            if key.contains("down") {
                return Err("etcd unreachable".into());
            }
            Ok(if key.contains("app=a") { 300 } else { 301 })
        }
    }

    fn set(l: &str) -> LabelSet {
        [Label::new("k8s", l.split('=').next().unwrap(), l.split('=').nth(1).unwrap())].into_iter().collect()
    }

    #[test]
    fn reclaim_moves_restored_numbers_to_the_clusters() {
        let c = std::sync::Arc::new(Fixed::default());
        let mut a = Allocator::new();
        // saved state said a=301 and b=300, the cluster says the opposite
        a.restore(301, &set("app=a")).unwrap();
        a.restore(300, &set("app=b")).unwrap();
        a.restore(300, &set("app=b")).unwrap();
        a.set_cluster(c.clone());
        let moves = a.reclaim().unwrap();
        assert_eq!(moves, BTreeMap::from([(300, 301), (301, 300)]), "a swap moves both");
        assert_eq!(a.lookup(&set("app=a")), Some(300));
        assert_eq!(a.lookup(&set("app=b")), Some(301));
        assert!(!a.release(301).unwrap(), "b kept its two references");
        assert!(a.reclaim().unwrap().is_empty(), "nothing left to move");
        // unreachable: nothing changes
        a.restore(302, &set("app=down")).unwrap();
        assert!(a.reclaim().is_err());
        assert_eq!(a.lookup(&set("app=down")), Some(302));
    }

    #[test]
    fn cluster_scope_numbers_come_from_the_cluster_once() {
        let c = std::sync::Arc::new(Fixed::default());
        let mut a = Allocator::new();
        a.set_cluster(c.clone());
        assert_eq!(a.allocate(&set("app=a")).unwrap(), (300, true));
        assert_eq!(a.allocate(&set("app=a")).unwrap(), (300, false), "held locally: no second ask");
        assert_eq!(a.allocate(&set("app=b")).unwrap(), (301, true));
        assert_eq!(c.0.lock().unwrap().as_slice(), ["k8s:app=a;", "k8s:app=b;"]);
        // node-local identities never ask
        let cidr: LabelSet = [Label::new(cilium_labels::SOURCE_CIDR, "10.0.0.0/8", "")].into_iter().collect();
        assert!(a.allocate(&cidr).unwrap().0 >= MIN_LOCAL_IDENTITY);
        assert_eq!(c.0.lock().unwrap().len(), 2);
        // an unreachable kvstore is an error naming the labels
        let e = a.allocate(&set("app=down")).unwrap_err();
        assert!(matches!(e, IdentityError::Cluster { .. }) && e.to_string().contains("etcd unreachable"), "{e}");
    }
}
