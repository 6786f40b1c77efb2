/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The ABI between the datapath and the agent: every type stored in a map or
 * sent on the event ring buffer, and every numeric code either side reads.
 *
 * This header is the single definition. crates/abi mirrors it in Rust and a
 * test of crates/datapath checks every size, offset and enum value against the
 * BTF of the compiled object, so the two sides cannot drift apart silently.
 *
 * Rules: fixed-width types only, explicit padding, no bool, no bitfields.
 * Addresses and ports are in network byte order unless a comment says otherwise.
 */
#ifndef CILIUM_ABI_H
#define CILIUM_ABI_H

#include <linux/types.h>

/* ---- reserved identities (pkg/identity upstream) ---- */
enum reserved_identity {
	IDENTITY_UNKNOWN = 0,
	IDENTITY_HOST = 1,
	IDENTITY_WORLD = 2,
	IDENTITY_UNMANAGED = 3,
	IDENTITY_HEALTH = 4,
	IDENTITY_INIT = 5,
	IDENTITY_REMOTE_NODE = 6,
	IDENTITY_KUBE_APISERVER = 7,
	IDENTITY_INGRESS = 8,
	IDENTITY_WORLD_IPV6 = 10, /* outside the cluster, IPv6 (IPv4: IDENTITY_WORLD) */
};

/* ---- drop reasons: upstream's codes (bpf/lib/common.h, flow.proto) ---- */
enum drop_reason {
	DROP_INVALID_SIP = 132,
	DROP_POLICY = 133,
	DROP_INVALID = 134,
	DROP_CT_INVALID_HDR = 135,
	DROP_CT_UNKNOWN_PROTO = 137,
	DROP_UNKNOWN_L3 = 139,
	DROP_UNKNOWN_L4 = 142,
	DROP_WRITE_ERROR = 141,
	DROP_CT_CREATE_FAILED = 155,
	DROP_FRAG_NOSUPPORT = 157,
	DROP_NO_SERVICE = 158,
	DROP_NO_TUNNEL_ENDPOINT = 160,
	DROP_NO_CONFIG = 165,
	DROP_NO_FIB = 169,
	DROP_NOT_IN_SRC_RANGE = 177,
	DROP_PROXY_LOOKUP_FAILED = 178,
	DROP_POLICY_DENY = 181,
};

/* ---- event types on the ring buffer (pkg/monitor/api upstream) ---- */
enum event_type {
	EVENT_DROP = 1,
	EVENT_TRACE = 4,
	EVENT_POLICY_VERDICT = 5,
};

/* ---- trace observation points (TRACE_* upstream) ---- */
enum trace_point {
	TRACE_TO_LXC = 0,
	TRACE_TO_PROXY = 1,
	TRACE_TO_HOST = 2,
	TRACE_TO_STACK = 3,
	TRACE_TO_OVERLAY = 4,
	TRACE_FROM_LXC = 5,
	TRACE_FROM_PROXY = 6,
	TRACE_FROM_HOST = 7,
	TRACE_FROM_STACK = 8,
	TRACE_FROM_OVERLAY = 9,
	TRACE_FROM_NETWORK = 10,
	TRACE_TO_NETWORK = 11,
};

/* ---- policy match types, as upstream's policy-verdict notification ---- */
enum policy_match {
	POLICY_MATCH_NONE = 0,
	POLICY_MATCH_L3_ONLY = 1,
	POLICY_MATCH_L3_L4 = 2,
	POLICY_MATCH_L4_ONLY = 3,
	POLICY_MATCH_ALL = 4,
};

/* Flags of struct event. */
enum event_flags {
	EVENT_F_INGRESS = 1,     /* direction of the policy check: set = ingress */
	EVENT_F_REPLY = 2,       /* packet is a reply of a tracked connection */
	EVENT_F_AUDIT = 4,       /* verdict would drop, but the endpoint audits */
	EVENT_F_RELATED = 8,     /* ICMP error related to a tracked connection */
};

