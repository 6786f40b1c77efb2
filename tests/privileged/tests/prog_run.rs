//! The endpoint programs run through BPF_PROG_RUN on crafted packets: policy,
//! conntrack, anti-spoofing and events, one check per test. Each test loads
//! its own private (unpinned) copy of the maps, so tests cannot interfere and
//! nothing outlives them.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use cilium_abi::{
    CtEntryFlag, DropReason, EndpointFlag, EndpointInfo, Event, EventFlag, EventType, IpcacheValue, MonitorAggregation, POLICY_KEY_DIR_EGRESS,
    POLICY_PREFIX_FULL, POLICY_PREFIX_L3, PolicyEntry, PolicyKey, PolicyMatch, TracePoint,
};
use cilium_datapath::{Datapath, LoadOptions, Loaded, Program, ip_to_be};
use cilium_privileged_tests::packet::{self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use cilium_privileged_tests::require_root;

const OK: i32 = 0;
const SHOT: i32 = 2;
/// BPF_PROG_RUN delivers on loopback: the endpoint under test is ifindex 1.
const IFINDEX: u32 = 1;
const EP_ID: u16 = 42;
const EP_IDENTITY: u32 = 1000;
const PEER_IDENTITY: u32 = 2000;
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x20);
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

struct Harness {
    dp: Loaded,
    ring: RingBuf<MapData>,
}

impl Harness {
    fn new(flags: u16) -> Harness {
        require_root();
        let mut dp = Loaded::load(LoadOptions { pin_dir: None, ct_max: 16384, policy_max: 4096, ipcache_max: 1024, endpoints_max: 64, events_bytes: 1 << 16, maglev_size: 251, ..Default::default() })
            .expect("load datapath");
        let ring = RingBuf::try_from(dp.take_events().unwrap()).unwrap();
        let mut h = Harness { dp, ring };
        h.dp.endpoint_upsert(&EndpointInfo {
            ifindex: IFINDEX,
            ipv4: ip_to_be(POD),
            sec_identity: EP_IDENTITY,
            ep_id: EP_ID,
            flags,
            ..Default::default()
        })
        .unwrap();
        h.ipcache(POD, EP_IDENTITY);
        h.ipcache(PEER, PEER_IDENTITY);
        h
    }

    /// The endpoint under test gets an IPv6 address too.
    fn new6(flags: u16) -> Harness {
        let mut h = Harness::new(flags);
        let mut ep = h.dp.endpoints().unwrap()[0];
        ep.ipv6 = POD6.octets();
        h.dp.endpoint_upsert(&ep).unwrap();
        h.ipcache6(POD6, EP_IDENTITY);
        h.ipcache6(PEER6, PEER_IDENTITY);
        h
    }

    fn ipcache6(&mut self, ip: Ipv6Addr, identity: u32) {
        self.dp
            .ipcache_upsert(ipnet::Ipv6Net::new(ip, 128).unwrap().into(), &IpcacheValue { sec_identity: identity, ..Default::default() })
            .unwrap();
    }

    fn ipcache(&mut self, ip: Ipv4Addr, identity: u32) {
        self.dp
            .ipcache_upsert(ipnet::Ipv4Net::new(ip, 32).unwrap().into(), &IpcacheValue { sec_identity: identity, ..Default::default() })
            .unwrap();
    }

    fn rule(&mut self, egress: bool, identity: u32, proto: u8, port: Option<u16>, deny: bool) {
        self.rule_of(EP_ID, egress, identity, proto, port, deny)
    }

    /// A rule of the endpoint `ep_id`.
    fn rule_of(&mut self, ep_id: u16, egress: bool, identity: u32, proto: u8, port: Option<u16>, deny: bool) {
        let key = rule_key(ep_id, egress, identity, proto, port);
        let entry = PolicyEntry { flags: deny as u8, match_type: PolicyMatch::L3L4.code(), ..Default::default() };
        self.dp.policy_insert(&key, &entry).unwrap();
    }

    fn from_container(&mut self, pkt: &[u8]) -> i32 {
        self.dp.test_run(Program::FromContainer, pkt, IFINDEX).unwrap().0
    }

    fn to_container(&mut self, pkt: &[u8]) -> i32 {
        self.dp.test_run(Program::ToContainer, pkt, IFINDEX).unwrap().0
    }

    fn events(&mut self) -> Vec<Event> {
        let mut v = Vec::new();
        while let Some(item) = self.ring.next() {
            v.push(Event::from_bytes(&item).unwrap().0);
        }
        v
    }

    fn drops(&mut self) -> Vec<u8> {
        self.events().iter().filter(|e| e.r#type == EventType::Drop.code()).map(|e| e.subtype).collect()
    }
}

/// The policy map key of a rule of endpoint `ep_id`: for `identity`, on
/// protocol `proto` (0: any) and `port` (None: any).
fn rule_key(ep_id: u16, egress: bool, identity: u32, proto: u8, port: Option<u16>) -> PolicyKey {
    PolicyKey {
        prefixlen: match (proto, port) {
            (0, _) => POLICY_PREFIX_L3,
            (_, None) => 80,
            (_, Some(_)) => POLICY_PREFIX_FULL,
        },
        ep_id,
        gen_dir: if egress { POLICY_KEY_DIR_EGRESS } else { 0 },
        identity,
        protocol: proto,
        dport: port.unwrap_or(0).to_be(),
        ..Default::default()
    }
}

const EGRESS: u16 = EndpointFlag::EgressEnforce as u16;
const INGRESS: u16 = EndpointFlag::IngressEnforce as u16;

#[test]
fn unknown_interface_is_dropped_not_passed() {
    let mut h = Harness::new(0);
    h.dp.endpoint_delete(IFINDEX).unwrap();
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::NoConfiguration.code()]);
}

#[test]
fn drops_carry_the_packet() {
    let mut h = Harness::new(EGRESS);
    let pkt = packet::tcp(POD, 1000, PEER, 80, TCP_SYN);
    assert_eq!(h.from_container(&pkt), SHOT);
    let mut found = false;
    while let Some(item) = h.ring.next() {
        let (ev, capture) = Event::from_bytes(&item).unwrap();
        if ev.r#type == EventType::Drop.code() {
            assert_eq!(capture, &pkt[..], "the whole (short) packet follows the drop");
            assert_eq!(ev.dport, 80);
            found = true;
        }
    }
    assert!(found);
}

