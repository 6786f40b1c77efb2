//! The proxy's listeners and connections.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::http::{Chunked, Framing, HttpError, Request, Response, access_denied, error_response};
use crate::handoff::{Drain, L7Proto, Parked};
use crate::rules::Check;

/// One proxied connection, as the datapath handed it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnInfo {
    pub client: SocketAddrV4,
    /// The original destination.
    pub server: SocketAddrV4,
    /// Redirected by the server's ingress policy (else the client's egress).
    pub ingress: bool,
    /// A UDP flow (DNS) rather than a TCP connection.
    pub udp: bool,
}

/// Addresses a DNS answer taught: (name, addresses, TTL in seconds).
pub type Learned = Vec<(String, Vec<std::net::IpAddr>, u32)>;

/// A DNS query or response, for Hubble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    pub time: SystemTime,
    pub conn: ConnInfo,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub response: bool,
    /// Refused by policy.
    pub denied: bool,
    pub query: String,
    pub qtypes: Vec<String>,
    pub rcode: u32,
    pub ips: Vec<std::net::IpAddr>,
    pub ttl: u32,
    pub cnames: Vec<String>,
    pub latency: Duration,
}

/// What applies to a connection: both ends' identities and the checks of
/// each side whose policy is L7.
#[derive(Debug, Clone)]
pub struct ConnPolicy {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub checks: Vec<Check>,
}

/// The agent's answer to "what applies to this connection".
pub trait PolicyProvider: Send + Sync + 'static {
    fn policy(&self, c: &ConnInfo) -> Arc<ConnPolicy>;
    /// Addresses an allowed DNS answer taught; returns once policy that
    /// names them (toFQDNs) is in force, before the answer reaches the client.
    fn learn(&self, _client: SocketAddrV4, _learned: Learned) {}
}

/// A request or a response, for Hubble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub time: SystemTime,
    pub conn: ConnInfo,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub response: bool,
    pub denied: bool,
    pub method: String,
    /// `http://host/target`.
    pub url: String,
    /// "HTTP/1.1".
    pub protocol: String,
    /// Responses: the status.
    pub code: u16,
    /// Responses: from the request's arrival to the response head.
    pub latency: Duration,
    pub headers: Vec<(String, String)>,
}

/// Where requests and responses are reported.
pub trait AccessLog: Send + Sync + 'static {
    fn log(&self, r: AccessRecord);
    fn log_dns(&self, _r: DnsRecord) {}
    fn log_kafka(&self, _r: crate::kafka_server::KafkaRecord) {}
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("connection closed in the middle of a message")]
    Truncated,
}

/// How long to wait for the original destination to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_CHUNK: usize = 4096;

/// The proxy: one transparent listener per port.
pub struct Proxy;

