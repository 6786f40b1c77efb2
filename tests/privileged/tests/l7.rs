//! L7 (HTTP) policy end to end: real curl in lab pods, the datapath handing
//! connections to the agent's transparent proxy, requests allowed or denied
//! by method, path, host and headers, and the flows Hubble records of them.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use cilium_privileged_tests::lab::{TestLab, bin_dir};
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: other}}
spec: {containers: [{name: c}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server}
spec:
  replicas: 1
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec: {containers: [{name: s, ports: [{containerPort: 80, name: http}, {containerPort: 8080}]}]}
"#;

/// The server accepts the client only; on port 80 through HTTP rules, on
/// 8080 at L4 only.
const SERVER_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-l7}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
        - {method: POST, path: /api/v1/users, headers: [X-API-Key]}
        - {method: POST, path: /upload}
        - method: PUT
          path: /token
          headerMatches: [{name: X-Token, value: ok, mismatch: REPLACE}]
    - ports: [{port: "8080", protocol: TCP}]
"#;

fn curl(lab: &TestLab, from: &str, args: &[&str]) -> (String, String) {
    let mut a = vec!["exec", from, "--", "curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = lab.lab_output(&a);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (code.trim().to_string(), body.to_string())
}

fn hubble_flows(lab: &TestLab, args: &[&str]) -> Vec<Value> {
    let server = format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name);
    let mut a = vec!["observe", "--server", &server, "-o", "json", "--all"];
    a.extend_from_slice(args);
    let out = Command::new(bin_dir().join("hubble")).args(&a).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v.get("flow").cloned()).collect()
}

