//! `cilium policy trace`: why traffic from one set of labels to another on a
//! port is allowed or denied, in both directions — the source's egress and
//! the destination's ingress — naming every rule that matched and why the
//! others did not. It reads the same normalized rules the computation does,
//! and a test checks that the two always agree.

use cilium_abi::ReservedIdentity;
use cilium_labels::LabelSet;
use serde::{Deserialize, Serialize};

use crate::compute::{EnforcementMode, NamedPorts, PolicyOptions};
use crate::rule::{PeerRule, Peers, Port, PortSpec, Protocol, Rule};

/// One side of the traced traffic.
#[derive(Debug, Clone)]
pub struct Party<'a> {
    pub labels: &'a LabelSet,
    /// Whether it is a local endpoint with a policy of its own (pods are;
    /// the world and the host are not).
    pub is_endpoint: bool,
    /// Its named container ports (used when it is the destination).
    pub named_ports: &'a NamedPorts,
}

/// The outcome of one direction, or of the whole trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Allowed,
    Denied,
}

/// One direction's explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionTrace {
    /// "egress" (of the source) or "ingress" (of the destination).
    pub direction: String,
    pub enforced: bool,
    /// Policies with a rule selecting the endpoint.
    pub selected_by: Vec<String>,
    /// What each rule of this direction said, in order.
    pub steps: Vec<String>,
    pub verdict: Verdict,
    /// The sentence that decided.
    pub reason: String,
    /// The policies whose rules allowed it (when allowed by rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<crate::PolicyRef>,
    /// The policies whose deny rules denied it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_by: Vec<crate::PolicyRef>,
}

/// A full trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub protocol: String,
    pub port: u16,
    pub egress: Option<DirectionTrace>,
    pub ingress: Option<DirectionTrace>,
    pub verdict: Verdict,
}

fn port_matches(spec: &PortSpec, protocol: Protocol, port: u16, named: &NamedPorts) -> bool {
    if spec.protocol != protocol {
        return false;
    }
    match &spec.port {
        Port::Any => true,
        Port::Range { lo, hi } => *lo <= port && port <= *hi,
        Port::Named(n) => named.get(n).is_some_and(|set| set.contains(&(protocol, port))),
    }
}

fn describe_peers(r: &PeerRule) -> String {
    match &r.peers {
        Peers::All => "every peer".to_string(),
        Peers::Selected(v) if v.is_empty() => "no peer".to_string(),
        Peers::Selected(v) => v.iter().map(|s| format!("[{s}]")).collect::<Vec<_>>().join(" or "),
    }
}

fn describe_ports(r: &PeerRule) -> String {
    if r.ports.is_empty() {
        "any port".to_string()
    } else {
        r.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    }
}

