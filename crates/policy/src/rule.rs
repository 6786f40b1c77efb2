//! What a policy document means: normalized rules, with namespace scoping,
//! entities, CIDRs and ports resolved into selectors and port specs. Both the
//! Cilium and the Kubernetes kinds translate into this one model, which is all
//! the computation looks at.

use std::fmt;
use std::net::IpAddr;

use cilium_labels::{
    Label, NAMESPACE_LABELS_PREFIX, Operator, POD_NAMESPACE_LABEL, Requirement, SOURCE_ANY,
    SOURCE_CIDR, SOURCE_K8S, SOURCE_RESERVED, Selector,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::api::{
    self, CiliumPolicy, EgressRule, IngressRule, IntOrString, LabelSelector, NetworkPolicy,
    PolicyDocument, PolicyRef,
};
use crate::parse::PolicyError;

/// IP protocols a port rule can name. The extended ones (everything but
/// TCP, UDP, SCTP and ICMP) have no ports and are enforced only by an agent
/// started with `--enable-extended-ip-protocols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    Vrrp,
    Igmp,
    Gre,
    Ipip,
    Ipv6,
    Esp,
    Ah,
}

const PROTOCOLS: &[(Protocol, u8, &str)] = &[
    (Protocol::Tcp, 6, "TCP"),
    (Protocol::Udp, 17, "UDP"),
    (Protocol::Sctp, 132, "SCTP"),
    (Protocol::Icmp, 1, "ICMP"),
    (Protocol::Icmpv6, 58, "ICMPv6"),
    (Protocol::Vrrp, 112, "VRRP"),
    (Protocol::Igmp, 2, "IGMP"),
    (Protocol::Gre, 47, "GRE"),
    (Protocol::Ipip, 4, "IPIP"),
    (Protocol::Ipv6, 41, "IPV6"),
    (Protocol::Esp, 50, "ESP"),
    (Protocol::Ah, 51, "AH"),
];

impl Protocol {
    fn entry(self) -> &'static (Protocol, u8, &'static str) {
        PROTOCOLS.iter().find(|e| e.0 == self).expect("every protocol has an entry")
    }

    pub fn number(self) -> u8 {
        self.entry().1
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        PROTOCOLS.iter().find(|e| e.1 == n).map(|e| e.0)
    }

    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Not TCP, UDP, SCTP or ICMP: needs `--enable-extended-ip-protocols`.
    pub fn is_extended(self) -> bool {
        !matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp | Protocol::Icmp | Protocol::Icmpv6)
    }

    /// The extended protocols, by name as a policy writes them.
    pub fn extended_by_name(name: &str) -> Option<Protocol> {
        PROTOCOLS.iter().find(|e| e.0.is_extended() && e.2.eq_ignore_ascii_case(name)).map(|e| e.0)
    }
}

/// The port part of a port spec.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Port {
    /// Every port of the protocol.
    Any,
    /// A range, inclusive (a single port has `lo == hi`).
    Range { lo: u16, hi: u16 },
    /// A named container port, resolved per destination pod.
    Named(String),
}

/// One protocol and port (or port range, or ICMP type).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: Port,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            Port::Any => write!(f, "{}/any", self.protocol.name()),
            Port::Range { lo, hi } if lo == hi => write!(f, "{}/{}", lo, self.protocol.name()),
            Port::Range { lo, hi } => write!(f, "{}-{}/{}", lo, hi, self.protocol.name()),
            Port::Named(n) => write!(f, "{}/{}", n, self.protocol.name()),
        }
    }
}

/// Which peers a rule talks about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peers {
    /// Every identity, world included (upstream's wildcard; map identity 0).
    All,
    /// Identities matching any of the selectors. Empty means none.
    Selected(Vec<Selector>),
}

/// A Service a `toServices` rule names; which peers it stands for is known
/// only with the Services themselves (see [`resolve_services`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceRef {
    /// k8sService: one Service by namespace and name.
    Named { namespace: String, name: String },
    /// k8sServiceSelector: Services whose labels match, in one namespace or
    /// (clusterwide, none given) any.
    Selected { namespace: Option<String>, selector: Selector },
}

/// A CiliumCIDRGroup a `fromCIDRSet`/`toCIDRSet` entry refers to; which
/// prefixes it stands for is known only with the groups themselves (see
/// [`resolve_cidr_groups`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidrGroupRef {
    pub groups: CidrGroupMatch,
    /// Prefixes cut out of every group prefix that contains them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CidrGroupMatch {
    /// cidrGroupRef: one group by name.
    Named(String),
    /// cidrGroupSelector: every group whose labels match.
    Selected(Selector),
}

/// What the rules need to know about a CiliumCIDRGroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrGroupInfo {
    pub labels: std::collections::BTreeMap<String, String>,
    pub cidrs: Vec<IpNet>,
}

/// What the rules need to know about a Service to resolve `toServices`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub labels: std::collections::BTreeMap<String, String>,
    /// The pod selector; `None` for a Service without one (its endpoints
    /// are maintained by hand, usually outside the cluster).
    pub selector: Option<std::collections::BTreeMap<String, String>>,
    /// Endpoint addresses (used for Services without a selector).
    pub endpoints: Vec<IpAddr>,
}

/// One allow or deny rule of one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRule {
    pub peers: Peers,
    /// toServices: resolved into `peers` by [`resolve_services`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceRef>,
    /// CiliumCIDRGroup references: resolved into `peers` by
    /// [`resolve_cidr_groups`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_groups: Vec<CidrGroupRef>,
    /// Selectors every peer must also match (fromRequires/toRequires).
    pub requires: Vec<Selector>,
    /// Empty means every protocol and port.
    pub ports: Vec<PortSpec>,
    /// Has L7 rules (parsed and validated; enforced by the proxy).
    pub has_l7: bool,
    /// toFQDNs: resolved into `peers` by [`resolve_fqdns`] from the names
    /// the DNS proxy learned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fqdns: Vec<api::FqdnSelector>,
    /// The L7 rules every port of this rule carries (a toPorts entry with
    /// rules becomes a peer rule of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<api::L7Rules>,
    /// Where in the document it came from, e.g. `spec.ingress[0]`.
    pub origin: String,
}

/// A normalized rule: who it applies to and what it allows or denies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub policy: PolicyRef,
    /// `spec`, `specs[1]`, or `spec` for a NetworkPolicy.
    pub origin: String,
    /// Endpoints the rule applies to.
    pub subject: Option<Selector>,
    /// A host policy (`nodeSelector`): `subject` selects the host endpoint
    /// of nodes by their labels, and never a pod; other rules never select
    /// the host endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host: bool,
    /// Whether the rule puts its subjects under ingress / egress enforcement.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// enableDefaultDeny (default true).
    pub ingress_default_deny: bool,
    pub egress_default_deny: bool,
    pub ingress: Vec<PeerRule>,
    pub ingress_deny: Vec<PeerRule>,
    pub egress: Vec<PeerRule>,
    pub egress_deny: Vec<PeerRule>,
    pub labels: Vec<String>,
    pub description: Option<String>,
}

