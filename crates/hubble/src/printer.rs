//! Output of `hubble observe`: compact, dict, json/jsonpb and table, in
//! upstream's layouts.

use std::fmt::Write as _;

use crate::parser::{icmp4_name, summary};
use crate::proto::flow::{Endpoint, Flow, TraceObservationPoint, Verdict, layer4};
use crate::proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes};
use crate::proto::relay::NodeState;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Compact,
    Dict,
    Json,
    Jsonpb,
    Table,
}

/// Options that change every line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub node_name: bool,
    /// Numeric identities and IPs instead of names.
    pub numeric: bool,
}

/// `Jan  2 15:04:05.000` in UTC.
pub fn timestamp(f: Option<&pbjson_types::Timestamp>) -> String {
    let Some(t) = f else { return "N/A".into() };
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|d| d.format("%b %e %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "N/A".into())
}

fn reserved_name(e: &Endpoint) -> Option<&str> {
    if e.pod_name.is_empty() {
        for l in &e.labels {
            if let Some(r) = l.strip_prefix("reserved:") {
                if r != "world-ipv4" && r != "world-ipv6" {
                    return Some(r);
                }
            }
        }
    }
    None
}

fn ports(f: &Flow) -> (Option<u32>, Option<u32>) {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => (Some(t.source_port), Some(t.destination_port)),
        Some(layer4::Protocol::Udp(u)) => (Some(u.source_port), Some(u.destination_port)),
        Some(layer4::Protocol::Sctp(s)) => (Some(s.source_port), Some(s.destination_port)),
        _ => (None, None),
    }
}

/// `ns/pod:port (ID:n)`, `ip:port (world)`, …
fn host(e: Option<&Endpoint>, ip: &str, port: Option<u32>, o: Options) -> String {
    let mut s = match e {
        Some(e) if !e.pod_name.is_empty() && !o.numeric => {
            format!("{}/{}", e.namespace, e.pod_name)
        }
        // an IPv6 address with a port is bracketed, as JoinHostPort does
        _ if ip.contains(':') && port.is_some_and(|p| p != 0) => format!("[{ip}]"),
        _ => ip.to_string(),
    };
    if let Some(p) = port.filter(|p| *p != 0) {
        let _ = write!(s, ":{p}");
    }
    if let Some(e) = e {
        match reserved_name(e) {
            Some(r) if !o.numeric => {
                let _ = write!(s, " ({r})");
            }
            _ if e.identity != 0 => {
                let _ = write!(s, " (ID:{})", e.identity);
            }
            _ => {}
        }
    }
    s
}

/// What happened, as the TYPE column: `to-endpoint`, `policy-verdict:L3-L4 INGRESS`, `Policy denied`…
pub fn flow_type(f: &Flow) -> String {
    let et = f.event_type.as_ref().map(|e| e.r#type).unwrap_or(0);
    match et {
        crate::parser::MSG_DROP => crate::proto::flow::DropReason::try_from(f.drop_reason_desc)
            .map(drop_description)
            .unwrap_or_else(|_| format!("drop reason {}", f.drop_reason_desc)),
        crate::parser::MSG_POLICY_VERDICT => {
            let m = match f.policy_match_type {
                1 => "L3-Only",
                2 => "L3-L4",
                3 => "L4-Only",
                4 => "all",
                _ => "none",
            };
            let dir = match f.traffic_direction {
                1 => "INGRESS",
                2 => "EGRESS",
                _ => "UNKNOWN",
            };
            format!("policy-verdict:{m} {dir}")
        }
        crate::parser::MSG_TRACE => observation_point_name(f.trace_observation_point).to_string(),
        _ => match f.l7.as_ref() {
            Some(l) => {
                let proto = match &l.record {
                    Some(crate::proto::flow::layer7::Record::Http(_)) => "http",
                    Some(crate::proto::flow::layer7::Record::Dns(_)) => "dns",
                    Some(crate::proto::flow::layer7::Record::Kafka(_)) => "kafka",
                    None => "l7",
                };
                let kind = match crate::proto::flow::L7FlowType::try_from(l.r#type) {
                    Ok(crate::proto::flow::L7FlowType::Request) => "request",
                    Ok(crate::proto::flow::L7FlowType::Response) => "response",
                    Ok(crate::proto::flow::L7FlowType::Sample) => "sample",
                    _ => "unknown",
                };
                format!("{proto}-{kind}")
            }
            None => "unknown".into(),
        },
    }
}

fn observation_point_name(p: i32) -> &'static str {
    match TraceObservationPoint::try_from(p).unwrap_or(TraceObservationPoint::UnknownPoint) {
        TraceObservationPoint::ToEndpoint => "to-endpoint",
        TraceObservationPoint::ToProxy => "to-proxy",
        TraceObservationPoint::ToHost => "to-host",
        TraceObservationPoint::ToStack => "to-stack",
        TraceObservationPoint::ToOverlay => "to-overlay",
        TraceObservationPoint::FromEndpoint => "from-endpoint",
        TraceObservationPoint::FromProxy => "from-proxy",
        TraceObservationPoint::FromHost => "from-host",
        TraceObservationPoint::FromStack => "from-stack",
        TraceObservationPoint::FromOverlay => "from-overlay",
        TraceObservationPoint::FromNetwork => "from-network",
        TraceObservationPoint::ToNetwork => "to-network",
        TraceObservationPoint::FromCrypto => "from-crypto",
        TraceObservationPoint::ToCrypto => "to-crypto",
        TraceObservationPoint::UnknownPoint => "unknown",
    }
}

