//! The ABI between the C datapath and the agent.
//!
//! Every type here mirrors one in `bpf/lib/abi.h`, which is the single
//! definition. The mirrors carry their own field layout (`Layout`), and a test
//! in `cilium-datapath` compares that layout, and every code below, with the
//! BTF of the compiled object: a change on one side that is not made on the
//! other fails the build's tests.
//!
//! This crate is pure data: it never touches the kernel. It is *not* where map
//! logic lives (see `cilium-datapath`).

pub mod btf;
mod codes;

pub use codes::*;

/// Field layout of a mirrored struct: name, byte offset, byte size.
pub trait Layout {
    /// The C struct's name.
    const C_NAME: &'static str;
    /// Size in bytes.
    const SIZE: usize;
    /// Fields in declaration order.
    fn fields() -> Vec<(&'static str, usize, usize)>;
}

macro_rules! abi_struct {
    ($(#[$meta:meta])* $name:ident = $cname:literal { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }

        impl Layout for $name {
            const C_NAME: &'static str = $cname;
            const SIZE: usize = core::mem::size_of::<$name>();
            fn fields() -> Vec<(&'static str, usize, usize)> {
                vec![$((stringify!($field).trim_start_matches("r#"), core::mem::offset_of!($name, $field), core::mem::size_of::<$ty>())),*]
            }
        }

        #[cfg(feature = "aya")]
        // SAFETY: repr(C), only integer fields, no implicit padding (checked
        // against the BTF by cilium-datapath's tests).
        unsafe impl aya::Pod for $name {}
    };
}

abi_struct!(
    /// cilium_lxc value: one endpoint, keyed by its host-side ifindex.
    EndpointInfo = "endpoint_info" {
        ifindex: u32,
        /// Network byte order.
        ipv4: u32,
        sec_identity: u32,
        ep_id: u16,
        flags: u16,
        mac: [u8; 6],
        node_mac: [u8; 6],
        /// All zero: the endpoint has no IPv6 address.
        ipv6: [u8; 16],
    }
);

abi_struct!(
    /// cilium_lxc_ip6 key: a local endpoint's IPv6 address.
    Ip6Key = "ip6_key" {
        addr: [u8; 16],
    }
);

abi_struct!(
    /// cilium_ipcache key.
    IpcacheKey = "ipcache_key" {
        prefixlen: u32,
        /// Network byte order.
        addr: u32,
    }
);

abi_struct!(
    /// cilium_ipcache6 key.
    Ipcache6Key = "ipcache6_key" {
        prefixlen: u32,
        addr: [u8; 16],
    }
);

abi_struct!(
    /// cilium_ipcache value.
    IpcacheValue = "ipcache_value" {
        sec_identity: u32,
        /// Network byte order; 0 when the address is local or has no tunnel.
        tunnel_endpoint: u32,
        flags: u16,
        pad: u16,
    }
);

abi_struct!(
    /// cilium_policy key (an LPM trie key, see abi.h for the prefix layout).
    PolicyKey = "policy_key" {
        prefixlen: u32,
        ep_id: u16,
        gen_dir: u8,
        pad0: u8,
        identity: u32,
        protocol: u8,
        pad1: u8,
        /// Network byte order.
        dport: u16,
    }
);

abi_struct!(
    /// cilium_policy value.
    PolicyEntry = "policy_entry" {
        /// Network byte order.
        proxy_port: u16,
        flags: u8,
        match_type: u8,
        pad: u32,
    }
);

abi_struct!(
    /// cilium_ct4 key: one connection seen from one endpoint's side.
    CtKey = "ct_key" {
        /// The endpoint's address, network byte order.
        local: u32,
        remote: u32,
        /// Network byte order.
        lport: u16,
        rport: u16,
        protocol: u8,
        pad0: u8,
        pad1: u16,
    }
);

abi_struct!(
    /// cilium_ct6 key: an IPv6 connection seen from one endpoint's side.
    Ct6Key = "ct6_key" {
        local: [u8; 16],
        remote: [u8; 16],
        /// Network byte order.
        lport: u16,
        rport: u16,
        protocol: u8,
        pad0: u8,
        pad1: u16,
    }
);

abi_struct!(
    /// cilium_ct4 and cilium_ct6 value.
    CtEntry = "ct_entry" {
        tx_packets: u64,
        tx_bytes: u64,
        rx_packets: u64,
        rx_bytes: u64,
        lifetime: u32,
        src_sec_id: u32,
        policy_rev: u32,
        flags: u16,
        tx_flags_seen: u8,
        rx_flags_seen: u8,
        proxy_port: u16,
        /// A pair's (CT_F_PAIR): the accepting endpoint's ingress redirect.
        peer_proxy_port: u16,
        /// A pair's: the revision of the accepting endpoint's ingress verdict.
        peer_policy_rev: u32,
    }
);

abi_struct!(
    /// cilium_runtime value (index 0).
    RuntimeConfig = "runtime_config" {
        policy_rev: u32,
        maglev_size: u32,
        masq_addr: u32,
        /// MonitorAggregation code.
        monitor_aggregation: u32,
    }
);

abi_struct!(
    /// cilium_lb4_services key.
    Lb4Key = "lb4_key" {
        /// Network byte order.
        address: u32,
        /// Network byte order.
        dport: u16,
        backend_slot: u16,
        proto: u8,
        scope: u8,
        pad: u16,
    }
);

abi_struct!(
    /// cilium_lb4_services value.
    Lb4Service = "lb4_service" {
        backend_id: u32,
        count: u16,
        rev_nat_index: u16,
        affinity_timeout: u32,
        flags: u8,
        pad0: u8,
        pad1: u16,
    }
);

abi_struct!(
    /// cilium_lb4_backends value.
    Lb4Backend = "lb4_backend" {
        /// Network byte order.
        address: u32,
        /// Network byte order.
        port: u16,
        proto: u8,
        flags: u8,
    }
);

abi_struct!(
    /// cilium_lb4_sock_revnat value: the frontend a translated socket asked for.
    Lb4ReverseNat = "lb4_reverse_nat" {
        address: u32,
        port: u16,
        pad: u16,
    }
);

abi_struct!(
    /// cilium_lb4_nat key.
    Lb4NatKey = "lb4_nat_key" {
        saddr: u32,
        daddr: u32,
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
        pad: u16,
    }
);

abi_struct!(
    /// cilium_lb4_nat value.
    Lb4NatEntry = "lb4_nat_entry" {
        addr: u32,
        port: u16,
        rev_nat_index: u16,
        backend_id: u32,
        last_seen: u32,
    }
);

abi_struct!(
    /// cilium_lb4_source_range key (an LPM key: prefixlen counts from rev_nat_index).
    Lb4SrcRangeKey = "lb4_src_range_key" {
        prefixlen: u32,
        rev_nat_index: u16,
        pad: u16,
        addr: u32,
    }
);

abi_struct!(
    /// cilium_lb4_maglev key.
    LbMaglevKey = "lb_maglev_key" {
        rev_nat_index: u16,
        pad: u16,
        slot: u32,
    }
);

abi_struct!(
    /// cilium_lb_affinity key.
    LbAffinityKey = "lb_affinity_key" {
        client: u64,
        rev_nat_index: u16,
        pad0: u16,
        pad1: u32,
    }
);

abi_struct!(
    /// cilium_lb_affinity value.
    LbAffinityValue = "lb_affinity_value" {
        backend_id: u32,
        last_used: u32,
    }
);

abi_struct!(
    /// cilium_lb4_sock_revnat key.
    LbSockKey = "lb_sock_key" {
        cookie: u64,
        address: u32,
        port: u16,
        pad: u16,
    }
);

/// What a cilium_metrics slot counts: a reason (0 = forwarded, otherwise a
/// drop reason) and a direction (`MetricDir`). The map is an array indexed by
/// [`MetricsKey::index`] (`METRICS_INDEX` in abi.h).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricsKey {
    pub reason: u8,
    pub dir: u8,
}

/// Bits of a metrics index that hold the direction.
pub const METRICS_DIR_BITS: u32 = 2;
/// Slots of cilium_metrics.
pub const METRICS_MAX_ENTRIES: u32 = 1024;

impl MetricsKey {
    pub fn index(self) -> u32 {
        ((self.reason as u32) << METRICS_DIR_BITS) | self.dir as u32
    }

