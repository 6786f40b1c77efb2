/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking for TCP, UDP and ICMP, IPv4 and IPv6.
 *
 * Each endpoint keeps its own entry per connection, keyed from its side:
 * (local address, remote address, local port, remote port, protocol). Both
 * directions of the connection compute the same key at the endpoint's hooks,
 * so one lookup classifies a packet; CT_F_EGRESS in the entry tells whether
 * the key's local side opened it (and so whether a packet is a reply).
 *
 * A connection between two endpoints of this node (a pair: both ends'
 * policies are applied in one program, on the way from one to the other)
 * keeps one entry, not one per end: keyed from the end with the lower
 * address (then port), so both ends and both directions find it with one
 * lookup. It holds the opener's egress verdict (policy_rev, proxy_port) and,
 * once the acceptor's ingress has let the connection in, the acceptor's
 * (CT_F_PEER_VERDICT, peer_policy_rev, peer_proxy_port). Measured: an entry
 * per end made new connections between two pods of one node about 6% slower
 * than plain routing, the second entry being a second cold lookup per
 * connection and twice the entries in the cache.
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

/* ct_lookup()'s `pair_kind`: the endpoint's own entries (0); a pair's shared
 * entry (CT_PAIR); or the endpoint's own, where an ICMP error reaching it may
 * also be about a pair's packet (from the node's stack). */
#define CT_PAIR 1
#define CT_PAIR_ICMP_FROM_NODE 2

