//! Numeric codes shared with the datapath, with upstream's names.

/// A C enum mirrored in Rust: its name and every (C name, value).
pub trait AbiEnum {
    const C_NAME: &'static str;
    fn c_variants() -> Vec<(&'static str, i64)>;
}

macro_rules! abi_enum {
    ($(#[$meta:meta])* $name:ident : $repr:ty = $cname:literal {
        $($(#[$vmeta:meta])* $variant:ident = $value:literal => $c:literal),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),*
        }

        impl $name {
            /// All variants.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The variant with this numeric value.
            pub fn from_code(code: $repr) -> Option<Self> {
                match code {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// The numeric value.
            pub fn code(self) -> $repr {
                self as $repr
            }
        }

        impl AbiEnum for $name {
            const C_NAME: &'static str = $cname;
            fn c_variants() -> Vec<(&'static str, i64)> {
                vec![$(($c, $value)),*]
            }
        }
    };
}

abi_enum!(
    /// Reserved security identities.
    ReservedIdentity: u32 = "reserved_identity" {
        Unknown = 0 => "IDENTITY_UNKNOWN",
        Host = 1 => "IDENTITY_HOST",
        World = 2 => "IDENTITY_WORLD",
        Unmanaged = 3 => "IDENTITY_UNMANAGED",
        Health = 4 => "IDENTITY_HEALTH",
        Init = 5 => "IDENTITY_INIT",
        RemoteNode = 6 => "IDENTITY_REMOTE_NODE",
        KubeApiserver = 7 => "IDENTITY_KUBE_APISERVER",
        Ingress = 8 => "IDENTITY_INGRESS",
        WorldIpv6 = 10 => "IDENTITY_WORLD_IPV6",
    }
);

impl ReservedIdentity {
    /// The label value after `reserved:` (upstream spelling).
    pub fn label(self) -> &'static str {
        match self {
            ReservedIdentity::Unknown => "unknown",
            ReservedIdentity::Host => "host",
            ReservedIdentity::World => "world",
            ReservedIdentity::Unmanaged => "unmanaged",
            ReservedIdentity::Health => "health",
            ReservedIdentity::Init => "init",
            ReservedIdentity::RemoteNode => "remote-node",
            ReservedIdentity::KubeApiserver => "kube-apiserver",
            ReservedIdentity::Ingress => "ingress",
            ReservedIdentity::WorldIpv6 => "world-ipv6",
        }
    }
}

abi_enum!(
    /// Why the datapath dropped a packet: upstream's codes.
    DropReason: u8 = "drop_reason" {
        InvalidSourceIp = 132 => "DROP_INVALID_SIP",
        PolicyDenied = 133 => "DROP_POLICY",
        InvalidPacket = 134 => "DROP_INVALID",
        CtInvalidHeader = 135 => "DROP_CT_INVALID_HDR",
        CtUnknownL4Protocol = 137 => "DROP_CT_UNKNOWN_PROTO",
        UnsupportedL3Protocol = 139 => "DROP_UNKNOWN_L3",
        WriteError = 141 => "DROP_WRITE_ERROR",
        UnknownL4Protocol = 142 => "DROP_UNKNOWN_L4",
        CtMapInsertionFailed = 155 => "DROP_CT_CREATE_FAILED",
        FragmentationNotSupported = 157 => "DROP_FRAG_NOSUPPORT",
        NoService = 158 => "DROP_NO_SERVICE",
        NoTunnelEndpoint = 160 => "DROP_NO_TUNNEL_ENDPOINT",
        NoConfiguration = 165 => "DROP_NO_CONFIG",
        FibLookupFailed = 169 => "DROP_NO_FIB",
        NotInSourceRange = 177 => "DROP_NOT_IN_SRC_RANGE",
        ProxyLookupFailed = 178 => "DROP_PROXY_LOOKUP_FAILED",
        PolicyDeny = 181 => "DROP_POLICY_DENY",
    }
);

impl DropReason {
    /// Name in Hubble's flow API (flow.proto DropReason).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::InvalidSourceIp => "INVALID_SOURCE_IP",
            DropReason::PolicyDenied => "POLICY_DENIED",
            DropReason::InvalidPacket => "INVALID_PACKET_DROPPED",
            DropReason::CtInvalidHeader => "CT_TRUNCATED_OR_INVALID_HEADER",
            DropReason::CtUnknownL4Protocol => "CT_UNKNOWN_L4_PROTOCOL",
            DropReason::UnsupportedL3Protocol => "UNSUPPORTED_L3_PROTOCOL",
            DropReason::WriteError => "ERROR_WRITING_TO_PACKET",
            DropReason::UnknownL4Protocol => "UNKNOWN_L4_PROTOCOL",
            DropReason::CtMapInsertionFailed => "CT_MAP_INSERTION_FAILED",
            DropReason::FragmentationNotSupported => "IP_FRAGMENTATION_NOT_SUPPORTED",
            DropReason::NoService => "SERVICE_BACKEND_NOT_FOUND",
            DropReason::NoTunnelEndpoint => "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
            DropReason::NotInSourceRange => "NOT_IN_SOURCE_RANGE",
            DropReason::NoConfiguration => "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
            DropReason::FibLookupFailed => "FIB_LOOKUP_FAILED",
            DropReason::ProxyLookupFailed => "PROXY_LOOKUP_FAILED",
            DropReason::PolicyDeny => "POLICY_DENY",
        }
    }

    /// Human description, as `cilium monitor` prints it.
    pub fn description(self) -> &'static str {
        match self {
            DropReason::InvalidSourceIp => "Invalid source ip",
            DropReason::PolicyDenied => "Policy denied",
            DropReason::InvalidPacket => "Invalid packet",
            DropReason::CtInvalidHeader => "CT: Truncated or invalid header",
            DropReason::CtUnknownL4Protocol => "CT: Unknown L4 protocol",
            DropReason::UnsupportedL3Protocol => "Unsupported L3 protocol",
            DropReason::WriteError => "Error writing to packet",
            DropReason::UnknownL4Protocol => "Unknown L4 protocol",
            DropReason::CtMapInsertionFailed => "CT: Map insertion failed",
            DropReason::FragmentationNotSupported => "Fragmented packet not supported",
            DropReason::NoService => "Service backend not found",
            DropReason::NoTunnelEndpoint => "No tunnel/encapsulation endpoint",
            DropReason::NotInSourceRange => "Not in source range",
            DropReason::NoConfiguration => "No configuration available to perform policy decision",
            DropReason::FibLookupFailed => "FIB lookup failed",
            DropReason::ProxyLookupFailed => "Proxy lookup failed (L7 rules cannot be enforced)",
            DropReason::PolicyDeny => "Policy denied by denylist",
        }
    }
}

abi_enum!(
    /// Record types on the event ring buffer.
    EventType: u8 = "event_type" {
        Drop = 1 => "EVENT_DROP",
        Trace = 4 => "EVENT_TRACE",
        PolicyVerdict = 5 => "EVENT_POLICY_VERDICT",
    }
);

abi_enum!(
    /// Where a trace event was observed.
    TracePoint: u8 = "trace_point" {
        ToLxc = 0 => "TRACE_TO_LXC",
        ToProxy = 1 => "TRACE_TO_PROXY",
        ToHost = 2 => "TRACE_TO_HOST",
        ToStack = 3 => "TRACE_TO_STACK",
        ToOverlay = 4 => "TRACE_TO_OVERLAY",
        FromLxc = 5 => "TRACE_FROM_LXC",
        FromProxy = 6 => "TRACE_FROM_PROXY",
        FromHost = 7 => "TRACE_FROM_HOST",
        FromStack = 8 => "TRACE_FROM_STACK",
        FromOverlay = 9 => "TRACE_FROM_OVERLAY",
        FromNetwork = 10 => "TRACE_FROM_NETWORK",
        ToNetwork = 11 => "TRACE_TO_NETWORK",
    }
);

impl TracePoint {
    /// Upstream's observation point name (`to-endpoint`, `from-endpoint`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TracePoint::ToLxc => "to-endpoint",
            TracePoint::ToProxy => "to-proxy",
            TracePoint::ToHost => "to-host",
            TracePoint::ToStack => "to-stack",
            TracePoint::ToOverlay => "to-overlay",
            TracePoint::FromLxc => "from-endpoint",
            TracePoint::FromProxy => "from-proxy",
            TracePoint::FromHost => "from-host",
            TracePoint::FromStack => "from-stack",
            TracePoint::FromOverlay => "from-overlay",
            TracePoint::FromNetwork => "from-network",
            TracePoint::ToNetwork => "to-network",
        }
    }
}