#[test]
fn no_enforcement_passes_and_traces() {
    let mut h = Harness::new(0);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), OK);
    let ev = h.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].r#type, EventType::Trace.code());
    assert_eq!(ev[0].subtype, TracePoint::ToStack.code(), "traced where it goes: the node's stack");
    assert_eq!((ev[0].src_identity, ev[0].dst_identity), (EP_IDENTITY, PEER_IDENTITY));
    assert_eq!(ev[0].len_cap, 0, "traces carry the tuple, not the packet");
    assert_eq!((ev[0].saddr, ev[0].daddr, ev[0].sport, ev[0].dport, ev[0].protocol), (ip_to_be(POD), ip_to_be(PEER), 1000, 80, 6));
    assert_eq!(ev[0].tcp_flags, TCP_SYN);
}

#[test]
fn spoofed_source_is_dropped() {
    let mut h = Harness::new(0);
    assert_eq!(h.from_container(&packet::tcp(Ipv4Addr::new(10, 0, 1, 99), 1000, PEER, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::InvalidSourceIp.code()]);
}

#[test]
fn egress_default_deny() {
    let mut h = Harness::new(EGRESS);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), SHOT);
    let ev = h.events();
    let verdict = ev.iter().find(|e| e.r#type == EventType::PolicyVerdict.code()).expect("verdict event");
    assert_eq!(verdict.verdict, -(DropReason::PolicyDenied.code() as i32));
    assert_eq!(verdict.dst_port, 80);
    assert_eq!(verdict.protocol, 6);
    assert_eq!(verdict.flags & EventFlag::Ingress as u8, 0);
    assert!(ev.iter().any(|e| e.r#type == EventType::Drop.code() && e.subtype == DropReason::PolicyDenied.code()));
}

#[test]
fn egress_allow_by_identity_and_port() {
    let mut h = Harness::new(EGRESS);
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 1001, PEER, 81, TCP_SYN)), SHOT);
    assert_eq!(h.from_container(&packet::udp(POD, 1002, PEER, 80)), SHOT);
    assert_eq!(h.from_container(&packet::tcp(POD, 1003, OUTSIDE, 80, TCP_SYN)), SHOT, "world is another identity");
}

#[test]
fn wildcard_identity_entry_allows_every_peer() {
    let mut h = Harness::new(EGRESS);
    h.rule(true, 0, 17, Some(53), false);
    assert_eq!(h.from_container(&packet::udp(POD, 1000, OUTSIDE, 53)), OK);
    assert_eq!(h.from_container(&packet::udp(POD, 1000, PEER, 53)), OK);
    assert_eq!(h.from_container(&packet::udp(POD, 1000, PEER, 54)), SHOT);
}

#[test]
fn deny_beats_allow() {
    let mut h = Harness::new(EGRESS);
    h.rule(true, PEER_IDENTITY, 0, None, false);
    h.rule(true, 0, 6, Some(22), true);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 22, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::PolicyDeny.code()]);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 23, TCP_SYN)), OK);
}

#[test]
fn replies_of_allowed_connections_pass_ingress_enforcement() {
    let mut h = Harness::new(EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), OK);
    // the reply comes in through the ingress hook, which allows nothing
    assert_eq!(h.to_container(&packet::tcp(PEER, 80, POD, 1000, TCP_SYN | TCP_ACK)), OK);
    // but a new connection from the peer does not pass
    assert_eq!(h.to_container(&packet::tcp(PEER, 5555, POD, 1000, TCP_SYN)), SHOT);
}

#[test]
fn ingress_allow_and_reply_out() {
    let mut h = Harness::new(INGRESS | EGRESS);
    h.rule(false, PEER_IDENTITY, 6, Some(8080), false);
    assert_eq!(h.to_container(&packet::tcp(PEER, 3333, POD, 8080, TCP_SYN)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 8080, PEER, 3333, TCP_SYN | TCP_ACK)), OK, "reply passes egress enforcement");
    assert_eq!(h.to_container(&packet::tcp(PEER, 3333, POD, 8081, TCP_SYN)), SHOT);
}

#[test]
fn udp_and_icmp_echo_are_tracked() {
    let mut h = Harness::new(INGRESS | EGRESS);
    h.rule(true, PEER_IDENTITY, 17, Some(53), false);
    h.rule(true, PEER_IDENTITY, 1, Some(8), false);
    assert_eq!(h.from_container(&packet::udp(POD, 4000, PEER, 53)), OK);
    assert_eq!(h.to_container(&packet::udp(PEER, 53, POD, 4000)), OK);
    assert_eq!(h.to_container(&packet::udp(PEER, 53, POD, 4001)), SHOT);
    assert_eq!(h.from_container(&packet::icmp_echo(POD, PEER, false, 77)), OK);
    assert_eq!(h.to_container(&packet::icmp_echo(PEER, POD, true, 77)), OK);
    assert_eq!(h.to_container(&packet::icmp_echo(PEER, POD, true, 78)), SHOT);
}

#[test]
fn related_icmp_errors_pass() {
    let mut h = Harness::new(INGRESS | EGRESS);
    h.rule(true, 0, 17, Some(9999), false);
    let out = packet::udp(POD, 4000, OUTSIDE, 9999);
    assert_eq!(h.from_container(&out), OK);
    assert_eq!(h.to_container(&packet::icmp_unreachable(OUTSIDE, POD, &out)), OK);
    let unrelated = packet::udp(POD, 4001, OUTSIDE, 9999);
    assert_eq!(h.to_container(&packet::icmp_unreachable(OUTSIDE, POD, &unrelated)), SHOT);
}

#[test]
fn policy_change_rechecks_established_connections() {
    let mut h = Harness::new(EGRESS);
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), OK);
    h.dp.policy_delete(&rule_key(EP_ID, true, PEER_IDENTITY, 6, Some(80))).unwrap();
    // without a revision bump the cached verdict still holds
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), OK);
    h.dp.bump_policy_revision().unwrap();
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), SHOT);
}

