//! Turns the datapath's ring-buffer events into flows: decodes the captured
//! packet (Ethernet, IPv4 or IPv6, TCP/UDP/ICMP/ICMPv6) and the event's metadata.
//!
//! Pure parsing of untrusted bytes: every input, however short or malformed,
//! decodes to something or to nothing, never a panic (fuzzed). It is the seed
//! of Hubble's parser; it knows nothing of endpoints' names or the kernel.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cilium_abi::{DropReason, Event, EventFlag, EventType, PolicyMatch, TracePoint};
use serde::{Deserialize, Serialize};

/// Layer 4 of a packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "protocol")]
pub enum L4 {
    Tcp { src_port: u16, dst_port: u16, flags: TcpFlags },
    Udp { src_port: u16, dst_port: u16 },
    Icmp { icmp_type: u8, code: u8 },
    Icmpv6 { icmp_type: u8, code: u8 },
    Other { number: u8 },
}

/// TCP flags of a segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpFlags {
    pub fin: bool,
    pub syn: bool,
    pub rst: bool,
    pub psh: bool,
    pub ack: bool,
    pub urg: bool,
}

impl TcpFlags {
    pub fn from_byte(b: u8) -> TcpFlags {
        TcpFlags {
            fin: b & 0x01 != 0,
            syn: b & 0x02 != 0,
            rst: b & 0x04 != 0,
            psh: b & 0x08 != 0,
            ack: b & 0x10 != 0,
            urg: b & 0x20 != 0,
        }
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v = Vec::new();
        for (on, name) in [(self.syn, "SYN"), (self.ack, "ACK"), (self.fin, "FIN"), (self.rst, "RST"), (self.psh, "PSH"), (self.urg, "URG")] {
            if on {
                v.push(name);
            }
        }
        f.write_str(&v.join(", "))
    }
}

/// The decoded headers of a captured packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.l4 {
            L4::Tcp { src_port, dst_port, flags } => {
                write!(f, "{} -> {} tcp {}", SocketAddr::new(self.src, *src_port), SocketAddr::new(self.dst, *dst_port), flags)
            }
            L4::Udp { src_port, dst_port } => {
                write!(f, "{} -> {} udp", SocketAddr::new(self.src, *src_port), SocketAddr::new(self.dst, *dst_port))
            }
            L4::Icmp { icmp_type, code } => {
                write!(f, "{} -> {} {}", self.src, self.dst, icmp_name(*icmp_type, *code))
            }
            L4::Icmpv6 { icmp_type, code } => {
                write!(f, "{} -> {} {}", self.src, self.dst, icmp6_name(*icmp_type, *code))
            }
            L4::Other { number } => write!(f, "{} -> {} proto {}", self.src, self.dst, number),
        }
    }
}

fn icmp_name(t: u8, code: u8) -> String {
    match t {
        0 => "icmp EchoReply".into(),
        3 => format!("icmp DestinationUnreachable(code {code})"),
        8 => "icmp EchoRequest".into(),
        11 => "icmp TimeExceeded".into(),
        _ => format!("icmp type {t} code {code}"),
    }
}

fn icmp6_name(t: u8, code: u8) -> String {
    match t {
        1 => format!("icmpv6 DestinationUnreachable(code {code})"),
        2 => "icmpv6 PacketTooBig".into(),
        3 => "icmpv6 TimeExceeded".into(),
        128 => "icmpv6 EchoRequest".into(),
        129 => "icmpv6 EchoReply".into(),
        _ => format!("icmpv6 type {t} code {code}"),
    }
}

/// Layer 4 from the protocol number and the bytes after the IP header(s).
fn decode_l4(proto: u8, l4: &[u8]) -> Option<L4> {
    let port = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    Some(match proto {
        6 if l4.len() >= 14 => L4::Tcp { src_port: port(l4, 0), dst_port: port(l4, 2), flags: TcpFlags::from_byte(l4[13]) },
        17 if l4.len() >= 4 => L4::Udp { src_port: port(l4, 0), dst_port: port(l4, 2) },
        1 if l4.len() >= 2 => L4::Icmp { icmp_type: l4[0], code: l4[1] },
        58 if l4.len() >= 2 => L4::Icmpv6 { icmp_type: l4[0], code: l4[1] },
        6 | 17 | 1 | 58 => return None,
        n => L4::Other { number: n },
    })
}

