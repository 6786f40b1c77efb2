//! DNS policy and toFQDNs end to end: a real DNS server (dnsmasq) in a
//! kube-dns pod, real resolvers (dig) and curl in a client pod, the DNS
//! proxy answering REFUSED for names the rules do not allow and teaching
//! the agent the addresses of the names they do, which `toFQDNs` then
//! allows — and keeps allowing across an agent restart.

use std::process::Command;
use std::time::{Duration, Instant};

use cilium_privileged_tests::lab::{TestLab, bin_dir};
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: dns}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
"#;

/// The client may ask kube-dns about *.example.com only, and reach
/// api.example.com on port 80.
const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

fn dig(lab: &TestLab, server: &str, name: &str) -> String {
    let o = lab.lab_output(&["exec", "default/client", "--", "dig", "+time=2", "+tries=1", &format!("@{server}"), name, "A"]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn curl_code(lab: &TestLab, url: &str) -> String {
    let o = lab.lab_output(&["exec", "default/client", "--", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", url]);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn dns_rules_refuse_names_and_to_fqdns_follows_the_answers() {
    let lab = TestLab::up(&[PODS, POLICY]);
    let dns = lab.pods().into_iter().find(|p| p["name"] == "coredns").and_then(|p| p["ip"].as_str().map(str::to_string)).expect("the dns pod's address");
    let out = lab.lab_output(&[
        "exec", "kube-system/coredns", "--", "dnsmasq", "--port=53", "--no-resolv", "--no-hosts", "--bind-interfaces",
        &format!("--listen-address={dns}"), "--address=/api.example.com/203.0.113.10", "--address=/other.example.com/172.30.0.1",
        "--address=/blocked.org/203.0.113.10", "--pid-file=", "--user=root",
    ]);
    assert!(out.status.success(), "dnsmasq: {}", String::from_utf8_lossy(&out.stderr));

    // nothing learned yet: the address is not allowed
    assert_eq!(curl_code(&lab, "http://203.0.113.10/"), "000");
    // an allowed name resolves through the proxy
    let mut answer = String::new();
    for _ in 0..20 {
        answer = dig(&lab, &dns, "api.example.com");
        if answer.contains("status: NOERROR") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answer.contains("status: NOERROR") && answer.contains("203.0.113.10"), "{answer}");
    // and toFQDNs now allows its address, at once
    assert_eq!(curl_code(&lab, "http://203.0.113.10/"), "200");
    // a name the DNS rules do not match is refused by the proxy
    let refused = dig(&lab, &dns, "blocked.org");
    assert!(refused.contains("status: REFUSED"), "{refused}");
    // DNS over TCP goes through the proxy too
    let o = lab.lab_output(&["exec", "default/client", "--", "dig", "+tcp", "+time=2", "+tries=1", &format!("@{dns}"), "api.example.com", "A"]);
    let tcp = String::from_utf8_lossy(&o.stdout);
    assert!(tcp.contains("status: NOERROR") && tcp.contains("203.0.113.10"), "{tcp}");
    let o = lab.lab_output(&["exec", "default/client", "--", "dig", "+tcp", "+time=2", "+tries=1", &format!("@{dns}"), "blocked.org", "A"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("status: REFUSED"));
    // allowed to resolve, but not named by toFQDNs: its address stays closed
    assert!(dig(&lab, &dns, "other.example.com").contains("172.30.0.1"));
    assert_eq!(curl_code(&lab, "http://172.30.0.1/"), "000");

    // the cache
    let list = lab.cilium_ok(&["fqdn", "cache", "list"]);
    assert!(list.lines().any(|l| l.starts_with("api.example.com.") && l.ends_with("203.0.113.10")), "{list}");
    let json: Vec<Value> = serde_json::from_str(&lab.cilium_ok(&["fqdn", "cache", "list", "-o", "json"])).unwrap();
    assert!(json.iter().any(|e| e["name"] == "other.example.com"));

    // Hubble: DNS flows, the refused query DROPPED
    let server = format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(bin_dir().join("hubble")).args(["observe", "--server", &server, "--all", "--protocol", "dns", "-o", "json"]).output().unwrap();
        let flows: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v.get("flow").cloned()).collect();
        let answered = flows.iter().any(|f| f["l7"]["type"] == "RESPONSE" && f["l7"]["dns"]["query"] == "api.example.com." && f["l7"]["dns"]["ips"][0] == "203.0.113.10");
        let dropped = flows.iter().any(|f| f["verdict"] == "DROPPED" && f["l7"]["dns"]["query"] == "blocked.org.");
        if answered && dropped {
            break;
        }
        assert!(Instant::now() < deadline, "{flows:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // a restart keeps what was learned
    lab.lab(&["agent", "restart"]);
    assert_eq!(curl_code(&lab, "http://203.0.113.10/"), "200");
    assert_eq!(curl_code(&lab, "http://172.30.0.1/"), "000");
}
