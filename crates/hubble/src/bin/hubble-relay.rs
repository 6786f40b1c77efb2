//! `hubble-relay`: one Observer API over every node's Hubble server.
//!   hubble-relay [serve] --listen-address 127.0.0.1:4245 --static-peer NAME=ADDR…

use std::time::Duration;

use anyhow::Context;
use cilium_hubble::server::PeerInfo;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "hubble-relay",
    about = "Merges the flows of many Hubble servers"
)]
struct Args {
    /// Ignored (upstream's `hubble-relay serve`).
    #[arg(hide = true)]
    command: Option<String>,
    /// Where to serve the Observer API.
    #[arg(long, default_value = "127.0.0.1:4245")]
    listen_address: std::net::SocketAddr,
    /// A node's Hubble server, NAME=ADDRESS (unix:///path or host:port); repeatable.
    #[arg(long = "static-peer", value_name = "NAME=ADDRESS")]
    static_peers: Vec<String>,
    /// Timeout to reach a peer.
    #[arg(long, default_value = "5s", value_parser = |s: &str| cilium_hubble::observe::parse_duration(s).ok_or_else(|| format!("invalid duration {s:?}")))]
    dial_timeout: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(c) = &args.command {
        if c != "serve" {
            eprintln!("unknown command {c:?}; the only command is serve");
            std::process::exit(64);
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut peers = Vec::new();
    for p in &args.static_peers {
        let Some((name, address)) = p.split_once('=') else {
            eprintln!("invalid --static-peer {p:?}: want NAME=ADDRESS");
            std::process::exit(64);
        };
        peers.push(PeerInfo {
            name: name.to_string(),
            address: address.to_string(),
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let relay = cilium_hubble::relay::Relay::new(peers, args.dial_timeout)?;
        cilium_hubble::relay::serve(relay, args.listen_address)
            .await
            .context("hubble-relay")
    })
}
