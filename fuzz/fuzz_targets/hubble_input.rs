//! Everything Hubble reads from outside: GetFlows requests as protobuf bytes
//! (from any gRPC client), FlowFilters as JSON (export allow/deny lists),
//! `hubble observe` arguments, and datapath events turned into flows and
//! printed. None may panic; a request either compiles or is refused, and a
//! compiled one can be run against stored flows.
#![no_main]
use std::sync::Arc;

use cilium_hubble::filter::Filters;
use cilium_hubble::printer::{Format, Options, format};
use cilium_hubble::proto::observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            let Ok(req) = GetFlowsRequest::decode(rest) else { return };
            let Ok(filters) = Filters::new(&req.whitelist, &req.blacklist) else { return };
            let flows: Vec<Arc<cilium_hubble::Flow>> = sample_flows().into_iter().map(Arc::new).collect();
            let picked = cilium_hubble::server::select_history(&flows, &req, &filters);
            assert!(picked.len() <= flows.len());
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let _ = cilium_hubble::export::parse_filters("allowlist", text);
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let args: Vec<String> = text.split('\0').map(str::to_string).collect();
            if let Ok(o) = cilium_hubble::observe::parse(&args, chrono::Utc::now()) {
                let _ = Filters::new(&o.request.whitelist, &o.request.blacklist);
            }
        }
        _ => {
            let Some((ev, capture)) = cilium_abi::Event::from_bytes(rest) else { return };
            let Some(m) = cilium_flow::MonitorEvent::from_event(&ev, capture, 0) else { return };
            let f = cilium_hubble::parser::Parser::default().flow(&m, &Default::default());
            let r = GetFlowsResponse { response_types: Some(ResponseTypes::Flow(f)), node_name: "n".into(), time: None };
            for fmt in [Format::Compact, Format::Dict, Format::Json, Format::Table] {
                let _ = format(&r, fmt, Options::default());
            }
        }
    }
});

fn sample_flows() -> Vec<cilium_hubble::Flow> {
    use cilium_hubble::proto::flow::{Endpoint, Ip, Layer4, Tcp, TcpFlags, layer4};
    (0..4u32)
        .map(|i| cilium_hubble::Flow {
            verdict: 1 + (i % 2) as i32,
            time: Some(pbjson_types::Timestamp { seconds: i64::from(i), nanos: 0 }),
            ip: Some(Ip { source: format!("10.0.1.{i}"), destination: "10.0.1.9".into(), ..Default::default() }),
            l4: Some(Layer4 { protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: 40000 + i, destination_port: 80, flags: Some(TcpFlags { syn: true, ..Default::default() }) })) }),
            source: Some(Endpoint { namespace: "default".into(), pod_name: format!("p{i}"), labels: vec!["k8s:app=a".into()], identity: 300 + i, ..Default::default() }),
            destination: Some(Endpoint { namespace: "prod".into(), pod_name: "db".into(), identity: 400, ..Default::default() }),
            ..Default::default()
        })
        .collect()
}
