//! Node health, as upstream's cilium-health: every agent answers HTTP on
//! the health port (4240) of its node, and probes every node it knows —
//! itself included — with an ICMP echo to the node's address (its network
//! stack) and an HTTP request to that port (its agent), recording
//! reachability and round-trip times for `cilium status` ("Cluster
//! health: N/N reachable") and `cilium-health status`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cilium_api::{ClusterHealth, NodeHealth, ProbeResult};
use cilium_datapath::Loaded;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{error, info};

use crate::daemon::Daemon;

/// Upstream's health port.
pub const HEALTH_PORT: u16 = 4240;
const TIMEOUT: Duration = Duration::from_secs(1);

/// The last round of probes.
#[derive(Debug, Default)]
pub struct Health {
    last: Mutex<Vec<NodeHealth>>,
    /// A round was asked for (`cilium-health status --probe`).
    requested: std::sync::atomic::AtomicBool,
    /// Rounds completed.
    rounds: AtomicU64,
}

impl Health {
    pub fn nodes(&self) -> Vec<NodeHealth> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the prober for a round now and waits for it (at most
    /// `timeout`); returns its results.
    pub async fn probe_now(&self, timeout: Duration) -> Vec<NodeHealth> {
        let before = self.rounds.load(Ordering::Acquire);
        self.requested.store(true, Ordering::Release);
        let until = Instant::now() + timeout;
        while self.rounds.load(Ordering::Acquire) == before && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.nodes()
    }

    pub fn summary(&self) -> ClusterHealth {
        let last = self.nodes();
        ClusterHealth { reachable: last.iter().filter(|n| n.reachable()).count(), total: last.len(), probed_at: last.iter().map(|n| n.probed_at).max().unwrap_or(0) }
    }
}

/// Answers health probes on `port` of every address of the node.
pub async fn serve(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding the health port {addr} (see --enable-health-checking): {e}"))?;
    info!(%addr, "health endpoint listening");
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "cilium-health" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "health endpoint");
        }
    });
    Ok(())
}

/// Probes the nodes every `interval`, and at once when the daemon changed
/// (`changes`, its change counter) and with it the set of nodes.
pub async fn probe_loop(daemon: Arc<Mutex<Daemon<Loaded>>>, changes: Arc<AtomicU64>, health: Arc<Health>, interval: Duration) {
    let mut next = Instant::now();
    let mut known = Vec::new();
    let mut seen = u64::MAX;
    loop {
        let now = changes.load(Ordering::Relaxed);
        let asked = health.requested.swap(false, Ordering::AcqRel);
        if now != seen || asked || Instant::now() >= next {
            seen = now;
            // the daemon may be busy (a kvstore call): wait off the workers
            let d = daemon.clone();
            let Ok(nodes) = tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).nodes().into_iter().map(|n| (n.name, n.ip, n.local)).collect::<Vec<_>>()).await else { continue };
            if asked || Instant::now() >= next || nodes != known {
                let results = futures::future::join_all(nodes.iter().map(|(name, ip, local)| probe_node(name.clone(), *ip, *local))).await;
                *health.last.lock().unwrap_or_else(|p| p.into_inner()) = results;
                health.rounds.fetch_add(1, Ordering::AcqRel);
                known = nodes;
                next = Instant::now() + interval;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn probe_node(name: String, ip: Ipv4Addr, local: bool) -> NodeHealth {
    let icmp = tokio::task::spawn_blocking(move || icmp_echo(ip, TIMEOUT)).await.unwrap_or_else(|e| failed(e.to_string()));
    let http = http_hello(ip, TIMEOUT).await;
    let probed_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    NodeHealth { name, ip, local, icmp, http, probed_at }
}

fn failed(error: impl Into<String>) -> ProbeResult {
    ProbeResult { ok: false, rtt_us: 0, error: error.into() }
}

fn ok(started: Instant) -> ProbeResult {
    ProbeResult { ok: true, rtt_us: started.elapsed().as_micros() as u64, error: String::new() }
}

/// GET /hello on the node's health port.
async fn http_hello(ip: Ipv4Addr, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(SocketAddrV4::new(ip, HEALTH_PORT)).await?;
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: cilium-health\r\nConnection: close\r\n\r\n").await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(head)) if head.starts_with(b"HTTP/1.1 200") => ok(started),
        Ok(Ok(head)) => failed(format!("unexpected answer {:?}", String::from_utf8_lossy(&head))),
        Ok(Err(e)) => failed(e.to_string()),
        Err(_) => failed("timed out"),
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo to `ip` over a raw socket, waiting at most `timeout`.
fn icmp_echo(ip: Ipv4Addr, timeout: Duration) -> ProbeResult {
    use socket2::{Domain, Protocol, Socket, Type};
    let started = Instant::now();
    let sock = match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) {
        Ok(s) => s,
        Err(e) => return failed(format!("raw ICMP socket: {e}")),
    };
    let id = (std::process::id() as u16) ^ (u32::from(ip) as u16);
    let seq = (started.elapsed().as_nanos() as u16) | 1;
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"cilium-health");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    if let Err(e) = sock.send_to(&pkt, &SocketAddrV4::new(ip, 0).into()) {
        return failed(e.to_string());
    }
    let deadline = started + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return failed("timed out");
        }
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return failed("timed out"),
            Err(e) => return failed(e.to_string()),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let b: Vec<u8> = buf[..n].iter().map(|x| unsafe { x.assume_init() }).collect();
        let Some(ihl) = b.first().map(|v| usize::from(v & 0x0f) * 4) else { continue };
        let from_ip = from.as_socket_ipv4().map(|a| *a.ip());
        let icmp = b.get(ihl..).unwrap_or(&[]);
        if from_ip == Some(ip) && icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
            return ok(started);
        }
    }
}
