//! Building Ethernet/IPv4 and IPv6 packets with TCP, UDP or ICMP for BPF_PROG_RUN.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], frag_off: u16) -> Vec<u8> {
    let mut p = vec![0u8; 14];
    p[12] = 0x08;
    p[13] = 0x00;
    let total = 20 + payload.len();
    let mut ip = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 1, (frag_off >> 8) as u8, frag_off as u8, 64, proto, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum(&ip);
    ip[10] = (c >> 8) as u8;
    ip[11] = c as u8;
    p.extend(ip);
    p.extend_from_slice(payload);
    p
}

/// A TCP segment with the given flags.
pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14] = 0xff;
    t[15] = 0xff;
    ipv4(src, dst, 6, &t, 0)
}

/// A UDP datagram with a small payload.
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&12u16.to_be_bytes());
    u.extend_from_slice(b"ping");
    ipv4(src, dst, 17, &u, 0)
}

/// An ICMP echo request (type 8) or reply (type 0).
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, reply: bool, id: u16) -> Vec<u8> {
    let mut i = vec![if reply { 0 } else { 8 }, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&1u16.to_be_bytes());
    let c = csum(&i);
    i[2] = (c >> 8) as u8;
    i[3] = c as u8;
    ipv4(src, dst, 1, &i, 0)
}

/// An ICMP destination-unreachable from `src` to `dst` quoting `inner`
/// (an IPv4 packet with its Ethernet header, as built above).
pub fn icmp_unreachable(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut i = vec![3, 3, 0, 0, 0, 0, 0, 0];
    i.extend_from_slice(&inner[14..14 + 28]);
    let c = csum(&i);
    i[2] = (c >> 8) as u8;
    i[3] = c as u8;
    ipv4(src, dst, 1, &i, 0)
}

/// A non-first IPv4 fragment of a UDP datagram.
pub fn udp_fragment(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4(src, dst, 17, &[0u8; 16], 185)
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut p = vec![0xffu8; 6];
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0u8; 20]);
    p
}

/// An SCTP packet (common header and an INIT chunk header).
pub fn sctp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut s = vec![0u8; 16];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[12] = 1; // INIT
    s[15] = 4;
    ipv4(src, dst, 132, &s, 0)
}

/// A packet of an IP protocol without ports (VRRP, GRE, ...) with a small
/// payload.
pub fn ip_proto(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Vec<u8> {
    ipv4(src, dst, proto, &[0x21, 1, 100, 1, 0, 1, 0, 0], 0)
}

/// An ICMP message of any type without a body (e.g. 13, timestamp).
pub fn icmp_type(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8) -> Vec<u8> {
    let mut i = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
    let c = csum(&i);
    i[2] = (c >> 8) as u8;
    i[3] = c as u8;
    ipv4(src, dst, 1, &i, 0)
}

fn l4_sum(pkt: &[u8]) -> u16 {
    // pseudo header + L4 segment of an Ethernet/IPv4 packet with a 20-byte header
    let ip = &pkt[14..34];
    let l4 = &pkt[34..];
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    csum(&pseudo)
}

fn l4_csum_offset(pkt: &[u8]) -> usize {
    34 + if pkt[23] == 6 { 16 } else { 6 }
}

/// The packet with its TCP or UDP checksum filled in.
pub fn with_l4_checksum(mut pkt: Vec<u8>) -> Vec<u8> {
    let off = l4_csum_offset(&pkt);
    pkt[off] = 0;
    pkt[off + 1] = 0;
    let c = l4_sum(&pkt);
    pkt[off..off + 2].copy_from_slice(&c.to_be_bytes());
    pkt
}

/// Whether the IPv4 header checksum and the TCP, UDP or ICMP checksum are
/// right (a UDP checksum of 0 means none and is right).
pub fn checksums_ok(pkt: &[u8]) -> bool {
    if csum(&pkt[14..34]) != 0 {
        return false;
    }
    match pkt[23] {
        6 => l4_sum(pkt) == 0,
        17 => (pkt[40] == 0 && pkt[41] == 0) || l4_sum(pkt) == 0,
        1 => csum(&pkt[34..]) == 0,
        _ => true,
    }
}

/// (source, source port, destination, destination port) of a TCP/UDP packet.
pub fn tuple(pkt: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ip = |o: usize| Ipv4Addr::new(pkt[o], pkt[o + 1], pkt[o + 2], pkt[o + 3]);
    let port = |o: usize| u16::from_be_bytes([pkt[o], pkt[o + 1]]);
    (ip(26), port(34), ip(30), port(36))
}

// ---- IPv6 ----

/// An Ethernet/IPv6 packet; `ext` are extension headers (each already
/// carrying its next-header byte) between the fixed header and `payload`,
/// and `first` is the protocol number the fixed header names.
fn ipv6_with(src: Ipv6Addr, dst: Ipv6Addr, first: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 14];
    p[12] = 0x86;
    p[13] = 0xdd;
    let len = (ext.len() + payload.len()) as u16;
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.push(first);
    ip.push(64);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    p.extend(ip);
    p.extend_from_slice(ext);
    p.extend_from_slice(payload);
    p
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_with(src, dst, proto, &[], payload)
}