fn direction(
    rules: &[Rule],
    endpoint: &Party,
    peer: &LabelSet,
    egress: bool,
    protocol: Protocol,
    port: u16,
    named: &NamedPorts,
    options: PolicyOptions,
) -> DirectionTrace {
    let name = if egress { "egress" } else { "ingress" };
    let selecting: Vec<&Rule> = rules.iter().filter(|r| r.selects(endpoint.labels)).collect();
    let mut selected_by: Vec<String> = selecting.iter().map(|r| r.policy.to_string()).collect();
    selected_by.dedup();
    let mut steps = Vec::new();
    let mut allow_refs: Vec<crate::PolicyRef> = Vec::new();
    let mut deny_refs: Vec<crate::PolicyRef> = Vec::new();
    let done = |enforced: bool, steps: Vec<String>, verdict: Verdict, reason: String| DirectionTrace {
        direction: name.to_string(),
        enforced,
        selected_by: selected_by.clone(),
        steps,
        verdict,
        reason,
        allowed_by: Vec::new(),
        denied_by: Vec::new(),
    };
    if options.mode == EnforcementMode::Never {
        return done(false, steps, Verdict::Allowed, "policy enforcement is disabled (--enable-policy=never)".into());
    }
    let (enforced, default_deny) = selecting.iter().fold((false, false), |(e, d), r| {
        let (re, rd) = if egress {
            (r.egress_enforced, r.egress_enforced && r.egress_default_deny)
        } else {
            (r.ingress_enforced, r.ingress_enforced && r.ingress_default_deny)
        };
        (e || re, d || rd)
    });
    let always = options.mode == EnforcementMode::Always;
    if !enforced && !always {
        return done(false, steps, Verdict::Allowed, format!("no rule selects this endpoint for {name}: {name} is not enforced"));
    }
    let requires: Vec<_> = selecting
        .iter()
        .flat_map(|r| if egress { &r.egress } else { &r.ingress })
        .flat_map(|pr| pr.requires.iter())
        .collect();
    let mut allowed_by = None;
    let mut l7_by = None;
    let mut denied_by = None;
    for r in &selecting {
        let (allows, denies) = if egress { (&r.egress, &r.egress_deny) } else { (&r.ingress, &r.ingress_deny) };
        for (kind, list) in [("allow", allows), ("deny", denies)] {
            for pr in list.iter() {
                let who = format!("{} {}", r.policy, pr.origin);
                let peer_ok = match &pr.peers {
                    Peers::All => true,
                    Peers::Selected(v) => v.iter().any(|s| s.matches(peer)),
                };
                let requires_ok = kind == "deny" || requires.iter().all(|s| s.matches(peer));
                let port_ok = pr.ports.is_empty() || pr.ports.iter().any(|p| port_matches(p, protocol, port, named));
                let verdict = if !peer_ok {
                    format!("peer does not match {}", describe_peers(pr))
                } else if !requires_ok {
                    "peer matches, but not every fromRequires/toRequires selector".to_string()
                } else if !port_ok {
                    format!("peer matches {}, but {port}/{} is not in {}", describe_peers(pr), protocol.name(), describe_ports(pr))
                } else {
                    let proxied = pr.has_l7 && crate::compute::l7_proxy_port(pr.l7.as_ref(), egress, options) != cilium_abi::POLICY_PROXY_PORT_PENDING;
                    if kind == "deny" {
                        denied_by.get_or_insert(who.clone());
                        if !deny_refs.contains(&r.policy) {
                            deny_refs.push(r.policy.clone());
                        }
                    } else if pr.has_l7 && !proxied {
                        l7_by.get_or_insert(who.clone());
                    } else {
                        allowed_by.get_or_insert(who.clone());
                        if !allow_refs.contains(&r.policy) {
                            allow_refs.push(r.policy.clone());
                        }
                    }
                    format!(
                        "MATCHES: peer matches {} on {}{}",
                        describe_peers(pr),
                        describe_ports(pr),
                        if proxied {
                            " (with HTTP rules: the L7 proxy then checks each request)"
                        } else if pr.has_l7 {
                            " (with L7 rules the proxy does not enforce yet: such traffic is dropped)"
                        } else {
                            ""
                        }
                    )
                };
                steps.push(format!("{who} ({kind}): {verdict}"));
            }
        }
    }
    if let Some(d) = denied_by {
        return DirectionTrace { denied_by: deny_refs, ..done(true, steps, Verdict::Denied, format!("denied by {d} (deny rules take precedence)")) };
    }
    if !egress && options.allow_localhost && peer.has_reserved(ReservedIdentity::Host.label()) {
        return done(true, steps, Verdict::Allowed, "the local host may always reach its endpoints (allow-localhost)".into());
    }
    if let Some(a) = allowed_by {
        return DirectionTrace { allowed_by: allow_refs, ..done(true, steps, Verdict::Allowed, format!("allowed by {a}")) };
    }
    if let Some(a) = l7_by {
        return done(true, steps, Verdict::Denied, format!("{a} allows it only through L7 rules the proxy does not enforce yet: dropped (178)"));
    }
    if enforced && !default_deny && !always {
        return done(true, steps, Verdict::Allowed, "no rule matches, and the selecting rules disable default deny".into());
    }
    done(true, steps, Verdict::Denied, format!("no rule allows it: {name} is default-deny for this endpoint"))
}

/// Traces traffic from `src` to `dst` on `protocol`/`port`.
pub fn trace(rules: &[Rule], src: &Party, dst: &Party, protocol: Protocol, port: u16, options: PolicyOptions) -> Trace {
    let egress = src
        .is_endpoint
        .then(|| direction(rules, src, dst.labels, true, protocol, port, dst.named_ports, options));
    let ingress = dst
        .is_endpoint
        .then(|| direction(rules, dst, src.labels, false, protocol, port, dst.named_ports, options));
    let denied = egress.iter().chain(ingress.iter()).any(|d| d.verdict == Verdict::Denied);
    Trace {
        protocol: protocol.name().to_string(),
        port,
        egress,
        ingress,
        verdict: if denied { Verdict::Denied } else { Verdict::Allowed },
    }
}

