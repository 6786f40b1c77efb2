//! Across nodes. Pod-to-pod request/response, new connections and
//! throughput between pods of two nodes, with an L3/L4 policy on both, in
//! native routing and in tunnel mode (VXLAN), each against the same
//! namespaces routed by the kernel with no BPF (two node namespaces joined
//! through a router namespace, each pod behind a veth of its node), all in
//! the same run and pinned to one CPU. And the time a new pod's identity and
//! ipcache entry take to reach the other nodes through etcd, in a 3-node
//! tunnel-mode lab that already runs `pods` pods.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{BENCH_POLICY, LabGuard, RR_PORT, crr, iperf, median, percentile, rr, servers, sh};

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Pods running before the propagation measurement.
    pub pods: u32,
    /// New pods whose propagation is timed.
    pub additions: u32,
}

/// The client on node1, the server on node2 (with [`BENCH_POLICY`]).
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec: {nodeName: node2, containers: [{name: s}]}
"#;

/// The baseline: the lab's addressing across two nodes (node i at
/// 172.30.0.1i behind a router at 172.30.0.1, pods 10.0.i.2), plain veths,
/// kernel routing, no BPF.
struct Baseline {
    prefix: String,
    pids: Vec<u32>,
}

impl Baseline {
    fn ns(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    fn up(logs: &Path) -> anyhow::Result<Baseline> {
        let mut b = Baseline { prefix: format!("cbm{}", std::process::id()), pids: vec![] };
        let router = b.ns("router");
        for ns in [router.clone(), b.ns("n1"), b.ns("n2"), b.ns("c"), b.ns("s")] {
            sh("ip", &["netns", "add", &ns])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            cilium_lab::sys::netns_sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        }
        for (i, pod) in [(1u8, b.ns("c")), (2, b.ns("s"))] {
            let node = b.ns(&format!("n{i}"));
            let (node_ip, pod_ip) = (format!("172.30.0.1{i}"), format!("10.0.{i}.2"));
            let up = format!("r{i}");
            sh("ip", &["-n", &router, "link", "add", &up, "type", "veth", "peer", "name", "eth0", "netns", &node])?;
            sh("ip", &["-n", &router, "addr", "add", "172.30.0.1/32", "dev", &up])?;
            sh("ip", &["-n", &router, "link", "set", &up, "up"])?;
            sh("ip", &["-n", &router, "route", "add", &format!("{node_ip}/32"), "dev", &up])?;
            sh("ip", &["-n", &router, "route", "add", &format!("10.0.{i}.0/24"), "via", &node_ip])?;
            sh("ip", &["-n", &node, "addr", "add", &format!("{node_ip}/32"), "dev", "eth0"])?;
            sh("ip", &["-n", &node, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &node, "route", "add", "172.30.0.1", "dev", "eth0"])?;
            sh("ip", &["-n", &node, "route", "add", "default", "via", "172.30.0.1"])?;
            sh("ip", &["-n", &node, "link", "add", "p", "type", "veth", "peer", "name", "eth0", "netns", &pod])?;
            sh("ip", &["-n", &node, "link", "set", "p", "up"])?;
            sh("ip", &["-n", &node, "route", "add", &format!("{pod_ip}/32"), "dev", "p", "src", &node_ip])?;
            sh("ip", &["-n", &pod, "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
            sh("ip", &["-n", &pod, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &pod, "route", "add", &node_ip, "dev", "eth0", "scope", "link"])?;
            sh("ip", &["-n", &pod, "route", "add", "default", "via", &node_ip, "dev", "eth0"])?;
        }
        b.pids = servers(&b.ns("s"), logs)?;
        Ok(b)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        for p in &self.pids {
            cilium_lab::sys::stop(*p, Duration::from_secs(2));
        }
        for ns in ["router", "n1", "n2", "c", "s"] {
            cilium_lab::sys::netns_delete(&self.ns(ns));
        }
    }
}

/// A two-node lab with the client on node1 and the server on node2.
struct Pair {
    _guard: LabGuard,
    client: String,
    server: Ipv4Addr,
    pids: Vec<u32>,
}

fn pair(mode: cilium_lab::RoutingMode, logs: &Path, bin: &Path) -> anyhow::Result<Pair> {
    let name = format!("bx{}{}", mode.as_str().chars().next().unwrap_or('x'), std::process::id() % 10000);
    let _ = cilium_lab::down(&name);
    let guard = LabGuard(name.clone());
    let manifest = logs.join(format!("{name}.yaml"));
    std::fs::write(&manifest, format!("{PODS}---{BENCH_POLICY}"))?;
    let mut lab = cilium_lab::Lab::up(&name, bin, vec![], cilium_lab::LabOptions { nodes: 2, kvstore: false, routing_mode: mode, ipv6: false })?;
    lab.apply(cilium_lab::parse_files(&[manifest])?)?;
    lab.wait_for_cluster_view(Duration::from_secs(20))?;
    let server = &lab.state.pods["default/server"];
    let pids = servers(&server.netns, logs)?;
    Ok(Pair { _guard: guard, client: lab.state.pods["default/client"].netns.clone(), server: server.ip.context("server ip")?, pids })
}

/// Times from CNI ADD returning until both other nodes' ipcache name the
/// new pod with an identity and its node (milliseconds, wall clock: the lab
/// records when CNI ADD returned, and applying goes on after that; 5000
/// when it did not arrive within 5 s of the apply returning).
fn propagation(o: &Options, logs: &Path, bin: &Path) -> anyhow::Result<(Vec<f64>, usize)> {
    let name = format!("bxp{}", std::process::id() % 10000);
    let _ = cilium_lab::down(&name);
    let _guard = LabGuard(name.clone());
    let dep = logs.join("prop.yaml");
    std::fs::write(
        &dep,
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: many}}\nspec:\n  replicas: {}\n  selector: {{matchLabels: {{app: many}}}}\n  template:\n    metadata: {{labels: {{app: many}}}}\n    spec: {{containers: [{{name: c}}]}}\n", o.pods),
    )?;
    let mut lab = cilium_lab::Lab::up(&name, bin, vec![], cilium_lab::LabOptions { nodes: 3, kvstore: true, routing_mode: cilium_lab::RoutingMode::Tunnel, ipv6: false })?;
    eprintln!("bench: {} pods on 3 nodes", o.pods);
    lab.apply(cilium_lab::parse_files(&[dep])?)?;
    lab.wait_for_cluster_view(Duration::from_secs(60))?;
    let maps: Vec<std::os::fd::OwnedFd> =
        lab.state.nodes.iter().map(|n| cilium_datapath::sys::obj_get(&n.bpf_root.join("cilium_ipcache"))).collect::<Result<_, _>>().context("opening the nodes' ipcaches")?;
    let mut times = Vec::new();
    let mut missed = 0;
    for k in 0..o.additions {
        let node = (k % 3) as usize;
        let pod = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: new{k}, labels: {{app: new{k}}}}}\nspec: {{nodeName: node{}, containers: [{{name: c}}]}}\n", node + 1);
        let f = logs.join(format!("new{k}.yaml"));
        std::fs::write(&f, pod)?;
        lab.apply(cilium_lab::parse_files(&[f])?)?;
        let p = &lab.state.pods[&format!("default/new{k}")];
        let ip = p.ip.context("new pod ip")?;
        let added_us = p.cni_added_at_us.context("CNI ADD time")?;
        let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        let t0 = Instant::now();
        let key = cilium_abi::IpcacheKey { prefixlen: 32, addr: cilium_datapath::ip_to_be(ip) };
        let mut pending: Vec<usize> = (0..3).filter(|i| *i != node).collect();
        while !pending.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            pending.retain(|i| {
                use std::os::fd::AsFd;
                let v: Option<cilium_abi::IpcacheValue> = cilium_datapath::sys::map_lookup(maps[*i].as_fd(), &key).unwrap_or(None);
                !v.is_some_and(|v| v.tunnel_endpoint != 0 && v.sec_identity != cilium_abi::ReservedIdentity::World.code())
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        if pending.is_empty() {
            times.push(now_us().saturating_sub(added_us) as f64 / 1000.0);
        } else {
            missed += 1;
            times.push(5000.0);
        }
    }
    Ok((times, missed))
}

pub fn run(o: &Options, logs: &Path, bin: &Path) -> anyhow::Result<String> {
    eprintln!("bench: cross-node baseline (two node namespaces, plain routing, no BPF)");
    let base = Baseline::up(logs)?;
    eprintln!("bench: two-node labs, native routing and tunnel mode");
    let native = pair(cilium_lab::RoutingMode::Native, logs, bin)?;
    let tunnel = pair(cilium_lab::RoutingMode::Tunnel, logs, bin)?;
    let targets = [(base.ns("c"), Ipv4Addr::new(10, 0, 2, 2)), (native.client.clone(), native.server), (tunnel.client.clone(), tunnel.server)];
    // [config][metric] -> rounds
    let mut res = vec![vec![Vec::new(); 3]; 3];
    for round in 0..o.rounds {
        eprintln!("bench: cross-node round {}/{}", round + 1, o.rounds);
        for j in 0..3 {
            // rotate the order, so drift favours no configuration
            let i = (j + round) % 3;
            let (ns, ip) = &targets[i];
            res[i][0].push(rr(ns, *ip, RR_PORT, o.seconds)?);
            res[i][1].push(crr(ns, *ip, RR_PORT, o.seconds)?);
            res[i][2].push(iperf(ns, *ip, o.seconds)?);
        }
    }
    for p in native.pids.iter().chain(&tunnel.pids) {
        cilium_lab::sys::stop(*p, Duration::from_secs(2));
    }
    drop((native, tunnel, base));

    let (prop, missed) = propagation(o, logs, bin)?;

    let mut md = String::new();
    md.push_str("## Pod to pod across two nodes\n\n");
    md.push_str(&format!(
        "{} rounds × {} s per measurement; client on node1, server on node2, L3/L4 policy on both; the baseline routes the same addresses through the same kind of namespaces with no BPF and no encapsulation.\n\n",
        o.rounds, o.seconds
    ));
    md.push_str("| Metric | Baseline | Native routing | Ratio | Tunnel (VXLAN) | Ratio | Goal |\n|---|---|---|---|---|---|---|\n");
    for (m, (label, unit)) in [("Request/response (TCP, 2-byte echo)", "tx/s"), ("New connections (connect, echo, close)", "conn/s"), ("Throughput (iperf3, 1 stream)", "Gbit/s")].iter().enumerate() {
        let b = median(res[0][m].clone());
        let n = median(res[1][m].clone());
        let t = median(res[2][m].clone());
        md.push_str(&format!("| {label} | {b:.1} {unit} | {n:.1} {unit} | **{:.3}** | {t:.1} {unit} | **{:.3}** | none set |\n", n / b, t / b));
    }
    md.push_str("\nAll rounds (baseline / native / tunnel):\n\n");
    for (m, label) in ["rr tx/s", "crr conn/s", "throughput Gbit/s"].iter().enumerate() {
        let f = |v: &Vec<f64>| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
        md.push_str(&format!("- {label}: {} / {} / {}\n", f(&res[0][m]), f(&res[1][m]), f(&res[2][m])));
    }
    let (p50, p99) = (percentile(prop.clone(), 0.5), percentile(prop.clone(), 0.99));
    md.push_str("\n## Identity propagation through etcd\n\n");
    md.push_str(&format!(
        "3 nodes in tunnel mode with {} pods running; {} new pods, each with labels of its own (a new cluster-wide identity), created one at a time on each node in turn. Timed from CNI ADD returning on the pod's node until both other nodes' ipcache hold its address with its identity and its node as tunnel endpoint (their pinned maps read directly).\n\n",
        o.pods, o.additions
    ));
    md.push_str("| Metric | Value | Goal | |\n|---|---|---|---|\n");
    md.push_str(&format!("| New pod on every node, p50 | {p50:.1} ms | | |\n"));
    md.push_str(&format!("| New pod on every node, p99 | {p99:.1} ms | ≤ 100 ms | {} |\n", if p99 <= 100.0 { "met" } else { "not met" }));
    if missed > 0 {
        md.push_str(&format!("\n{missed} of {} did not arrive within 5 s (counted as 5000 ms).\n", o.additions));
    }
    Ok(md)
}
