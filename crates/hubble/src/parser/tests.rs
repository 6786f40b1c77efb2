use std::net::Ipv4Addr;

use cilium_flow::{MonitorEvent, Packet, TcpFlags};

use super::*;
use crate::names::{EndpointName, ServiceName, Workload};
use crate::printer::{Format, Options, format};
use crate::proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes};

fn names() -> Names {
    let mut n = Names {
        node_name: "node1".into(),
        ..Default::default()
    };
    n.endpoints.insert(
        Ipv4Addr::new(10, 0, 1, 2).into(),
        EndpointName {
            id: 101,
            identity: 300,
            namespace: "default".into(),
            pod_name: "frontend".into(),
            labels: vec![
                "k8s:app=frontend".into(),
                "k8s:io.kubernetes.pod.namespace=default".into(),
            ],
            workloads: vec![Workload {
                kind: "Deployment".into(),
                name: "frontend".into(),
            }],
        },
    );
    n.endpoints.insert(
        Ipv4Addr::new(10, 0, 1, 3).into(),
        EndpointName {
            id: 102,
            identity: 301,
            namespace: "default".into(),
            pod_name: "backend".into(),
            labels: vec!["k8s:app=backend".into()],
            workloads: vec![],
        },
    );
    n.services.insert(
        (Ipv4Addr::new(10, 96, 0, 10).into(), 80),
        ServiceName {
            namespace: "default".into(),
            name: "backend".into(),
        },
    );
    n
}

fn ev(kind: &str, src: [u8; 4], dst: [u8; 4], syn: bool) -> MonitorEvent {
    MonitorEvent {
        kind: kind.into(),
        time_ns: 1_700_000_000_123_000_000,
        endpoint: 102,
        ifindex: 7,
        src_identity: 300,
        dst_identity: 301,
        drop_reason: None,
        observation_point: None,
        action: None,
        match_type: None,
        ingress: true,
        is_reply: false,
        length: 60,
        packet: Some(Packet {
            src: Ipv4Addr::from(src).into(),
            dst: Ipv4Addr::from(dst).into(),
            l4: L4::Tcp {
                src_port: 43210,
                dst_port: 80,
                flags: TcpFlags {
                    syn,
                    ..Default::default()
                },
            },
        }),
    }
}

fn compact(f: &Flow) -> String {
    let r = GetFlowsResponse {
        response_types: Some(ResponseTypes::Flow(f.clone())),
        node_name: f.node_name.clone(),
        time: f.time,
    };
    format(&r, Format::Compact, Options::default())
}

#[test]
fn policy_drop_is_dropped_with_reason_and_both_pod_names() {
    let mut e = ev("drop", [10, 0, 1, 2], [10, 0, 1, 3], true);
    e.drop_reason = Some((133, "Policy denied".into()));
    let f = Parser::default().flow(&e, &names());
    assert_eq!(f.verdict, Verdict::Dropped as i32);
    assert_eq!(f.drop_reason_desc, DropReason::PolicyDenied as i32);
    assert_eq!(
        f.event_type,
        Some(CiliumEventType {
            r#type: MSG_DROP,
            sub_type: 133
        })
    );
    assert_eq!(f.traffic_direction, TrafficDirection::Ingress as i32);
    let src = f.source.as_ref().unwrap();
    assert_eq!(
        (
            src.namespace.as_str(),
            src.pod_name.as_str(),
            src.id,
            src.identity
        ),
        ("default", "frontend", 101, 300)
    );
    assert_eq!(src.workloads[0].kind, "Deployment");
    assert_eq!(f.destination.as_ref().unwrap().pod_name, "backend");
    assert_eq!(f.node_name, "node1");
    let line = compact(&f);
    assert!(line.ends_with(": default/frontend:43210 (ID:300) -> default/backend:80 (ID:301) Policy denied DROPPED (TCP Flags: SYN)\n"), "{line}");
}

#[test]
fn policy_verdicts_say_allowed_or_denied_with_match_type() {
    let mut e = ev("policy-verdict", [10, 0, 1, 2], [10, 0, 1, 3], true);
    e.action = Some("allow".into());
    e.match_type = Some("L3-L4".into());
    let f = Parser::default().flow(&e, &names());
    assert_eq!(f.verdict, Verdict::Forwarded as i32);
    assert_eq!(f.policy_match_type, 2);
    assert!(
        compact(&f).contains("policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)"),
        "{}",
        compact(&f)
    );
    e.action = Some("deny".into());
    e.match_type = None;
    let f = Parser::default().flow(&e, &names());
    assert!(
        compact(&f).contains("policy-verdict:none INGRESS DENIED"),
        "{}",
        compact(&f)
    );
    e.action = Some("audit".into());
    assert_eq!(
        Parser::default().flow(&e, &names()).verdict,
        Verdict::Audit as i32
    );
}

