//! The DNS proxy: UDP datagrams the datapath assigned to its transparent
//! socket (the original destination read from IP_RECVORIGDSTADDR). Queries
//! whose name the client's `dns` rules do not match are answered REFUSED;
//! the others go to the original server, and its answer's addresses are
//! taught to the agent (so `toFQDNs` rules allow them) before the answer
//! is passed on, from the server's own address.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::dns::{Message, qtype_name};
use crate::rules::Check;
use crate::server::{AccessLog, ConnInfo, DnsRecord, PolicyProvider};

/// How long the server may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

fn udp_socket() -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Binds the DNS proxy's transparent UDP socket on `port`.
pub fn listen(port: u16) -> std::io::Result<UdpSocket> {
    let s = udp_socket()?;
    s.set_reuse_address(true)?;
    s.set_ip_transparent_v4(true)?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a correctly sized int on a valid socket.
    let rc = unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, (&on as *const libc::c_int).cast(), size_of::<libc::c_int>() as u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(s.into())
}

/// One datagram with its source and original destination.
fn recv_orig(fd: i32, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddrV4, SocketAddrV4)> {
    // SAFETY: recvmsg into buffers we own and size correctly; the control
    // messages are walked with the libc CMSG macros within the buffer.
    unsafe {
        let mut from: libc::sockaddr_in = std::mem::zeroed();
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut control = [0u8; 128];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut orig = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_IP && (*c).cmsg_type == libc::IP_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::sockaddr_in>());
                orig = Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        let src = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)), u16::from_be(from.sin_port));
        let orig = orig.ok_or_else(|| std::io::Error::other("no original destination"))?;
        Ok((n as usize, src, orig))
    }
}

/// Sockets bound to the servers' addresses, to answer clients from them.
#[derive(Default)]
struct ReplySockets(Mutex<HashMap<SocketAddrV4, Arc<std::net::UdpSocket>>>);

/// Idle upstream sockets, per (server, mark): one query at a time each, so
/// no socket is created per query.
#[derive(Default)]
struct UpstreamPool(Mutex<HashMap<(SocketAddrV4, u32), Vec<UdpSocket>>>);

impl UpstreamPool {
    fn take(&self, server: SocketAddrV4, mark: u32) -> std::io::Result<UdpSocket> {
        if let Some(s) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&(server, mark)).and_then(Vec::pop) {
            return Ok(s);
        }
        let up = udp_socket()?;
        up.set_mark(mark)?;
        up.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        up.connect(&SocketAddr::V4(server).into())?;
        UdpSocket::from_std(up.into())
    }

    fn give_back(&self, server: SocketAddrV4, mark: u32, s: UdpSocket) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.entry((server, mark)).or_default();
        if v.len() < 64 {
            v.push(s);
        }
    }
}

impl ReplySockets {
    fn get(&self, server: SocketAddrV4) -> std::io::Result<Arc<std::net::UdpSocket>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get(&server) {
            return Ok(s.clone());
        }
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_ip_transparent_v4(true)?;
        s.set_mark(cilium_abi::MARK_MAGIC_PROXY)?;
        s.bind(&SocketAddr::V4(server).into())?;
        let s: Arc<std::net::UdpSocket> = Arc::new(s.into());
        m.insert(server, s.clone());
        Ok(s)
    }
}

/// Serves the DNS proxy socket until `drain` begins; returns it then.
pub async fn serve(sock: UdpSocket, provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>, drain: Arc<crate::handoff::Drain>) -> UdpSocket {
    let sock = Arc::new(sock);
    let replies = Arc::new(ReplySockets::default());
    let pool = Arc::new(UpstreamPool::default());
    let mut buf = vec![0u8; 65535];
    loop {
        if drain.stopping() {
            return Arc::try_unwrap(sock).unwrap_or_else(|_| unreachable!("only this loop holds the socket"));
        }
        let got = async {
            loop {
                sock.readable().await?;
                match sock.try_io(tokio::io::Interest::READABLE, || recv_orig(sock.as_raw_fd(), &mut buf)) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        }
        ;
        let got = tokio::select! {
            g = got => g,
            _ = drain.stopped() => continue,
        };
        let (n, client, server) = match got {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "DNS proxy receive");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (provider, log, replies, pool) = (provider.clone(), log.clone(), replies.clone(), pool.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(query, client, server, &*provider, &*log, &replies, &pool).await {
                debug!(%client, %server, error = %e, "DNS query not answered");
            }
        });
    }
}

async fn handle(query: Vec<u8>, client: SocketAddrV4, server: SocketAddrV4, provider: &dyn PolicyProvider, log: &dyn AccessLog, replies: &ReplySockets, pool: &UpstreamPool) -> std::io::Result<()> {
    let info = ConnInfo { client, server, ingress: false, udp: true };
    let reply = replies.get(server)?;
    let answer = answer(&query, info, provider, log, |q, src_identity| async move {
        // ask the server, as the client (the mark carries its identity)
        let mark = proxy_mark(src_identity);
        let up = pool.take(server, mark)?;
        up.send(&q).await?;
        let mut buf = vec![0u8; 4096];
        let got = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            loop {
                let n = up.recv(&mut buf).await?;
                // a late answer to an earlier, timed-out query is not this one's
                if n >= 2 && q.len() >= 2 && buf[..2] == q[..2] {
                    return Ok::<usize, std::io::Error>(n);
                }
            }
        })
        .await;
        match got {
            Ok(Ok(n)) => {
                buf.truncate(n);
                pool.give_back(server, mark, up);
                Ok(buf)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS server did not answer")),
        }
    })
    .await?;
    reply.send_to(&answer, client)?;
    Ok(())
}

