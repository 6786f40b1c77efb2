//! Service load balancing end to end: real sockets in lab pods, translated by
//! the socket-level load balancer (cgroup connect/sendmsg/recvmsg hooks)
//! attached by a real agent.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cilium_privileged_tests::lab::{TestLab, cilium};

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: w
        ports: [{containerPort: 8080, name: http}, {containerPort: 5353, protocol: UDP, name: dns}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, labels: {app: solo}}
spec: {containers: [{name: s, ports: [{containerPort: 9000}]}]}
"#;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.0.11
  selector: {app: nothing}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: solo}
spec:
  clusterIP: 10.96.0.12
  selector: {app: solo}
  ports: [{port: 90, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  clusterIP: 10.96.0.13
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: mag
  annotations: {service.cilium.io/lb-algorithm: maglev}
spec:
  type: NodePort
  clusterIP: 10.96.0.14
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

fn web_pods(lab: &TestLab) -> BTreeSet<String> {
    lab.pods().iter().filter(|p| p["labels"]["app"] == "web").map(|p| format!("default/{}", p["name"].as_str().unwrap())).collect()
}

#[test]
fn cluster_ip_tcp_and_udp_reach_every_backend() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    let web = web_pods(&lab);
    assert_eq!(web.len(), 2);
    for (port, proto) in [(80, "tcp"), (53, "udp")] {
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            let pod = lab.probe_pod("default/client", "10.96.0.10", port, proto).unwrap_or_else(|| panic!("10.96.0.10:{port}/{proto} unreachable"));
            seen.insert(pod);
        }
        // the probes also check what the socket sees: the UDP answer comes
        // from the ClusterIP, the TCP peer (getpeername) is the ClusterIP
        assert_eq!(seen, web, "{proto}: both backends answer");
    }
    // host-originated traffic is translated too
    assert!(web.contains(&lab.probe_pod("node1", "10.96.0.10", 80, "tcp").expect("from the node")));
    // a pod reaching itself through its own service (hairpin)
    assert_eq!(lab.probe_pod("default/solo", "10.96.0.12", 90, "tcp").as_deref(), Some("default/solo"));
    let list = lab.cilium_ok(&["service", "list"]);
    assert!(list.contains("10.96.0.10:80/TCP") && list.contains("10.96.0.10:53/UDP"), "{list}");
    assert!(!list.contains("headless"), "headless services are not load-balanced: {list}");
    let lb = lab.cilium_ok(&["bpf", "lb", "list"]);
    assert!(lb.contains("10.96.0.10:80/TCP") && lb.contains(":8080 ("), "{lb}");
}

#[test]
fn a_service_without_backends_refuses_at_once() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    let started = Instant::now();
    let v = lab.probe_json("default/client", "10.96.0.11", 80, "tcp");
    assert_eq!(v["reachable"], false);
    assert!(v["detail"].as_str().unwrap().contains("refused"), "{v}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused, not timed out");
    // once it has a backend, it answers
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: late, labels: {app: nothing}}\nspec: {containers: [{name: l, ports: [{containerPort: 80}]}]}\n");
    assert_eq!(lab.probe_pod("default/client", "10.96.0.11", 80, "tcp").as_deref(), Some("default/late"));
    // a deleted service is gone from the maps: its address leads nowhere
    lab.delete(SERVICES);
    assert!(!lab.probe("default/client", "10.96.0.10", 80, "tcp"));
    assert!(!lab.cilium_ok(&["bpf", "lb", "list"]).contains("10.96.0.10"));
}

#[test]
fn session_affinity_and_maglev() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    let first = lab.probe_pod("default/client", "10.96.0.13", 80, "tcp").expect("sticky reachable");
    for _ in 0..10 {
        assert_eq!(lab.probe_pod("default/client", "10.96.0.13", 80, "tcp").as_ref(), Some(&first), "ClientIP affinity");
    }
    let web = web_pods(&lab);
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        seen.insert(lab.probe_pod("default/client", "10.96.0.14", 80, "tcp").expect("maglev service reachable"));
    }
    assert_eq!(seen, web);
    let m = lab.cilium_ok(&["bpf", "lb", "list", "--maglev"]);
    assert!(m.contains("16381"), "default table size: {m}");
    // the node port, from the node itself
    assert!(lab.probe_pod("node1", "172.30.0.11", 30080, "tcp").is_some());
}

