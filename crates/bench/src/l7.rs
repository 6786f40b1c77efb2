//! The L7 proxy's cost: DNS queries through the DNS proxy against the same
//! path without DNS rules (dnsperf and a latency loop); HTTP requests
//! through an L7 allow rule (our proxy), against the same path
//! with only L4 policy (no proxy), and against nginx as a plain reverse
//! proxy on the node (a well-known anchor): requests/s with each proxy on a
//! CPU of its own and concurrent connections (wrk), and the round trip with
//! everything on one CPU. And the proxy's memory per idle connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{LabGuard, median, percentile, pin_pid, pin_pid_to, rss_mb};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec: {containers: [{name: s, ports: [{containerPort: 80}, {containerPort: 8080}]}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/.*"}]
    - ports: [{port: "8080", protocol: TCP}]
"#;

const NGINX_PORT: u16 = 8081;

/// Concurrent connections of the throughput measurement.
const WRK_CONNS: u32 = 32;

/// Two clients of one DNS server pod: one through DNS rules (the DNS proxy),
/// one with the same L4 policy and no DNS rules.
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
metadata: {name: l4, labels: {app: l4}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: l7, labels: {app: l7}}
spec: {containers: [{name: c}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4}
spec:
  endpointSelector: {matchLabels: {app: l4}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7}
spec:
  endpointSelector: {matchLabels: {app: l7}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns: [{matchPattern: "*"}]
"#;

/// Sequential queries (one outstanding) for `secs`: (p50 µs, p99 µs).
fn dns_latency(netns: &str, server: SocketAddr, secs: u64) -> anyhow::Result<(f64, f64)> {
    crate::in_ns(netns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.connect(server)?;
        let mut q = vec![0u8, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["bench", "example", "com"] {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 512];
        let mut lat = Vec::new();
        let start = Instant::now();
        let mut id: u16 = 0;
        while start.elapsed() < Duration::from_secs(secs) {
            id = id.wrapping_add(1);
            q[0..2].copy_from_slice(&id.to_be_bytes());
            let t = Instant::now();
            s.send(&q)?;
            loop {
                let n = s.recv(&mut buf)?;
                if n >= 2 && buf[0..2] == id.to_be_bytes() {
                    break;
                }
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((percentile(lat.clone(), 0.5), percentile(lat, 0.99)))
    })
}

/// dnsperf's queries per second from inside `netns`, pinned to CPU 0.
fn dnsperf(netns: &str, server: std::net::Ipv4Addr, secs: u64, logs: &Path) -> anyhow::Result<f64> {
    let data = logs.join("dnsperf.txt");
    std::fs::write(&data, "bench.example.com A\n")?;
    let out = cilium_lab::sys::command_in(netns, None, "taskset")?
        .args(["-c", "0", "dnsperf", "-s", &server.to_string(), "-d", &data.display().to_string(), "-l", &secs.to_string(), "-q", "64"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:").and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("dnsperf output: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// The DNS rows: queries/s and latency through the DNS proxy and without it.
fn dns(rounds: usize, seconds: u64, logs: &Path, bin: &Path) -> anyhow::Result<String> {
    eprintln!("bench l7: DNS through the proxy and without it");
    let name = format!("bdns{}", std::process::id() % 10000);
    let _ = cilium_lab::down(&name);
    let _guard = LabGuard(name.clone());
    let manifest = logs.join("dns.yaml");
    std::fs::write(&manifest, DNS_PODS)?;
    let mut lab = cilium_lab::Lab::up(&name, bin, vec![], Default::default())?;
    lab.apply(cilium_lab::parse_files(&[manifest])?)?;
    let dns_pod = &lab.state.pods["kube-system/coredns"];
    let dns_ip = dns_pod.ip.context("dns ip")?;
    let dns_ns = dns_pod.netns.clone();
    let l4_ns = lab.state.pods["default/l4"].netns.clone();
    let l7_ns = lab.state.pods["default/l7"].netns.clone();
    let agent = lab.state.nodes[0].agent_pid.context("agent pid")?;
    let dnsmasq = cilium_lab::sys::spawn_daemon(
        &dns_ns,
        None,
        Path::new("/usr/sbin/dnsmasq"),
        &["-k", "--port=53", "--no-resolv", "--no-hosts", "--bind-interfaces", &format!("--listen-address={dns_ip}"), "--address=/bench.example.com/203.0.113.10", "--user=root", "--pid-file=", "--dns-forward-max=1000"]
            .map(String::from),
        &logs.join("dnsmasq.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    pin_pid(dnsmasq);
    pin_pid(agent);
    drop(lab);
    let server = SocketAddr::from((dns_ip, 53));
    let (mut q4, mut q7, mut l4p50, mut l4p99, mut l7p50, mut l7p99) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        eprintln!("bench l7: DNS round {}/{rounds}", round + 1);
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for proxied in order {
            let ns = if proxied { &l7_ns } else { &l4_ns };
            let qps = dnsperf(ns, dns_ip, seconds, logs)?;
            let (p50, p99) = dns_latency(ns, server, seconds)?;
            if proxied {
                q7.push(qps);
                l7p50.push(p50);
                l7p99.push(p99);
            } else {
                q4.push(qps);
                l4p50.push(p50);
                l4p99.push(p99);
            }
        }
    }
    cilium_lab::sys::stop(dnsmasq, Duration::from_secs(2));
    let (q4, q7) = (median(q4), median(q7));
    let (a50, a99, b50, b99) = (median(l4p50), median(l4p99), median(l7p50), median(l7p99));
    let met = |ok: bool| if ok { "met" } else { "not met" };
    let mut md = String::from("\n### DNS\n\n| Path | Queries/s (dnsperf) | p50 | p99 |\n|---|---|---|---|\n");
    md.push_str(&format!("| Without DNS rules (no proxy) | {q4:.0} | {a50:.0} µs | {a99:.0} µs |\n"));
    md.push_str(&format!("| Through the DNS proxy (`dns: [{{matchPattern: \"*\"}}]`) | {q7:.0} | {b50:.0} µs | {b99:.0} µs |\n"));
    md.push_str("\n| Goal | Result | |\n|---|---|---|\n");
    md.push_str(&format!("| ≥ 30,000 queries/s through the proxy | {q7:.0} | {} |\n", met(q7 >= 30_000.0)));
    md.push_str(&format!("| ≤ +100 µs at p99 | +{:.0} µs | {} |\n", b99 - a99, met(b99 - a99 <= 100.0)));
    md.push_str(&format!(
        "\ndnsmasq (Debian) answers `bench.example.com A` from a pod; two client pods have the same L4 egress policy,\n\
         one of them with a DNS rule (so its queries go through the proxy, which also teaches the agent the\n\
         answer). dnsperf ({seconds} s, 64 outstanding) and a sequential query loop for latency (one outstanding);\n\
         dnsperf, dnsmasq and the agent pinned to CPU 0; {rounds} rounds, medians.\n"
    ));
    Ok(md)
}

/// Sequential GETs on one keep-alive connection for `secs`: (requests/s,
/// p50 µs, p99 µs).
fn http_rr(netns: &str, addr: SocketAddr, secs: u64) -> anyhow::Result<(f64, f64, f64)> {
    crate::in_ns(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let req = b"GET /bench HTTP/1.1\r\nHost: server\r\n\r\n";
        let mut buf = vec![0u8; 4096];
        let mut one = |s: &mut TcpStream| -> anyhow::Result<()> {
            s.write_all(req)?;
            let mut have = 0usize;
            loop {
                let n = s.read(&mut buf[have..])?;
                anyhow::ensure!(n > 0, "connection closed");
                have += n;
                let text = &buf[..have];
                if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&text[..end]).to_ascii_lowercase();
                    anyhow::ensure!(head.starts_with("http/1.1 200"), "status: {}", head.lines().next().unwrap_or(""));
                    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    if have >= end + 4 + len {
                        return Ok(());
                    }
                }
            }
        };
        for _ in 0..500 {
            one(&mut s)?;
        }
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            let t = Instant::now();
            one(&mut s)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let rps = lat.len() as f64 / start.elapsed().as_secs_f64();
        Ok((rps, percentile(lat.clone(), 0.5), percentile(lat, 0.99)))
    })
}

/// wrk from inside `netns`, pinned to CPU 0, with `conns` keep-alive
/// connections for `secs`: (requests/s, p50 µs, p99 µs). Fails on any
/// error or non-2xx response.
fn http_wrk(netns: &str, addr: SocketAddr, conns: u32, secs: u64) -> anyhow::Result<(f64, f64, f64)> {
    let out = cilium_lab::sys::command_in(netns, None, "taskset")?
        .args(["-c", "0", "wrk", "-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency", &format!("http://{addr}/bench")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "wrk: {text}{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(!text.contains("Non-2xx") && !text.contains("Socket errors"), "wrk saw errors: {text}");
    let micros = |v: &str| -> Option<f64> {
        let v = v.trim();
        let (n, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1e3)
        } else {
            (v.strip_suffix('s')?, 1e6)
        };
        n.parse::<f64>().ok().map(|n| n * scale)
    };
    let pct = |p: &str| text.lines().find_map(|l| l.trim().strip_prefix(p).and_then(micros));
    let rps = text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:").and_then(|v| v.trim().parse::<f64>().ok()));
    match (rps, pct("50%"), pct("99%")) {
        (Some(r), Some(p50), Some(p99)) => Ok((r, p50, p99)),
        _ => anyhow::bail!("wrk output: {text}"),
    }
}

/// Opens `n` connections through the proxy, each after one request, and
/// keeps them idle, twice: returns the agent's resident memory growth per
/// connection in KB over the second batch. The first batch brings Hubble's
/// flow ring to what these connections put in it (their datapath and L7
/// flows), so the second measures the connections alone.
fn idle_memory(netns: &str, addr: SocketAddr, agent: u32, n: usize) -> anyhow::Result<f64> {
    let batch = move || {
        crate::in_ns(netns, move || {
            let mut v = Vec::new();
            for _ in 0..n {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.write_all(b"GET /idle HTTP/1.1\r\nHost: server\r\n\r\n")?;
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf)?;
                v.push(s);
            }
            Ok(v)
        })
    };
    let first = batch()?;
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_mb(agent)?;
    let second = batch()?;
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_mb(agent)?;
    drop((first, second));
    Ok((after - before) * 1024.0 / n as f64)
}

/// The L7 section of BENCHMARKS.md.
pub fn run(rounds: usize, seconds: u64, logs: &Path, bin: &Path) -> anyhow::Result<String> {
    eprintln!("bench l7: lab with an L7 rule on port 80, L4 only on 8080");
    let name = format!("bl7{}", std::process::id() % 10000);
    let _ = cilium_lab::down(&name);
    let _guard = LabGuard(name.clone());
    let manifest = logs.join("l7.yaml");
    std::fs::write(&manifest, PODS)?;
    let extra: Vec<String> = std::env::var("BENCH_L7_AGENT_ARGS").map(|v| v.split_whitespace().map(String::from).collect()).unwrap_or_default();
    let mut lab = cilium_lab::Lab::up(&name, bin, extra, Default::default())?;
    lab.apply(cilium_lab::parse_files(&[manifest])?)?;
    let client_ns = lab.state.pods["default/client"].netns.clone();
    let server_ip = lab.state.pods["default/server"].ip.context("server ip")?;
    let node = lab.state.nodes[0].clone();
    let agent = node.agent_pid.context("agent pid")?;
    let server_pid = lab.state.pods["default/server"].workload_pid.context("server workload")?;

    // nginx in the node's namespace, proxying to the server's L4 port
    let conf = logs.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\npid {pid};\nerror_log {err};\ndaemon off;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 600s;\n  upstream s {{ server {server_ip}:8080; keepalive 64; keepalive_requests 100000000; }}\n  server {{\n    listen {ip}:{NGINX_PORT};\n    location / {{ proxy_pass http://s; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            pid = logs.join("nginx.pid").display(),
            err = logs.join("nginx.err").display(),
            ip = node.ip,
        ),
    )?;
    let nginx = cilium_lab::sys::spawn_daemon(&node.netns, None, Path::new("/usr/sbin/nginx"), &["-c".into(), conf.display().to_string()], &logs.join("nginx.log"))?;
    std::thread::sleep(Duration::from_millis(500));
    // the proxies: the agent, nginx and its worker (a child)
    let pin_proxies = |cpu: usize| {
        for p in [agent, nginx] {
            pin_pid_to(p, cpu);
        }
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{nginx}/task/{nginx}/children")) {
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                pin_pid_to(c, cpu);
            }
        }
    };
    pin_pid(server_pid);
    pin_proxies(0);
    drop(lab);

    let targets: [(&str, SocketAddr); 3] = [
        ("L4 policy only (no proxy)", SocketAddr::from((server_ip, 8080))),
        ("L7 rule (our proxy)", SocketAddr::from((server_ip, 80))),
        ("nginx reverse proxy on the node", SocketAddr::from((node.ip, NGINX_PORT))),
    ];
    // first, while the agent has not yet grown buffers it could reuse
    eprintln!("bench l7: memory per idle proxied connection");
    let per_conn = idle_memory(&client_ns, targets[1].1, agent, 1000)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut res: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![(vec![], vec![], vec![]); 3];
    for round in 0..rounds {
        eprintln!("bench l7: round {}/{rounds}", round + 1);
        let order: Vec<usize> = (0..3).map(|i| (i + round) % 3).collect();
        for i in order {
            let (rps, p50, p99) = http_rr(&client_ns, targets[i].1, seconds).with_context(|| targets[i].0.to_string())?;
            res[i].0.push(rps);
            res[i].1.push(p50);
            res[i].2.push(p99);
        }
    }
    // throughput: the proxies on CPU 1 of their own, client and server on CPU 0
    pin_proxies(1);
    let mut thr: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![(vec![], vec![], vec![]); 3];
    for round in 0..rounds {
        eprintln!("bench l7: throughput round {}/{rounds}", round + 1);
        let order: Vec<usize> = (0..3).map(|i| (i + round) % 3).collect();
        for i in order {
            let (rps, p50, p99) = http_wrk(&client_ns, targets[i].1, WRK_CONNS, seconds).with_context(|| targets[i].0.to_string())?;
            thr[i].0.push(rps);
            thr[i].1.push(p50);
            thr[i].2.push(p99);
        }
    }
    cilium_lab::sys::stop(nginx, Duration::from_secs(2));

    let dns_md = dns(rounds, seconds, logs, bin)?;
    let table = |res: &[(Vec<f64>, Vec<f64>, Vec<f64>)]| {
        let m = |i: usize| (median(res[i].0.clone()), median(res[i].1.clone()), median(res[i].2.clone()));
        let mut md = String::from("| Path | Requests/s | Ratio to L4 | p50 | p99 |\n|---|---|---|---|---|\n");
        for (i, (label, _)) in targets.iter().enumerate() {
            let (r, p50, p99) = m(i);
            md.push_str(&format!("| {label} | {r:.0} | **{:.3}** | {p50:.0} µs | {p99:.0} µs |\n", r / m(0).0));
        }
        let rounds = |i: usize| res[i].0.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ");
        md.push_str(&format!("\nRounds (requests/s, L4 / L7 / nginx): {} / {} / {}.\n", rounds(0), rounds(1), rounds(2)));
        (md, m(0), m(1), m(2))
    };
    let (thr_md, t4, t7, tngx) = table(&thr);
    let (rr_md, l4, l7, _) = table(&res);
    let met = |ok: bool| if ok { "met" } else { "not met" };
    let mut md = String::from("## L7 proxy (HTTP)\n\n| Goal | Result | |\n|---|---|---|\n");
    md.push_str(&format!("| L7 ≥ 0.5× L4 requests/s (the proxy on a CPU of its own, {WRK_CONNS} connections) | {:.3} | {} |\n", t7.0 / t4.0, met(t7.0 / t4.0 >= 0.5)));
    md.push_str(&format!("| (for reference) the same with everything on one CPU and one connection | {:.3} | |\n", l7.0 / l4.0));
    md.push_str(&format!("| L7 adds ≤ 100 µs at p50 (one connection) | +{:.0} µs | {} |\n", l7.1 - l4.1, met(l7.1 - l4.1 <= 100.0)));
    md.push_str(&format!("| ≤ 10 KB of proxy memory per idle connection | {per_conn:.1} KB | {} |\n", met(per_conn <= 10.0)));
    md.push_str(&format!("| (for reference) our proxy vs nginx, requests/s on a CPU of its own | {:.3} | |\n", t7.0 / tngx.0));
    md.push_str(&format!(
        "\n### Requests/s: each proxy on a CPU of its own\n\n{thr_md}\n\
         wrk (Debian; one thread, {WRK_CONNS} keep-alive connections, {seconds} s, `GET /bench`) from the client pod\n\
         and the server workload on CPU 0; the agent (and so the proxy) and nginx (one worker) on CPU 1,\n\
         so each proxy has that one CPU to itself; {rounds} rounds, rotating which path goes first.\n\
         The L4 path never uses CPU 1: its rate is what CPU 0 can do for client and server alone.\n\
         \n### Round trip: everything on one CPU, one connection\n\n{rr_md}\n\
         One keep-alive connection from the client pod, sequential `GET /bench` requests; client, server\n\
         workload, agent and nginx all on CPU 0, so each request pays the proxy's two extra socket hops and\n\
         context switches in full (nginx shows the ceiling this leaves any user-space proxy);\n\
         {rounds} rounds × {seconds} s, rotating which path goes first.\n\
         \nBoth: port 80 carries an HTTP rule (`GET /.*`), so each request is parsed, checked and\n\
         reported to Hubble (a request and a response flow) by the proxy; port 8080 has the same L3/L4\n\
         policy without L7 rules. nginx 1.22 (Debian) runs in the node's namespace with keep-alive\n\
         upstream connections to port 8080. Idle memory, measured first on a fresh agent: 1000\n\
         connections each after one request (each also holds its upstream connection) are opened and\n\
         kept, which also fills Hubble's flow ring with what such connections put in it; then the\n\
         agent's RSS growth over 1000 more, / 1000.\n"
    ));
    md.push_str(&dns_md);
    Ok(md)
}
