//! An in-memory [`Datapath`] for tests of the layers above the kernel. It
//! stores what it is told and can be made to fail, nothing more.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use cilium_abi::{
    CtEntry, EndpointInfo, IpcacheValue, Lb4Backend, Lb4Key, Lb4Service, Lb4SrcRangeKey, LbMaglevKey, MetricsKey,
    MetricsValue, PolicyEntry, PolicyKey,
};
use ipnet::IpNet;

use crate::{Datapath, DatapathError, LbDump, LbOp, MapPressure, Result};

/// The fake's state, public so tests can inspect it.
#[derive(Debug, Default, Clone)]
pub struct FakeDatapath {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    pub policy: BTreeMap<PolicyKeyOrd, PolicyEntry>,
    pub policy_rev: u32,
    pub attached: BTreeSet<String>,
    /// Fail policy inserts once this many entries exist (to test overflow).
    pub policy_max: Option<usize>,
    /// Every policy write, in order: (inserted?, key).
    pub policy_log: Vec<(bool, PolicyKey)>,
    /// Interfaces that exist: name -> ifindex.
    pub links: BTreeMap<String, u32>,
    pub up: BTreeSet<String>,
    pub routes: BTreeMap<IpNet, String>,
    /// Addresses whose conntrack entries were flushed.
    pub ct_flushed: Vec<IpAddr>,
    /// The service maps.
    pub lb_services: BTreeMap<(u32, u16, u16, u8), Lb4Service>,
    pub lb_backends: BTreeMap<u32, Lb4Backend>,
    pub lb_maglev: BTreeMap<(u16, u32), u32>,
    /// (service, prefix length, address)
    pub lb_src_ranges: BTreeSet<(u16, u32, u32)>,
    pub netdevs: BTreeSet<String>,
    /// How many service-map writes (sets and deletes) were made.
    pub lb_writes: usize,
    pub cgroups: Vec<std::path::PathBuf>,
}

fn lb_key(k: &Lb4Key) -> (u32, u16, u16, u8) {
    (k.address, k.dport, k.backend_slot, k.proto)
}

/// PolicyKey with an order, for the fake's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyKeyOrd(pub u32, pub u16, pub u8, pub u32, pub u8, pub u16);

impl From<&PolicyKey> for PolicyKeyOrd {
    fn from(k: &PolicyKey) -> Self {
        PolicyKeyOrd(k.prefixlen, k.ep_id, k.gen_dir, k.identity, k.protocol, k.dport)
    }
}

impl PolicyKeyOrd {
    pub fn key(&self) -> PolicyKey {
        PolicyKey {
            prefixlen: self.0,
            ep_id: self.1,
            gen_dir: self.2,
            pad0: 0,
            identity: self.3,
            protocol: self.4,
            pad1: 0,
            dport: self.5,
        }
    }
}