#[test]
fn removed_backend_keeps_its_established_connections() {
    let lab = TestLab::up(&[WORKLOADS]);
    let pods = lab.pods();
    let ip_of = |n: &str| pods.iter().find(|p| p["name"] == n).unwrap()["ip"].as_str().unwrap().to_string();
    let web: Vec<String> = pods.iter().filter(|p| p["labels"]["app"] == "web").map(|p| p["name"].as_str().unwrap().to_string()).collect();
    let (a, b) = (&web[0], &web[1]);
    lab.cilium_ok(&["service", "update", "--id", "100", "--frontend", "10.96.100.1:80", "--backends", &format!("{}:8080", ip_of(a))]);
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("f");
    let script = r#"
set -e
exec 3<>/dev/tcp/10.96.100.1/80
printf 'GET /first HTTP/1.1\r\nHost: x\r\n\r\n' >&3
while read -r -t 3 line <&3; do case "$line" in pod=*) echo "first $line"; break;; esac; done
touch "$1.open"
for i in $(seq 200); do [ -e "$1.go" ] && break; sleep 0.05; done
printf 'GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
while read -r -t 3 line <&3; do case "$line" in pod=*) echo "second $line"; break;; esac; done
"#;
    let mut child = cilium()
        .args(["lab", "exec", "--name", &lab.name, "default/client", "--", "bash", "-c", script, "hold", flag.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let open = flag.with_extension("open");
    let until = Instant::now() + Duration::from_secs(10);
    while !open.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(open.exists(), "the held connection did not open");
    // the backend is replaced: new connections go to b only
    lab.cilium_ok(&["service", "update", "--id", "100", "--frontend", "10.96.100.1:80", "--backends", &format!("{}:8080", ip_of(b))]);
    for _ in 0..5 {
        assert_eq!(lab.probe_pod("default/client", "10.96.100.1", 80, "tcp"), Some(format!("default/{b}")));
    }
    std::fs::write(flag.with_extension("go"), "").unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "{out}");
    assert!(out.contains(&format!("first pod=default/{a}")), "{out}");
    assert!(out.contains(&format!("second pod=default/{a}")), "the established connection still reaches its backend: {out}");
    // bad input names the field and changes nothing
    let o = lab.cilium(&["service", "update", "--id", "100", "--frontend", "10.96.100.1:80", "--backends", "10.0.1.2:80,nonsense"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("backends[1]"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lab.probe_pod("default/client", "10.96.100.1", 80, "tcp"), Some(format!("default/{b}")));
    lab.cilium_ok(&["service", "delete", "100"]);
    assert!(!lab.cilium_ok(&["service", "list"]).contains("10.96.100.1"));
}

#[test]
fn policy_sees_the_backend_not_the_service() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    lab.apply("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-from-host}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEntities: [host]\n");
    assert!(!lab.probe("default/client", "10.96.0.10", 80, "tcp"), "client is denied by web's policy");
    assert!(lab.probe("node1", "10.96.0.10", 80, "tcp"), "the host is allowed");
    lab.apply("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-from-client}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\"}]}]\n");
    assert!(lab.probe("default/client", "10.96.0.10", 80, "tcp"), "allowed on the backend's port");
}

#[test]
fn services_and_translation_survive_an_agent_restart() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    let before = lab.cilium_ok(&["service", "list"]);
    lab.lab(&["agent", "stop"]);
    assert!(lab.probe("default/client", "10.96.0.10", 80, "tcp"), "no agent: the socket load balancer keeps translating");
    lab.lab(&["agent", "start"]);
    assert_eq!(lab.cilium_ok(&["service", "list"]), before, "same services and IDs");
    assert!(lab.probe("default/client", "10.96.0.10", 53, "udp"));
}

const EXTERNAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  selector: {app: web}
  externalIPs: [172.30.1.200]
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: np-empty}
spec:
  type: NodePort
  selector: {app: nobody}
  ports: [{port: 80, nodePort: 30099}]
"#;

