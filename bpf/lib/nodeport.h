/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-packet service load balancing on the node's devices, for clients the
 * socket-level load balancer cannot see (anything from outside the node):
 * NodePort, LoadBalancer and external IPs. The first packet of a flow picks
 * a backend and records both directions in cilium_lb4_nat. A local backend
 * keeps the client's address: the destination is rewritten on the way in
 * (tc ingress), the source on the way back out (tc egress). A backend on
 * another node gets the flow from the frontend address (SNAT, as upstream's
 * default mode), so its replies come back through this node, whose tc
 * ingress restores the client; both directions then leave by the route the
 * FIB names, straight from tc (the stack would drop a packet arriving with
 * one of the node's own addresses as its source).
 */
#ifndef CILIUM_NODEPORT_H
#define CILIUM_NODEPORT_H

#include "common.h"
#include "maps.h"
#include "events.h"
#include "lb.h"
#include "ipcache.h"

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_nat_key);
	__type(value, struct lb4_nat_entry);
	__uint(max_entries, 262144);
} cilium_lb4_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb4_src_range_key);
	__type(value, __u8);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cilium_lb4_source_range SEC(".maps");

/* Affinity keys of the per-packet path: the client address, kept apart
 * from the socket path's network namespace cookies. */
#define LB_AFFINITY_CLIENT_IP (1ULL << 63)

static __always_inline __u32 lb_maglev_size(void)
{
	__u32 idx = 0;
	struct runtime_config *rt = bpf_map_lookup_elem(&cilium_runtime, &idx);
	return rt ? rt->maglev_size : 0;
}

static __always_inline __u32 flow_hash(const struct pkt *p)
{
	__u32 h = p->saddr * 0x9e3779b1u;
	h ^= ((__u32)p->sport << 16 | p->dport) * 0x85ebca6bu;
	h ^= p->daddr * 0xc2b2ae35u;
	h ^= h >> 16;
	h *= 0x7feb352du;
	h ^= h >> 15;
	return h;
}

/* Offset of the L4 header: the IPv4 header has been parsed, so it exists. */
static __always_inline __u32 l4_offset(struct __sk_buff *skb)
{
	__u8 vihl = 0;
	bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1);
	return ETH_HLEN + (vihl & 0xf) * 4;
}

/*
 * Rewrites the source (is_src) or destination address and port of a TCP or
 * UDP packet, with its checksums. A UDP checksum of 0 (none) stays 0. For
 * an ICMP echo request or reply the "port" is the echo identifier (the
 * same field either way) and the ICMP checksum has no pseudo-header.
 */
static __always_inline int rewrite_l3l4(struct __sk_buff *skb, __u8 proto, int is_src, __u32 old_addr,
					__u32 new_addr, __u16 old_port, __u16 new_port)
{
	__u32 l4off = l4_offset(skb);
	if (proto == IPPROTO_ICMP) {
		__u32 off = ETH_HLEN + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		if (old_addr != new_addr &&
		    (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_addr, new_addr, 4) < 0 ||
		     bpf_skb_store_bytes(skb, off, &new_addr, 4, 0) < 0))
			return -DROP_WRITE_ERROR;
		if (old_port != new_port &&
		    (bpf_l4_csum_replace(skb, l4off + 2, old_port, new_port, 2) < 0 ||
		     bpf_skb_store_bytes(skb, l4off + 4, &new_port, 2, 0) < 0))
			return -DROP_WRITE_ERROR;
		return 0;
	}
	__u32 csum_off = l4off + (proto == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 addr_off = ETH_HLEN + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	__u32 port_off = l4off + (is_src ? 0 : 2);

	if (old_addr != new_addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | mangled | 4) < 0 ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_addr, new_addr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
			return -DROP_WRITE_ERROR;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2) < 0 ||
		    bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -DROP_WRITE_ERROR;
	}
	return 0;
}