abi_enum!(
    /// How much the endpoint programs trace (upstream's --monitor-aggregation).
    MonitorAggregation: u32 = "monitor_aggregation" {
        /// Every packet, where it leaves a pod (from-endpoint, in to-stack's
        /// place) and where it reaches one (to-endpoint).
        None = 0 => "MONITOR_AGGREGATION_NONE",
        /// Every packet, only where it goes (to-endpoint, to-stack, to-network).
        Lowest = 1 => "MONITOR_AGGREGATION_LOWEST",
        /// As lowest.
        Low = 2 => "MONITOR_AGGREGATION_LOW",
        /// Where it goes, only packets that open, close or reset a connection.
        Medium = 3 => "MONITOR_AGGREGATION_MEDIUM",
        /// As medium.
        Maximum = 4 => "MONITOR_AGGREGATION_MAXIMUM",
    }
);

impl MonitorAggregation {
    /// Upstream's names and numbers: none (disabled), lowest, low, medium,
    /// max (maximum), or 0 to 4.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "none" | "disabled" | "0" => MonitorAggregation::None,
            "lowest" | "1" => MonitorAggregation::Lowest,
            "low" | "2" => MonitorAggregation::Low,
            "medium" | "3" => MonitorAggregation::Medium,
            "max" | "maximum" | "4" => MonitorAggregation::Maximum,
            _ => return None,
        })
    }
}