/* ---- endpoint table: host-side ifindex -> endpoint ---- */
enum endpoint_flags {
	EP_F_INGRESS_ENFORCE = 1,
	EP_F_EGRESS_ENFORCE = 2,
	EP_F_AUDIT = 4,
	EP_F_POLICY_GEN = 8,     /* which generation of policy entries is live */
	EP_F_EXTENDED_PROTOCOLS = 16, /* IP protocols beyond TCP/UDP/SCTP/ICMP pass, under policy */
};

struct endpoint_info {
	__u32 ifindex;           /* host-side veth (lxc...) */
	__u32 ipv4;              /* network byte order */
	__u32 sec_identity;
	__u16 ep_id;
	__u16 flags;             /* enum endpoint_flags */
	__u8 mac[6];             /* pod-side MAC */
	__u8 node_mac[6];        /* host-side MAC */
	__u8 ipv6[16];           /* all zero: the endpoint has no IPv6 address */
};

/* cilium_lxc_ip6 key: a local endpoint's IPv6 address */
struct ip6_key {
	__u8 addr[16];
};

/* ---- ipcache: LPM prefix -> identity (and tunnel endpoint for multi-node) ---- */
struct ipcache_key {
	__u32 prefixlen;         /* LPM prefix over addr */
	__u32 addr;              /* IPv4, network byte order */
};

/* cilium_ipcache6 key: the same for IPv6 prefixes */
struct ipcache6_key {
	__u32 prefixlen;         /* LPM prefix over addr */
	__u8 addr[16];
};

struct ipcache_value {
	__u32 sec_identity;
	__u32 tunnel_endpoint;   /* IPv4 of the owning node, 0 when local or none */
	__u16 flags;
	__u16 pad;
};

/*
 * ---- policy: one LPM trie for all endpoints ----
 * The LPM data (everything after prefixlen) is compared bit by bit from the
 * first byte: ep_id, gen_dir, pad0, identity, protocol, pad1, dport.
 *   prefixlen 64         : identity, any protocol and port (L3)
 *   prefixlen 80         : identity and protocol, any port
 *   prefixlen 80 + n     : identity, protocol and the first n bits of dport
 * identity 0 is the wildcard, looked up as a second key.
 * gen_dir bit 0: 1 = egress; bit 1: policy generation (see EP_F_POLICY_GEN).
 */
struct policy_key {
	__u32 prefixlen;
	__u16 ep_id;             /* host byte order, but always fully matched */
	__u8 gen_dir;
	__u8 pad0;
	__u32 identity;          /* host byte order, fully matched or 0 */
	__u8 protocol;           /* IPPROTO_*; 0 only when prefixlen is 64 */
	__u8 pad1;
	__u16 dport;             /* network byte order; ICMP: type */
};

#define POLICY_PREFIX_L3 64
#define POLICY_PREFIX_PROTO 80
#define POLICY_PREFIX_FULL 96
#define POLICY_KEY_DIR_EGRESS 1
#define POLICY_KEY_GEN 2

enum policy_entry_flags {
	POLICY_F_DENY = 1,
};

/* proxy_port of an entry whose L7 rules cannot be enforced yet: matching
 * traffic is dropped (178) rather than allowed unfiltered. */
#define POLICY_PROXY_PORT_PENDING 65535

/* Node-local identities (CIDR, FQDN) start here. */
#define IDENTITY_MIN_LOCAL 16777216
/* Node-local identities of other nodes by their labels (fromNodes/toNodes)
 * start here, up to 3 << 24. */
#define IDENTITY_MIN_REMOTE_NODE 33554432
#define IDENTITY_END_REMOTE_NODE 50331648

/* The host endpoint (host firewall): endpoint ID of its policy entries, and
 * its key in cilium_lxc (no interface has ifindex 0). No entry: no host
 * firewall. */
#define HOST_ENDPOINT_ID 65535
#define HOST_ENDPOINT_IFINDEX 0