#[test]
fn trace_events_are_aggregated_per_connection() {
    let mut h = Harness::new(0);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_FIN | TCP_ACK)), OK);
    let traces = h.events().iter().filter(|e| e.r#type == EventType::Trace.code()).count();
    assert_eq!(traces, 2, "SYN and FIN only: established traffic does not flood");
}

#[test]
fn audit_mode_passes_would_be_drops() {
    let mut h = Harness::new(EGRESS | EndpointFlag::Audit as u16);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), OK);
    let ev = h.events();
    let v = ev.iter().find(|e| e.r#type == EventType::PolicyVerdict.code()).unwrap();
    assert_ne!(v.flags & EventFlag::Audit as u8, 0);
    assert!(v.verdict < 0);
    assert!(!ev.iter().any(|e| e.r#type == EventType::Drop.code()));
}

#[test]
fn non_first_fragments_are_dropped() {
    let mut h = Harness::new(0);
    assert_eq!(h.from_container(&packet::udp_fragment(POD, PEER)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::FragmentationNotSupported.code()]);
}

#[test]
fn arp_passes() {
    let mut h = Harness::new(INGRESS | EGRESS);
    assert_eq!(h.from_container(&packet::arp()), OK);
    assert_eq!(h.to_container(&packet::arp()), OK);
}

#[test]
fn policy_generation_switch_is_atomic() {
    let mut h = Harness::new(EGRESS);
    // generation 0 allows port 80; generation 1 allows port 81
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    let gen1 = PolicyKey {
        prefixlen: POLICY_PREFIX_FULL,
        ep_id: EP_ID,
        gen_dir: POLICY_KEY_DIR_EGRESS | cilium_abi::POLICY_KEY_GEN,
        identity: PEER_IDENTITY,
        protocol: 6,
        dport: 81u16.to_be(),
        ..Default::default()
    };
    h.dp.policy_insert(&gen1, &PolicyEntry::default()).unwrap();
    assert_eq!(h.from_container(&packet::tcp(POD, 1, PEER, 80, TCP_SYN)), OK);
    assert_eq!(h.from_container(&packet::tcp(POD, 2, PEER, 81, TCP_SYN)), SHOT);
    let mut ep = h.dp.endpoints().unwrap()[0];
    ep.flags |= EndpointFlag::PolicyGen as u16;
    h.dp.endpoint_upsert(&ep).unwrap();
    assert_eq!(h.from_container(&packet::tcp(POD, 3, PEER, 80, TCP_SYN)), SHOT);
    assert_eq!(h.from_container(&packet::tcp(POD, 4, PEER, 81, TCP_SYN)), OK);
}

const REDIRECT: i32 = 7;

fn add_local_peer(h: &mut Harness, flags: u16) {
    add_local_peer_at(h, flags, 999)
}

fn add_local_peer_at(h: &mut Harness, flags: u16, ifindex: u32) {
    h.dp.endpoint_upsert(&EndpointInfo {
        ifindex,
        ipv4: ip_to_be(PEER),
        sec_identity: PEER_IDENTITY,
        ep_id: 43,
        flags,
        mac: [2, 0, 0, 0, 0, 0xbb],
        node_mac: [2, 0, 0, 0, 0, 0xcc],
        ipv6: PEER6.octets(),
    })
    .unwrap();
    h.ipcache6(PEER6, PEER_IDENTITY);
}

#[test]
fn local_destination_is_delivered_directly() {
    let mut h = Harness::new(0);
    add_local_peer(&mut h, 0);
    let pkt = packet::tcp(POD, 1000, PEER, 80, TCP_SYN);
    let (ret, out) = h.dp.test_run(Program::FromContainer, &pkt, IFINDEX).unwrap();
    assert_eq!(ret, REDIRECT);
    assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 0xbb], "destination MAC is the pod's");
    assert_eq!(&out[6..12], &[2, 0, 0, 0, 0, 0xcc], "source MAC is its host-side veth");
    assert_eq!(out[14 + 8], 63, "TTL decremented");
    // the IPv4 header checksum still verifies
    let hdr = &out[14..34];
    let sum: u32 = hdr.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum();
    assert_eq!(((sum & 0xffff) + (sum >> 16)) as u16, 0xffff);
    let ev = h.events();
    assert!(ev.iter().any(|e| e.r#type == EventType::Trace.code() && e.subtype == TracePoint::ToLxc.code() && e.source_ep == 43));
}

/// The trace points and packets each --monitor-aggregation level reports,
/// for a connection to a local endpoint and one to the world.
#[test]
fn monitor_aggregation_levels() {
    let traces = |h: &mut Harness| -> Vec<(u8, u8)> {
        h.events().iter().filter(|e| e.r#type == EventType::Trace.code()).map(|e| (e.subtype, e.tcp_flags)).collect()
    };
    let (to_ep, from_ep, to_stack) = (TracePoint::ToLxc.code(), TracePoint::FromLxc.code(), TracePoint::ToStack.code());
    let connection = |h: &mut Harness, peer: Ipv4Addr, sport: u16| {
        assert_ne!(h.from_container(&packet::tcp(POD, sport, peer, 80, TCP_SYN)), SHOT);
        assert_ne!(h.from_container(&packet::tcp(POD, sport, peer, 80, TCP_ACK)), SHOT);
        assert_ne!(h.from_container(&packet::tcp(POD, sport, peer, 80, TCP_ACK)), SHOT);
        assert_ne!(h.from_container(&packet::tcp(POD, sport, peer, 80, TCP_RST | TCP_ACK)), SHOT);
    };
    for (level, local, world) in [
        (MonitorAggregation::None, vec![from_ep, to_ep, from_ep, to_ep, from_ep, to_ep, from_ep, to_ep], vec![from_ep; 4]),
        (MonitorAggregation::Lowest, vec![to_ep; 4], vec![to_stack; 4]),
        (MonitorAggregation::Low, vec![to_ep; 4], vec![to_stack; 4]),
        (MonitorAggregation::Medium, vec![to_ep; 2], vec![to_stack; 2]),
        (MonitorAggregation::Maximum, vec![to_ep; 2], vec![to_stack; 2]),
    ] {
        let mut h = Harness::new(0);
        add_local_peer(&mut h, 0);
        h.dp.set_monitor_aggregation(level).unwrap();
        connection(&mut h, PEER, 1000);
        assert_eq!(traces(&mut h).iter().map(|t| t.0).collect::<Vec<_>>(), local, "{level:?}, to a local endpoint");
        connection(&mut h, OUTSIDE, 1001);
        let world_traces = traces(&mut h);
        assert_eq!(world_traces.iter().map(|t| t.0).collect::<Vec<_>>(), world, "{level:?}, to the world");
        if level >= MonitorAggregation::Medium {
            // the opening and the reset, not the ACKs between
            assert_eq!(world_traces.iter().map(|t| t.1).collect::<Vec<_>>(), vec![TCP_SYN, TCP_RST | TCP_ACK]);
            // a new connection on the closed tuple is reported again
            connection(&mut h, OUTSIDE, 1001);
            assert_eq!(traces(&mut h).len(), 2, "{level:?}: a reused tuple's connection");
        }
    }
}

const PEER_EP_ID: u16 = 43;

/// A device standing for the local peer's own device, for packets the
/// peer sends (BPF_PROG_RUN wants a packet's ifindex to exist); removed
/// when dropped.
struct PeerDevice {
    name: String,
    ifindex: u32,
}

impl PeerDevice {
    fn new() -> PeerDevice {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // this kernel has veth, not dummy (deleting one end removes both)
        let name = format!("cpr{}x{n}", std::process::id());
        let other = format!("cpq{}x{n}", std::process::id());
        let ok = std::process::Command::new("ip").args(["link", "add", &name, "type", "veth", "peer", "name", &other]).status().unwrap().success();
        assert!(ok, "ip link add {name} type veth");
        let mut dev = PeerDevice { ifindex: 0, name };
        dev.ifindex = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", dev.name)).unwrap().trim().parse().unwrap();
        dev
    }
}

impl Drop for PeerDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

/// A local peer with a device of its own, so it can send too.
fn add_sending_peer(h: &mut Harness, flags: u16) -> PeerDevice {
    let dev = PeerDevice::new();
    add_local_peer_at(h, flags, dev.ifindex);
    dev
}

fn from_peer(h: &mut Harness, dev: &PeerDevice, pkt: &[u8]) -> i32 {
    h.dp.test_run(Program::FromContainer, pkt, dev.ifindex).unwrap().0
}

/// The opener (the pod, or its local peer) may send to the other's `port`,
/// and the other accept it.
fn allow_pair(h: &mut Harness, opener_is_pod: bool, proto: u8, port: u16) {
    let (opener, acceptor, acceptor_identity) =
        if opener_is_pod { (EP_ID, PEER_EP_ID, PEER_IDENTITY) } else { (PEER_EP_ID, EP_ID, EP_IDENTITY) };
    let opener_identity = if opener_is_pod { EP_IDENTITY } else { PEER_IDENTITY };
    h.rule_of(opener, true, acceptor_identity, proto, Some(port), false);
    h.rule_of(acceptor, false, opener_identity, proto, Some(port), false);
}

/// A connection between two endpoints of the node keeps one conntrack
/// entry, whichever end opened it and whichever has the lower address, and
/// both ends' policies still apply to it.
#[test]
fn a_local_pair_keeps_one_entry_for_both_ends() {
    for (v6, opener_is_pod) in [(false, true), (false, false), (true, true), (true, false)] {
        let mut h = if v6 { Harness::new6(EGRESS | INGRESS) } else { Harness::new(EGRESS | INGRESS) };
        let dev = add_sending_peer(&mut h, EGRESS | INGRESS);
        allow_pair(&mut h, opener_is_pod, 6, 80);
        // a TCP packet the opener (or the acceptor) sends, run at the sender's hook
        let send = |h: &mut Harness, by_opener: bool, sport: u16, dport: u16, flags: u8| -> i32 {
            let from_pod = by_opener == opener_is_pod;
            let pkt = match (v6, from_pod) {
                (false, true) => packet::tcp(POD, sport, PEER, dport, flags),
                (false, false) => packet::tcp(PEER, sport, POD, dport, flags),
                (true, true) => packet::tcp6(POD6, sport, PEER6, dport, flags),
                (true, false) => packet::tcp6(PEER6, sport, POD6, dport, flags),
            };
            if from_pod { h.from_container(&pkt) } else { from_peer(h, &dev, &pkt) }
        };
        let case = format!("IPv6 {v6}, the pod opens {opener_is_pod}");
        assert_eq!(send(&mut h, true, 1000, 80, TCP_SYN), REDIRECT, "{case}");
        assert_eq!(send(&mut h, false, 80, 1000, TCP_SYN | TCP_ACK), REDIRECT, "{case}: the reply, by conntrack");
        assert_eq!(send(&mut h, true, 1000, 80, TCP_ACK), REDIRECT, "{case}");
        let entries = h.dp.ct_dump().unwrap();
        assert_eq!(entries.len(), 1, "{case}: {entries:?}");
        let flags = entries[0].1.flags;
        for f in [CtEntryFlag::Pair, CtEntryFlag::PeerVerdict, CtEntryFlag::SeenReply] {
            assert_ne!(flags & f as u16, 0, "{case}: {f:?}");
        }
        assert_eq!((entries[0].1.tx_packets, entries[0].1.rx_packets), (2, 1), "{case}: each packet counted once");
        // neither end lets a new connection the other way in
        assert_eq!(send(&mut h, false, 80, 1001, TCP_SYN), SHOT, "{case}");
        assert_eq!(send(&mut h, false, 2000, 80, TCP_SYN), SHOT, "{case}");
    }
}

/// The acceptor's verdict is its own: denied by its ingress, the connection
/// stays shut while the opener retries, and what the acceptor sends on it
/// is judged by its egress policy; a policy change rechecks each end.
#[test]
fn a_local_pairs_acceptor_keeps_its_own_verdict() {
    let mut h = Harness::new(EGRESS | INGRESS);
    let dev = add_sending_peer(&mut h, EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), SHOT, "the peer's ingress denies");
    let ev = h.events();
    assert!(ev.iter().any(|e| e.r#type == EventType::PolicyVerdict.code() && e.source_ep == PEER_EP_ID && e.verdict < 0));
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), SHOT, "a retry too");
    assert!(h.events().iter().any(|e| e.r#type == EventType::PolicyVerdict.code() && e.source_ep == PEER_EP_ID), "judged again");
    // the peer answering on a connection it never let in: its egress decides
    assert_eq!(from_peer(&mut h, &dev, &packet::tcp(PEER, 80, POD, 1000, TCP_SYN | TCP_ACK)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::PolicyDenied.code()]);
    let entries = h.dp.ct_dump().unwrap();
    assert_eq!(entries.len(), 1);
    let e = entries[0].1;
    assert_eq!((e.rx_packets, e.flags & CtEntryFlag::SeenReply as u16), (0, 0), "the refused answer left the opener's entry as it was");
    // let in: established both ways
    h.rule_of(PEER_EP_ID, false, EP_IDENTITY, 6, Some(80), false);
    h.dp.bump_policy_revision().unwrap();
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), REDIRECT);
    assert_eq!(from_peer(&mut h, &dev, &packet::tcp(PEER, 80, POD, 1000, TCP_SYN | TCP_ACK)), REDIRECT);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), REDIRECT);
    // the acceptor's rule goes: its ingress closes the connection, although
    // the opener's egress still allows it
    h.dp.policy_delete(&rule_key(PEER_EP_ID, false, EP_IDENTITY, 6, Some(80))).unwrap();
    h.events();
    h.dp.bump_policy_revision().unwrap();
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_ACK)), SHOT);
    let d = h.events().into_iter().find(|e| e.r#type == EventType::Drop.code()).expect("drop");
    assert_eq!(d.source_ep, PEER_EP_ID);
}

