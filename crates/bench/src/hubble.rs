//! Hubble's costs: decoding and filtering flows on one core, the event rate
//! the agent takes in with its default buffers while losing nothing, and
//! what flow observability costs the pod-to-pod benchmark (the same lab
//! with Hubble on and off, measured alternately in the same run).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cilium_abi::Event;
use cilium_hubble::filter::Filters;
use cilium_hubble::names::{EndpointName, Names};
use cilium_hubble::parser::Parser;
use cilium_hubble::proto::flow::{FlowFilter, Verdict};

use crate::{LabGuard, RR_PORT, crr, median, pin_self, rr, servers};

/// Raw ring-buffer records, as the datapath writes them.
fn records(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let kind = [4u8, 4, 4, 5, 1][i % 5];
            let ev = Event {
                r#type: kind,
                subtype: if kind == 1 { 133 } else { 0 },
                source_ep: 100 + (i % 50) as u16,
                ifindex: 10,
                ktime_ns: 1_000_000 + i as u64,
                src_identity: 300 + (i % 50) as u32,
                dst_identity: 350,
                len_orig: 74,
                protocol: 6,
                flags: 1,
                match_type: 2,
                tcp_flags: 0x02,
                verdict: if kind == 5 { 1 } else { 0 },
                saddr: u32::from_ne_bytes([10, 0, 1, 2 + (i % 50) as u8]),
                daddr: u32::from_ne_bytes([10, 0, 1, 200]),
                sport: 30000 + (i % 20000) as u16,
                dport: 80,
                ..Default::default()
            };
            // SAFETY: Event is #[repr(C)] plain old data without padding
            // (checked against the BTF); its bytes are what the ring holds.
            unsafe { std::slice::from_raw_parts((&ev as *const Event).cast::<u8>(), size_of::<Event>()) }.to_vec()
        })
        .collect()
}

fn names() -> Names {
    let mut n = Names { node_name: "node1".into(), ..Default::default() };
    for i in 0..=200u8 {
        n.endpoints.insert(
            Ipv4Addr::new(10, 0, 1, i).into(),
            EndpointName {
                id: u32::from(i),
                identity: 300 + u32::from(i),
                namespace: if i % 2 == 0 { "default".into() } else { "prod".into() },
                pod_name: format!("pod-{i}"),
                labels: vec![format!("k8s:app=a{}", i % 10), "k8s:io.kubernetes.pod.namespace=default".into()],
                workloads: vec![],
            },
        );
    }
    n
}

/// (decode, filter, decode + filter) flows per second on one core.
fn decode_filter() -> (f64, f64, f64) {
    pin_self();
    let recs = records(4096);
    let names = names();
    let parser = Parser::default();
    // `hubble observe --namespace default --verdict DROPPED`: two filters
    let f = |src: bool| FlowFilter {
        source_pod: if src { vec!["default/".into()] } else { vec![] },
        destination_pod: if src { vec![] } else { vec!["default/".into()] },
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    };
    let filters = Filters::new(&[f(true), f(false)], &[]).expect("filters");
    let n = 400_000usize;
    let decode = |i: usize| {
        let (ev, cap) = Event::from_bytes(&recs[i % recs.len()]).expect("record");
        let m = cilium_flow::MonitorEvent::from_event(&ev, cap, 0).expect("event");
        parser.flow(&m, &names)
    };
    let t = Instant::now();
    for i in 0..n {
        std::hint::black_box(decode(i));
    }
    let dec = n as f64 / t.elapsed().as_secs_f64();
    let flows: Vec<_> = (0..4096).map(decode).collect();
    let t = Instant::now();
    let mut hits = 0usize;
    for i in 0..n * 4 {
        hits += usize::from(filters.matches(std::hint::black_box(&flows[i % flows.len()])));
    }
    let filt = (n * 4) as f64 / t.elapsed().as_secs_f64();
    std::hint::black_box(hits);
    let t = Instant::now();
    for i in 0..n {
        let fl = decode(i);
        std::hint::black_box(filters.matches(&fl));
    }
    let both = n as f64 / t.elapsed().as_secs_f64();
    (dec, filt, both)
}