/// A drop reason as `cilium monitor` and Hubble describe it (the datapath's
/// own table, in cilium-abi), or its name for codes we never emit.
pub fn drop_description(d: crate::proto::flow::DropReason) -> String {
    u8::try_from(d as i32)
        .ok()
        .and_then(cilium_abi::DropReason::from_code)
        .map(|r| r.description().to_string())
        .unwrap_or_else(|| d.as_str_name().to_string())
}

/// The VERDICT column: policy verdicts say ALLOWED/DENIED like upstream.
pub fn verdict(f: &Flow) -> String {
    let v = Verdict::try_from(f.verdict).unwrap_or(Verdict::Unknown);
    let pv = f
        .event_type
        .as_ref()
        .is_some_and(|e| e.r#type == crate::parser::MSG_POLICY_VERDICT);
    match (pv, v) {
        (true, Verdict::Forwarded) => "ALLOWED".into(),
        (true, Verdict::Dropped) => "DENIED".into(),
        _ => v.as_str_name().to_string(),
    }
}

/// Upstream's L7 summary: "HTTP/1.1 GET http://h/p" for requests,
/// "HTTP/1.1 200 3ms (GET http://h/p)" for responses.
pub fn l7_summary(f: &Flow) -> String {
    let Some(l) = &f.l7 else { return String::new() };
    match &l.record {
        Some(crate::proto::flow::layer7::Record::Http(h)) => {
            if l.r#type == crate::proto::flow::L7FlowType::Response as i32 {
                format!("{} {} {}ms ({} {})", h.protocol, h.code, l.latency_ns / 1_000_000, h.method, h.url)
            } else {
                format!("{} {} {}", h.protocol, h.method, h.url)
            }
        }
        Some(crate::proto::flow::layer7::Record::Dns(d)) => {
            let q = d.qtypes.join(",");
            if l.r#type == crate::proto::flow::L7FlowType::Response as i32 {
                let rcode = match d.rcode {
                    0 => "NoError".to_string(),
                    3 => "NXDomain".to_string(),
                    5 => "Refused".to_string(),
                    c => format!("RCode {c}"),
                };
                format!("DNS Answer {:?} TTL: {} (Proxy {} {}) {rcode}", d.ips.join(","), d.ttl, d.query, q)
            } else {
                format!("DNS Query {} {q}", d.query)
            }
        }
        Some(crate::proto::flow::layer7::Record::Kafka(k)) => {
            if l.r#type == crate::proto::flow::L7FlowType::Response as i32 {
                format!("Kafka response {} correlation id {} topic '{}' return code {}", k.api_key, k.correlation_id, k.topic, k.error_code)
            } else {
                format!("Kafka request {} correlation id {} topic '{}'", k.api_key, k.correlation_id, k.topic)
            }
        }
        _ => String::new(),
    }
}