impl Proxy {
    /// Binds a transparent listener on `port` (all addresses of the node's
    /// namespace) and serves it until the process ends.
    pub fn listen(port: u16) -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        // accept connections addressed to anyone (the datapath assigned them)
        s.set_ip_transparent_v4(true)?;
        // our replies to clients carry the proxy mark: the datapath lets a
        // local endpoint's address through as their source
        s.set_mark(cilium_abi::MARK_MAGIC_PROXY)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        TcpListener::from_std(s.into())
    }

    /// A fresh stop signal for the listeners and connections of one agent.
    pub fn drain() -> Arc<Drain> {
        Arc::new(Drain::default())
    }

    /// Serves a connection a previous agent parked (between requests).
    pub fn resume(p: Parked, provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>, drain: Arc<Drain>) -> std::io::Result<()> {
        p.client.set_nonblocking(true)?;
        let client = TcpStream::from_std(p.client)?;
        let upstream = match p.upstream {
            Some(u) => {
                u.set_nonblocking(true)?;
                Some(TcpStream::from_std(u)?)
            }
            None => None,
        };
        let info = p.info;
        tokio::spawn(async move {
            let r = match p.proto {
                L7Proto::Http => serve_conn(client, upstream, info, &*provider, &*log, &drain).await.map_err(|e| e.to_string()),
                L7Proto::Kafka => crate::kafka_server::serve(client, upstream, info, provider, log, drain).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = r {
                debug!(client = %info.client, server = %info.server, error = %e, "resumed connection ended");
            }
        });
        Ok(())
    }

    /// Accepts and serves connections speaking `proto` until `drain`
    /// begins; returns the listener then (for the next agent).
    pub async fn serve(listener: TcpListener, proto: L7Proto, ingress: bool, provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>, drain: Arc<Drain>) -> TcpListener {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.stopped() => return listener,
            };
            let (conn, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "proxy accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (Ok(SocketAddr::V4(server)), SocketAddr::V4(client)) = (conn.local_addr(), peer) else { continue };
            let info = ConnInfo { client, server, ingress, udp: false };
            let (provider, log, drain) = (provider.clone(), log.clone(), drain.clone());
            if proto == L7Proto::Kafka {
                tokio::spawn(async move {
                    if let Err(e) = crate::kafka_server::serve(conn, None, info, provider, log, drain).await {
                        debug!(client = %info.client, server = %info.server, error = %e, "Kafka connection ended");
                    }
                });
                continue;
            }
            tokio::spawn(async move {
                // HTTP/2 with prior knowledge (gRPC) starts with its preface
                let mut head = vec![0u8; crate::h2c::PREFACE.len()];
                let n = match peek_full(&conn, &mut head).await {
                    Ok(n) => n,
                    Err(_) => return,
                };
                if n == head.len() && head == crate::h2c::PREFACE {
                    let _ = conn.set_nodelay(true);
                    // boxed: HTTP/2's larger state is paid only by HTTP/2 connections
                    if let Err(e) = Box::pin(crate::h2c::serve(crate::h2c::Prefixed { head: Vec::new(), stream: conn }, info, provider, log)).await {
                        debug!(client = %info.client, error = %e, "h2c connection ended");
                    }
                    return;
                }
                drop(head);
                if let Err(e) = Box::pin(serve_conn(conn, None, info, &*provider, &*log, &drain)).await {
                    debug!(client = %info.client, server = %info.server, error = %e, "proxied connection ended");
                }
            });
        }
    }
}

