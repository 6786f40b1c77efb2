//! The built-in workload every lab pod runs: on each TCP containerPort an
//! HTTP/1.1 echo server (keep-alive, answers with the pod's name and the
//! request line; non-HTTP bytes are echoed back), on each UDP port an echo
//! that prefixes the pod's name.

use std::path::PathBuf;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// What to serve.
#[derive(Debug, Clone)]
pub struct Workload {
    pub pod: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    /// Written once every port is bound.
    pub ready_file: Option<PathBuf>,
}

/// Serves until killed.
pub fn serve(w: Workload) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for port in &w.tcp {
            // dual-stack where the namespace has IPv6, IPv4 otherwise
            let l = match tokio::net::TcpListener::bind(("::", *port)).await {
                Ok(l) => l,
                Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", *port)).await?,
            };
            let pod = w.pod.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else { continue };
                    let pod = pod.clone();
                    tokio::spawn(async move {
                        let _ = handle_tcp(s, &pod).await;
                    });
                }
            }));
        }
        for port in &w.udp {
            let s = match tokio::net::UdpSocket::bind(("::", *port)).await {
                Ok(s) => s,
                Err(_) => tokio::net::UdpSocket::bind(("0.0.0.0", *port)).await?,
            };
            let pod = w.pod.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok((n, from)) = s.recv_from(&mut buf).await else { continue };
                    let mut out = format!("pod={pod} ").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    let _ = s.send_to(&out, from).await;
                }
            }));
        }
        if let Some(f) = &w.ready_file {
            std::fs::write(f, b"ready")?;
        }
        // a pod without ports runs as long as one with them (its status
        // is Running, not WorkloadStopped)
        if tasks.is_empty() {
            std::future::pending::<()>().await;
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

const METHODS: &[&str] = &["GET ", "POST ", "PUT ", "DELETE ", "HEAD ", "PATCH ", "OPTIONS "];

async fn handle_tcp(s: tokio::net::TcpStream, pod: &str) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if !METHODS.iter().any(|m| line.starts_with(m)) {
            // not HTTP: echo
            r.get_mut().write_all(line.as_bytes()).await?;
            let mut buf = vec![0u8; 16384];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                r.get_mut().write_all(&buf[..n]).await?;
            }
        }
        let request_line = line.trim_end().to_string();
        let mut content_length = 0usize;
        let mut close = request_line.ends_with("HTTP/1.0");
        // x-* headers are echoed back, so tests can see what arrived
        let mut echoed = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "connection" {
                    close = v == "close";
                } else if k.starts_with("x-") {
                    echoed.push(format!("{k}={v}"));
                }
            }
        }
        // the body is read (any size) and counted, not kept
        let mut left = content_length;
        let mut chunk = vec![0u8; 65536];
        while left > 0 {
            let want = left.min(chunk.len());
            r.read_exact(&mut chunk[..want]).await?;
            left -= want;
        }
        let body = if echoed.is_empty() { format!("pod={pod} request=\"{request_line}\"{}\n", if content_length > 0 { format!(" body={content_length}") } else { String::new() }) } else { format!("pod={pod} request=\"{request_line}\" headers=\"{}\"\n", echoed.join(";")) };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        r.get_mut().write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}
