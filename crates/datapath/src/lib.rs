//! The kernel side of cilium-rs.
//!
//! The C programs in `bpf/` are compiled by this crate's build script and
//! embedded here ([`BPF_LXC`]). [`Loaded`] loads them with aya, pins maps,
//! programs and links under a bpffs directory so enforcement survives the
//! agent, and reads and writes every map through typed ABI structs.
//! [`netlink`] configures links, addresses and routes; [`sys`] mounts bpffs
//! and switches network namespaces.
//!
//! Everything above this crate reaches the maps through the [`Datapath`]
//! trait; [`fake::FakeDatapath`] implements it in memory so the agent's logic
//! is tested without root.
//!
//! Architecture invariant: this is the only crate that makes BPF syscalls or
//! netlink requests. It holds no policy logic: it writes what it is told.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilium_abi::{
    Ct6Key, CtEntry, CtKey, EndpointInfo, IpcacheValue, Lb4Backend, Lb4Key, Lb4Service, Lb4SrcRangeKey, LbMaglevKey, MetricsKey,
    MetricsValue, PolicyEntry, PolicyKey,
};
use ipnet::IpNet;

pub mod events;
pub mod fake;
mod loader;
pub mod netlink;
pub mod sys;

pub use loader::{LoadOptions, Loaded, Program};

/// The compiled per-endpoint programs (bpf/bpf_lxc.c).
pub static BPF_LXC: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_lxc.o"));
/// The compiled socket-level load balancer (bpf/bpf_sock.c).
pub static BPF_SOCK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_sock.o"));

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the BPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map} is full ({max} entries): {detail}")]
    MapFull { map: &'static str, max: u32, detail: String },
    #[error("pinning {path}: {detail}")]
    Pin { path: String, detail: String },
    #[error("interface {ifname}: {detail}")]
    Interface { ifname: String, detail: String },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// One conntrack entry's connection, from its endpoint's side (cilium_ct4
/// or cilium_ct6); ports in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtConn {
    pub local: IpAddr,
    pub remote: IpAddr,
    pub lport: u16,
    pub rport: u16,
    pub protocol: u8,
}

impl From<&CtKey> for CtConn {
    fn from(k: &CtKey) -> CtConn {
        CtConn {
            local: IpAddr::V4(be_to_ip(k.local)),
            remote: IpAddr::V4(be_to_ip(k.remote)),
            lport: u16::from_be(k.lport),
            rport: u16::from_be(k.rport),
            protocol: k.protocol,
        }
    }
}

impl From<&Ct6Key> for CtConn {
    fn from(k: &Ct6Key) -> CtConn {
        CtConn {
            local: IpAddr::V6(Ipv6Addr::from(k.local)),
            remote: IpAddr::V6(Ipv6Addr::from(k.remote)),
            lport: u16::from_be(k.lport),
            rport: u16::from_be(k.rport),
            protocol: k.protocol,
        }
    }
}

/// Fill level of a map, for `cilium status` and `cilium bpf ... list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPressure {
    pub name: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

/// The maps and attachments the agent drives. Implemented by [`Loaded`] on a
/// real kernel and by [`fake::FakeDatapath`] in memory.
pub trait Datapath: Send {
    fn endpoint_upsert(&mut self, info: &EndpointInfo) -> Result<()>;
    fn endpoint_delete(&mut self, ifindex: u32) -> Result<()>;
    fn endpoints(&self) -> Result<Vec<EndpointInfo>>;

    /// IPv4 prefixes go to cilium_ipcache, IPv6 ones to cilium_ipcache6.
    fn ipcache_upsert(&mut self, prefix: IpNet, value: &IpcacheValue) -> Result<()>;
    fn ipcache_delete(&mut self, prefix: IpNet) -> Result<()>;
    fn ipcache_dump(&self) -> Result<Vec<(IpNet, IpcacheValue)>>;