impl Rule {
    /// Every peer rule, of both directions, allows and denies.
    pub fn peer_rules(&self) -> impl Iterator<Item = &PeerRule> {
        self.ingress.iter().chain(&self.ingress_deny).chain(&self.egress).chain(&self.egress_deny)
    }

    /// Whether the rule applies to an endpoint with these labels (the host
    /// endpoint is the one labelled `reserved:host`).
    pub fn selects(&self, labels: &cilium_labels::LabelSet) -> bool {
        self.host == labels.has_reserved("host") && self.subject.as_ref().is_some_and(|s| s.matches(labels))
    }
}

/// Entities (fromEntities/toEntities) and their selectors.
pub const ENTITIES: &[&str] = &[
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "unmanaged",
    "ingress",
    "none",
];

fn reserved_selector(name: &str) -> Selector {
    Selector::for_label(&Label::reserved(name))
}

/// The selectors of an entity; `None` for `all` (the wildcard).
pub fn entity_selectors(entity: &str, cluster: &str) -> Option<Vec<Selector>> {
    Some(match entity {
        "all" => return None,
        "world" => vec![reserved_selector("world")],
        "world-ipv4" => vec![reserved_selector("world-ipv4")],
        "world-ipv6" => vec![reserved_selector("world-ipv6")],
        "host" => vec![reserved_selector("host")],
        "remote-node" => vec![reserved_selector("remote-node")],
        "kube-apiserver" => vec![reserved_selector("kube-apiserver")],
        "health" => vec![reserved_selector("health")],
        "init" => vec![reserved_selector("init")],
        "unmanaged" => vec![reserved_selector("unmanaged")],
        "ingress" => vec![reserved_selector("ingress")],
        "cluster" => {
            let mut v: Vec<Selector> = ["host", "remote-node", "init", "health", "unmanaged", "kube-apiserver", "ingress"]
                .iter()
                .map(|r| reserved_selector(r))
                .collect();
            v.push(Selector::for_label(&Label::k8s(cilium_labels::CLUSTER_LABEL, cluster)));
            v
        }
        _ => vec![],
    })
}

/// The cluster name identities are labelled with.
pub const CLUSTER_NAME: &str = "default";

/// The label of a CIDR (`cidr:10.0.0.0/8`), as CIDR identities carry it.
pub fn cidr_label(net: &IpNet) -> Label {
    Label::new(SOURCE_CIDR, &net.trunc().to_string(), "")
}

/// The labels of the identity of a CIDR: `cidr:` labels for the prefix and
/// every prefix containing it (so a rule naming 10.0.0.0/8 selects the
/// identity of 10.1.0.0/16), and `reserved:world`.
pub fn cidr_identity_labels(net: &IpNet) -> cilium_labels::LabelSet {
    let mut set = cilium_labels::LabelSet::new();
    let net = net.trunc();
    for len in 0..=net.prefix_len() {
        if let Ok(n) = IpNet::new(net.addr(), len) {
            set.insert(cidr_label(&n));
        }
    }
    set.insert(Label::reserved("world"));
    set.insert(Label::reserved(if net.addr().is_ipv4() { "world-ipv4" } else { "world-ipv6" }));
    set
}

/// Whether any rule names Services (and so depends on them).
/// Whether any rule names DNS names (`toFQDNs`).
pub fn references_fqdns(rules: &[Rule]) -> bool {
    rules.iter().any(|r| r.egress.iter().any(|pr| !pr.fqdns.is_empty()))
}

/// The rules with every `toFQDNs` peer replaced by the addresses learned
/// for the names it matches, as /32 CIDRs (names nobody resolved yet select
/// nothing).
pub fn resolve_fqdns(rules: &[Rule], ips: &std::collections::BTreeMap<String, std::collections::BTreeSet<IpAddr>>) -> Vec<Rule> {
    with_extra_peers(rules, |pr| {
        if pr.fqdns.is_empty() {
            return Vec::new();
        }
        let matchers: Vec<crate::fqdn::NameMatcher> = pr.fqdns.iter().map(crate::fqdn::NameMatcher::new).collect();
        let mut addrs = std::collections::BTreeSet::new();
        for (name, set) in ips {
            if matchers.iter().any(|m| m.matches(name)) {
                addrs.extend(set.iter().copied());
            }
        }
        addrs.into_iter().map(|ip| Selector::for_label(&cidr_label(&IpNet::from(ip)))).collect()
    })
}

/// The rules with the selectors `extra` names for each peer rule added to
/// its peers: how references to things outside the policy (Services, CIDR
/// groups, DNS names) become peers.
fn with_extra_peers(rules: &[Rule], extra: impl Fn(&PeerRule) -> Vec<Selector>) -> Vec<Rule> {
    rules
        .iter()
        .map(|r| {
            let mut r = r.clone();
            for pr in r.ingress.iter_mut().chain(r.ingress_deny.iter_mut()).chain(r.egress.iter_mut()).chain(r.egress_deny.iter_mut()) {
                let add = extra(pr);
                if let (false, Peers::Selected(v)) = (add.is_empty(), &mut pr.peers) {
                    v.extend(add);
                }
            }
            r
        })
        .collect()
}

/// The first `fromNodes`/`toNodes` of a document (the field), which need
/// nodes told apart by their labels (`--enable-node-selector-labels`).
pub fn node_selector_use(doc: &PolicyDocument) -> Option<String> {
    let PolicyDocument::Cilium(p) = doc else { return None };
    let specs = p.spec.iter().map(|s| ("spec".to_string(), s)).chain(p.specs.iter().enumerate().map(|(i, s)| (format!("specs[{i}]"), s)));
    for (origin, r) in specs {
        for (dir, rules) in [("ingress", &r.ingress), ("ingressDeny", &r.ingress_deny)] {
            if let Some(i) = rules.iter().flatten().position(|x| x.from_nodes.as_ref().is_some_and(|v| !v.is_empty())) {
                return Some(format!("{origin}.{dir}[{i}].fromNodes"));
            }
        }
        for (dir, rules) in [("egress", &r.egress), ("egressDeny", &r.egress_deny)] {
            if let Some(i) = rules.iter().flatten().position(|x| x.to_nodes.as_ref().is_some_and(|v| !v.is_empty())) {
                return Some(format!("{origin}.{dir}[{i}].toNodes"));
            }
        }
    }
    None
}

/// The first port rule naming an extended IP protocol (VRRP, GRE, ...):
/// (where, which).
pub fn extended_protocol_use(rules: &[Rule]) -> Option<(String, Protocol)> {
    rules.iter().find_map(|r| {
        r.peer_rules().find_map(|pr| {
            pr.ports.iter().find(|p| p.protocol.is_extended()).map(|p| (format!("{}.toPorts", pr.origin), p.protocol))
        })
    })
}

/// Whether any rule refers to CiliumCIDRGroups.
pub fn references_cidr_groups(rules: &[Rule]) -> bool {
    rules.iter().any(|r| r.peer_rules().any(|pr| !pr.cidr_groups.is_empty()))
}

