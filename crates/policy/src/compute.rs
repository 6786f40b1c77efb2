//! From rules to one endpoint's policy: enforcement per direction and the
//! policy map entries, as pure data.

use std::collections::{BTreeMap, BTreeSet};

use cilium_abi::ReservedIdentity;
use cilium_labels::{LabelSet, Selector};
use serde::{Deserialize, Serialize};

use crate::mapstate::{MapKey, MapState, MapValue, port_range_prefixes};
use crate::rule::{PeerRule, Peers, Port, PortSpec, Protocol, Rule};

/// `--enable-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// Enforce a direction once a rule selects the endpoint for it.
    #[default]
    Default,
    /// Enforce every direction of every endpoint (deny unless allowed).
    Always,
    /// Enforce nothing.
    Never,
}

impl std::str::FromStr for EnforcementMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(EnforcementMode::Default),
            "always" => Ok(EnforcementMode::Always),
            "never" => Ok(EnforcementMode::Never),
            other => Err(format!("{other:?} is not one of default, always, never")),
        }
    }
}

/// Options that shape every endpoint's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyOptions {
    pub mode: EnforcementMode,
    /// Always allow the local host to reach its endpoints (upstream's
    /// `allow-localhost=always`, needed for health checks and probes).
    pub allow_localhost: bool,
    /// The agent runs the L7 proxy: HTTP rules redirect to it. Without it
    /// (and for L7 kinds it does not handle yet) traffic that needs L7
    /// rules is dropped, never allowed unfiltered.
    #[serde(default)]
    pub l7_proxy: bool,
}

/// The proxy port an L7 rule redirects to, or the pending marker when no
/// running proxy handles its kind.
pub fn l7_proxy_port(l7: Option<&crate::api::L7Rules>, egress: bool, options: PolicyOptions) -> u16 {
    match l7 {
        Some(r) if options.l7_proxy && r.http.is_some() => {
            if egress { cilium_abi::PROXY_PORT_HTTP_EGRESS } else { cilium_abi::PROXY_PORT_HTTP_INGRESS }
        }
        Some(r) if options.l7_proxy && r.kafka.is_some() => {
            if egress { cilium_abi::PROXY_PORT_KAFKA_EGRESS } else { cilium_abi::PROXY_PORT_KAFKA_INGRESS }
        }
        Some(r) if options.l7_proxy && r.dns.is_some() && egress => cilium_abi::PROXY_PORT_DNS,
        _ => cilium_abi::POLICY_PROXY_PORT_PENDING,
    }
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions { mode: EnforcementMode::Default, allow_localhost: true, l7_proxy: false }
    }
}

/// Named container ports: name -> (protocol, port).
pub type NamedPorts = BTreeMap<String, BTreeSet<(Protocol, u16)>>;

/// Everything the computation reads.
pub struct Input<'a> {
    pub rules: &'a [Rule],
    /// The endpoint's security labels.
    pub labels: &'a LabelSet,
    /// Every known identity.
    pub identities: &'a BTreeMap<u32, LabelSet>,
    /// The endpoint's own named ports (ingress named ports resolve here).
    pub own_ports: &'a NamedPorts,
    /// Named ports of the pods behind each identity (egress named ports
    /// resolve against the selected peer's own ports, as upstream).
    pub peer_ports: &'a BTreeMap<u32, NamedPorts>,
    pub options: PolicyOptions,
}

/// One endpoint's computed policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPolicy {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: MapState,
    /// The policies with a rule selecting the endpoint.
    pub selected_by: Vec<String>,
}

struct Resolver<'a> {
    identities: &'a BTreeMap<u32, LabelSet>,
    cache: BTreeMap<Selector, Vec<u32>>,
    /// (key, value) -> identities carrying it (any source), built on first use.
    index: Option<std::collections::HashMap<(&'a str, &'a str), Vec<u32>>>,
}