#[test]
fn http_rules_allow_and_deny_requests_and_hubble_sees_them() {
    let lab = TestLab::up(&[PODS, SERVER_POLICY]);
    let ip = lab.pod_ip("server");
    let url = |p: &str| format!("http://{ip}{p}");

    let (code, body) = curl(&lab, "default/client", &[&url("/public/books?page=1")]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("pod=default/server-") && body.contains("GET /public/books?page=1"), "{body}");
    let (code, body) = curl(&lab, "default/client", &[&url("/private")]);
    assert_eq!((code.as_str(), body.as_str()), ("403", "Access denied\r\n"));
    let (code, _) = curl(&lab, "default/client", &["-X", "DELETE", &url("/public/x")]);
    assert_eq!(code, "403", "the method is part of the rule");
    // headers: presence
    let (code, _) = curl(&lab, "default/client", &["-X", "POST", "-H", "X-API-Key: k", "-d", "{}", &url("/api/v1/users")]);
    assert_eq!(code, "200");
    let (code, _) = curl(&lab, "default/client", &["-X", "POST", "-d", "{}", &url("/api/v1/users")]);
    assert_eq!(code, "403");
    // headerMatches with REPLACE: allowed, and the server sees the policy's value
    let (code, body) = curl(&lab, "default/client", &["-X", "PUT", "-H", "X-Token: bad", &url("/token")]);
    assert_eq!(code, "200");
    assert!(body.contains("x-token=ok"), "{body}");
    // a body streamed through (2 MB)
    let big = lab.write("big.bin", &"x".repeat(2 << 20));
    let (code, body) = curl(&lab, "default/client", &["-X", "POST", "--data-binary", &format!("@{}", big.display()), &url("/upload")]);
    assert_eq!(code, "200");
    assert!(body.contains(&format!("body={}", 2 << 20)), "{body}");
    // keep-alive: an allowed and a denied request on one connection
    let out = lab.lab_output(&["exec", "default/client", "--", "curl", "-s", "-m", "5", "-w", "%{http_code} %{num_connects}\n", "-o", "/dev/null", &url("/public/a"), "-o", "/dev/null", &url("/nope")]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, vec!["200 1", "403 0"], "the second request reused the connection");
    // port 8080 is L4 only: any request
    let (code, _) = curl(&lab, "default/client", &["-X", "DELETE", &format!("http://{ip}:8080/anything")]);
    assert_eq!(code, "200");
    // L3/L4 still applies: the other pod is not allowed at all
    let (code, _) = curl(&lab, "default/other", &["-m", "2", &url("/public/x")]);
    assert_eq!(code, "000");

    // Hubble: L7 flows with method, URL, status and verdict
    let deadline = Instant::now() + Duration::from_secs(10);
    let flows = loop {
        let f = hubble_flows(&lab, &["--protocol", "http"]);
        if f.iter().any(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/private"))) || Instant::now() > deadline {
            break f;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let req = flows.iter().find(|f| f["l7"]["type"] == "REQUEST" && f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/public/books?page=1"))).expect("the allowed request");
    assert_eq!(req["verdict"], "FORWARDED");
    assert_eq!(req["l7"]["http"]["method"], "GET");
    assert_eq!(req["source"]["pod_name"], "client");
    assert!(req["destination"]["pod_name"].as_str().unwrap().starts_with("server-"));
    assert_eq!(req["traffic_direction"], "INGRESS");
    assert_eq!(req["Type"], "L7");
    let resp = flows.iter().find(|f| f["l7"]["type"] == "RESPONSE" && f["l7"]["http"]["code"] == 200).expect("a response");
    assert_eq!(resp["is_reply"], true);
    let denied = flows.iter().find(|f| f["l7"]["type"] == "REQUEST" && f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/private"))).expect("the denied request");
    assert_eq!(denied["verdict"], "DROPPED");
    let f403 = hubble_flows(&lab, &["--http-status", "403"]);
    assert!(!f403.is_empty() && f403.iter().all(|f| f["l7"]["http"]["code"] == 403));
    let l7 = hubble_flows(&lab, &["--type", "l7", "--http-method", "POST"]);
    assert!(!l7.is_empty() && l7.iter().all(|f| f["l7"]["http"]["method"] == "POST"));
    let server = format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name);
    let out = Command::new(bin_dir().join("hubble")).args(["observe", "--server", &server, "--all", "--protocol", "http", "--http-path", "/private"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("http-request DROPPED (HTTP/1.1 GET http://") && l.contains("/private)")), "{text}");
}

#[test]
fn pipelined_requests_get_answers_in_order() {
    let lab = TestLab::up(&[PODS, SERVER_POLICY]);
    let ip = lab.pod_ip("server");
    let mut s = lab.connect_from("default/client", SocketAddr::from((ip, 80))).expect("connect through the proxy");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /public/1 HTTP/1.1\r\nHost: s\r\n\r\nGET /secret HTTP/1.1\r\nHost: s\r\n\r\nGET /public/3 HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let codes: Vec<&str> = all.lines().filter(|l| l.starts_with("HTTP/1.1 ")).map(|l| &l[9..12]).collect();
    assert_eq!(codes, vec!["200", "403", "200"], "{all}");
    let first = all.find("/public/1").unwrap();
    let third = all.find("/public/3").unwrap();
    assert!(first < third);
}

/// The client may GET /allowed from the world, nothing else.
const CLIENT_EGRESS: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: /allowed}]
"#;

#[test]
fn egress_http_rules_to_the_world() {
    let lab = TestLab::up(&[PODS, CLIENT_EGRESS]);
    let (code, body) = curl(&lab, "default/client", &["http://203.0.113.10/allowed"]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("pod=world"), "{body}");
    let (code, body) = curl(&lab, "default/client", &["http://203.0.113.10/other"]);
    assert_eq!((code.as_str(), body.as_str()), ("403", "Access denied\r\n"));
    // the other pod has no policy: untouched, not proxied
    let (code, _) = curl(&lab, "default/other", &["http://203.0.113.10/other"]);
    assert_eq!(code, "200");
    let flows = hubble_flows(&lab, &["--protocol", "http", "--from-pod", "default/client"]);
    assert!(flows.iter().any(|f| f["traffic_direction"] == "EGRESS" && f["verdict"] == "DROPPED"), "{flows:#?}");
}

/// The proxy's connections on behalf of a pod leave from the node's address,
/// but they are the pod's: a host firewall denying the node's own traffic to
/// the world lets them (and their replies) through.
#[test]
fn proxied_pod_traffic_is_not_the_nodes_for_the_host_firewall() {
    let host = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: nodes-stay-inside}
spec:
  nodeSelector: {}
  egress: [{toEntities: [cluster]}]
  ingress: [{fromEntities: [cluster]}]
"#;
    let lab = TestLab::create(&[PODS, CLIENT_EGRESS, host], &["--enable-host-firewall"], &[]);
    assert!(!lab.probe("node1", "203.0.113.10", 80, "tcp"), "the node itself may not reach the world");
    let (code, body) = curl(&lab, "default/client", &["http://203.0.113.10/allowed"]);
    assert_eq!(code, "200", "the client's request, through the proxy: {body}");
    let (code, body) = curl(&lab, "default/client", &["http://203.0.113.10/other"]);
    assert_eq!((code.as_str(), body.as_str()), ("403", "Access denied\r\n"));
}

