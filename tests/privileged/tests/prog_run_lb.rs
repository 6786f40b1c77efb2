//! The per-packet service load balancer (cil_from_netdev / cil_to_netdev)
//! through BPF_PROG_RUN on crafted packets: translation and reverse
//! translation with valid checksums, flows keeping their backend, refusal of
//! services without backends, source ranges. Private, unpinned maps per test.

use std::net::Ipv4Addr;

use aya::maps::{MapData, RingBuf};
use cilium_abi::{DropReason, EndpointInfo, Event, EventType, Lb4Backend, Lb4Key, Lb4Service, Lb4SrcRangeKey, LbBackendFlag, LbFlag};
use cilium_datapath::{Datapath, LbOp, LoadOptions, Loaded, Program, ip_to_be};
use cilium_privileged_tests::packet::{self, TCP_ACK, TCP_SYN, checksums_ok, tuple, with_l4_checksum};
use cilium_privileged_tests::require_root;

const OK: i32 = 0;
const SHOT: i32 = 2;
const REDIRECT: i32 = 7;
const IFINDEX: u32 = 1;
const NODE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const B2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);
const NODE_PORT: u16 = 30080;

struct Harness {
    dp: Loaded,
    ring: RingBuf<MapData>,
}

impl Harness {
    fn new() -> Harness {
        require_root();
        let mut dp = Loaded::load(LoadOptions { pin_dir: None, ct_max: 16384, policy_max: 4096, ipcache_max: 1024, endpoints_max: 64, events_bytes: 1 << 16, maglev_size: 251, ..Default::default() })
            .expect("load datapath");
        let ring = RingBuf::try_from(dp.take_events().unwrap()).unwrap();
        Harness { dp, ring }
    }

    /// A service on NODE:NODE_PORT/proto (ID 1) with these backends (IDs
    /// 1..), local endpoints of the node, which translated packets are
    /// redirected into (a backend on another node is reached through SNAT
    /// and the FIB: the lab tests that path).
    fn service(&mut self, proto: u8, backends: &[Ipv4Addr], flags: u8) {
        for (i, b) in backends.iter().enumerate() {
            let id = i as u32 + 1;
            self.dp.endpoint_upsert(&EndpointInfo { ifindex: 1000 + id, ipv4: ip_to_be(*b), ep_id: id as u16, ..Default::default() }).unwrap();
            self.dp.lb_apply(&[LbOp::BackendSet(id, Lb4Backend { address: ip_to_be(*b), port: 8080u16.to_be(), proto, flags: 0 })]).unwrap();
            let v = Lb4Service { backend_id: id, rev_nat_index: 1, ..Default::default() };
            self.dp.lb_apply(&[LbOp::ServiceSet(key(proto, i as u16 + 1), v)]).unwrap();
        }
        let master = Lb4Service { count: backends.len() as u16, rev_nat_index: 1, flags, ..Default::default() };
        self.dp.lb_apply(&[LbOp::ServiceSet(key(proto, 0), master)]).unwrap();
    }

    fn ingress(&mut self, pkt: &[u8]) -> (i32, Vec<u8>) {
        self.dp.test_run(Program::FromNetdev, pkt, IFINDEX).unwrap()
    }

    fn egress(&mut self, pkt: &[u8]) -> (i32, Vec<u8>) {
        self.dp.test_run(Program::ToNetdev, pkt, IFINDEX).unwrap()
    }

    fn drops(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(item) = self.ring.next() {
            let ev = Event::from_bytes(&item).unwrap().0;
            if ev.r#type == EventType::Drop.code() {
                v.push(ev.subtype);
            }
        }
        v
    }
}

fn key(proto: u8, slot: u16) -> Lb4Key {
    Lb4Key { address: ip_to_be(NODE), dport: NODE_PORT.to_be(), backend_slot: slot, proto, ..Default::default() }
}

fn syn(sport: u16) -> Vec<u8> {
    with_l4_checksum(packet::tcp(CLIENT, sport, NODE, NODE_PORT, TCP_SYN))
}

