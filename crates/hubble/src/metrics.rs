//! Hubble's Prometheus metrics (served on :9965), derived from flows. Each
//! family can be turned on by name like upstream's `--hubble-metrics`:
//! flow, drop, tcp, icmp, port-distribution, policy, dns, http, kafka.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::proto::flow::{DropReason, Flow, TrafficDirection, Verdict, layer4, layer7};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub protocol: String,
    pub subtype: String,
    pub r#type: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub flag: String,
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IcmpLabels {
    pub family: String,
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub protocol: String,
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub direction: String,
    pub r#match: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub rcode: String,
    pub qtypes: String,
    pub ips_returned: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub protocol: String,
    pub status: String,
    pub reporter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KafkaLabels {
    pub topic: String,
    pub api_key: String,
    pub error_code: String,
    pub reporter: String,
}

/// Every family name `--hubble-metrics` accepts.
pub const FAMILIES: &[&str] = &[
    "flow",
    "drop",
    "tcp",
    "icmp",
    "port-distribution",
    "policy",
    "dns",
    "http",
    "kafka",
];

/// Hubble's metrics. Families not enabled are never registered.
#[derive(Debug, Default)]
pub struct Metrics {
    flows: Option<Family<FlowLabels, Counter>>,
    drops: Option<Family<DropLabels, Counter>>,
    tcp: Option<Family<TcpLabels, Counter>>,
    icmp: Option<Family<IcmpLabels, Counter>>,
    ports: Option<Family<PortLabels, Counter>>,
    verdicts: Option<Family<VerdictLabels, Counter>>,
    dns_queries: Option<Family<DnsLabels, Counter>>,
    dns_responses: Option<Family<DnsLabels, Counter>>,
    http_requests: Option<Family<HttpLabels, Counter>>,
    http_responses: Option<Family<HttpLabels, Counter>>,
    http_duration: Option<Family<HttpLabels, Histogram>>,
    kafka_requests: Option<Family<KafkaLabels, Counter>>,
    lost: Family<LostLabels, Counter>,
    /// The series HTTP flows counted recently, by what names them.
    http_series: std::sync::Mutex<Vec<(HttpKey, L7Series)>>,
}

/// HTTP label sets kept with their series (a proxy sees few; past this,
/// flows are counted through the families' maps).
const HTTP_SERIES: usize = 64;

/// What names an HTTP flow's series.
#[derive(Debug)]
struct HttpKey {
    response: bool,
    ingress: bool,
    verdict: i32,
    drop_reason: i32,
    l4: &'static str,
    code: u32,
    method: String,
    protocol: String,
}

/// The series one L7 flow counts in (handles share the families' values).
#[derive(Debug)]
struct L7Series {
    flows: Option<Counter>,
    drops: Option<Counter>,
    count: Option<Counter>,
    duration: Option<Histogram>,
}

/// An unknown family name.
#[derive(Debug, thiserror::Error)]
#[error("unknown Hubble metric {0:?}; known: {known}", known = FAMILIES.join(", "))]
pub struct UnknownMetric(pub String);

fn family<L>(reg: &mut Registry, on: bool, name: &str, help: &str) -> Option<Family<L, Counter>>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    on.then(|| {
        let f = Family::<L, Counter>::default();
        reg.register(name, help, f.clone());
        f
    })
}

