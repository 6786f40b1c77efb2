//! `cilium lab probe`: one connection attempt from inside a namespace, with
//! a verdict a script can read.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub reachable: bool,
    pub detail: String,
    pub latency_ms: f64,
}

/// What a probe sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
    /// ICMP echo request (the port is ignored).
    Icmp,
}

/// Connects from the namespace at `netns` to `ip:port`. TCP: connect, send
/// an HTTP request, read the first answer line. UDP: send a datagram, wait
/// for the echo.
pub fn probe(netns: PathBuf, ip: IpAddr, port: u16, udp: bool, timeout: Duration) -> (bool, String, f64) {
    probe_kind(netns, ip, port, if udp { Kind::Udp } else { Kind::Tcp }, timeout)
}

/// [`probe`] for any [`Kind`].
pub fn probe_kind(netns: PathBuf, ip: IpAddr, port: u16, kind: Kind, timeout: Duration) -> (bool, String, f64) {
    let res = std::thread::spawn(move || -> (bool, String, f64) {
        if let Err(e) = cilium_datapath::sys::enter_netns(&netns) {
            return (false, format!("cannot enter namespace: {e}"), 0.0);
        }
        let start = Instant::now();
        let addr = SocketAddr::from((ip, port));
        let (ok, detail) = match kind {
            Kind::Udp => udp_probe(addr, timeout),
            Kind::Tcp => tcp_probe(addr, timeout),
            Kind::Icmp => icmp_probe(ip, timeout),
        };
        (ok, detail, start.elapsed().as_secs_f64() * 1000.0)
    })
    .join();
    res.unwrap_or((false, "probe thread panicked".into(), 0.0))
}

fn tcp_probe(addr: SocketAddr, timeout: Duration) -> (bool, String) {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
            return (false, format!("connect timed out after {:?} (dropped)", timeout));
        }
        Err(e) => return (false, format!("connect failed: {e}")),
    };
    // what the application sees as its peer: the address it asked for, also
    // when the socket load balancer connected it to a service's backend
    match s.peer_addr() {
        Ok(peer) if peer != addr => return (false, format!("connected, but the socket's peer is {peer}, not {addr}")),
        Ok(_) => {}
        Err(e) => return (false, format!("getpeername failed: {e}")),
    }
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!("GET /probe HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        return (false, format!("send failed: {e}"));
    }
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) | Err(_) if !buf.is_empty() => {
            let text = String::from_utf8_lossy(&buf);
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
            let status = text.lines().next().unwrap_or("").to_string();
            (true, if body.is_empty() { status } else { format!("{status}: {body}") })
        }
        Ok(_) => (false, "connected, but the connection closed without an answer".into()),
        Err(e) => (false, format!("connected, no answer: {e}")),
    }
}

fn udp_probe(addr: SocketAddr, timeout: Duration) -> (bool, String) {
    let s = match UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }) {
        Ok(s) => s,
        Err(e) => return (false, format!("bind failed: {e}")),
    };
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = s.send_to(b"probe", addr) {
        return (false, format!("send failed: {e}"));
    }
    let mut buf = [0u8; 1500];
    match s.recv_from(&mut buf) {
        // a reply from another address than asked (an untranslated service
        // backend) is what real resolvers reject
        Ok((_, from)) if from != addr => (false, format!("answer from {from}, not {addr}")),
        Ok((n, _)) => (true, String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            (false, format!("no answer within {:?} (dropped)", timeout))
        }
        Err(e) => (false, format!("receive failed: {e}")),
    }
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP (or ICMPv6) echo over a raw socket (root), waiting for the
/// matching reply.
fn icmp_probe(ip: IpAddr, timeout: Duration) -> (bool, String) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let (domain, proto, request, reply) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let sock = match Socket::new(domain, Type::RAW, Some(proto)) {
        Ok(s) => s,
        Err(e) => return (false, format!("raw socket: {e}")),
    };
    let id = (std::process::id() as u16) ^ (rand_u16());
    let mut pkt = vec![request, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"cilium-lab-probe");
    if ip.is_ipv4() {
        // ICMPv6's checksum covers a pseudo-header: the kernel fills it in
        let c = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    // connected: the socket only hears from `ip`
    if let Err(e) = sock.connect(&SockAddr::from(SocketAddr::new(ip, 0))).and_then(|()| sock.send(&pkt)) {
        return (false, format!("send failed: {e}"));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (false, format!("no echo reply within {timeout:?} (dropped)"));
        }
        // a zero timeout would mean none at all
        let _ = sock.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => continue,
            // the connected socket hears of ICMP errors (unreachable, ...)
            Err(e) => return (false, format!("receive failed: {e}")),
        };
        let b = &buf[..n];
        // raw IPv4 sockets deliver the IP header too, IPv6 ones do not
        // (and what arrived before connect() was not filtered: the
        // IPv4 header's source is checked again)
        let icmp = match ip {
            IpAddr::V4(v4) if b.len() >= 20 && b[12..16] == v4.octets() => b.get(((b[0] & 0x0f) as usize) * 4..).unwrap_or(&[]),
            IpAddr::V4(_) => continue,
            IpAddr::V6(_) => b,
        };
        if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
            return (true, "echo reply".into());
        }
    }
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u16).unwrap_or(0)
}
