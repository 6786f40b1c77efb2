//! `hubble observe`'s filter flags, parsed in order like upstream: flags for
//! one side (`--from-pod`, `--to-label`, …) go into every filter; flags for
//! either side (`--pod`, `--ip`, `--namespace`, …) split the request into a
//! source filter OR a destination filter; `--not` sends the next filter
//! flag to the blacklist.

use std::time::Duration;

use crate::proto::flow::{
    DropReason, EventTypeFilter, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict,
};
use crate::proto::observer::GetFlowsRequest;

/// Everything `observe` was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ObserveArgs {
    pub request: GetFlowsRequest,
    pub output: crate::printer::Format,
    pub print_node_name: bool,
    pub numeric: bool,
    pub server: Option<String>,
    pub print_raw_filters: bool,
    pub timeout: Duration,
}

/// A flag that cannot be used as given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid argument {value:?} for \"{flag}\": {reason}")]
pub struct ArgError {
    pub flag: String,
    pub value: String,
    pub reason: String,
}

fn err(flag: &str, value: &str, reason: impl Into<String>) -> ArgError {
    ArgError {
        flag: flag.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// One side's filters: what goes on the left (source) and right (destination).
#[derive(Debug, Default, Clone)]
struct Side {
    left: FlowFilter,
    right: Option<FlowFilter>,
    /// --pod/--namespace given: namespaces are applied when building.
    src_pods: Vec<String>,
    dst_pods: Vec<String>,
    both_pods: Vec<String>,
    any: bool,
}

impl Side {
    fn all(&mut self, f: impl Fn(&mut FlowFilter)) {
        f(&mut self.left);
        if let Some(r) = &mut self.right {
            f(r);
        }
        self.any = true;
    }
    fn split(&mut self, src: impl Fn(&mut FlowFilter), dst: impl Fn(&mut FlowFilter)) {
        if self.right.is_none() {
            self.right = Some(self.left.clone());
        }
        src(&mut self.left);
        if let Some(r) = &mut self.right {
            dst(r);
        }
        self.any = true;
    }
}

/// Parses a duration like "1m", "30s", "1h30m", "500ms" or an RFC 3339 time
/// into an absolute timestamp (a duration counts back from `now`).
pub fn parse_time(
    flag: &str,
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<pbjson_types::Timestamp, ArgError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(pbjson_types::Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        });
    }
    let d = parse_duration(s).ok_or_else(|| {
        err(
            flag,
            s,
            "want a duration like 1m, 30s, 1h30m or an RFC 3339 time",
        )
    })?;
    let t = now - chrono::Duration::from_std(d).map_err(|e| err(flag, s, e.to_string()))?;
    Ok(pbjson_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

/// Go-style durations: a sequence of number+unit (h, m, s, ms, us, ns).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += Duration::from_secs_f64(n * mult);
        rest = &rest[unit_end..];
    }
    Some(total)
}

fn event_type(v: &str) -> Result<EventTypeFilter, ArgError> {
    let (ty, sub) = v
        .split_once(':')
        .map(|(a, b)| (a, Some(b)))
        .unwrap_or((v, None));
    let t = match ty {
        "drop" => 1,
        "debug" => 2,
        "capture" => 3,
        "trace" => 4,
        "policy-verdict" => 5,
        "l7" => 129,
        "agent" => 130,
        "sock" => 131,
        _ => {
            return Err(err(
                "type",
                v,
                "want one of trace, drop, l7, policy-verdict, capture, debug, agent, sock (with an optional :subtype, e.g. trace:to-endpoint); for DNS or HTTP flows use --protocol dns|http",
            ));
        }
    };
    let sub_type = match (t, sub) {
        (_, None) => None,
        (4, Some(s)) => {
            let p = crate::parser::observation_point(s);
            if p == crate::proto::flow::TraceObservationPoint::UnknownPoint {
                return Err(err("type", v, "unknown trace observation point"));
            }
            Some(crate::parser::trace_sub_type(p))
        }
        (1, Some(s)) => Some(
            s.parse::<i32>()
                .map_err(|_| err("type", v, "a drop subtype is a reason code"))?,
        ),
        (_, Some(_)) => return Err(err("type", v, "this type has no subtypes here")),
    };
    Ok(EventTypeFilter {
        r#type: t,
        match_sub_type: sub_type.is_some(),
        sub_type: sub_type.unwrap_or(0),
    })
}

