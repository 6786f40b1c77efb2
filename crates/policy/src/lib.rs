//! The policy language and its meaning.
//!
//! Reads CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes
//! NetworkPolicy documents (`parse`), translates them into one normalized rule
//! model (`rule`), and computes each endpoint's policy — enforcement per
//! direction and the policy map entries — as pure data (`compute`,
//! `mapstate`).
//!
//! Architecture invariant: this crate never touches the kernel, the network or
//! the file system. It is tested without root; the agent writes its output to
//! the datapath.

pub mod api;
pub mod compute;
pub mod conformance;
pub mod fqdn;
pub mod kafka;
pub mod mapstate;
pub mod parse;
pub mod rule;
pub mod trace;

use std::collections::BTreeMap;

pub use api::{PolicyDocument, PolicyKind, PolicyRef};
pub use compute::{EndpointPolicy, EnforcementMode, Input, NamedPorts, PolicyOptions, compute};
pub use mapstate::{MapKey, MapState, MapValue};
pub use parse::{PolicyError, parse_policies, parse_value};
pub use rule::{Protocol, Rule};

/// The set of imported policies, with a revision bumped on every change.
#[derive(Debug, Clone, Default)]
pub struct Repository {
    docs: BTreeMap<PolicyRef, (PolicyDocument, Vec<Rule>)>,
    /// Every rule, `toServices` resolved against `services`.
    rules: Vec<Rule>,
    services: BTreeMap<(String, String), rule::ServiceInfo>,
    /// Some rule names Services.
    service_refs: bool,
    /// Addresses the DNS proxy learned, by name (lower case, no trailing dot).
    fqdn_ips: BTreeMap<String, std::collections::BTreeSet<std::net::IpAddr>>,
    /// Some rule names DNS names (`toFQDNs`).
    fqdn_refs: bool,
    /// The CiliumCIDRGroups among `docs`, by name.
    cidr_groups: BTreeMap<String, rule::CidrGroupInfo>,
    revision: u64,
}

impl Repository {
    pub fn new() -> Repository {
        Repository { revision: 1, ..Default::default() }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Adds or replaces (by kind, namespace and name) already validated
    /// documents. Returns the new revision.
    pub fn apply(&mut self, parsed: Vec<(PolicyDocument, Vec<Rule>)>) -> u64 {
        for (doc, rules) in parsed {
            self.docs.insert(doc.key(), (doc, rules));
        }
        self.changed()
    }

    /// Deletes one policy. Returns whether it existed.
    pub fn delete(&mut self, key: &PolicyRef) -> bool {
        let existed = self.docs.remove(key).is_some();
        if existed {
            self.changed();
        }
        existed
    }

    /// Deletes every policy. Returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.docs.len();
        self.docs.clear();
        if n > 0 {
            self.changed();
        }
        n
    }

    fn changed(&mut self) -> u64 {
        let rules: Vec<Rule> = self.docs.values().flat_map(|(_, r)| r.iter().cloned()).collect();
        self.service_refs = rule::references_services(&rules);
        self.fqdn_refs = rule::references_fqdns(&rules);
        self.cidr_groups = self
            .docs
            .values()
            .filter_map(|(d, _)| match d {
                PolicyDocument::CidrGroup(g) => rule::cidr_group_info("", g).ok().map(|i| (g.metadata.name.clone(), i)),
                _ => None,
            })
            .collect();
        self.rules = self.resolve(rules);
        self.revision += 1;
        self.revision
    }

    fn resolve(&self, rules: Vec<Rule>) -> Vec<Rule> {
        let rules = if rule::references_cidr_groups(&rules) { rule::resolve_cidr_groups(&rules, &self.cidr_groups) } else { rules };
        let rules = if self.service_refs { rule::resolve_services(&rules, &self.services) } else { rules };
        if self.fqdn_refs { rule::resolve_fqdns(&rules, &self.fqdn_ips) } else { rules }
    }

    /// The addresses `toFQDNs` rules resolve against, by name. Returns
    /// whether the rules changed (a new revision).
    pub fn set_fqdn_ips(&mut self, ips: BTreeMap<String, std::collections::BTreeSet<std::net::IpAddr>>) -> bool {
        self.fqdn_ips = ips;
        if !self.fqdn_refs {
            return false;
        }
        let raw: Vec<Rule> = self.docs.values().flat_map(|(_, r)| r.iter().cloned()).collect();
        let resolved = self.resolve(raw);
        if resolved == self.rules {
            return false;
        }
        self.rules = resolved;
        self.revision += 1;
        true
    }

    /// Whether some rule names DNS names (`toFQDNs`).
    pub fn references_fqdns(&self) -> bool {
        self.fqdn_refs
    }

    /// The Services `toServices` rules resolve against, by (namespace,
    /// name). Returns whether the rules changed (a new revision).
    pub fn set_services(&mut self, services: BTreeMap<(String, String), rule::ServiceInfo>) -> bool {
        self.services = services;
        if !self.service_refs {
            return false;
        }
        let raw: Vec<Rule> = self.docs.values().flat_map(|(_, r)| r.iter().cloned()).collect();
        let resolved = self.resolve(raw);
        if resolved == self.rules {
            return false;
        }
        self.rules = resolved;
        self.revision += 1;
        true
    }

    /// Whether some rule names Services (`toServices`).
    pub fn references_services(&self) -> bool {
        self.service_refs
    }

    /// Every rule of every policy.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn documents(&self) -> impl Iterator<Item = &PolicyDocument> {
        self.docs.values().map(|(d, _)| d)
    }

    pub fn get(&self, key: &PolicyRef) -> Option<&PolicyDocument> {
        self.docs.get(key).map(|(d, _)| d)
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }
}

#[cfg(test)]
mod tests;
