//! Hubble for cilium-rs: datapath events become [`proto::flow::Flow`]s
//! (upstream's wire format), enriched with names the agent knows, kept in a
//! ring, filtered like upstream, and served over the Observer and Peer gRPC
//! services; `hubble-relay` merges several agents; `hubble` is the CLI.
//!
//! Architecture invariant: nothing here touches the kernel. The agent hands
//! in decoded events and a [`names::Names`] snapshot; everything else is
//! pure data and gRPC.

#![allow(clippy::large_enum_variant)]

pub mod client;
pub mod export;
pub mod filter;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod parser;
pub mod printer;
pub mod relay;
pub mod ring;
pub mod server;

/// Generated from `proto/` (upstream's field numbers).
#[allow(clippy::all, clippy::pedantic, missing_docs, deprecated)]
pub mod proto {
    pub mod flow {
        include!(concat!(env!("OUT_DIR"), "/flow.rs"));
        include!(concat!(env!("OUT_DIR"), "/flow.serde.rs"));
    }
    pub mod relay {
        include!(concat!(env!("OUT_DIR"), "/relay.rs"));
        include!(concat!(env!("OUT_DIR"), "/relay.serde.rs"));
    }
    pub mod peer {
        include!(concat!(env!("OUT_DIR"), "/peer.rs"));
        include!(concat!(env!("OUT_DIR"), "/peer.serde.rs"));
    }
    pub mod observer {
        include!(concat!(env!("OUT_DIR"), "/observer.rs"));
        include!(concat!(env!("OUT_DIR"), "/observer.serde.rs"));
    }
}

pub use proto::flow::Flow;

/// The version string servers report.
pub const VERSION: &str = concat!("cilium-rs ", env!("CARGO_PKG_VERSION"));
