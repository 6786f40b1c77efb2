//! Per-packet cost of the endpoint programs, measured in the kernel with
//! BPF_PROG_RUN (`repeat`): the same loaded object the agent uses, private
//! maps, one endpoint. Established TCP the pod opened (its packets out and
//! the replies in) in both families, and a packet that emits a trace event. Medians of rounds; the
//! ratios compare with IPv4's established egress packet of the same run.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use cilium_abi::{EndpointInfo, IpcacheValue};
use cilium_datapath::{Datapath, LoadOptions, Loaded, Program, ip_to_be};

use crate::median;

const IFINDEX: u32 = 1;
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x20);
const REPEAT: u32 = 1_000_000;

/// Ethernet + the L3 header + `l4`.
fn frame(l3: Vec<u8>, l4: &[u8], ethertype: [u8; 2]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, ethertype[0], ethertype[1]];
    f.extend(l3);
    f.extend_from_slice(l4);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let len = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0, (len >> 8) as u8, len as u8, 0, 1, 0, 0, 64, proto, 0, 0];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    frame(h, l4, [0x08, 0x00])
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let len = l4.len() as u16;
    let mut h = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, proto, 64];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    frame(h, l4, [0x86, 0xdd])
}

/// A TCP ACK carrying 64 bytes.
fn tcp_ack(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x10;
    t.extend_from_slice(&[b'x'; 64]);
    t
}

pub fn run(rounds: usize) -> anyhow::Result<String> {
    let mut dp = Loaded::load(LoadOptions { pin_dir: None, ct_max: 16384, policy_max: 4096, ipcache_max: 1024, endpoints_max: 64, events_bytes: 1 << 22, maglev_size: 251, ..Default::default() })?;
    // the ring is not read here: keep it to drain it between runs
    let mut ring = aya::maps::RingBuf::try_from(dp.take_events().ok_or_else(|| anyhow::anyhow!("event ring missing"))?)?;
    dp.endpoint_upsert(&EndpointInfo { ifindex: IFINDEX, ipv4: ip_to_be(POD), sec_identity: 1000, ep_id: 42, ipv6: POD6.octets(), ..Default::default() })?;
    for (net, id) in [(ipnet::IpNet::from(std::net::IpAddr::V4(PEER)), 2000), (ipnet::IpNet::from(std::net::IpAddr::V6(PEER6)), 2000)] {
        dp.ipcache_upsert(net, &IpcacheValue { sec_identity: id, ..Default::default() })?;
    }
    // ICMP timestamp requests are never tracked: each one is judged and
    // traced, so each emits an event
    let cases: Vec<(&str, Program, Vec<u8>, u32)> = vec![
        ("IPv4 TCP, established, pod egress", Program::FromContainer, ipv4(POD, PEER, 6, &tcp_ack(40000, 80)), REPEAT),
        ("IPv4 TCP, established, reply into the pod", Program::ToContainer, ipv4(PEER, POD, 6, &tcp_ack(80, 40000)), REPEAT),
        ("IPv6 TCP, established, pod egress", Program::FromContainer, ipv6(POD6, PEER6, 6, &tcp_ack(40000, 80)), REPEAT),
        ("IPv6 TCP, established, reply into the pod", Program::ToContainer, ipv6(PEER6, POD6, 6, &tcp_ack(80, 40000)), REPEAT),
        ("IPv4 ICMP, traced (one event each)", Program::FromContainer, ipv4(POD, PEER, 1, &[13, 0, 0, 0, 0, 1, 0, 1]), 20_000),
    ];
    let mut rows = Vec::new();
    for (name, prog, pkt, repeat) in &cases {
        // the first egress run creates the connection the replies belong to
        dp.test_run(*prog, pkt, IFINDEX)?;
        let mut ns = Vec::new();
        for _ in 0..rounds {
            while ring.next().is_some() {}
            let (ret, _, d) = dp.test_run_repeat(*prog, pkt, IFINDEX, *repeat)?;
            anyhow::ensure!(ret == 0, "{name}: the program returned {ret}, not TC_ACT_OK");
            ns.push(d.as_nanos() as f64);
        }
        eprintln!("bench datapath: {name}: {ns:?} ns");
        rows.push((*name, median(ns)));
    }
    let base = rows[0].1;
    let mut md = String::new();
    md.push_str("## Datapath: per-packet cost\n\n");
    let _ = writeln!(
        md,
        "The endpoint programs run in the kernel through BPF_PROG_RUN ({REPEAT} packets per run, 20000 for the traced one, median of {rounds} runs) on one endpoint with private maps and no policy enforced; the event ring is drained between runs. Ratios are to the first row, measured in the same run.\n"
    );
    md.push_str("| Packet | ns per packet | Ratio |\n|---|---|---|\n");
    for (name, ns) in &rows {
        let _ = writeln!(md, "| {name} | {ns:.0} | **{:.2}** |", ns / base);
    }
    Ok(md)
}