#[test]
fn l7_policy_survives_an_agent_restart_and_follows_policy_changes() {
    let lab = TestLab::up(&[PODS, SERVER_POLICY]);
    let ip = lab.pod_ip("server");
    let url = |p: &str| format!("http://{ip}{p}");
    assert_eq!(curl(&lab, "default/client", &[&url("/public/x")]).0, "200");
    lab.lab(&["agent", "restart"]);
    assert_eq!(curl(&lab, "default/client", &[&url("/public/x")]).0, "200");
    assert_eq!(curl(&lab, "default/client", &[&url("/private")]).0, "403");
    // a policy change applies to new requests
    lab.apply(&SERVER_POLICY.replace("/public/.*", "/open/.*"));
    assert_eq!(curl(&lab, "default/client", &[&url("/public/x")]).0, "403");
    assert_eq!(curl(&lab, "default/client", &[&url("/open/x")]).0, "200");
    // and the trace explains it
    let t = lab.cilium_ok(&["policy", "trace", "--src-k8s-pod", "default:client", "--dst-k8s-pod", &format!("default:{}", lab.pod("server").split('/').nth(1).unwrap()), "--dport", "80/TCP"]);
    assert!(t.contains("HTTP rules") && t.contains("ALLOWED"), "{t}");
    // with an HTTP request: each rule says whether it matches
    let server = format!("default:{}", lab.pod("server").split('/').nth(1).unwrap());
    let t = lab.cilium_ok(&["policy", "trace", "--src-k8s-pod", "default:client", "--dst-k8s-pod", &server, "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/open/x"]);
    assert!(t.contains("path /open/.* MATCHES") && t.contains("Final verdict with the HTTP request: ALLOWED"), "{t}");
    let out = lab.cilium(&["policy", "trace", "--src-k8s-pod", "default:client", "--dst-k8s-pod", &server, "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/public/x"]);
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a denied request is a DENIED trace");
    assert!(t.contains("does not match") && t.contains("403 Access denied") && t.contains("Final verdict with the HTTP request: DENIED"), "{t}");
}

const SEED_004_BOOKSTORE: &str = include_str!("../../../examples/seed-004/bookstore.yaml");
const SEED_004_POLICY: &str = include_str!("../../../examples/seed-004/storefront-policy.yaml");