/// Decodes an Ethernet frame carrying IPv4 or IPv6 (the L4 header right
/// after the fixed IPv6 header; extension headers show as their protocol
/// number). `None` for anything else or anything truncated before the L4
/// header.
pub fn decode_packet(frame: &[u8]) -> Option<Packet> {
    if frame.len() >= 14 + 40 && frame[12..14] == [0x86, 0xdd] {
        let ip = &frame[14..];
        if ip[0] >> 4 != 6 {
            return None;
        }
        let addr = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[i..i + 16]).expect("16 bytes")));
        return Some(Packet { src: addr(8), dst: addr(24), l4: decode_l4(ip[6], &ip[40..])? });
    }
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 || ip.len() < ihl {
        return None;
    }
    let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    Some(Packet { src, dst, l4: decode_l4(ip[9], &ip[ihl..])? })
}

/// The packet an event describes, from its tuple; `None` when the datapath
/// had not parsed it.
pub fn packet_of(ev: &Event) -> Option<Packet> {
    if ev.protocol == 0 {
        return None;
    }
    let (src, dst) = if ev.ip_version == 6 {
        (IpAddr::V6(Ipv6Addr::from(ev.saddr6)), IpAddr::V6(Ipv6Addr::from(ev.daddr6)))
    } else {
        (IpAddr::V4(Ipv4Addr::from(ev.saddr.to_ne_bytes())), IpAddr::V4(Ipv4Addr::from(ev.daddr.to_ne_bytes())))
    };
    let l4 = match ev.protocol {
        6 => L4::Tcp { src_port: ev.sport, dst_port: ev.dport, flags: TcpFlags::from_byte(ev.tcp_flags) },
        17 => L4::Udp { src_port: ev.sport, dst_port: ev.dport },
        1 => L4::Icmp { icmp_type: ev.icmp_type, code: ev.icmp_code },
        58 => L4::Icmpv6 { icmp_type: ev.icmp_type, code: ev.icmp_code },
        n => L4::Other { number: n },
    };
    Some(Packet { src, dst, l4 })
}

/// A datapath event, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorEvent {
    /// "drop", "trace" or "policy-verdict".
    pub kind: String,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub endpoint: u16,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Drop: reason code and description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<(u8, String)>,
    /// Trace: observation point name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observation_point: Option<String>,
    /// Policy verdict: "allow", "deny" or "audit".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_type: Option<String>,
    pub ingress: bool,
    pub is_reply: bool,
    pub length: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet: Option<Packet>,
}

