//! `cilium lab probe`: one connection attempt from inside a namespace, with
//! a verdict a script can read.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
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
            Kind::Icmp => match ip {
                IpAddr::V4(v4) => icmp_probe(v4, timeout),
                IpAddr::V6(v6) => icmp6_probe(v6, timeout),
            },
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

/// An ICMP echo over a raw socket (root), waiting for the matching reply.
fn icmp_probe(ip: Ipv4Addr, timeout: Duration) -> (bool, String) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return (false, format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() as u16) ^ (rand_u16());
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"cilium-lab-probe");
    let c = icmp_checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and sockaddr of the stated lengths.
    let sent = unsafe {
        libc::sendto(sock.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0, (&addr as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as u32)
    };
    if sent < 0 {
        return (false, format!("send failed: {}", std::io::Error::last_os_error()));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (false, format!("no echo reply within {timeout:?} (dropped)"));
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as i64, tv_usec: left.subsec_micros() as i64 };
        // SAFETY: setting a timeval socket option with its exact size.
        unsafe {
            libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as u32);
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            continue;
        }
        let b = &buf[..n as usize];
        let ihl = ((b.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
        if b.len() < ihl + 8 || b[12..16] != ip.octets() {
            continue;
        }
        let icmp = &b[ihl..];
        if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
            return (true, "echo reply".into());
        }
    }
}

/// An ICMPv6 echo over a raw socket (root; the kernel fills in the
/// checksum), waiting for the matching reply.
fn icmp6_probe(ip: Ipv6Addr, timeout: Duration) -> (bool, String) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMPV6) };
    if fd < 0 {
        return (false, format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() as u16) ^ (rand_u16());
    let mut pkt = vec![128u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"cilium-lab-probe");
    // SAFETY: an all-zero sockaddr_in6 is valid; the fields are set below.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as u16;
    addr.sin6_addr = libc::in6_addr { s6_addr: ip.octets() };
    // SAFETY: valid buffer and sockaddr of the stated lengths.
    let sent = unsafe {
        libc::sendto(sock.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0, (&addr as *const libc::sockaddr_in6).cast(), size_of::<libc::sockaddr_in6>() as u32)
    };
    if sent < 0 {
        return (false, format!("send failed: {}", std::io::Error::last_os_error()));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (false, format!("no echo reply within {timeout:?} (dropped)"));
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as i64, tv_usec: left.subsec_micros() as i64 };
        // SAFETY: setting a timeval socket option with its exact size.
        unsafe {
            libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as u32);
        }
        // SAFETY: all-zero is a valid sockaddr_in6 to receive into.
        let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_in6>() as u32;
        // SAFETY: buf and from are valid for their lengths.
        let n = unsafe {
            libc::recvfrom(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0, (&mut from as *mut libc::sockaddr_in6).cast(), &mut from_len)
        };
        if n < 8 {
            continue;
        }
        // raw ICMPv6 sockets deliver the message without its IPv6 header
        let b = &buf[..n as usize];
        if from.sin6_addr.s6_addr == ip.octets() && b[0] == 129 && b[4..6] == id.to_be_bytes() {
            return (true, "echo reply".into());
        }
    }
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u16).unwrap_or(0)
}