impl<'a> Resolver<'a> {
    fn new(identities: &'a BTreeMap<u32, LabelSet>) -> Self {
        Resolver { identities, cache: BTreeMap::new(), index: None }
    }

    fn select(&mut self, s: &Selector) -> Vec<u32> {
        if let Some(v) = self.cache.get(s) {
            return v.clone();
        }
        // A selector with an `In` requirement can only match identities that
        // carry one of its values: look those up instead of scanning (CIDR
        // selectors over thousands of CIDR identities, large clusters).
        let narrowing = s.requirements.iter().find_map(|r| match &r.op {
            cilium_labels::Operator::In(values) => Some((r.key.as_str(), values)),
            _ => None,
        });
        let ids: Vec<u32> = match narrowing {
            Some((key, values)) => {
                let identities = self.identities;
                let index = self.index.get_or_insert_with(|| {
                    let mut m: std::collections::HashMap<(&str, &str), Vec<u32>> = std::collections::HashMap::new();
                    for (id, labels) in identities {
                        for l in labels.iter() {
                            m.entry((l.key.as_str(), l.value.as_str())).or_default().push(*id);
                        }
                    }
                    m
                });
                let mut c: Vec<u32> = values
                    .iter()
                    .flat_map(|v| index.get(&(key, v.as_str())).into_iter().flatten().copied())
                    .filter(|id| s.matches(&identities[id]))
                    .collect();
                c.sort_unstable();
                c.dedup();
                c
            }
            None => self.identities.iter().filter(|(_, labels)| s.matches(labels)).map(|(id, _)| *id).collect(),
        };
        self.cache.insert(s.clone(), ids.clone());
        ids
    }

    /// The identities of a peer rule, or `None` for the wildcard.
    fn peers(&mut self, r: &PeerRule, requires: &[Selector]) -> Option<BTreeSet<u32>> {
        let mut ids = match &r.peers {
            Peers::All if requires.is_empty() => return None,
            Peers::All => self.identities.keys().copied().collect::<BTreeSet<u32>>(),
            Peers::Selected(sels) => sels.iter().flat_map(|s| self.select(s)).collect(),
        };
        if !requires.is_empty() {
            ids.retain(|id| {
                let labels = &self.identities[id];
                requires.iter().all(|s| s.matches(labels))
            });
        }
        Some(ids)
    }
}

/// Where named ports resolve: the endpoint's own ports (ingress), or each
/// peer's (egress; every known port of that name for the wildcard peer).
enum NamedSource<'a> {
    Own(&'a NamedPorts),
    Peers(&'a BTreeMap<u32, NamedPorts>),
}

impl NamedSource<'_> {
    fn resolve(&self, identity: u32, name: &str, protocol: Protocol) -> Vec<u16> {
        let of = |np: &NamedPorts| -> Vec<u16> {
            np.get(name).into_iter().flatten().filter(|(p, _)| *p == protocol).map(|(_, port)| *port).collect()
        };
        match self {
            NamedSource::Own(np) => of(np),
            NamedSource::Peers(m) if identity == 0 => {
                let mut v: Vec<u16> = m.values().flat_map(|np| of(np)).collect();
                v.sort_unstable();
                v.dedup();
                v
            }
            NamedSource::Peers(m) => {
                let v = m.get(&identity).map(|np| of(np)).unwrap_or_default();
                // one name, several numbers for one identity: ambiguous, skip (upstream's ErrDuplicateNamedPorts)
                if v.len() > 1 { vec![] } else { v }
            }
        }
    }
}

fn port_keys(identity: u32, egress: bool, spec: &PortSpec, named: &NamedSource, out: &mut Vec<MapKey>) {
    let proto = spec.protocol.number();
    match &spec.port {
        Port::Any => out.push(MapKey { identity, egress, protocol: proto, port: 0, port_prefix: 0 }),
        Port::Range { lo, hi } => {
            for (port, port_prefix) in port_range_prefixes(*lo, *hi) {
                out.push(MapKey { identity, egress, protocol: proto, port, port_prefix });
            }
        }
        Port::Named(name) => {
            for port in named.resolve(identity, name, spec.protocol) {
                out.push(MapKey { identity, egress, protocol: proto, port, port_prefix: 16 });
            }
        }
    }
}

