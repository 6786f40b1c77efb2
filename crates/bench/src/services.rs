//! The service benchmark: a client reaching a server through a ClusterIP
//! while 1 to 10,000 services exist, for our socket-level load balancer and
//! for the rulesets kube-proxy writes (iptables mode on the legacy and nft
//! backends, nftables mode), each as a ratio to connecting to the pod IP with
//! no rules; plus the time to program every service and to change one.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::{Baseline, LabGuard, RR_PORT, crr, median, rr, servers, sh};

/// How clients reach the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    /// Connect to the pod IP, no rules anywhere (the baseline).
    Direct,
    /// Our lab: socket-level load balancing to a ClusterIP.
    Ours,
    /// Our lab, connecting to the pod IP: our datapath without the service.
    OursPodIp,
    /// kube-proxy's iptables mode, legacy backend.
    IptablesLegacy,
    /// kube-proxy's iptables mode, nft backend.
    IptablesNft,
    /// kube-proxy's nftables mode.
    Nftables,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Direct => "pod IP, no rules (baseline)",
            System::Ours => "cilium-rs (socket LB)",
            System::OursPodIp => "cilium-rs, pod IP",
            System::IptablesLegacy => "kube-proxy iptables, legacy",
            System::IptablesNft => "kube-proxy iptables, nft backend",
            System::Nftables => "kube-proxy nftables",
        }
    }
}

const SYSTEMS: [System; 6] = [System::Direct, System::OursPodIp, System::Ours, System::IptablesLegacy, System::IptablesNft, System::Nftables];
const SERVICE_PORT: u16 = 80;

/// ClusterIP of service `i` (the measured one is the last).
fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i)
}