/// Seed 004's storefront → catalog policy, through the catalog Service. As in
/// Cilium (and unlike the seed's wording), denied requests get 403 "Access
/// denied" rather than a refused or hanging connection, and Hubble reports
/// them as L7 flows with verdict DROPPED.
#[test]
fn seed_004_storefront_reads_the_catalog_only() {
    let lab = TestLab::up(&[SEED_004_BOOKSTORE, SEED_004_POLICY]);
    let svcs = lab.cilium_ok(&["service", "list"]);
    let cluster_ip = svcs.lines().find(|l| l.contains(":8080") && l.contains("ClusterIP")).and_then(|l| l.split_whitespace().nth(1)).and_then(|f| f.split('/').next()).expect("catalog's ClusterIP").to_string();
    let base = format!("http://{cluster_ip}");
    let get = |p: &str| curl(&lab, "bookstore/debug", &[&format!("{base}{p}")]);
    assert_eq!(get("/api/books").0, "200");
    assert_eq!(get("/api/books/123").0, "200");
    assert_eq!(get("/api/admin/users"), ("403".to_string(), "Access denied\r\n".to_string()));
    assert_eq!(curl(&lab, "bookstore/debug", &["--data", "...", &format!("{base}/api/books")]).0, "403");
    let relay = serde_json::from_slice::<Value>(&std::fs::read(format!("/var/run/cilium-lab/{}/lab.json", lab.name)).unwrap()).unwrap()["relay_address"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(bin_dir().join("hubble")).args(["observe", "--server", &relay, "--namespace", "bookstore", "--verdict", "DROPPED", "--all"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.lines().any(|l| l.contains("bookstore/debug:") && l.contains("http-request DROPPED (HTTP/1.1 POST http://") && l.contains("/api/books)")) {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Seed 002's allow-specific-api: GET /api/v1/public/.* and POST
/// /api/v1/users with the header `X-API-Key: required` (an exact value).
#[test]
fn seed_002_api_rules() {
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: frontend, labels: {app: frontend}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, labels: {app: backend-api}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-specific-api
spec:
  endpointSelector:
    matchLabels:
      app: backend-api
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: /api/v1/public/.*
        - method: POST
          path: /api/v1/users
          headers:
          - "X-API-Key: required"
"#;
    let lab = TestLab::up(&[pods, policy]);
    let u = |p: &str| format!("http://{}:8080{p}", lab.pod_ip("backend-api"));
    assert_eq!(curl(&lab, "default/frontend", &[&u("/api/v1/public/items")]).0, "200");
    assert_eq!(curl(&lab, "default/frontend", &[&u("/api/v1/private")]).0, "403");
    assert_eq!(curl(&lab, "default/frontend", &["-X", "POST", "-H", "X-API-Key: required", &u("/api/v1/users")]).0, "200");
    assert_eq!(curl(&lab, "default/frontend", &["-X", "POST", "-H", "X-API-Key: other", &u("/api/v1/users")]).0, "403");
    assert_eq!(curl(&lab, "default/frontend", &["-X", "POST", &u("/api/v1/users")]).0, "403");
}

/// gRPC over HTTP/2 (h2c): a real gRPC server (hubble-relay's Observer
/// service) in the server pod and a real gRPC client (the hubble CLI) in
/// the client pod; the policy allows one method by its path.
#[test]
fn grpc_methods_by_path() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: grpc}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /observer.Observer/ServerStatus}
"#;
    let lab = TestLab::up(&[PODS, policy]);
    let ip = lab.pod_ip("server");
    let server = lab.pod("server");
    let relay = bin_dir().join("hubble-relay");
    // a gRPC server in the server pod (it ends with the pod's namespace)
    let mut child = Command::new(bin_dir().join("cilium"))
        .args(["lab", "exec", "--name", &lab.name, &server, "--", relay.to_str().unwrap(), "serve", "--listen-address", &format!("{ip}:50051")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hubble = bin_dir().join("hubble");
    let call = |what: &[&str]| {
        let mut a = vec!["exec", "default/client", "--", hubble.to_str().unwrap()];
        a.extend_from_slice(what);
        let server = format!("{ip}:50051");
        a.extend_from_slice(&["--server", &server, "--timeout", "2s"]);
        lab.lab_output(&a)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let o = call(&["status"]);
        if o.status.success() || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.status.success(), "ServerStatus is allowed: {}", String::from_utf8_lossy(&status.stderr));
    assert!(String::from_utf8_lossy(&status.stdout).contains("Healthcheck"));
    let nodes = call(&["list", "nodes"]);
    assert!(!nodes.status.success(), "GetNodes is not allowed");
    let err = String::from_utf8_lossy(&nodes.stderr).to_lowercase();
    assert!(err.contains("403") || err.contains("forbidden") || err.contains("permission"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
    let flows = hubble_flows(&lab, &["--protocol", "http", "--http-path", "/observer.Observer/.*"]);
    assert!(flows.iter().any(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/observer.Observer/GetNodes")) && f["verdict"] == "DROPPED" && f["l7"]["http"]["protocol"] == "HTTP/2"), "{flows:#?}");
}

/// One request on an open connection; returns the status and the body.
fn exchange(s: &mut std::net::TcpStream, path: &str) -> (u16, String) {
    use std::io::{BufRead, BufReader};
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: server\r\n\r\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).expect("a status line");
    let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Upstream resets proxied connections when its proxy restarts (cilium
/// #12308). Here an idle keep-alive connection through the proxy carries on
/// across an agent restart, still under the L7 rules.
#[test]
fn idle_proxied_connections_survive_an_agent_restart() {
    let lab = TestLab::up(&[PODS, SERVER_POLICY]);
    let ip = lab.pod_ip("server");
    let mut s = lab.connect_from("default/client", SocketAddr::from((ip, 80))).expect("connect");
    let (code, body) = exchange(&mut s, "/public/before");
    assert_eq!(code, 200, "{body}");
    lab.lab(&["agent", "restart"]);
    let (code, body) = exchange(&mut s, "/public/after");
    assert_eq!(code, 200, "the same connection after the restart: {body}");
    assert!(body.contains("/public/after"));
    assert_eq!(exchange(&mut s, "/private").0, 403, "still under the rules");
    // and a second restart, with the connection still open
    lab.lab(&["agent", "restart"]);
    assert_eq!(exchange(&mut s, "/public/again").0, 200);
    // a policy change applies to the next request of the open connection
    lab.apply(&SERVER_POLICY.replace("/public/.*", "/open/.*"));
    assert_eq!(exchange(&mut s, "/public/again").0, 403);
    assert_eq!(exchange(&mut s, "/open/now").0, 200);
    lab.apply(SERVER_POLICY);
    // new connections work too
    assert_eq!(curl(&lab, "default/client", &[&format!("http://{ip}/public/new")]).0, "200");
}

const SEED_003_WORKLOADS: &str = include_str!("../../../examples/seed-003/workloads.yaml");
const SEED_003_POLICY: &str = include_str!("../../../examples/seed-003/network-policy.yaml");

/// Seed 003's api-server policy as written: HTTP rules for the frontend,
/// egress only to postgres and (through the DNS proxy) kube-dns.
#[test]
fn seed_003_api_server_policy() {
    let lab = TestLab::up(&[SEED_003_WORKLOADS, SEED_003_POLICY]);
    let pods = lab.pods();
    let ip_of = |name: &str| pods.iter().find(|p| p["name"] == name).and_then(|p| p["ip"].as_str()).unwrap().to_string();
    let (api, dns, db) = (ip_of("api-server"), ip_of("coredns"), ip_of("postgres"));
    let u = |p: &str| format!("http://{api}:8080{p}");
    assert_eq!(curl(&lab, "production/frontend", &[&u("/api/v1/products")]).0, "200");
    assert_eq!(curl(&lab, "production/frontend", &["-X", "POST", "-d", "{}", &u("/api/v1/orders")]).0, "200");
    assert_eq!(curl(&lab, "production/frontend", &["-X", "DELETE", &u("/api/v1/orders")]).0, "403");
    assert_eq!(curl(&lab, "production/frontend", &[&u("/admin")]).0, "403");
    // egress: postgres yes, the world no
    assert!(lab.probe("production/api-server", &format!("{db}"), 5432, "tcp"));
    assert!(!lab.probe("production/api-server", "203.0.113.10", 80, "tcp"));
    // DNS through the proxy (matchPattern "*": every name)
    let out = lab.lab_output(&[
        "exec", "kube-system/coredns", "--", "dnsmasq", "--port=53", "--no-resolv", "--no-hosts", "--bind-interfaces",
        &format!("--listen-address={dns}"), "--address=/db.production.example/10.0.1.99", "--pid-file=", "--user=root",
    ]);
    assert!(out.status.success(), "dnsmasq: {}", String::from_utf8_lossy(&out.stderr));
    let mut answer = String::new();
    for _ in 0..20 {
        let o = lab.lab_output(&["exec", "production/api-server", "--", "dig", "+short", "+time=1", "+tries=1", &format!("@{dns}"), "db.production.example", "A"]);
        answer = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if answer == "10.0.1.99" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answer, "10.0.1.99");
    let flows = hubble_flows(&lab, &["--protocol", "dns", "--from-pod", "production/api-server"]);
    assert!(flows.iter().any(|f| f["l7"]["dns"]["query"] == "db.production.example."), "{flows:#?}");
}

/// L7 ingress rules for clients that are not pods: the world reaches the
/// server through the node's device, where its connection is handed to the
/// proxy; the node itself and NodePort flows reach it through the node's
/// stack, and their packets are turned back into the endpoint device's
/// ingress for the proxy. (With allow-localhost=always, the default, the
/// host is allowed whole at L3 and no L7 rule applies to it.)
#[test]
fn http_rules_for_clients_outside_the_node() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-world}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [world, host]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public/.*"}]
---
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  type: NodePort
  selector: {app: server}
  ports: [{port: 80, nodePort: 30080}]
"#;
    // the host judged by policy, not allowed whole by allow-localhost
    let lab = TestLab::up_with(&[PODS, policy], &["--allow-localhost=policy"]);
    for (from, to) in [("node1", SocketAddr::from((lab.pod_ip("server"), 80))), ("world", "172.30.0.11:30080".parse().unwrap())] {
        let mut s = lab.connect_from(from, to).unwrap_or_else(|e| panic!("{from} connects to {to}: {e}"));
        let (code, body) = exchange(&mut s, "/public/x");
        assert_eq!(code, 200, "{from} -> {to}: {body}");
        assert!(body.contains("pod=default/server-"), "{body}");
        assert_eq!(exchange(&mut s, "/private").0, 403, "{from} -> {to}: the HTTP rule applies");
        assert_eq!(exchange(&mut s, "/public/y").0, 200, "{from} -> {to}: and the connection goes on");
    }
    let ip = lab.pod_ip("server");
    let mut s = lab.connect_from("world", SocketAddr::from((ip, 80))).expect("the world connects");
    let (code, body) = exchange(&mut s, "/public/x");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("pod=default/server-"));
    assert_eq!(exchange(&mut s, "/private").0, 403);
    // the client pod is not the world: nothing allows it
    assert_eq!(curl(&lab, "default/client", &["-m", "2", &format!("http://{ip}/public/x")]).0, "000");
    let flows = hubble_flows(&lab, &["--protocol", "http", "--http-path", "/private"]);
    assert!(flows.iter().any(|f| f["verdict"] == "DROPPED" && f["traffic_direction"] == "INGRESS"), "{flows:#?}");
}
