use super::*;
use crate::proto::flow::{self as pb, Verdict};

fn flow(src_pod: &str, dst_pod: &str, verdict: Verdict, dport: u32) -> Flow {
    Flow {
        verdict: verdict as i32,
        ip: Some(pb::Ip {
            source: "10.0.1.2".into(),
            destination: "10.0.1.3".into(),
            ..Default::default()
        }),
        l4: Some(pb::Layer4 {
            protocol: Some(layer4::Protocol::Tcp(pb::Tcp {
                source_port: 40000,
                destination_port: dport,
                flags: Some(pb::TcpFlags {
                    syn: true,
                    ..Default::default()
                }),
            })),
        }),
        source: Some(Endpoint {
            namespace: "prod".into(),
            pod_name: src_pod.into(),
            identity: 300,
            labels: vec!["k8s:app=frontend".into(), "k8s:tier=web".into()],
            ..Default::default()
        }),
        destination: Some(Endpoint {
            namespace: "prod".into(),
            pod_name: dst_pod.into(),
            identity: 301,
            labels: vec!["k8s:app=backend".into()],
            ..Default::default()
        }),
        node_name: "kind-worker".into(),
        is_reply: Some(pbjson_types::BoolValue { value: false }),
        ..Default::default()
    }
}

#[test]
fn fields_in_a_filter_and_filters_in_a_list_or() {
    let f = flow("frontend-1", "backend-1", Verdict::Dropped, 80);
    let both = FlowFilter {
        source_pod: vec!["prod/frontend".into()],
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    };
    assert!(Filters::new(&[both.clone()], &[]).unwrap().matches(&f));
    let wrong_verdict = FlowFilter {
        source_pod: vec!["prod/frontend".into()],
        verdict: vec![Verdict::Forwarded as i32],
        ..Default::default()
    };
    assert!(
        !Filters::new(&[wrong_verdict.clone()], &[])
            .unwrap()
            .matches(&f)
    );
    // OR across the list
    assert!(
        Filters::new(&[wrong_verdict, both.clone()], &[])
            .unwrap()
            .matches(&f)
    );
    // OR within a field
    let either = FlowFilter {
        verdict: vec![Verdict::Forwarded as i32, Verdict::Dropped as i32],
        ..Default::default()
    };
    assert!(Filters::new(&[either], &[]).unwrap().matches(&f));
    // blacklist wins
    assert!(!Filters::new(&[], &[both]).unwrap().matches(&f));
    assert!(Filters::new(&[], &[]).unwrap().matches(&f));
}

#[test]
fn pods_namespaces_labels_ips_ports_and_flags() {
    let f = flow("frontend-1", "backend-1", Verdict::Forwarded, 80);
    let m = |ff: FlowFilter| Compiled::new(&ff).unwrap().matches(&f);
    assert!(m(FlowFilter {
        destination_pod: vec!["prod/".into()],
        ..Default::default()
    }));
    assert!(!m(FlowFilter {
        destination_pod: vec!["default/".into()],
        ..Default::default()
    }));
    assert!(
        !m(FlowFilter {
            source_pod: vec!["frontend".into()],
            ..Default::default()
        }),
        "a bare pod means the default namespace"
    );
    assert!(m(FlowFilter {
        source_label: vec!["app=frontend,tier in (web, api)".into()],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        source_label: vec!["k8s:app=frontend".into()],
        ..Default::default()
    }));
    assert!(!m(FlowFilter {
        source_label: vec!["app=frontend,!tier".into()],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        destination_label: vec!["app notin (db)".into()],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        source_ip: vec!["10.0.0.0/16".into()],
        ..Default::default()
    }));
    assert!(!m(FlowFilter {
        destination_ip: vec!["10.0.1.2".into()],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        destination_port: vec!["80".into()],
        protocol: vec!["TCP".into()],
        ..Default::default()
    }));
    assert!(!m(FlowFilter {
        protocol: vec!["udp".into()],
        ..Default::default()
    }));
    assert!(
        !m(FlowFilter {
            protocol: vec!["http".into()],
            ..Default::default()
        }),
        "L4 flows are not http"
    );
    assert!(m(FlowFilter {
        tcp_flags: vec![pb::TcpFlags {
            syn: true,
            ..Default::default()
        }],
        ..Default::default()
    }));
    assert!(!m(FlowFilter {
        tcp_flags: vec![pb::TcpFlags {
            syn: true,
            ack: true,
            ..Default::default()
        }],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        source_identity: vec![300],
        destination_identity: vec![301],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        node_name: vec!["kind-*".into()],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        node_name: vec!["default/kind-worker".into()],
        ..Default::default()
    }));
    assert!(m(FlowFilter {
        reply: vec![false],
        ..Default::default()
    }));
}

#[test]
fn http_fields_match_only_l7_flows() {
    let mut f = flow("a", "b", Verdict::Forwarded, 80);
    let ff = FlowFilter {
        http_method: vec!["get".into()],
        http_path: vec!["/public/.*".into()],
        http_status_code: vec!["2+".into()],
        ..Default::default()
    };
    assert!(!Compiled::new(&ff).unwrap().matches(&f));
    f.l7 = Some(pb::Layer7 {
        r#type: 2,
        latency_ns: 0,
        record: Some(pb::layer7::Record::Http(pb::Http {
            code: 200,
            method: "GET".into(),
            url: "http://backend/public/x?y=1".into(),
            protocol: "HTTP/1.1".into(),
            headers: vec![],
        })),
    });
    assert!(Compiled::new(&ff).unwrap().matches(&f));
    assert!(
        Compiled::new(&FlowFilter {
            protocol: vec!["http".into()],
            ..Default::default()
        })
        .unwrap()
        .matches(&f)
    );
}

#[test]
fn bad_values_name_the_field() {
    let e = Compiled::new(&FlowFilter {
        source_ip: vec!["10.0.0.300".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!((e.field, e.value.as_str()), ("source_ip", "10.0.0.300"));
    let e = Compiled::new(&FlowFilter {
        destination_port: vec!["http".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "destination_port");
    let e = Compiled::new(&FlowFilter {
        protocol: vec!["gopher".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "protocol");
    let e = Compiled::new(&FlowFilter {
        http_status_code: vec!["9+".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "http_status_code");
    let e = Compiled::new(&FlowFilter {
        source_label: vec!["app in a,b".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "source_label");
}
