//! The L7 proxy inside the agent: its listeners, the policy it asks for
//! each connection (from a snapshot of the daemon, rebuilt when the daemon
//! changed), and its access log turned into Hubble's L7 flows.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use anyhow::Context;
use cilium_datapath::Loaded;
use cilium_hubble::parser::{DnsRecord, HttpRecord, KafkaRecord, L7Meta};
use cilium_proxy::{AccessLog, AccessRecord, ConnInfo, ConnPolicy, L7Proto, PolicyProvider, Proxy};

use crate::daemon::Daemon;
use crate::daemon::proxy::ProxySnapshot;
use crate::hubble::{FlowMaker, HubbleRuntime};

/// Connections' policies remembered per snapshot.
const CACHE: usize = 16_384;

struct Cached {
    seen: u64,
    snapshot: Arc<ProxySnapshot>,
    policies: HashMap<(SocketAddrV4, std::net::Ipv4Addr, bool), Arc<ConnPolicy>>,
}

/// Answers the proxy from the daemon's current state.
pub struct Provider {
    daemon: Arc<Mutex<Daemon<Loaded>>>,
    changes: Arc<AtomicU64>,
    cached: Mutex<Cached>,
    /// (name, address) -> when what was last taught expires (by the
    /// answer's TTL), to skip the daemon for answers it already knows.
    learned: Mutex<HashMap<(String, std::net::IpAddr), u64>>,
}

impl Provider {
    pub fn new(daemon: Arc<Mutex<Daemon<Loaded>>>, changes: Arc<AtomicU64>) -> Provider {
        Provider { daemon, changes, cached: Mutex::new(Cached { seen: 0, snapshot: Arc::new(ProxySnapshot::default()), policies: HashMap::new() }), learned: Mutex::new(HashMap::new()) }
    }
}

impl PolicyProvider for Provider {
    fn policy(&self, c: &ConnInfo) -> Arc<ConnPolicy> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.changes.load(Ordering::Relaxed);
        if now != cached.seen {
            // a stale snapshot could allow what the new policy denies: wait
            // for the daemon rather than decide with old rules
            let snapshot = self.daemon.lock().unwrap_or_else(|p| p.into_inner()).proxy_snapshot();
            *cached = Cached { seen: now, snapshot: Arc::new(snapshot), policies: HashMap::new() };
        }
        // what applies depends on the two addresses, the port and the side
        let port_key = (SocketAddrV4::new(*c.client.ip(), c.server.port()), *c.server.ip(), c.ingress);
        if let Some(p) = cached.policies.get(&port_key) {
            return p.clone();
        }
        let p = Arc::new(cached.snapshot.conn_policy(c));
        if cached.policies.len() >= CACHE {
            cached.policies.clear();
        }
        cached.policies.insert(port_key, p.clone());
        p
    }

    fn learn(&self, client: SocketAddrV4, learned: cilium_proxy::Learned) {
        let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        {
            // already known, and not expiring soon: nothing to tell the daemon
            let mut known = self.learned.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = learned.iter().all(|(n, ips, ttl)| ips.iter().all(|ip| known.get(&(n.clone(), *ip)).is_some_and(|exp| *exp > now + u64::from(*ttl) / 2 + 1)));
            if fresh {
                return;
            }
            if known.len() > CACHE {
                known.clear();
            }
            for (n, ips, ttl) in &learned {
                for ip in ips {
                    known.insert((n.clone(), *ip), now + u64::from(*ttl));
                }
            }
        }
        let mut d = self.daemon.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = d.fqdn_learn(learned, now) {
            tracing::warn!(%client, error = %e, "applying what a DNS answer taught");
        }
    }
}

/// Sends the proxy's requests and responses to Hubble as L7 flows.
pub struct HubbleLog {
    pub hubble: Arc<HubbleRuntime>,
    pub maker: Arc<FlowMaker>,
    pub daemon: Arc<Mutex<Daemon<Loaded>>>,
}

/// Who and when, for Hubble.
#[allow(clippy::too_many_arguments)]
fn meta(time: std::time::SystemTime, c: &ConnInfo, src: u32, dst: u32, ingress: bool, response: bool, denied: bool, latency: std::time::Duration) -> L7Meta {
    L7Meta {
        time_ns: time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0),
        client: c.client,
        server: c.server,
        client_identity: src,
        server_identity: dst,
        ingress,
        response,
        denied,
        latency_ns: latency.as_nanos() as u64,
    }
}

impl AccessLog for HubbleLog {
    fn log(&self, r: AccessRecord) {
        self.maker.refresh(&self.daemon);
        let rec = HttpRecord {
            meta: meta(r.time, &r.conn, r.src_identity, r.dst_identity, r.conn.ingress, r.response, r.denied, r.latency),
            method: r.method,
            url: r.url,
            protocol: r.protocol,
            code: u32::from(r.code),
            headers: r.headers,
        };
        self.hubble.ingest_l7(self.maker.http_flow(rec));
    }

    fn log_dns(&self, r: cilium_proxy::DnsRecord) {
        self.maker.refresh(&self.daemon);
        let rec = DnsRecord {
            meta: meta(r.time, &r.conn, r.src_identity, r.dst_identity, false, r.response, r.denied, r.latency),
            query: r.query,
            qtypes: r.qtypes,
            rcode: r.rcode,
            ips: r.ips.iter().map(|i| i.to_string()).collect(),
            ttl: r.ttl,
            cnames: r.cnames,
        };
        self.hubble.ingest_l7(self.maker.dns_flow(rec));
    }