abi_enum!(
    /// Which part of a policy entry matched.
    PolicyMatch: u8 = "policy_match" {
        None = 0 => "POLICY_MATCH_NONE",
        L3Only = 1 => "POLICY_MATCH_L3_ONLY",
        L3L4 = 2 => "POLICY_MATCH_L3_L4",
        L4Only = 3 => "POLICY_MATCH_L4_ONLY",
        All = 4 => "POLICY_MATCH_ALL",
    }
);

impl PolicyMatch {
    /// Upstream's spelling in `cilium monitor` and Hubble.
    pub fn name(self) -> &'static str {
        match self {
            PolicyMatch::None => "none",
            PolicyMatch::L3Only => "L3-Only",
            PolicyMatch::L3L4 => "L3-L4",
            PolicyMatch::L4Only => "L4-Only",
            PolicyMatch::All => "all",
        }
    }
}

abi_enum!(
    /// Flags of an [`crate::Event`].
    EventFlag: u8 = "event_flags" {
        Ingress = 1 => "EVENT_F_INGRESS",
        Reply = 2 => "EVENT_F_REPLY",
        Audit = 4 => "EVENT_F_AUDIT",
        Related = 8 => "EVENT_F_RELATED",
    }
);

abi_enum!(
    /// Flags of an [`crate::EndpointInfo`].
    EndpointFlag: u16 = "endpoint_flags" {
        IngressEnforce = 1 => "EP_F_INGRESS_ENFORCE",
        EgressEnforce = 2 => "EP_F_EGRESS_ENFORCE",
        Audit = 4 => "EP_F_AUDIT",
        PolicyGen = 8 => "EP_F_POLICY_GEN",
        ExtendedProtocols = 16 => "EP_F_EXTENDED_PROTOCOLS",
    }
);

abi_enum!(
    /// Flags of a [`crate::PolicyEntry`].
    PolicyEntryFlag: u8 = "policy_entry_flags" {
        Deny = 1 => "POLICY_F_DENY",
    }
);