fn summary_of(f: &Flow) -> String {
    if f.l7.is_some() {
        return l7_summary(f);
    }
    #[allow(deprecated)]
    let s = if f.summary.is_empty() {
        summary(f.l4.as_ref())
    } else {
        f.summary.clone()
    };
    if let Some(layer4::Protocol::IcmPv4(i)) = f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        return format!("ICMPv4 {}", icmp4_name(i.r#type, i.code));
    }
    s
}

/// The two ends, ordered so the client is on the left (a reply is printed
/// `client <- server`).
fn ends(f: &Flow, o: Options) -> (String, &'static str, String) {
    let (sport, dport) = ports(f);
    let ip = f.ip.clone().unwrap_or_default();
    let src = host(f.source.as_ref(), &ip.source, sport, o);
    let dst = host(f.destination.as_ref(), &ip.destination, dport, o);
    match f.is_reply.as_ref().map(|r| r.value) {
        Some(true) => (dst, "<-", src),
        Some(false) => (src, "->", dst),
        None => (src, "<>", dst),
    }
}

/// Whether a response is a status message (node changes, lost events) that
/// the text formats print to stderr, keeping stdout for flows.
pub fn is_status(resp: &GetFlowsResponse) -> bool {
    !matches!(resp.response_types, Some(ResponseTypes::Flow(_)))
}

/// One response in the chosen format ("" for nothing to print).
pub fn format(resp: &GetFlowsResponse, fmt: Format, o: Options) -> String {
    match fmt {
        Format::Json | Format::Jsonpb => {
            return serde_json::to_string(resp).unwrap_or_default() + "\n";
        }
        _ => {}
    }
    match &resp.response_types {
        Some(ResponseTypes::Flow(f)) => format_flow(f, fmt, o),
        Some(ResponseTypes::NodeStatus(n)) => {
            let state = NodeState::try_from(n.state_change)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            format!(
                "{}: {} {}{}\n",
                timestamp(resp.time.as_ref()),
                state,
                n.node_names.join(", "),
                if n.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", n.message)
                }
            )
        }
        Some(ResponseTypes::LostEvents(l)) => format!(
            "EVENTS LOST: {} {}\n",
            crate::proto::flow::LostEventSource::try_from(l.source)
                .map(|s| s.as_str_name())
                .unwrap_or("?"),
            l.num_events_lost
        ),
        None => String::new(),
    }
}

/// The header line of table output.
pub fn table_header(o: Options) -> String {
    format!(
        "{}{:<24}{:<40}{:<40}{:<32}{:<12}{}\n",
        if o.node_name {
            format!("{:<16}", "NODE")
        } else {
            String::new()
        },
        "TIMESTAMP",
        "SOURCE",
        "DESTINATION",
        "TYPE",
        "VERDICT",
        "SUMMARY"
    )
}

fn format_flow(f: &Flow, fmt: Format, o: Options) -> String {
    let (left, arrow, right) = ends(f, o);
    let ts = timestamp(f.time.as_ref());
    let node = if o.node_name {
        format!(" [{}]", f.node_name)
    } else {
        String::new()
    };
    match fmt {
        Format::Compact => format!(
            "{ts}{node}: {left} {arrow} {right} {} {} ({})\n",
            flow_type(f),
            verdict(f),
            summary_of(f)
        ),
        Format::Dict => {
            let mut s = format!("  TIMESTAMP: {ts}\n");
            if o.node_name {
                let _ = writeln!(s, "       NODE: {}", f.node_name);
            }
            let (src, dst) = if arrow == "<-" {
                (right, left)
            } else {
                (left, right)
            };
            let _ = writeln!(
                s,
                "     SOURCE: {src}\nDESTINATION: {dst}\n       TYPE: {}\n    VERDICT: {}\n    SUMMARY: {}\n------------",
                flow_type(f),
                verdict(f),
                summary_of(f)
            );
            s
        }
        _ => {
            let (src, dst) = if arrow == "<-" {
                (right, left)
            } else {
                (left, right)
            };
            format!(
                "{}{:<24}{:<40}{:<40}{:<32}{:<12}{}\n",
                if o.node_name {
                    format!("{:<16}", f.node_name)
                } else {
                    String::new()
                },
                ts,
                src,
                dst,
                flow_type(f),
                verdict(f),
                summary_of(f)
            )
        }
    }
}