impl MonitorEvent {
    /// Decodes an event. `boot_to_unix_ns` converts the event's boot-time
    /// clock into wall-clock time.
    /// `capture` is the packet bytes recorded after the event (drops), from
    /// which the headers are decoded; otherwise the event's own tuple is used.
    pub fn from_event(ev: &Event, capture: &[u8], boot_to_unix_ns: u64) -> Option<MonitorEvent> {
        let kind = EventType::from_code(ev.r#type)?;
        let flag = |f: EventFlag| ev.flags & f as u8 != 0;
        let mut m = MonitorEvent {
            kind: match kind {
                EventType::Drop => "drop",
                EventType::Trace => "trace",
                EventType::PolicyVerdict => "policy-verdict",
            }
            .to_string(),
            time_ns: ev.ktime_ns.saturating_add(boot_to_unix_ns),
            endpoint: ev.source_ep,
            ifindex: ev.ifindex,
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            drop_reason: None,
            observation_point: None,
            action: None,
            match_type: None,
            ingress: flag(EventFlag::Ingress),
            is_reply: flag(EventFlag::Reply),
            length: ev.len_orig,
            packet: decode_packet(capture).or_else(|| packet_of(ev)),
        };
        match kind {
            EventType::Drop => {
                let desc = DropReason::from_code(ev.subtype).map(|r| r.description().to_string()).unwrap_or_else(|| format!("reason {}", ev.subtype));
                m.drop_reason = Some((ev.subtype, desc));
            }
            EventType::Trace => {
                m.observation_point = Some(TracePoint::from_code(ev.subtype).map(|p| p.name().to_string()).unwrap_or_else(|| format!("point {}", ev.subtype)));
            }
            EventType::PolicyVerdict => {
                m.action = Some(if flag(EventFlag::Audit) { "audit" } else if ev.verdict > 0 { "allow" } else { "deny" }.to_string());
                m.match_type = PolicyMatch::from_code(ev.match_type).map(|p| p.name().to_string());
                if ev.verdict < 0 {
                    let code = (-ev.verdict) as u8;
                    m.drop_reason = DropReason::from_code(code).map(|r| (code, r.description().to_string()));
                }
            }
        }
        Some(m)
    }

    /// One line in the style of `cilium monitor`.
    pub fn summary(&self) -> String {
        let pkt = self.packet.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "(undecoded)".into());
        match self.kind.as_str() {
            "drop" => {
                let (code, desc) = self.drop_reason.clone().unwrap_or((0, "unknown".into()));
                format!(
                    "xx drop ({desc}, {code}) flow {} endpoint {}, ifindex {}, identity {}->{}: {pkt}",
                    if self.ingress { "to" } else { "from" },
                    self.endpoint,
                    self.ifindex,
                    self.src_identity,
                    self.dst_identity
                )
            }
            "trace" => format!(
                "-> {} endpoint {}, ifindex {}, identity {}->{}{}: {pkt}",
                self.observation_point.as_deref().unwrap_or("?"),
                self.endpoint,
                self.ifindex,
                self.src_identity,
                self.dst_identity,
                if self.is_reply { " (reply)" } else { "" }
            ),
            _ => format!(
                "Policy verdict log: flow local EP ID {}, remote ID {}, {}, action {}, match {}, {pkt}",
                self.endpoint,
                if self.ingress { self.src_identity } else { self.dst_identity },
                if self.ingress { "ingress" } else { "egress" },
                self.action.as_deref().unwrap_or("?"),
                self.match_type.as_deref().unwrap_or("none"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 1, 2, 10, 0, 1, 3]);
        f.extend_from_slice(l4);
        f
    }

    #[test]
    fn decodes_tcp() {
        let mut tcp = vec![0x1f, 0x90, 0x00, 0x50];
        tcp.extend_from_slice(&[0; 9]);
        tcp.push(0x12);
        let p = decode_packet(&frame(6, &tcp)).unwrap();
        assert_eq!(p.to_string(), "10.0.1.2:8080 -> 10.0.1.3:80 tcp SYN, ACK");
    }

    #[test]
    fn decodes_udp_and_icmp() {
        let p = decode_packet(&frame(17, &[0, 53, 0x30, 0x39])).unwrap();
        assert_eq!(p.l4, L4::Udp { src_port: 53, dst_port: 12345 });
        let p = decode_packet(&frame(1, &[8, 0])).unwrap();
        assert!(p.to_string().contains("EchoRequest"));
    }

    #[test]
    fn decodes_ipv6() {
        let seed = |name: &str| std::fs::read(format!("{}/../../fuzz/seeds/packet_decode/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let p = decode_packet(&seed("ipv6_tcp_syn")).unwrap();
        assert_eq!(p.to_string(), "[fd00:10:1::2]:40000 -> [2001:db8::1]:80 tcp SYN");
        let p = decode_packet(&seed("ipv6_icmp_echo")).unwrap();
        assert_eq!(p.to_string(), "fd00:10:1::2 -> 2001:db8::1 icmpv6 EchoRequest");
        let f = seed("ipv6_tcp_syn");
        for n in 0..f.len() {
            let _ = decode_packet(&f[..n]);
        }
        assert!(decode_packet(&f[..14 + 40 + 10]).is_none(), "a truncated TCP header");
    }

    #[test]
    fn truncated_input_is_none_never_panics() {
        let f = frame(6, &[0x1f, 0x90, 0x00, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02]);
        for n in 0..f.len() {
            let _ = decode_packet(&f[..n]);
        }
        assert!(decode_packet(&f[..20]).is_none());
        assert!(decode_packet(&[]).is_none());
    }
}
