//! Connecting to a Hubble server (an agent or the relay): `unix:///path`,
//! `host:port`, or `http://host:port`.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// A lazily connecting channel to `server`.
pub fn channel(server: &str, timeout: Duration) -> anyhow::Result<Channel> {
    if let Some(path) = server.strip_prefix("unix://") {
        let path = path.to_string();
        let ep = Endpoint::try_from("http://[::]:50051")?.connect_timeout(timeout);
        return Ok(
            ep.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            })),
        );
    }
    let url = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("server {server:?}: {e}"))?
        .connect_timeout(timeout);
    Ok(ep.connect_lazy())
}
