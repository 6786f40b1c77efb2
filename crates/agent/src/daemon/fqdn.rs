//! The FQDN cache: what the DNS proxy learned (name → addresses, each with
//! an expiry), turned into the addresses `toFQDNs` rules allow. An address
//! outlives its TTL while a connection to it is still tracked, so expiry
//! never cuts a connection that was allowed when it started.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use cilium_datapath::Datapath;

use super::{Daemon, DaemonError};

use cilium_api::FqdnCacheEntry as FqdnEntry;

impl<D: Datapath> Daemon<D> {
    /// Gives the policy repository the learned addresses. Returns whether
    /// the rules changed.
    pub(crate) fn refresh_repo_fqdns(&mut self) -> bool {
        let ips: BTreeMap<String, BTreeSet<IpAddr>> = self.fqdn.iter().map(|(n, m)| (n.clone(), m.keys().copied().collect())).collect();
        self.repo.set_fqdn_ips(ips)
    }

    fn fqdn_to_policy(&mut self) -> Result<(), DaemonError> {
        if self.refresh_repo_fqdns() {
            self.sync_cidr_identities()?;
            self.regenerate_all();
            self.sync_ipcache()?;
            self.dp.bump_policy_revision()?;
        }
        self.save()
    }

    /// Records what an allowed DNS answer taught (TTL raised to the
    /// configured minimum; at most the configured number of addresses per
    /// name, the soonest to expire going first) and returns once policy
    /// naming them is in the datapath.
    pub fn fqdn_learn(&mut self, learned: Vec<(String, Vec<IpAddr>, u32)>, now: u64) -> Result<(), DaemonError> {
        let mut changed = false;
        let ipv6 = self.ipam6.is_some();
        for (name, ips, ttl) in learned {
            // AAAA answers only matter with IPv6 (and must not push A
            // answers out of the per-name budget otherwise)
            let ips: Vec<IpAddr> = ips.into_iter().filter(|ip| ipv6 || ip.is_ipv4()).collect();
            if ips.is_empty() {
                continue;
            }
            let name = cilium_policy::fqdn::normalize(&name);
            let expires = now + u64::from(ttl.max(self.cfg.fqdn_min_ttl));
            let entry = self.fqdn.entry(name).or_default();
            for ip in ips {
                let e = entry.entry(ip).or_insert(0);
                if *e < expires {
                    changed |= *e == 0;
                    *e = expires;
                }
            }
            while entry.len() > self.cfg.fqdn_max_ips.max(1) {
                let oldest = entry.iter().min_by_key(|(_, e)| **e).map(|(ip, _)| *ip).expect("not empty");
                entry.remove(&oldest);
                changed = true;
            }
        }
        if changed { self.fqdn_to_policy() } else { Ok(()) }
    }

    /// Removes expired addresses no tracked connection uses; returns how
    /// many went.
    pub fn fqdn_gc(&mut self, now: u64, in_use: &BTreeSet<IpAddr>) -> Result<usize, DaemonError> {
        let mut removed = 0;
        for m in self.fqdn.values_mut() {
            let before = m.len();
            m.retain(|ip, exp| *exp > now || in_use.contains(ip));
            removed += before - m.len();
        }
        self.fqdn.retain(|_, m| !m.is_empty());
        if removed > 0 {
            self.fqdn_to_policy()?;
        }
        Ok(removed)
    }

    /// Whether any address is waiting for its expiry (GC has work).
    pub fn fqdn_expired(&self, now: u64) -> bool {
        self.fqdn.values().any(|m| m.values().any(|e| *e <= now))
    }

    pub fn fqdn_cache(&self) -> Vec<FqdnEntry> {
        self.fqdn.iter().flat_map(|(n, m)| m.iter().map(|(ip, e)| FqdnEntry { name: n.clone(), ip: *ip, expires: *e })).collect()
    }
}