/// ICMP errors between two local endpoints are related to their pair's
/// connection, both ways.
#[test]
fn icmp_errors_within_a_local_pair_are_related() {
    let mut h = Harness::new(EGRESS | INGRESS);
    let dev = add_sending_peer(&mut h, EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 17, Some(53), false);
    h.rule_of(PEER_EP_ID, false, EP_IDENTITY, 17, Some(53), false);
    let query = packet::udp(POD, 4000, PEER, 53);
    assert_eq!(h.from_container(&query), REDIRECT);
    assert_eq!(from_peer(&mut h, &dev, &packet::icmp_unreachable(PEER, POD, &query)), REDIRECT, "the peer's error about the query");
    let other = packet::udp(POD, 4001, PEER, 53);
    assert_eq!(from_peer(&mut h, &dev, &packet::icmp_unreachable(PEER, POD, &other)), SHOT, "about a query never sent");
}

/// An ICMP error from outside the pair (the node's stack, when a packet's
/// TTL runs out on the way) about a pair's packet reaches its sender,
/// whichever end has the lower address; and no ICMP error passes an end
/// that never let the connection in.
#[test]
fn icmp_errors_about_a_local_pair() {
    for opener_is_pod in [true, false] {
        let mut h = Harness::new(EGRESS | INGRESS);
        let dev = add_sending_peer(&mut h, EGRESS | INGRESS);
        let (a, b) = if opener_is_pod { (POD, PEER) } else { (PEER, POD) };
        allow_pair(&mut h, opener_is_pod, 17, 53);
        let query = packet::udp(a, 4000, b, 53);
        let run = |h: &mut Harness, pod: bool, egress: bool, pkt: &[u8]| {
            let prog = if egress { Program::FromContainer } else { Program::ToContainer };
            h.dp.test_run(prog, pkt, if pod { IFINDEX } else { dev.ifindex }).unwrap().0
        };
        assert_eq!(run(&mut h, opener_is_pod, true, &query), REDIRECT);
        // the opener's ingress lets nothing from the world in but this error
        let error = packet::icmp_unreachable(OUTSIDE, a, &query);
        assert_eq!(run(&mut h, opener_is_pod, false, &error), OK, "opener {a}: related");
        let other = packet::udp(a, 4001, b, 53);
        assert_eq!(run(&mut h, opener_is_pod, false, &packet::icmp_unreachable(OUTSIDE, a, &other)), SHOT, "opener {a}: unrelated");
    }
    // the peer's ingress lets nothing in: the pod's query is refused, and
    // neither end's ICMP error about it gets through the peer
    let mut h = Harness::new(EGRESS | INGRESS);
    let dev = add_sending_peer(&mut h, EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 17, Some(53), false);
    h.rule(true, PEER_IDENTITY, 1, None, false);
    let query = packet::udp(POD, 4000, PEER, 53);
    assert_eq!(h.from_container(&query), SHOT);
    let reply = packet::udp(PEER, 53, POD, 4000);
    assert_eq!(h.from_container(&packet::icmp_unreachable(POD, PEER, &reply)), SHOT, "into the peer");
    assert_eq!(from_peer(&mut h, &dev, &packet::icmp_unreachable(PEER, POD, &query)), SHOT, "out of the peer");
    let drops = h.drops();
    assert_eq!(drops.len(), 3, "{drops:?}");
    assert!(drops.iter().all(|&d| d == DropReason::PolicyDenied.code()), "{drops:?}");
}