impl Trace {
    /// The human-readable form `cilium policy trace` prints.
    pub fn render(&self, src: &str, dst: &str) -> String {
        let mut out = format!("Tracing From: {src}\n        To:   {dst}\n        Port: {}/{}\n", self.port, self.protocol);
        for (title, d) in [("Egress of the source", &self.egress), ("Ingress of the destination", &self.ingress)] {
            out.push_str(&format!("\n{title}:\n"));
            match d {
                None => out.push_str("  not a local endpoint: no policy of its own applies\n"),
                Some(d) => {
                    if !d.selected_by.is_empty() {
                        out.push_str(&format!("  selected by: {}\n", d.selected_by.join(", ")));
                    }
                    for s in &d.steps {
                        out.push_str(&format!("  {s}\n"));
                    }
                    out.push_str(&format!("  => {}: {}\n", if d.verdict == Verdict::Allowed { "ALLOWED" } else { "DENIED" }, d.reason));
                }
            }
        }
        out.push_str(&format!("\nFinal verdict: {}\n", if self.verdict == Verdict::Allowed { "ALLOWED" } else { "DENIED" }));
        out
    }
}

/// What the L7 proxy must check for the requests of one connection, in one
/// direction of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7Policy {
    /// Not restricted at L7 (a matching rule has no L7 part, or the
    /// direction is not enforced).
    Unrestricted,
    /// Requests must match one of these (from every matching rule).
    Http(Vec<crate::api::HttpRule>),
    /// DNS queries must name something one of these matches.
    Dns(Vec<crate::api::FqdnSelector>),
    /// Kafka requests must pass these.
    Kafka(Vec<crate::api::KafkaRule>),
    /// Not allowed at all (L3/L4 says no, e.g. after a policy change).
    Denied,
}

/// The L7 policy for traffic between `endpoint` (a local endpoint, whose
/// `egress` or ingress applies) and `peer` on `protocol`/`port`. `named`
/// are the destination's named ports. Matches exactly what the datapath
/// computation allows: deny rules first, then allow rules; a rule without
/// L7 rules on the port lifts L7 filtering (as upstream).
pub fn l7_policy(rules: &[Rule], endpoint: &LabelSet, peer: &LabelSet, egress: bool, protocol: Protocol, port: u16, named: &NamedPorts, options: PolicyOptions) -> L7Policy {
    if options.mode == EnforcementMode::Never {
        return L7Policy::Unrestricted;
    }
    let selecting: Vec<&Rule> = rules.iter().filter(|r| r.selects(endpoint)).collect();
    let (enforced, default_deny) = selecting.iter().fold((false, false), |(e, d), r| {
        let (re, rd) = if egress { (r.egress_enforced, r.egress_enforced && r.egress_default_deny) } else { (r.ingress_enforced, r.ingress_enforced && r.ingress_default_deny) };
        (e || re, d || rd)
    });
    let always = options.mode == EnforcementMode::Always;
    if !enforced && !always {
        return L7Policy::Unrestricted;
    }
    let requires: Vec<_> = selecting.iter().flat_map(|r| if egress { &r.egress } else { &r.ingress }).flat_map(|pr| pr.requires.iter()).collect();
    let matches = |pr: &PeerRule, deny: bool| {
        let peer_ok = match &pr.peers {
            Peers::All => true,
            Peers::Selected(v) => v.iter().any(|s| s.matches(peer)),
        };
        peer_ok && (deny || requires.iter().all(|s| s.matches(peer))) && (pr.ports.is_empty() || pr.ports.iter().any(|p| port_matches(p, protocol, port, named)))
    };
    let mut http = Vec::new();
    let mut dns = Vec::new();
    let mut kafka = Vec::new();
    let mut is_kafka = false;
    let mut allowed = false;
    for r in &selecting {
        let (allows, denies) = if egress { (&r.egress, &r.egress_deny) } else { (&r.ingress, &r.ingress_deny) };
        if denies.iter().any(|pr| matches(pr, true)) {
            return L7Policy::Denied;
        }
        for pr in allows.iter().filter(|pr| matches(pr, false)) {
            match pr.l7.as_ref() {
                Some(l) if l.http.is_some() => {
                    allowed = true;
                    http.extend(l.http.iter().flatten().cloned());
                }
                Some(l) if l.dns.is_some() => {
                    allowed = true;
                    dns.extend(l.dns.iter().flatten().cloned());
                }
                Some(l) if l.kafka.is_some() => {
                    allowed = true;
                    is_kafka = true;
                    kafka.extend(l.kafka.iter().flatten().cloned());
                }
                Some(_) => {}
                None => return L7Policy::Unrestricted,
            }
        }
    }
    if !egress && options.allow_localhost && peer.has_reserved(ReservedIdentity::Host.label()) {
        return L7Policy::Unrestricted;
    }
    if allowed {
        return if !dns.is_empty() || (http.is_empty() && protocol == Protocol::Udp) {
            L7Policy::Dns(dns)
        } else if is_kafka {
            L7Policy::Kafka(kafka)
        } else {
            L7Policy::Http(http)
        };
    }
    if !default_deny && !always {
        return L7Policy::Unrestricted;
    }
    L7Policy::Denied
}
