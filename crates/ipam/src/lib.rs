//! Host-scope IPAM: addresses for the node's pods from its pod CIDR.
//!
//! The first usable address is the node's router (gateway) address. An
//! allocation is keyed by its owner (container ID and interface), so asking
//! twice for one owner returns the same address. The allocator is pure data;
//! the agent persists it before answering, which is what makes allocations
//! survive restarts without ever being handed out twice.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("pod CIDR {cidr} is exhausted ({used} addresses in use)")]
    Exhausted { cidr: Ipv4Net, used: usize },
    #[error("pod CIDR {cidr} is too small: need at least a /30")]
    TooSmall { cidr: Ipv4Net },
    #[error("address {ip} is not in pod CIDR {cidr}")]
    OutOfRange { ip: Ipv4Addr, cidr: Ipv4Net },
    #[error("address {ip} is already allocated to {owner}")]
    InUse { ip: Ipv4Addr, owner: String },
}

/// The allocator's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipam {
    cidr: Ipv4Net,
    /// address -> owner
    allocated: BTreeMap<Ipv4Addr, String>,
    /// where the next search starts, so freed addresses are reused last
    next: Ipv4Addr,
}

impl Ipam {
    pub fn new(cidr: Ipv4Net) -> Result<Ipam, IpamError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > 30 {
            return Err(IpamError::TooSmall { cidr });
        }
        let router = Self::router_of(cidr);
        let mut allocated = BTreeMap::new();
        allocated.insert(router, "router".to_string());
        Ok(Ipam { cidr, allocated, next: router })
    }

    fn router_of(cidr: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(cidr.network()) + 1)
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The node's router address on the pod network (the pods' gateway).
    pub fn router(&self) -> Ipv4Addr {
        Self::router_of(self.cidr)
    }

    /// Allocates an address for `owner`, or returns the one it already has.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        if let Some((ip, _)) = self.allocated.iter().find(|(_, o)| *o == owner) {
            return Ok(*ip);
        }
        let first = u32::from(self.cidr.network()) + 1;
        let last = u32::from(self.cidr.broadcast()) - 1;
        let span = last - first + 1;
        let start = u32::from(self.next).clamp(first, last);
        for i in 1..=span {
            let candidate = Ipv4Addr::from(first + (start - first + i) % span);
            if !self.allocated.contains_key(&candidate) {
                self.allocated.insert(candidate, owner.to_string());
                self.next = candidate;
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted { cidr: self.cidr, used: self.allocated.len() })
    }

    /// Allocates a specific address (restoring an endpoint).
    pub fn allocate_ip(&mut self, ip: Ipv4Addr, owner: &str) -> Result<(), IpamError> {
        if !self.cidr.contains(&ip) || ip == self.cidr.network() || ip == self.cidr.broadcast() {
            return Err(IpamError::OutOfRange { ip, cidr: self.cidr });
        }
        match self.allocated.get(&ip) {
            Some(o) if o == owner => Ok(()),
            Some(o) => Err(IpamError::InUse { ip, owner: o.clone() }),
            None => {
                self.allocated.insert(ip, owner.to_string());
                Ok(())
            }
        }
    }

    /// Releases an address. Returns whether it was allocated.
    pub fn release(&mut self, ip: Ipv4Addr) -> bool {
        if ip == self.router() {
            return false;
        }
        self.allocated.remove(&ip).is_some()
    }

    /// Releases whatever `owner` holds. Returns the address, if any.
    pub fn release_owner(&mut self, owner: &str) -> Option<Ipv4Addr> {
        let ip = self.allocated.iter().find(|(_, o)| *o == owner).map(|(ip, _)| *ip)?;
        self.allocated.remove(&ip);
        Some(ip)
    }

    pub fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.allocated.get(&ip).map(String::as_str)
    }

    /// Every allocation, router included.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.allocated.iter().map(|(ip, o)| (*ip, o.as_str()))
    }

    /// Addresses left.
    pub fn available(&self) -> usize {
        let hosts = (1u64 << (32 - self.cidr.prefix_len())) - 2;
        hosts as usize - self.allocated.len()
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
    }
}
