//! Kafka policy end to end: a real Kafka client library (rskafka) in a lab
//! pod talks to a broker in another pod through the datapath's redirect to
//! the agent's Kafka proxy. No Kafka broker is installable here, so the
//! broker is the tests' own minimal one (kafka_broker.rs, built on the
//! kafka-protocol crate). Allowed requests reach it; denied ones are
//! answered with Kafka's authorization error and the connection carries
//! on; Hubble shows both.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use cilium_privileged_tests::kafka_broker;
use cilium_privileged_tests::lab::{TestLab, bin_dir};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: broker, labels: {app: broker}}
spec: {containers: [{name: k}]}
"#;

/// The client may produce to `orders`, look up metadata, and (as client
/// ID `auditor` only) fetch from `orders` — upstream's rule language.
const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka}
spec:
  endpointSelector: {matchLabels: {app: broker}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: orders}
        - {apiKey: metadata}
        - {apiKey: fetch, topic: orders, clientID: auditor}
"#;

const PORT: u16 = 9092;

/// Runs `f` on a runtime in a thread inside the pod's network namespace
/// (so the client's sockets are the pod's).
fn in_pod<T: Send + 'static>(lab: &TestLab, pod: &str, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    let ns = lab.netns(pod);
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&ns).expect("entering the pod's namespace");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move { tokio::time::timeout(Duration::from_secs(60), f()).await.expect("the Kafka client finished in time") })
    })
    .join()
    .expect("client thread")
}

fn record(v: &str) -> Record {
    Record { key: None, value: Some(v.as_bytes().to_vec()), headers: BTreeMap::new(), timestamp: chrono::Utc::now() }
}

async fn client(addr: String, id: &str) -> Client {
    let backoff = rskafka::BackoffConfig { deadline: Some(Duration::from_secs(10)), ..Default::default() };
    ClientBuilder::new(vec![addr]).client_id(id).backoff_config(backoff).build().await.expect("connecting to the broker")
}

fn hubble_kafka(lab: &TestLab) -> Vec<Value> {
    let server = format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name);
    let out = Command::new(bin_dir().join("hubble")).args(["observe", "--server", &server, "-o", "json", "--all", "--protocol", "kafka"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v.get("flow").cloned()).collect()
}