/// Peeks at the first bytes of a connection (as many as `buf` holds, or
/// fewer if the client sent fewer and stopped, e.g. an HTTP/1 request
/// shorter than the preface).
async fn peek_full(conn: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let n = conn.peek(buf).await?;
        if n == 0 || n >= buf.len() || !crate::h2c::PREFACE.starts_with(&buf[..n]) || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Bytes read ahead on one side of the proxy.
struct Side {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Side {
    /// Reads a message head, left at the start of the buffer (its length
    /// returned with it); `None` at a clean end of stream.
    async fn head<T>(&mut self, parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HttpError>) -> Result<Option<(T, usize)>, ConnError> {
        loop {
            if !self.buf.is_empty() {
                if let Some(h) = parse(&self.buf)? {
                    return Ok(Some(h));
                }
            }
            let n = self.read_more().await?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(ConnError::Truncated) };
            }
        }
    }

    /// Moves one body from this side to `to` (or discards it), streaming.
    async fn body(&mut self, framing: Framing, mut to: Option<&mut TcpStream>) -> Result<(), ConnError> {
        match framing {
            Framing::None => Ok(()),
            Framing::Length(mut left) => {
                loop {
                    let take = (left.min(self.buf.len() as u64)) as usize;
                    if take > 0 {
                        if let Some(t) = to.as_deref_mut() {
                            t.write_all(&self.buf[..take]).await?;
                        }
                        self.buf.drain(..take);
                        left -= take as u64;
                    }
                    if left == 0 {
                        return Ok(());
                    }
                    self.fill().await?;
                }
            }
            Framing::Chunked => {
                let mut c = Chunked::default();
                loop {
                    let take = c.feed(&self.buf)?;
                    if take > 0 {
                        if let Some(t) = to.as_deref_mut() {
                            t.write_all(&self.buf[..take]).await?;
                        }
                        self.buf.drain(..take);
                    }
                    if c.done() {
                        return Ok(());
                    }
                    self.fill().await?;
                }
            }
            Framing::Close => {
                loop {
                    if let Some(t) = to.as_deref_mut() {
                        t.write_all(&self.buf).await?;
                    }
                    self.buf.clear();
                    if self.read_more().await? == 0 {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn fill(&mut self) -> Result<(), ConnError> {
        if self.read_more().await? == 0 {
            return Err(ConnError::Truncated);
        }
        Ok(())
    }

    /// Reads what is available into the buffer's spare room (no copy
    /// through the stack, so an idle connection's task stays small).
    async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.s.read_buf(&mut self.buf).await
    }

    /// Gives the buffer back when nothing is pending (idle connections
    /// then hold no buffer memory).
    fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
        }
    }
}

/// Connects to the original destination, marked with the client's identity
/// so the datapath applies the destination's ingress policy to it as to the
/// client (and knows the proxy already applied the L7 rules).
pub(crate) async fn connect_upstream(server: SocketAddrV4, src_identity: u32) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    let id = if src_identity < 1 << 16 { src_identity } else { cilium_abi::ReservedIdentity::World as u32 };
    s.set_mark(cilium_abi::MARK_MAGIC_PROXY | (id << 16))?;
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    let std_stream: std::net::TcpStream = s.into();
    let sock = tokio::net::TcpSocket::from_std_stream(std_stream);
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(SocketAddr::V4(server))).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

fn version(v: u8) -> String {
    format!("HTTP/1.{v}")
}

async fn serve_conn(conn: TcpStream, upstream: Option<TcpStream>, info: ConnInfo, provider: &dyn PolicyProvider, log: &dyn AccessLog, drain: &Drain) -> Result<(), ConnError> {
    let _active = drain.enter();
    let _ = conn.set_nodelay(true);
    let mut client = Side { s: conn, buf: Vec::new() };
    let mut upstream: Option<Side> = upstream.map(|s| Side { s, buf: Vec::new() });
    loop {
        // between requests: a stopping agent parks the connection here
        if client.buf.is_empty() && upstream.as_ref().is_none_or(|u| u.buf.is_empty()) {
            let idle = tokio::select! {
                biased;
                _ = drain.stopped() => true,
                r = client.s.readable() => { r?; false }
            };
            if idle && client.buf.is_empty() {
                let up = match upstream.take() {
                    Some(u) => Some(u.s.into_std()?),
                    None => None,
                };
                drain.park(Parked { info, proto: L7Proto::Http, client: client.s.into_std()?, upstream: up });
                return Ok(());
            }
        }
        let (mut req, head_len) = match client.head(Request::parse).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(ConnError::Http(e)) => {
                let code = if matches!(e, HttpError::TooLarge) { (431, "Request Header Fields Too Large") } else { (400, "Bad Request") };
                let _ = client.s.write_all(&error_response(code.0, code.1)).await;
                return Err(e.into());
            }
            Err(e) => return Err(e),
        };
        let started = Instant::now();
        // asked per request: a policy change applies to open connections too
        let policy = provider.policy(&info);
        if policy.checks.iter().any(|c| matches!(c, Check::Denied)) {
            // L3/L4 no longer allows it (a policy change): close
            return Ok(());
        }
        let framing = match req.framing() {
            Ok(f) => f,
            Err(e) => {
                let _ = client.s.write_all(&error_response(400, "Bad Request")).await;
                return Err(e.into());
            }
        };
        let url = format!("http://{}{}", if req.host().is_empty() { info.server.to_string() } else { req.host().to_string() }, req.target);
        let record = |response: bool, denied: bool, code: u16, latency: Duration, req: &Request| AccessRecord {
            time: SystemTime::now(),
            conn: info,
            src_identity: policy.src_identity,
            dst_identity: policy.dst_identity,
            response,
            denied,
            method: req.method.clone(),
            url: url.clone(),
            protocol: version(req.version),
            code,
            latency,
            headers: if response { Vec::new() } else { req.headers.iter().map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned())).collect() },
        };
        let allowed = crate::rules::http_allows(&policy.checks, &mut req);
        let close = req.wants_close();
        if !allowed {
            log.log(record(false, true, 0, Duration::ZERO, &req));
            // read and drop the body, so the connection stays usable
            client.buf.drain(..head_len);
            client.body(framing, None).await?;
            client.s.write_all(&access_denied(close)).await?;
            log.log(record(true, true, 403, started.elapsed(), &req));
            if close {
                return Ok(());
            }
            continue;
        }
        log.log(record(false, false, 0, Duration::ZERO, &req));
        if upstream.is_none() {
            match connect_upstream(info.server, policy.src_identity).await {
                Ok(s) => upstream = Some(Side { s, buf: Vec::new() }),
                Err(e) => {
                    warn!(server = %info.server, error = %e, "proxy cannot reach the destination");
                    client.buf.drain(..head_len);
                    client.body(framing, None).await?;
                    client.s.write_all(&error_response(503, "Service Unavailable")).await?;
                    log.log(record(true, false, 503, started.elapsed(), &req));
                    return Ok(());
                }
            }
        }
        let up = upstream.as_mut().expect("connected above");
        // the head (as it came, unless a header rule changed it) and the
        // body bytes already read go out in one write
        let (framing, take) = match framing {
            Framing::Length(n) => {
                let take = n.min((client.buf.len() - head_len) as u64);
                (Framing::Length(n - take), take as usize)
            }
            f => (f, 0),
        };
        if req.reencode {
            let mut head = req.encode();
            head.extend_from_slice(&client.buf[head_len..head_len + take]);
            up.s.write_all(&head).await?;
        } else {
            up.s.write_all(&client.buf[..head_len + take]).await?;
        }
        client.buf.drain(..head_len + take);
        client.body(framing, Some(&mut up.s)).await?;
        // the response, after any interim (1xx) ones, forwarded as it came
        let (resp, head_len) = loop {
            let Some((resp, n)) = up.head(Response::parse).await? else { return Err(ConnError::Truncated) };
            if (100..200).contains(&resp.code) && resp.code != 101 {
                client.s.write_all(&up.buf[..n]).await?;
                up.buf.drain(..n);
                continue;
            }
            break (resp, n);
        };
        log.log(record(true, false, resp.code, started.elapsed(), &req));
        if resp.code != 101 {
            if let Framing::Length(n) = resp.framing(&req.method)? {
                // the head and the body bytes already read go out in one write
                let take = n.min((up.buf.len() - head_len) as u64);
                client.s.write_all(&up.buf[..head_len + take as usize]).await?;
                up.buf.drain(..head_len + take as usize);
                up.body(Framing::Length(n - take), Some(&mut client.s)).await?;
                if close || resp.wants_close() {
                    return Ok(());
                }
                client.release();
                up.release();
                continue;
            }
        }
        client.s.write_all(&up.buf[..head_len]).await?;
        up.buf.drain(..head_len);
        if resp.code == 101 {
            // protocol switch: from here on, bytes both ways
            client.s.write_all(&up.buf).await?;
            up.s.write_all(&client.buf).await?;
            tokio::io::copy_bidirectional(&mut client.s, &mut up.s).await?;
            return Ok(());
        }
        let rframing = resp.framing(&req.method)?;
        up.body(rframing, Some(&mut client.s)).await?;
        if close || resp.wants_close() || rframing == Framing::Close {
            return Ok(());
        }
        client.release();
        up.release();
    }
}