#[test]
fn local_destination_ingress_policy_applies() {
    let mut h = Harness::new(0);
    add_local_peer(&mut h, INGRESS);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, PEER, 80, TCP_SYN)), SHOT);
    let ev = h.events();
    let d = ev.iter().find(|e| e.r#type == EventType::Drop.code()).expect("drop");
    assert_eq!((d.subtype, d.source_ep), (DropReason::PolicyDenied.code(), 43));
    assert_eq!((d.src_identity, d.dst_identity), (EP_IDENTITY, PEER_IDENTITY));
}

#[test]
fn expiring_ttl_goes_to_the_stack() {
    let mut h = Harness::new(0);
    add_local_peer(&mut h, 0);
    let mut pkt = packet::tcp(POD, 1000, PEER, 80, TCP_SYN);
    pkt[14 + 8] = 1;
    assert_eq!(h.from_container(&pkt), OK);
}

#[test]
fn sctp_is_enforced_by_port() {
    let mut h = Harness::new(EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 132, Some(80), false);
    assert_eq!(h.from_container(&packet::sctp(POD, 5000, PEER, 80)), OK);
    assert_eq!(h.to_container(&packet::sctp(PEER, 80, POD, 5000)), OK, "the reply passes by conntrack");
    assert_eq!(h.from_container(&packet::sctp(POD, 5000, PEER, 81)), SHOT);
    assert_eq!(h.from_container(&packet::tcp(POD, 5000, PEER, 80, TCP_SYN)), SHOT, "SCTP rules allow only SCTP");
}

