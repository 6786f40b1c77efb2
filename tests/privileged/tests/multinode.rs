//! Several nodes: each a network namespace with its own agent and pod CIDR,
//! routed to each other through the world namespace (native routing), or
//! joined by VXLAN (tunnel mode, identity in the VNI). Pods reach pods of
//! other nodes, policy applies to them by identity on both sides, a Service
//! balances over backends on every node, and other nodes' addresses are
//! `remote-node`; masquerading; node health.

use std::time::{Duration, Instant};

use cilium_privileged_tests::lab::TestLab;
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: other}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec: {nodeName: node2, containers: [{name: s, ports: [{containerPort: 80}]}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: w, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  type: NodePort
  selector: {app: server}
  ports: [{port: 80, nodePort: 30080}]
"#;

/// The server (on node2) accepts the client (on node1) only.
const SERVER_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

/// The client may talk to the server only.
const CLIENT_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
  ingress:
  - fromEntities: [remote-node]
"#;

fn node_list(lab: &TestLab, node: &str) -> Vec<Value> {
    serde_json::from_str(&lab.cilium_on(node, &["node", "list", "-o", "json"])).unwrap()
}

#[test]
fn pods_on_three_nodes_talk_under_policy_by_identity() {
    let lab = TestLab::up_nodes(&[PODS], 3);
    let pods = lab.pods();
    let node_of = |app: &str| pods.iter().filter(|p| p["labels"]["app"] == app).map(|p| p["node"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(node_of("server"), vec!["node2"]);
    let web: std::collections::BTreeSet<String> = node_of("web").into_iter().collect();
    assert_eq!(web.len(), 3, "the Deployment spreads over every node: {web:?}");
    let nodes = node_list(&lab, "node1");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert!(nodes.iter().any(|n| n["name"] == "node2" && n["ip"] == "172.30.0.12" && n["pod_cidr"] == "10.0.2.0/24" && n["local"] == false && n["pods"] == 2), "{nodes:?}");

    // no policy: across nodes both ways
    assert!(lab.probe("default/client", "default/server", 80, "tcp"), "client (node1) -> server (node2)");
    // a Service with backends on every node
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..40 {
        answered.extend(lab.probe_pod("default/client", "10.96.0.10", 80, "tcp"));
        if answered.len() == 4 {
            break;
        }
    }
    assert_eq!(answered.len(), 4, "every backend answers through the ClusterIP: {answered:?}");
    // a NodePort reached on a node without a backend: the flow goes to
    // node2 from the frontend node's address (SNAT) and the replies come back through it
    for node_ip in ["172.30.0.11", "172.30.0.12", "172.30.0.13"] {
        for _ in 0..3 {
            assert_eq!(lab.probe_pod("world", node_ip, 30080, "tcp").as_deref(), Some("default/server"), "NodePort on {node_ip}");
        }
    }

    // the server's node enforces by the client's identity
    lab.apply(SERVER_POLICY);
    assert!(lab.probe("default/client", "default/server", 80, "tcp"), "the client is allowed");
    assert!(!lab.probe("default/other", "default/server", 80, "tcp"), "another pod of the same node is not");
    // the client's node enforces egress by the server's identity
    lab.apply(CLIENT_POLICY);
    assert!(lab.probe("default/client", "default/server", 80, "tcp"));
    let web_ip = pods.iter().find(|p| p["labels"]["app"] == "web" && p["node"] == "node2").unwrap()["ip"].as_str().unwrap().to_string();
    assert!(!lab.probe("default/client", &web_ip, 8080, "tcp"), "a pod of node2 the client's egress does not name");
    assert!(lab.probe("default/other", &web_ip, 8080, "tcp"), "other pods are not restricted");
    // node2's address is remote-node on node1, and the client accepts it
    let ipcache = lab.cilium(&["bpf", "ipcache", "list", "-o", "json"]);
    let entries: Value = serde_json::from_slice(&ipcache.stdout).expect("ipcache json");
    assert!(entries.as_array().unwrap().iter().any(|e| e["prefix"] == "172.30.0.12/32" && e["identity"] == 6), "{entries:#}");
    assert!(lab.probe("node2", "default/client", 80, "tcp"), "node2 (remote-node) reaches the client");
    assert!(!lab.probe("default/server", "default/client", 80, "tcp"), "a pod of node2 is not remote-node");
    // from outside, a source that is node2 itself or one of its pods is
    // spoofed: dropped before the server's policy (which allows the host) sees it
    let before = invalid_source_drops(&lab, "node2");
    let server_ip = pods.iter().find(|p| p["labels"]["app"] == "server").unwrap()["ip"].as_str().unwrap().parse().unwrap();
    for spoofed in [std::net::Ipv4Addr::new(172, 30, 0, 12), web_ip.parse().unwrap()] {
        send_raw(&lab, "world", cilium_privileged_tests::packet::udp(spoofed, 5555, server_ip, 80)[14..].to_vec());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while invalid_source_drops(&lab, "node2") < before + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(invalid_source_drops(&lab, "node2") >= before + 2, "spoofed sources from the world are dropped on node2");
}

fn status_of(lab: &TestLab, node: &str, args: &[&str]) -> String {
    let mut a = vec!["status"];
    a.extend_from_slice(args);
    lab.cilium_on(node, &a)
}

/// Waits until `cilium status` on `node` says `want`.
fn wait_for_status(lab: &TestLab, node: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status_of(lab, node, &["--all-health"]);
        if s.contains(want) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every agent probes every node (ICMP to its stack, HTTP to its agent);
/// a stopped agent shows as unreachable over HTTP while its node still
/// answers ICMP, and comes back.
#[test]
fn cluster_health_on_three_nodes() {
    let lab = TestLab::up_nodes(&[], 3);
    for node in ["node1", "node2", "node3"] {
        let s = wait_for_status(&lab, node, "Cluster health:          3/3 reachable");
        assert!(s.contains("Cluster health:          3/3 reachable"), "{node}: {s}");
    }
    let s = status_of(&lab, "node1", &["--all-health"]);
    assert!(s.contains("node1 (localhost):") && s.contains("Host connectivity to 172.30.0.13:"), "{s}");
    assert!(s.matches("ICMP to stack:   OK, RTT=").count() == 3 && s.matches("HTTP to agent:   OK, RTT=").count() == 3, "{s}");
    let out = lab.cilium_health_on("node2", &["status", "--probe"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("Probe time:") && text.matches("HTTP to agent:   OK, RTT=").count() == 3, "cilium-health status --probe: {text}");
    lab.lab(&["agent", "stop", "--node", "node3"]);
    // an immediate round sees it at once, and cilium-health says so by its exit code
    let out = lab.cilium_health_on("node2", &["status", "--probe", "-o", "json"]);
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("cilium-health json");
    assert!(!out.status.success(), "a node is unreachable: {nodes}");
    let node3 = nodes.as_array().unwrap().iter().find(|n| n["name"] == "node3").unwrap();
    assert_eq!((node3["icmp"]["ok"].as_bool(), node3["http"]["ok"].as_bool()), (Some(true), Some(false)), "{node3}");
    let s = wait_for_status(&lab, "node1", "Cluster health:          2/3 reachable");
    assert!(s.contains("Cluster health:          2/3 reachable"), "{s}");
    assert!(s.matches("ICMP to stack:   OK").count() == 3 && s.contains("HTTP to agent:   Failed"), "node3's stack answers, its agent does not: {s}");
    lab.lab(&["agent", "start", "--node", "node3"]);
    let s = wait_for_status(&lab, "node1", "Cluster health:          3/3 reachable");
    assert!(s.contains("Cluster health:          3/3 reachable"), "{s}");
}

/// A TCP connection from a given local port, opened inside a namespace.
fn connect_bound(lab: &TestLab, target: &str, port: u16, to: std::net::SocketAddrV4) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt};
    let ns = lab.netns(target);
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&ns).map_err(std::io::Error::other)?;
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(0, 0, 0, 0, port))?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
        Ok(std::net::TcpStream::from(fd))
    })
    .join()
    .expect("connect thread")
}

/// A TCP server in a namespace that answers an empty 200 and records who
/// connected.
fn recording_server(lab: &TestLab, target: &str, addr: std::net::SocketAddr) -> std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>> {
    use std::io::{Read, Write};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (ns, s) = (lab.netns(target), seen.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&ns).unwrap();
        let l = std::net::TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        for mut c in l.incoming().flatten() {
            if let Ok(a) = c.peer_addr() {
                s.lock().unwrap().push(a);
            }
            let mut buf = [0u8; 1024];
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    rx.recv().unwrap();
    seen
}

/// BPF masquerading: what a pod opens to the world leaves from its node's
/// address; replies of connections from the world, traffic between pods
/// and NodePort replies keep their addresses.
#[test]
fn pods_reach_the_world_from_their_node_address() {
    let lab = TestLab::create(&[PODS], &["--enable-ipv4-masquerade"], &["--nodes", "2"]);
    let pods = lab.pods();
    let ip = |app: &str| pods.iter().find(|p| p["labels"]["app"] == app).unwrap()["ip"].as_str().unwrap().parse::<std::net::Ipv4Addr>().unwrap();
    let world = recording_server(&lab, "world", "172.30.0.1:7777".parse().unwrap());
    assert!(lab.probe("default/client", "172.30.0.1", 7777, "tcp"));
    let ips = |seen: &std::sync::Mutex<Vec<std::net::SocketAddr>>| seen.lock().unwrap().iter().map(|a| a.ip()).collect::<Vec<_>>();
    assert_eq!(ips(&world), ["172.30.0.11".parse::<std::net::IpAddr>().unwrap()], "the world sees node1, not the pod");
    // a pod's flow never takes the port of the node's own connection to the same peer
    let world_addr: std::net::SocketAddrV4 = "172.30.0.1:7777".parse().unwrap();
    let mut own = connect_bound(&lab, "node1", 45000, world_addr).expect("the node's own connection");
    let mut pod = connect_bound(&lab, "default/client", 45000, world_addr).expect("the pod's, from the same port");
    for c in [&mut pod, &mut own] {
        cilium_privileged_tests::lab::http_roundtrip(c).expect("both are answered");
    }
    let seen = world.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|a| a.ip() == std::net::IpAddr::from([172, 30, 0, 11])), "{seen:?}");
    assert!(seen.iter().any(|a| a.port() == 45000) && seen.iter().any(|a| (61000..=65535).contains(&a.port()) && a != &seen[0]), "the pod's flow left from a port of the NAT range: {seen:?}");
    // a pod on the other node sees the client's own address
    let server_ip = ip("server");
    let server = recording_server(&lab, "default/server", (server_ip, 7778).into());
    assert!(lab.probe("default/client", &server_ip.to_string(), 7778, "tcp"));
    assert_eq!(ips(&server), [std::net::IpAddr::V4(ip("client"))], "pod to pod is never masqueraded");
    // the world's own connections to a pod get replies from the pod
    assert!(lab.probe("world", "default/client", 80, "tcp"), "replies to the world keep the pod's address");
    // a NodePort with a local backend still answers from its frontend
    assert_eq!(lab.probe_pod("world", "172.30.0.12", 30080, "tcp").as_deref(), Some("default/server"));
}

