//! IPv6 end to end: a dual-stack lab (`cilium lab up --ipv6`), pods with an
//! IPv4 and an IPv6 address, real TCP, UDP and ICMPv6 through the datapath,
//! and policies enforced on both families.

use std::process::Command;
use std::time::{Duration, Instant};

use cilium_privileged_tests::lab::{TestLab, bin_dir};
use serde_json::Value;

const ABC: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: a}}
spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: b}}
spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: c}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
"#;

const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-in}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: a}}]
    icmps: [{fields: [{type: EchoRequest, family: IPv6}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-out}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: b}}]
  - toCIDR: ["2001:db8:113::/48"]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c-out}
spec:
  endpointSelector: {matchLabels: {app: c}}
  egress:
  - toEntities: [world-ipv6]
"#;

#[test]
fn dual_stack_pods_under_policy() {
    let lab = TestLab::create(&[ABC], &[], &["--ipv6"]);
    let pods = lab.pods();
    let a = pods.iter().find(|p| p["name"] == "a").unwrap();
    assert!(a["ip"].as_str().unwrap().starts_with("10.0.1."), "{a}");
    assert!(a["ip6"].as_str().unwrap().starts_with("fd00:10:1::"), "{a}");

    // no policy: everything answers over IPv6
    for (from, to, port, proto) in [("a", "b", 80, "tcp"), ("a", "b", 53, "udp"), ("a", "b", 0, "icmp"), ("world", "a", 80, "tcp"), ("a", "world", 80, "tcp"), ("c", "2001:db8:113::10", 80, "tcp")] {
        assert!(lab.probe_family(from, to, port, proto, true), "{from} -> {to}:{port}/{proto} over IPv6 without policy");
    }

    lab.apply(POLICIES);
    let cases: &[(&str, &str, u16, &str, bool, bool)] = &[
        // (from, to, port, protocol, ipv6, expected)
        ("a", "b", 80, "tcp", true, true),
        ("a", "b", 80, "tcp", false, true),
        ("a", "b", 53, "udp", true, false),
        ("a", "b", 0, "icmp", true, true),
        ("c", "b", 80, "tcp", true, false),
        ("world", "b", 80, "tcp", true, false),
        ("a", "2001:db8:113::10", 80, "tcp", true, true),
        ("a", "2001:db8:113::10", 443, "tcp", true, false),
        ("a", "world", 80, "tcp", true, false),
        // world-ipv6 is the IPv6 world only
        ("c", "world", 80, "tcp", true, true),
        ("c", "2001:db8:113::10", 443, "tcp", true, true),
        ("c", "world", 80, "tcp", false, false),
        ("c", "b", 80, "tcp", true, false),
    ];
    for (from, to, port, proto, ipv6, want) in cases {
        assert_eq!(lab.probe_family(from, to, *port, proto, *ipv6), *want, "{from} -> {to}:{port}/{proto} ipv6={ipv6}");
    }

    // Hubble shows the IPv6 drop with the pods' names
    let server = format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(bin_dir().join("hubble"))
            .args(["observe", "--server", &server, "--all", "--verdict", "DROPPED", "--ip-version", "v6", "-o", "json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let flows: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v.get("flow").cloned()).collect();
        assert!(flows.iter().all(|f| f["IP"]["ipVersion"] == "IPv6"), "--ip-version v6 lets only IPv6 flows through:\n{text}");
        let found = flows.iter().any(|f| f["source"]["pod_name"] == "c" && f["destination"]["pod_name"] == "b" && f["drop_reason_desc"] == "POLICY_DENIED");
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no IPv6 policy drop c -> b in hubble observe:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // a restarted agent keeps the pods' IPv6 addresses and their policy
    let before = lab.pods();
    lab.lab(&["agent", "restart"]);
    let after = lab.pods();
    for p in &before {
        let q = after.iter().find(|q| q["name"] == p["name"]).unwrap();
        assert_eq!(p["ip6"], q["ip6"]);
    }
    let eps: Value = serde_json::from_str(&lab.cilium_ok(&["endpoint", "list", "-o", "json"])).unwrap();
    assert!(eps.as_array().unwrap().iter().all(|e| e["ipv6"].as_str().is_some_and(|a| a.starts_with("fd00:10:1::"))), "{eps}");
    assert!(lab.probe_family("a", "b", 80, "tcp", true));
    assert!(!lab.probe_family("c", "b", 80, "tcp", true));
    let status = lab.cilium_ok(&["status"]);
    assert!(status.contains("IPv6: 4/65534 allocated from fd00:10:1::/112, router fd00:10:1::1"), "{status}");
    assert!(lab.cilium_ok(&["endpoint", "list"]).contains("fd00:10:1::"));

    // the conntrack table lists IPv6 connections
    let ct = lab.cilium_ok(&["bpf", "ct", "list", "global"]);
    assert!(ct.contains("[fd00:10:1::"), "{ct}");
}

/// a and c on node1, b on node2; b admits only a.
const TWO_NODES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: a}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: c}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: b}}
spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-in}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
"#;

