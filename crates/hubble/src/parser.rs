//! Datapath events ([`cilium_flow::MonitorEvent`]) to Hubble flows, with the
//! names of both ends. Pure: the same event and snapshot give the same flow
//! (except for its UUID).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use cilium_abi::ReservedIdentity;
use cilium_flow::{L4, MonitorEvent};

use crate::names::{EndpointName, Names, PolicyName, PolicyQuery, namespace_of};
use crate::proto::flow::{
    self as pb, CiliumEventType, DropReason, Emitter, Endpoint, Flow, FlowType, IpVersion, Layer4,
    NetworkInterface, TraceObservationPoint, TrafficDirection, Verdict, layer4,
};

/// Upstream's monitor message types, as `event_type.type`.
pub const MSG_DROP: i32 = 1;
pub const MSG_TRACE: i32 = 4;
pub const MSG_POLICY_VERDICT: i32 = 5;
/// L7 records (upstream's MessageTypeAccessLog).
pub const MSG_ACCESS_LOG: i32 = 129;

/// Who and when an L7 record is about (the client and the original
/// destination), and its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L7Meta {
    pub time_ns: u64,
    pub client: std::net::SocketAddrV4,
    pub server: std::net::SocketAddrV4,
    pub client_identity: u32,
    pub server_identity: u32,
    /// Redirected by the server's ingress policy (else the client's egress).
    pub ingress: bool,
    /// A response (from the server to the client) rather than a request.
    pub response: bool,
    /// Denied by policy.
    pub denied: bool,
    /// Responses: from the request's arrival.
    pub latency_ns: u64,
}

/// An HTTP request or response the L7 proxy handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRecord {
    pub meta: L7Meta,
    pub method: String,
    pub url: String,
    pub protocol: String,
    pub code: u32,
    pub headers: Vec<(String, String)>,
}

/// Makes flows; holds the UUID sequence.
#[derive(Debug)]
pub struct Parser {
    seed: u64,
    seq: AtomicU64,
}

impl Default for Parser {
    fn default() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Parser {
            seed: (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32),
            seq: AtomicU64::new(0),
        }
    }
}