#[test]
fn traces_carry_point_direction_and_replies_print_client_first() {
    let mut e = ev("trace", [10, 0, 1, 3], [10, 0, 1, 2], false);
    e.observation_point = Some("to-endpoint".into());
    e.is_reply = true;
    let f = Parser::default().flow(&e, &names());
    assert_eq!(
        f.trace_observation_point,
        TraceObservationPoint::ToEndpoint as i32
    );
    assert_eq!(f.event_type.unwrap().sub_type, 0);
    assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);
    assert_eq!(f.is_reply.map(|r| r.value), Some(true));
    let line = compact(&f);
    assert!(
        line.contains(
            "default/frontend:80 (ID:300) <- default/backend:43210 (ID:301) to-endpoint FORWARDED"
        ),
        "{line}"
    );
}

#[test]
fn unknown_addresses_fall_back_to_identity_labels_and_services_are_named() {
    let mut n = names();
    n.identities.insert(
        16_777_217,
        vec!["cidr:1.1.1.0/24".into(), "reserved:world".into()],
    );
    let mut e = ev("trace", [10, 0, 1, 2], [10, 96, 0, 10], true);
    e.observation_point = Some("from-endpoint".into());
    e.dst_identity = 2;
    let f = Parser::default().flow(&e, &n);
    assert_eq!(f.destination_service.as_ref().unwrap().name, "backend");
    assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);
    let d = f.destination.as_ref().unwrap();
    assert_eq!(d.identity, 2);
    assert!(d.labels.contains(&"reserved:world".to_string()));
    assert!(
        compact(&f).contains("-> 10.96.0.10:80 (world) from-endpoint FORWARDED"),
        "{}",
        compact(&f)
    );
}

/// With monitor aggregation a pod's packet leaving towards the stack is
/// traced as to-stack: the direction is the connection's, as from-endpoint's.
#[test]
fn to_stack_traces_carry_the_connection_direction() {
    let n = names();
    let mut e = ev("trace", [10, 0, 1, 2], [1, 1, 1, 1], true);
    e.observation_point = Some("to-stack".into());
    let f = Parser::default().flow(&e, &n);
    assert_eq!(f.trace_observation_point, TraceObservationPoint::ToStack as i32);
    assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);
    e.is_reply = true;
    assert_eq!(Parser::default().flow(&e, &n).traffic_direction, TrafficDirection::Ingress as i32, "a reply of a connection the pod accepted");
}