#[test]
fn extended_ip_protocols_only_when_enabled_and_under_policy() {
    const VRRP: u8 = 112;
    const GRE: u8 = 47;
    // without the flag: dropped even where nothing is enforced
    let mut h = Harness::new(0);
    assert_eq!(h.from_container(&packet::ip_proto(POD, PEER, VRRP)), SHOT);
    assert_eq!(h.to_container(&packet::ip_proto(PEER, POD, GRE)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::CtUnknownL4Protocol.code(); 2]);
    assert_eq!(h.from_container(&packet::udp(POD, 5000, PEER, 53)), OK, "UDP is not affected");

    let ext = EndpointFlag::ExtendedProtocols as u16;
    let mut h = Harness::new(ext);
    assert_eq!(h.from_container(&packet::ip_proto(POD, PEER, GRE)), OK, "not enforced: passes");
    let mut h = Harness::new(ext | EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, VRRP, None, false);
    assert_eq!(h.from_container(&packet::ip_proto(POD, PEER, VRRP)), OK);
    assert_eq!(h.to_container(&packet::ip_proto(PEER, POD, VRRP)), OK, "the reply passes by conntrack");
    assert_eq!(h.from_container(&packet::ip_proto(POD, PEER, GRE)), SHOT, "another protocol");
    assert_eq!(h.to_container(&packet::ip_proto(OUTSIDE, POD, VRRP)), SHOT, "no ingress rule");
    assert_eq!(h.drops(), vec![DropReason::PolicyDenied.code(); 2]);
}

#[test]
fn host_firewall_judges_what_reaches_the_node_even_unparsed() {
    const NODE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
    let mut h = Harness::new(0);
    h.ipcache(NODE, 1);
    let syn = |port| packet::tcp(OUTSIDE, 40000, NODE, port, TCP_SYN);
    let from_netdev = |h: &mut Harness, pkt: &[u8]| h.dp.test_run(Program::FromNetdev, pkt, IFINDEX).unwrap().0;
    // no host endpoint: the node's traffic is the stack's
    assert_eq!(from_netdev(&mut h, &syn(22)), OK);
    assert_eq!(from_netdev(&mut h, &packet::udp_fragment(OUTSIDE, NODE)), OK);
    // a host endpoint enforcing ingress, port 22 allowed from anyone
    h.dp.endpoint_upsert(&EndpointInfo {
        ifindex: cilium_abi::HOST_ENDPOINT_IFINDEX,
        ipv4: ip_to_be(NODE),
        sec_identity: 1,
        ep_id: cilium_abi::HOST_ENDPOINT_ID,
        flags: INGRESS | EndpointFlag::ExtendedProtocols as u16,
        ..Default::default()
    })
    .unwrap();
    let key = PolicyKey { prefixlen: POLICY_PREFIX_FULL, ep_id: cilium_abi::HOST_ENDPOINT_ID, identity: 0, protocol: 6, dport: 22u16.to_be(), ..Default::default() };
    h.dp.policy_insert(&key, &PolicyEntry { match_type: PolicyMatch::L3L4.code(), ..Default::default() }).unwrap();
    h.events();
    assert_eq!(from_netdev(&mut h, &syn(22)), OK);
    assert_eq!(from_netdev(&mut h, &syn(10250)), SHOT, "another port of the node");
    assert_eq!(from_netdev(&mut h, &packet::udp_fragment(OUTSIDE, NODE)), SHOT, "a fragment would reach the node's sockets unjudged");
    let mut tiny = syn(10250);
    tiny.truncate(14 + 20 + 8); // a first fragment holding 8 bytes of TCP
    assert_eq!(from_netdev(&mut h, &tiny), SHOT, "so would a truncated TCP header");
    assert_eq!(h.drops(), vec![DropReason::PolicyDenied.code(), DropReason::FragmentationNotSupported.code(), DropReason::CtInvalidHeader.code()]);
    assert_eq!(from_netdev(&mut h, &packet::udp_fragment(OUTSIDE, PEER)), OK, "not the node's: the stack's");
}

#[test]
fn icmp_errors_are_related_only_between_the_quoted_endpoints() {
    let mut h = Harness::new(EGRESS | INGRESS);
    // the pod has an inbound connection from the peer...
    h.rule(false, PEER_IDENTITY, 6, Some(80), false);
    let inbound = packet::tcp(PEER, 3333, POD, 80, TCP_SYN);
    assert_eq!(h.to_container(&inbound), OK);
    // ...so it may answer the peer with an error about it
    assert_eq!(h.from_container(&packet::icmp_unreachable(POD, PEER, &inbound)), OK);
    // but not send that error to anyone else: egress denies everything
    assert_eq!(h.from_container(&packet::icmp_unreachable(POD, OUTSIDE, &inbound)), SHOT);
    // an error reaching the pod must quote a packet the pod sent
    let not_from_pod = packet::tcp(PEER, 3333, OUTSIDE, 80, TCP_SYN);
    assert_eq!(h.to_container(&packet::icmp_unreachable(OUTSIDE, POD, &not_from_pod)), SHOT);
}

#[test]
fn icmp_other_than_echo_is_never_a_reply() {
    let mut h = Harness::new(EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 1, Some(13), false); // timestamp requests out
    assert_eq!(h.from_container(&packet::icmp_type(POD, PEER, 13)), OK);
    // a router advertisement back is not a reply of anything
    assert_eq!(h.to_container(&packet::icmp_type(PEER, POD, 9)), SHOT);
}