/// The rules with every CiliumCIDRGroup reference replaced by a CIDR
/// selector per prefix of the groups it names (minus the exceptions inside
/// that prefix). Groups that do not exist select nothing.
pub fn resolve_cidr_groups(rules: &[Rule], groups: &std::collections::BTreeMap<String, CidrGroupInfo>) -> Vec<Rule> {
    let expand = |refs: &[CidrGroupRef]| -> Vec<Selector> {
        let mut out = Vec::new();
        for r in refs {
            let matching: Vec<&CidrGroupInfo> = match &r.groups {
                CidrGroupMatch::Named(name) => groups.get(name).into_iter().collect(),
                CidrGroupMatch::Selected(sel) => groups
                    .values()
                    .filter(|g| {
                        let mut set = cilium_labels::LabelSet::new();
                        for (k, v) in &g.labels {
                            set.insert(Label::k8s(k, v));
                        }
                        sel.matches(&set)
                    })
                    .collect(),
            };
            for net in matching.iter().flat_map(|g| g.cidrs.iter()) {
                let mut sel = Selector::for_label(&cidr_label(net));
                for ex in r.except.iter().filter(|e| net.contains(&e.network()) && e.prefix_len() >= net.prefix_len()) {
                    let l = cidr_label(ex);
                    sel = sel.with(Requirement { source: l.source, key: l.key, op: Operator::DoesNotExist });
                }
                out.push(sel);
            }
        }
        out
    };
    with_extra_peers(rules, |pr| expand(&pr.cidr_groups))
}

pub fn references_services(rules: &[Rule]) -> bool {
    rules.iter().any(|r| r.peer_rules().any(|pr| !pr.services.is_empty()))
}

/// The rules with every `toServices` peer replaced by the peers it stands
/// for, as upstream: a Service with a selector means its pods (its selector
/// in its namespace), one without means its endpoint addresses (as /32 and
/// /128 CIDRs). Services that do not exist select nothing.
pub fn resolve_services(rules: &[Rule], services: &std::collections::BTreeMap<(String, String), ServiceInfo>) -> Vec<Rule> {
    let expand = |refs: &[ServiceRef]| -> Vec<Selector> {
        let mut out = Vec::new();
        for r in refs {
            let matching: Vec<(&(String, String), &ServiceInfo)> = match r {
                ServiceRef::Named { namespace, name } => {
                    services.get_key_value(&(namespace.clone(), name.clone())).into_iter().collect()
                }
                ServiceRef::Selected { namespace, selector } => services
                    .iter()
                    .filter(|((ns, _), _)| namespace.as_ref().is_none_or(|n| n == ns))
                    .filter(|(_, info)| {
                        let mut set = cilium_labels::LabelSet::new();
                        for (k, v) in &info.labels {
                            set.insert(Label::k8s(k, v));
                        }
                        selector.matches(&set)
                    })
                    .collect(),
            };
            for ((ns, _), info) in matching {
                match &info.selector {
                    Some(sel) if !sel.is_empty() => {
                        let mut s = Selector::default();
                        for (k, v) in sel {
                            s = s.with(Requirement { source: SOURCE_K8S.to_string(), key: k.clone(), op: Operator::In(vec![v.clone()]) });
                        }
                        out.push(s.with(namespace_requirement(ns)));
                    }
                    _ => {
                        for ip in &info.endpoints {
                            out.push(Selector::for_label(&cidr_label(&IpNet::from(*ip))));
                        }
                    }
                }
            }
        }
        out
    };
    with_extra_peers(rules, |pr| expand(&pr.services))
}

/// Every CIDR the rules name (allowed prefixes and exceptions), which need an
/// identity and an ipcache entry.
pub fn referenced_cidrs(rules: &[Rule]) -> std::collections::BTreeSet<IpNet> {
    let mut out = std::collections::BTreeSet::new();
    for r in rules {
        for pr in r.peer_rules() {
            let sels = match &pr.peers {
                Peers::Selected(v) => v.iter().collect::<Vec<_>>(),
                Peers::All => vec![],
            };
            for sel in sels.into_iter().chain(pr.requires.iter()) {
                for req in &sel.requirements {
                    if req.source == SOURCE_CIDR {
                        if let Ok(n) = req.key.parse::<IpNet>() {
                            out.insert(n);
                        }
                    }
                }
            }
        }
    }
    out
}

struct Ctx<'a> {
    doc: &'a str,
    namespace: Option<&'a str>,
}

impl Ctx<'_> {
    fn err(&self, field: &str, value: impl Into<String>, msg: impl Into<String>) -> PolicyError {
        PolicyError::new(self.doc, field, value, msg)
    }

    fn selector(&self, field: &str, s: &LabelSelector, default_source: &str) -> Result<Selector, PolicyError> {
        for (i, e) in s.match_expressions.iter().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            if !matches!(e.operator.as_str(), "In" | "NotIn" | "Exists" | "DoesNotExist") {
                return Err(self.err(
                    &format!("{f}.operator"),
                    e.operator.clone(),
                    "unknown operator (want In, NotIn, Exists or DoesNotExist)",
                ));
            }
        }
        Selector::from_parts(
            s.match_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            s.match_expressions.iter().map(|e| (e.key.as_str(), e.operator.as_str(), e.values.as_slice())),
            default_source,
        )
        .map_err(|e| self.err(field, format!("{s:?}"), e.to_string()))
    }

    /// A peer endpoint selector, scoped to the policy's namespace unless it
    /// names a namespace itself or selects reserved identities. In a
    /// clusterwide policy the empty selector means every pod of the cluster
    /// (not the world), as upstream.
    fn peer_selector(&self, field: &str, s: &LabelSelector) -> Result<Selector, PolicyError> {
        let sel = self.selector(field, s, SOURCE_ANY)?;
        if self.namespace.is_none() && sel.is_wildcard() {
            return Ok(sel.with(Requirement { source: SOURCE_K8S.to_string(), key: POD_NAMESPACE_LABEL.to_string(), op: Operator::Exists }));
        }
        Ok(self.scope(sel))
    }

    fn scope(&self, sel: Selector) -> Selector {
        match self.namespace {
            Some(ns)
                if !sel.has_key(POD_NAMESPACE_LABEL)
                    && !sel.requirements.iter().any(|r| r.source == SOURCE_RESERVED) =>
            {
                sel.with(namespace_requirement(ns))
            }
            _ => sel,
        }
    }
}

fn namespace_requirement(ns: &str) -> Requirement {
    Requirement {
        source: SOURCE_K8S.to_string(),
        key: POD_NAMESPACE_LABEL.to_string(),
        op: Operator::In(vec![ns.to_string()]),
    }
}

fn parse_cidr(ctx: &Ctx, field: &str, s: &str) -> Result<IpNet, PolicyError> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    // upstream accepts a bare address as a host prefix
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ctx.err(field, s, "not a CIDR (want e.g. 10.0.0.0/8)"))
}