    fn policy_insert(&mut self, key: &PolicyKey, entry: &PolicyEntry) -> Result<()>;
    fn policy_delete(&mut self, key: &PolicyKey) -> Result<()>;
    fn policy_dump(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>>;
    /// Bumps the revision every established connection re-checks against.
    fn bump_policy_revision(&mut self) -> Result<u32>;

    /// Attaches the endpoint programs to a host-side interface (idempotent;
    /// replaces the programs atomically when they are attached already).
    /// They stay until the interface goes.
    fn attach(&mut self, ifname: &str) -> Result<()>;

    /// ifindex and MAC of an interface of the agent's namespace, if it exists.
    fn link(&self, ifname: &str) -> Result<Option<(u32, [u8; 6])>>;
    /// Sets an interface up.
    fn link_up(&mut self, ifname: &str) -> Result<()>;
    /// Routes a prefix out of an interface without a gateway (an endpoint's
    /// /32 to its host interface, another node's pod CIDR into the tunnel),
    /// preferring `src` as the node's source address towards it.
    fn route(&mut self, prefix: IpNet, ifname: &str, src: IpAddr) -> Result<()>;
    /// Removes the route to a prefix (absent is fine).
    fn unroute(&mut self, prefix: IpNet) -> Result<()>;
    /// The prefixes routed out of an interface (none when it is missing).
    fn routes_via(&self, ifname: &str) -> Result<Vec<IpNet>>;

    /// Applies service-map writes in order (runs of one kind may go to the
    /// kernel as one batch). On error, a prefix of them has been applied.
    fn lb_apply(&mut self, ops: &[LbOp]) -> Result<()>;
    /// Everything in the service maps.
    fn lb_dump(&self) -> Result<LbDump>;
    /// Attaches the per-packet service load balancer to a node device
    /// (idempotent, atomic replacement like [`Datapath::attach`]).
    fn attach_netdev(&mut self, ifname: &str) -> Result<()>;
    /// Attaches the tunnel programs to the node's VXLAN device.
    fn attach_overlay(&mut self, ifname: &str) -> Result<()>;
    /// Attaches the socket-level load balancer to a cgroup (idempotent;
    /// replaces the programs atomically when attached already).
    fn attach_cgroup(&mut self, cgroup: &std::path::Path) -> Result<()>;

    fn ct_dump(&self) -> Result<Vec<(CtConn, CtEntry)>>;
    /// Removes every conntrack entry to or from an address; returns how many.
    fn ct_flush_ip(&mut self, ip: IpAddr) -> Result<usize>;
    /// Removes expired entries; returns how many.
    fn ct_gc(&mut self, now_secs: u32) -> Result<usize>;
    fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>>;
    fn lost_events(&self) -> Result<u64>;
    fn pressure(&self) -> Vec<MapPressure>;
    /// Map operations done so far: (map, operation, outcome, count).
    fn map_ops(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        Vec::new()
    }
}

/// One write to the service maps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbOp {
    BackendSet(u32, Lb4Backend),
    BackendDel(u32),
    /// A service entry (slot 0) or a backend slot.
    ServiceSet(Lb4Key, Lb4Service),
    ServiceDel(Lb4Key),
    MaglevSet(LbMaglevKey, u32),
    MaglevDel(LbMaglevKey),
    /// A loadBalancerSourceRanges entry (LPM).
    SrcRangeSet(Lb4SrcRangeKey),
    SrcRangeDel(Lb4SrcRangeKey),
}

impl LbOp {
    /// Ops of one kind, next to each other, can be one batch.
    pub fn kind(&self) -> u8 {
        match self {
            LbOp::BackendSet(..) => 0,
            LbOp::BackendDel(..) => 1,
            LbOp::ServiceSet(..) => 2,
            LbOp::ServiceDel(..) => 3,
            LbOp::MaglevSet(..) => 4,
            LbOp::MaglevDel(..) => 5,
            LbOp::SrcRangeSet(..) => 6,
            LbOp::SrcRangeDel(..) => 7,
        }
    }
}

/// The content of the service maps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LbDump {
    pub services: Vec<(Lb4Key, Lb4Service)>,
    pub backends: Vec<(u32, Lb4Backend)>,
    pub maglev: Vec<(LbMaglevKey, u32)>,
    pub source_ranges: Vec<Lb4SrcRangeKey>,
}

/// An IPv4 address as the datapath stores it (network byte order in a u32).
pub fn ip_to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_to_be`].
pub fn be_to_ip(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}