#[test]
fn node_ports_load_balancers_and_external_ips_from_outside() {
    let lab = TestLab::up(&[WORKLOADS, EXTERNAL]);
    let web = web_pods(&lab);
    // the world is outside the node: no socket load balancer, the tc one
    for (port, proto) in [(30080, "tcp"), (30053, "udp")] {
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            seen.insert(lab.probe_pod("world", "172.30.0.11", port, proto).unwrap_or_else(|| panic!("node port {port}/{proto} from the world")));
        }
        assert_eq!(seen, web, "{proto}: both backends answer");
    }
    // the LoadBalancer IP (the lab allocates 172.30.1.1) admits 10.0.0.0/8
    // only; the world is 172.30.0.1. The external IP has no source ranges.
    assert!(!lab.probe("world", "172.30.1.1", 80, "tcp"), "outside loadBalancerSourceRanges");
    assert!(lab.probe_pod("world", "172.30.1.200", 80, "tcp").is_some(), "external IP");
    let text = EXTERNAL.replace("loadBalancerSourceRanges: [10.0.0.0/8]", "loadBalancerSourceRanges: [172.30.0.0/24]");
    lab.apply(&text);
    assert!(lab.probe_pod("world", "172.30.1.1", 80, "tcp").is_some(), "inside the new range");
    // no backends: refused at once (ICMP port unreachable), not a timeout
    let started = Instant::now();
    let v = lab.probe_json("world", "172.30.0.11", 30099, "tcp");
    assert!(v["detail"].as_str().unwrap().contains("refused"), "{v}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // an established connection from outside survives an agent restart
    let mut conn = lab.connect_from("world", "172.30.0.11:30080".parse().unwrap()).expect("connect through the node port");
    assert!(cilium_privileged_tests::lab::http_roundtrip(&mut conn).unwrap().contains("pod=default/web"));
    lab.lab(&["agent", "restart"]);
    assert!(cilium_privileged_tests::lab::http_roundtrip(&mut conn).unwrap().contains("pod=default/web"), "same connection after the restart");
}

#[test]
fn to_services_allows_the_services_pods_only() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    lab.apply("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: client-to-web}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toServices: [{k8sService: {serviceName: web, namespace: default}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n");
    assert!(lab.probe_pod("default/client", "10.96.0.10", 80, "tcp").is_some(), "web's backends through its ClusterIP");
    assert!(!lab.probe("default/client", "10.96.0.12", 90, "tcp"), "another service's pod is not allowed");
    assert!(!lab.probe("default/client", "10.96.0.10", 53, "udp"), "only the rule's port");
}

#[test]
fn dns_through_a_cluster_ip() {
    let lab = TestLab::up(&[
        WORKLOADS,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: dns, labels: {app: dns}}\nspec: {containers: [{name: d}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: kube-dns}\nspec:\n  clusterIP: 10.96.0.53\n  selector: {app: dns}\n  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]\n",
    ]);
    // a real DNS server in the dns pod (it exits with the pod's namespace)
    let out = lab.lab_output(&[
        "exec", "default/dns", "--", "dnsmasq", "--port=5353", "--no-resolv", "--no-hosts", "--bind-interfaces",
        "--listen-address=0.0.0.0", "--address=/svc.example.test/192.0.2.77", "--pid-file=", "--user=root",
    ]);
    assert!(out.status.success(), "dnsmasq: {}", String::from_utf8_lossy(&out.stderr));
    // a real resolver in the client pod asks the ClusterIP
    let mut answer = String::new();
    for _ in 0..20 {
        let o = lab.lab_output(&["exec", "default/client", "--", "dig", "+short", "+time=1", "+tries=1", "@10.96.0.53", "svc.example.test", "A"]);
        answer = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if answer == "192.0.2.77" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answer, "192.0.2.77", "dig through the ClusterIP");
}

#[test]
fn backend_churn_breaks_no_established_connection() {
    let lab = TestLab::up(&[WORKLOADS, EXTERNAL]);
    let web = web_pods(&lab);
    // connections from outside through the node port (the per-packet path;
    // a pod's socket is connected to its backend and never sees the service
    // again, see removed_backend_keeps_its_established_connections)
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(lab.connect_from("world", "172.30.0.11:30080".parse().unwrap()).expect("node port"));
    }
    let check = |held: &mut Vec<std::net::TcpStream>, when: &str| {
        for c in held.iter_mut() {
            let body = cilium_privileged_tests::lab::http_roundtrip(c).unwrap_or_else(|e| panic!("{when}: {e}"));
            assert!(web.iter().any(|p| body.contains(&format!("pod={p} "))), "{when}: {body}");
        }
    };
    check(&mut held, "before");
    // scale up (new backends join) and back down (they leave)
    let scaled = WORKLOADS.replace("replicas: 2", "replicas: 4");
    lab.apply(&scaled);
    check(&mut held, "after scaling up");
    assert_eq!(web_pods(&lab).len(), 4);
    lab.apply(WORKLOADS);
    check(&mut held, "after scaling down");
    // every backend replaced (the target port moves to one nobody serves), twice
    for _ in 0..2 {
        lab.apply(&EXTERNAL.replace("targetPort: 8080, nodePort: 30080", "targetPort: 8081, nodePort: 30080"));
        lab.apply(EXTERNAL);
    }
    check(&mut held, "after the target port moved away and back");
}