/* The agent's transparent L7 proxy listens on these ports (host byte order);
 * a policy entry's proxy_port names one of them. */
#define PROXY_PORT_HTTP_INGRESS 15001
#define PROXY_PORT_HTTP_EGRESS 15002
#define PROXY_PORT_KAFKA_INGRESS 15011
#define PROXY_PORT_KAFKA_EGRESS 15012
#define PROXY_PORT_DNS 15053

/* skb marks, as upstream's (mask 0xF00). TO_PROXY routes a packet to the
 * local stack, where the socket assigned to it takes it (the agent's
 * policy rule: fwmark 0x200/0xF00 lookup 2005, local default). PROXY marks
 * what the proxy sends (its listener's replies, its upstream connections);
 * the upper 16 bits carry the client's identity on upstream connections.
 * REINJECT marks a packet the node's stack sent to a local endpoint that
 * its ingress L7 rules send to the proxy: it is turned back into the
 * endpoint device's ingress, the proxy port (host order) in the upper 16
 * bits. NODEPORT marks what the service load balancer translated and sends
 * on from a tc ingress: at the egress device it is not the node's own
 * traffic (the host firewall leaves it alone). */
#define MARK_MAGIC_MASK 0xF00
#define MARK_MAGIC_TO_PROXY 0x200
#define MARK_MAGIC_REINJECT 0x300
#define MARK_MAGIC_NODEPORT 0x500
#define MARK_MAGIC_PROXY 0xA00

struct policy_entry {
	__u16 proxy_port;        /* network byte order, 0 = no L7 redirect */
	__u8 flags;              /* enum policy_entry_flags */
	__u8 match_type;         /* enum policy_match, for the verdict event */
	__u32 pad;
};

/* ---- connection tracking ----
 * One entry per connection per endpoint, keyed from the endpoint's side
 * (its own address and port first), so both directions of a connection find
 * the same entry with a single lookup. */
struct ct_key {
	__u32 local;             /* the endpoint's address, network byte order */
	__u32 remote;            /* the peer's address */
	__u16 lport;             /* network byte order; ICMP echo: identifier */
	__u16 rport;
	__u8 protocol;
	__u8 pad0;
	__u16 pad1;
};

/* cilium_ct6 key: the same for IPv6 connections (the value is a ct_entry) */
struct ct6_key {
	__u8 local[16];
	__u8 remote[16];
	__u16 lport;
	__u16 rport;
	__u8 protocol;
	__u8 pad0;
	__u16 pad1;
};

enum ct_entry_flags {
	CT_F_TX_CLOSING = 1,
	CT_F_RX_CLOSING = 2,
	CT_F_SEEN_REPLY = 4,
	CT_F_EGRESS = 8,         /* the key's local side opened it (the endpoint's
				  * egress hook created it) */
	CT_F_PAIR = 16,          /* a connection between two endpoints of this node:
				  * one entry for both (see conntrack.h) */
	CT_F_PEER_VERDICT = 32,  /* a pair's: the accepting endpoint's ingress verdict
				  * is in peer_policy_rev and peer_proxy_port */
};

struct ct_entry {
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 rx_bytes;
	__u32 lifetime;          /* CLOCK_MONOTONIC seconds at which it expires */
	__u32 src_sec_id;        /* identity of the connection's originator */
	__u32 policy_rev;        /* runtime.policy_rev when the verdict was taken */
	__u16 flags;             /* enum ct_entry_flags */
	__u8 tx_flags_seen;      /* SYN/FIN/RST seen (and traced) from the originator */
	__u8 rx_flags_seen;      /* SYN/FIN/RST seen (and traced) in replies */
	__u16 proxy_port;        /* network byte order */
	__u16 peer_proxy_port;   /* a pair's: the acceptor's ingress redirect */
	__u32 peer_policy_rev;   /* a pair's: the acceptor's ingress verdict revision */
};

