//! What the L7 proxy needs from the daemon: a snapshot of rules, endpoints
//! and identities, from which each proxied connection's checks are derived
//! with the same matching the policy computation uses.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use cilium_datapath::Datapath;
use cilium_labels::LabelSet;
use cilium_hubble::names::{Attribution, PolicyName, PolicyQuery};
use cilium_policy::trace::{L7Policy, Party, l7_policy, trace};
use cilium_policy::{NamedPorts, PolicyOptions, Protocol, Rule};
use cilium_proxy::{Check, ConnInfo, ConnPolicy, HttpRules};
use ipnet::Ipv4Net;

use super::Daemon;

/// A local endpoint as the proxy sees it.
#[derive(Debug, Clone)]
struct Local {
    identity: u32,
    labels: LabelSet,
    named_ports: NamedPorts,
}

/// The daemon's state the proxy decides with.
#[derive(Debug, Clone, Default)]
pub struct ProxySnapshot {
    rules: Vec<Rule>,
    identities: HashMap<u32, LabelSet>,
    /// By each of the endpoint's addresses.
    endpoints: HashMap<IpAddr, Local>,
    ipcache: BTreeMap<Ipv4Net, u32>,
    options: PolicyOptions,
}

impl ProxySnapshot {
    fn identity_of(&self, ip: Ipv4Addr) -> u32 {
        if let Some(e) = self.endpoints.get(&IpAddr::V4(ip)) {
            return e.identity;
        }
        for len in (0..=32u8).rev() {
            if let Ok(net) = Ipv4Net::new(ip, len) {
                if let Some(id) = self.ipcache.get(&net.trunc()) {
                    return *id;
                }
            }
        }
        cilium_abi::ReservedIdentity::World as u32
    }

    /// Identities and checks for one proxied connection: the client's
    /// egress and the server's ingress, for each that is a local endpoint.
    pub fn conn_policy(&self, c: &ConnInfo) -> ConnPolicy {
        let (src_ip, dst_ip, port) = (*c.client.ip(), *c.server.ip(), c.server.port());
        let src_identity = self.identity_of(src_ip);
        let dst_identity = self.identity_of(dst_ip);
        let (src_ip, dst_ip) = (IpAddr::V4(src_ip), IpAddr::V4(dst_ip));
        let empty = LabelSet::default();
        let labels = |id: u32| self.identities.get(&id).unwrap_or(&empty);
        let no_ports = NamedPorts::new();
        let dst_ports = self.endpoints.get(&dst_ip).map(|e| &e.named_ports).unwrap_or(&no_ports);
        let mut checks = Vec::new();
        let proto = if c.udp { Protocol::Udp } else { Protocol::Tcp };
        if let Some(src) = self.endpoints.get(&src_ip) {
            checks.push(l7_policy(&self.rules, &src.labels, labels(dst_identity), true, proto, port, dst_ports, self.options));
        }
        if let Some(dst) = self.endpoints.get(&dst_ip) {
            checks.push(l7_policy(&self.rules, &dst.labels, labels(src_identity), false, proto, port, dst_ports, self.options));
        }
        let checks = checks
            .into_iter()
            .filter_map(|p| match p {
                L7Policy::Unrestricted => None,
                L7Policy::Denied => Some(Check::Denied),
                // rules were validated at import; a failure here denies
                L7Policy::Http(rules) => Some(HttpRules::compile(&rules).map(Check::Rules).unwrap_or(Check::Denied)),
                L7Policy::Dns(sels) => Some(Check::Dns(sels.iter().map(cilium_policy::fqdn::NameMatcher::new).collect())),
                L7Policy::Kafka(rules) => Some(Check::Kafka(rules.iter().map(cilium_policy::kafka::Matcher::new).collect())),
            })
            .collect();
        ConnPolicy { src_identity, dst_identity, checks }
    }
}

impl ProxySnapshot {
    /// The policies that allowed or denied traffic (Hubble's policy
    /// verdicts), with the same trace `cilium policy trace` runs.
    pub fn attribute(&self, q: &PolicyQuery) -> Attribution {
        let protocol = match q.protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            1 => Protocol::Icmp,
            58 => Protocol::Icmpv6,
            _ => return Attribution::default(),
        };
        let empty = LabelSet::default();
        let no_ports = NamedPorts::new();
        let labels = |id: u32| self.identities.get(&id).unwrap_or(&empty);
        let local_ports = self.endpoints.get(&q.local).map(|e| &e.named_ports).unwrap_or(&no_ports);
        let src = Party { labels: labels(q.src_identity), is_endpoint: q.egress, named_ports: &no_ports };
        let dst = Party { labels: labels(q.dst_identity), is_endpoint: !q.egress, named_ports: if q.egress { &no_ports } else { local_ports } };
        let t = trace(&self.rules, &src, &dst, protocol, q.port, self.options);
        let d = if q.egress { t.egress } else { t.ingress };
        let name = |r: cilium_policy::PolicyRef| PolicyName { kind: r.kind.as_str().to_string(), namespace: r.namespace.unwrap_or_default(), name: r.name };
        d.map(|d| Attribution { allowed_by: d.allowed_by.into_iter().map(name).collect(), denied_by: d.denied_by.into_iter().map(name).collect() }).unwrap_or_default()
    }
}

impl<D: Datapath> Daemon<D> {
    pub fn proxy_snapshot(&self) -> ProxySnapshot {
        let mut endpoints = HashMap::new();
        for e in self.endpoints.values() {
            let r = &e.rec;
            let mut named_ports = NamedPorts::new();
            Self::named_ports(self.pods.get(&Self::pod_key(&r.namespace, &r.pod_name)), &mut named_ports);
            let local = Local { identity: r.identity, labels: r.labels.clone(), named_ports };
            if let Some(ip6) = r.ipv6 {
                endpoints.insert(IpAddr::V6(ip6), local.clone());
            }
            endpoints.insert(IpAddr::V4(r.ipv4), local);
        }
        ProxySnapshot {
            rules: self.repo.rules().to_vec(),
            identities: self.identities.iter().map(|i| (i.id, i.labels.clone())).collect(),
            endpoints,
            // the proxy serves IPv4 only
            ipcache: self
                .ipcache_written
                .iter()
                .filter_map(|(p, v)| match p {
                    ipnet::IpNet::V4(v4) => Some((*v4, v.sec_identity)),
                    ipnet::IpNet::V6(_) => None,
                })
                .collect(),
            options: self.cfg.policy,
        }
    }
}
