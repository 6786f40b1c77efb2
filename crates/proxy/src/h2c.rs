//! HTTP/2 in clear text with prior knowledge (h2c), which is how gRPC
//! clients talk to services in a cluster. Each stream is a request: checked
//! against the same HTTP rules (a gRPC method is its path,
//! `/package.Service/Method`), denied with 403 "Access denied", or sent on
//! over one HTTP/2 connection to the original destination with its body,
//! response and trailers streamed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::http::Request;
use crate::server::{AccessLog, AccessRecord, ConnInfo, PolicyProvider};

/// The client preface every h2c prior-knowledge connection starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream that first yields bytes already read from it.
pub struct Prefixed {
    pub head: Vec<u8>,
    pub stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

type Upstream = h2::client::SendRequest<Bytes>;

/// Serves one h2c connection (its preface already read into `head`).
pub async fn serve(client: Prefixed, info: ConnInfo, provider: Arc<dyn PolicyProvider>, log: Arc<dyn AccessLog>) -> Result<(), h2::Error> {
    let mut conn = h2::server::handshake(client).await?;
    let upstream: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::new(tokio::sync::Mutex::new(None));
    while let Some(r) = conn.accept().await {
        let (req, respond) = r?;
        let (provider, log, upstream) = (provider.clone(), log.clone(), upstream.clone());
        tokio::spawn(async move {
            if let Err(e) = stream(req, respond, info, &*provider, &*log, &upstream).await {
                debug!(client = %info.client, error = %e, "h2 stream ended");
            }
        });
    }
    Ok(())
}

fn as_request(req: &http::Request<h2::RecvStream>) -> Request {
    let mut headers: Vec<(String, Vec<u8>)> = req.headers().iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect();
    if let Some(a) = req.uri().authority() {
        headers.insert(0, ("host".into(), a.as_str().as_bytes().to_vec()));
    }
    Request {
        method: req.method().as_str().to_string(),
        target: req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()),
        version: 1,
        headers,
        reencode: false,
    }
}

async fn connect(info: &ConnInfo, src_identity: u32) -> Result<Upstream, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = crate::server::connect_upstream(info.server, src_identity).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn pipe(mut from: h2::RecvStream, mut to: h2::SendStream<Bytes>) -> Result<(), h2::Error> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        let _ = from.flow_control().release_capacity(n);
        to.send_data(chunk, false)?;
    }
    match from.trailers().await? {
        Some(t) => to.send_trailers(t),
        None => to.send_data(Bytes::new(), true),
    }
}

async fn stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    info: ConnInfo,
    provider: &dyn PolicyProvider,
    log: &dyn AccessLog,
    upstream: &tokio::sync::Mutex<Option<Upstream>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let started = Instant::now();
    let policy = provider.policy(&info);
    let mut view = as_request(&req);
    let allowed = crate::rules::http_allows(&policy.checks, &mut view);
    let url = format!("http://{}{}", view.host(), view.target);
    let record = |response: bool, denied: bool, code: u16| AccessRecord {
        time: SystemTime::now(),
        conn: info,
        src_identity: policy.src_identity,
        dst_identity: policy.dst_identity,
        response,
        denied,
        method: view.method.clone(),
        url: url.clone(),
        protocol: "HTTP/2".into(),
        code,
        latency: if response { started.elapsed() } else { Duration::ZERO },
        headers: Vec::new(),
    };
    if !allowed {
        log.log(record(false, true, 0));
        let resp = http::Response::builder().status(403).header("content-type", "text/plain").body(())?;
        let mut body = respond.send_response(resp, false)?;
        body.send_data(Bytes::from_static(b"Access denied\r\n"), true)?;
        log.log(record(true, true, 403));
        return Ok(());
    }
    log.log(record(false, false, 0));
    let mut send = {
        let mut guard = upstream.lock().await;
        if guard.is_none() {
            *guard = Some(connect(&info, policy.src_identity).await?);
        }
        guard.as_ref().expect("connected above").clone()
    };
    send = send.ready().await?;
    let (parts, body) = req.into_parts();
    let mut out = http::Request::builder().method(parts.method).uri(parts.uri).version(http::Version::HTTP_2);
    // the headers as the rules left them (header actions applied)
    for (n, v) in view.headers.iter().filter(|(n, _)| n != "host") {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(n.as_bytes()), http::HeaderValue::from_bytes(v)) {
            out = out.header(n, v);
        }
    }
    let (resp_fut, up_body) = send.send_request(out.body(())?, false)?;
    tokio::spawn(async move {
        let _ = pipe(body, up_body).await;
    });
    let resp = resp_fut.await?;
    log.log(record(true, false, resp.status().as_u16()));
    let (parts, rbody) = resp.into_parts();
    let down = respond.send_response(http::Response::from_parts(parts, ()), false)?;
    pipe(rbody, down).await?;
    Ok(())
}