    pub fn from_index(i: u32) -> MetricsKey {
        MetricsKey { reason: (i >> METRICS_DIR_BITS) as u8, dir: (i & ((1 << METRICS_DIR_BITS) - 1)) as u8 }
    }
}

abi_struct!(
    /// cilium_metrics value (per CPU).
    MetricsValue = "metrics_value" {
        packets: u64,
        bytes: u64,
    }
);

/// Bytes of packet captured after a drop event.
pub const EVENT_DATA_LEN: usize = 128;

abi_struct!(
    /// One record of the cilium_events ring buffer (a drop is followed by
    /// `len_cap` bytes of the packet, see [`EventCapture`]).
    Event = "event" {
        r#type: u8,
        subtype: u8,
        source_ep: u16,
        ifindex: u32,
        ktime_ns: u64,
        src_identity: u32,
        dst_identity: u32,
        len_orig: u32,
        len_cap: u16,
        dst_port: u16,
        protocol: u8,
        flags: u8,
        match_type: u8,
        tcp_flags: u8,
        verdict: i32,
        proxy_port: u16,
        pad0: u16,
        /// Network byte order.
        saddr: u32,
        /// Network byte order.
        daddr: u32,
        sport: u16,
        dport: u16,
        icmp_type: u8,
        icmp_code: u8,
        /// 4 or 6 (the addresses are `saddr6`/`daddr6`); 0: not parsed.
        ip_version: u8,
        pad1: u8,
        pad2: u32,
        saddr6: [u8; 16],
        daddr6: [u8; 16],
    }
);

/// A drop event with the packet's first bytes (for the ABI check; records
/// are decoded with [`Event::from_bytes`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventCapture {
    pub hdr: Event,
    pub data: [u8; EVENT_DATA_LEN],
}