#[test]
fn json_uses_proto_names_and_enum_strings() {
    let mut e = ev("drop", [10, 0, 1, 2], [10, 0, 1, 3], true);
    e.drop_reason = Some((133, "Policy denied".into()));
    let f = Parser::default().flow(&e, &names());
    let r = GetFlowsResponse {
        response_types: Some(ResponseTypes::Flow(f.clone())),
        node_name: "node1".into(),
        time: f.time,
    };
    let v: serde_json::Value =
        serde_json::from_str(&format(&r, Format::Json, Options::default())).unwrap();
    assert_eq!(v["flow"]["verdict"], "DROPPED");
    assert_eq!(v["flow"]["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(v["flow"]["source"]["pod_name"], "frontend");
    assert_eq!(v["flow"]["destination"]["namespace"], "default");
    assert_eq!(v["flow"]["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(v["flow"]["IP"]["source"], "10.0.1.2");
    assert_eq!(v["node_name"], "node1");
    assert!(
        v["time"]
            .as_str()
            .unwrap()
            .starts_with("2023-11-14T22:13:20.123")
    );
    // and it reads back
    let back: GetFlowsResponse = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
}

#[test]
fn protobuf_bytes_round_trip() {
    use prost::Message;
    let mut e = ev("drop", [10, 0, 1, 2], [10, 0, 1, 3], true);
    e.drop_reason = Some((181, "Policy denied by denylist".into()));
    let f = Parser::default().flow(&e, &names());
    let bytes = f.encode_to_vec();
    assert_eq!(Flow::decode(bytes.as_slice()).unwrap(), f);
    // field 25 (drop_reason_desc), varint: tag 25<<3 = 200 = c8 01, value 181 = b5 01
    assert!(bytes.windows(4).any(|w| w == [0xc8, 0x01, 0xb5, 0x01]));
}

#[derive(Debug)]
struct FakePolicies;

impl crate::names::Attributor for FakePolicies {
    fn attribute(&self, q: &crate::names::PolicyQuery) -> crate::names::Attribution {
        let p = |n: &str| crate::names::PolicyName { kind: "CiliumNetworkPolicy".into(), namespace: "default".into(), name: n.into() };
        assert_eq!((q.src_identity, q.dst_identity, q.protocol, q.port, q.local), (300, 301, 6, 80, Ipv4Addr::new(10, 0, 1, 3).into()));
        if q.egress { crate::names::Attribution::default() } else { crate::names::Attribution { allowed_by: vec![p("allow-b")], denied_by: vec![] } }
    }
}

#[test]
fn policy_verdicts_name_the_policies_behind_them() {
    let mut n = names();
    n.policies = Some(std::sync::Arc::new(FakePolicies));
    let mut e = ev("policy-verdict", [10, 0, 1, 2], [10, 0, 1, 3], true);
    e.action = Some("allow".into());
    let f = Parser::default().flow(&e, &n);
    assert_eq!(f.ingress_allowed_by.len(), 1);
    assert_eq!((f.ingress_allowed_by[0].name.as_str(), f.ingress_allowed_by[0].kind.as_str()), ("allow-b", "CiliumNetworkPolicy"));
    assert!(f.egress_allowed_by.is_empty() && f.ingress_denied_by.is_empty());
    // traces are not attributed
    let mut t = ev("trace", [10, 0, 1, 2], [10, 0, 1, 3], true);
    t.observation_point = Some("to-endpoint".into());
    assert!(Parser::default().flow(&t, &n).ingress_allowed_by.is_empty());
}

#[test]
fn ipv6_flows_name_pods_by_their_ipv6_address_and_bracket_ports() {
    let a6: std::net::Ipv6Addr = "fd00:10:1::2".parse().unwrap();
    let mut n = names();
    let frontend = n.endpoints[&std::net::IpAddr::from(Ipv4Addr::new(10, 0, 1, 2))].clone();
    n.endpoints.insert(a6.into(), frontend);
    let mut e = ev("drop", [0; 4], [0; 4], true);
    e.drop_reason = Some((133, "Policy denied".into()));
    e.src_identity = 300;
    e.dst_identity = 10;
    let world6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    if let Some(p) = e.packet.as_mut() {
        p.src = a6.into();
        p.dst = world6.into();
    }
    e.ingress = false;
    let f = Parser::default().flow(&e, &n);
    let ip = f.ip.as_ref().unwrap();
    assert_eq!((ip.source.as_str(), ip.destination.as_str(), ip.ip_version), ("fd00:10:1::2", "2001:db8::1", IpVersion::IPv6 as i32));
    assert_eq!(f.source.as_ref().unwrap().pod_name, "frontend");
    assert_eq!(f.destination.as_ref().unwrap().labels, vec!["reserved:world".to_string(), "reserved:world-ipv6".to_string()]);
    let line = compact(&f);
    assert!(line.contains("default/frontend:43210 (ID:300) -> [2001:db8::1]:80 (world)"), "{line}");
}

fn l7_meta(response: bool) -> L7Meta {
    L7Meta {
        time_ns: 1_700_000_000_123_000_000,
        client: "10.0.1.2:40000".parse().unwrap(),
        server: "10.96.0.10:80".parse().unwrap(),
        client_identity: 300,
        server_identity: 301,
        ingress: true,
        response,
        denied: false,
        latency_ns: if response { 2_000_000 } else { 0 },
    }
}

/// An L7 flow keeps the names of when it was reported, however late it is
/// read; a response goes from the server to the client.
#[test]
fn l7_flows_are_named_when_reported_and_built_when_read() {
    let p = Parser::default();
    let mut n = names();
    let req = HttpRecord { meta: l7_meta(false), method: "GET".into(), url: "http://backend/api".into(), protocol: "HTTP/1.1".into(), code: 0, headers: vec![("Host".into(), "backend".into())] };
    let resp = HttpRecord { meta: l7_meta(true), code: 200, headers: vec![], ..req.clone() };
    let (a, b) = (p.http_flow(req, &n), p.http_flow(resp, &n));
    // the pod is renamed before anyone reads the flows
    n.endpoints.get_mut(&IpAddr::from(Ipv4Addr::new(10, 0, 1, 2))).unwrap().pod_name = "renamed".into();
    let ring = crate::ring::Ring::new(4);
    ring.push_l7(a);
    ring.push_l7(b);
    let (flows, _) = ring.snapshot();
    let (req, resp) = (&flows[0], &flows[1]);
    assert_eq!(req.source.as_ref().unwrap().pod_name, "frontend");
    assert_eq!(req.destination_service.as_ref().unwrap().name, "backend");
    assert_eq!(resp.source_service.as_ref().unwrap().name, "backend");
    assert_eq!(resp.destination.as_ref().unwrap().pod_name, "frontend");
    assert_eq!(resp.ip.as_ref().unwrap().source, "10.96.0.10");
    assert_ne!(req.uuid, resp.uuid);
    #[allow(deprecated)]
    {
        assert_eq!(req.summary, "HTTP/1.1 GET http://backend/api");
        assert!(resp.reply);
    }
    match &resp.l7.as_ref().unwrap().record {
        Some(pb::layer7::Record::Http(h)) => assert_eq!((h.code, h.method.as_str()), (200, "GET")),
        other => panic!("{other:?}"),
    }
    // each read builds the same flow
    assert_eq!(&ring.snapshot().0[1], resp);
    assert_eq!(ring.count_since(0), (2, 2));
    assert_eq!(ring.count_since(1_700_000_000_123_000_001), (2, 0));
}

/// The metrics count an L7 record exactly as they count the flow built
/// from it, each series as often as it was seen.
#[test]
fn l7_metrics_from_the_record_match_the_built_flow() {
    let p = Parser::default();
    let n = names();
    let resp = |code: u32| HttpRecord { meta: l7_meta(true), method: "GET".into(), url: "http://b/".into(), protocol: "HTTP/1.1".into(), code, headers: vec![] };
    let records = [
        p.http_flow(resp(403), &n),
        p.http_flow(resp(403), &n),
        p.http_flow(resp(200), &n),
        p.http_flow(HttpRecord { meta: L7Meta { denied: true, ..l7_meta(false) }, method: "POST".into(), url: "http://b/".into(), protocol: "HTTP/1.1".into(), code: 0, headers: vec![] }, &n),
        p.dns_flow(DnsRecord { meta: L7Meta { ingress: false, ..l7_meta(true) }, query: "a.example".into(), qtypes: vec!["A".into()], rcode: 0, ips: vec!["1.2.3.4".into()], ttl: 60, cnames: vec![] }, &n),
        p.kafka_flow(KafkaRecord { meta: l7_meta(false), api_key: "produce".into(), api_version: 3, correlation_id: 1, topic: "t".into(), error_code: 29 }, &n),
    ];
    let families = ["flow", "drop", "dns", "http", "kafka"].map(String::from);
    let (mut ra, mut rb) = (prometheus_client::registry::Registry::default(), prometheus_client::registry::Registry::default());
    let (a, b) = (crate::metrics::Metrics::register(&mut ra, &families).unwrap(), crate::metrics::Metrics::register(&mut rb, &families).unwrap());
    for r in records {
        a.observe_l7(&r.view());
        b.observe(&r.build());
    }
    let text = |reg: &prometheus_client::registry::Registry| {
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, reg).unwrap();
        t
    };
    let (ta, tb) = (text(&ra), text(&rb));
    assert!(ta.contains(r#"hubble_http_responses_total{method="GET",protocol="HTTP/1.1",status="403",reporter="server"} 2"#), "{ta}");
    assert!(ta.contains(r#"hubble_http_responses_total{method="GET",protocol="HTTP/1.1",status="200",reporter="server"} 1"#), "{ta}");
    assert!(ta.contains(r#"hubble_http_request_duration_seconds_count{method="GET",protocol="HTTP/1.1",status="403",reporter="server"} 2"#), "{ta}");
    assert!(ta.contains(r#"hubble_flows_processed_total{protocol="HTTP",subtype="",type="L7",verdict="FORWARDED"} 3"#), "{ta}");
    assert!(ta.contains(r#"hubble_http_requests_total{method="POST",protocol="HTTP/1.1",status="",reporter="server"} 1"#), "{ta}");
    assert!(ta.contains(r#"hubble_drop_total{reason="DROP_REASON_UNKNOWN",protocol="TCP"} 1"#), "{ta}");
    assert!(ta.contains(r#"protocol="DNS""#), "{ta}");
    // the same series (a family's order of series is its hash map's)
    let sorted = |t: &str| {
        let mut v: Vec<&str> = t.lines().collect();
        v.sort();
        v.join("\n")
    };
    assert_eq!(sorted(&ta), sorted(&tb));
}