/// A TCP segment over IPv6.
pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let t = tcp(Ipv4Addr::UNSPECIFIED, sport, Ipv4Addr::UNSPECIFIED, dport, flags);
    ipv6(src, dst, 6, &t[34..])
}

/// A UDP datagram over IPv6.
pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let u = udp(Ipv4Addr::UNSPECIFIED, sport, Ipv4Addr::UNSPECIFIED, dport);
    ipv6(src, dst, 17, &u[34..])
}

/// A TCP segment behind a hop-by-hop options header (8 bytes of padding).
pub fn tcp6_hop_by_hop(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let t = tcp(Ipv4Addr::UNSPECIFIED, sport, Ipv4Addr::UNSPECIFIED, dport, flags);
    // next header TCP, length 0 (8 bytes), PadN of 4 bytes
    let hbh = [6, 0, 1, 4, 0, 0, 0, 0];
    ipv6_with(src, dst, 0, &hbh, &t[34..])
}

/// A non-first fragment of a UDP datagram over IPv6.
pub fn udp6_fragment(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    // next header UDP, offset 185 (×8 bytes), more fragments, identification 1
    let off: u16 = 185 << 3 | 1;
    let frag = [17, 0, (off >> 8) as u8, off as u8, 0, 0, 0, 1];
    ipv6_with(src, dst, 44, &frag, b"later bytes of the datagram")
}

/// An ICMPv6 echo request (128) or reply (129).
pub fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr, reply: bool, id: u16) -> Vec<u8> {
    let mut i = vec![if reply { 129 } else { 128 }, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&1u16.to_be_bytes());
    ipv6(src, dst, 58, &i)
}

/// An ICMPv6 message of any type with no particular body.
pub fn icmp6_type(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8) -> Vec<u8> {
    ipv6(src, dst, 58, &[icmp_type, 0, 0, 0, 0, 0, 0, 0])
}

/// The same with a given hop limit (neighbour discovery: 255, MLD: 1).
pub fn icmp6_hops(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, hop_limit: u8) -> Vec<u8> {
    let mut p = icmp6_type(src, dst, icmp_type);
    p[14 + 7] = hop_limit;
    p
}

/// An IPv6 packet carrying `proto` with 8 bytes of zeros.
pub fn ip6_proto(src: Ipv6Addr, dst: Ipv6Addr, proto: u8) -> Vec<u8> {
    ipv6(src, dst, proto, &[0; 8])
}

/// An ICMPv6 destination unreachable (port unreachable) quoting `inner`.
pub fn icmp6_unreachable(src: Ipv6Addr, dst: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut i = vec![1, 4, 0, 0, 0, 0, 0, 0];
    i.extend_from_slice(&inner[14..]);
    ipv6(src, dst, 58, &i)
}