/* Global runtime state, array index 0. */
struct runtime_config {
	__u32 policy_rev;        /* bumped by the agent on every policy or ipcache change */
	__u32 maglev_size;       /* slots of every Maglev table (a prime) */
	__u32 masq_addr;         /* node IPv4 pods' traffic to the world leaves from
				  * (network byte order); 0: no masquerading */
	__u32 monitor_aggregation; /* enum monitor_aggregation */
};

/* How much enforce() traces (upstream's --monitor-aggregation levels). From
 * LOWEST on, a packet is traced where it goes (to-endpoint, to-stack,
 * to-network), not also where it leaves a pod (from-endpoint, which takes
 * to-stack's place at NONE); from MEDIUM on, only a connection's first
 * packet and those showing TCP flags SYN, FIN or RST not seen before in
 * their direction. to-proxy traces, drops and policy verdicts do not
 * depend on it. */
enum monitor_aggregation {
	MONITOR_AGGREGATION_NONE = 0,
	MONITOR_AGGREGATION_LOWEST = 1,
	MONITOR_AGGREGATION_LOW = 2,
	MONITOR_AGGREGATION_MEDIUM = 3,
	MONITOR_AGGREGATION_MAXIMUM = 4,
};

/* ---- service load balancing ----
 * cilium_lb4_services holds, per frontend, a service entry (backend_slot 0,
 * with the number of active backends) and one entry per active backend
 * (slots 1..count). Backends are shared by ID; terminating backends have no
 * slot but stay in cilium_lb4_backends, so their connections continue. */
struct lb4_key {
	__u32 address;           /* frontend IPv4, network byte order */
	__u16 dport;             /* network byte order */
	__u16 backend_slot;      /* 0: the service entry */
	__u8 proto;
	__u8 scope;              /* 0 (reserved for traffic policies) */
	__u16 pad;
};

enum lb_flags {
	LB_F_AFFINITY = 1,       /* ClientIP session affinity */
	LB_F_MAGLEV = 2,         /* backends picked from cilium_lb4_maglev */
	LB_F_SRC_RANGE = 4,      /* clients must match cilium_lb4_source_range */
};

struct lb4_service {
	__u32 backend_id;        /* backend slots: the backend */
	__u16 count;             /* service entry: active backends */
	__u16 rev_nat_index;     /* the service's ID (in every slot) */
	__u32 affinity_timeout;  /* seconds */
	__u8 flags;              /* enum lb_flags */
	__u8 pad0;
	__u16 pad1;
};

enum lb_backend_flags {
	LB_BACKEND_F_TERMINATING = 1, /* keeps its connections, gets no new ones */
};

struct lb4_backend {
	__u32 address;           /* network byte order */
	__u16 port;              /* network byte order */
	__u8 proto;
	__u8 flags;              /* enum lb_backend_flags */
};

struct lb4_reverse_nat {
	__u32 address;           /* the frontend, network byte order */
	__u16 port;              /* network byte order */
	__u16 pad;
};

struct lb_maglev_key {
	__u16 rev_nat_index;
	__u16 pad;
	__u32 slot;              /* 0..maglev_size-1 */
};

struct lb_affinity_key {
	__u64 client;            /* socket LB: the client's network namespace cookie */
	__u16 rev_nat_index;
	__u16 pad0;
	__u32 pad1;
};

struct lb_affinity_value {
	__u32 backend_id;
	__u32 last_used;         /* CLOCK_MONOTONIC seconds */
};

/* Per-packet load balancing (tc on the node's devices): one entry per
 * direction of a translated flow. Forward: client -> frontend gives the
 * backend; reverse: backend -> client gives the frontend to restore. */
enum lb_nat_dir {
	LB_NAT_FWD = 0,          /* client -> frontend: the backend */
	LB_NAT_REV = 1,          /* local backend -> client: the frontend */
	LB_NAT_SNAT_FWD = 2,     /* client -> frontend, remote backend: the source to use */
	LB_NAT_SNAT_REV = 3,     /* remote backend -> the source used: the client */
	LB_NAT_MASQ_FWD = 4,     /* pod -> world: the node address and port used */
	LB_NAT_MASQ_REV = 5,     /* world -> node address and port used: the pod */
};

