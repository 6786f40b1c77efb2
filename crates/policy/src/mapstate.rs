//! The desired content of one endpoint's policy map: keys with identity,
//! direction, protocol and a port prefix, and allow/deny values. The datapath
//! writer turns these into `cilium_abi::PolicyKey`s without further logic.

use std::collections::BTreeMap;

use cilium_abi::{POLICY_PREFIX_L3, POLICY_PREFIX_PROTO, PolicyMatch};
use serde::{Deserialize, Serialize};

/// One policy map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MapKey {
    /// Peer identity; 0 is every identity.
    pub identity: u32,
    pub egress: bool,
    /// IP protocol number; 0 is every protocol (then port is 0/0).
    pub protocol: u8,
    /// First port of the prefix (host byte order); ICMP: the type.
    pub port: u16,
    /// Leading bits of `port` that must match (0 = every port, 16 = exactly).
    pub port_prefix: u8,
}

impl MapKey {
    /// Every protocol and port from `identity`.
    pub fn l3(identity: u32, egress: bool) -> MapKey {
        MapKey { identity, egress, protocol: 0, port: 0, port_prefix: 0 }
    }

    /// The LPM prefix length of the key in the datapath's policy trie.
    pub fn prefixlen(&self) -> u32 {
        if self.protocol == 0 {
            POLICY_PREFIX_L3
        } else {
            POLICY_PREFIX_PROTO + self.port_prefix as u32
        }
    }

    /// First and last port covered.
    pub fn port_range(&self) -> (u16, u16) {
        if self.protocol == 0 || self.port_prefix == 0 {
            return (0, u16::MAX);
        }
        let span = (1u32 << (16 - self.port_prefix as u32)) - 1;
        (self.port, (self.port as u32 + span) as u16)
    }

    /// True when this key's traffic is a superset of `other`'s (same identity
    /// and direction).
    pub fn covers(&self, other: &MapKey) -> bool {
        if self.identity != other.identity || self.egress != other.egress {
            return false;
        }
        if self.protocol == 0 {
            return true;
        }
        if self.protocol != other.protocol || self.port_prefix > other.port_prefix {
            return false;
        }
        let (lo, hi) = self.port_range();
        let (olo, ohi) = other.port_range();
        lo <= olo && ohi <= hi
    }

    /// Upstream's match type of a verdict made by this key.
    pub fn match_type(&self) -> PolicyMatch {
        match (self.identity != 0, self.protocol != 0) {
            (true, false) => PolicyMatch::L3Only,
            (true, true) => PolicyMatch::L3L4,
            (false, true) => PolicyMatch::L4Only,
            (false, false) => PolicyMatch::All,
        }
    }
}

/// One policy map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapValue {
    pub deny: bool,
    /// L7 proxy port, 0 for none.
    pub proxy_port: u16,
}

impl MapValue {
    pub const ALLOW: MapValue = MapValue { deny: false, proxy_port: 0 };
    pub const DENY: MapValue = MapValue { deny: true, proxy_port: 0 };
}

/// Splits an inclusive port range into prefix-aligned blocks `(start, prefix bits)`.
pub fn port_range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = lo as u32;
    let end = hi as u32;
    while start <= end {
        let mut bits = if start == 0 { 16 } else { start.trailing_zeros().min(16) };
        while start + (1u32 << bits) - 1 > end {
            bits -= 1;
        }
        out.push((start as u16, (16 - bits) as u8));
        start += 1u32 << bits;
    }
    out
}

/// The map entries of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapState {
    entries: BTreeMap<MapKey, MapValue>,
}

impl MapState {
    pub fn new() -> MapState {
        MapState::default()
    }

    /// Adds an entry; a deny for the same key wins over an allow, and an
    /// allow without L7 rules wins over one with them (it allows every
    /// request, as upstream's L3/L4 rules wildcard L7 rules).
    pub fn insert(&mut self, key: MapKey, value: MapValue) {
        match self.entries.get_mut(&key) {
            Some(existing) if existing.deny => {}
            Some(existing) if value.deny => *existing = value,
            Some(existing) => {
                if value.proxy_port == 0 {
                    existing.proxy_port = 0;
                }
            }
            None => {
                self.entries.insert(key, value);
            }
        }
    }

    /// An allow with L7 rules covered by an allow without them, for the same
    /// peer or every peer, allows every request: drop its L7 redirect, since
    /// the datapath would otherwise pick the more specific entry.
    pub fn resolve_l7_wildcards(&mut self) {
        let plain: Vec<MapKey> = self.entries.iter().filter(|(_, v)| !v.deny && v.proxy_port == 0).map(|(k, _)| *k).collect();
        for (k, v) in self.entries.iter_mut() {
            if v.deny || v.proxy_port == 0 {
                continue;
            }
            let covered = plain.iter().any(|p| {
                let as_peer = MapKey { identity: k.identity, ..*p };
                (p.identity == k.identity || p.identity == 0) && as_peer.covers(k)
            });
            if covered {
                v.proxy_port = 0;
            }
        }
    }