fn verdict(v: &str) -> Result<i32, ArgError> {
    Verdict::from_str_name(&v.to_ascii_uppercase())
        .map(|v| v as i32)
        .ok_or_else(|| {
            err(
                "verdict",
                v,
                "want FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED or TRANSLATED",
            )
        })
}

fn tcp_flags(v: &str) -> Result<TcpFlags, ArgError> {
    let mut f = TcpFlags::default();
    for p in v.split(',') {
        match p.trim().to_ascii_uppercase().as_str() {
            "SYN" => f.syn = true,
            "ACK" => f.ack = true,
            "FIN" => f.fin = true,
            "RST" => f.rst = true,
            "PSH" => f.psh = true,
            "URG" => f.urg = true,
            "ECE" => f.ece = true,
            "CWR" => f.cwr = true,
            "NS" => f.ns = true,
            other => {
                return Err(err(
                    "tcp-flags",
                    other,
                    "want SYN, ACK, FIN, RST, PSH, URG, ECE, CWR or NS",
                ));
            }
        }
    }
    Ok(f)
}

fn port(flag: &str, v: &str) -> Result<String, ArgError> {
    v.parse::<u16>()
        .map(|p| p.to_string())
        .map_err(|_| err(flag, v, "want a port 0-65535"))
}

fn identity(flag: &str, v: &str) -> Result<u32, ArgError> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    cilium_abi::ReservedIdentity::ALL
        .iter()
        .find(|r| r.label() == v)
        .map(|r| *r as u32)
        .ok_or_else(|| {
            err(
                flag,
                v,
                "want an identity number or a reserved name (world, host, …)",
            )
        })
}

/// Flags that take a value (long names; short ones are mapped first).
const VALUE_FLAGS: &[&str] = &[
    "since",
    "until",
    "last",
    "first",
    "namespace",
    "from-namespace",
    "to-namespace",
    "pod",
    "from-pod",
    "to-pod",
    "label",
    "from-label",
    "to-label",
    "ip",
    "from-ip",
    "to-ip",
    "identity",
    "from-identity",
    "to-identity",
    "port",
    "from-port",
    "to-port",
    "protocol",
    "type",
    "verdict",
    "drop-reason-desc",
    "http-status",
    "http-method",
    "http-path",
    "http-url",
    "fqdn",
    "from-fqdn",
    "to-fqdn",
    "service",
    "from-service",
    "to-service",
    "output",
    "server",
    "node-name",
    "traffic-direction",
    "tcp-flags",
    "ip-version",
    "uuid",
    "timeout",
    "workload",
    "from-workload",
    "to-workload",
    "dns-query",
];