fn status(lab: &cilium_lab::Lab) -> anyhow::Result<cilium_api::HubbleStatus> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let s: cilium_api::Status = rt.block_on(lab.client(0).get("/v1/status"))?;
    s.hubble.context("Hubble is off")
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// The load generator: UDP datagrams from the client pod to a port the
/// policy denies, paced to `rate` per second for `secs` — every one is a
/// drop event the agent must take in. Returns datagrams sent.
fn udp_flood(netns: &str, server: Ipv4Addr, rate: u64, secs: f64) -> anyhow::Result<u64> {
    let path = cilium_lab::sys::netns_path(netns);
    std::thread::spawn(move || -> anyhow::Result<u64> {
        cilium_datapath::sys::enter_netns(&path)?;
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let dst = SocketAddr::from((server, DENIED_PORT));
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                // a full socket buffer only delays; the datagram is what counts
                if sock.send_to(b"hubble-bench", dst).is_ok() {
                    sent += 1;
                } else {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("load thread panicked"))?
}

/// New connections from `threads` unpinned threads for `secs`, saturating
/// both CPUs: what happens to events when the agent is starved of CPU.
/// Returns connections made.
fn connection_storm(netns: &str, server: Ipv4Addr, threads: usize, secs: u64) -> anyhow::Result<u64> {
    let path = cilium_lab::sys::netns_path(netns);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..threads {
        let (path, stop, count) = (path.clone(), stop.clone(), count.clone());
        hs.push(std::thread::spawn(move || -> anyhow::Result<()> {
            cilium_datapath::sys::enter_netns(&path)?;
            let addr = SocketAddr::from((server, RR_PORT));
            let mut buf = [0u8; 2];
            while !stop.load(Ordering::Relaxed) {
                let mut s = TcpStream::connect(addr)?;
                crate::set_linger_zero(&s)?;
                std::io::Write::write_all(&mut s, b"x\n")?;
                std::io::Read::read_exact(&mut s, &mut buf)?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    Ok(count.load(Ordering::Relaxed))
}

/// A port the bench policy does not allow.
const DENIED_PORT: u16 = 9999;

/// One ingestion step: (rate asked, events taken in per second, lost, agent CPU µs per event).
struct Step {
    rate: u64,
    taken: f64,
    lost: u64,
    cpu_us: f64,
}

/// The Hubble section of BENCHMARKS.md.
pub fn run(rounds: usize, seconds: u64, logs: &Path, bin: &Path) -> anyhow::Result<String> {
    eprintln!("bench hubble: decode and filter on one core");
    let (dec, filt, both) = std::thread::spawn(decode_filter).join().map_err(|_| anyhow::anyhow!("decode bench panicked"))?;

    eprintln!("bench hubble: two labs, Hubble on and off");
    let manifest = logs.join("hubble-bench.yaml");
    std::fs::write(&manifest, format!("{}---{}", crate::BENCH_PODS, crate::BENCH_POLICY))?;
    let mut labs = Vec::new();
    let mut guards = Vec::new();
    for (tag, args) in [("on", vec![]), ("off", vec!["--enable-hubble=false".to_string()])] {
        let name = format!("bh{tag}{}", std::process::id() % 10000);
        let _ = cilium_lab::down(&name);
        guards.push(LabGuard(name.clone()));
        let mut lab = cilium_lab::Lab::up(&name, bin, args, Default::default())?;
        lab.apply(cilium_lab::parse_files(std::slice::from_ref(&manifest))?)?;
        let client_ns = lab.state.pods["default/client"].netns.clone();
        let server_ns = lab.state.pods["default/server"].netns.clone();
        let server_ip = lab.state.pods["default/server"].ip.context("server ip")?;
        let pids = servers(&server_ns, logs)?;
        labs.push((lab, client_ns, server_ip, pids));
    }

    eprintln!("bench hubble: event ingestion from a paced load generator");
    let (lab, client_ns, server_ip, _) = &labs[0];
    let agent = lab.state.nodes[0].agent_pid.context("agent pid")?;
    let mut steps = Vec::new();
    for rate in [25_000u64, 50_000, 100_000, 200_000] {
        let before = status(lab)?;
        let cpu0 = cpu_secs(agent)?;
        let t = Instant::now();
        let sent = udp_flood(client_ns, *server_ip, rate, seconds as f64)?;
        let elapsed = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let after = status(lab)?;
        let cpu = cpu_secs(agent)? - cpu0;
        let taken = after.seen_flows - before.seen_flows;
        let lost = after.lost_datapath_events - before.lost_datapath_events;
        eprintln!("bench hubble: {rate}/s asked, {sent} sent, {taken} taken in, {lost} lost");
        steps.push(Step { rate: (sent as f64 / elapsed) as u64, taken: taken as f64 / elapsed, lost, cpu_us: if taken > 0 { cpu * 1e6 / taken as f64 } else { 0.0 } });
    }
    let best = steps.iter().filter(|s| s.lost == 0).map(|s| s.taken).fold(0.0, f64::max);
    eprintln!("bench hubble: a connection storm saturating both CPUs");
    let before = status(lab)?;
    let t = Instant::now();
    let conns = connection_storm(client_ns, *server_ip, 4, seconds)?;
    let storm_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let after = status(lab)?;
    let (storm_taken, storm_lost) = (after.seen_flows - before.seen_flows, after.lost_datapath_events - before.lost_datapath_events);

    let mut rr_on = Vec::new();
    let mut rr_off = Vec::new();
    let mut crr_on = Vec::new();
    let mut crr_off = Vec::new();
    for round in 0..rounds {
        eprintln!("bench hubble: round {}/{rounds}", round + 1);
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (_, ns, ip, _) = &labs[i];
            let r = rr(ns, *ip, RR_PORT, seconds)?;
            let c = crr(ns, *ip, RR_PORT, seconds)?;
            if i == 0 {
                rr_on.push(r);
                crr_on.push(c);
            } else {
                rr_off.push(r);
                crr_off.push(c);
            }
        }
    }
    for (_, _, _, pids) in &labs {
        for p in pids {
            cilium_lab::sys::stop(*p, Duration::from_secs(2));
        }
    }
    drop(labs);
    drop(guards);

    let (rr_ratio, crr_ratio) = (median(rr_on.clone()) / median(rr_off.clone()), median(crr_on.clone()) / median(crr_off.clone()));
    let met = |ok: bool| if ok { "met" } else { "not met" };
    let mut md = String::new();
    md.push_str("## Hubble\n\n");
    md.push_str("| Metric | Value | Goal | |\n|---|---|---|---|\n");
    md.push_str(&format!("| Decode (ring record → enriched flow), one core | {:.0} flows/s | | |\n", dec));
    md.push_str(&format!("| Filter (`--namespace default --verdict DROPPED`), one core | {:.0} flows/s | | |\n", filt));
    md.push_str(&format!("| Decode + filter, one core | {:.0} flows/s | ≥ 1,000,000 | {} |\n", both, met(both >= 1e6)));
    md.push_str(&format!("| Highest event rate the agent took in with none lost (default buffers) | {best:.0} events/s | ≥ 50,000 | {} |\n", met(best >= 50_000.0)));
    md.push_str(&format!("| Request/response with Hubble on vs off (ratio) | {:.3} ({:.0} / {:.0} tx/s) | ≥ 0.95 | {} |\n", rr_ratio, median(rr_on.clone()), median(rr_off.clone()), met(rr_ratio >= 0.95)));
    md.push_str(&format!("| New connections with Hubble on vs off (ratio) | {:.3} ({:.0} / {:.0} conn/s) | ≥ 0.95 | {} |\n", crr_ratio, median(crr_on.clone()), median(crr_off.clone()), met(crr_ratio >= 0.95)));
    md.push_str("\nIngestion steps (datapath drop events from a paced UDP sender to a denied port):\n\n| Sent/s | Taken in/s | Lost | Agent CPU per event |\n|---|---|---|---|\n");
    for s in &steps {
        md.push_str(&format!("| {} | {:.0} | {} | {:.1} µs |\n", s.rate, s.taken, s.lost, s.cpu_us));
    }
    md.push_str(&format!(
        "\nWith both CPUs saturated by other work (4 threads opening and closing connections, {:.0} conn/s), the\n\
         agent is starved: it took in {:.0} events/s and {storm_lost} were lost — counted by the datapath and\n\
         shown by `cilium status` and `hubble_lost_events_total`; traffic was never held up.\n",
        conns as f64 / storm_secs,
        storm_taken as f64 / storm_secs
    ));
    md.push_str(&format!(
        "\nDecode and filter run in this process on synthetic records (trace, policy-verdict and drop events of\n\
         50 pods; 200 named endpoints), pinned to CPU 0. The load generator runs unpinned against the lab's\n\
         agent, which counts what its Hubble took in and what the datapath could not hand over (ring full).\n\
         On/off: two labs in the same run, identical but for `--enable-hubble=false` (the datapath emits\n\
         events either way), {rounds} rounds × {seconds} s alternating which goes first, pinned like the pod benchmark.\n\
         Rounds (on / off): rr {} / {}; crr {} / {}.\n",
        rr_on.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        rr_off.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        crr_on.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
        crr_off.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", "),
    ));
    Ok(md)
}