#[test]
fn local_traffic_policies_keep_external_traffic_on_this_nodes_endpoints() {
    let lab = TestLab::up(&[WORKLOADS]);
    let pods = lab.pods();
    let web: Vec<(String, String)> = pods
        .iter()
        .filter(|p| p["labels"]["app"] == "web")
        .map(|p| (format!("default/{}", p["name"].as_str().unwrap()), p["ip"].as_str().unwrap().to_string()))
        .collect();
    // As a Service and EndpointSlice watcher would deliver it: one endpoint
    // on this node, one the EndpointSlice places on another node (node2).
    let svc = serde_json::json!({
        "namespace": "default", "name": "local", "type": "NodePort", "clusterIP": "10.96.0.77",
        "externalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "nodePort": 30077}],
        "endpoints": [
            {"ip": web[0].1, "nodeName": "node1", "ports": [{"name": "http", "port": 8080}]},
            {"ip": web[1].1, "nodeName": "node2", "ports": [{"name": "http", "port": 8080}]},
        ],
    });
    let put = std::process::Command::new("curl")
        .args(["-sf", "--unix-socket", lab.socket().to_str().unwrap(), "-X", "PUT", "-H", "Content-Type: application/json", "-d", &svc.to_string(), "http://localhost/v1/k8s/service"])
        .output()
        .unwrap();
    assert!(put.status.success(), "PUT /v1/k8s/service: {}", String::from_utf8_lossy(&put.stderr));
    // from outside, through the node port: only this node's endpoint
    for _ in 0..12 {
        assert_eq!(lab.probe_pod("world", "172.30.0.11", 30077, "tcp").as_deref(), Some(web[0].0.as_str()), "externalTrafficPolicy: Local");
    }
    // inside, through the ClusterIP (internalTrafficPolicy Cluster): both
    let seen: BTreeSet<String> = (0..24).filter_map(|_| lab.probe_pod("default/client", "10.96.0.77", 80, "tcp")).collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let list = lab.cilium_ok(&["service", "list"]);
    assert!(list.contains("172.30.0.11:30077/TCP") && list.contains("10.96.0.77:80/TCP"), "{list}");
}

/// One UDP socket talking to two services: each answer shows its own
/// ClusterIP as the source (the socket keeps a reverse entry per backend).
#[test]
fn one_udp_socket_hears_each_service_from_its_frontend() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: echo, labels: {app: echo}}
spec: {containers: [{name: e, ports: [{containerPort: 7000, protocol: UDP}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  clusterIP: 10.96.0.70
  selector: {app: echo}
  ports: [{port: 70, protocol: UDP, targetPort: 7000}]
"#,
    );
    assert!(lab.probe("default/client", "10.96.0.70", 70, "udp"));
    // sendto each frontend in turn on one socket; print each answer's source
    let script = [
        "import socket",
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
        "s.settimeout(2)",
        "for dst in [('10.96.0.10', 53), ('10.96.0.70', 70), ('10.96.0.10', 53), ('10.96.0.70', 70)]:",
        "    s.sendto(b'probe', dst)",
        "    _, src = s.recvfrom(1500)",
        "    print('%s:%d' % src)",
    ]
    .join("\n");
    let out = lab.lab(&["exec", "default/client", "--", "python3", "-c", &script]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["10.96.0.10:53", "10.96.0.70:70", "10.96.0.10:53", "10.96.0.70:70"], "{out}");
}

/// The entries of one of node1's pinned maps, as `bpftool -j map dump` prints them.
fn pinned_map_dump(lab: &TestLab, map: &str) -> Vec<serde_json::Value> {
    let path = format!("/sys/fs/bpf/cilium-lab/{}/node1/{map}", lab.name);
    let out = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned", &path]).output().expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("bpftool json").as_array().cloned().unwrap_or_default()
}

#[test]
fn a_closed_socket_leaves_no_reverse_entry() {
    let lab = TestLab::up(&[WORKLOADS, SERVICES]);
    for _ in 0..10 {
        assert!(lab.probe("default/client", "10.96.0.10", 80, "tcp"));
    }
    assert_eq!(pinned_map_dump(&lab, "cilium_lb4_sock_revnat").len(), 0, "every probe's socket is closed: its entry went with it");
    // each entry was counted in its socket's hint slot when made and
    // uncounted when removed: none left (a miscount skips a removal)
    assert_eq!(sock_hint_total(&lab), 0);
}

/// The sum of the node's socket reverse-entry hint counters.
fn sock_hint_total(lab: &TestLab) -> u64 {
    let entries = pinned_map_dump(lab, "cilium_lb4_sock_hint");
    assert_eq!(entries.len(), 16384, "one counter per slot");
    entries.iter().map(|e| e["formatted"]["value"].as_u64().unwrap_or_else(|| panic!("hint entry {e}"))).sum()
}