#[test]
fn tcp_is_translated_both_ways_with_valid_checksums() {
    let mut h = Harness::new();
    h.service(6, &[B1], 0);
    let (rc, out) = h.ingress(&syn(40000));
    assert_eq!(rc, REDIRECT, "a backend of this node: delivered into it");
    assert_eq!(tuple(&out), (CLIENT, 40000, B1, 8080), "destination is the backend");
    assert!(checksums_ok(&out), "checksums after DNAT");
    let reply = with_l4_checksum(packet::tcp(B1, 8080, CLIENT, 40000, TCP_SYN | TCP_ACK));
    let (rc, out) = h.egress(&reply);
    assert_eq!(rc, OK);
    assert_eq!(tuple(&out), (NODE, NODE_PORT, CLIENT, 40000), "the reply comes from the frontend");
    assert!(checksums_ok(&out), "checksums after reverse translation");
    // unrelated traffic passes untouched both ways
    let other = with_l4_checksum(packet::tcp(CLIENT, 40001, NODE, 22, TCP_SYN));
    assert_eq!(h.ingress(&other), (OK, other.clone()));
    let other = with_l4_checksum(packet::tcp(B1, 8080, CLIENT, 40999, TCP_ACK));
    assert_eq!(h.egress(&other), (OK, other.clone()));
}

#[test]
fn udp_is_translated_and_a_missing_checksum_stays_missing() {
    let mut h = Harness::new();
    h.service(17, &[B1], 0);
    let with = with_l4_checksum(packet::udp(CLIENT, 5000, NODE, NODE_PORT));
    let (rc, out) = h.ingress(&with);
    assert_eq!(rc, REDIRECT);
    assert_eq!(tuple(&out), (CLIENT, 5000, B1, 8080));
    assert!(checksums_ok(&out));
    let without = packet::udp(CLIENT, 5001, NODE, NODE_PORT);
    let (_, out) = h.ingress(&without);
    assert_eq!(tuple(&out), (CLIENT, 5001, B1, 8080));
    assert_eq!(&out[40..42], &[0, 0], "no checksum before, none after");
    assert!(checksums_ok(&out));
}

#[test]
fn a_flow_keeps_its_backend_and_new_ones_avoid_terminating_backends() {
    let mut h = Harness::new();
    h.service(6, &[B1, B2], 0);
    let (_, out) = h.ingress(&syn(41000));
    let first = tuple(&out).2;
    for _ in 0..20 {
        let ack = with_l4_checksum(packet::tcp(CLIENT, 41000, NODE, NODE_PORT, TCP_ACK));
        assert_eq!(tuple(&h.ingress(&ack).1).2, first, "same flow, same backend");
    }
    // its backend starts terminating and leaves the slots: the flow stays
    let (id, other) = if first == B1 { (1, B2) } else { (2, B1) };
    h.dp.lb_apply(&[LbOp::BackendSet(id, Lb4Backend { address: ip_to_be(first), port: 8080u16.to_be(), proto: 6, flags: LbBackendFlag::Terminating as u8 })]).unwrap();
    let keep = 3 - id;
    h.dp.lb_apply(&[LbOp::ServiceSet(key(6, 1), Lb4Service { backend_id: keep, rev_nat_index: 1, ..Default::default() })]).unwrap();
    h.dp.lb_apply(&[LbOp::ServiceSet(key(6, 0), Lb4Service { count: 1, rev_nat_index: 1, ..Default::default() })]).unwrap();
    h.dp.lb_apply(&[LbOp::ServiceDel(key(6, 2))]).unwrap();
    let ack = with_l4_checksum(packet::tcp(CLIENT, 41000, NODE, NODE_PORT, TCP_ACK));
    assert_eq!(tuple(&h.ingress(&ack).1).2, first, "established flows continue to a terminating backend");
    // a new connection on the same tuple goes to an active backend
    assert_eq!(tuple(&h.ingress(&syn(41000)).1).2, other);
    for p in 0..10 {
        assert_eq!(tuple(&h.ingress(&syn(42000 + p)).1).2, other, "new flows: active backends only");
    }
}

