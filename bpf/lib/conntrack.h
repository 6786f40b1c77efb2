/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking for TCP, UDP and ICMP, IPv4 and IPv6.
 *
 * Each endpoint keeps its own entry per connection, keyed from its side:
 * (local address, remote address, local port, remote port, protocol). Both
 * directions of the connection compute the same key at the endpoint's hooks,
 * so one lookup classifies a packet; CT_F_EGRESS in the entry tells which
 * side opened it (and so whether a packet is a reply). Two endpoints on one
 * node keep separate entries for a connection between them, so each side's
 * policy is applied and remembered independently.
 */
#ifndef CILIUM_CONNTRACK_H
#define CILIUM_CONNTRACK_H

#include "maps.h"

/* Timeouts in seconds, as upstream's defaults. */
#define CT_LIFETIME_TCP 21600
#define CT_LIFETIME_NONTCP 60
#define CT_SYN_TIMEOUT 60
#define CT_CLOSE_TIMEOUT 10

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
	CT_RELATED = 3,
};

struct ct_result {
	enum ct_status status;
	struct ct_entry *entry;   /* the entry the packet belongs to, if any */
	__u8 new_flags;           /* SYN/FIN/RST not seen before in this direction */
	__u8 pad[3];
};

/*
 * The IPv6 half of ct_entry_op, in subprograms of their own: kept out of the
 * inlined IPv4 path, which stays as short as it was before IPv6 (measured
 * with BPF_PROG_RUN: inlining both costs IPv4 packets about 10 ns).
 */
static __always_inline void ct6_key_of(struct ct6_key *k, const struct pkt *p, int local_src, int inner)
{
	const __u32 *s = inner ? p->inner_saddr6 : p->saddr6;
	const __u32 *d = inner ? p->inner_daddr6 : p->daddr6;
	__u16 sport = inner ? p->inner_sport : p->sport;
	__u16 dport = inner ? p->inner_dport : p->dport;
	__builtin_memcpy(k->local, local_src ? s : d, 16);
	__builtin_memcpy(k->remote, local_src ? d : s, 16);
	k->lport = local_src ? sport : dport;
	k->rport = local_src ? dport : sport;
	k->protocol = inner ? p->inner_protocol : p->protocol;
	k->pad0 = 0;
	k->pad1 = 0;
}

static __attribute__((noinline)) struct ct_entry *ct6_find(const struct pkt *p, int local_src, int inner)
{
	struct ct6_key k;
	ct6_key_of(&k, p, local_src, inner);
	return bpf_map_lookup_elem(&cilium_ct6, &k);
}

/* a subprogram may not return its caller's stack: 0 or a negative error */
static __attribute__((noinline)) int ct6_store(const struct pkt *p, int local_src, struct ct_entry *e)
{
	struct ct6_key k;
	ct6_key_of(&k, p, local_src, 0);
	return bpf_map_update_elem(&cilium_ct6, &k, e, BPF_ANY);
}

/*
 * The entry of a connection seen from one endpoint's side: `local_src` says
 * whether the endpoint is the source of the tuple; `inner` picks the tuple an
 * ICMP error quotes instead of the packet's own. IPv4 entries live in
 * cilium_ct4, IPv6 ones in cilium_ct6. With `store`, writes it instead
 * (returns non-zero when stored, 0 when the map refused).
 */
static __always_inline struct ct_entry *ct_entry_op(const struct pkt *p, int local_src, int inner,
						    struct ct_entry *store)
{
	if (p->family == 6) {
		if (!store)
			return ct6_find(p, local_src, inner);
		return ct6_store(p, local_src, store) < 0 ? 0 : store;
	}
	__u16 sport = inner ? p->inner_sport : p->sport;
	__u16 dport = inner ? p->inner_dport : p->dport;
	struct ct_key k;
	__u32 s = inner ? p->inner_saddr : p->saddr;
	__u32 d = inner ? p->inner_daddr : p->daddr;
	k.local = local_src ? s : d;
	k.remote = local_src ? d : s;
	k.lport = local_src ? sport : dport;
	k.rport = local_src ? dport : sport;
	k.protocol = inner ? p->inner_protocol : p->protocol;
	k.pad0 = 0;
	k.pad1 = 0;
	if (store)
		return bpf_map_update_elem(&cilium_ct4, &k, store, BPF_ANY) < 0 ? 0 : store;
	return bpf_map_lookup_elem(&cilium_ct4, &k);
}

static __always_inline __u32 ct_lifetime(const struct ct_entry *e, __u8 protocol)
{
	if (protocol != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP;
	if ((e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)) == (CT_F_TX_CLOSING | CT_F_RX_CLOSING))
		return CT_CLOSE_TIMEOUT;
	if (!(e->flags & CT_F_SEEN_REPLY))
		return CT_SYN_TIMEOUT;
	return CT_LIFETIME_TCP;
}