/// Selector for a CIDR with exceptions: identities inside `net` and outside
/// every `except`. Exceptions must lie inside the CIDR.
fn cidr_selector(ctx: &Ctx, field: &str, net: IpNet, except: &[String]) -> Result<Selector, PolicyError> {
    let mut sel = Selector::for_label(&cidr_label(&net));
    for (i, e) in except.iter().enumerate() {
        let f = format!("{field}.except[{i}]");
        let ex = parse_cidr(ctx, &f, e)?;
        if !net.contains(&ex.network()) || ex.prefix_len() < net.prefix_len() {
            return Err(ctx.err(&f, e.clone(), format!("not contained in {net}")));
        }
        let l = cidr_label(&ex);
        sel = sel.with(Requirement { source: l.source, key: l.key, op: Operator::DoesNotExist });
    }
    Ok(sel)
}

fn parse_protocol(ctx: &Ctx, field: &str, p: Option<&str>, default_any: bool) -> Result<Vec<Protocol>, PolicyError> {
    match p {
        None | Some("") if default_any => Ok(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
        None | Some("") => Ok(vec![Protocol::Tcp]),
        Some(s) => match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(vec![Protocol::Tcp]),
            "UDP" => Ok(vec![Protocol::Udp]),
            "SCTP" => Ok(vec![Protocol::Sctp]),
            "ANY" if default_any => Ok(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
            u if default_any => match Protocol::extended_by_name(u) {
                Some(p) => Ok(vec![p]),
                None => Err(ctx.err(field, s, "unknown protocol (want TCP, UDP, SCTP, ANY, VRRP, IGMP, GRE, IPIP, IPV6, ESP or AH)")),
            },
            _ => Err(ctx.err(field, s, "unknown protocol (want TCP, UDP or SCTP)")),
        },
    }
}

fn is_port_name(s: &str) -> bool {
    // IANA_SVC_NAME: at most 15 lowercase alphanumerics or '-', with a letter
    !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn parse_port(
    ctx: &Ctx,
    field: &str,
    port: Option<&IntOrString>,
    end_port: Option<i64>,
) -> Result<Port, PolicyError> {
    let text = port.map(IntOrString::as_string).unwrap_or_default();
    let pf = format!("{field}.port");
    let lo: u16 = if text.is_empty() || text == "0" {
        if let Some(e) = end_port {
            if e != 0 {
                return Err(ctx.err(&format!("{field}.endPort"), e.to_string(), "endPort needs a port"));
            }
        }
        return Ok(Port::Any);
    } else if let Ok(n) = text.parse::<i64>() {
        if !(1..=65535).contains(&n) {
            return Err(ctx.err(&pf, text, "port out of range (1-65535)"));
        }
        n as u16
    } else if is_port_name(&text) {
        if end_port.is_some_and(|e| e != 0) {
            return Err(ctx.err(&format!("{field}.endPort"), end_port.unwrap_or(0).to_string(), "endPort cannot be used with a named port"));
        }
        return Ok(Port::Named(text));
    } else {
        return Err(ctx.err(&pf, text, "not a port number (1-65535) or a port name"));
    };
    let hi = match end_port {
        None | Some(0) => lo,
        Some(e) if (lo as i64..=65535).contains(&e) => e as u16,
        Some(e) => {
            return Err(ctx.err(&format!("{field}.endPort"), e.to_string(), format!("endPort must be between port {lo} and 65535")));
        }
    };
    Ok(Port::Range { lo, hi })
}

/// ICMP type names upstream accepts, IPv4.
const ICMP4_TYPES: &[(&str, u16)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

/// ICMPv6 type names upstream accepts.
const ICMP6_TYPES: &[(&str, u16)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

fn icmp_ports(ctx: &Ctx, field: &str, icmps: &[api::IcmpRule]) -> Result<Vec<PortSpec>, PolicyError> {
    let mut out = Vec::new();
    for (i, rule) in icmps.iter().enumerate() {
        for (j, f) in rule.fields.iter().enumerate() {
            let ff = format!("{field}[{i}].fields[{j}]");
            let v6 = match f.family.as_deref() {
                None | Some("") | Some("IPv4") => false,
                Some("IPv6") => true,
                Some(other) => return Err(ctx.err(&format!("{ff}.family"), other, "want IPv4 or IPv6")),
            };
            let table = if v6 { ICMP6_TYPES } else { ICMP4_TYPES };
            let t = match &f.icmp_type {
                IntOrString::Int(n) if (0..=255).contains(n) => *n as u16,
                IntOrString::String(s) => match s.parse::<u16>() {
                    Ok(n) if n <= 255 => n,
                    _ => table
                        .iter()
                        .find(|(name, _)| name == s)
                        .map(|(_, n)| *n)
                        .ok_or_else(|| ctx.err(&format!("{ff}.type"), s.clone(), "unknown ICMP type name"))?,
                },
                IntOrString::Int(n) => return Err(ctx.err(&format!("{ff}.type"), n.to_string(), "ICMP type out of range (0-255)")),
            };
            out.push(PortSpec {
                protocol: if v6 { Protocol::Icmpv6 } else { Protocol::Icmp },
                port: Port::Range { lo: t, hi: t },
            });
        }
    }
    Ok(out)
}

fn validate_l7(ctx: &Ctx, field: &str, rules: &api::L7Rules) -> Result<(), PolicyError> {
    let kinds = [rules.http.is_some(), rules.kafka.is_some(), rules.dns.is_some(), rules.l7proto.is_some()];
    if kinds.iter().filter(|k| **k).count() > 1 {
        return Err(ctx.err(field, "", "only one of http, kafka, dns or l7proto may be set"));
    }
    if let Some(http) = &rules.http {
        for (i, h) in http.iter().enumerate() {
            let f = format!("{field}.http[{i}]");
            for (name, v) in [("path", &h.path), ("method", &h.method), ("host", &h.host)] {
                if let Some(re) = v {
                    regex::Regex::new(&format!("^(?:{re})$"))
                        .map_err(|e| ctx.err(&format!("{f}.{name}"), re.clone(), format!("invalid regular expression: {e}")))?;
                }
            }
            for (j, m) in h.header_matches.iter().enumerate() {
                if let Some(a) = &m.mismatch {
                    if !matches!(a.as_str(), "LOG" | "ADD" | "DELETE" | "REPLACE") {
                        return Err(ctx.err(&format!("{f}.headerMatches[{j}].mismatch"), a.clone(), "want LOG, ADD, DELETE or REPLACE"));
                    }
                }
            }
        }
    }
    if let Some(kafka) = &rules.kafka {
        for (i, k) in kafka.iter().enumerate() {
            crate::kafka::validate(k).map_err(|(name, value, why)| ctx.err(&format!("{field}.kafka[{i}].{name}"), value, why))?;
        }
    }
    if let Some(dns) = &rules.dns {
        for (i, d) in dns.iter().enumerate() {
            validate_fqdn(ctx, &format!("{field}.dns[{i}]"), d)?;
        }
    }
    Ok(())
}

fn validate_fqdn(ctx: &Ctx, field: &str, d: &api::FqdnSelector) -> Result<(), PolicyError> {
    match (&d.match_name, &d.match_pattern) {
        (None, None) => Err(ctx.err(field, "", "one of matchName or matchPattern is required")),
        (Some(n), _) if !n.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) => {
            Err(ctx.err(&format!("{field}.matchName"), n.clone(), "not a DNS name"))
        }
        (_, Some(p)) if !p.chars().all(|c| c.is_ascii_alphanumeric() || "-._*".contains(c)) => {
            Err(ctx.err(&format!("{field}.matchPattern"), p.clone(), "not a DNS pattern (letters, digits, '-', '.', '*')"))
        }
        _ => Ok(()),
    }
}

/// Port specs of a toPorts list, grouped: the entries without L7 rules
/// together, each entry with L7 rules on its own with its rules. `deny`
/// forbids L7 rules.
fn port_rules(
    ctx: &Ctx,
    field: &str,
    to_ports: &[api::PortRule],
    deny: bool,
    ingress: bool,
) -> Result<Vec<(Vec<PortSpec>, Option<api::L7Rules>)>, PolicyError> {
    let mut plain = Vec::new();
    let mut groups = Vec::new();
    for (i, pr) in to_ports.iter().enumerate() {
        let mut out = Vec::new();
        let f = format!("{field}[{i}]");
        // constraints the datapath cannot honour yet: refuse them rather than
        // allow more than the policy says
        for (name, set) in [
            ("serverNames", !pr.server_names.is_empty()),
            ("terminatingTLS", pr.terminating_tls.is_some()),
            ("originatingTLS", pr.originating_tls.is_some()),
            ("listener", pr.listener.is_some()),
        ] {
            if set {
                return Err(ctx.err(&format!("{f}.{name}"), "", "not supported yet (TLS inspection and Envoy listeners arrive with the L7 proxy)"));
            }
        }
        if let Some(rules) = &pr.rules {
            if deny {
                return Err(ctx.err(&format!("{f}.rules"), "", "deny rules cannot have L7 rules"));
            }
            if ingress && rules.dns.is_some() {
                return Err(ctx.err(&format!("{f}.rules.dns"), "", "DNS rules apply to egress only"));
            }
            for (j, pp) in pr.ports.iter().enumerate() {
                let proto = pp.protocol.as_deref().unwrap_or("ANY").to_ascii_uppercase();
                let port = pp.port.as_ref().map(IntOrString::as_string).unwrap_or_default();
                if port.is_empty() || port == "0" {
                    return Err(ctx.err(&format!("{f}.ports[{j}].port"), port, "L7 rules need a port"));
                }
                if rules.dns.is_none() && proto != "TCP" && proto != "ANY" {
                    return Err(ctx.err(&format!("{f}.ports[{j}].protocol"), proto, "L7 rules apply to TCP only (DNS rules excepted)"));
                }
            }
            validate_l7(ctx, &format!("{f}.rules"), rules)?;
        }
        if pr.ports.is_empty() {
            // toPorts without ports: every port (an L7-only rule is rejected upstream)
            if pr.rules.is_some() {
                return Err(ctx.err(&format!("{f}.ports"), "", "L7 rules need at least one port"));
            }
            out.extend([Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|protocol| PortSpec { protocol, port: Port::Any }));
        }
        for (j, pp) in pr.ports.iter().enumerate() {
            let pf = format!("{f}.ports[{j}]");
            let protos = parse_protocol(ctx, &format!("{pf}.protocol"), pp.protocol.as_deref(), true)?;
            let port = parse_port(ctx, &pf, pp.port.as_ref(), pp.end_port)?;
            if protos.iter().any(|p| p.is_extended()) && port != Port::Any {
                let text = pp.port.as_ref().map(IntOrString::as_string).unwrap_or_default();
                return Err(ctx.err(&format!("{pf}.port"), text, "port must be empty or 0 for a protocol without ports"));
            }
            if pr.rules.is_some() && matches!(port, Port::Range { lo, hi } if lo != hi) {
                return Err(ctx.err(&format!("{pf}.endPort"), "", "L7 rules need a single port"));
            }
            for protocol in protos {
                out.push(PortSpec { protocol, port: port.clone() });
            }
        }
        match &pr.rules {
            Some(r) => groups.push((out, Some(r.clone()))),
            None => plain.extend(out),
        }
    }
    if !plain.is_empty() || groups.is_empty() {
        groups.insert(0, (plain, None));
    }
    Ok(groups)
}

struct PeerFields<'a> {
    endpoints: &'a Option<Vec<LabelSelector>>,
    requires: &'a Option<Vec<LabelSelector>>,
    cidr: &'a Option<Vec<String>>,
    cidr_set: &'a Option<Vec<api::CidrRule>>,
    entities: &'a Option<Vec<String>>,
    nodes: &'a Option<Vec<LabelSelector>>,
    groups: &'a Option<Vec<serde_json::Value>>,
    services: Option<&'a Vec<api::Service>>,
    fqdns: Option<&'a Vec<api::FqdnSelector>>,
    to_ports: &'a Option<Vec<api::PortRule>>,
    icmps: &'a Option<Vec<api::IcmpRule>>,
    names: [&'static str; 6], // endpoints, requires, cidr, cidrSet, entities, nodes
}

fn peer_rule(ctx: &Ctx, field: &str, p: PeerFields, deny: bool) -> Result<Vec<PeerRule>, PolicyError> {
    let [n_ep, n_req, n_cidr, n_cidrset, n_ent, n_nodes] = p.names;
    // one kind of peer per rule, as upstream (selectors, CIDRs and entities
    // would otherwise have to be intersected, which neither side defines)
    let present: Vec<&str> = [
        (n_ep, p.endpoints.as_ref().is_some_and(|v| !v.is_empty())),
        (n_cidr, p.cidr.as_ref().is_some_and(|v| !v.is_empty())),
        (n_cidrset, p.cidr_set.as_ref().is_some_and(|v| !v.is_empty())),
        (n_ent, p.entities.as_ref().is_some_and(|v| !v.is_empty())),
        (n_nodes, p.nodes.as_ref().is_some_and(|v| !v.is_empty())),
        ("toServices", p.services.is_some_and(|v| !v.is_empty())),
        ("toFQDNs", p.fqdns.is_some_and(|v| !v.is_empty())),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(n, _)| n)
    .collect();
    if present.len() > 1 {
        return Err(ctx.err(field, "", format!("combining {} and {} is not supported yet", present[0], present[1])));
    }
    let mut selectors: Vec<Selector> = Vec::new();
    let mut wildcard = false;
    let mut any_peer_field = false;

    if let Some(eps) = p.endpoints {
        any_peer_field = true;
        for (i, s) in eps.iter().enumerate() {
            let sel = ctx.peer_selector(&format!("{field}.{n_ep}[{i}]"), s)?;
            if sel.is_wildcard() {
                wildcard = true;
            }
            selectors.push(sel);
        }
    }
    if let Some(cidrs) = p.cidr {
        any_peer_field = true;
        for (i, c) in cidrs.iter().enumerate() {
            let f = format!("{field}.{n_cidr}[{i}]");
            let net = parse_cidr(ctx, &f, c)?;
            selectors.push(cidr_selector(ctx, &f, net, &[])?);
        }
    }
    let mut cidr_groups = Vec::new();
    if let Some(set) = p.cidr_set {
        any_peer_field = true;
        for (i, c) in set.iter().enumerate() {
            let f = format!("{field}.{n_cidrset}[{i}]");
            let groups = match (&c.cidr, &c.cidr_group_ref, &c.cidr_group_selector) {
                (Some(cidr), None, None) => {
                    let net = parse_cidr(ctx, &format!("{f}.cidr"), cidr)?;
                    selectors.push(cidr_selector(ctx, &f, net, &c.except)?);
                    continue;
                }
                (None, Some(name), None) if name.is_empty() => return Err(ctx.err(&format!("{f}.cidrGroupRef"), "", "empty group name")),
                (None, Some(name), None) => CidrGroupMatch::Named(name.clone()),
                (None, None, Some(sel)) => CidrGroupMatch::Selected(ctx.selector(&format!("{f}.cidrGroupSelector"), sel, SOURCE_K8S)?),
                (None, None, None) => return Err(ctx.err(&f, "", "one of cidr, cidrGroupRef or cidrGroupSelector is required")),
                _ => return Err(ctx.err(&f, "", "cidr, cidrGroupRef and cidrGroupSelector are mutually exclusive")),
            };
            let except = c.except.iter().enumerate().map(|(j, e)| parse_cidr(ctx, &format!("{f}.except[{j}]"), e)).collect::<Result<Vec<_>, _>>()?;
            cidr_groups.push(CidrGroupRef { groups, except });
        }
    }
    if let Some(entities) = p.entities {
        any_peer_field = true;
        for (i, e) in entities.iter().enumerate() {
            let f = format!("{field}.{n_ent}[{i}]");
            if !ENTITIES.contains(&e.as_str()) {
                return Err(ctx.err(&f, e.clone(), format!("unknown entity (want one of {})", ENTITIES.join(", "))));
            }
            match entity_selectors(e, CLUSTER_NAME) {
                None => wildcard = true,
                Some(s) => selectors.extend(s),
            }
        }
    }
    if let Some(nodes) = p.nodes {
        // other nodes by their labels (`node:` source; `any:` matches it);
        // never this node, which is `host`
        any_peer_field = true;
        for (i, s) in nodes.iter().enumerate() {
            let sel = ctx.selector(&format!("{field}.{n_nodes}[{i}]"), s, SOURCE_ANY)?;
            let remote = Label::reserved("remote-node");
            selectors.push(sel.with(Requirement { source: remote.source, key: remote.key, op: Operator::Exists }));
        }
    }
    if let Some(groups) = p.groups {
        if !groups.is_empty() {
            return Err(ctx.err(&format!("{field}.{}", if n_ep.starts_with("from") { "fromGroups" } else { "toGroups" }), "", "cloud provider groups are not supported in this environment"));
        }
    }
    let mut service_refs = Vec::new();
    if let Some(services) = p.services {
        any_peer_field = true;
        for (i, s) in services.iter().enumerate() {
            let f = format!("{field}.toServices[{i}]");
            let default_ns = ctx.namespace.map(str::to_string);
            match (&s.k8s_service, &s.k8s_service_selector) {
                (Some(svc), None) if svc.service_name.is_empty() => {
                    return Err(ctx.err(&format!("{f}.k8sService.serviceName"), "", "missing"));
                }
                (Some(svc), None) => {
                    let namespace = svc.namespace.clone().filter(|n| !n.is_empty()).or(default_ns).unwrap_or_else(|| "default".into());
                    service_refs.push(ServiceRef::Named { namespace, name: svc.service_name.clone() });
                }
                (None, Some(sel)) => {
                    let selector = ctx.selector(&format!("{f}.k8sServiceSelector.selector"), &sel.selector, SOURCE_K8S)?;
                    let namespace = sel.namespace.clone().filter(|n| !n.is_empty()).or(default_ns);
                    service_refs.push(ServiceRef::Selected { namespace, selector });
                }
                _ => return Err(ctx.err(&f, "", "exactly one of k8sService or k8sServiceSelector is required")),
            }
        }
    }
    let mut fqdn_sels = Vec::new();
    if let Some(fqdns) = p.fqdns {
        any_peer_field = true;
        for (i, d) in fqdns.iter().enumerate() {
            validate_fqdn(ctx, &format!("{field}.toFQDNs[{i}]"), d)?;
            fqdn_sels.push(d.clone());
        }
    }

    let mut requires = Vec::new();
    if let Some(reqs) = p.requires {
        for (i, s) in reqs.iter().enumerate() {
            requires.push(ctx.peer_selector(&format!("{field}.{n_req}[{i}]"), s)?);
        }
    }

    let mut groups = match p.to_ports {
        Some(tp) => port_rules(ctx, &format!("{field}.toPorts"), tp, deny, n_ep.starts_with("from"))?,
        None => vec![(vec![], None)],
    };
    let ports = &mut groups[0].0;
    let has_icmp = p.icmps.as_ref().is_some_and(|v| !v.is_empty());
    if let Some(icmps) = p.icmps {
        if p.to_ports.as_ref().is_some_and(|v| !v.is_empty()) && has_icmp {
            return Err(ctx.err(&format!("{field}.icmps"), "", "icmps and toPorts cannot be combined in one rule"));
        }
        ports.extend(icmp_ports(ctx, &format!("{field}.icmps"), icmps)?);
    }
    let has_ports = p.to_ports.as_ref().is_some_and(|v| !v.is_empty()) || has_icmp;

    // No peer field at all: an L4-only rule applies to every peer, an empty
    // rule applies to none (upstream: `ingress: [{}]` selects nothing).
    let peers = if wildcard || (!any_peer_field && has_ports) {
        Peers::All
    } else {
        Peers::Selected(selectors)
    };
    Ok(groups
        .into_iter()
        .map(|(ports, l7)| PeerRule {
            peers: peers.clone(),
            services: service_refs.clone(),
            cidr_groups: cidr_groups.clone(),
            requires: requires.clone(),
            ports,
            has_l7: l7.is_some(),
            l7,
            fqdns: fqdn_sels.clone(),
            origin: field.to_string(),
        })
        .collect())
}

fn check_authentication(ctx: &Ctx, field: &str, a: &Option<api::Authentication>, deny: bool) -> Result<(), PolicyError> {
    match a {
        None => Ok(()),
        Some(_) if deny => Err(ctx.err(&format!("{field}.authentication"), "", "deny rules cannot require authentication")),
        Some(a) if a.mode == "disabled" => Ok(()),
        Some(a) if matches!(a.mode.as_str(), "required" | "test-always-fail") => {
            Err(ctx.err(&format!("{field}.authentication.mode"), a.mode.clone(), "mutual authentication is not supported yet"))
        }
        Some(a) => Err(ctx.err(&format!("{field}.authentication.mode"), a.mode.clone(), "want disabled, required or test-always-fail")),
    }
}

fn ingress_rule(ctx: &Ctx, field: &str, r: &IngressRule, deny: bool) -> Result<Vec<PeerRule>, PolicyError> {
    check_authentication(ctx, field, &r.authentication, deny)?;
    peer_rule(
        ctx,
        field,
        PeerFields {
            endpoints: &r.from_endpoints,
            requires: &r.from_requires,
            cidr: &r.from_cidr,
            cidr_set: &r.from_cidr_set,
            entities: &r.from_entities,
            nodes: &r.from_nodes,
            groups: &r.from_groups,
            services: None,
            fqdns: None,
            to_ports: &r.to_ports,
            icmps: &r.icmps,
            names: ["fromEndpoints", "fromRequires", "fromCIDR", "fromCIDRSet", "fromEntities", "fromNodes"],
        },
        deny,
    )
}

fn egress_rule(ctx: &Ctx, field: &str, r: &EgressRule, deny: bool) -> Result<Vec<PeerRule>, PolicyError> {
    check_authentication(ctx, field, &r.authentication, deny)?;
    if deny && r.to_fqdns.is_some() {
        return Err(ctx.err(&format!("{field}.toFQDNs"), "", "egressDeny cannot use toFQDNs"));
    }
    peer_rule(
        ctx,
        field,
        PeerFields {
            endpoints: &r.to_endpoints,
            requires: &r.to_requires,
            cidr: &r.to_cidr,
            cidr_set: &r.to_cidr_set,
            entities: &r.to_entities,
            nodes: &r.to_nodes,
            groups: &r.to_groups,
            services: r.to_services.as_ref(),
            fqdns: r.to_fqdns.as_ref(),
            to_ports: &r.to_ports,
            icmps: &r.icmps,
            names: ["toEndpoints", "toRequires", "toCIDR", "toCIDRSet", "toEntities", "toNodes"],
        },
        deny,
    )
}

fn policy_labels(policy: &PolicyRef) -> Vec<String> {
    let mut v = vec![
        format!("k8s:io.cilium.k8s.policy.derived-from={}", policy.kind.as_str()),
        format!("k8s:io.cilium.k8s.policy.name={}", policy.name),
    ];
    if let Some(ns) = &policy.namespace {
        v.push(format!("k8s:io.cilium.k8s.policy.namespace={ns}"));
    }
    v
}

fn cilium_rules(doc_name: &str, p: &CiliumPolicy, policy: PolicyRef) -> Result<Vec<Rule>, PolicyError> {
    let kind = policy.kind;
    let namespace = policy.namespace.clone();
    let ctx = Ctx { doc: doc_name, namespace: namespace.as_deref() };
    let mut specs: Vec<(String, &api::Rule)> = Vec::new();
    if let Some(s) = &p.spec {
        specs.push(("spec".to_string(), s));
    }
    for (i, s) in p.specs.iter().enumerate() {
        specs.push((format!("specs[{i}]"), s));
    }
    if specs.is_empty() {
        return Err(ctx.err("spec", "", "one of spec or specs is required"));
    }
    let mut out = Vec::new();
    for (origin, r) in specs {
        let subject = match (&r.endpoint_selector, &r.node_selector) {
            (Some(es), None) => {
                let sel = ctx.selector(&format!("{origin}.endpointSelector"), es, SOURCE_ANY)?;
                // namespaced policies only ever select their own namespace's pods
                match ctx.namespace {
                    Some(ns) => sel.with(namespace_requirement(ns)),
                    None => sel,
                }
            }
            (None, Some(ns)) => {
                if kind.is_namespaced() {
                    return Err(ctx.err(&format!("{origin}.nodeSelector"), "", "nodeSelector is only allowed in CiliumClusterwideNetworkPolicy"));
                }
                check_host_rule(&ctx, &origin, r)?;
                ctx.selector(&format!("{origin}.nodeSelector"), ns, SOURCE_ANY)?
            }
            (None, None) => {
                return Err(ctx.err(&origin, "", "one of endpointSelector or nodeSelector is required"));
            }
            (Some(_), Some(_)) => {
                return Err(ctx.err(&origin, "", "endpointSelector and nodeSelector are mutually exclusive"));
            }
        };
        if r.ingress.is_none() && r.ingress_deny.is_none() && r.egress.is_none() && r.egress_deny.is_none() {
            return Err(ctx.err(&origin, "", "a rule needs at least one of ingress, ingressDeny, egress or egressDeny"));
        }
        let mut ingress = Vec::new();
        for (i, ir) in r.ingress.iter().flatten().enumerate() {
            ingress.extend(ingress_rule(&ctx, &format!("{origin}.ingress[{i}]"), ir, false)?);
        }
        let mut ingress_deny = Vec::new();
        for (i, ir) in r.ingress_deny.iter().flatten().enumerate() {
            ingress_deny.extend(ingress_rule(&ctx, &format!("{origin}.ingressDeny[{i}]"), ir, true)?);
        }
        let mut egress = Vec::new();
        for (i, er) in r.egress.iter().flatten().enumerate() {
            egress.extend(egress_rule(&ctx, &format!("{origin}.egress[{i}]"), er, false)?);
        }
        let mut egress_deny = Vec::new();
        for (i, er) in r.egress_deny.iter().flatten().enumerate() {
            egress_deny.extend(egress_rule(&ctx, &format!("{origin}.egressDeny[{i}]"), er, true)?);
        }
        let dd = r.enable_default_deny.clone().unwrap_or_default();
        let mut labels = policy_labels(&policy);
        for (i, l) in r.labels.iter().enumerate() {
            if l.key.is_empty() {
                return Err(ctx.err(&format!("{origin}.labels[{i}].key"), "", "missing"));
            }
            let src = if l.source.is_empty() { "unspec" } else { &l.source };
            labels.push(Label::new(src, &l.key, &l.value).to_string());
        }
        out.push(Rule {
            policy: policy.clone(),
            origin,
            subject: Some(subject),
            host: r.node_selector.is_some(),
            ingress_enforced: r.ingress.as_ref().is_some_and(|v| !v.is_empty())
                || r.ingress_deny.as_ref().is_some_and(|v| !v.is_empty()),
            egress_enforced: r.egress.as_ref().is_some_and(|v| !v.is_empty())
                || r.egress_deny.as_ref().is_some_and(|v| !v.is_empty()),
            ingress_default_deny: dd.ingress.unwrap_or(true),
            egress_default_deny: dd.egress.unwrap_or(true),
            ingress,
            ingress_deny,
            egress,
            egress_deny,
            labels,
            description: r.description.clone(),
        });
    }
    Ok(out)
}

/// What host policies cannot say here: L7 rules and DNS names (the node's
/// own traffic is never handed to the proxy).
fn check_host_rule(ctx: &Ctx, origin: &str, r: &api::Rule) -> Result<(), PolicyError> {
    let ports_l7 = |dir: &str, i: usize, tp: &Option<Vec<api::PortRule>>| -> Result<(), PolicyError> {
        if let Some(j) = tp.iter().flatten().position(|p| p.rules.is_some()) {
            return Err(ctx.err(&format!("{origin}.{dir}[{i}].toPorts[{j}].rules"), "", "host policies cannot have L7 rules"));
        }
        Ok(())
    };
    for (dir, rules) in [("ingress", &r.ingress), ("ingressDeny", &r.ingress_deny)] {
        for (i, x) in rules.iter().flatten().enumerate() {
            ports_l7(dir, i, &x.to_ports)?;
        }
    }
    for (dir, rules) in [("egress", &r.egress), ("egressDeny", &r.egress_deny)] {
        for (i, x) in rules.iter().flatten().enumerate() {
            ports_l7(dir, i, &x.to_ports)?;
            if x.to_fqdns.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(ctx.err(&format!("{origin}.{dir}[{i}].toFQDNs"), "", "host policies cannot select DNS names"));
            }
        }
    }
    Ok(())
}

fn k8s_peers(ctx: &Ctx, field: &str, peers: &Option<Vec<api::NetworkPolicyPeer>>) -> Result<Peers, PolicyError> {
    let peers = match peers {
        None => return Ok(Peers::All),
        Some(v) if v.is_empty() => return Ok(Peers::All),
        Some(v) => v,
    };
    let ns = ctx.namespace.unwrap_or("default");
    let mut selectors = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
            (None, None, Some(block)) => {
                let net = parse_cidr(ctx, &format!("{f}.ipBlock.cidr"), &block.cidr)?;
                selectors.push(cidr_selector(ctx, &format!("{f}.ipBlock"), net, &block.except)?);
            }
            (pod, nsel, None) if pod.is_some() || nsel.is_some() => {
                let mut sel = match pod {
                    Some(ps) => ctx.selector(&format!("{f}.podSelector"), ps, SOURCE_K8S)?,
                    None => Selector::wildcard(),
                };
                match nsel {
                    None => sel = sel.with(namespace_requirement(ns)),
                    Some(n) => {
                        let nf = format!("{f}.namespaceSelector");
                        let ns_sel = ctx.selector(&nf, n, SOURCE_K8S)?;
                        // namespace labels are carried by pods as
                        // io.cilium.k8s.namespace.labels.<key>
                        for r in ns_sel.requirements {
                            sel = sel.with(Requirement {
                                source: SOURCE_K8S.to_string(),
                                key: format!("{NAMESPACE_LABELS_PREFIX}{}", r.key),
                                op: r.op,
                            });
                        }
                        // every pod carries its namespace label: an empty
                        // namespaceSelector selects all pods, not the world
                        sel = sel.with(Requirement {
                            source: SOURCE_K8S.to_string(),
                            key: POD_NAMESPACE_LABEL.to_string(),
                            op: Operator::Exists,
                        });
                    }
                }
                selectors.push(sel);
            }
            (None, None, None) => return Err(ctx.err(&f, "", "one of podSelector, namespaceSelector or ipBlock is required")),
            _ => return Err(ctx.err(&f, "", "ipBlock cannot be combined with podSelector or namespaceSelector")),
        }
    }
    Ok(Peers::Selected(selectors))
}