fn proxy_mark(src_identity: u32) -> u32 {
    let id = if src_identity < 1 << 16 { src_identity } else { cilium_abi::ReservedIdentity::World as u32 };
    cilium_abi::MARK_MAGIC_PROXY | (id << 16)
}

/// The answer a client gets to `query`: REFUSED when its rules do not
/// allow the name, else the server's (asked with `forward`), after the
/// addresses it names were taught to the agent.
async fn answer<F, Fut>(query: &[u8], info: ConnInfo, provider: &dyn PolicyProvider, log: &dyn AccessLog, forward: F) -> std::io::Result<Vec<u8>>
where
    F: FnOnce(Vec<u8>, u32) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Vec<u8>>>,
{
    let started = Instant::now();
    // not DNS: nothing to answer
    let q = Message::parse(query).map_err(std::io::Error::other)?;
    let policy = provider.policy(&info);
    let allowed = policy.checks.iter().all(|c| match c {
        Check::Denied => false,
        Check::Dns(m) => m.iter().any(|m| m.matches(&q.qname)),
        Check::Unrestricted | Check::Rules(_) => true,
        Check::Kafka(_) => false,
    });
    let record = |response: bool, denied: bool, m: &Message| DnsRecord {
        time: SystemTime::now(),
        conn: info,
        src_identity: policy.src_identity,
        dst_identity: policy.dst_identity,
        response,
        denied,
        query: q.qname.clone(),
        qtypes: vec![qtype_name(q.qtype)],
        rcode: u32::from(m.rcode),
        ips: m.addrs.iter().map(|(_, ip, _)| *ip).collect(),
        ttl: m.addrs.iter().map(|(_, _, t)| *t).min().unwrap_or(0),
        cnames: m.cnames.iter().map(|(_, t)| t.clone()).collect(),
        latency: if response { started.elapsed() } else { Duration::ZERO },
    };
    if !allowed {
        log.log_dns(record(false, true, &q));
        let refused = q.refused(query);
        if let Ok(m) = Message::parse(&refused) {
            log.log_dns(record(true, true, &m));
        }
        return Ok(refused);
    }
    log.log_dns(record(false, false, &q));
    let answer = forward(query.to_vec(), policy.src_identity).await?;
    if let Ok(m) = Message::parse(&answer) {
        if m.id == q.id && m.rcode == 0 && !m.addrs.is_empty() {
            // every name of the chain leads to these addresses
            let ips: Vec<std::net::IpAddr> = m.addrs.iter().map(|(_, ip, _)| *ip).collect();
            let ttl = m.addrs.iter().map(|(_, _, t)| *t).min().unwrap_or(0);
            let mut names: Vec<String> = vec![q.qname.clone()];
            names.extend(m.cnames.iter().map(|(_, t)| t.clone()));
            names.extend(m.addrs.iter().map(|(o, _, _)| o.clone()));
            names.sort();
            names.dedup();
            provider.learn(info.client, names.into_iter().map(|n| (n, ips.clone(), ttl)).collect());
        }
        log.log_dns(record(true, false, &m));
    }
    Ok(answer)
}

/// Serves DNS over TCP (one upstream connection per client connection)
/// until `drain` begins; returns the listener then.
pub async fn serve_tcp(listener: tokio::net::TcpListener, provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>, drain: Arc<crate::handoff::Drain>) -> tokio::net::TcpListener {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.stopped() => return listener,
        };
        let (mut conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "DNS proxy accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (Ok(SocketAddr::V4(server)), SocketAddr::V4(client)) = (conn.local_addr(), peer) else { continue };
        let (provider, log) = (provider.clone(), log.clone());
        tokio::spawn(async move {
            let info = ConnInfo { client, server, ingress: false, udp: false };
            let mut upstream: Option<tokio::net::TcpStream> = None;
            loop {
                let mut len = [0u8; 2];
                if conn.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if conn.read_exact(&mut q).await.is_err() {
                    return;
                }
                let up = &mut upstream;
                let r = answer(&q, info, &*provider, &*log, |q, src_identity| async move {
                    if up.is_none() {
                        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
                        s.set_mark(proxy_mark(src_identity))?;
                        s.set_nonblocking(true)?;
                        let sock = tokio::net::TcpSocket::from_std_stream(s.into());
                        *up = Some(tokio::time::timeout(UPSTREAM_TIMEOUT, sock.connect(SocketAddr::V4(server))).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS server did not accept"))??);
                    }
                    let s = up.as_mut().expect("connected above");
                    s.write_all(&(q.len() as u16).to_be_bytes()).await?;
                    s.write_all(&q).await?;
                    let mut len = [0u8; 2];
                    tokio::time::timeout(UPSTREAM_TIMEOUT, s.read_exact(&mut len)).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS server did not answer"))??;
                    let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
                    s.read_exact(&mut a).await?;
                    Ok(a)
                })
                .await;
                let Ok(a) = r else { return };
                if conn.write_all(&(a.len() as u16).to_be_bytes()).await.is_err() || conn.write_all(&a).await.is_err() {
                    return;
                }
            }
        });
    }
}