/// Packets `node` dropped as INVALID_SOURCE_IP so far.
fn invalid_source_drops(lab: &TestLab, node: &str) -> u64 {
    let v: Vec<Value> = serde_json::from_str(&lab.cilium_on(node, &["bpf", "metrics", "list", "-o", "json"])).unwrap();
    v.iter().filter(|e| e["reason"] == "Invalid source ip").map(|e| e["packets"].as_u64().unwrap()).sum()
}

/// Sends an IPv4 packet as is (its source included) from a namespace.
fn send_raw(lab: &TestLab, from: &str, ip_packet: Vec<u8>) {
    let ns = lab.netns(from);
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&ns).unwrap();
        // SAFETY: plain socket calls on a descriptor this block owns
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket");
            let dst = libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: 0, sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([ip_packet[16], ip_packet[17], ip_packet[18], ip_packet[19]]) }, sin_zero: [0; 8] };
            let n = libc::sendto(fd, ip_packet.as_ptr().cast(), ip_packet.len(), 0, (&raw const dst).cast(), size_of::<libc::sockaddr_in>() as u32);
            assert_eq!(n, ip_packet.len() as isize, "raw send");
            libc::close(fd);
        }
    })
    .join()
    .unwrap();
}

/// The identity `node` gives the pod with label app=`app`.
fn identity_of(lab: &TestLab, node: &str, app: &str) -> u32 {
    let v: Vec<Value> = serde_json::from_str(&lab.cilium_on(node, &["identity", "list", "-o", "json"])).unwrap();
    v.iter().find(|i| i["labels"].as_array().unwrap().iter().any(|l| l == &format!("k8s:app={app}"))).unwrap()["id"].as_u64().unwrap() as u32
}