abi_enum!(
    /// Flags of a [`crate::CtEntry`].
    CtEntryFlag: u16 = "ct_entry_flags" {
        TxClosing = 1 => "CT_F_TX_CLOSING",
        RxClosing = 2 => "CT_F_RX_CLOSING",
        SeenReply = 4 => "CT_F_SEEN_REPLY",
        Egress = 8 => "CT_F_EGRESS",
        Pair = 16 => "CT_F_PAIR",
        PeerVerdict = 32 => "CT_F_PEER_VERDICT",
    }
);

abi_enum!(
    /// Flags of a service entry.
    LbFlag: u8 = "lb_flags" {
        Affinity = 1 => "LB_F_AFFINITY",
        Maglev = 2 => "LB_F_MAGLEV",
        SourceRange = 4 => "LB_F_SRC_RANGE",
    }
);

abi_enum!(
    /// Which way a cilium_lb4_nat entry translates.
    LbNatDir: u8 = "lb_nat_dir" {
        Forward = 0 => "LB_NAT_FWD",
        Reverse = 1 => "LB_NAT_REV",
        SnatForward = 2 => "LB_NAT_SNAT_FWD",
        SnatReverse = 3 => "LB_NAT_SNAT_REV",
        MasqForward = 4 => "LB_NAT_MASQ_FWD",
        MasqReverse = 5 => "LB_NAT_MASQ_REV",
    }
);

abi_enum!(
    /// Flags of a backend.
    LbBackendFlag: u8 = "lb_backend_flags" {
        Terminating = 1 => "LB_BACKEND_F_TERMINATING",
    }
);

abi_enum!(
    /// Direction of a metrics entry.
    MetricDir: u8 = "metric_dir" {
        Ingress = 1 => "METRIC_INGRESS",
        Egress = 2 => "METRIC_EGRESS",
    }
);

/// LPM prefix length of a policy key that matches an identity on any protocol.
pub const POLICY_PREFIX_L3: u32 = 64;
/// LPM prefix length of a policy key that matches an identity and protocol, any port.
pub const POLICY_PREFIX_PROTO: u32 = 80;
/// LPM prefix length of a fully specified policy key.
pub const POLICY_PREFIX_FULL: u32 = 96;
/// Proxy port of an entry whose L7 rules cannot be enforced yet: the
/// datapath drops matching traffic (178) instead of allowing it unfiltered.
pub const POLICY_PROXY_PORT_PENDING: u16 = 0xffff;

/// Node-local identities (CIDR, FQDN) start here (the identity crate's
/// MIN_LOCAL_IDENTITY).
pub const IDENTITY_MIN_LOCAL: u32 = 1 << 24;
/// Node-local identities of other nodes with labels (upstream's
/// remote-node scope) start here and end before 3 << 24.
pub const IDENTITY_MIN_REMOTE_NODE: u32 = 2 << 24;

/// The host endpoint (`--enable-host-firewall`): its endpoint ID (never
/// given to a pod) and its key in the endpoint table (no interface has
/// ifindex 0).
pub const HOST_ENDPOINT_ID: u16 = 65535;
pub const HOST_ENDPOINT_IFINDEX: u32 = 0;

/// The transparent L7 proxy's listening ports (see bpf/lib/abi.h).
pub const PROXY_PORT_HTTP_INGRESS: u16 = 15001;
pub const PROXY_PORT_HTTP_EGRESS: u16 = 15002;
/// The Kafka proxy.
pub const PROXY_PORT_KAFKA_INGRESS: u16 = 15011;
pub const PROXY_PORT_KAFKA_EGRESS: u16 = 15012;
/// The DNS proxy (UDP and TCP).
pub const PROXY_PORT_DNS: u16 = 15053;

