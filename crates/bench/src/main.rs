//! cilium-bench: measures pod-to-pod request/response rate, new connections
//! per second and throughput through our datapath with an L3/L4 policy, each
//! against the same pods over plain veth routing without BPF taken in the
//! same run; the agent's memory with 100 endpoints; endpoint creation
//! latency (CNI ADD until the endpoint is enforced); and services against
//! kube-proxy's rulesets ([`services`]). Client, server and their softirq
//! processing are pinned to one CPU. Writes BENCHMARKS.md.

mod datapath;
mod hubble;
mod l7;
mod multinode;
mod services;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "cilium-rs benchmarks")]
struct Args {
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Endpoints for the memory and creation-latency measurement.
    #[arg(long, default_value_t = 100)]
    pods: u32,
    /// Service counts for the service benchmark.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,5000,10000")]
    service_counts: Vec<u32>,
    /// Rounds per service measurement.
    #[arg(long, default_value_t = 5)]
    service_rounds: usize,
    /// Seconds per service measurement.
    #[arg(long, default_value_t = 2)]
    service_seconds: u64,
    /// Pods running in the 3-node lab before identity propagation is timed.
    #[arg(long, default_value_t = 300)]
    cluster_pods: u32,
    /// New pods whose propagation to the other nodes is timed.
    #[arg(long, default_value_t = 50)]
    propagation_pods: u32,
    /// Run one part only: pods, services, hubble, l7, multinode or datapath.
    #[arg(long)]
    only: Option<String>,
}

/// Where cgroup v2 is mounted on this machine kind.
const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

const RR_PORT: u16 = 7777;
const IPERF_PORT: u16 = 5201;
const CPU: usize = 0;

fn bin_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)).unwrap_or_default()
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pins every thread of a process to CPU 0.
fn pin_pid(pid: u32) {
    pin_pid_to(pid, CPU)
}

/// Pins every thread of a process to `cpu`.
fn pin_pid_to(pid: u32, cpu: usize) {
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() {
                let mut set = nix::sched::CpuSet::new();
                let _ = set.set(cpu);
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
            }
        }
    }
}

fn pin_self() {
    let mut set = nix::sched::CpuSet::new();
    let _ = set.set(CPU);
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// Runs `f` on a thread inside `netns`, pinned.
fn in_ns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    let path = cilium_lab::sys::netns_path(netns);
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&path)?;
        pin_self();
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
}