static __always_inline __u16 csum_fold(__s64 csum)
{
	__u32 c = (__u32)csum;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

/* An ICMP port unreachable, from the frontend to the client, carrying the
 * offending IPv4 header and the first 8 bytes of its payload. */
struct icmp_unreach {
	struct iphdr ip;
	struct icmphdr icmp;
	struct iphdr inner;
	__u8 inner_l4[8];
};
_Static_assert(sizeof(struct icmp_unreach) == 56, "ICMP unreachable layout has no padding");

/*
 * Turns the packet into an ICMP port unreachable for its sender and sends it
 * back out of the device it came in on: a service without backends refuses
 * at once (TCP clients see ECONNREFUSED) instead of timing out.
 */
static __always_inline int reply_port_unreachable(struct __sk_buff *skb)
{
	struct ethhdr eth;
	struct icmp_unreach r = {};

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &r.inner, sizeof(r.inner)) < 0)
		return TC_ACT_SHOT;
	if (r.inner.ihl != 5)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct iphdr), r.inner_l4, sizeof(r.inner_l4)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) < 0)
		return TC_ACT_SHOT;

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = r.inner.daddr;
	r.ip.daddr = r.inner.saddr;
	r.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	r.icmp.type = ICMP_DEST_UNREACH_T;
	r.icmp.code = 3; /* port unreachable */
	r.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.icmp,
						  sizeof(r) - sizeof(r.ip), 0));

	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, tmp, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int src_range_allowed(__u16 rev_nat_index, __u32 saddr)
{
	struct lb4_src_range_key k = { .prefixlen = 64, .rev_nat_index = rev_nat_index, .addr = saddr };
	return bpf_map_lookup_elem(&cilium_lb4_source_range, &k) != 0;
}

static __always_inline int lb_drop(struct __sk_buff *skb, int reason, const struct pkt *p)
{
	emit_drop(skb, 0, (__u8)reason, IDENTITY_WORLD, 0, EVENT_F_INGRESS, p);
	metrics_update(skb, (__u8)reason, METRIC_INGRESS);
	return TC_ACT_SHOT;
}

/* Sends a translated packet out of the device, to the next hop, the FIB
 * names for it. */
static __always_inline int fib_redirect(struct __sk_buff *skb, __u32 saddr, __u32 daddr, const struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	fib.family = 2; /* AF_INET */
	fib.l4_protocol = p->protocol;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ifindex;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	skb->mark = MARK_MAGIC_NODEPORT;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
			return lb_drop(skb, DROP_WRITE_ERROR, p);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
	return lb_drop(skb, DROP_NO_FIB, p);
}

/* A remote backend's reply to a flow this node translated: back to the
 * client, from the frontend. Returns -1 when the packet is no such reply. */
static __always_inline int snat_reply(struct __sk_buff *skb, const struct pkt *p, __u32 now)
{
	struct lb4_nat_key k = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport,
				 .dport = p->dport, .proto = p->protocol, .dir = LB_NAT_SNAT_REV };
	struct lb4_nat_entry *e = bpf_map_lookup_elem(&cilium_lb4_nat, &k);
	if (!e)
		return -1;
	e->last_seen = now;
	__u32 caddr = e->addr;
	__u16 cport = e->port;
	__u16 fport = (__u16)e->backend_id;
	__u32 faddr = p->daddr;
	if (rewrite_l3l4(skb, p->protocol, 1, p->saddr, faddr, p->sport, fport) < 0 ||
	    rewrite_l3l4(skb, p->protocol, 0, p->daddr, caddr, p->dport, cport) < 0)
		return lb_drop(skb, DROP_WRITE_ERROR, p);
	return fib_redirect(skb, faddr, caddr, p);
}

/* Source ports (ICMP echo identifiers) translated flows leave the node
 * with: above the kernel's default ephemeral range (32768-60999), so a
 * translated flow never takes the port of one of the node's own
 * connections to the same peer. */
#define NAT_PORT_MIN 61000
#define NAT_PORT_COUNT 4536

/* The i-th candidate port of a flow with hash h (network order). */
static __always_inline __u16 nat_port(__u32 h, int i)
{
	return bpf_htons(NAT_PORT_MIN + (h + i * 7919) % NAT_PORT_COUNT);
}

/* The source port a flow to a remote backend leaves with: one of the NAT
 * range no other client holds towards that backend. */
