//! The transparent L7 proxy. The datapath hands it the connections whose
//! policy entry carries L7 rules (bpf_sk_assign onto a listener with
//! IP_TRANSPARENT, so each accepted socket keeps the original destination as
//! its local address); the proxy asks the agent what applies to the
//! connection ([`PolicyProvider`]), checks every request against it,
//! answers denied ones itself (403 "Access denied") and forwards allowed ones
//! unmodified (header actions aside) over its own connection to the original
//! destination, marked so the datapath knows it. Bodies are streamed, never
//! buffered whole; keep-alive and pipelining work because requests are
//! handled one after the other on the same connection. Each request and
//! response is reported to an [`AccessLog`] (Hubble's L7 flows).
//!
//! Kafka connections (their own listeners) are checked request by request
//! the same way and denied requests get Kafka's authorization errors
//! ([`kafka`], [`kafka_server`]); DNS has its own proxy ([`dns_server`]).
//!
//! Architecture invariant: the proxy decides nothing about L3/L4 (the
//! datapath did) and knows no policy syntax beyond compiled HTTP, DNS and
//! Kafka rules; a request it cannot parse or check is refused, never
//! forwarded.

pub mod dns;
pub mod dns_server;
pub mod h2c;
pub mod handoff;
pub mod http;
pub mod kafka;
pub mod kafka_server;
pub mod rules;
pub mod server;

pub use rules::{Check, HttpRules};
pub use handoff::L7Proto;
pub use kafka_server::KafkaRecord;
pub use server::{AccessLog, AccessRecord, ConnInfo, ConnPolicy, DnsRecord, Learned, PolicyProvider, Proxy};
