//! cilium-agent: the per-node daemon.
//!
//! `config` reads and validates settings; `daemon` is the core (endpoints,
//! identities, IPAM, policies → datapath state), synchronous and generic over
//! the datapath so it is tested against a fake; `server` is the REST API on
//! the unix socket; `run` wires them to the real kernel, the event monitor and
//! the policy directory watcher.
//!
//! Architecture invariant: the daemon reaches the kernel only through
//! `cilium_datapath::Datapath` (and `node` for the host devices at start-up).

pub mod config;
pub mod daemon;
pub mod handoff;
pub mod health;
pub mod hubble;
pub mod kvstore;
pub mod l7;
pub mod metrics;
pub mod node;
pub mod run;
pub mod server;
pub mod state;