/// The node's bpffs directory of the lab (its pinned maps).
fn bpf_root(lab: &TestLab, node: &str) -> String {
    let state: Value = serde_json::from_slice(&std::fs::read(format!("/var/run/cilium-lab/{}/lab.json", lab.name)).unwrap()).unwrap();
    state["nodes"].as_array().unwrap().iter().find(|n| n["name"] == node).unwrap()["bpf_root"].as_str().unwrap().to_string()
}

/// `ip -s link show DEV` in a namespace, as JSON.
fn link_in(lab: &TestLab, target: &str, dev: &str) -> Value {
    let out = lab.lab(&["exec", target, "--", "ip", "-j", "-s", "link", "show", "dev", dev]);
    serde_json::from_str::<Value>(&out).expect("ip -j")[0].clone()
}

/// Tunnel mode on three nodes: the world routes no pod CIDR, so pods of
/// different nodes reach each other only through VXLAN between the nodes;
/// the receiving node enforces with the identity the VNI carries (tested by
/// removing the client from its ipcache: it stays allowed, another pod
/// stays denied); a node's own traffic arrives as remote-node; Services
/// with backends on other nodes and NodePorts work; pods reach the world
/// masqueraded (TCP, UDP, ICMP echo); pods get the tunnel's MTU and a
/// datagram filling it crosses unfragmented.
#[test]
fn tunnel_mode_carries_the_identity_between_three_nodes() {
    let lab = TestLab::create(&[PODS], &["--enable-node-selector-labels"], &["--nodes", "3", "--routing-mode", "tunnel"]);
    assert!(lab.cilium_on("node1", &["status"]).contains("Routing:                 Network: Tunnel [vxlan]"));
    let server_ip = lab.pod_ip("server");
    let probe = lab.probe_json("world", "default/server", 80, "tcp");
    assert_eq!(probe["reachable"], false, "pod CIDRs are not routed outside the nodes: {probe}");

    let tx = || link_in(&lab, "node1", "cilium_vxlan")["stats64"]["tx"]["packets"].as_u64().unwrap();
    let before = tx();
    assert!(lab.probe("default/client", "default/server", 80, "tcp"), "client (node1) -> server (node2)");
    assert!(tx() > before, "through node1's tunnel device");
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..40 {
        answered.extend(lab.probe_pod("default/client", "10.96.0.10", 80, "tcp"));
        if answered.len() == 4 {
            break;
        }
    }
    assert_eq!(answered.len(), 4, "every backend, on every node, answers through the ClusterIP: {answered:?}");
    for node_ip in ["172.30.0.11", "172.30.0.13"] {
        assert_eq!(lab.probe_pod("world", node_ip, 30080, "tcp").as_deref(), Some("default/server"), "NodePort on {node_ip}, backend on node2");
    }
    // the world has no route to pods: they reach it masqueraded, ICMP too
    for (proto, port) in [("tcp", 80), ("udp", 53), ("icmp", 0)] {
        let v = lab.probe_json("default/server", "172.30.0.1", port, proto);
        assert_eq!(v["reachable"], true, "server -> world over {proto}: {v}");
    }

    // identity from the VNI, not from node2's ipcache (once node2 has
    // learnt the client's identity from etcd, to judge it by)
    let client = format!("\"{}/32\"", lab.pod_ip("client"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab.cilium_on("node2", &["bpf", "ipcache", "list", "-o", "json"]).contains(&client) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.apply(SERVER_POLICY);
    assert!(lab.probe("default/client", "default/server", 80, "tcp"));
    assert!(!lab.probe("default/other", "default/server", 80, "tcp"));
    let client_ip = lab.pod_ip("client").octets();
    let key: Vec<String> = [32u8, 0, 0, 0].iter().chain(client_ip.iter()).map(|b| format!("{b:02x}")).collect();
    let map = format!("{}/cilium_ipcache", bpf_root(&lab, "node2"));
    let out = std::process::Command::new("bpftool").args(["map", "delete", "pinned", &map, "key", "hex"]).args(&key).output().expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new("bpftool").args(["-j", "map", "lookup", "pinned", &map, "key", "hex"]).args(&key).output().expect("bpftool");
    let found: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    assert_eq!(found["formatted"]["value"]["sec_identity"], 2, "node2's ipcache now says world for the client: {found}");
    assert!(lab.probe("default/client", "default/server", 80, "tcp"), "still allowed: node2 enforced the VNI's identity");
    assert!(!lab.probe("default/other", "default/server", 80, "tcp"), "and still denies another pod of node1");

    // a pod cannot speak for another identity by sending VXLAN itself: a
    // frame claiming the client's identity, for the server, sent from the
    // other pod to node2's tunnel port is dropped (the outer source is no node)
    let invalid = |lab: &TestLab| invalid_source_drops(lab, "node2");
    let before = invalid(&lab);
    let client_id = identity_of(&lab, "node2", "client");
    let inner = cilium_privileged_tests::packet::udp(lab.pod_ip("other"), 5555, server_ip, 80);
    let mut frame = vec![0x08, 0, 0, 0, (client_id >> 16) as u8, (client_id >> 8) as u8, client_id as u8, 0];
    frame.extend_from_slice(&inner);
    let forger = lab.udp_in("default/other", "0.0.0.0:0".parse().unwrap());
    for _ in 0..3 {
        forger.send_to(&frame, "172.30.0.12:8472").expect("send a forged VXLAN frame");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while invalid(&lab) < before + 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(invalid(&lab) >= before + 3, "forged VXLAN frames dropped as INVALID_SOURCE_IP on node2");

    // a node's own traffic is remote-node on the receiving node
    lab.apply(CLIENT_POLICY);
    assert!(lab.probe("node2", "default/client", 80, "tcp"), "node2's host -> client: remote-node");
    assert!(!lab.probe("default/server", "default/client", 80, "tcp"), "node2's pod is not remote-node");
    // and, nodes told apart by their labels, that node in particular (the
    // VNI says "host", the outer source which host)
    lab.apply(&CLIENT_POLICY.replace("fromEntities: [remote-node]", "fromNodes: [{matchLabels: {kubernetes.io/hostname: node2}}]"));
    assert!(lab.probe("node2", "default/client", 80, "tcp"), "node2 is selected by its hostname");
    assert!(!lab.probe("node3", "default/client", 80, "tcp"), "node3 is not");

    // MTU: the pods' is the tunnel's, and a full-sized datagram crosses
    assert_eq!(link_in(&lab, "default/client", "eth0")["mtu"], 1450);
    assert_eq!(link_in(&lab, "node1", "eth0")["mtu"], 1500);
    let web2 = lab.pods().into_iter().find(|p| p["labels"]["app"] == "web" && p["node"] != "node1").unwrap();
    let web2_ip: std::net::Ipv4Addr = web2["ip"].as_str().unwrap().parse().unwrap();
    let rx = lab.udp_in(&format!("default/{}", web2["name"].as_str().unwrap()), (web2_ip, 9999).into());
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = lab.udp_in("default/other", "0.0.0.0:0".parse().unwrap());
    let dont_fragment: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a valid socket and an int option of the right size
    let rc = unsafe { libc::setsockopt(std::os::fd::AsRawFd::as_raw_fd(&tx), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, (&raw const dont_fragment).cast(), 4) };
    assert_eq!(rc, 0);
    let payload = vec![7u8; 1450 - 28];
    tx.send_to(&payload, (web2_ip, 9999)).expect("a datagram of the pod's MTU is sent whole");
    let mut buf = [0u8; 2048];
    let (n, _) = rx.recv_from(&mut buf).expect("the full-sized datagram arrives on the other node");
    assert_eq!(n, payload.len());
    assert!(lab.probe("default/client", &server_ip.to_string(), 80, "tcp"));
}

/// fromNodes/toNodes: with --enable-node-selector-labels each other node's
/// addresses carry an identity of its own (remote-node plus its labels), so
/// policy can tell nodes apart, and follows a node's labels as they change.
#[test]
fn node_selectors_tell_nodes_apart() {
    const GUARDED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: guarded, labels: {app: guarded}}
spec: {nodeName: node1, containers: [{name: g, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-zone-a}
spec:
  endpointSelector: {matchLabels: {app: guarded}}
  ingress:
  - fromNodes: [{matchLabels: {zone: a}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-node3}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toNodes: [{matchLabels: {kubernetes.io/hostname: node3}}]
"#;
    let node2_zone = |zone: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node2, labels: {{zone: {zone}}}}}\n");
    let lab = TestLab::create(&[], &["--enable-node-selector-labels"], &["--nodes", "3"]);
    assert!(lab.apply(&node2_zone("a")).contains("node/node2 configured"));
    lab.apply(GUARDED);
    let nodes = node_list(&lab, "node1");
    let id = |name: &str| nodes.iter().find(|n| n["name"] == name).unwrap()["identity"].as_u64().unwrap();
    assert_eq!(id("node1"), 1, "itself: host");
    for n in ["node2", "node3"] {
        assert!((2 << 24..3 << 24).contains(&id(n)), "{n} has an identity of its own: {nodes:?}");
    }
    assert_ne!(id("node2"), id("node3"));
    let node2 = nodes.iter().find(|n| n["name"] == "node2").unwrap();
    assert_eq!(node2["labels"]["zone"], "a", "{node2}");
    let ipcache: Value = serde_json::from_str(&lab.cilium_on("node1", &["bpf", "ipcache", "list", "-o", "json"])).unwrap();
    assert!(ipcache.as_array().unwrap().iter().any(|e| e["prefix"] == "172.30.0.12/32" && e["identity"] == id("node2")), "{ipcache:#}");

    assert!(lab.probe("node2", "default/guarded", 80, "tcp"), "node2 (zone a) is selected");
    assert!(!lab.probe("node3", "default/guarded", 80, "tcp"), "node3 is not");
    assert!(lab.probe("default/client", "172.30.0.13", 4240, "tcp"), "client -> node3 (by hostname)");
    assert!(!lab.probe("default/client", "172.30.0.12", 4240, "tcp"), "client -> node2 is not named");

    // relabelling node2 takes it out of the selection
    lab.apply(&node2_zone("b"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.probe("node2", "default/guarded", 80, "tcp") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!lab.probe("node2", "default/guarded", 80, "tcp"), "node2 (now zone b) is denied");
    let out = lab.lab_output(&["apply", "-f", &lab.write("n9.yaml", "apiVersion: v1\nkind: Node\nmetadata: {name: node9}\n").to_string_lossy()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("node9"), "an unknown node is refused");
}

/// The host firewall judges what the node itself sends and receives; a
/// NodePort flow it forwards to another node's backend is not the node's
/// own traffic, even though it leaves from the node's address.
#[test]
fn host_firewall_leaves_translated_service_flows_alone() {
    const SERVER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec: {nodeName: node2, containers: [{name: s, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  type: NodePort
  selector: {app: server}
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: nodes-talk-to-the-world-only}
spec:
  nodeSelector: {}
  ingress: [{fromEntities: [world]}]
  egress: [{toEntities: [world]}]
"#;
    let lab = TestLab::create(&[SERVER], &["--enable-host-firewall"], &["--nodes", "2"]);
    assert!(lab.probe("world", "172.30.0.12", 4240, "tcp"), "the world reaches node2");
    assert!(!lab.probe("node1", "172.30.0.12", 4240, "tcp"), "node1 -> node2: not the world, denied by node1's egress");
    assert!(!lab.probe("node1", "default/server", 80, "tcp"), "node1 -> a pod of node2: denied");
    for _ in 0..3 {
        assert_eq!(
            lab.probe_pod("world", "172.30.0.11", 30080, "tcp").as_deref(),
            Some("default/server"),
            "NodePort on node1, backend on node2: forwarded from node1's address all the same"
        );
    }
}
