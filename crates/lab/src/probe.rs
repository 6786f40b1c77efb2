//! `cilium lab probe`: one connection attempt from inside a namespace, with
//! a verdict a script can read.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub reachable: bool,
    pub detail: String,
    pub latency_ms: f64,
}

/// Connects from the namespace at `netns` to `ip:port`. TCP: connect, send
/// an HTTP request, read the first answer line. UDP: send a datagram, wait
/// for the echo.
pub fn probe(netns: PathBuf, ip: Ipv4Addr, port: u16, udp: bool, timeout: Duration) -> (bool, String, f64) {
    let res = std::thread::spawn(move || -> (bool, String, f64) {
        if let Err(e) = cilium_datapath::sys::enter_netns(&netns) {
            return (false, format!("cannot enter namespace: {e}"), 0.0);
        }
        let start = Instant::now();
        let addr = SocketAddr::from((ip, port));
        let (ok, detail) = if udp { udp_probe(addr, timeout) } else { tcp_probe(addr, timeout) };
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
    let s = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => return (false, format!("bind failed: {e}")),
    };
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = s.send_to(b"probe", addr) {
        return (false, format!("send failed: {e}"));
    }
    let mut buf = [0u8; 1500];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => (true, String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            (false, format!("no answer within {:?} (dropped)", timeout))
        }
        Err(e) => (false, format!("receive failed: {e}")),
    }
}