/// A provider that allows everything and a log that drops everything.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub struct Open;
    impl PolicyProvider for Open {
        fn policy(&self, _: &ConnInfo) -> Arc<ConnPolicy> {
            Arc::new(ConnPolicy { src_identity: 0, dst_identity: 0, checks: vec![] })
        }
    }
    pub struct Quiet;
    impl AccessLog for Quiet {
        fn log(&self, _: AccessRecord) {}
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Open, Quiet};
    use super::*;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (a, l.accept().await.unwrap().0)
    }

    /// Reads until `want` bytes arrived.
    async fn read_n(s: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut got = vec![0u8; want];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await.expect("bytes in time").unwrap();
        got
    }

    /// Heads and bodies reach the other side byte for byte as they were
    /// sent (spacing and case of headers too), pipelined requests one after
    /// the other, an interim 100 before its response.
    #[tokio::test]
    async fn messages_are_forwarded_as_they_came() {
        let (mut client, proxied) = pair().await;
        let (upstream, mut server) = pair().await;
        let info = ConnInfo { client: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1), server: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2), ingress: true, udp: false };
        let task = tokio::spawn(async move {
            let drain = Drain::default();
            serve_conn(proxied, Some(upstream), info, &Open, &Quiet, &drain).await
        });
        let one = b"POST /a?x=1 HTTP/1.1\r\nhOST:   example\r\nX-Odd:a  b \r\nContent-Length: 5\r\n\r\nhello";
        let two = b"GET /b HTTP/1.1\r\nHost: example\r\n\r\n";
        client.write_all(&[&one[..], &two[..]].concat()).await.unwrap();
        assert_eq!(read_n(&mut server, one.len()).await, one.to_vec());
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let r1 = b"HTTP/1.1 201 Made  It\r\ncontent-LENGTH: 3\r\nX-A:1\r\n\r\nabc";
        server.write_all(&[&interim[..], &r1[..]].concat()).await.unwrap();
        assert_eq!(read_n(&mut client, interim.len() + r1.len()).await, [&interim[..], &r1[..]].concat());
        // the second request only after the first response
        assert_eq!(read_n(&mut server, two.len()).await, two.to_vec());
        let r2 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n";
        server.write_all(r2).await.unwrap();
        assert_eq!(read_n(&mut client, r2.len()).await, r2.to_vec());
        drop(client);
        task.await.unwrap().unwrap();
    }

    /// A head with bare-LF line ends goes on encoded again with CRLF (a
    /// server could split it differently from the proxy's parser).
    #[tokio::test]
    async fn bare_lf_heads_are_encoded_again() {
        let (mut client, proxied) = pair().await;
        let (upstream, mut server) = pair().await;
        let info = ConnInfo { client: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1), server: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2), ingress: true, udp: false };
        tokio::spawn(async move {
            let drain = Drain::default();
            serve_conn(proxied, Some(upstream), info, &Open, &Quiet, &drain).await
        });
        client.write_all(b"GET /x HTTP/1.1\nHost: example\r\n\n").await.unwrap();
        let want = b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n";
        assert_eq!(read_n(&mut server, want.len()).await, want.to_vec());
    }

    /// What one idle HTTP/1 connection costs in task state (its buffers are
    /// released between requests): the benchmark's per-connection memory
    /// is this, two sockets' user-space handles and the allocator's rounding.
    #[tokio::test]
    async fn an_idle_connection_keeps_little_state() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let info = ConnInfo { client: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1), server: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2), ingress: true, udp: false };
        let drain = Drain::default();
        let fut = serve_conn(a, None, info, &Open, &Quiet, &drain);
        let size = std::mem::size_of_val(&fut);
        assert!(size < 4096, "serve_conn's state is {size} bytes");
    }
}