/// A version-4-shaped UUID from a per-process seed and a sequence number.
fn uuid(a: u64, n: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        (a & 0xfff) as u16,
        (n >> 48) & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

/// The observation point of a trace, from the datapath's point name.
pub fn observation_point(name: &str) -> TraceObservationPoint {
    match name {
        "to-endpoint" => TraceObservationPoint::ToEndpoint,
        "to-proxy" => TraceObservationPoint::ToProxy,
        "to-host" => TraceObservationPoint::ToHost,
        "to-stack" => TraceObservationPoint::ToStack,
        "to-overlay" => TraceObservationPoint::ToOverlay,
        "from-endpoint" => TraceObservationPoint::FromEndpoint,
        "from-proxy" => TraceObservationPoint::FromProxy,
        "from-host" => TraceObservationPoint::FromHost,
        "from-stack" => TraceObservationPoint::FromStack,
        "from-overlay" => TraceObservationPoint::FromOverlay,
        "from-network" => TraceObservationPoint::FromNetwork,
        "to-network" => TraceObservationPoint::ToNetwork,
        _ => TraceObservationPoint::UnknownPoint,
    }
}

/// The datapath's trace point code for an observation point (the
/// `event_type.sub_type` of trace flows).
pub fn trace_sub_type(p: TraceObservationPoint) -> i32 {
    match p {
        TraceObservationPoint::ToEndpoint => 0,
        other => other as i32,
    }
}

fn reserved_labels(identity: u32) -> Option<Vec<String>> {
    let r = ReservedIdentity::from_code(identity)?;
    let mut v = vec![format!("reserved:{}", r.label())];
    // as the agent labels them: both worlds are `world`, with their family
    match r {
        ReservedIdentity::World => v.push("reserved:world-ipv4".into()),
        ReservedIdentity::WorldIpv6 => v.push("reserved:world".into()),
        _ => {}
    }
    v.sort();
    Some(v)
}

fn endpoint(names: &Names, ip: IpAddr, identity: u32) -> Endpoint {
    if let Some(e) = names.endpoints.get(&ip) {
        return to_pb(e, identity);
    }
    let labels = names
        .identities
        .get(&identity)
        .cloned()
        .or_else(|| reserved_labels(identity))
        .unwrap_or_default();
    Endpoint {
        identity,
        namespace: namespace_of(&labels).unwrap_or("").to_string(),
        labels,
        ..Default::default()
    }
}

fn to_pb(e: &EndpointName, identity: u32) -> Endpoint {
    Endpoint {
        id: e.id,
        identity: if e.identity != 0 {
            e.identity
        } else {
            identity
        },
        cluster_name: String::new(),
        namespace: e.namespace.clone(),
        labels: e.labels.clone(),
        pod_name: e.pod_name.clone(),
        workloads: e
            .workloads
            .iter()
            .map(|w| pb::Workload {
                name: w.name.clone(),
                kind: w.kind.clone(),
            })
            .collect(),
    }
}

fn timestamp(ns: u64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

/// "TCP Flags: SYN, ACK", "ICMPv4 EchoRequest", "UDP".
pub fn summary(l4: Option<&Layer4>) -> String {
    match l4.and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => {
            format!("TCP Flags: {}", tcp_flags_string(t.flags.as_ref()))
        }
        Some(layer4::Protocol::Udp(_)) => "UDP".into(),
        Some(layer4::Protocol::IcmPv4(i)) => format!("ICMPv4 {}", icmp4_name(i.r#type, i.code)),
        Some(layer4::Protocol::IcmPv6(i)) => format!("ICMPv6 type {} code {}", i.r#type, i.code),
        Some(layer4::Protocol::Sctp(_)) => "SCTP".into(),
        None => String::new(),
    }
}

/// Upstream's order and spelling of TCP flags.
pub fn tcp_flags_string(f: Option<&pb::TcpFlags>) -> String {
    let Some(f) = f else { return String::new() };
    let mut v = Vec::new();
    for (on, n) in [
        (f.syn, "SYN"),
        (f.ack, "ACK"),
        (f.fin, "FIN"),
        (f.rst, "RST"),
        (f.psh, "PSH"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
        (f.ns, "NS"),
    ] {
        if on {
            v.push(n);
        }
    }
    v.join(", ")
}

/// ICMPv4 type names as Hubble prints them.
pub fn icmp4_name(t: u32, code: u32) -> String {
    match t {
        0 => "EchoReply".into(),
        3 => match code {
            0 => "DestinationUnreachable(Net)".into(),
            1 => "DestinationUnreachable(Host)".into(),
            2 => "DestinationUnreachable(Protocol)".into(),
            3 => "DestinationUnreachable(Port)".into(),
            c => format!("DestinationUnreachable({c})"),
        },
        5 => "Redirect".into(),
        8 => "EchoRequest".into(),
        11 => "TimeExceeded".into(),
        _ => format!("type {t} code {code}"),
    }
}

/// A DNS query or response the DNS proxy handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    pub meta: L7Meta,
    pub query: String,
    pub qtypes: Vec<String>,
    pub rcode: u32,
    pub ips: Vec<String>,
    pub ttl: u32,
    pub cnames: Vec<String>,
}

/// A Kafka request the L7 proxy handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub meta: L7Meta,
    pub api_key: String,
    pub api_version: i32,
    pub correlation_id: i32,
    pub topic: String,
    pub error_code: i32,
}

/// An L7 flow resolved when the proxy reported it (names, service, UUID
/// number) and built into a [`Flow`] only when someone reads it: the
/// proxy's hot path formats nothing and copies no endpoint.
#[derive(Debug, Clone)]
pub struct L7Flow {
    pub meta: L7Meta,
    pub udp: bool,
    pub record: pb::layer7::Record,
    source: std::sync::Arc<Endpoint>,
    destination: std::sync::Arc<Endpoint>,
    service: Option<pb::Service>,
    node_name: String,
    seed: u64,
    seq: u64,
}

impl L7Flow {
    /// What the metrics count of it.
    pub fn view(&self) -> crate::metrics::L7View<'_> {
        crate::metrics::L7View {
            record: Some(&self.record),
            response: self.meta.response,
            latency_ns: self.meta.latency_ns,
            ingress: self.meta.ingress,
            verdict: self.verdict(),
            drop_reason: 0,
            protocol: if self.udp { "UDP" } else { "TCP" },
        }
    }

    fn verdict(&self) -> i32 {
        (if self.meta.denied { Verdict::Dropped } else { Verdict::Forwarded }) as i32
    }

    /// The flow; a response flows from the server to the client and is a
    /// reply.
    pub fn build(self) -> Flow {
        let verdict = self.verdict();
        let c = &self.meta;
        let (src, dst) = if c.response { (c.server, c.client) } else { (c.client, c.server) };
        let l7_type = if c.response { pb::L7FlowType::Response } else { pb::L7FlowType::Request };
        let (sport, dport) = (u32::from(src.port()), u32::from(dst.port()));
        let l4 = if self.udp { layer4::Protocol::Udp(pb::Udp { source_port: sport, destination_port: dport }) } else { layer4::Protocol::Tcp(pb::Tcp { source_port: sport, destination_port: dport, flags: None }) };
        let (mut source_names, mut destination_names) = (Vec::new(), Vec::new());
        if let pb::layer7::Record::Dns(d) = &self.record {
            if c.response { source_names = vec![d.query.clone()] } else { destination_names = vec![d.query.clone()] }
        }
        let (mut source_service, mut destination_service) = (None, None);
        if c.response { source_service = self.service } else { destination_service = self.service }
        let mut f = Flow {
            time: Some(timestamp(c.time_ns)),
            uuid: uuid(self.seed, self.seq),
            emitter: Some(Emitter { name: "Hubble".into(), version: crate::VERSION.into() }),
            verdict,
            ip: Some(pb::Ip { source: src.ip().to_string(), destination: dst.ip().to_string(), ip_version: IpVersion::IPv4 as i32, ..Default::default() }),
            l4: Some(Layer4 { protocol: Some(l4) }),
            source: Some(std::sync::Arc::unwrap_or_clone(self.source)),
            destination: Some(std::sync::Arc::unwrap_or_clone(self.destination)),
            r#type: FlowType::L7 as i32,
            node_name: self.node_name,
            l7: Some(pb::Layer7 { r#type: l7_type as i32, latency_ns: c.latency_ns, record: Some(self.record) }),
            event_type: Some(CiliumEventType { r#type: MSG_ACCESS_LOG, sub_type: 0 }),
            traffic_direction: if c.ingress { TrafficDirection::Ingress } else { TrafficDirection::Egress } as i32,
            is_reply: Some(pbjson_types::BoolValue { value: c.response }),
            source_names,
            destination_names,
            source_service,
            destination_service,
            ..Default::default()
        };
        #[allow(deprecated)]
        {
            f.reply = c.response;
            f.summary = crate::printer::l7_summary(&f);
        }
        f
    }
}

impl Parser {
    /// Resolves an L7 record's names now (they may change before it is read).
    fn l7(&self, meta: L7Meta, udp: bool, record: pb::layer7::Record, names: &Names) -> L7Flow {
        let (src, dst, sid, did) = if meta.response { (meta.server, meta.client, meta.server_identity, meta.client_identity) } else { (meta.client, meta.server, meta.client_identity, meta.server_identity) };
        L7Flow {
            meta,
            udp,
            record,
            source: names.endpoint_cache.get(names, (*src.ip()).into(), sid, endpoint),
            destination: names.endpoint_cache.get(names, (*dst.ip()).into(), did, endpoint),
            service: names.services.get(&(IpAddr::V4(*meta.server.ip()), meta.server.port())).map(|svc| pb::Service { name: svc.name.clone(), namespace: svc.namespace.clone() }),
            node_name: names.node_name.clone(),
            seed: self.seed,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The L7 flow of a DNS query or response (egress of the client).
    pub fn dns_flow(&self, r: DnsRecord, names: &Names) -> L7Flow {
        let response = r.meta.response;
        let dns = pb::Dns {
            query: format!("{}.", r.query),
            rrtypes: if response && !r.ips.is_empty() { vec!["A".into()] } else { vec![] },
            ips: if response { r.ips } else { vec![] },
            ttl: r.ttl,
            cnames: r.cnames.iter().map(|c| format!("{c}.")).collect(),
            observation_source: "proxy".into(),
            rcode: r.rcode,
            qtypes: r.qtypes,
        };
        self.l7(r.meta, true, pb::layer7::Record::Dns(dns), names)
    }

    /// The L7 flow of an HTTP request or response.
    pub fn http_flow(&self, r: HttpRecord, names: &Names) -> L7Flow {
        let http = pb::Http {
            code: r.code,
            method: r.method,
            url: r.url,
            protocol: r.protocol,
            headers: r.headers.into_iter().map(|(key, value)| pb::HttpHeader { key, value }).collect(),
        };
        self.l7(r.meta, false, pb::layer7::Record::Http(http), names)
    }

    /// The L7 flow of a Kafka request (forwarded, or denied with the error
    /// code the proxy answered).
    pub fn kafka_flow(&self, r: KafkaRecord, names: &Names) -> L7Flow {
        let kafka = pb::Kafka { error_code: r.error_code, api_version: r.api_version, api_key: r.api_key, correlation_id: r.correlation_id, topic: r.topic };
        self.l7(r.meta, false, pb::layer7::Record::Kafka(kafka), names)
    }

    /// Names the policies behind a policy verdict or a policy drop.
    fn attribute(&self, f: &mut Flow, ev: &MonitorEvent, names: &Names) {
        let Some(att) = &names.policies else { return };
        let policy_drop = ev.kind == "drop" && matches!(ev.drop_reason.as_ref().map(|(c, _)| *c), Some(133 | 181));
        if ev.kind != "policy-verdict" && !policy_drop {
            return;
        }
        let Some(p) = &ev.packet else { return };
        let (protocol, port) = match &p.l4 {
            L4::Tcp { dst_port, .. } => (6, *dst_port),
            L4::Udp { dst_port, .. } => (17, *dst_port),
            L4::Icmp { icmp_type, .. } => (1, u16::from(*icmp_type)),
            L4::Icmpv6 { icmp_type, .. } => (58, u16::from(*icmp_type)),
            L4::Other { number } => (*number, 0),
        };
        let egress = !ev.ingress;
        let q = PolicyQuery { src_identity: ev.src_identity, dst_identity: ev.dst_identity, egress, protocol, port, local: if egress { p.src } else { p.dst } };
        let a = att.attribute(&q);
        let conv = |v: Vec<PolicyName>| v.into_iter().map(|n| pb::Policy { name: n.name, namespace: n.namespace, labels: Vec::new(), revision: 0, kind: n.kind }).collect::<Vec<_>>();
        if egress {
            f.egress_allowed_by = conv(a.allowed_by);
            f.egress_denied_by = conv(a.denied_by);
        } else {
            f.ingress_allowed_by = conv(a.allowed_by);
            f.ingress_denied_by = conv(a.denied_by);
        }
    }

    fn uuid(&self) -> String {
        uuid(self.seed, self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// The flow of one datapath event.
    pub fn flow(&self, ev: &MonitorEvent, names: &Names) -> Flow {
        let mut f = Flow {
            time: Some(timestamp(ev.time_ns)),
            uuid: self.uuid(),
            emitter: Some(Emitter {
                name: "Hubble".into(),
                version: crate::VERSION.into(),
            }),
            r#type: FlowType::L3L4 as i32,
            node_name: names.node_name.clone(),
            is_reply: Some(pbjson_types::BoolValue { value: ev.is_reply }),
            ..Default::default()
        };
        if ev.ifindex != 0 {
            f.interface = Some(NetworkInterface {
                index: ev.ifindex,
                name: names
                    .interfaces
                    .get(&ev.ifindex)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        if let Some(p) = &ev.packet {
            f.ip = Some(pb::Ip {
                source: p.src.to_string(),
                destination: p.dst.to_string(),
                ip_version: if p.src.is_ipv6() { IpVersion::IPv6 } else { IpVersion::IPv4 } as i32,
                ..Default::default()
            });
            let proto = match &p.l4 {
                L4::Tcp {
                    src_port,
                    dst_port,
                    flags,
                } => Some(layer4::Protocol::Tcp(pb::Tcp {
                    source_port: (*src_port).into(),
                    destination_port: (*dst_port).into(),
                    flags: Some(pb::TcpFlags {
                        fin: flags.fin,
                        syn: flags.syn,
                        rst: flags.rst,
                        psh: flags.psh,
                        ack: flags.ack,
                        urg: flags.urg,
                        ..Default::default()
                    }),
                })),
                L4::Udp { src_port, dst_port } => Some(layer4::Protocol::Udp(pb::Udp {
                    source_port: (*src_port).into(),
                    destination_port: (*dst_port).into(),
                })),
                L4::Icmp { icmp_type, code } => Some(layer4::Protocol::IcmPv4(pb::IcmPv4 {
                    r#type: (*icmp_type).into(),
                    code: (*code).into(),
                })),
                L4::Icmpv6 { icmp_type, code } => Some(layer4::Protocol::IcmPv6(pb::IcmPv6 {
                    r#type: (*icmp_type).into(),
                    code: (*code).into(),
                })),
                L4::Other { .. } => None,
            };
            f.l4 = proto.map(|p| Layer4 { protocol: Some(p) });
            f.source = Some(endpoint(names, p.src, ev.src_identity));
            f.destination = Some(endpoint(names, p.dst, ev.dst_identity));
            let dport = match &p.l4 {
                L4::Tcp { dst_port, .. } | L4::Udp { dst_port, .. } => Some(*dst_port),
                _ => None,
            };
            if let Some(svc) = dport.and_then(|port| names.services.get(&(p.dst, port))) {
                f.destination_service = Some(pb::Service {
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                });
            }
            let sport = match &p.l4 {
                L4::Tcp { src_port, .. } | L4::Udp { src_port, .. } => Some(*src_port),
                _ => None,
            };
            if let Some(svc) = sport.and_then(|port| names.services.get(&(p.src, port))) {
                f.source_service = Some(pb::Service {
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                });
            }
        } else {
            f.source = Some(Endpoint {
                identity: ev.src_identity,
                ..Default::default()
            });
            f.destination = Some(Endpoint {
                identity: ev.dst_identity,
                ..Default::default()
            });
        }
        let dir = |ingress: bool| if ingress { TrafficDirection::Ingress } else { TrafficDirection::Egress } as i32;
        match ev.kind.as_str() {
            #[allow(deprecated)]
            "drop" => {
                let code = ev.drop_reason.as_ref().map(|(c, _)| *c).unwrap_or(0);
                f.verdict = Verdict::Dropped as i32;
                f.drop_reason = code.into();
                f.drop_reason_desc = DropReason::try_from(i32::from(code))
                    .map(|d| d as i32)
                    .unwrap_or(0);
                f.event_type = Some(CiliumEventType {
                    r#type: MSG_DROP,
                    sub_type: code.into(),
                });
                f.traffic_direction = dir(ev.ingress);
            }
            #[allow(deprecated)]
            "policy-verdict" => {
                f.verdict = match ev.action.as_deref() {
                    Some("allow") => Verdict::Forwarded,
                    Some("audit") => Verdict::Audit,
                    _ => Verdict::Dropped,
                } as i32;
                if let Some((code, _)) = &ev.drop_reason {
                    f.drop_reason = (*code).into();
                    f.drop_reason_desc = DropReason::try_from(i32::from(*code))
                        .map(|d| d as i32)
                        .unwrap_or(0);
                }
                f.event_type = Some(CiliumEventType {
                    r#type: MSG_POLICY_VERDICT,
                    sub_type: 0,
                });
                f.traffic_direction = dir(ev.ingress);
                f.policy_match_type = match ev.match_type.as_deref() {
                    Some("L3-Only") => 1,
                    Some("L3-L4") => 2,
                    Some("L4-Only") => 3,
                    Some("all") => 4,
                    _ => 0,
                };
            }
            _ => {
                let point = observation_point(ev.observation_point.as_deref().unwrap_or(""));
                f.verdict = Verdict::Forwarded as i32;
                f.trace_observation_point = point as i32;
                f.event_type = Some(CiliumEventType {
                    r#type: MSG_TRACE,
                    sub_type: trace_sub_type(point),
                });
                // the direction of the connection, seen from the endpoint
                f.traffic_direction = match point {
                    // where an endpoint's packet leaves it (with aggregation,
                    // to-stack and to-network take from-endpoint's place)
                    TraceObservationPoint::FromEndpoint | TraceObservationPoint::ToStack | TraceObservationPoint::ToNetwork => dir(ev.is_reply),
                    TraceObservationPoint::ToEndpoint => dir(!ev.is_reply),
                    _ => TrafficDirection::Unknown as i32,
                };
            }
        }
        self.attribute(&mut f, ev, names);
        #[allow(deprecated)]
        {
            f.reply = ev.is_reply;
            f.summary = summary(f.l4.as_ref());
        }
        f
    }
}

#[cfg(test)]
mod tests;