impl Metrics {
    /// Registers the enabled families (names with an optional `:options`
    /// suffix, which is accepted and ignored) under `hubble_`.
    pub fn register(reg: &mut Registry, enabled: &[String]) -> Result<Metrics, UnknownMetric> {
        let mut on = std::collections::BTreeSet::new();
        for e in enabled {
            let name = e.split(':').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            if !FAMILIES.contains(&name) {
                return Err(UnknownMetric(name.to_string()));
            }
            on.insert(name.to_string());
        }
        let has = |n: &str| on.contains(n);
        let reg = reg.sub_registry_with_prefix("hubble");
        let lost = Family::<LostLabels, Counter>::default();
        reg.register("lost_events", "Events Hubble lost, by where", lost.clone());
        for source in [
            "perf_event_ring_buffer",
            "hubble_ring_buffer",
            "observer_events_queue",
        ] {
            let _ = lost.get_or_create(&LostLabels {
                source: source.into(),
            });
        }
        let http_duration = has("http").then(|| {
            let f = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
            });
            reg.register(
                "http_request_duration_seconds",
                "HTTP request duration",
                f.clone(),
            );
            f
        });
        Ok(Metrics {
            flows: family(
                reg,
                has("flow"),
                "flows_processed",
                "Flows processed, by type, subtype, verdict and protocol",
            ),
            drops: family(
                reg,
                has("drop"),
                "drop",
                "Dropped packets, by reason and protocol",
            ),
            tcp: family(reg, has("tcp"), "tcp_flags", "TCP packets, by flag"),
            icmp: family(reg, has("icmp"), "icmp", "ICMP packets, by type"),
            ports: family(
                reg,
                has("port-distribution"),
                "port_distribution",
                "Packets, by destination port and protocol",
            ),
            verdicts: family(
                reg,
                has("policy"),
                "policy_verdicts",
                "Policy verdicts, by direction, match and action",
            ),
            dns_queries: family(reg, has("dns"), "dns_queries", "DNS queries"),
            dns_responses: family(reg, has("dns"), "dns_responses", "DNS responses"),
            http_requests: family(reg, has("http"), "http_requests", "HTTP requests"),
            http_responses: family(reg, has("http"), "http_responses", "HTTP responses"),
            http_duration,
            kafka_requests: family(reg, has("kafka"), "kafka_requests", "Kafka requests, by topic, API key, error code and reporter"),
            lost,
            http_series: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Counts events lost at `source` ("perf_event_ring_buffer", "hubble_ring_buffer", "observer_events_queue").
    pub fn lost(&self, source: &str, n: u64) {
        self.lost
            .get_or_create(&LostLabels {
                source: source.to_string(),
            })
            .inc_by(n);
    }

    /// Counts one flow in every enabled family.
    pub fn observe(&self, f: &Flow) {
        let l4 = f.l4.as_ref().and_then(|l| l.protocol.as_ref());
        let protocol = match l4 {
            Some(layer4::Protocol::Tcp(_)) => "TCP",
            Some(layer4::Protocol::Udp(_)) => "UDP",
            Some(layer4::Protocol::IcmPv4(_)) => "ICMPv4",
            Some(layer4::Protocol::IcmPv6(_)) => "ICMPv6",
            Some(layer4::Protocol::Sctp(_)) => "SCTP",
            None => "",
        };
        if let Some(l7) = &f.l7 {
            return self.observe_l7(&L7View {
                record: l7.record.as_ref(),
                response: l7.r#type == 2,
                latency_ns: l7.latency_ns,
                ingress: f.traffic_direction == TrafficDirection::Ingress as i32,
                verdict: f.verdict,
                drop_reason: f.drop_reason_desc,
                protocol,
            });
        }
        let et = f.event_type.as_ref().map(|e| e.r#type).unwrap_or(0);
        let verdict = Verdict::try_from(f.verdict)
            .map(|v| v.as_str_name())
            .unwrap_or("VERDICT_UNKNOWN");
        if let Some(m) = &self.flows {
            let (ty, sub) = match et {
                crate::parser::MSG_DROP => ("Drop", String::new()),
                crate::parser::MSG_POLICY_VERDICT => ("PolicyVerdict", String::new()),
                crate::parser::MSG_TRACE => ("Trace", crate::printer::flow_type(f)),
                _ => ("Unknown", String::new()),
            };
            m.get_or_create(&FlowLabels {
                protocol: protocol.into(),
                subtype: sub,
                r#type: ty.into(),
                verdict: verdict.into(),
            })
            .inc();
        }
        if let Some(m) = &self.drops {
            if f.verdict == Verdict::Dropped as i32 {
                let reason = DropReason::try_from(f.drop_reason_desc)
                    .map(|d| d.as_str_name())
                    .unwrap_or("DROP_REASON_UNKNOWN");
                m.get_or_create(&DropLabels {
                    reason: reason.into(),
                    protocol: protocol.into(),
                })
                .inc();
            }
        }
        // the packet families count each packet once: at its trace or drop
        let packet_event = et == crate::parser::MSG_TRACE || et == crate::parser::MSG_DROP;
        if let (Some(m), Some(layer4::Protocol::Tcp(t)), true) = (&self.tcp, l4, packet_event) {
            if let Some(fl) = &t.flags {
                let flag = if fl.syn && fl.ack {
                    Some("SYN-ACK")
                } else if fl.syn {
                    Some("SYN")
                } else if fl.fin {
                    Some("FIN")
                } else if fl.rst {
                    Some("RST")
                } else {
                    None
                };
                if let Some(flag) = flag {
                    m.get_or_create(&TcpLabels {
                        flag: flag.into(),
                        family: "IPv4".into(),
                    })
                    .inc();
                }
            }
        }
        if let (Some(m), Some(layer4::Protocol::IcmPv4(i)), true) = (&self.icmp, l4, packet_event) {
            m.get_or_create(&IcmpLabels {
                family: "IPv4".into(),
                r#type: crate::parser::icmp4_name(i.r#type, i.code),
            })
            .inc();
        }
        if let (Some(m), true) = (
            &self.ports,
            packet_event && !f.is_reply.as_ref().is_some_and(|r| r.value),
        ) {
            let port = match l4 {
                Some(layer4::Protocol::Tcp(t)) => Some(t.destination_port),
                Some(layer4::Protocol::Udp(u)) => Some(u.destination_port),
                _ => None,
            };
            if let Some(p) = port {
                m.get_or_create(&PortLabels {
                    protocol: protocol.into(),
                    port: p.to_string(),
                })
                .inc();
            }
        }
        if let (Some(m), crate::parser::MSG_POLICY_VERDICT) = (&self.verdicts, et) {
            let direction = match TrafficDirection::try_from(f.traffic_direction) {
                Ok(TrafficDirection::Ingress) => "ingress",
                Ok(TrafficDirection::Egress) => "egress",
                _ => "unknown",
            };
            let matched = match f.policy_match_type {
                1 => "l3-only",
                2 => "l3-l4",
                3 => "l4-only",
                4 => "all",
                _ => "none",
            };
            m.get_or_create(&VerdictLabels {
                direction: direction.into(),
                r#match: matched.into(),
                action: verdict.to_ascii_lowercase(),
            })
            .inc();
        }
    }

    /// Counts one L7 flow (from the flow, or from an L7 record not yet
    /// built into one).
    pub fn observe_l7(&self, v: &L7View) {
        if let Some(layer7::Record::Http(h)) = v.record {
            return self.observe_http(v, h);
        }
        let s = self.l7_series(v, |_| {});
        for c in [s.flows, s.drops].into_iter().flatten() {
            c.inc();
        }
        let reporter = if v.ingress { "server" } else { "client" };
        match v.record {
            Some(layer7::Record::Dns(d)) => {
                let labels = DnsLabels {
                    rcode: if v.response { rcode(d.rcode) } else { String::new() },
                    qtypes: d.qtypes.join(","),
                    ips_returned: if v.response { d.ips.len().to_string() } else { String::new() },
                };
                if let Some(m) = if v.response { &self.dns_responses } else { &self.dns_queries } {
                    m.get_or_create(&labels).inc();
                }
            }
            Some(layer7::Record::Kafka(k)) => {
                if let Some(m) = &self.kafka_requests {
                    m.get_or_create(&KafkaLabels { topic: k.topic.clone(), api_key: k.api_key.clone(), error_code: k.error_code.to_string(), reporter: reporter.into() }).inc();
                }
            }
            // HTTP: counted above
            Some(layer7::Record::Http(_)) | None => {}
        }
    }

    /// Counts an HTTP flow through the series its labels name, found by
    /// comparing a few fields rather than building and hashing label strings.
    fn observe_http(&self, v: &L7View, h: &crate::proto::flow::Http) {
        let count = |s: &L7Series| {
            for c in [&s.flows, &s.drops, &s.count].into_iter().flatten() {
                c.inc();
            }
            if let Some(d) = &s.duration {
                d.observe(v.latency_ns as f64 / 1e9);
            }
        };
        let mut cache = self.http_series.lock().unwrap_or_else(|p| p.into_inner());
        let same = |k: &HttpKey| k.code == h.code && k.response == v.response && k.ingress == v.ingress && k.verdict == v.verdict && k.drop_reason == v.drop_reason && k.l4 == v.protocol && k.method == h.method && k.protocol == h.protocol;
        if let Some((_, s)) = cache.iter().find(|(k, _)| same(k)) {
            return count(s);
        }
        let labels = HttpLabels {
            method: h.method.clone(),
            protocol: h.protocol.clone(),
            status: if v.response { h.code.to_string() } else { String::new() },
            reporter: if v.ingress { "server" } else { "client" }.into(),
        };
        let s = self.l7_series(v, |s| {
            s.count = (if v.response { &self.http_responses } else { &self.http_requests }).as_ref().map(|m| m.get_or_create(&labels).clone());
            s.duration = self.http_duration.as_ref().filter(|_| v.response).map(|m| m.get_or_create(&labels).clone());
        });
        count(&s);
        if cache.len() < HTTP_SERIES {
            let key = HttpKey { response: v.response, ingress: v.ingress, verdict: v.verdict, drop_reason: v.drop_reason, l4: v.protocol, code: h.code, method: h.method.clone(), protocol: h.protocol.clone() };
            cache.push((key, s));
        }
    }

    /// The flows (and, if dropped, drops) series of an L7 flow, with what
    /// `more` adds.
    fn l7_series(&self, v: &L7View, more: impl FnOnce(&mut L7Series)) -> L7Series {
        let verdict = Verdict::try_from(v.verdict).map(|v| v.as_str_name()).unwrap_or("VERDICT_UNKNOWN");
        let protocol = match v.record {
            Some(layer7::Record::Dns(_)) => "DNS",
            Some(layer7::Record::Http(_)) => "HTTP",
            Some(layer7::Record::Kafka(_)) => "Kafka",
            None => "",
        };
        let mut s = L7Series {
            flows: self.flows.as_ref().map(|m| m.get_or_create(&FlowLabels { protocol: protocol.into(), subtype: String::new(), r#type: "L7".into(), verdict: verdict.into() }).clone()),
            drops: None,
            count: None,
            duration: None,
        };
        if v.verdict == Verdict::Dropped as i32 {
            let reason = DropReason::try_from(v.drop_reason).map(|d| d.as_str_name()).unwrap_or("DROP_REASON_UNKNOWN");
            s.drops = self.drops.as_ref().map(|m| m.get_or_create(&DropLabels { reason: reason.into(), protocol: v.protocol.into() }).clone());
        }
        more(&mut s);
        s
    }
}

/// What the metrics read of an L7 flow.
#[derive(Debug, Clone, Copy)]
pub struct L7View<'a> {
    pub record: Option<&'a layer7::Record>,
    /// A response (else a request).
    pub response: bool,
    pub latency_ns: u64,
    /// Reported by the server's side (ingress policy), else the client's.
    pub ingress: bool,
    pub verdict: i32,
    pub drop_reason: i32,
    /// The L4 protocol's name ("TCP", "UDP").
    pub protocol: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flow::{Kafka, Layer7};

    #[test]
    fn kafka_requests_by_topic_api_key_and_error_code() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg, &["kafka".to_string()]).unwrap();
        let flow = |topic: &str, error_code: i32| Flow {
            traffic_direction: TrafficDirection::Ingress as i32,
            l7: Some(Layer7 { r#type: 1, record: Some(layer7::Record::Kafka(Kafka { topic: topic.into(), api_key: "produce".into(), error_code, ..Default::default() })), ..Default::default() }),
            ..Default::default()
        };
        m.observe(&flow("orders", 0));
        m.observe(&flow("orders", 0));
        m.observe(&flow("secrets", 29));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains(r#"hubble_kafka_requests_total{topic="orders",api_key="produce",error_code="0",reporter="server"} 2"#), "{text}");
        assert!(text.contains(r#"hubble_kafka_requests_total{topic="secrets",api_key="produce",error_code="29",reporter="server"} 1"#), "{text}");
        assert!(Metrics::register(&mut Registry::default(), &["kafka:labelsContext=source_pod".to_string()]).is_ok());
    }
}

fn rcode(c: u32) -> String {
    match c {
        0 => "No Error",
        1 => "Format Error",
        2 => "Server Failure",
        3 => "Non-Existent Domain",
        4 => "Not Implemented",
        5 => "Query Refused",
        _ => return c.to_string(),
    }
    .to_string()
}