impl Datapath for FakeDatapath {
    fn endpoint_upsert(&mut self, info: &EndpointInfo) -> Result<()> {
        self.endpoints.insert(info.ifindex, *info);
        Ok(())
    }
    fn endpoint_delete(&mut self, ifindex: u32) -> Result<()> {
        self.endpoints.remove(&ifindex);
        Ok(())
    }
    fn endpoints(&self) -> Result<Vec<EndpointInfo>> {
        Ok(self.endpoints.values().copied().collect())
    }
    fn ipcache_upsert(&mut self, prefix: IpNet, value: &IpcacheValue) -> Result<()> {
        self.ipcache.insert(prefix, *value);
        Ok(())
    }
    fn ipcache_delete(&mut self, prefix: IpNet) -> Result<()> {
        self.ipcache.remove(&prefix);
        Ok(())
    }
    fn ipcache_dump(&self) -> Result<Vec<(IpNet, IpcacheValue)>> {
        Ok(self.ipcache.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn policy_insert(&mut self, key: &PolicyKey, entry: &PolicyEntry) -> Result<()> {
        if let Some(max) = self.policy_max {
            if self.policy.len() >= max && !self.policy.contains_key(&key.into()) {
                return Err(DatapathError::MapFull { map: "cilium_policy", max: max as u32, detail: "fake limit".into() });
            }
        }
        self.policy_log.push((true, *key));
        self.policy.insert(key.into(), *entry);
        Ok(())
    }
    fn policy_delete(&mut self, key: &PolicyKey) -> Result<()> {
        self.policy_log.push((false, *key));
        self.policy.remove(&key.into());
        Ok(())
    }
    fn policy_dump(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>> {
        Ok(self.policy.iter().map(|(k, v)| (k.key(), *v)).collect())
    }
    fn bump_policy_revision(&mut self) -> Result<u32> {
        self.policy_rev += 1;
        Ok(self.policy_rev)
    }
    fn attach(&mut self, ifname: &str) -> Result<()> {
        self.attached.insert(ifname.to_string());
        Ok(())
    }
    fn link(&self, ifname: &str) -> Result<Option<(u32, [u8; 6])>> {
        Ok(self.links.get(ifname).map(|i| (*i, [2, 0, 0, 0, 0, *i as u8])))
    }
    fn link_up(&mut self, ifname: &str) -> Result<()> {
        if !self.links.contains_key(ifname) {
            return Err(DatapathError::Interface { ifname: ifname.into(), detail: "no such interface".into() });
        }
        self.up.insert(ifname.to_string());
        Ok(())
    }
    fn route(&mut self, prefix: IpNet, ifname: &str, _src: IpAddr) -> Result<()> {
        self.routes.insert(prefix, ifname.to_string());
        Ok(())
    }
    fn unroute(&mut self, prefix: IpNet) -> Result<()> {
        self.routes.remove(&prefix);
        Ok(())
    }
    fn routes_via(&self, ifname: &str) -> Result<Vec<IpNet>> {
        Ok(self.routes.iter().filter(|(_, d)| *d == ifname).map(|(p, _)| *p).collect())
    }
    fn lb_apply(&mut self, ops: &[LbOp]) -> Result<()> {
        for op in ops {
            self.lb_writes += 1;
            match op {
                LbOp::BackendSet(id, v) => {
                    self.lb_backends.insert(*id, *v);
                }
                LbOp::BackendDel(id) => {
                    self.lb_backends.remove(id);
                }
                LbOp::ServiceSet(k, v) => {
                    self.lb_services.insert(lb_key(k), *v);
                }
                LbOp::ServiceDel(k) => {
                    self.lb_services.remove(&lb_key(k));
                }
                LbOp::MaglevSet(k, b) => {
                    self.lb_maglev.insert((k.rev_nat_index, k.slot), *b);
                }
                LbOp::MaglevDel(k) => {
                    self.lb_maglev.remove(&(k.rev_nat_index, k.slot));
                }
                LbOp::SrcRangeSet(k) => {
                    self.lb_src_ranges.insert((k.rev_nat_index, k.prefixlen, k.addr));
                }
                LbOp::SrcRangeDel(k) => {
                    self.lb_src_ranges.remove(&(k.rev_nat_index, k.prefixlen, k.addr));
                }
            }
        }
        Ok(())
    }
    fn attach_netdev(&mut self, ifname: &str) -> Result<()> {
        self.netdevs.insert(ifname.to_string());
        Ok(())
    }
    fn attach_overlay(&mut self, ifname: &str) -> Result<()> {
        self.netdevs.insert(ifname.to_string());
        Ok(())
    }
    fn lb_dump(&self) -> Result<LbDump> {
        Ok(LbDump {
            services: self
                .lb_services
                .iter()
                .map(|((a, p, s, pr), v)| (Lb4Key { address: *a, dport: *p, backend_slot: *s, proto: *pr, ..Default::default() }, *v))
                .collect(),
            backends: self.lb_backends.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev: self.lb_maglev.iter().map(|((r, s), b)| (LbMaglevKey { rev_nat_index: *r, pad: 0, slot: *s }, *b)).collect(),
            source_ranges: self.lb_src_ranges.iter().map(|(r, p, a)| Lb4SrcRangeKey { prefixlen: *p, rev_nat_index: *r, pad: 0, addr: *a }).collect(),
        })
    }
    fn attach_cgroup(&mut self, cgroup: &std::path::Path) -> Result<()> {
        self.cgroups.push(cgroup.to_path_buf());
        Ok(())
    }
    fn ct_dump(&self) -> Result<Vec<(crate::CtConn, CtEntry)>> {
        Ok(vec![])
    }
    fn ct_flush_ip(&mut self, ip: IpAddr) -> Result<usize> {
        self.ct_flushed.push(ip);
        Ok(0)
    }
    fn ct_gc(&mut self, _now: u32) -> Result<usize> {
        Ok(0)
    }
    fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>> {
        Ok(vec![])
    }
    fn lost_events(&self) -> Result<u64> {
        Ok(0)
    }
    fn pressure(&self) -> Vec<MapPressure> {
        vec![MapPressure {
            name: "cilium_policy",
            entries: self.policy.len(),
            max_entries: self.policy_max.unwrap_or(1 << 20) as u32,
        }]
    }
}