#[test]
fn kafka_rules_allow_and_deny_requests_of_a_real_client() {
    let lab = TestLab::up(&[PODS, POLICY]);
    let ip = lab.pod_ip("broker");
    kafka_broker::spawn(lab.netns(&lab.pod("broker")), SocketAddrV4::new(ip, PORT));
    let addr = format!("{ip}:{PORT}");
    let a = addr.clone();
    let (first, denied, again, fetch) = in_pod(&lab, &lab.pod("client"), async move || {
        let c = client(a, "producer").await;
        let orders = c.partition_client("orders", 0, UnknownTopicHandling::Error).await.expect("metadata for orders");
        let first = orders.produce(vec![record("hello")], Compression::NoCompression).await.map_err(|e| format!("{e:?}"));
        let payments = c.partition_client("payments", 0, UnknownTopicHandling::Error).await.expect("metadata for payments (metadata is allowed)");
        let denied = payments.produce(vec![record("card")], Compression::NoCompression).await.map_err(|e| format!("{e:?}"));
        let again = orders.produce(vec![record("world")], Compression::NoCompression).await.map_err(|e| format!("{e:?}"));
        let fetch = orders.fetch_records(0, 1..1_000_000, 100).await.map(|r| r.0.len()).map_err(|e| format!("{e:?}"));
        (first, denied, again, fetch)
    });
    assert_eq!(first, Ok(vec![0]), "producing to orders is allowed");
    let err = denied.expect_err("producing to payments is denied");
    assert!(err.contains("TopicAuthorizationFailed"), "the client sees Kafka's authorization error: {err}");
    assert_eq!(again, Ok(vec![1]), "the connection stays usable after a denied request");
    let err = fetch.expect_err("fetching needs client ID auditor");
    assert!(err.contains("TopicAuthorizationFailed"), "{err}");
    // the auditor reads what was produced
    let got = in_pod(&lab, &lab.pod("client"), async move || {
        let c = client(addr, "auditor").await;
        let orders = c.partition_client("orders", 0, UnknownTopicHandling::Error).await.expect("metadata");
        let (records, high_watermark) = orders.fetch_records(0, 1..1_000_000, 100).await.expect("the auditor may fetch");
        (records.into_iter().map(|r| String::from_utf8_lossy(&r.record.value.unwrap_or_default()).into_owned()).collect::<Vec<_>>(), high_watermark)
    });
    assert_eq!(got, (vec!["hello".to_string(), "world".to_string()], 2));
    let flows = hubble_kafka(&lab);
    let kafka = |f: &Value| f["l7"]["kafka"].clone();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED" && kafka(f)["topic"] == "payments" && kafka(f)["api_key"] == "produce" && kafka(f)["error_code"] == 29),
        "a denied produce: {flows:#?}"
    );
    assert!(flows.iter().any(|f| f["verdict"] == "FORWARDED" && kafka(f)["topic"] == "orders" && kafka(f)["api_key"] == "fetch" && f["traffic_direction"] == "INGRESS"), "the auditor's fetch: {flows:#?}");
    // the compact output names the request
    let server = format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name);
    let out = Command::new(bin_dir().join("hubble")).args(["observe", "--server", &server, "--all", "--protocol", "kafka", "--verdict", "DROPPED"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Kafka request produce") && text.contains("topic 'payments'"), "{text}");
    // and Hubble's kafka metrics count it
    let metrics = lab.lab(&["exec", "node1", "--", "curl", "-s", "http://127.0.0.1:9965/metrics"]);
    assert!(metrics.contains(r#"hubble_kafka_requests_total{topic="payments",api_key="produce",error_code="29",reporter="server"} 1"#), "{metrics}");
}

/// One ApiVersions exchange on an open connection (hand-encoded, so the
/// test sees the very same socket across the restart).
fn api_versions(s: &mut std::net::TcpStream, correlation_id: i32) -> std::io::Result<i16> {
    let v = 3;
    let mut b = BytesMut::new();
    let key = ApiKey::ApiVersions;
    RequestHeader::default().with_request_api_key(key as i16).with_request_api_version(v).with_correlation_id(correlation_id).with_client_id(Some(StrBytes::from_static_str("raw"))).encode(&mut b, key.request_header_version(v)).unwrap();
    ApiVersionsRequest::default().with_client_software_name(StrBytes::from_static_str("t")).with_client_software_version(StrBytes::from_static_str("1")).encode(&mut b, v).unwrap();
    let mut out = (b.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&b);
    s.write_all(&out)?;
    let mut size = [0u8; 4];
    s.read_exact(&mut size)?;
    let mut frame = vec![0u8; u32::from_be_bytes(size) as usize];
    s.read_exact(&mut frame)?;
    let mut r = bytes::Bytes::from(frame);
    let h = ResponseHeader::decode(&mut r, key.response_header_version(v)).unwrap();
    assert_eq!(h.correlation_id, correlation_id);
    Ok(ApiVersionsResponse::decode(&mut r, v).unwrap().error_code)
}

/// An idle Kafka connection through the proxy survives agent restarts and
/// stays under the rules (upstream's proxy resets it, #12308).
#[test]
fn idle_kafka_connections_survive_an_agent_restart() {
    let policy = POLICY.replace("role: produce, topic: orders", "apiKey: apiversions, clientID: raw");
    let lab = TestLab::up(&[PODS, &policy]);
    let ip = lab.pod_ip("broker");
    kafka_broker::spawn(lab.netns(&lab.pod("broker")), SocketAddrV4::new(ip, PORT));
    let mut s = lab.connect_from(&lab.pod("client"), SocketAddr::from((ip, PORT))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(api_versions(&mut s, 1).unwrap(), 0, "allowed before the restart");
    lab.lab(&["agent", "restart"]);
    assert_eq!(api_versions(&mut s, 2).expect("the same connection after the restart"), 0);
    lab.lab(&["agent", "restart"]);
    assert_eq!(api_versions(&mut s, 3).expect("and after a second one"), 0);
    // a policy change applies to the next request of the open connection
    lab.apply(&policy.replace("clientID: raw", "clientID: other"));
    assert_eq!(api_versions(&mut s, 4).unwrap(), 31, "CLUSTER_AUTHORIZATION_FAILED once the rule names another client");
    assert_eq!(api_versions(&mut s, 5).unwrap(), 31, "and the connection is still usable");
}