    /// Enforces deny precedence inside each identity: an allow covered by a
    /// deny of the same identity is removed, so the longest-prefix match the
    /// datapath does can only find the deny. (Across the specific and the
    /// wildcard identity, the datapath itself lets a deny win.)
    pub fn resolve_deny_precedence(&mut self) {
        let denies: Vec<MapKey> = self.entries.iter().filter(|(_, v)| v.deny).map(|(k, _)| *k).collect();
        if denies.is_empty() {
            return;
        }
        self.entries.retain(|k, v| v.deny || !denies.iter().any(|d| d != k && d.covers(k)));
    }

    pub fn get(&self, key: &MapKey) -> Option<&MapValue> {
        self.entries.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&MapKey, &MapValue)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The verdict the datapath would reach for one packet: the longest match
    /// for the identity and for the wildcard, deny in either winning. Mirrors
    /// bpf/lib/policy.h so tests can state expectations in packets.
    pub fn lookup(&self, identity: u32, egress: bool, protocol: u8, port: u16) -> Option<(MapKey, MapValue)> {
        let longest = |id: u32| -> Option<(MapKey, MapValue)> {
            self.entries
                .iter()
                .filter(|(k, _)| {
                    k.identity == id
                        && k.egress == egress
                        && (k.protocol == 0
                            || (k.protocol == protocol && {
                                let (lo, hi) = k.port_range();
                                lo <= port && port <= hi
                            }))
                })
                .max_by_key(|(k, _)| k.prefixlen())
                .map(|(k, v)| (*k, *v))
        };
        let specific = longest(identity);
        let wildcard = if identity != 0 { longest(0) } else { None };
        match (specific, wildcard) {
            (Some(s), _) if s.1.deny => Some(s),
            (_, Some(w)) if w.1.deny => Some(w),
            (Some(s), _) => Some(s),
            (None, w) => w,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_prefixes_cover_exactly() {
        for (lo, hi) in [(80, 80), (0, 65535), (1, 1023), (8000, 8080), (65535, 65535), (1024, 2047), (3, 17)] {
            let blocks = port_range_prefixes(lo, hi);
            let mut covered = Vec::new();
            for (start, bits) in &blocks {
                let k = MapKey { identity: 1, egress: false, protocol: 6, port: *start, port_prefix: *bits };
                let (a, b) = k.port_range();
                assert_eq!(a, *start);
                covered.push((a, b));
            }
            covered.sort();
            assert_eq!(covered.first().unwrap().0, lo);
            assert_eq!(covered.last().unwrap().1, hi);
            for w in covered.windows(2) {
                assert_eq!(w[0].1 as u32 + 1, w[1].0 as u32, "blocks are contiguous");
            }
        }
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 0)]);
    }

    #[test]
    fn deny_covering_allow_wins() {
        let mut m = MapState::new();
        let allow80 = MapKey { identity: 300, egress: false, protocol: 6, port: 80, port_prefix: 16 };
        m.insert(allow80, MapValue::ALLOW);
        m.insert(MapKey::l3(300, false), MapValue::DENY);
        m.resolve_deny_precedence();
        assert!(m.get(&allow80).is_none());
        assert!(m.lookup(300, false, 6, 80).unwrap().1.deny);
    }

    #[test]
    fn narrower_deny_inside_broad_allow() {
        let mut m = MapState::new();
        m.insert(MapKey::l3(300, false), MapValue::ALLOW);
        m.insert(MapKey { identity: 300, egress: false, protocol: 6, port: 80, port_prefix: 16 }, MapValue::DENY);
        m.resolve_deny_precedence();
        assert!(m.lookup(300, false, 6, 80).unwrap().1.deny);
        assert!(!m.lookup(300, false, 6, 81).unwrap().1.deny);
        assert!(!m.lookup(300, false, 17, 80).unwrap().1.deny);
    }

    #[test]
    fn wildcard_deny_beats_specific_allow() {
        let mut m = MapState::new();
        m.insert(MapKey::l3(300, true), MapValue::ALLOW);
        m.insert(MapKey { identity: 0, egress: true, protocol: 6, port: 22, port_prefix: 16 }, MapValue::DENY);
        assert!(m.lookup(300, true, 6, 22).unwrap().1.deny);
        assert!(!m.lookup(300, true, 6, 23).unwrap().1.deny);
        assert!(m.lookup(301, true, 6, 23).is_none());
    }

    #[test]
    fn same_key_deny_wins_in_either_order() {
        let k = MapKey::l3(5, false);
        let mut a = MapState::new();
        a.insert(k, MapValue::ALLOW);
        a.insert(k, MapValue::DENY);
        let mut b = MapState::new();
        b.insert(k, MapValue::DENY);
        b.insert(k, MapValue::ALLOW);
        assert_eq!(a, b);
        assert!(a.get(&k).unwrap().deny);
    }
}