struct ct_result {
	enum ct_status status;
	struct ct_entry *entry;   /* the entry the packet belongs to, if any */
	__u8 new_flags;           /* SYN/FIN/RST not seen before in this direction */
	__u8 key_src;             /* whether the packet's source is the key's local
				   * side (an ICMP error's: the quoted destination) */
	__u8 pad[2];
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

/* 1 when a < b, computed without a branch: the verifier then follows one
 * path with an unknown bit instead of two with a known one each, which
 * doubled everything after it and made the program too large to verify. */
static __always_inline __u64 lt_bit(__u64 a, __u64 b)
{
	return (a - b) >> 63;
}

static __always_inline __u64 eq_bit(__u64 a, __u64 b)
{
	return ((a ^ b) - 1) >> 63;
}

/*
 * Whether a key is taken with the packet's source as its local side: the
 * endpoint's own side (its source when leaving it, `egress`; for an ICMP
 * error, `inner`, the quoted packet's destination then), or for a pair the
 * lower address, then the lower port, of the tuple looked at. Any fixed order
 * does; the raw values are compared.
 */
static __always_inline int ct_local_src(const struct pkt *p, int egress, int pair, int inner)
{
	if (!pair)
		return inner ? !egress : egress;
	__u64 sport = inner ? p->inner_sport : p->sport;
	__u64 dport = inner ? p->inner_dport : p->dport;
	__u64 r = 1 - lt_bit(dport, sport);   /* sport <= dport */
	if (p->family == 6) {
		const __u32 *s = inner ? p->inner_saddr6 : p->saddr6;
		const __u32 *d = inner ? p->inner_daddr6 : p->daddr6;
#pragma unroll
		for (int i = 3; i >= 0; i--)
			r = lt_bit(s[i], d[i]) | (eq_bit(s[i], d[i]) & r);
		return (int)r;
	}
	__u64 s = inner ? p->inner_saddr : p->saddr;
	__u64 d = inner ? p->inner_daddr : p->daddr;
	return (int)(lt_bit(s, d) | (eq_bit(s, d) & r));
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
 * established in the direction it was opened, or new. With `pair_kind`
 * CT_PAIR, the packet goes between two endpoints of this node and the pair's
 * shared entry is looked up (`egress` then names the hook whose checks an
 * ICMP error gets).
 */
static __always_inline void ct_lookup(const struct pkt *p, int egress, int pair_kind, __u32 len, __u32 now,
				      struct ct_result *res)
{
	struct ct_entry *e;
	int pair = pair_kind == CT_PAIR;

	res->entry = 0;
	res->new_flags = 0;
	res->key_src = 0;
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
		int inner_src = ct_local_src(p, egress, pair, 1);
		e = ct_entry_op(p, inner_src, 1, 0);
		if (!e && pair_kind == CT_PAIR_ICMP_FROM_NODE && !egress) {
			/* reaching an endpoint from outside its pairs (the node's
			 * stack, when a packet's TTL ran out on the way to another
			 * endpoint of this node): about a pair's packet, maybe */
			inner_src = ct_local_src(p, egress, 1, 1);
			e = ct_entry_op(p, inner_src, 1, 0);
			if (e && !(e->flags & CT_F_PAIR))
				e = 0;
		}
		if (e && e->lifetime >= now) {
			res->status = CT_RELATED;
			res->entry = e;
			/* the error's source is the quoted packet's destination */
			res->key_src = !inner_src;
		}
		return;
	}
	if (p->untracked)
		/* ICMP without a request/reply pairing: always judged by policy */
		return;

	int local_src = ct_local_src(p, egress, pair, 0);
	e = ct_entry_op(p, local_src, 0, 0);
	if (!e || e->lifetime < now)
		return;
	/* the packet goes the way the connection was opened (no branch: see lt_bit) */
	int opened_here = 1 ^ (((e->flags & CT_F_EGRESS) >> 3) ^ (local_src & 1));
	res->status = opened_here ? CT_ESTABLISHED : CT_REPLY;
	res->entry = e;
	res->key_src = local_src;
	/* What a pair's acceptor sends before letting the connection in is
	 * judged by its egress policy alone and leaves the entry as it is. */
	if (pair && egress && !opened_here && !(e->flags & CT_F_PEER_VERDICT))
		return;
	res->new_flags = ct_account(e, p, len, !opened_here, now);
}

/*
 * Whether the endpoint of the hook that made `res` opened the connection:
 * the packet's source at egress, its destination at ingress; key_src says
 * whether the source is the key's local side, CT_F_EGRESS whether that side
 * opened it. (No branch: see lt_bit.)
 */
static __always_inline int ct_hook_opened(const struct ct_result *res, int egress)
{
	__u32 ep_is_key_local = (res->key_src ^ (egress ? 0 : 1)) & 1;
	return 1 ^ ep_is_key_local ^ ((res->entry->flags & CT_F_EGRESS) >> 3);
}

/* Creates the entry of a new connection seen by the egress or ingress hook
 * (for a pair, by the opener's egress). Returns 0 or -reason. */
static __always_inline int ct_create(const struct pkt *p, int egress, int pair, __u32 len, __u32 now,
				     __u32 src_sec_id, __u32 policy_rev, __u16 proxy_port)
{
	struct ct_entry e = {};
	int local_src = ct_local_src(p, egress, pair, 0);

	e.src_sec_id = src_sec_id;
	e.policy_rev = policy_rev;
	e.proxy_port = proxy_port;
	e.flags = (local_src ? CT_F_EGRESS : 0) | (pair ? CT_F_PAIR : 0);
	ct_account(&e, p, len, 0, now);
	if (!ct_entry_op(p, local_src, 0, &e))
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

/* Records the acceptor's ingress verdict in a pair's entry: `e` when the
 * connection had one, else the one its opener's egress just created. */
static __always_inline void ct_set_peer_verdict(const struct pkt *p, struct ct_entry *e,
						__u32 policy_rev, __u16 proxy_port)
{
	if (!e)
		e = ct_entry_op(p, ct_local_src(p, 0, 1, 0), 0, 0);
	if (!e)
		return;
	e->peer_policy_rev = policy_rev;
	e->peer_proxy_port = proxy_port;
	if (!(e->flags & CT_F_PEER_VERDICT))
		e->flags |= CT_F_PEER_VERDICT;
}

#endif /* CILIUM_CONNTRACK_H */