fn add_rule(
    state: &mut MapState,
    resolver: &mut Resolver,
    rule: &PeerRule,
    egress: bool,
    deny: bool,
    requires: &[Selector],
    named: &NamedSource,
    options: PolicyOptions,
) {
    let identities: Vec<u32> = match resolver.peers(rule, if deny { &[] } else { requires }) {
        None => vec![0],
        Some(set) => set.into_iter().collect(),
    };
    // L7 rules redirect to the proxy; a kind it does not handle (or no
    // proxy) leaves the pending marker, whose traffic the datapath drops
    let value = if deny {
        MapValue::DENY
    } else if rule.has_l7 {
        MapValue { deny: false, proxy_port: l7_proxy_port(rule.l7.as_ref(), egress, options) }
    } else {
        MapValue::ALLOW
    };
    let mut keys = Vec::new();
    for id in identities {
        if rule.ports.is_empty() {
            keys.push(MapKey::l3(id, egress));
        } else {
            for spec in &rule.ports {
                port_keys(id, egress, spec, named, &mut keys);
            }
        }
    }
    for k in keys {
        state.insert(k, value);
    }
}

/// Computes one endpoint's policy.
pub fn compute(input: &Input) -> EndpointPolicy {
    let selecting: Vec<&Rule> = input
        .rules
        .iter()
        .filter(|r| r.selects(input.labels))
        .collect();
    let mut out = EndpointPolicy {
        selected_by: {
            let mut v: Vec<String> = selecting.iter().map(|r| r.policy.to_string()).collect();
            v.dedup();
            v
        },
        ..Default::default()
    };
    if input.options.mode == EnforcementMode::Never {
        return out;
    }
    let mut resolver = Resolver::new(input.identities);
    let mut state = MapState::new();

    for egress in [false, true] {
        let (enforced, default_deny) = selecting.iter().fold((false, false), |(e, d), r| {
            let (re, rd) = if egress {
                (r.egress_enforced, r.egress_enforced && r.egress_default_deny)
            } else {
                (r.ingress_enforced, r.ingress_enforced && r.ingress_default_deny)
            };
            (e || re, d || rd)
        });
        let always = input.options.mode == EnforcementMode::Always;
        if !enforced && !always {
            continue;
        }
        if egress {
            out.egress_enforced = true;
        } else {
            out.ingress_enforced = true;
        }
        if enforced && !default_deny && !always {
            // Rules exist but none asks for default deny: allow what is not denied.
            state.insert(MapKey::l3(0, egress), MapValue::ALLOW);
        }
        let requires: Vec<Selector> = selecting
            .iter()
            .flat_map(|r| if egress { &r.egress } else { &r.ingress })
            .flat_map(|pr| pr.requires.iter().cloned())
            .collect();
        let named = if egress { NamedSource::Peers(input.peer_ports) } else { NamedSource::Own(input.own_ports) };
        for r in &selecting {
            let (allows, denies) = if egress { (&r.egress, &r.egress_deny) } else { (&r.ingress, &r.ingress_deny) };
            for pr in allows {
                add_rule(&mut state, &mut resolver, pr, egress, false, &requires, &named, input.options);
            }
            for pr in denies {
                add_rule(&mut state, &mut resolver, pr, egress, true, &requires, &named, input.options);
            }
        }
        if !egress && input.options.allow_localhost {
            state.insert(MapKey::l3(ReservedIdentity::Host.code(), false), MapValue::ALLOW);
        }
    }
    state.resolve_deny_precedence();
    state.resolve_l7_wildcards();
    out.entries = state;
    out
}