fn k8s_ports(ctx: &Ctx, field: &str, ports: &Option<Vec<api::NetworkPolicyPort>>) -> Result<Vec<PortSpec>, PolicyError> {
    let mut out = Vec::new();
    for (i, p) in ports.iter().flatten().enumerate() {
        let f = format!("{field}[{i}]");
        let protos = parse_protocol(ctx, &format!("{f}.protocol"), p.protocol.as_deref(), false)?;
        let port = parse_port(ctx, &f, p.port.as_ref(), p.end_port)?;
        for protocol in protos {
            out.push(PortSpec { protocol, port: port.clone() });
        }
    }
    Ok(out)
}

fn k8s_rules(doc_name: &str, p: &NetworkPolicy, policy: PolicyRef) -> Result<Vec<Rule>, PolicyError> {
    let namespace = policy.namespace.clone();
    let ctx = Ctx { doc: doc_name, namespace: namespace.as_deref() };
    let ns = namespace.as_deref().unwrap_or("default");
    let subject = ctx
        .selector("spec.podSelector", &p.spec.pod_selector, SOURCE_K8S)?
        .with(namespace_requirement(ns));
    let (mut ing, mut eg) = (false, false);
    match &p.spec.policy_types {
        None => {
            // Kubernetes adds Egress only when there are egress rules
            ing = true;
            eg = p.spec.egress.as_ref().is_some_and(|v| !v.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ing = true,
                    "Egress" => eg = true,
                    other => return Err(ctx.err(&format!("spec.policyTypes[{i}]"), other, "want Ingress or Egress")),
                }
            }
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in p.spec.ingress.iter().flatten().enumerate() {
        let f = format!("spec.ingress[{i}]");
        ingress.push(PeerRule {
            peers: k8s_peers(&ctx, &format!("{f}.from"), &r.from)?,
            services: vec![],
            cidr_groups: vec![],
            requires: vec![],
            ports: k8s_ports(&ctx, &format!("{f}.ports"), &r.ports)?,
            has_l7: false,
            l7: None,
            fqdns: vec![],
            origin: f,
        });
    }
    let mut egress = Vec::new();
    for (i, r) in p.spec.egress.iter().flatten().enumerate() {
        let f = format!("spec.egress[{i}]");
        egress.push(PeerRule {
            peers: k8s_peers(&ctx, &format!("{f}.to"), &r.to)?,
            services: vec![],
            cidr_groups: vec![],
            requires: vec![],
            ports: k8s_ports(&ctx, &format!("{f}.ports"), &r.ports)?,
            has_l7: false,
            l7: None,
            fqdns: vec![],
            origin: f,
        });
    }
    Ok(vec![Rule {
        labels: policy_labels(&policy),
        policy,
        origin: "spec".to_string(),
        subject: Some(subject),
        host: false,
        ingress_enforced: ing,
        egress_enforced: eg,
        ingress_default_deny: true,
        egress_default_deny: true,
        ingress: if ing { ingress } else { vec![] },
        ingress_deny: vec![],
        egress: if eg { egress } else { vec![] },
        egress_deny: vec![],
        description: None,
    }])
}

/// Translates a document into rules, validating everything on the way.
pub fn translate(doc: &PolicyDocument, doc_name: &str) -> Result<Vec<Rule>, PolicyError> {
    let policy = doc.key();
    if let Some(ns) = &policy.namespace {
        if ns.is_empty() || !ns.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(PolicyError::new(doc_name, "metadata.namespace", ns.clone(), "not a valid namespace name"));
        }
    }
    match doc {
        PolicyDocument::Cilium(p) => cilium_rules(doc_name, p, policy),
        PolicyDocument::Kubernetes(p) => k8s_rules(doc_name, p, policy),
        PolicyDocument::CidrGroup(g) => {
            cidr_group_info(doc_name, g)?;
            Ok(vec![])
        }
    }
}

/// The prefixes and labels of a CiliumCIDRGroup, every prefix checked.
pub fn cidr_group_info(doc_name: &str, g: &api::CidrGroup) -> Result<CidrGroupInfo, PolicyError> {
    let ctx = Ctx { doc: doc_name, namespace: None };
    let cidrs = g
        .spec
        .external_cidrs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let f = format!("spec.externalCIDRs[{i}]");
            c.parse::<IpNet>().map_err(|_| ctx.err(&f, c.clone(), "not a CIDR (want e.g. 10.0.0.0/8)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CidrGroupInfo { labels: g.metadata.labels.clone(), cidrs })
}
