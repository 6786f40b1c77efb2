//! Host-scope IPAM: addresses for the node's pods from its pod CIDRs (IPv4, and IPv6 when enabled).
//!
//! The first usable address is the node's router (gateway) address. An
//! allocation is keyed by its owner (container ID and interface), so asking
//! twice for one owner returns the same address. The allocator is pure data;
//! the agent persists it before answering, which is what makes allocations
//! survive restarts without ever being handed out twice.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("pod CIDR {cidr} is exhausted ({used} addresses in use)")]
    Exhausted { cidr: IpNet, used: usize },
    #[error("pod CIDR {cidr} is too small: need at least a /{max}")]
    TooSmall { cidr: IpNet, max: u8 },
    #[error("address {ip} is not in pod CIDR {cidr}")]
    OutOfRange { ip: IpAddr, cidr: IpNet },
    #[error("address {ip} is already allocated to {owner}")]
    InUse { ip: IpAddr, owner: String },
}

/// A pod CIDR of either family, seen as a range of integers.
pub trait PodCidr: Copy + Eq + Debug + Display + Serialize + DeserializeOwned + Into<IpNet> {
    type Addr: Copy + Ord + Debug + Display + Serialize + DeserializeOwned + Into<IpAddr>;
    /// The longest prefix that still leaves room for a router and a pod.
    const MAX_PREFIX: u8;
    fn trunc(&self) -> Self;
    fn prefix_len(&self) -> u8;
    /// The network address and the last address, as integers.
    fn bounds(&self) -> (u128, u128);
    fn addr(n: u128) -> Self::Addr;
    fn num(a: Self::Addr) -> u128;
}

impl PodCidr for Ipv4Net {
    type Addr = Ipv4Addr;
    const MAX_PREFIX: u8 = 30;
    fn trunc(&self) -> Self {
        Ipv4Net::trunc(self)
    }
    fn prefix_len(&self) -> u8 {
        Ipv4Net::prefix_len(self)
    }
    fn bounds(&self) -> (u128, u128) {
        (u32::from(self.network()) as u128, u32::from(self.broadcast()) as u128)
    }
    fn addr(n: u128) -> Ipv4Addr {
        Ipv4Addr::from(n as u32)
    }
    fn num(a: Ipv4Addr) -> u128 {
        u32::from(a) as u128
    }
}

impl PodCidr for Ipv6Net {
    type Addr = Ipv6Addr;
    const MAX_PREFIX: u8 = 126;
    fn trunc(&self) -> Self {
        Ipv6Net::trunc(self)
    }
    fn prefix_len(&self) -> u8 {
        Ipv6Net::prefix_len(self)
    }
    fn bounds(&self) -> (u128, u128) {
        (u128::from(self.network()), u128::from(self.broadcast()))
    }
    fn addr(n: u128) -> Ipv6Addr {
        Ipv6Addr::from(n)
    }
    fn num(a: Ipv6Addr) -> u128 {
        u128::from(a)
    }
}

/// The allocator's state for one pod CIDR. Neither the network address
/// nor the last one is handed out (IPv4's broadcast; kept symmetric for
/// IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Pool<N: PodCidr> {
    cidr: N,
    /// address -> owner
    allocated: BTreeMap<N::Addr, String>,
    /// where the next search starts, so freed addresses are reused last
    next: N::Addr,
}

/// IPv4 pod addresses.
pub type Ipam = Pool<Ipv4Net>;
/// IPv6 pod addresses.
pub type Ipam6 = Pool<Ipv6Net>;

