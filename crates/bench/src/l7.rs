//! The L7 proxy's cost: HTTP request/response over one keep-alive
//! connection through an L7 allow rule (our proxy), against the same path
//! with only L4 policy (no proxy), and against nginx as a plain reverse
//! proxy on the node (a well-known anchor); client, server, agent and nginx
//! pinned to one CPU. And the proxy's memory per idle connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{LabGuard, median, percentile, pin_pid, rss_mb};

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

/// Opens `n` connections through the proxy, each after one request, and
/// keeps them idle: returns the agent's resident memory growth per
/// connection in KB.
fn idle_memory(netns: &str, addr: SocketAddr, agent: u32, n: usize) -> anyhow::Result<f64> {
    let before = rss_mb(agent)?;
    let held = crate::in_ns(netns, move || {
        let mut v = Vec::new();
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.write_all(b"GET /idle HTTP/1.1\r\nHost: server\r\n\r\n")?;
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf)?;
            v.push(s);
        }
        Ok(v)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_mb(agent)?;
    drop(held);
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
    let mut lab = cilium_lab::Lab::up(&name, bin, extra)?;
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
            "worker_processes 1;\npid {pid};\nerror_log {err};\ndaemon off;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 600s;\n  upstream s {{ server {server_ip}:8080; keepalive 16; keepalive_requests 100000000; }}\n  server {{\n    listen {ip}:{NGINX_PORT};\n    location / {{ proxy_pass http://s; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            pid = logs.join("nginx.pid").display(),
            err = logs.join("nginx.err").display(),
            ip = node.ip,
        ),
    )?;
    let nginx = cilium_lab::sys::spawn_daemon(&node.netns, None, Path::new("/usr/sbin/nginx"), &["-c".into(), conf.display().to_string()], &logs.join("nginx.log"))?;
    std::thread::sleep(Duration::from_millis(500));
    for p in [agent, server_pid, nginx] {
        pin_pid(p);
    }
    // nginx's worker is its child
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{nginx}/task/{nginx}/children")) {
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            pin_pid(c);
        }
    }
    drop(lab);

    let targets: [(&str, SocketAddr); 3] = [
        ("L4 policy only (no proxy)", SocketAddr::from((server_ip, 8080))),
        ("L7 rule (our proxy)", SocketAddr::from((server_ip, 80))),
        ("nginx reverse proxy on the node", SocketAddr::from((node.ip, NGINX_PORT))),
    ];
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
    eprintln!("bench l7: memory per idle proxied connection");
    let per_conn = idle_memory(&client_ns, targets[1].1, agent, 1000)?;
    cilium_lab::sys::stop(nginx, Duration::from_secs(2));

    let m = |i: usize| (median(res[i].0.clone()), median(res[i].1.clone()), median(res[i].2.clone()));
    let (l4, l7, ngx) = (m(0), m(1), m(2));
    let met = |ok: bool| if ok { "met" } else { "not met" };
    let mut md = String::from("## L7 proxy (HTTP)\n\n");
    md.push_str("| Path | Requests/s | Ratio to L4 | p50 | p99 |\n|---|---|---|---|---|\n");
    for (i, (label, _)) in targets.iter().enumerate() {
        let (r, p50, p99) = m(i);
        md.push_str(&format!("| {label} | {r:.0} | **{:.3}** | {p50:.0} µs | {p99:.0} µs |\n", r / l4.0));
    }
    md.push_str("\n| Goal | Result | |\n|---|---|---|\n");
    md.push_str(&format!("| L7 ≥ 0.5× L4 requests/s | {:.3} | {} |\n", l7.0 / l4.0, met(l7.0 / l4.0 >= 0.5)));
    md.push_str(&format!("| L7 adds ≤ 100 µs at p50 | +{:.0} µs | {} |\n", l7.1 - l4.1, met(l7.1 - l4.1 <= 100.0)));
    md.push_str(&format!("| ≤ 10 KB of proxy memory per idle connection | {per_conn:.1} KB | {} |\n", met(per_conn <= 10.0)));
    md.push_str(&format!("| (for reference) our proxy vs nginx, requests/s | {:.3} | |\n", l7.0 / ngx.0));
    md.push_str(&format!(
        "\nOne keep-alive connection from the client pod, sequential `GET /bench` requests answered by the\n\
         lab's HTTP workload; {rounds} rounds × {seconds} s, rotating which path goes first; client, server\n\
         workload, agent (and so the proxy) and nginx pinned to CPU 0. Port 80 carries an HTTP rule\n\
         (`GET /.*`), so each request is parsed and checked by the proxy; port 8080 has the same L3/L4\n\
         policy without L7 rules. nginx 1.22 (Debian) runs in the node's namespace with a keep-alive\n\
         upstream to port 8080. Idle memory: 1000 connections each after one request (so each also holds\n\
         its upstream connection), the agent's RSS growth divided by 1000.\n\
         Rounds (requests/s, L4 / L7 / nginx): {} / {} / {}.\n",
        res[0].0.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        res[1].0.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        res[2].0.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
    ));
    Ok(md)
}
