//! Kafka connections through the proxy. Requests are read whole (a frame
//! is at most [`MAX_FRAME`]), checked against the connection's policy
//! (asked per request, so a policy change applies to open connections) and
//! forwarded, or answered with the authorization error. Responses stream
//! back frame by frame, in request order: one task reads requests, another
//! writes replies — the broker's, or the proxy's own for denied requests —
//! in the order the requests came, so pipelining clients get what they
//! expect and neither direction can block the other.
//!
//! Between requests (nothing read ahead, no reply owed) a stopping agent
//! parks the connection for the next one, as HTTP/1 connections do.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::handoff::{Drain, L7Proto, Parked};
use crate::kafka::{self, MAX_FRAME};
use crate::rules::Check;
use crate::server::{AccessLog, ConnInfo, PolicyProvider, connect_upstream};

/// Replies a connection may owe before its requests stop being read.
const REPLIES_OWED: usize = 64;

/// A Kafka request as Hubble shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub time: SystemTime,
    pub conn: ConnInfo,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub denied: bool,
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: String,
    /// The first topic it names.
    pub topic: String,
    /// The error the proxy answered with (0 when forwarded).
    pub error_code: i16,
}

enum Reply {
    /// The broker's connection, once made.
    Connected(OwnedReadHalf),
    /// The broker's next response frame.
    Upstream,
    /// The proxy's own response.
    Local(Vec<u8>),
}

/// How the request side ended.
enum End {
    /// The client closed (replies still owed are delivered).
    Closed,
    /// Parked for the next agent.
    Park,
}

