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
                vec![$((stringify!($field), core::mem::offset_of!($name, $field), core::mem::size_of::<$ty>())),*]
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
    /// cilium_ct4 key.
    CtKey = "ct_key" {
        saddr: u32,
        daddr: u32,
        sport: u16,
        dport: u16,
        protocol: u8,
        dir: u8,
        pad: u16,
    }
);

abi_struct!(
    /// cilium_ct4 value.
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
        rev_nat_index: u16,
        pad: u32,
    }
);

abi_struct!(
    /// cilium_runtime value (index 0).
    RuntimeConfig = "runtime_config" {
        policy_rev: u32,
        pad: u32,
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

/// Bytes of packet captured with each event.
pub const EVENT_DATA_LEN: usize = 128;

/// One record of the cilium_events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub r#type: u8,
    pub subtype: u8,
    pub source_ep: u16,
    pub ifindex: u32,
    pub ktime_ns: u64,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub len_orig: u32,
    pub len_cap: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub flags: u8,
    pub match_type: u8,
    pub pad0: u8,
    pub verdict: i32,
    pub proxy_port: u16,
    pub pad1: u16,
    pub pad2: u32,
    pub data: [u8; EVENT_DATA_LEN],
}

impl Layout for Event {
    const C_NAME: &'static str = "event";
    const SIZE: usize = core::mem::size_of::<Event>();
    fn fields() -> Vec<(&'static str, usize, usize)> {
        macro_rules! f {
            ($f:ident, $n:literal) => {
                ($n, core::mem::offset_of!(Event, $f), size_of_field(|e: &Event| &e.$f))
            };
        }
        vec![
            f!(r#type, "type"),
            f!(subtype, "subtype"),
            f!(source_ep, "source_ep"),
            f!(ifindex, "ifindex"),
            f!(ktime_ns, "ktime_ns"),
            f!(src_identity, "src_identity"),
            f!(dst_identity, "dst_identity"),
            f!(len_orig, "len_orig"),
            f!(len_cap, "len_cap"),
            f!(dst_port, "dst_port"),
            f!(protocol, "protocol"),
            f!(flags, "flags"),
            f!(match_type, "match_type"),
            f!(pad0, "pad0"),
            f!(verdict, "verdict"),
            f!(proxy_port, "proxy_port"),
            f!(pad1, "pad1"),
            f!(pad2, "pad2"),
            f!(data, "data"),
        ]
    }
}

fn size_of_field<T, F>(_: impl Fn(&T) -> &F) -> usize {
    core::mem::size_of::<F>()
}

impl Event {
    /// Decodes a ring buffer record. Returns `None` when it is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        if bytes.len() < core::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: length checked; Event is plain old data of integers, so any
        // bit pattern is valid; read_unaligned copes with any alignment.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
    }

    /// The captured packet bytes (from the Ethernet header).
    pub fn packet(&self) -> &[u8] {
        &self.data[..(self.len_cap as usize).min(EVENT_DATA_LEN)]
    }
}

/// Every mirrored struct's layout, for the BTF check.
pub fn all_layouts() -> Vec<(&'static str, usize, Vec<(&'static str, usize, usize)>)> {
    fn one<T: Layout>() -> (&'static str, usize, Vec<(&'static str, usize, usize)>) {
        (T::C_NAME, T::SIZE, T::fields())
    }
    vec![
        one::<EndpointInfo>(),
        one::<IpcacheKey>(),
        one::<IpcacheValue>(),
        one::<PolicyKey>(),
        one::<PolicyEntry>(),
        one::<CtKey>(),
        one::<CtEntry>(),
        one::<RuntimeConfig>(),
        one::<MetricsValue>(),
        one::<Event>(),
    ]
}