fn hash_name(prefix: &str, i: u32) -> String {
    // kube-proxy names chains by a hash; any unique 16 characters will do
    format!("{prefix}-{:016X}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The ruleset kube-proxy's iptables mode writes for `n` services of two
/// endpoints each (both are the server here), the measured service last, in
/// iptables-restore format. Shape: KUBE-SERVICES matches every ClusterIP in
/// turn and jumps to KUBE-SVC-*, which picks an endpoint with `statistic
/// random` and jumps to KUBE-SEP-*, which marks for masquerade when hairpinned
/// and DNATs.
fn iptables_ruleset(n: u32, server: Ipv4Addr) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut services = String::new();
    for i in 0..n {
        let svc = hash_name("KUBE-SVC", i);
        let seps = [hash_name("KUBE-SEP", 2 * i), hash_name("KUBE-SEP", 2 * i + 1)];
        let ip = cluster_ip(i);
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{} - [0:0]\n:{} - [0:0]", seps[0], seps[1]);
        let _ = writeln!(
            services,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"default/s{i}:http cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}"
        );
        let _ = writeln!(rules, "-A {svc} ! -s 10.0.0.0/8 -d {ip}/32 -p tcp -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ");
        let _ = writeln!(rules, "-A {svc} -m comment --comment \"default/s{i}:http -> {server}:{RR_PORT}\" -m statistic --mode random --probability 0.50000000000 -j {}", seps[0]);
        let _ = writeln!(rules, "-A {svc} -m comment --comment \"default/s{i}:http -> {server}:{RR_PORT}\" -j {}", seps[1]);
        for sep in &seps {
            let _ = writeln!(rules, "-A {sep} -s {server}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(rules, "-A {sep} -p tcp -m tcp -j DNAT --to-destination {server}:{RR_PORT}");
        }
    }
    let mut out = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    out.push_str(&chains);
    out.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str(&services);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// The ruleset kube-proxy's nftables mode writes: one verdict map from
/// (address, protocol, port) to a per-service chain, which picks an
/// endpoint chain with `numgen random`, which DNATs.
fn nftables_ruleset(n: u32, server: Ipv4Addr) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    let mut elements = Vec::with_capacity(n as usize);
    for i in 0..n {
        let svc = format!("service-{:08x}-default/s{i}/tcp/http", i);
        let eps = [format!("endpoint-{:08x}-a", i), format!("endpoint-{:08x}-b", i)];
        for ep in &eps {
            let _ = writeln!(out, "  chain {ep} {{\n    ip saddr {server} jump mark-for-masquerade\n    meta l4proto tcp dnat to {server}:{RR_PORT}\n  }}");
        }
        let _ = writeln!(out, "  chain {svc} {{\n    ip daddr {} tcp dport {SERVICE_PORT} ip saddr != 10.0.0.0/8 jump mark-for-masquerade\n    numgen random mod 2 vmap {{ 0 : goto {}, 1 : goto {} }}\n  }}", cluster_ip(i), eps[0], eps[1]);
        elements.push(format!("{} . tcp . {SERVICE_PORT} : goto {svc}", cluster_ip(i)));
    }
    out.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    out.push_str("  chain masquerading {\n    type nat hook postrouting priority srcnat; policy accept;\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
    let _ = writeln!(out, "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}", elements.join(",\n      "));
    out.push_str("  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n");
    out.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n}\n");
    out
}

fn restore_in(netns: &str, program: &str, args: &[&str], input: &str) -> anyhow::Result<f64> {
    use std::io::Write;
    let started = Instant::now();
    let mut child = cilium_lab::sys::command_in(netns, None, program)?
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child.stdin.take().expect("stdin").write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

fn clear_rules(netns: &str) -> anyhow::Result<()> {
    sh("ip", &["netns", "exec", netns, "iptables-legacy", "-t", "nat", "-F"])?;
    sh("ip", &["netns", "exec", netns, "iptables-legacy", "-t", "nat", "-X"])?;
    sh("ip", &["netns", "exec", netns, "nft", "flush", "ruleset"])?;
    Ok(())
}

/// Installs `system`'s rules for `n` services in the baseline router;
/// returns how long it took (ms).
fn install(system: System, netns: &str, n: u32, server: Ipv4Addr) -> anyhow::Result<f64> {
    clear_rules(netns)?;
    match system {
        System::IptablesLegacy => restore_in(netns, "iptables-legacy-restore", &[], &iptables_ruleset(n, server)),
        System::IptablesNft => restore_in(netns, "iptables-nft-restore", &[], &iptables_ruleset(n, server)),
        System::Nftables => restore_in(netns, "nft", &["-f", "-"], &nftables_ruleset(n, server)),
        System::Direct | System::Ours | System::OursPodIp => Ok(0.0),
    }
}

fn k8s_service(i: u32, backends: &[Ipv4Addr]) -> cilium_api::K8sService {
    cilium_api::K8sService {
        namespace: "default".into(),
        name: format!("s{i}"),
        service_type: "ClusterIP".into(),
        cluster_ip: Some(cluster_ip(i).to_string()),
        ports: vec![cilium_api::K8sServicePort { name: Some("http".into()), protocol: "TCP".into(), port: SERVICE_PORT, node_port: None }],
        endpoints: backends
            .iter()
            .map(|ip| cilium_api::K8sEndpoint {
                ip: ip.to_string(),
                node_name: Some("node1".into()),
                terminating: false,
                ports: vec![cilium_api::K8sEndpointPort { name: Some("http".into()), protocol: "TCP".into(), port: RR_PORT }],
            })
            .collect(),
        ..Default::default()
    }
}

pub struct Options {
    pub counts: Vec<u32>,
    pub rounds: usize,
    pub seconds: u64,
}

/// (rr, crr) medians per (count, system), and programming times.
pub struct Report {
    rates: Vec<(u32, System, f64, f64)>,
    /// (count, system, ms to install every service)
    program: Vec<(u32, System, f64)>,
    /// (count, median ms, p99 ms) to change one service, ours
    change: Vec<(u32, f64, f64)>,
    agent_rss_mb: Vec<(u32, f64)>,
}

pub fn run(o: &Options, logs: &Path) -> anyhow::Result<Report> {
    for tool in ["iptables-legacy-restore", "iptables-nft-restore", "nft"] {
        if sh("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            bail!("{tool} missing: apt-get install iptables nftables (scripts/setup.sh does)");
        }
    }
    eprintln!("bench services: baseline topology");
    let base = Baseline::up(logs)?;
    let router = format!("{}-router", base.prefix);
    let base_server = Ipv4Addr::new(10, 0, 1, 3);

    eprintln!("bench services: lab");
    let name = format!("benchs{}", std::process::id() % 10000);
    let _ = cilium_lab::down(&name);
    let _guard = LabGuard(name.clone());
    let manifest = logs.join("svc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client}\nspec: {containers: [{name: c}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server}\nspec: {containers: [{name: s}]}\n",
    )?;
    let mut lab = cilium_lab::Lab::up(&name, &crate::bin_dir(), vec![], Default::default())?;
    lab.apply(cilium_lab::parse_files(&[manifest])?)?;
    let client_ns = lab.state.pods["default/client"].netns.clone();
    let client_cgroup = lab.cgroup_of("default/client").context("client cgroup")?;
    let server_ns = lab.state.pods["default/server"].netns.clone();
    let server_ip = lab.state.pods["default/server"].ip.context("server ip")?;
    let agent_pid = lab.state.nodes[0].agent_pid.context("agent pid")?;
    let api = lab.client(0);
    let server_pids = servers(&server_ns, logs)?;
    drop(lab);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    let mut report = Report { rates: vec![], program: vec![], change: vec![], agent_rss_mb: vec![] };
    for &n in &o.counts {
        let target = cluster_ip(n - 1);
        let endpoint = |system: System| match system {
            System::Direct => (base.client(), base_server, RR_PORT, None),
            System::Ours => (client_ns.clone(), target, SERVICE_PORT, Some(client_cgroup.clone())),
            System::OursPodIp => (client_ns.clone(), server_ip, RR_PORT, Some(client_cgroup.clone())),
            _ => (base.client(), target, SERVICE_PORT, None),
        };
        // ours: every service programmed from an empty table, the measured one last
        eprintln!("bench services: {n} services, programming ours");
        clear_rules(&router)?;
        let _: Vec<(String, String)> = rt.block_on(api.call("PUT", "/v1/k8s/services", Some(&Vec::<cilium_api::K8sService>::new())))?;
        let list: Vec<cilium_api::K8sService> = (0..n).map(|i| k8s_service(i, &[server_ip])).collect();
        let started = Instant::now();
        let rejected: Vec<(String, String)> = rt.block_on(api.call("PUT", "/v1/k8s/services", Some(&list)))?;
        report.program.push((n, System::Ours, started.elapsed().as_secs_f64() * 1000.0));
        if let Some((s, e)) = rejected.first() {
            bail!("agent rejected {s}: {e}");
        }
        // one change: a backend added to and removed from service 0
        let mut times = Vec::new();
        for k in 0..40 {
            let backends = if k % 2 == 0 { vec![server_ip, Ipv4Addr::new(10, 0, 1, 250)] } else { vec![server_ip] };
            let one = k8s_service(0, &backends);
            let started = Instant::now();
            let _: Vec<u16> = rt.block_on(api.call("PUT", "/v1/k8s/service", Some(&one)))?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        report.change.push((n, median(times.clone()), crate::percentile(times, 0.99)));
        std::thread::sleep(std::time::Duration::from_millis(400)); // let the write-behind save finish
        report.agent_rss_mb.push((n, crate::rss_mb(agent_pid)?));
        // The baseline and ours need no rules in the router: measured in
        // turn within each round, so a drift of the machine between
        // phases does not land on one of them.
        let interleaved = [System::Direct, System::OursPodIp, System::Ours];
        let mut rrs = vec![Vec::new(); interleaved.len()];
        let mut crrs = vec![Vec::new(); interleaved.len()];
        for round in 0..o.rounds {
            for (i, &system) in interleaved.iter().enumerate() {
                eprintln!("bench services: {n} services, {}, round {}", system.label(), round + 1);
                let (ns, ip, port, cgroup) = endpoint(system);
                rrs[i].push(rr_via(&ns, cgroup.as_deref(), ip, port, o.seconds)?);
                crrs[i].push(crr_via(&ns, cgroup.as_deref(), ip, port, o.seconds)?);
            }
        }
        for (i, &system) in interleaved.iter().enumerate() {
            report.rates.push((n, system, median(rrs[i].clone()), median(crrs[i].clone())));
        }
        for system in [System::IptablesLegacy, System::IptablesNft, System::Nftables] {
            eprintln!("bench services: {n} services, {}", system.label());
            let ms = install(system, &router, n, base_server)?;
            report.program.push((n, system, ms));
            let (ns, ip, port, cgroup) = endpoint(system);
            let mut rrs = Vec::new();
            let mut crrs = Vec::new();
            for _ in 0..o.rounds {
                rrs.push(rr_via(&ns, cgroup.as_deref(), ip, port, o.seconds)?);
                crrs.push(crr_via(&ns, cgroup.as_deref(), ip, port, o.seconds)?);
            }
            report.rates.push((n, system, median(rrs), median(crrs)));
        }
    }
    clear_rules(&router)?;
    for p in server_pids {
        cilium_lab::sys::stop(p, std::time::Duration::from_secs(2));
    }
    drop(base);
    Ok(report)
}

/// The benchmark threads of our client run in its pod's cgroup, where the
/// socket load balancer applies; the process returns to where it was after.
fn in_cgroup<T>(cgroup: Option<&Path>, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let Some(cg) = cgroup else { return f() };
    let home = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| Path::new(crate::CGROUP2_ROOT).join(p.trim_start_matches('/')))
        .context("own cgroup v2 path")?;
    cilium_lab::sys::join_cgroup(cg)?;
    let r = f();
    cilium_lab::sys::join_cgroup(&home)?;
    r
}

fn rr_via(ns: &str, cgroup: Option<&Path>, ip: Ipv4Addr, port: u16, secs: u64) -> anyhow::Result<f64> {
    in_cgroup(cgroup, || rr(ns, ip, port, secs))
}

fn crr_via(ns: &str, cgroup: Option<&Path>, ip: Ipv4Addr, port: u16, secs: u64) -> anyhow::Result<f64> {
    in_cgroup(cgroup, || crr(ns, ip, port, secs))
}

impl Report {
    pub fn markdown(&self, o: &Options) -> String {
        let mut md = String::new();
        md.push_str("## Services: a ClusterIP among many\n\n");
        md.push_str("A client reaches a server through the last of N ClusterIP services (two endpoints\n");
        md.push_str("each in kube-proxy's rulesets, both the server; one in ours). kube-proxy's rulesets are\n");
        md.push_str("loaded into the router of the plain-veth baseline topology, exactly in the shape kube-proxy\n");
        md.push_str("writes them (iptables mode: KUBE-SERVICES → KUBE-SVC-* with `statistic random` →\n");
        md.push_str("KUBE-SEP-* DNAT, the target service last; nftables mode: one verdict map). Ours is the lab:\n");
        md.push_str("the client pod's sockets are translated at connect by the socket-level load balancer;\n");
        md.push_str("\"cilium-rs, pod IP\" is the same client reaching the server's pod IP through our datapath,\n");
        md.push_str("so the difference between the two columns is what the service costs.\n");
        md.push_str("Ratios are to connecting to the pod IP with no rules in the baseline topology, measured\n");
        let _ = writeln!(md, "in the same run; medians of {} rounds × {} s, pinned to CPU 0. The baseline and both of ours", o.rounds, o.seconds);
        md.push_str("take turns within each round (no rules in the router), so a drift of the machine\n");
        md.push_str("between phases lands on all three; kube-proxy's rulesets follow, each loaded once.\n\n");
        for (title, idx) in [("New connections per second (connect, 2-byte echo, close)", 1usize), ("Request/response per second (one connection, 2-byte echo)", 0)] {
            let _ = writeln!(md, "### {title}\n");
            md.push_str("| Services |");
            for s in SYSTEMS {
                let _ = write!(md, " {} |", s.label());
            }
            md.push_str("\n|---|");
            for _ in SYSTEMS {
                md.push_str("---|");
            }
            md.push('\n');
            for &n in &o.counts {
                let val = |s: System| self.rates.iter().find(|r| r.0 == n && r.1 == s).map(|r| if idx == 0 { r.2 } else { r.3 });
                let Some(base) = val(System::Direct) else { continue };
                let _ = write!(md, "| {n} | {base:.0}/s |");
                for s in SYSTEMS.iter().skip(1) {
                    match val(*s) {
                        Some(v) => {
                            let _ = write!(md, " {v:.0}/s (**{:.3}**) |", v / base);
                        }
                        None => md.push_str(" – |"),
                    }
                }
                md.push('\n');
            }
            md.push('\n');
        }
        md.push_str("### Programming the services\n\n");
        md.push_str("| Services | cilium-rs: all (API call to maps written) | cilium-rs: change one, p50 / p99 | iptables-legacy-restore | iptables-nft-restore | nft -f | agent RSS |\n|---|---|---|---|---|---|---|\n");
        for &n in &o.counts {
            let p = |s: System| self.program.iter().find(|r| r.0 == n && r.1 == s).map(|r| format!("{:.1} ms", r.2)).unwrap_or_else(|| "–".into());
            let c = self.change.iter().find(|r| r.0 == n).map(|r| format!("{:.2} / {:.2} ms", r.1, r.2)).unwrap_or_else(|| "–".into());
            let m = self.agent_rss_mb.iter().find(|r| r.0 == n).map(|r| format!("{:.1} MB", r.1)).unwrap_or_else(|| "–".into());
            let _ = writeln!(md, "| {n} | {} | {c} | {} | {} | {} | {m} |", p(System::Ours), p(System::IptablesLegacy), p(System::IptablesNft), p(System::Nftables));
        }
        md.push_str("\nOurs is timed from sending the full list of Services to the agent (`PUT /v1/k8s/services`,\n");
        md.push_str("starting from none) until it answers with every map entry written; one change is one\n");
        md.push_str("Service update (`PUT /v1/k8s/service`, a backend added or removed) at that scale. kube-proxy's\n");
        md.push_str("times are the restore commands loading the whole ruleset, which is how kube-proxy applies\n");
        md.push_str("any change in iptables mode.\n");
        if let Some(&n) = o.counts.iter().max() {
            let ratio = |s: System, idx: usize| {
                let b = self.rates.iter().find(|r| r.0 == n && r.1 == System::Direct)?;
                let v = self.rates.iter().find(|r| r.0 == n && r.1 == s)?;
                Some(if idx == 0 { v.2 / b.2 } else { v.3 / b.3 })
            };
            let all = self.program.iter().find(|r| r.0 == n && r.1 == System::Ours).map(|r| r.2);
            let one = self.change.iter().find(|r| r.0 == n).map(|r| r.1);
            let _ = writeln!(md, "\n### Goals at {n} services\n\n| Goal | Result | |\n|---|---|---|");
            if let (Some(c), Some(r)) = (ratio(System::Ours, 1), ratio(System::Ours, 0)) {
                let _ = writeln!(md, "| ≥ 0.95× baseline (new connections / request-response) | {c:.3} / {r:.3} | {} |", if c >= 0.95 && r >= 0.95 { "met" } else { "not met" });
            }
            let own = |idx: usize| {
                let b = self.rates.iter().find(|r| r.0 == n && r.1 == System::OursPodIp)?;
                let v = self.rates.iter().find(|r| r.0 == n && r.1 == System::Ours)?;
                Some(if idx == 0 { v.2 / b.2 } else { v.3 / b.3 })
            };
            if let (Some(c), Some(r)) = (own(1), own(0)) {
                let _ = writeln!(md, "| the service itself: ClusterIP vs the pod IP through our datapath (new connections / request-response) | {c:.3} / {r:.3} | |");
            }
            if let Some(a) = all {
                let _ = writeln!(md, "| all {n} services programmed in ≤ 100 ms | {a:.1} ms | {} |", if a <= 100.0 { "met" } else { "not met" });
            }
            if let Some(c) = one {
                let _ = writeln!(md, "| one change ≤ 1 ms (p50) | {c:.2} ms | {} |", if c <= 1.0 { "met" } else { "not met" });
            }
        }
        md
    }
}