/// Serves one Kafka connection (`upstream`: the broker connection of a
/// connection resumed from a previous agent).
pub async fn serve(client: TcpStream, upstream: Option<TcpStream>, info: ConnInfo, provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>, drain: Arc<Drain>) -> std::io::Result<()> {
    let _active = drain.enter();
    let _ = client.set_nodelay(true);
    let (mut cr, cw) = client.into_split();
    // bounded: a client that pipelines and never reads its replies stops
    // being read once this many are owed
    let (tx, rx) = mpsc::channel(REPLIES_OWED);
    let owed = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut uw = None;
    if let Some(u) = upstream {
        let (r, w) = u.into_split();
        let _ = tx.send(Reply::Connected(r)).await;
        uw = Some(w);
    }
    let replies = replies(cw, rx, owed.clone(), stop_rx);
    tokio::pin!(replies);
    let requests = requests(&mut cr, &mut uw, tx, stop_tx, &owed, info, &*provider, &*log, &drain);
    let end = tokio::select! {
        r = requests => r?,
        // the broker closed, or the client stopped reading
        r = &mut replies => return r.map(|_| ()),
    };
    match (end, replies.await?) {
        (End::Park, Some((cw, ur))) => {
            let client = cr.reunite(cw).map_err(std::io::Error::other)?.into_std()?;
            let upstream = match (ur, uw) {
                (Some(r), Some(w)) => Some(r.reunite(w).map_err(std::io::Error::other)?.into_std()?),
                _ => None,
            };
            drain.park(Parked { info, proto: L7Proto::Kafka, client, upstream });
            Ok(())
        }
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn requests(
    cr: &mut OwnedReadHalf,
    uw: &mut Option<OwnedWriteHalf>,
    tx: mpsc::Sender<Reply>,
    stop: oneshot::Sender<()>,
    owed: &AtomicUsize,
    info: ConnInfo,
    provider: &dyn PolicyProvider,
    log: &dyn AccessLog,
    drain: &Drain,
) -> std::io::Result<End> {
    loop {
        // between requests: a stopping agent parks the connection once the
        // replies owed are delivered (anything the client sent meanwhile
        // stays in the socket for the next agent). Reads until the socket
        // would block, so readiness means new bytes, not old ones.
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < prefix.len() {
            let stopping = tokio::select! {
                biased;
                _ = drain.stopped(), if got == 0 => true,
                r = cr.readable() => { r?; false }
            };
            if stopping {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while owed.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if owed.load(Ordering::SeqCst) == 0 {
                    let _ = stop.send(());
                    return Ok(End::Park);
                }
                return Ok(End::Closed);
            }
            match cr.try_read(&mut prefix[got..]) {
                Ok(0) => return Ok(End::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let n = kafka::frame_size(prefix).map_err(std::io::Error::other)?;
        debug_assert!(n <= MAX_FRAME);
        let mut frame = vec![0u8; 4 + n];
        frame[..4].copy_from_slice(&prefix);
        cr.read_exact(&mut frame[4..]).await?;
        let req = kafka::parse(&frame[4..]).map_err(std::io::Error::other)?;
        let policy = provider.policy(&info);
        if policy.checks.iter().any(|c| matches!(c, Check::Denied)) {
            // L3/L4 no longer allows it (a policy change): close
            return Ok(End::Closed);
        }
        let rq = req.for_rules();
        let allowed = policy.checks.iter().all(|c| match c {
            Check::Unrestricted => true,
            Check::Kafka(rules) => cilium_policy::kafka::allows(rules, &rq),
            // another protocol's rules on this port: nothing passes
            _ => false,
        });
        let denied = if allowed { 0 } else if matches!(req.api_key, 10..=14) { kafka::GROUP_AUTHORIZATION_FAILED } else { kafka::TOPIC_AUTHORIZATION_FAILED };
        log.log_kafka(KafkaRecord {
            time: SystemTime::now(),
            conn: info,
            src_identity: policy.src_identity,
            dst_identity: policy.dst_identity,
            denied: !allowed,
            api_key: req.api_key,
            api_version: req.api_version,
            correlation_id: req.correlation_id,
            client_id: req.client_id.clone(),
            topic: req.topic().to_string(),
            error_code: denied,
        });
        if !allowed {
            if req.no_response {
                continue;
            }
            // no error response of this type to give: close
            let Some(reply) = kafka::denied_response(&req) else { return Ok(End::Closed) };
            owed.fetch_add(1, Ordering::SeqCst);
            if tx.send(Reply::Local(reply)).await.is_err() {
                return Ok(End::Closed);
            }
            continue;
        }
        if uw.is_none() {
            let Ok(s) = connect_upstream(info.server, policy.src_identity).await else {
                tracing::warn!(server = %info.server, "Kafka proxy cannot reach the broker");
                return Ok(End::Closed);
            };
            let (r, w) = s.into_split();
            let _ = tx.send(Reply::Connected(r)).await;
            *uw = Some(w);
        }
        if !req.no_response {
            owed.fetch_add(1, Ordering::SeqCst);
            if tx.send(Reply::Upstream).await.is_err() {
                return Ok(End::Closed);
            }
        }
        uw.as_mut().expect("connected above").write_all(&frame).await?;
    }
}

/// Writes replies in request order; returns the halves it holds when told
/// to stop (the connection parks), nothing when the request side closed.
async fn replies(mut cw: OwnedWriteHalf, mut rx: mpsc::Receiver<Reply>, owed: Arc<AtomicUsize>, mut stop: oneshot::Receiver<()>) -> std::io::Result<Option<(OwnedWriteHalf, Option<OwnedReadHalf>)>> {
    let mut ur: Option<OwnedReadHalf> = None;
    let mut stop_gone = false;
    loop {
        // a stop comes only when no reply is owed (the request side ends,
        // closing the channel, at the same time): look at it first
        let item = tokio::select! {
            biased;
            r = &mut stop, if !stop_gone => match r {
                Ok(()) => return Ok(Some((cw, ur))),
                Err(_) => { stop_gone = true; continue }
            },
            i = rx.recv() => i,
        };
        let Some(item) = item else { return Ok(None) };
        match item {
            Reply::Connected(r) => ur = Some(r),
            Reply::Local(bytes) => {
                cw.write_all(&bytes).await?;
                owed.fetch_sub(1, Ordering::SeqCst);
            }
            Reply::Upstream => {
                let u = ur.as_mut().ok_or_else(|| std::io::Error::other("reply owed without a broker connection"))?;
                let mut prefix = [0u8; 4];
                u.read_exact(&mut prefix).await?;
                let n = u64::from(u32::from_be_bytes(prefix));
                cw.write_all(&prefix).await?;
                let copied = tokio::io::copy(&mut (&mut *u).take(n), &mut cw).await?;
                if copied != n {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                owed.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::testing::{Open, Quiet};
    use std::net::{Ipv4Addr, SocketAddrV4};

    /// An ApiVersions v0 request frame.
    fn request(correlation_id: i32) -> Vec<u8> {
        let mut f = vec![0, 0, 0, 10, 0, 18, 0, 0];
        f.extend_from_slice(&correlation_id.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f
    }

    /// Between requests, a stopping agent parks the connection with its
    /// broker connection; replies owed are delivered first.
    #[tokio::test]
    async fn an_idle_connection_parks_with_its_upstream() {
        let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let baddr = broker.local_addr().unwrap();
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap()).await.unwrap();
        let (conn, _) = front.accept().await.unwrap();
        let (up, accepted) = tokio::join!(TcpStream::connect(baddr), broker.accept());
        let (mut up_server, _) = accepted.unwrap();
        let info = ConnInfo { client: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1), server: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2), ingress: true, udp: false };
        let drain = Arc::new(Drain::default());
        let task = tokio::spawn(serve(conn, Some(up.unwrap()), info, Arc::new(Open), Arc::new(Quiet), drain.clone()));
        client.write_all(&request(1)).await.unwrap();
        // the broker answers
        let mut got = vec![0u8; 14];
        up_server.read_exact(&mut got).await.unwrap();
        up_server.write_all(&[0, 0, 0, 4, 0, 0, 0, 1]).await.unwrap();
        let mut reply = [0u8; 8];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [0, 0, 0, 4, 0, 0, 0, 1]);
        drain.begin();
        let parked = drain.parked(Duration::from_secs(2)).await;
        task.await.unwrap().unwrap();
        assert_eq!(parked.len(), 1, "the connection parked");
        assert_eq!(parked[0].proto, L7Proto::Kafka);
        assert!(parked[0].upstream.is_some(), "with its broker connection");
    }
}