/// Other nodes' pods are known by their IPv6 addresses too: through the
/// lab's pod updates, and through etcd in kvstore mode.
#[test]
fn ipv6_across_nodes_by_labels() {
    for extra in [&[][..], &["--kvstore"][..]] {
        let mut args = vec!["--ipv6", "--nodes", "2"];
        args.extend_from_slice(extra);
        let lab = TestLab::create(&[TWO_NODES], &[], &args);
        let b = lab.pods().into_iter().find(|p| p["name"] == "b").unwrap();
        assert!(b["ip6"].as_str().unwrap().starts_with("fd00:10:2::"), "{b}");
        // the first packets may race the other node learning a's address
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lab.probe_family("a", "b", 80, "tcp", true) {
            assert!(Instant::now() < deadline, "{extra:?}: a -> b over IPv6 across nodes, allowed by labels");
        }
        assert!(!lab.probe_family("c", "b", 80, "tcp", true), "{extra:?}: c is not admitted");
        assert!(lab.probe_family("a", "b", 80, "tcp", false), "{extra:?}: nor does IPv4 change");
        let ipcache = lab.cilium_on("node2", &["bpf", "ipcache", "list"]);
        let a6 = lab.pods().into_iter().find(|p| p["name"] == "a").unwrap()["ip6"].as_str().unwrap().to_string();
        assert!(ipcache.contains(&format!("{a6}/128")), "{extra:?}: node2's ipcache has a's IPv6 address:\n{ipcache}");
    }
}

const DNS_PODS: &str = r#"
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
---
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
  - toFQDNs: [{matchName: api6.example.com}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

/// toFQDNs learns AAAA answers: the name's IPv6 address opens once the
/// proxy has seen it resolved.
#[test]
fn to_fqdns_learns_ipv6_answers() {
    let lab = TestLab::create(&[DNS_PODS], &[], &["--ipv6"]);
    let dns = lab.pods().into_iter().find(|p| p["name"] == "coredns").and_then(|p| p["ip"].as_str().map(str::to_string)).unwrap();
    let out = lab.lab_output(&[
        "exec", "kube-system/coredns", "--", "dnsmasq", "--port=53", "--no-resolv", "--no-hosts", "--bind-interfaces",
        &format!("--listen-address={dns}"), "--address=/api6.example.com/2001:db8:113::10", "--pid-file=", "--user=root",
    ]);
    assert!(out.status.success(), "dnsmasq: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!lab.probe_family("client", "2001:db8:113::10", 80, "tcp", true), "nothing learned yet");
    let mut answer = String::new();
    for _ in 0..20 {
        let o = lab.lab_output(&["exec", "default/client", "--", "dig", "+time=2", "+tries=1", &format!("@{dns}"), "api6.example.com", "AAAA"]);
        answer = String::from_utf8_lossy(&o.stdout).into_owned();
        if answer.contains("status: NOERROR") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answer.contains("2001:db8:113::10"), "{answer}");
    assert!(lab.probe_family("client", "2001:db8:113::10", 80, "tcp", true), "the learned IPv6 address is allowed");
    assert!(!lab.probe_family("client", "world", 80, "tcp", true), "another IPv6 address is not");
    let list = lab.cilium_ok(&["fqdn", "cache", "list"]);
    assert!(list.lines().any(|l| l.starts_with("api6.example.com.") && l.ends_with("2001:db8:113::10")), "{list}");
}