static __always_inline int snat_port(const struct pkt *p, __u32 baddr, __u16 bport, __u16 rev_nat_index, __u32 now, __u16 *nport)
{
	struct lb4_nat_key fk = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport,
				  .dport = p->dport, .proto = p->protocol, .dir = LB_NAT_SNAT_FWD };
	struct lb4_nat_entry *f = bpf_map_lookup_elem(&cilium_lb4_nat, &fk);
	__u16 port = p->sport;
	if (f && f->backend_id == baddr) {
		/* the flow's port, towards the same backend: refresh its reverse
		 * entry too (the LRU may have taken it) */
		port = f->port;
		f->last_seen = now;
		struct lb4_nat_key rk = { .saddr = baddr, .daddr = p->daddr, .sport = bport, .dport = port,
					  .proto = p->protocol, .dir = LB_NAT_SNAT_REV };
		struct lb4_nat_entry r = { .addr = p->saddr, .port = p->sport, .rev_nat_index = rev_nat_index,
					   .backend_id = p->dport, .last_seen = now };
		if (bpf_map_update_elem(&cilium_lb4_nat, &rk, &r, BPF_ANY) < 0)
			return -DROP_CT_CREATE_FAILED;
		*nport = port;
		return 0;
	}
	__u32 h = flow_hash(p);
	struct lb4_nat_key rk = { .saddr = baddr, .daddr = p->daddr, .sport = bport,
				  .proto = p->protocol, .dir = LB_NAT_SNAT_REV };
	port = nat_port(h, 0);
#pragma unroll
	for (int i = 1; i <= 8; i++) {
		rk.dport = port;
		if (!bpf_map_lookup_elem(&cilium_lb4_nat, &rk))
			break;
		port = nat_port(h, i);
	}
	rk.dport = port;
	struct lb4_nat_entry r = { .addr = p->saddr, .port = p->sport, .rev_nat_index = rev_nat_index,
				   .backend_id = p->dport, .last_seen = now };
	struct lb4_nat_entry fe = { .addr = p->daddr, .port = port, .rev_nat_index = rev_nat_index,
				    .backend_id = baddr, .last_seen = now };
	if (bpf_map_update_elem(&cilium_lb4_nat, &rk, &r, BPF_NOEXIST) < 0 ||
	    bpf_map_update_elem(&cilium_lb4_nat, &fk, &fe, BPF_ANY) < 0)
		return -DROP_CT_CREATE_FAILED;
	*nport = port;
	return 0;
}

/* nodeport_ingress translated the packet to a backend of this node (p
 * now names it). */
#define NODEPORT_LOCAL (-2)