/* TCP flags whose first appearance in a direction is reported as a trace
 * event from MEDIUM monitor aggregation on, as upstream: a connection
 * reports its opening, its closing and resets, not every ACK. */
#define TRACE_TCP_FLAGS (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)

static __always_inline __u8 ct_account(struct ct_entry *e, const struct pkt *p, __u32 len,
				       int reply, __u32 now)
{
	__u8 new_flags;
	if (p->protocol == IPPROTO_TCP && !reply && (e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)) &&
	    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)) == TCP_FLAG_SYN) {
		/* a new SYN on a closed tuple reopens it: a new connection,
		 * whose opening and closing are reported again */
		e->flags &= ~(CT_F_TX_CLOSING | CT_F_RX_CLOSING | CT_F_SEEN_REPLY);
		e->tx_flags_seen = 0;
		e->rx_flags_seen = 0;
	}
	if (reply) {
		e->rx_packets += 1;
		e->rx_bytes += len;
		new_flags = p->tcp_flags & TRACE_TCP_FLAGS & ~e->rx_flags_seen;
		if (new_flags)
			e->rx_flags_seen |= new_flags;
		if (!(e->flags & CT_F_SEEN_REPLY))
			e->flags |= CT_F_SEEN_REPLY;
	} else {
		e->tx_packets += 1;
		e->tx_bytes += len;
		new_flags = p->tcp_flags & TRACE_TCP_FLAGS & ~e->tx_flags_seen;
		if (new_flags)
			e->tx_flags_seen |= new_flags;
	}
	if (p->protocol == IPPROTO_TCP) {
		if (p->tcp_flags & TCP_FLAG_RST)
			e->flags |= CT_F_TX_CLOSING | CT_F_RX_CLOSING;
		else if (p->tcp_flags & TCP_FLAG_FIN)
			e->flags |= reply ? CT_F_RX_CLOSING : CT_F_TX_CLOSING;
	}
	__u32 lifetime = now + ct_lifetime(e, p->protocol);
	if (e->lifetime != lifetime)
		e->lifetime = lifetime;
	return new_flags;
}

/*
 * Classifies a packet seen by the endpoint's egress or ingress hook: related
 * to a connection (ICMP error), a reply of one the other side opened,
 * established in the direction it was opened, or new.
 */
static __always_inline void ct_lookup(const struct pkt *p, int egress, __u32 len, __u32 now,
				      struct ct_result *res)
{
	struct ct_entry *e;

	res->entry = 0;
	res->new_flags = 0;
	res->status = CT_NEW;

	if (p->is_icmp_error) {
		/* An ICMP error is related to the connection of the packet it
		 * quotes, and only between that packet's own endpoints: leaving a
		 * pod, it must answer a packet the pod received (outer source =
		 * quoted destination, outer destination = quoted source); reaching
		 * a pod, it must be about a packet the pod sent (a router on the
		 * way may be its source). Anything else is a new packet. */
		int ok;
		if (p->family == 6)
			ok = egress ? (addr6_eq(p->saddr6, p->inner_daddr6) && addr6_eq(p->daddr6, p->inner_saddr6))
				    : addr6_eq(p->daddr6, p->inner_saddr6);
		else
			ok = egress ? (p->saddr == p->inner_daddr && p->daddr == p->inner_saddr)
				    : (p->daddr == p->inner_saddr);
		if (!ok)
			return;
		/* the endpoint is the quoted packet's destination when the error
		 * leaves it, its source when the error reaches it */
		e = ct_entry_op(p, !egress, 1, 0);
		if (e && e->lifetime >= now) {
			res->status = CT_RELATED;
			res->entry = e;
		}
		return;
	}
	if (p->untracked)
		/* ICMP without a request/reply pairing: always judged by policy */
		return;

	e = ct_entry_op(p, egress, 0, 0);
	if (!e || e->lifetime < now)
		return;
	int opened_here = !!(e->flags & CT_F_EGRESS) == !!egress;
	res->status = opened_here ? CT_ESTABLISHED : CT_REPLY;
	res->entry = e;
	res->new_flags = ct_account(e, p, len, !opened_here, now);
}

/* Creates the entry of a new connection seen by the egress or ingress hook.
 * Returns 0 or -reason. */
static __always_inline int ct_create(const struct pkt *p, int egress, __u32 len, __u32 now,
				     __u32 src_sec_id, __u32 policy_rev, __u16 proxy_port)
{
	struct ct_entry e = {};

	e.src_sec_id = src_sec_id;
	e.policy_rev = policy_rev;
	e.proxy_port = proxy_port;
	e.flags = egress ? CT_F_EGRESS : 0;
	ct_account(&e, p, len, 0, now);
	if (!ct_entry_op(p, egress, 0, &e))
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* CILIUM_CONNTRACK_H */