impl<N: PodCidr> Pool<N> {
    pub fn new(cidr: N) -> Result<Pool<N>, IpamError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > N::MAX_PREFIX {
            return Err(IpamError::TooSmall { cidr: cidr.into(), max: N::MAX_PREFIX });
        }
        let router = Self::router_of(cidr);
        let mut allocated = BTreeMap::new();
        allocated.insert(router, "router".to_string());
        Ok(Pool { cidr, allocated, next: router })
    }

    fn router_of(cidr: N) -> N::Addr {
        N::addr(cidr.bounds().0 + 1)
    }

    pub fn cidr(&self) -> N {
        self.cidr
    }

    /// The node's router address on the pod network (the pods' gateway).
    pub fn router(&self) -> N::Addr {
        Self::router_of(self.cidr)
    }

    /// Allocates an address for `owner`, or returns the one it already has.
    pub fn allocate(&mut self, owner: &str) -> Result<N::Addr, IpamError> {
        if let Some(ip) = self.owner_of(owner) {
            return Ok(ip);
        }
        let (net, last) = self.cidr.bounds();
        let (first, last) = (net + 1, last - 1);
        let span = last - first + 1;
        let start = N::num(self.next).clamp(first, last);
        let mut i: u128 = 1;
        while i <= span {
            let candidate = N::addr(first + (start - first + i) % span);
            if !self.allocated.contains_key(&candidate) {
                self.allocated.insert(candidate, owner.to_string());
                self.next = candidate;
                return Ok(candidate);
            }
            i += 1;
        }
        Err(IpamError::Exhausted { cidr: self.cidr.into(), used: self.allocated.len() })
    }

    /// Allocates a specific address (restoring an endpoint).
    pub fn allocate_ip(&mut self, ip: N::Addr, owner: &str) -> Result<(), IpamError> {
        let (net, last) = self.cidr.bounds();
        let n = N::num(ip);
        if n <= net || n >= last {
            return Err(IpamError::OutOfRange { ip: ip.into(), cidr: self.cidr.into() });
        }
        match self.allocated.get(&ip) {
            Some(o) if o == owner => Ok(()),
            Some(o) => Err(IpamError::InUse { ip: ip.into(), owner: o.clone() }),
            None => {
                self.allocated.insert(ip, owner.to_string());
                Ok(())
            }
        }
    }

    /// Releases an address. Returns whether it was allocated.
    pub fn release(&mut self, ip: N::Addr) -> bool {
        if ip == self.router() {
            return false;
        }
        self.allocated.remove(&ip).is_some()
    }

    /// Releases whatever `owner` holds. Returns the address, if any.
    pub fn release_owner(&mut self, owner: &str) -> Option<N::Addr> {
        let ip = self.owner_of(owner)?;
        self.allocated.remove(&ip);
        Some(ip)
    }

    /// The address `owner` holds, if any.
    pub fn owner_of(&self, owner: &str) -> Option<N::Addr> {
        self.allocated.iter().find(|(_, o)| *o == owner).map(|(ip, _)| *ip)
    }

    pub fn owner(&self, ip: N::Addr) -> Option<&str> {
        self.allocated.get(&ip).map(String::as_str)
    }

    /// Every allocation, router included.
    pub fn allocations(&self) -> impl Iterator<Item = (N::Addr, &str)> {
        self.allocated.iter().map(|(ip, o)| (*ip, o.as_str()))
    }

    /// Addresses left (saturating at usize::MAX for large IPv6 ranges).
    pub fn available(&self) -> usize {
        let (net, last) = self.cidr.bounds();
        let hosts = last - net - 1;
        usize::try_from(hosts - self.allocated.len() as u128).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn router_is_first_address_and_pods_follow() {
        let mut ipam = Ipam::new(net("10.0.1.0/24")).unwrap();
        assert_eq!(ipam.router(), Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(ipam.allocate("a").unwrap(), Ipv4Addr::new(10, 0, 1, 2));
        assert_eq!(ipam.allocate("b").unwrap(), Ipv4Addr::new(10, 0, 1, 3));
    }

    #[test]
    fn same_owner_same_address() {
        let mut ipam = Ipam::new(net("10.0.1.0/24")).unwrap();
        let a = ipam.allocate("c1/eth0").unwrap();
        assert_eq!(ipam.allocate("c1/eth0").unwrap(), a);
        assert_eq!(ipam.release_owner("c1/eth0"), Some(a));
        assert_eq!(ipam.release_owner("c1/eth0"), None);
    }

    #[test]
    fn exhaustion_and_release() {
        let mut ipam = Ipam::new(net("10.0.1.0/29")).unwrap(); // 6 hosts, 1 router
        let ips: Vec<_> = (0..5).map(|i| ipam.allocate(&format!("o{i}")).unwrap()).collect();
        assert_eq!(ipam.available(), 0);
        assert!(matches!(ipam.allocate("x"), Err(IpamError::Exhausted { .. })));
        assert!(ipam.release(ips[2]));
        assert_eq!(ipam.allocate("x").unwrap(), ips[2]);
        let unique: std::collections::BTreeSet<_> = ipam.allocations().map(|(ip, _)| ip).collect();
        assert_eq!(unique.len(), 6);
    }

    #[test]
    fn freed_addresses_are_reused_last() {
        let mut ipam = Ipam::new(net("10.0.1.0/24")).unwrap();
        let a = ipam.allocate("a").unwrap();
        ipam.release(a);
        assert_ne!(ipam.allocate("b").unwrap(), a);
    }

    #[test]
    fn restore_specific_address() {
        let mut ipam = Ipam::new(net("10.0.1.0/24")).unwrap();
        ipam.allocate_ip(Ipv4Addr::new(10, 0, 1, 9), "a").unwrap();
        assert!(matches!(ipam.allocate_ip(Ipv4Addr::new(10, 0, 1, 9), "b"), Err(IpamError::InUse { .. })));
        assert!(matches!(ipam.allocate_ip(Ipv4Addr::new(10, 0, 2, 9), "b"), Err(IpamError::OutOfRange { .. })));
        assert!(!ipam.release(ipam.router()), "the router address is never released");
    }

    #[test]
    fn tiny_cidr_rejected() {
        assert!(matches!(Ipam::new(net("10.0.0.0/31")), Err(IpamError::TooSmall { .. })));
        assert!(matches!(Ipam6::new("fd00::/127".parse().unwrap()), Err(IpamError::TooSmall { max: 126, .. })));
    }

    #[test]
    fn ipv6_pool() {
        let mut ipam = Ipam6::new("fd00:10:1::/112".parse().unwrap()).unwrap();
        assert_eq!(ipam.router(), "fd00:10:1::1".parse::<Ipv6Addr>().unwrap());
        let a = ipam.allocate("a").unwrap();
        assert_eq!(a, "fd00:10:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ipam.allocate("a").unwrap(), a);
        assert_eq!(ipam.available(), 65534 - 2);
        assert!(matches!(ipam.allocate_ip("fd00:10:2::9".parse().unwrap(), "b"), Err(IpamError::OutOfRange { .. })));
        assert!(matches!(ipam.allocate_ip("fd00:10:1::ffff".parse().unwrap(), "b"), Err(IpamError::OutOfRange { .. })));
        let json = serde_json::to_string(&ipam).unwrap();
        assert_eq!(serde_json::from_str::<Ipam6>(&json).unwrap(), ipam);
        let mut tiny = Ipam6::new("fd00::/126".parse().unwrap()).unwrap();
        tiny.allocate("x").unwrap();
        assert!(matches!(tiny.allocate("y"), Err(IpamError::Exhausted { .. })));
    }
}