/// skb marks (mask [`MARK_MAGIC_MASK`]).
pub const MARK_MAGIC_MASK: u32 = 0xF00;
/// Routes a packet to the local stack and the socket assigned to it.
pub const MARK_MAGIC_TO_PROXY: u32 = 0x200;
/// A packet the node's stack sent to a local endpoint, turned back into the
/// endpoint device's ingress for the L7 proxy (proxy port in the upper 16
/// bits).
pub const MARK_MAGIC_REINJECT: u32 = 0x300;
/// A packet the service load balancer translated and sends on from a tc
/// ingress (to another node's backend, or a reply back to the client): not
/// the node's own traffic for the host firewall.
pub const MARK_MAGIC_NODEPORT: u32 = 0x500;
/// What the proxy sends; upstream connections carry the client's identity
/// in the upper 16 bits.
pub const MARK_MAGIC_PROXY: u32 = 0xA00;
/// `gen_dir` bit of a policy key: egress.
pub const POLICY_KEY_DIR_EGRESS: u8 = 1;
/// `gen_dir` bit of a policy key: generation 1.
pub const POLICY_KEY_GEN: u8 = 2;

/// Every mirrored enum, for the BTF check.
pub fn all_enums() -> Vec<(&'static str, Vec<(&'static str, i64)>)> {
    fn one<T: AbiEnum>() -> (&'static str, Vec<(&'static str, i64)>) {
        (T::C_NAME, T::c_variants())
    }
    vec![
        one::<ReservedIdentity>(),
        one::<DropReason>(),
        one::<EventType>(),
        one::<TracePoint>(),
        one::<MonitorAggregation>(),
        one::<PolicyMatch>(),
        one::<EventFlag>(),
        one::<EndpointFlag>(),
        one::<PolicyEntryFlag>(),
        one::<CtEntryFlag>(),
        one::<MetricDir>(),
        one::<LbFlag>(),
        one::<LbBackendFlag>(),
        one::<LbNatDir>(),
    ]
}

/// `#define` constants of abi.h mirrored above, as (name, value), checked
/// against the header text by the datapath's tests (BTF does not carry macros).
pub fn all_defines() -> Vec<(&'static str, i64)> {
    vec![
        ("POLICY_PREFIX_L3", POLICY_PREFIX_L3 as i64),
        ("POLICY_PREFIX_PROTO", POLICY_PREFIX_PROTO as i64),
        ("POLICY_PREFIX_FULL", POLICY_PREFIX_FULL as i64),
        ("POLICY_KEY_DIR_EGRESS", POLICY_KEY_DIR_EGRESS as i64),
        ("POLICY_KEY_GEN", POLICY_KEY_GEN as i64),
        ("POLICY_PROXY_PORT_PENDING", POLICY_PROXY_PORT_PENDING as i64),
        ("PROXY_PORT_HTTP_INGRESS", PROXY_PORT_HTTP_INGRESS as i64),
        ("PROXY_PORT_HTTP_EGRESS", PROXY_PORT_HTTP_EGRESS as i64),
        ("PROXY_PORT_KAFKA_INGRESS", PROXY_PORT_KAFKA_INGRESS as i64),
        ("PROXY_PORT_KAFKA_EGRESS", PROXY_PORT_KAFKA_EGRESS as i64),
        ("PROXY_PORT_DNS", PROXY_PORT_DNS as i64),
        ("IDENTITY_MIN_LOCAL", IDENTITY_MIN_LOCAL as i64),
        ("IDENTITY_MIN_REMOTE_NODE", IDENTITY_MIN_REMOTE_NODE as i64),
        ("HOST_ENDPOINT_ID", HOST_ENDPOINT_ID as i64),
        ("HOST_ENDPOINT_IFINDEX", HOST_ENDPOINT_IFINDEX as i64),
        ("MARK_MAGIC_MASK", MARK_MAGIC_MASK as i64),
        ("MARK_MAGIC_TO_PROXY", MARK_MAGIC_TO_PROXY as i64),
        ("MARK_MAGIC_REINJECT", MARK_MAGIC_REINJECT as i64),
        ("MARK_MAGIC_NODEPORT", MARK_MAGIC_NODEPORT as i64),
        ("MARK_MAGIC_PROXY", MARK_MAGIC_PROXY as i64),
        ("EVENT_DATA_LEN", crate::EVENT_DATA_LEN as i64),
        ("EVENT_STATS_LOST", 0),
        ("METRICS_DIR_BITS", crate::METRICS_DIR_BITS as i64),
        ("METRICS_MAX_ENTRIES", crate::METRICS_MAX_ENTRIES as i64),
    ]
}
