/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking for TCP, UDP and ICMP.
 *
 * An entry is keyed by the connection's original tuple and by which hook made
 * it: CT_EGRESS by the originating endpoint's from-container hook, CT_INGRESS
 * by the destination endpoint's to-container hook. Two endpoints on one node
 * each keep their own entry for the same connection, so each side's policy is
 * applied and remembered independently.
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

static __always_inline void ct_key_forward(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->protocol = p->protocol;
	k->dir = dir;
	k->pad = 0;
}

static __always_inline void ct_key_reverse(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	k->saddr = p->daddr;
	k->daddr = p->saddr;
	k->sport = p->dport;
	k->dport = p->sport;
	k->protocol = p->protocol;
	k->dir = dir;
	k->pad = 0;
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
 * event, as upstream's "medium" monitor aggregation: a connection reports its
 * opening, its closing and resets, not every ACK. */
#define TRACE_TCP_FLAGS (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)

static __always_inline __u8 ct_account(struct ct_entry *e, const struct pkt *p, __u32 len,
				       int reply, __u32 now)
{
	__u8 new_flags;
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
		else if ((p->tcp_flags & TCP_FLAG_SYN) && !reply &&
			 (e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)))
			/* a new SYN on a closed tuple reopens it */
			e->flags &= ~(CT_F_TX_CLOSING | CT_F_RX_CLOSING | CT_F_SEEN_REPLY);
	}
	__u32 lifetime = now + ct_lifetime(e, p->protocol);
	if (e->lifetime != lifetime)
		e->lifetime = lifetime;
	return new_flags;
}

/*
 * Classifies a packet seen by a hook of direction `dir` (the direction in which
 * that hook would create entries): reply or related to a connection the other
 * way, established in this direction, or new.
 */
static __always_inline void ct_lookup(const struct pkt *p, __u8 dir, __u32 len, __u32 now,
				      struct ct_result *res)
{
	__u8 other = dir == CT_EGRESS ? CT_INGRESS : CT_EGRESS;
	struct ct_key key;
	struct ct_entry *e;

	res->entry = 0;
	res->new_flags = 0;

	if (p->is_icmp_error) {
		/* An ICMP error is related to the connection of the packet it
		 * quotes, and only between that packet's own endpoints: leaving a
		 * pod, it must answer a packet the pod received (outer source =
		 * quoted destination, outer destination = quoted source); reaching
		 * a pod, it must be about a packet the pod sent (a router on the
		 * way may be its source). Anything else is a new packet. */
		int ok = dir == CT_EGRESS
				 ? (p->saddr == p->inner_daddr && p->daddr == p->inner_saddr)
				 : (p->daddr == p->inner_saddr);
		res->status = CT_NEW;
		if (!ok)
			return;
		key.saddr = p->inner_saddr;
		key.daddr = p->inner_daddr;
		key.sport = p->inner_sport;
		key.dport = p->inner_dport;
		key.protocol = p->inner_protocol;
		key.dir = other;
		key.pad = 0;
		e = bpf_map_lookup_elem(&cilium_ct4, &key);
		if (e && e->lifetime >= now) {
			res->status = CT_RELATED;
			res->entry = e;
		}
		return;
	}
	if (p->untracked) {
		/* ICMP without a request/reply pairing: always judged by policy */
		res->status = CT_NEW;
		return;
	}

	ct_key_reverse(&key, p, other);
	e = bpf_map_lookup_elem(&cilium_ct4, &key);
	if (e && e->lifetime >= now) {
		res->status = CT_REPLY;
		res->entry = e;
		res->new_flags = ct_account(e, p, len, 1, now);
		return;
	}

	ct_key_forward(&key, p, dir);
	e = bpf_map_lookup_elem(&cilium_ct4, &key);
	if (e && e->lifetime >= now) {
		res->status = CT_ESTABLISHED;
		res->entry = e;
		res->new_flags = ct_account(e, p, len, 0, now);
		return;
	}
	res->status = CT_NEW;
}

/* Creates the entry for a new connection in direction `dir`. Returns 0 or -reason. */
static __always_inline int ct_create(const struct pkt *p, __u8 dir, __u32 len, __u32 now,
				     __u32 src_sec_id, __u32 policy_rev, __u16 proxy_port)
{
	struct ct_key key;
	struct ct_entry e = {};

	ct_key_forward(&key, p, dir);
	e.src_sec_id = src_sec_id;
	e.policy_rev = policy_rev;
	e.proxy_port = proxy_port;
	ct_account(&e, p, len, 0, now);
	if (bpf_map_update_elem(&cilium_ct4, &key, &e, BPF_ANY) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* CILIUM_CONNTRACK_H */
