//! Flow filters with upstream's semantics: inside one [`FlowFilter`] every
//! set field must match (AND), values of one field are alternatives (OR);
//! a flow passes a request when it matches any whitelist filter (or there is
//! none) and no blacklist filter.
//!
//! Filters come from clients, so compiling one checks every value and says
//! which field was wrong.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use crate::proto::flow::{Endpoint, Flow, FlowFilter, layer4};

/// A filter field that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filter field {field} value {value:?}: {reason}")]
pub struct FilterError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

fn bad(field: &'static str, value: &str, reason: impl Into<String>) -> FilterError {
    FilterError {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A label selector in Kubernetes syntax ("app=web,tier in (a,b),!canary");
/// keys without a source (`k8s:`) match any source.
#[derive(Debug, Clone)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(field: &'static str, s: &str) -> Result<LabelSelector, FilterError> {
        let mut reqs = Vec::new();
        for part in split_selector(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(bad(field, s, "empty requirement"));
            }
            let words: Vec<&str> = p.splitn(2, char::is_whitespace).collect();
            if words.len() == 2
                && (words[1].trim_start().starts_with("in ")
                    || words[1].trim_start().starts_with("notin ")
                    || words[1].trim_start().starts_with("in(")
                    || words[1].trim_start().starts_with("notin("))
            {
                let rest = words[1].trim_start();
                let (neg, rest) = if let Some(r) = rest.strip_prefix("notin") {
                    (true, r)
                } else {
                    (false, &rest[2..])
                };
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad(field, s, "a set must be written (a,b)"))?;
                let vals: Vec<String> = inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                let key = words[0].to_string();
                reqs.push(if neg {
                    LabelReq::NotIn(key, vals)
                } else {
                    LabelReq::In(key, vals)
                });
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push(LabelReq::NotEq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = p.split_once("==") {
                reqs.push(LabelReq::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = p.split_once('=') {
                reqs.push(LabelReq::Eq(k.trim().into(), v.trim().into()));
            } else if let Some(k) = p.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(k.trim().into()));
            } else {
                if p.contains(char::is_whitespace) {
                    return Err(bad(field, s, format!("cannot parse requirement {p:?}")));
                }
                reqs.push(LabelReq::Exists(p.into()));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether `labels` (`source:key=value`) satisfy every requirement.
    pub fn matches(&self, labels: &[String]) -> bool {
        let values = |key: &str| -> Vec<&str> {
            labels
                .iter()
                .filter_map(|l| {
                    let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                    let hit = if key.contains(':') {
                        k == key
                    } else {
                        k.split_once(':').map(|(_, k)| k).unwrap_or(k) == key
                    };
                    hit.then_some(v)
                })
                .collect()
        };
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => values(k).contains(&v.as_str()),
            LabelReq::NotEq(k, v) => !values(k).contains(&v.as_str()),
            LabelReq::In(k, vs) => values(k).iter().any(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !values(k).iter().any(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => !values(k).is_empty(),
            LabelReq::NotExists(k) => values(k).is_empty(),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_selector(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `namespace/pod-prefix`; without a namespace, upstream reads "pod" as
/// "default/pod". An empty pod part matches the whole namespace.
#[derive(Debug, Clone)]
struct PodFilter {
    namespace: String,
    prefix: String,
}

impl PodFilter {
    fn parse(s: &str) -> PodFilter {
        match s.split_once('/') {
            Some((ns, p)) => PodFilter {
                namespace: ns.into(),
                prefix: p.into(),
            },
            None => PodFilter {
                namespace: "default".into(),
                prefix: s.into(),
            },
        }
    }
    fn matches(&self, e: &Endpoint) -> bool {
        e.namespace == self.namespace
            && (self.prefix.is_empty() || e.pod_name.starts_with(&self.prefix))
    }
}

#[derive(Debug, Clone)]
enum IpMatch {
    Addr(IpAddr),
    Net(IpNet),
}

impl IpMatch {
    fn parse(field: &'static str, s: &str) -> Result<IpMatch, FilterError> {
        if s.contains('/') {
            s.parse::<IpNet>()
                .map(IpMatch::Net)
                .map_err(|e| bad(field, s, e.to_string()))
        } else {
            s.parse::<IpAddr>()
                .map(IpMatch::Addr)
                .map_err(|e| bad(field, s, e.to_string()))
        }
    }
    fn matches(&self, ip: &str) -> bool {
        let Ok(a) = ip.parse::<IpAddr>() else {
            return false;
        };
        match self {
            IpMatch::Addr(x) => *x == a,
            IpMatch::Net(n) => n.contains(&a),
        }
    }
}

/// `ns/name` of a service, either part may be a prefix-free exact string.
#[derive(Debug, Clone)]
struct NamePattern {
    namespace: Option<String>,
    name: String,
}

impl NamePattern {
    fn parse(s: &str) -> NamePattern {
        match s.split_once('/') {
            Some((ns, n)) => NamePattern {
                namespace: Some(ns.into()),
                name: n.into(),
            },
            None => NamePattern {
                namespace: None,
                name: s.into(),
            },
        }
    }
    fn matches(&self, namespace: &str, name: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && (self.name.is_empty() || self.name == name)
    }
}

/// HTTP status filter: "200" exactly, "5+" any 5xx.
#[derive(Debug, Clone)]
enum StatusMatch {
    Exact(u32),
    Class(u32),
}

/// A compiled [`FlowFilter`].
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    uuid: Vec<String>,
    src_ip: Vec<IpMatch>,
    dst_ip: Vec<IpMatch>,
    src_pod: Vec<PodFilter>,
    dst_pod: Vec<PodFilter>,
    src_label: Vec<LabelSelector>,
    dst_label: Vec<LabelSelector>,
    src_service: Vec<NamePattern>,
    dst_service: Vec<NamePattern>,
    src_fqdn: Vec<Regex>,
    dst_fqdn: Vec<Regex>,
    src_workload: Vec<(String, String)>,
    dst_workload: Vec<(String, String)>,
    direction: Vec<i32>,
    verdict: Vec<i32>,
    drop_reason: Vec<i32>,
    event_type: Vec<(i32, Option<i32>)>,
    protocol: Vec<String>,
    src_port: Vec<u32>,
    dst_port: Vec<u32>,
    reply: Vec<bool>,
    src_identity: Vec<u32>,
    dst_identity: Vec<u32>,
    http_status: Vec<StatusMatch>,
    http_method: Vec<String>,
    http_path: Vec<Regex>,
    http_url: Vec<Regex>,
    dns_query: Vec<Regex>,
    tcp_flags: Vec<crate::proto::flow::TcpFlags>,
    node_name: Vec<Regex>,
    ip_version: Vec<i32>,
    interface: Vec<(u32, String)>,
}

fn port(field: &'static str, s: &str) -> Result<u32, FilterError> {
    s.parse::<u16>()
        .map(u32::from)
        .map_err(|_| bad(field, s, "want a port number 0-65535"))
}

fn regex(field: &'static str, s: &str) -> Result<Regex, FilterError> {
    Regex::new(&format!("^(?:{s})$")).map_err(|e| bad(field, s, e.to_string()))
}

/// A glob ("*" is any run of characters but "/") as an anchored regex.
fn glob(field: &'static str, s: &str) -> Result<Regex, FilterError> {
    let mut r = String::from("^");
    for c in s.chars() {
        match c {
            '*' => r.push_str("[^/]*"),
            c => r.push_str(&regex::escape(&c.to_string())),
        }
    }
    r.push('$');
    Regex::new(&r).map_err(|e| bad(field, s, e.to_string()))
}

impl Compiled {
    pub fn new(f: &FlowFilter) -> Result<Compiled, FilterError> {
        let ips = |field, v: &[String]| {
            v.iter()
                .map(|s| IpMatch::parse(field, s))
                .collect::<Result<Vec<_>, _>>()
        };
        let labels = |field, v: &[String]| {
            v.iter()
                .map(|s| LabelSelector::parse(field, s))
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = |field, v: &[String]| {
            v.iter()
                .map(|s| port(field, s))
                .collect::<Result<Vec<_>, _>>()
        };
        let regexes = |field, v: &[String]| {
            v.iter()
                .map(|s| regex(field, s))
                .collect::<Result<Vec<_>, _>>()
        };
        let fqdn = |field, v: &[String]| {
            v.iter()
                .map(|s| glob(field, s))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut protocol = Vec::new();
        for p in &f.protocol {
            let p = p.to_ascii_lowercase();
            match p.as_str() {
                "tcp" | "udp" | "icmp" | "icmpv4" | "icmpv6" | "sctp" | "http" | "dns"
                | "kafka" => protocol.push(if p == "icmp" { "icmpv4".into() } else { p }),
                _ => {
                    return Err(bad(
                        "protocol",
                        &p,
                        "want tcp, udp, sctp, icmp, icmpv4, icmpv6, http, dns or kafka",
                    ));
                }
            }
        }
        let mut http_status = Vec::new();
        for s in &f.http_status_code {
            let m = if let Some(c) = s.strip_suffix('+') {
                match c.parse::<u32>() {
                    Ok(c @ 1..=5) => StatusMatch::Class(c),
                    _ => {
                        return Err(bad(
                            "http_status_code",
                            s,
                            "want a code like 200 or a class like 5+",
                        ));
                    }
                }
            } else {
                match s.parse::<u32>() {
                    Ok(c @ 100..=599) => StatusMatch::Exact(c),
                    _ => {
                        return Err(bad(
                            "http_status_code",
                            s,
                            "want a code like 200 or a class like 5+",
                        ));
                    }
                }
            };
            http_status.push(m);
        }
        for m in &f.http_method {
            if m.is_empty() || !m.chars().all(|c| c.is_ascii_alphabetic()) {
                return Err(bad("http_method", m, "want a method like GET"));
            }
        }
        if f.experimental
            .as_ref()
            .is_some_and(|e| !e.cel_expression.is_empty())
        {
            return Err(bad(
                "experimental.cel_expression",
                &f.experimental
                    .as_ref()
                    .map(|e| e.cel_expression.join(" "))
                    .unwrap_or_default(),
                "CEL expressions are not supported",
            ));
        }
        for (field, set) in [
            ("source_ip_xlated", f.source_ip_xlated.len()),
            ("trace_id", f.trace_id.len()),
            ("ip_trace_id", f.ip_trace_id.len()),
            ("source_cluster_name", f.source_cluster_name.len()),
            ("destination_cluster_name", f.destination_cluster_name.len()),
            ("node_labels", f.node_labels.len()),
            ("http_header", f.http_header.len()),
            ("encrypted", f.encrypted.len()),
        ] {
            if set > 0 {
                return Err(bad(field, "(set)", "not supported by this server"));
            }
        }
        Ok(Compiled {
            uuid: f.uuid.clone(),
            src_ip: ips("source_ip", &f.source_ip)?,
            dst_ip: ips("destination_ip", &f.destination_ip)?,
            src_pod: f.source_pod.iter().map(|s| PodFilter::parse(s)).collect(),
            dst_pod: f
                .destination_pod
                .iter()
                .map(|s| PodFilter::parse(s))
                .collect(),
            src_label: labels("source_label", &f.source_label)?,
            dst_label: labels("destination_label", &f.destination_label)?,
            src_service: f
                .source_service
                .iter()
                .map(|s| NamePattern::parse(s))
                .collect(),
            dst_service: f
                .destination_service
                .iter()
                .map(|s| NamePattern::parse(s))
                .collect(),
            src_fqdn: fqdn("source_fqdn", &f.source_fqdn)?,
            dst_fqdn: fqdn("destination_fqdn", &f.destination_fqdn)?,
            src_workload: f
                .source_workload
                .iter()
                .map(|w| (w.kind.clone(), w.name.clone()))
                .collect(),
            dst_workload: f
                .destination_workload
                .iter()
                .map(|w| (w.kind.clone(), w.name.clone()))
                .collect(),
            direction: f.traffic_direction.clone(),
            verdict: f.verdict.clone(),
            drop_reason: f.drop_reason_desc.clone(),
            event_type: f
                .event_type
                .iter()
                .map(|e| (e.r#type, e.match_sub_type.then_some(e.sub_type)))
                .collect(),
            protocol,
            src_port: ports("source_port", &f.source_port)?,
            dst_port: ports("destination_port", &f.destination_port)?,
            reply: f.reply.clone(),
            src_identity: f.source_identity.clone(),
            dst_identity: f.destination_identity.clone(),
            http_status,
            http_method: f
                .http_method
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            http_path: regexes("http_path", &f.http_path)?,
            http_url: regexes("http_url", &f.http_url)?,
            dns_query: regexes("dns_query", &f.dns_query)?,
            tcp_flags: f.tcp_flags.clone(),
            node_name: f
                .node_name
                .iter()
                .map(|n| {
                    glob(
                        "node_name",
                        if n.contains('/') {
                            n.rsplit('/').next().unwrap_or(n)
                        } else {
                            n
                        },
                    )
                })
                .collect::<Result<_, _>>()?,
            ip_version: f.ip_version.clone(),
            interface: f
                .interface
                .iter()
                .map(|i| (i.index, i.name.clone()))
                .collect(),
        })
    }

    /// Whether the flow satisfies every set field.
    pub fn matches(&self, f: &Flow) -> bool {
        let src = f.source.as_ref();
        let dst = f.destination.as_ref();
        let ip = f.ip.as_ref();
        let l4 = f.l4.as_ref().and_then(|l| l.protocol.as_ref());
        let (sport, dport) = match l4 {
            Some(layer4::Protocol::Tcp(t)) => (Some(t.source_port), Some(t.destination_port)),
            Some(layer4::Protocol::Udp(u)) => (Some(u.source_port), Some(u.destination_port)),
            Some(layer4::Protocol::Sctp(s)) => (Some(s.source_port), Some(s.destination_port)),
            _ => (None, None),
        };
        let http = f.l7.as_ref().and_then(|l| match &l.record {
            Some(crate::proto::flow::layer7::Record::Http(h)) => Some(h),
            _ => None,
        });
        let dns = f.l7.as_ref().and_then(|l| match &l.record {
            Some(crate::proto::flow::layer7::Record::Dns(d)) => Some(d),
            _ => None,
        });
        fn any<T>(v: &[T], pred: impl Fn(&T) -> bool) -> bool {
            v.is_empty() || v.iter().any(pred)
        }
        any(&self.uuid, |u| *u == f.uuid)
            && any(&self.src_ip, |m| ip.is_some_and(|i| m.matches(&i.source)))
            && any(&self.dst_ip, |m| {
                ip.is_some_and(|i| m.matches(&i.destination))
            })
            && any(&self.src_pod, |m| src.is_some_and(|e| m.matches(e)))
            && any(&self.dst_pod, |m| dst.is_some_and(|e| m.matches(e)))
            && any(&self.src_label, |m| {
                src.is_some_and(|e| m.matches(&e.labels))
            })
            && any(&self.dst_label, |m| {
                dst.is_some_and(|e| m.matches(&e.labels))
            })
            && any(&self.src_service, |m| {
                f.source_service
                    .as_ref()
                    .is_some_and(|s| m.matches(&s.namespace, &s.name))
            })
            && any(&self.dst_service, |m| {
                f.destination_service
                    .as_ref()
                    .is_some_and(|s| m.matches(&s.namespace, &s.name))
            })
            && any(&self.src_fqdn, |m| {
                f.source_names
                    .iter()
                    .any(|n| m.is_match(n.trim_end_matches('.')))
            })
            && any(&self.dst_fqdn, |m| {
                f.destination_names
                    .iter()
                    .any(|n| m.is_match(n.trim_end_matches('.')))
            })
            && any(&self.src_workload, |(k, n)| {
                src.is_some_and(|e| {
                    e.workloads
                        .iter()
                        .any(|w| (k.is_empty() || *k == w.kind) && (n.is_empty() || *n == w.name))
                })
            })
            && any(&self.dst_workload, |(k, n)| {
                dst.is_some_and(|e| {
                    e.workloads
                        .iter()
                        .any(|w| (k.is_empty() || *k == w.kind) && (n.is_empty() || *n == w.name))
                })
            })
            && any(&self.direction, |d| *d == f.traffic_direction)
            && any(&self.verdict, |v| *v == f.verdict)
            && any(&self.drop_reason, |d| *d == f.drop_reason_desc)
            && any(&self.event_type, |(t, st)| {
                f.event_type
                    .as_ref()
                    .is_some_and(|e| e.r#type == *t && st.is_none_or(|s| s == e.sub_type))
            })
            && any(&self.protocol, |p| match p.as_str() {
                "tcp" => matches!(l4, Some(layer4::Protocol::Tcp(_))),
                "udp" => matches!(l4, Some(layer4::Protocol::Udp(_))),
                "sctp" => matches!(l4, Some(layer4::Protocol::Sctp(_))),
                "icmpv4" => matches!(l4, Some(layer4::Protocol::IcmPv4(_))),
                "icmpv6" => matches!(l4, Some(layer4::Protocol::IcmPv6(_))),
                "http" => http.is_some(),
                "dns" => dns.is_some(),
                "kafka" => matches!(
                    f.l7.as_ref().and_then(|l| l.record.as_ref()),
                    Some(crate::proto::flow::layer7::Record::Kafka(_))
                ),
                _ => false,
            })
            && any(&self.src_port, |p| sport == Some(*p))
            && any(&self.dst_port, |p| dport == Some(*p))
            && any(&self.reply, |r| {
                f.is_reply.as_ref().is_some_and(|v| v.value == *r)
            })
            && any(&self.src_identity, |i| {
                src.is_some_and(|e| e.identity == *i)
            })
            && any(&self.dst_identity, |i| {
                dst.is_some_and(|e| e.identity == *i)
            })
            && any(&self.http_status, |m| {
                http.is_some_and(|h| match m {
                    StatusMatch::Exact(c) => h.code == *c,
                    StatusMatch::Class(c) => h.code / 100 == *c,
                })
            })
            && any(&self.http_method, |m| {
                http.is_some_and(|h| h.method.eq_ignore_ascii_case(m))
            })
            && any(&self.http_path, |r| {
                http.is_some_and(|h| r.is_match(url_path(&h.url)))
            })
            && any(&self.http_url, |r| http.is_some_and(|h| r.is_match(&h.url)))
            && any(&self.dns_query, |r| {
                dns.is_some_and(|d| r.is_match(d.query.trim_end_matches('.')))
            })
            && any(&self.tcp_flags, |want| match l4 {
                Some(layer4::Protocol::Tcp(t)) => {
                    t.flags.as_ref().is_some_and(|got| flags_subset(want, got))
                }
                _ => false,
            })
            && any(&self.node_name, |r| r.is_match(&f.node_name))
            && any(&self.ip_version, |v| ip.is_some_and(|i| i.ip_version == *v))
            && any(&self.interface, |(idx, name)| {
                f.interface.as_ref().is_some_and(|i| {
                    (*idx == 0 || i.index == *idx) && (name.is_empty() || i.name == *name)
                })
            })
    }
}

fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = if url.contains("://") {
        rest.find('/').map(|i| &rest[i..]).unwrap_or("/")
    } else {
        rest
    };
    path.split(['?', '#']).next().unwrap_or(path)
}

fn flags_subset(want: &crate::proto::flow::TcpFlags, got: &crate::proto::flow::TcpFlags) -> bool {
    let w = [
        want.fin, want.syn, want.rst, want.psh, want.ack, want.urg, want.ece, want.cwr, want.ns,
    ];
    let g = [
        got.fin, got.syn, got.rst, got.psh, got.ack, got.urg, got.ece, got.cwr, got.ns,
    ];
    w.iter().zip(g.iter()).all(|(w, g)| !*w || *g)
}

/// A request's whitelist and blacklist.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl Filters {
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Filters, FilterError> {
        Ok(Filters {
            whitelist: whitelist
                .iter()
                .map(Compiled::new)
                .collect::<Result<_, _>>()?,
            blacklist: blacklist
                .iter()
                .map(Compiled::new)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, f: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|c| c.matches(f)))
            && !self.blacklist.iter().any(|c| c.matches(f))
    }
}

#[cfg(test)]
mod tests;