    fn log_kafka(&self, r: cilium_proxy::KafkaRecord) {
        self.maker.refresh(&self.daemon);
        let rec = KafkaRecord {
            meta: meta(r.time, &r.conn, r.src_identity, r.dst_identity, r.conn.ingress, false, r.denied, std::time::Duration::ZERO),
            api_key: cilium_policy::kafka::api_key_name(r.api_key),
            api_version: i32::from(r.api_version),
            correlation_id: r.correlation_id,
            topic: r.topic,
            error_code: i32::from(r.error_code),
        };
        self.hubble.ingest_l7(self.maker.kafka_flow(rec));
    }
}

/// Drops the records when Hubble is off.
pub struct NoLog;

impl AccessLog for NoLog {
    fn log(&self, _: AccessRecord) {}
}

/// The running proxy: what to hand to the next agent when stopping.
pub struct L7Handle {
    drain: Arc<cilium_proxy::handoff::Drain>,
    tcp: Vec<tokio::task::JoinHandle<(u16, tokio::net::TcpListener)>>,
    udp: Vec<tokio::task::JoinHandle<(u16, tokio::net::UdpSocket)>>,
}

impl L7Handle {
    /// Stops accepting, lets connections reach their next idle point, and
    /// hands listeners and idle connections to a holder for the next agent.
    pub async fn hand_over(self, socket: &std::path::Path) -> anyhow::Result<()> {
        self.drain.begin();
        let mut h = crate::handoff::Handover::default();
        for j in self.tcp {
            let (port, l) = j.await?;
            h.tcp.push((port, l.into_std()?));
        }
        for j in self.udp {
            let (port, u) = j.await?;
            h.udp.push((port, u.into_std()?));
        }
        h.conns = self.drain.parked(std::time::Duration::from_secs(3)).await;
        crate::handoff::hand_over(h, socket)
    }
}

fn tcp_listener(inherited: &mut crate::handoff::Inherited, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    match inherited.tcp.remove(&port) {
        Some(l) => {
            l.set_nonblocking(true)?;
            Ok(tokio::net::TcpListener::from_std(l)?)
        }
        None => Proxy::listen(port).with_context(|| format!("binding the L7 proxy to TCP port {port} (see --enable-l7-proxy)")),
    }
}

/// Binds (or takes over from the previous agent) the proxy's listeners —
/// HTTP and Kafka ingress and egress, DNS over UDP and TCP — resumes the connections
/// the previous agent parked, and serves them all.
///
/// The proxy runs on a thread of its own with a single-threaded runtime, out
/// of the agent's two-worker runtime, where a woken task may also wake the
/// other worker to look for work (in the L7 benchmark's one-CPU round trip,
/// HTTP through the proxy measured 0.336× L4 before this and the single
/// conntrack entry for local pairs, 0.36–0.37× after; the two were not
/// measured apart).
pub fn start(provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>, mut inherited: crate::handoff::Inherited) -> anyhow::Result<L7Handle> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the L7 proxy's runtime")?;
    // listeners register with, and tasks spawn on, the proxy's runtime
    let _in_proxy = rt.handle().enter();
    std::thread::Builder::new()
        .name("l7-proxy".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .context("starting the L7 proxy's thread")?;
    let drain = Proxy::drain();
    let mut tcp = Vec::new();
    for (port, proto, ingress) in [
        (cilium_abi::PROXY_PORT_HTTP_INGRESS, L7Proto::Http, true),
        (cilium_abi::PROXY_PORT_HTTP_EGRESS, L7Proto::Http, false),
        (cilium_abi::PROXY_PORT_KAFKA_INGRESS, L7Proto::Kafka, true),
        (cilium_abi::PROXY_PORT_KAFKA_EGRESS, L7Proto::Kafka, false),
    ] {
        let l = tcp_listener(&mut inherited, port)?;
        let (p, lg, d) = (provider.clone(), log.clone(), drain.clone());
        tcp.push(tokio::spawn(async move { (port, Proxy::serve(l, proto, ingress, p, lg, d).await) }));
    }
    let port = cilium_abi::PROXY_PORT_DNS;
    let dns = match inherited.udp.remove(&port) {
        Some(u) => {
            u.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(u)?
        }
        None => cilium_proxy::dns_server::listen(port).with_context(|| format!("binding the DNS proxy to UDP port {port} (see --enable-l7-proxy)"))?,
    };
    let (p, lg, d) = (provider.clone(), log.clone(), drain.clone());
    let udp = vec![tokio::spawn(async move { (port, cilium_proxy::dns_server::serve(dns, p, lg, d).await) })];
    let dns_tcp = tcp_listener(&mut inherited, port)?;
    let (p, lg, d) = (provider.clone(), log.clone(), drain.clone());
    tcp.push(tokio::spawn(async move { (port, cilium_proxy::dns_server::serve_tcp(dns_tcp, p, lg, d).await) }));
    for c in std::mem::take(&mut inherited.conns) {
        if let Err(e) = Proxy::resume(c, provider.clone(), log.clone(), drain.clone()) {
            tracing::warn!(error = %e, "resuming a handed-over connection");
        }
    }
    Ok(L7Handle { drain, tcp, udp })
}