/// Parses `observe`'s arguments (everything after `observe`).
pub fn parse(args: &[String], now: chrono::DateTime<chrono::Utc>) -> Result<ObserveArgs, ArgError> {
    let mut req = GetFlowsRequest::default();
    let mut white = Side::default();
    let mut black = Side::default();
    let mut namespaces: Vec<String> = Vec::new();
    let mut all_namespaces = false;
    let (mut last, mut first, mut all) = (None::<u64>, None::<u64>, false);
    let mut out = ObserveArgs {
        request: GetFlowsRequest::default(),
        output: crate::printer::Format::Compact,
        print_node_name: false,
        numeric: false,
        server: None,
        print_raw_filters: false,
        timeout: Duration::from_secs(5),
    };
    let mut negate = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (name, inline) = if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            }
        } else if let Some(short) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let split = short.chars().next().map(char::len_utf8).unwrap_or(1);
            let (s, rest) = short.split_at(split);
            let long = match s {
                "f" => "follow",
                "n" => "namespace",
                "A" => "all-namespaces",
                "l" => "label",
                "t" => "type",
                "o" => "output",
                "P" => "print-raw-filters",
                _ => return Err(err(a, "", "unknown shorthand flag")),
            };
            (
                long.to_string(),
                if rest.is_empty() {
                    None
                } else {
                    Some(rest.trim_start_matches('=').to_string())
                },
            )
        } else {
            return Err(err(
                "observe",
                a,
                "unexpected argument; filters are flags, e.g. --pod NAME",
            ));
        };
        let value = if VALUE_FLAGS.contains(&name.as_str()) {
            match inline {
                Some(v) => v,
                None => {
                    let v = args
                        .get(i)
                        .cloned()
                        .ok_or_else(|| err(&name, "", "needs a value"))?;
                    i += 1;
                    v
                }
            }
        } else {
            if let Some(v) = inline {
                return Err(err(&name, &v, "takes no value"));
            }
            String::new()
        };
        let v = value.as_str();
        let side = if negate { &mut black } else { &mut white };
        let mut filter_flag = true;
        match name.as_str() {
            "not" => {
                negate = true;
                continue;
            }
            "follow" => {
                req.follow = true;
                filter_flag = false;
            }
            "since" => {
                req.since = Some(parse_time("since", v, now)?);
                filter_flag = false;
            }
            "until" => {
                req.until = Some(parse_time("until", v, now)?);
                filter_flag = false;
            }
            "last" => {
                last = Some(v.parse().map_err(|_| err("last", v, "want a number"))?);
                filter_flag = false;
            }
            "first" => {
                first = Some(v.parse().map_err(|_| err("first", v, "want a number"))?);
                filter_flag = false;
            }
            "all" => {
                all = true;
                filter_flag = false;
            }
            "output" => {
                out.output = match v {
                    "compact" => crate::printer::Format::Compact,
                    "dict" => crate::printer::Format::Dict,
                    "json" => crate::printer::Format::Json,
                    "jsonpb" => crate::printer::Format::Jsonpb,
                    "table" => crate::printer::Format::Table,
                    _ => {
                        return Err(err(
                            "output",
                            v,
                            "want compact, dict, json, jsonpb or table",
                        ));
                    }
                };
                filter_flag = false;
            }
            "print-node-name" => {
                out.print_node_name = true;
                filter_flag = false;
            }
            "numeric" => {
                out.numeric = true;
                filter_flag = false;
            }
            "server" => {
                out.server = Some(v.to_string());
                filter_flag = false;
            }
            "timeout" => {
                out.timeout = parse_duration(v)
                    .ok_or_else(|| err("timeout", v, "want a duration like 5s"))?;
                filter_flag = false;
            }
            "print-raw-filters" => {
                out.print_raw_filters = true;
                filter_flag = false;
            }
            "all-namespaces" => {
                all_namespaces = true;
                filter_flag = false;
            }
            "namespace" => {
                namespaces.push(v.to_string());
                filter_flag = false;
            }
            "from-namespace" => side.src_pods.push(format!("{v}/")),
            "to-namespace" => side.dst_pods.push(format!("{v}/")),
            "pod" => side.both_pods.push(v.to_string()),
            "from-pod" => side.src_pods.push(v.to_string()),
            "to-pod" => side.dst_pods.push(v.to_string()),
            "label" => side.split(
                |f| f.source_label.push(v.to_string()),
                |f| f.destination_label.push(v.to_string()),
            ),
            "from-label" => side.all(|f| f.source_label.push(v.to_string())),
            "to-label" => side.all(|f| f.destination_label.push(v.to_string())),
            "ip" => side.split(
                |f| f.source_ip.push(v.to_string()),
                |f| f.destination_ip.push(v.to_string()),
            ),
            "from-ip" => side.all(|f| f.source_ip.push(v.to_string())),
            "to-ip" => side.all(|f| f.destination_ip.push(v.to_string())),
            "identity" => {
                let n = identity("identity", v)?;
                side.split(
                    |f| f.source_identity.push(n),
                    |f| f.destination_identity.push(n),
                )
            }
            "from-identity" => {
                let n = identity("from-identity", v)?;
                side.all(|f| f.source_identity.push(n))
            }
            "to-identity" => {
                let n = identity("to-identity", v)?;
                side.all(|f| f.destination_identity.push(n))
            }
            "port" => {
                let p = port("port", v)?;
                side.split(
                    |f| f.source_port.push(p.clone()),
                    |f| f.destination_port.push(p.clone()),
                )
            }
            "from-port" => {
                let p = port("from-port", v)?;
                side.all(|f| f.source_port.push(p.clone()))
            }
            "to-port" => {
                let p = port("to-port", v)?;
                side.all(|f| f.destination_port.push(p.clone()))
            }
            "fqdn" => side.split(
                |f| f.source_fqdn.push(v.to_string()),
                |f| f.destination_fqdn.push(v.to_string()),
            ),
            "from-fqdn" => side.all(|f| f.source_fqdn.push(v.to_string())),
            "to-fqdn" => side.all(|f| f.destination_fqdn.push(v.to_string())),
            "service" => side.split(
                |f| f.source_service.push(v.to_string()),
                |f| f.destination_service.push(v.to_string()),
            ),
            "from-service" => side.all(|f| f.source_service.push(v.to_string())),
            "to-service" => side.all(|f| f.destination_service.push(v.to_string())),
            "workload" | "from-workload" | "to-workload" => {
                let (kind, wname) = v
                    .split_once('/')
                    .map(|(k, n)| (k.to_string(), n.to_string()))
                    .unwrap_or((String::new(), v.to_string()));
                let w = crate::proto::flow::Workload { name: wname, kind };
                match name.as_str() {
                    "workload" => side.split(
                        |f| f.source_workload.push(w.clone()),
                        |f| f.destination_workload.push(w.clone()),
                    ),
                    "from-workload" => side.all(|f| f.source_workload.push(w.clone())),
                    _ => side.all(|f| f.destination_workload.push(w.clone())),
                }
            }
            "protocol" => {
                let p = v.to_ascii_lowercase();
                if ![
                    "tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "http", "dns", "kafka",
                ]
                .contains(&p.as_str())
                {
                    return Err(err(
                        "protocol",
                        v,
                        "want tcp, udp, sctp, icmp, icmpv4, icmpv6, http, dns or kafka",
                    ));
                }
                side.all(|f| f.protocol.push(p.clone()))
            }
            "type" => {
                let t = event_type(v)?;
                side.all(|f| f.event_type.push(t))
            }
            "verdict" => {
                let n = verdict(v)?;
                side.all(|f| f.verdict.push(n))
            }
            "drop-reason-desc" => {
                let d = DropReason::from_str_name(&v.to_ascii_uppercase()).ok_or_else(|| {
                    err(
                        "drop-reason-desc",
                        v,
                        "want a drop reason name such as POLICY_DENIED",
                    )
                })? as i32;
                side.all(|f| f.drop_reason_desc.push(d))
            }
            "traffic-direction" => {
                let d = match v.to_ascii_lowercase().as_str() {
                    "ingress" => TrafficDirection::Ingress,
                    "egress" => TrafficDirection::Egress,
                    _ => return Err(err("traffic-direction", v, "want ingress or egress")),
                } as i32;
                side.all(|f| f.traffic_direction.push(d))
            }
            "tcp-flags" => {
                let t = tcp_flags(v)?;
                side.all(|f| f.tcp_flags.push(t))
            }
            "ip-version" => {
                let n = match v {
                    "4" | "v4" | "ipv4" => IpVersion::IPv4,
                    "6" | "v6" | "ipv6" => IpVersion::IPv6,
                    _ => return Err(err("ip-version", v, "want v4 or v6")),
                } as i32;
                side.all(|f| f.ip_version.push(n))
            }
            "http-status" => {
                let ok = v
                    .strip_suffix('+')
                    .map(|c| matches!(c.parse::<u32>(), Ok(1..=5)))
                    .unwrap_or_else(|| matches!(v.parse::<u32>(), Ok(100..=599)));
                if !ok {
                    return Err(err(
                        "http-status",
                        v,
                        "want a code like 200 or a class like 5+",
                    ));
                }
                side.all(|f| f.http_status_code.push(v.to_string()))
            }
            "http-method" => side.all(|f| f.http_method.push(v.to_string())),
            "http-path" => {
                regex::Regex::new(v).map_err(|e| err("http-path", v, e.to_string()))?;
                side.all(|f| f.http_path.push(v.to_string()))
            }
            "http-url" => side.all(|f| f.http_url.push(v.to_string())),
            "dns-query" => side.all(|f| f.dns_query.push(v.to_string())),
            "node-name" => side.all(|f| f.node_name.push(v.to_string())),
            "uuid" => side.all(|f| f.uuid.push(v.to_string())),
            other => return Err(err(other, v, "unknown flag")),
        }
        if filter_flag {
            negate = false;
        }
    }
    if let (Some(_), Some(_)) = (last, first) {
        return Err(err("first", "", "cannot be combined with --last"));
    }
    if all && (last.is_some() || first.is_some()) {
        return Err(err("all", "", "cannot be combined with --last or --first"));
    }
    if all_namespaces {
        namespaces.clear();
    }
    // pods: namespace from -n (or "default"); -n alone selects its namespaces
    let ns_default = namespaces.first().cloned();
    let qualify = |p: &str| {
        if p.contains('/') {
            p.to_string()
        } else {
            format!("{}/{}", ns_default.as_deref().unwrap_or("default"), p)
        }
    };
    for side in [&mut white, &mut black] {
        let src: Vec<String> = side.src_pods.iter().map(|p| qualify(p)).collect();
        let dst: Vec<String> = side.dst_pods.iter().map(|p| qualify(p)).collect();
        if !src.is_empty() {
            side.all(|f| f.source_pod.extend(src.iter().cloned()));
        }
        if !dst.is_empty() {
            side.all(|f| f.destination_pod.extend(dst.iter().cloned()));
        }
        let both: Vec<String> = side.both_pods.iter().map(|p| qualify(p)).collect();
        if !both.is_empty() {
            side.split(
                |f| f.source_pod.extend(both.iter().cloned()),
                |f| f.destination_pod.extend(both.iter().cloned()),
            );
        }
    }
    let pods_named =
        !white.both_pods.is_empty() || !white.src_pods.is_empty() || !white.dst_pods.is_empty();
    if !namespaces.is_empty() && !pods_named {
        let ns: Vec<String> = namespaces.iter().map(|n| format!("{n}/")).collect();
        white.split(
            |f| f.source_pod.extend(ns.iter().cloned()),
            |f| f.destination_pod.extend(ns.iter().cloned()),
        );
    }
    let collect = |s: Side| -> Vec<FlowFilter> {
        if !s.any {
            return Vec::new();
        }
        let mut v = vec![s.left];
        v.extend(s.right);
        v
    };
    req.whitelist = collect(white);
    req.blacklist = collect(black);
    req.number = if all {
        u64::MAX
    } else if let Some(n) = first {
        req.first = true;
        n
    } else if let Some(n) = last {
        n
    } else if req.follow || req.since.is_some() || req.until.is_some() {
        0
    } else {
        20
    };
    out.request = req;
    Ok(out)
}

#[cfg(test)]
mod tests;