#[test]
fn spoofed_local_source_is_dropped_at_ingress() {
    let mut h = Harness::new(0);
    add_local_peer(&mut h, 0);
    // PEER is a local endpoint: its traffic is delivered directly, so a packet
    // arriving through the stack with its address is spoofed
    assert_eq!(h.to_container(&packet::tcp(PEER, 1000, POD, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::InvalidSourceIp.code()]);
}

#[test]
fn l7_entries_drop_until_the_proxy_exists() {
    let mut h = Harness::new(INGRESS);
    let key = rule_key(EP_ID, false, PEER_IDENTITY, 6, Some(80));
    let entry = PolicyEntry { proxy_port: cilium_abi::POLICY_PROXY_PORT_PENDING.to_be(), ..Default::default() };
    h.dp.policy_insert(&key, &entry).unwrap();
    assert_eq!(h.to_container(&packet::tcp(PEER, 1000, POD, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::ProxyLookupFailed.code()]);
}

#[test]
fn conntrack_dump_gc_and_flush_in_batches() {
    let mut h = Harness::new(0);
    // 5000 connections: more than one batch
    for port in 0..5000u16 {
        assert_eq!(h.from_container(&packet::udp(POD, 10000 + port, PEER, 53)), OK);
    }
    assert_eq!(h.from_container(&packet::udp(POD, 9999, OUTSIDE, 53)), OK);
    let all = h.dp.ct_dump().unwrap();
    assert_eq!(all.len(), 5001);
    assert_eq!(h.dp.ct_flush_ip(OUTSIDE.into()).unwrap(), 1);
    assert_eq!(h.dp.ct_gc(0).unwrap(), 0, "nothing has expired yet");
    assert_eq!(h.dp.ct_gc(u32::MAX).unwrap(), 5000, "everything expires eventually");
    assert!(h.dp.ct_dump().unwrap().is_empty());
}

/// An egress entry of the endpoint for `identity` on TCP `port` that
/// redirects to `proxy_port`.
fn l7_rule(h: &mut Harness, identity: u32, port: u16, proxy_port: u16) {
    let key = rule_key(EP_ID, true, identity, 6, Some(port));
    let entry = PolicyEntry { proxy_port: proxy_port.to_be(), match_type: PolicyMatch::L3L4.code(), ..Default::default() };
    h.dp.policy_insert(&key, &entry).unwrap();
}

#[test]
fn l7_redirect_without_a_proxy_socket_drops_and_never_forwards() {
    let mut h = Harness::new(EGRESS);
    // a port no proxy listens on in this namespace
    l7_rule(&mut h, 2, 80, 15999);
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, OUTSIDE, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::ProxyLookupFailed.code()]);
    // the conntrack entry remembers the redirect: later packets are not let through either
    assert_eq!(h.from_container(&packet::tcp(POD, 1000, OUTSIDE, 80, TCP_ACK)), SHOT);
}

// ---- IPv6 ----

#[test]
fn ipv6_is_dropped_for_an_endpoint_without_an_ipv6_address() {
    let mut h = Harness::new(0);
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1000, PEER6, 80, TCP_SYN)), SHOT);
    assert_eq!(h.to_container(&packet::tcp6(PEER6, 80, POD6, 1000, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::UnsupportedL3Protocol.code(); 2]);
}

#[test]
fn ipv6_events_carry_the_ipv6_tuple() {
    let mut h = Harness::new6(0);
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1000, PEER6, 80, TCP_SYN)), OK);
    let ev = h.events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].r#type, ev[0].subtype), (EventType::Trace.code(), TracePoint::ToStack.code()));
    assert_eq!(ev[0].ip_version, 6);
    assert_eq!((Ipv6Addr::from(ev[0].saddr6), Ipv6Addr::from(ev[0].daddr6)), (POD6, PEER6));
    assert_eq!((ev[0].sport, ev[0].dport, ev[0].protocol), (1000, 80, 6));
    assert_eq!((ev[0].src_identity, ev[0].dst_identity), (EP_IDENTITY, PEER_IDENTITY));
}

#[test]
fn ipv6_policy_and_conntrack() {
    let mut h = Harness::new6(EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1000, PEER6, 80, TCP_SYN)), OK);
    assert_eq!(h.to_container(&packet::tcp6(PEER6, 80, POD6, 1000, TCP_SYN | TCP_ACK)), OK, "the reply passes by conntrack");
    assert_eq!(h.to_container(&packet::tcp6(PEER6, 5555, POD6, 1000, TCP_SYN)), SHOT, "a new connection in does not");
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1001, PEER6, 81, TCP_SYN)), SHOT, "another port");
    h.events();
    // an address the ipcache does not know is the IPv6 world
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1002, OUTSIDE6, 80, TCP_SYN)), SHOT);
    let ev = h.events();
    let v = ev.iter().find(|e| e.r#type == EventType::PolicyVerdict.code()).expect("verdict");
    assert_eq!(v.dst_identity, cilium_abi::ReservedIdentity::WorldIpv6.code());
    h.rule(true, cilium_abi::ReservedIdentity::WorldIpv6.code(), 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1003, OUTSIDE6, 80, TCP_SYN)), OK);
    // one entry per connection, in cilium_ct6
    let conns = h.dp.ct_dump().unwrap();
    assert!(conns.iter().any(|(k, _)| k.local == std::net::IpAddr::V6(POD6) && k.remote == std::net::IpAddr::V6(OUTSIDE6) && k.rport == 80));
    assert_eq!(h.dp.ct_flush_ip(POD6.into()).unwrap(), 2);
}

#[test]
fn ipv6_source_must_be_the_endpoints() {
    let mut h = Harness::new6(0);
    let other = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0x99);
    assert_eq!(h.from_container(&packet::tcp6(other, 1000, PEER6, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::InvalidSourceIp.code()]);
}