#[test]
fn a_service_without_backends_answers_port_unreachable() {
    let mut h = Harness::new();
    h.service(6, &[], 0);
    let pkt = syn(43000);
    let (rc, out) = h.ingress(&pkt);
    assert_eq!(rc, REDIRECT, "sent back out of the device");
    assert_eq!(out.len(), 14 + 56);
    assert_eq!((&out[0..6], &out[6..12]), (&pkt[6..12], &pkt[0..6]), "MACs swapped");
    assert_eq!(out[23], 1, "ICMP");
    assert_eq!((out[34], out[35]), (3, 3), "destination unreachable, port unreachable");
    assert_eq!(&out[26..30], &NODE.octets(), "from the frontend");
    assert_eq!(&out[30..34], &CLIENT.octets(), "to the client");
    assert_eq!(&out[42..70], &pkt[14..42], "quotes the IPv4 header and 8 bytes of TCP");
    assert!(checksums_ok(&out));
    assert_eq!(h.drops(), vec![DropReason::NoService.code()]);
}

#[test]
fn source_ranges_admit_only_their_clients() {
    let mut h = Harness::new();
    h.service(6, &[B1], LbFlag::SourceRange as u8);
    assert_eq!(h.ingress(&syn(44000)).0, SHOT, "no range admits the client yet");
    assert_eq!(h.drops(), vec![DropReason::NotInSourceRange.code()]);
    h.dp.lb_apply(&[LbOp::SrcRangeSet(Lb4SrcRangeKey { prefixlen: 32 + 24, rev_nat_index: 1, pad: 0, addr: ip_to_be(Ipv4Addr::new(192, 0, 2, 0)) })]).unwrap();
    let (rc, out) = h.ingress(&syn(44001));
    assert_eq!((rc, tuple(&out).2), (REDIRECT, B1));
    h.dp.lb_apply(&[LbOp::SrcRangeSet(Lb4SrcRangeKey { prefixlen: 32 + 24, rev_nat_index: 2, pad: 0, addr: ip_to_be(Ipv4Addr::new(198, 51, 100, 0)) })]).unwrap();
    h.dp.lb_apply(&[LbOp::SrcRangeDel(Lb4SrcRangeKey { prefixlen: 32 + 24, rev_nat_index: 1, pad: 0, addr: ip_to_be(Ipv4Addr::new(192, 0, 2, 0)) })]).unwrap();
    assert_eq!(h.ingress(&syn(44002)).0, SHOT, "another service's range does not count");
}

#[test]
fn client_ip_affinity_keeps_new_connections_on_one_backend() {
    let mut h = Harness::new();
    h.service(6, &[B1, B2], LbFlag::Affinity as u8);
    // the service entry carries the timeout
    h.dp.lb_apply(&[LbOp::ServiceSet(key(6, 0), Lb4Service { count: 2, rev_nat_index: 1, flags: LbFlag::Affinity as u8, affinity_timeout: 60, ..Default::default() })]).unwrap();
    let first = tuple(&h.ingress(&syn(45000)).1).2;
    for p in 1..20 {
        assert_eq!(tuple(&h.ingress(&syn(45000 + p)).1).2, first, "every new connection of the client goes to its backend");
    }
    // without affinity, 20 new connections spread over both backends
    let mut h = Harness::new();
    h.service(6, &[B1, B2], 0);
    let seen: std::collections::BTreeSet<Ipv4Addr> = (0..20).map(|p| tuple(&h.ingress(&syn(46000 + p)).1).2).collect();
    assert_eq!(seen.len(), 2);
}

#[test]
fn maglev_picks_the_backend_its_table_names() {
    let mut h = Harness::new();
    h.service(6, &[B1, B2], LbFlag::Maglev as u8);
    // a table that names only backend 2: every flow lands there
    let ops: Vec<LbOp> = (0..251u32).map(|slot| LbOp::MaglevSet(cilium_abi::LbMaglevKey { rev_nat_index: 1, pad: 0, slot }, 2)).collect();
    h.dp.lb_apply(&ops).unwrap();
    for p in 0..20 {
        assert_eq!(tuple(&h.ingress(&syn(47000 + p)).1).2, B2);
    }
}