impl Layout for EventCapture {
    const C_NAME: &'static str = "event_capture";
    const SIZE: usize = core::mem::size_of::<EventCapture>();
    fn fields() -> Vec<(&'static str, usize, usize)> {
        vec![
            ("hdr", core::mem::offset_of!(EventCapture, hdr), core::mem::size_of::<Event>()),
            ("data", core::mem::offset_of!(EventCapture, data), EVENT_DATA_LEN),
        ]
    }
}

impl Event {
    /// Decodes a ring buffer record: the event and the packet bytes that
    /// follow it (drops only). `None` when the record is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<(Event, &[u8])> {
        let n = core::mem::size_of::<Event>();
        if bytes.len() < n {
            return None;
        }
        // SAFETY: length checked; Event is plain old data of integers, so any
        // bit pattern is valid; read_unaligned copes with any alignment.
        let ev = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
        let cap = (ev.len_cap as usize).min(EVENT_DATA_LEN).min(bytes.len() - n);
        Some((ev, &bytes[n..n + cap]))
    }
}

/// Every mirrored struct's layout, for the BTF check.
pub fn all_layouts() -> Vec<(&'static str, usize, Vec<(&'static str, usize, usize)>)> {
    fn one<T: Layout>() -> (&'static str, usize, Vec<(&'static str, usize, usize)>) {
        (T::C_NAME, T::SIZE, T::fields())
    }
    vec![
        one::<EndpointInfo>(),
        one::<Ip6Key>(),
        one::<IpcacheKey>(),
        one::<Ipcache6Key>(),
        one::<IpcacheValue>(),
        one::<PolicyKey>(),
        one::<PolicyEntry>(),
        one::<CtKey>(),
        one::<Ct6Key>(),
        one::<CtEntry>(),
        one::<RuntimeConfig>(),
        one::<MetricsValue>(),
        one::<Event>(),
        one::<EventCapture>(),
        one::<Lb4Key>(),
        one::<Lb4Service>(),
        one::<Lb4Backend>(),
        one::<Lb4ReverseNat>(),
        one::<LbMaglevKey>(),
        one::<LbAffinityKey>(),
        one::<LbAffinityValue>(),
        one::<LbSockKey>(),
        one::<Lb4NatKey>(),
        one::<Lb4NatEntry>(),
        one::<Lb4SrcRangeKey>(),
    ]
}