#[test]
fn icmpv6_echo_by_type_and_neighbour_discovery_always() {
    let mut h = Harness::new6(EGRESS | INGRESS);
    h.rule(true, PEER_IDENTITY, 58, Some(128), false);
    assert_eq!(h.from_container(&packet::icmp6_echo(POD6, PEER6, false, 7)), OK);
    assert_eq!(h.to_container(&packet::icmp6_echo(PEER6, POD6, true, 7)), OK, "the echo reply by conntrack");
    assert_eq!(h.to_container(&packet::icmp6_echo(PEER6, POD6, true, 8)), SHOT, "another identifier");
    assert_eq!(h.to_container(&packet::icmp6_echo(PEER6, POD6, false, 9)), SHOT, "echo requests in are not allowed");
    assert_eq!(h.from_container(&packet::icmp_echo(POD, PEER, false, 7)), SHOT, "the ICMPv6 rule is not an ICMP one");
    // neighbour discovery and MLD as the link carries them (link-scope
    // destination, hop limit 255 or 1): the link's own, under any policy
    let ll = |last: u16| Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, last);
    let solicited = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x20);
    let mld = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
    for (src, dst, t, hops) in [(ll(1), solicited, 135u8, 255u8), (Ipv6Addr::UNSPECIFIED, solicited, 135, 255), (POD6, ll(2), 136, 255), (ll(1), ll(2), 133, 255), (ll(1), mld, 143, 1)] {
        assert_eq!(h.from_container(&packet::icmp6_hops(src, dst, t, hops)), OK, "type {t} out from {src} to {dst}");
        assert_eq!(h.to_container(&packet::icmp6_hops(ll(2), dst, t, hops)), OK, "type {t} in");
    }
    h.events();
    // the same types otherwise are ordinary ICMPv6, judged: to a routable
    // address, with a hop limit that could have been forwarded, or from a
    // source the pod does not own
    for (src, dst, t, hops) in [(POD6, PEER6, 135u8, 255u8), (POD6, OUTSIDE6, 143, 1), (ll(1), solicited, 135, 64), (ll(1), mld, 143, 255), (PEER6, solicited, 135, 255)] {
        assert_eq!(h.from_container(&packet::icmp6_hops(src, dst, t, hops)), SHOT, "type {t} out from {src} to {dst}, hop limit {hops}");
    }
    assert_eq!(h.to_container(&packet::icmp6_hops(OUTSIDE6, POD6, 135, 255)), SHOT, "a neighbour solicitation from the world to the pod's global address");
    assert!(h.drops().iter().all(|d| *d == DropReason::PolicyDenied.code() || *d == DropReason::InvalidSourceIp.code()));
}

#[test]
fn icmp_of_the_other_family_is_an_unknown_protocol() {
    let mut h = Harness::new6(0);
    assert_eq!(h.from_container(&packet::ip6_proto(POD6, PEER6, 1)), SHOT, "ICMP (1) over IPv6");
    assert_eq!(h.from_container(&packet::ip_proto(POD, PEER, 58)), SHOT, "ICMPv6 (58) over IPv4");
    assert_eq!(h.drops(), vec![DropReason::CtUnknownL4Protocol.code(); 2]);
}

#[test]
fn ipv6_from_the_network_with_a_node_or_pod_source_is_spoofed() {
    const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 0x11);
    let mut h = Harness::new6(0);
    h.ipcache6(NODE6, 1);
    let from_netdev = |h: &mut Harness, pkt: &[u8]| h.dp.test_run(Program::FromNetdev, pkt, IFINDEX).unwrap().0;
    assert_eq!(from_netdev(&mut h, &packet::tcp6(OUTSIDE6, 40000, POD6, 80, TCP_SYN)), OK, "the world's: to the stack");
    assert_eq!(from_netdev(&mut h, &packet::tcp6(NODE6, 40000, POD6, 80, TCP_SYN)), SHOT, "the node's own address");
    assert_eq!(from_netdev(&mut h, &packet::tcp6(POD6, 40000, PEER6, 80, TCP_SYN)), SHOT, "a local pod's address");
    assert_eq!(h.drops(), vec![DropReason::InvalidSourceIp.code(); 2]);
}

#[test]
fn icmpv6_errors_are_related() {
    let mut h = Harness::new6(EGRESS | INGRESS);
    h.rule(true, 0, 17, Some(9999), false);
    let out = packet::udp6(POD6, 4000, OUTSIDE6, 9999);
    assert_eq!(h.from_container(&out), OK);
    assert_eq!(h.to_container(&packet::icmp6_unreachable(OUTSIDE6, POD6, &out)), OK);
    let unrelated = packet::udp6(POD6, 4001, OUTSIDE6, 9999);
    assert_eq!(h.to_container(&packet::icmp6_unreachable(OUTSIDE6, POD6, &unrelated)), SHOT);
}

#[test]
fn ipv6_extension_headers_are_skipped_and_fragments_dropped() {
    let mut h = Harness::new6(EGRESS);
    h.rule(true, PEER_IDENTITY, 6, Some(80), false);
    assert_eq!(h.from_container(&packet::tcp6_hop_by_hop(POD6, 1000, PEER6, 80, TCP_SYN)), OK);
    assert_eq!(h.from_container(&packet::tcp6_hop_by_hop(POD6, 1001, PEER6, 81, TCP_SYN)), SHOT, "the port behind the header counts");
    h.events();
    assert_eq!(h.from_container(&packet::udp6_fragment(POD6, PEER6)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::FragmentationNotSupported.code()]);
}

#[test]
fn ipv6_local_destination_is_delivered_directly() {
    let mut h = Harness::new6(0);
    add_local_peer(&mut h, 0);
    let pkt = packet::tcp6(POD6, 1000, PEER6, 80, TCP_SYN);
    let (ret, out) = h.dp.test_run(Program::FromContainer, &pkt, IFINDEX).unwrap();
    assert_eq!(ret, REDIRECT);
    assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 0xbb]);
    assert_eq!(out[14 + 7], 63, "hop limit decremented");
    // and the destination's ingress policy applies
    let mut h = Harness::new6(0);
    add_local_peer(&mut h, INGRESS);
    assert_eq!(h.from_container(&pkt), SHOT);
}

#[test]
fn ipv6_l7_entries_fail_closed() {
    let mut h = Harness::new6(EGRESS);
    l7_rule(&mut h, PEER_IDENTITY, 80, cilium_abi::PROXY_PORT_HTTP_EGRESS);
    assert_eq!(h.from_container(&packet::tcp6(POD6, 1000, PEER6, 80, TCP_SYN)), SHOT);
    assert_eq!(h.drops(), vec![DropReason::ProxyLookupFailed.code()]);
}