/* tc ingress of a node device: translate packets to a service frontend. */
static __always_inline int nodeport_ingress(struct __sk_buff *skb, struct pkt *p)
{
	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP)
		return TC_ACT_OK;

	__u32 now = now_seconds();
	int ret = snat_reply(skb, p, now);
	if (ret != -1)
		return ret;
	int new_conn = p->protocol == IPPROTO_UDP ||
		       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	struct lb4_nat_key fkey = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport,
				    .dport = p->dport, .proto = p->protocol, .dir = LB_NAT_FWD };
	struct lb4_nat_entry *fwd = bpf_map_lookup_elem(&cilium_lb4_nat, &fkey);
	__u32 baddr = 0;
	__u16 bport = 0;
	__u16 rev_nat_index = 0;

	if (fwd) {
		struct lb4_backend *b = bpf_map_lookup_elem(&cilium_lb4_backends, &fwd->backend_id);
		/* a flow keeps its backend while it exists; a new connection
		 * reusing the tuple never goes to a terminating one */
		if (b && b->address == fwd->addr && b->port == fwd->port &&
		    !(new_conn && p->protocol == IPPROTO_TCP && (b->flags & LB_BACKEND_F_TERMINATING))) {
			fwd->last_seen = now;
			baddr = fwd->addr;
			bport = fwd->port;
			rev_nat_index = fwd->rev_nat_index;
		}
	}
	if (!baddr) {
		struct lb4_service *svc = lb4_lookup_service(p->daddr, p->dport, p->protocol);
		if (!svc)
			return TC_ACT_OK;
		if ((svc->flags & LB_F_SRC_RANGE) && !src_range_allowed(svc->rev_nat_index, p->saddr))
			return lb_drop(skb, DROP_NOT_IN_SRC_RANGE, p);
		struct lb4_backend *backend;
		__u32 id = lb4_select(svc, p->daddr, p->dport, p->protocol,
				      LB_AFFINITY_CLIENT_IP | p->saddr, flow_hash(p),
				      lb_maglev_size(), now, &backend);
		if (!id || !backend) {
			emit_drop(skb, 0, DROP_NO_SERVICE, IDENTITY_WORLD, 0, EVENT_F_INGRESS, p);
			metrics_update(skb, DROP_NO_SERVICE, METRIC_INGRESS);
			return reply_port_unreachable(skb);
		}
		baddr = backend->address;
		bport = backend->port;
		rev_nat_index = svc->rev_nat_index;
		struct lb4_nat_entry f = { .addr = baddr, .port = bport, .rev_nat_index = svc->rev_nat_index,
					   .backend_id = id, .last_seen = now };
		struct lb4_nat_key rkey = { .saddr = baddr, .daddr = p->saddr, .sport = bport,
					    .dport = p->sport, .proto = p->protocol, .dir = LB_NAT_REV };
		struct lb4_nat_entry r = { .addr = p->daddr, .port = p->dport,
					   .rev_nat_index = svc->rev_nat_index, .last_seen = now };
		if (bpf_map_update_elem(&cilium_lb4_nat, &rkey, &r, BPF_ANY) < 0 ||
		    bpf_map_update_elem(&cilium_lb4_nat, &fkey, &f, BPF_ANY) < 0)
			return lb_drop(skb, DROP_CT_CREATE_FAILED, p);
	}
	/* a backend on another node: from the frontend address (SNAT); the
	 * node's own addresses (host-network backends) are local */
	int remote = !bpf_map_lookup_elem(&cilium_lxc_ip, &baddr) && ipcache_identity(baddr) != IDENTITY_HOST;
	__u16 nport = 0;
	if (remote) {
		ret = snat_port(p, baddr, bport, rev_nat_index, now, &nport);
		if (ret < 0)
			return lb_drop(skb, -ret, p);
	}
	ret = rewrite_l3l4(skb, p->protocol, 0, p->daddr, baddr, p->dport, bport);
	if (ret < 0)
		return lb_drop(skb, -ret, p);
	if (!remote) {
		/* a backend of this node: the caller delivers it, to the
		 * endpoint under its ingress policy */
		p->daddr = baddr;
		p->dport = bport;
		p->policy_port = bport;
		return NODEPORT_LOCAL;
	}
	ret = rewrite_l3l4(skb, p->protocol, 1, p->saddr, p->daddr, p->sport, nport);
	if (ret < 0)
		return lb_drop(skb, -ret, p);
	return fib_redirect(skb, p->daddr, baddr, p);
}

/* tc egress of a node device: restore the frontend as the source of replies. */
static __always_inline int nodeport_egress(struct __sk_buff *skb, const struct pkt *pp)
{
	const struct pkt p = *pp;
	if (p.protocol != IPPROTO_TCP && p.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	struct lb4_nat_key rkey = { .saddr = p.saddr, .daddr = p.daddr, .sport = p.sport,
				    .dport = p.dport, .proto = p.protocol, .dir = LB_NAT_REV };
	struct lb4_nat_entry *rev = bpf_map_lookup_elem(&cilium_lb4_nat, &rkey);
	if (!rev)
		return TC_ACT_OK;
	rev->last_seen = now_seconds();
	__u32 addr = rev->addr;
	__u16 port = rev->port;
	if (rewrite_l3l4(skb, p.protocol, 1, p.saddr, addr, p.sport, port) < 0) {
		metrics_update(skb, DROP_WRITE_ERROR, METRIC_EGRESS);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

#endif /* CILIUM_NODEPORT_H */