struct lb4_nat_key {
	__u32 saddr;             /* network byte order */
	__u32 daddr;
	__u16 sport;             /* network byte order */
	__u16 dport;
	__u8 proto;
	__u8 dir;                /* enum lb_nat_dir */
	__u16 pad;
};

struct lb4_nat_entry {
	__u32 addr;              /* fwd: the backend; rev: the frontend; snat fwd: the
				  * source address used; snat rev: the client */
	__u16 port;              /* network byte order, likewise */
	__u16 rev_nat_index;     /* the service's ID */
	__u32 backend_id;        /* fwd: the backend; snat fwd: the backend's address;
				  * snat rev: the frontend port (network byte order) */
	__u32 last_seen;         /* CLOCK_MONOTONIC seconds */
};

/* loadBalancerSourceRanges: (service, client prefix) -> allowed */
struct lb4_src_range_key {
	__u32 prefixlen;         /* 32 + the prefix length of addr */
	__u16 rev_nat_index;
	__u16 pad;
	__u32 addr;              /* network byte order */
};

/* A translated socket: which frontend its backend address stands for. */
struct lb_sock_key {
	__u64 cookie;            /* bpf_get_socket_cookie */
	__u32 address;           /* backend, network byte order */
	__u16 port;              /* network byte order */
	__u16 pad;
};

/* ---- metrics: packets/bytes per (reason, direction), per CPU ----
 * A per-CPU array indexed by METRICS_INDEX(reason, dir): reason 0 is
 * "forwarded", otherwise an enum drop_reason. */
enum metric_dir {
	METRIC_INGRESS = 1,
	METRIC_EGRESS = 2,
};

#define METRICS_DIR_BITS 2
#define METRICS_MAX_ENTRIES 1024
#define METRICS_INDEX(reason, dir) (((__u32)(reason) << METRICS_DIR_BITS) | (dir))

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* Index of the lost-events counter in cilium_event_stats. */
#define EVENT_STATS_LOST 0

/* ---- the event ring buffer records ----
 * Every event carries the packet's parsed tuple, which is all trace and
 * policy-verdict consumers need: copying packet bytes into every event would
 * cost more than the rest of a new connection's processing. Drops, rare and
 * worth a closer look, are followed by the first EVENT_DATA_LEN bytes of the
 * packet (struct event_capture). */
#define EVENT_DATA_LEN 128

struct event {
	__u8 type;               /* enum event_type */
	__u8 subtype;            /* drop: enum drop_reason; trace: enum trace_point */
	__u16 source_ep;         /* endpoint the hook ran for */
	__u32 ifindex;
	__u64 ktime_ns;          /* bpf_ktime_get_boot_ns */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 len_orig;          /* skb length */
	__u16 len_cap;           /* packet bytes following this header (drops) */
	__u16 dst_port;          /* policy verdict: port or ICMP type (host order) */
	__u8 protocol;           /* IPPROTO_*, 0 when the packet was not parsed */
	__u8 flags;              /* enum event_flags */
	__u8 match_type;         /* enum policy_match */
	__u8 tcp_flags;
	__s32 verdict;           /* policy verdict: 1 allowed, -reason denied */
	__u16 proxy_port;        /* host byte order */
	__u16 pad0;
	__u32 saddr;             /* the tuple: IPv4 addresses in network byte order, */
	__u32 daddr;             /* ports in host byte order (ICMP echo: id) */
	__u16 sport;
	__u16 dport;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 ip_version;         /* 4 or 6 (the addresses are saddr6/daddr6); 0: not parsed */
	__u8 pad1;
	__u32 pad2;
	__u8 saddr6[16];
	__u8 daddr6[16];
};

struct event_capture {
	struct event hdr;
	__u8 data[EVENT_DATA_LEN]; /* the packet from its Ethernet header */
};

#endif /* CILIUM_ABI_H */