fn rr(netns: &str, server: Ipv4Addr, port: u16, secs: u64) -> anyhow::Result<f64> {
    in_ns(netns, move || {
        let mut s = TcpStream::connect(SocketAddr::from((server, port)))?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 2];
        // warm up
        for _ in 0..1000 {
            s.write_all(b"x\n")?;
            s.read_exact(&mut buf)?;
        }
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            for _ in 0..100 {
                s.write_all(b"x\n")?;
                s.read_exact(&mut buf)?;
            }
            n += 100;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}

fn crr(netns: &str, server: Ipv4Addr, port: u16, secs: u64) -> anyhow::Result<f64> {
    in_ns(netns, move || {
        let addr = SocketAddr::from((server, port));
        let start = Instant::now();
        let mut n = 0u64;
        let mut buf = [0u8; 2];
        while start.elapsed() < Duration::from_secs(secs) {
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            // close with RST: no TIME_WAIT, so ports never run out
            set_linger_zero(&s)?;
            s.write_all(b"x\n")?;
            s.read_exact(&mut buf)?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}

fn set_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), size_of::<libc::linger>() as u32)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn iperf(netns: &str, server: Ipv4Addr, secs: u64) -> anyhow::Result<f64> {
    let mut cmd = cilium_lab::sys::command_in(netns, None, "taskset")?;
    let out = cmd
        .args(["-c", &CPU.to_string(), "iperf3", "-c", &server.to_string(), "-p", &IPERF_PORT.to_string(), "-t", &secs.to_string(), "-J"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(bps / 1e9)
}

/// Starts the echo server and iperf3 server in `netns`, pinned. Returns pids.
fn servers(netns: &str, log_dir: &Path) -> anyhow::Result<Vec<u32>> {
    let ready = log_dir.join(format!("{netns}.ready"));
    let _ = std::fs::remove_file(&ready);
    let w = cilium_lab::sys::spawn_daemon(
        netns,
        None,
        &bin_dir().join("cilium"),
        &["lab".into(), "workload".into(), "--pod".into(), "bench".into(), "--tcp".into(), RR_PORT.to_string(), "--ready-file".into(), ready.display().to_string()],
        &log_dir.join(format!("{netns}.log")),
    )?;
    let i = cilium_lab::sys::spawn_daemon(netns, None, Path::new("/usr/bin/iperf3"), &["-s".into(), "-p".into(), IPERF_PORT.to_string()], &log_dir.join(format!("{netns}.iperf.log")))?;
    let until = Instant::now() + Duration::from_secs(10);
    while !ready.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    pin_pid(w);
    pin_pid(i);
    Ok(vec![w, i])
}

/// The baseline: the same addressing as a lab node, plain veths, kernel
/// routing, no BPF anywhere.
struct Baseline {
    prefix: String,
    pids: Vec<u32>,
}

impl Baseline {
    fn client(&self) -> String {
        format!("{}-client", self.prefix)
    }
    fn server(&self) -> String {
        format!("{}-server", self.prefix)
    }
    fn up(log_dir: &Path) -> anyhow::Result<Baseline> {
        let prefix = format!("cb{}", std::process::id());
        let mut b = Baseline { prefix: prefix.clone(), pids: vec![] };
        let router = format!("{prefix}-router");
        for ns in [&router, &b.client(), &b.server()] {
            sh("ip", &["netns", "add", ns])?;
            sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        cilium_lab::sys::netns_sysctl(&router, "net.ipv4.ip_forward", "1")?;
        sh("ip", &["-n", &router, "addr", "add", "10.0.1.1/32", "dev", "lo"])?;
        for (ns, ip, dev) in [(b.client(), "10.0.1.2", "c"), (b.server(), "10.0.1.3", "s")] {
            sh("ip", &["-n", &router, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh("ip", &["-n", &router, "link", "set", dev, "up"])?;
            sh("ip", &["-n", &router, "route", "add", &format!("{ip}/32"), "dev", dev, "src", "10.0.1.1"])?;
            sh("ip", &["-n", &ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "route", "add", "10.0.1.1/32", "dev", "eth0", "scope", "link"])?;
            sh("ip", &["-n", &ns, "route", "add", "default", "via", "10.0.1.1", "dev", "eth0"])?;
        }
        b.pids = servers(&b.server(), log_dir)?;
        Ok(b)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        for p in &self.pids {
            cilium_lab::sys::stop(*p, Duration::from_secs(2));
        }
        for ns in ["router", "client", "server"] {
            cilium_lab::sys::netns_delete(&format!("{}-{ns}", self.prefix));
        }
    }
}

struct LabGuard(String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = cilium_lab::down(&self.0);
    }
}

const BENCH_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec: {containers: [{name: s}]}
"#;

/// The L3/L4 policy of every pod-to-pod benchmark: the server admits the
/// client, the client may reach the server, on the echo and iperf3 ports.
const BENCH_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "7777", protocol: TCP}, {port: "5201", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts: [{ports: [{port: "7777", protocol: TCP}, {port: "5201", protocol: TCP}]}]
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).context("VmRSS")?;
    Ok(kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // the tree as the measured binaries were built from it (scripts/bench.sh
    // builds right before this runs)
    let rev = sh("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default().trim().to_string();
    let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).unwrap_or_default().trim().is_empty();
    let logs = tempdir()?;
    let bin = bin_dir();
    if !Path::new("/usr/bin/iperf3").exists() {
        bail!("iperf3 missing: apt-get install iperf3 (scripts/setup.sh does)");
    }
    cilium_datapath::sys::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    if let Some(o) = &a.only {
        if !["pods", "services", "hubble", "l7", "multinode", "datapath"].contains(&o.as_str()) {
            bail!("--only {o:?}: want pods, services, hubble, l7, multinode or datapath");
        }
    }
    let part = |p: &str| a.only.as_deref().is_none_or(|o| o == p);
    let pods_md = if part("pods") { Some(pods(&a, &logs, &bin)?) } else { None };
    let hubble_md = if part("hubble") { Some(hubble::run(a.rounds, a.seconds, &logs, &bin)?) } else { None };
    let l7_md = if part("l7") { Some(l7::run(a.rounds, a.seconds, &logs, &bin)?) } else { None };
    let mn_opts = multinode::Options { rounds: a.rounds, seconds: a.seconds, pods: a.cluster_pods, additions: a.propagation_pods };
    let multinode_md = if part("multinode") { Some(multinode::run(&mn_opts, &logs, &bin)?) } else { None };
    let svc_opts = services::Options { counts: a.service_counts.clone(), rounds: a.service_rounds, seconds: a.service_seconds };
    let datapath_md = if part("datapath") { Some(datapath::run(a.rounds)?) } else { None };
    let svc_md = if part("services") { Some(services::run(&svc_opts, &logs)?.markdown(&svc_opts)) } else { None };

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let kernel = sh("uname", &["-r"]).unwrap_or_default().trim().to_string();
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default().trim().to_string();
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);

    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str("Generated by `scripts/bench.sh` (the `cilium-bench` binary). Every ratio compares\n");
    md.push_str("two measurements taken in the same run on the same machine: our datapath against\n");
    md.push_str("the same pods over plain veth routing with no BPF (the baseline). Client, server\n");
    md.push_str("and their softirq work are pinned to CPU 0. Medians of the rounds.\n\n");
    md.push_str(&format!("- Date: {date}\n- Commit: {rev}{}\n- Machine: {ncpu} vCPU, {cpu}, kernel {kernel}\n", if dirty { " (with uncommitted changes)" } else { "" }));
    md.push('\n');
    if let Some(p) = pods_md {
        md.push_str(&p);
    }
    if let Some(h) = hubble_md {
        md.push('\n');
        md.push_str(&h);
    }
    if let Some(l) = l7_md {
        md.push('\n');
        md.push_str(&l);
    }
    if let Some(m) = multinode_md {
        md.push('\n');
        md.push_str(&m);
    }
    if let Some(s) = svc_md {
        md.push('\n');
        md.push_str(&s);
    }
    if let Some(d) = datapath_md {
        md.push('\n');
        md.push_str(&d);
    }
    // one part of an existing report: replace its sections, keep the rest
    if a.only.is_some() {
        if let Ok(old) = std::fs::read_to_string(&a.out) {
            let body = md.split_once("- Machine:").and_then(|(_, rest)| rest.split_once("\n\n")).map(|(_, b)| b.to_string()).unwrap_or_default();
            let note = format!("_This section was measured on {date} at {rev}{} ({ncpu} vCPU, kernel {kernel}); the rest of the file comes from the run named at the top._\n\n", if dirty { " with uncommitted changes" } else { "" });
            md = merge_sections(&old, &body, &note);
        }
    }
    std::fs::write(&a.out, md)?;
    eprintln!("bench: wrote {}", a.out.display());
    print!("{}", std::fs::read_to_string(&a.out)?);
    Ok(())
}

/// Replaces (or appends) the `## ` sections of `new` in `old`, each marked
/// with `note`.
fn merge_sections(old: &str, new: &str, note: &str) -> String {
    let mut out = old.to_string();
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in new.lines() {
        if line.starts_with("## ") {
            sections.push((line.to_string(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    for (heading, body) in sections {
        let body = body.trim_start_matches('\n');
        let body = body.lines().filter(|l| !l.starts_with("_This section was measured")).collect::<Vec<_>>().join("\n");
        let text = format!("{heading}\n\n{note}{}\n", body.trim_end());
        match out.find(&format!("\n{heading}\n")) {
            Some(start) => {
                let from = start + 1;
                let end = out[from + heading.len()..].find("\n## ").map(|i| from + heading.len() + i + 1).unwrap_or(out.len());
                out.replace_range(from..end, &format!("{text}\n"));
            }
            None => {
                out.push('\n');
                out.push_str(&text);
            }
        }
    }
    out
}

/// Pod to pod, the agent with many endpoints, policy computation.
fn pods(a: &Args, logs: &Path, bin: &Path) -> anyhow::Result<String> {
    eprintln!("bench: baseline topology (plain veth routing, no BPF)");
    let base = Baseline::up(logs)?;
    eprintln!("bench: lab with an L3/L4 policy on both pods");
    let name = format!("bench{}", std::process::id() % 10000);
    let _ = cilium_lab::down(&name);
    let _guard = LabGuard(name.clone());
    let manifest = logs.join("bench.yaml");
    std::fs::write(&manifest, format!("{BENCH_PODS}---{BENCH_POLICY}"))?;
    let mut lab = cilium_lab::Lab::up(&name, bin, vec![], Default::default())?;
    lab.apply(cilium_lab::parse_files(&[manifest])?)?;
    let client_ns = lab.state.pods["default/client"].netns.clone();
    let server_ns = lab.state.pods["default/server"].netns.clone();
    let server_ip = lab.state.pods["default/server"].ip.context("server ip")?;
    let lab_pids = servers(&server_ns, logs)?;
    drop(lab);

    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![("rr", vec![], vec![]), ("crr", vec![], vec![]), ("tput", vec![], vec![])];
    let base_ip = Ipv4Addr::new(10, 0, 1, 3);
    for round in 0..a.rounds {
        eprintln!("bench: round {}/{}", round + 1, a.rounds);
        // alternate which goes first, so drift does not favour one side
        let order: Vec<bool> = if round % 2 == 0 { vec![false, true] } else { vec![true, false] };
        for ours in order {
            let (ns, ip) = if ours { (client_ns.clone(), server_ip) } else { (base.client(), base_ip) };
            let r = rr(&ns, ip, RR_PORT, a.seconds)?;
            let c = crr(&ns, ip, RR_PORT, a.seconds)?;
            let t = iperf(&ns, ip, a.seconds)?;
            for (i, v) in [r, c, t].into_iter().enumerate() {
                if ours { results[i].2.push(v) } else { results[i].1.push(v) }
            }
        }
    }
    for p in lab_pids {
        cilium_lab::sys::stop(p, Duration::from_secs(2));
    }
    drop(base);
    let _ = cilium_lab::down(&name);

    eprintln!("bench: {} endpoints for memory and creation latency", a.pods);
    let mname = format!("benchm{}", std::process::id() % 10000);
    let _ = cilium_lab::down(&mname);
    let _mguard = LabGuard(mname.clone());
    let dep = logs.join("many.yaml");
    std::fs::write(
        &dep,
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: many}}\nspec:\n  replicas: {}\n  selector: {{matchLabels: {{app: many}}}}\n  template:\n    metadata: {{labels: {{app: many}}}}\n    spec: {{containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n", a.pods),
    )?;
    let mut mlab = cilium_lab::Lab::up(&mname, bin, vec![], Default::default())?;
    mlab.apply(cilium_lab::parse_files(&[dep])?)?;
    let agent = mlab.state.nodes[0].agent_pid.context("agent pid")?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_mb(agent)?;
    let adds: Vec<f64> = mlab.state.pods.values().filter_map(|p| p.cni_add_ms).collect();
    let (p50, p99) = (percentile(adds.clone(), 0.5), percentile(adds.clone(), 0.99));
    // policy import to enforced: the agent answers once every endpoint's
    // maps hold the new policy
    let client = mlab.client(0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut imports = Vec::new();
    for i in 0..40u32 {
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bench}}\nspec:\n  endpointSelector: {{matchLabels: {{app: many}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: many}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
            8000 + i % 2
        );
        let t = Instant::now();
        let _: cilium_api::PolicyChange = rt.block_on(client.call("PUT", "/v1/policy", Some(&cilium_api::PolicyImport { text, source: "bench".into(), dry_run: false })))?;
        imports.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (imp50, imp99) = (percentile(imports.clone(), 0.5), percentile(imports.clone(), 0.99));
    drop(mlab);
    let _ = cilium_lab::down(&mname);

    eprintln!("bench: policy computation");
    let (c1k, e1k) = compute_bench(1_000, 100);
    let (c10k, e10k) = compute_bench(10_000, 1_000);

    let row = |label: &str, unit: &str, i: usize, goal: f64| {
        let (b, o) = (median(results[i].1.clone()), median(results[i].2.clone()));
        let ratio = o / b;
        format!(
            "| {label} | {b:.1} {unit} | {o:.1} {unit} | **{ratio:.3}** | ≥ {goal:.2} | {} |",
            if ratio >= goal { "met" } else { "not met" }
        )
    };
    let mut md = String::new();
    md.push_str(&format!("Pod-to-pod method: {} rounds × {} s per measurement; L3/L4 policy on both pods (client egress, server ingress).\n\n", a.rounds, a.seconds));
    md.push_str("## Pod to pod through the datapath\n\n");
    md.push_str("| Metric | Baseline (plain veth) | cilium-rs | Ratio | Goal | |\n|---|---|---|---|---|---|\n");
    md.push_str(&row("Request/response (TCP, 2-byte echo)", "tx/s", 0, 0.95));
    md.push('\n');
    md.push_str(&row("New connections (connect, echo, close)", "conn/s", 1, 0.95));
    md.push('\n');
    md.push_str(&row("Throughput (iperf3, 1 stream)", "Gbit/s", 2, 0.97));
    md.push_str("\n\nAll rounds (baseline / ours):\n\n");
    for (i, label) in ["rr tx/s", "crr conn/s", "throughput Gbit/s"].iter().enumerate() {
        let f = |v: &Vec<f64>| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
        md.push_str(&format!("- {label}: {} / {}\n", f(&results[i].1), f(&results[i].2)));
    }
    md.push_str(&format!("\n## The agent with {} endpoints\n\n", a.pods));
    md.push_str("| Metric | Value | Goal | |\n|---|---|---|---|\n");
    md.push_str(&format!("| Agent resident memory (VmRSS) | {rss:.1} MB | ≤ 30 MB | {} |\n", if rss <= 30.0 { "met" } else { "not met" }));
    md.push_str(&format!(
        "| Endpoint creation, CNI ADD to enforced, p50 | {p50:.1} ms | ≤ 20 ms | {} |\n",
        if p50 <= 20.0 { "met" } else { "not met" }
    ));
    md.push_str(&format!("| Endpoint creation, CNI ADD to enforced, p99 | {p99:.1} ms | | |\n"));
    md.push_str(&format!(
        "| Policy import to enforced on all {} endpoints, p50 | {imp50:.1} ms | ≤ 50 ms (p99) | |\n",
        a.pods
    ));
    md.push_str(&format!("| Policy import to enforced, p99 | {imp99:.1} ms | ≤ 50 ms | {} |\n", if imp99 <= 50.0 { "met" } else { "not met" }));
    md.push_str("\nCNI ADD is timed from starting the `cilium-cni` process until it returns; it returns\n");
    md.push_str("once the agent has written the endpoint's policy, attached the programs and routed it.\n");
    md.push_str("A policy import returns once every endpoint's policy map holds the change (40 imports\n");
    md.push_str("alternating between two policies that select every pod).\n");
    md.push_str("\n## Policy computation (one endpoint, pure engine)\n\n");
    md.push_str("| Identities × rules | Time | Map entries |\n|---|---|---|\n");
    md.push_str(&format!("| 1,000 × 100 | {c1k:.1} ms | {e1k} |\n| 10,000 × 1,000 | {c10k:.1} ms | {e10k} |\n"));
    md.push_str("\nEvery rule selects the endpoint and allows one port from one of ten label groups, so\n");
    md.push_str("each rule touches a tenth of the identities; entries grow linearly with what is selected.\n");
    Ok(md)
}

/// Computes one endpoint's policy over `n` identities and `r` rules; returns
/// (milliseconds, entries).
fn compute_bench(n: u32, r: u32) -> (f64, usize) {
    use cilium_labels::{Label, LabelSet};
    let mut ids = std::collections::BTreeMap::new();
    for i in 0..n {
        let mut l = LabelSet::parse_all(["k8s:io.kubernetes.pod.namespace=default"]);
        l.insert(Label::k8s("app", &format!("a{i}")));
        l.insert(Label::k8s("group", &format!("g{}", i % 10)));
        ids.insert(256 + i, l);
    }
    let mut text = String::new();
    for j in 0..r {
        text.push_str(&format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: r{j}}}\nspec:\n  endpointSelector: {{}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{group: g{}}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n---\n",
            j % 10,
            1000 + j
        ));
    }
    let rules: Vec<_> = cilium_policy::parse_policies(&text, "bench").expect("bench policies").into_iter().flat_map(|(_, r)| r).collect();
    let me = ids[&256].clone();
    let t = Instant::now();
    let p = cilium_policy::compute(&cilium_policy::Input {
        rules: &rules,
        labels: &me,
        identities: &ids,
        own_ports: &cilium_policy::NamedPorts::new(),
        peer_ports: &std::collections::BTreeMap::new(),
        options: cilium_policy::PolicyOptions::default(),
    });
    (t.elapsed().as_secs_f64() * 1000.0, p.entries.len())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("cilium-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
