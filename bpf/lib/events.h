/* SPDX-License-Identifier: Apache-2.0 */
/* Drop, trace and policy-verdict events on the ring buffer, and the metrics map. */
#ifndef CILIUM_EVENTS_H
#define CILIUM_EVENTS_H

#include "maps.h"

/*
 * Waking the reader costs a cross-CPU wakeup per event (~100 us on two
 * vCPUs), which would dominate new-connection rates. Events are submitted
 * silently and the agent polls the ring every few tens of milliseconds; a
 * ring filling up wakes it at once -- but only through the record that takes
 * it past an eighth: a forced wakeup is an interrupt (about 5 us in a VM,
 * measured with BPF_PROG_RUN), and while the reader lags every later record
 * would pay it again. (Two CPUs crossing together may both skip it; the
 * poll still comes.)
 */
static __always_inline __u64 event_submit_flags(__u64 record)
{
	__u64 avail = bpf_ringbuf_query(&cilium_events, BPF_RB_AVAIL_DATA);
	__u64 mark = bpf_ringbuf_query(&cilium_events, BPF_RB_RING_SIZE) >> 3;
	/* avail counts this record and its 8-byte header, rounded up to 8 */
	return avail > mark && avail <= mark + ((record + 8 + 7) & ~7ULL) ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline void metrics_update(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	__u32 idx = METRICS_INDEX(reason, dir);
	struct metrics_value *v = bpf_map_lookup_elem(&cilium_metrics, &idx);
	if (v) {
		v->packets += 1;
		v->bytes += skb->len;
	}
}

static __always_inline void event_lost(void)
{
	__u32 idx = EVENT_STATS_LOST;
	__u64 *lost = bpf_map_lookup_elem(&cilium_event_stats, &idx);
	if (lost)
		*lost += 1;
}

static __always_inline void event_fill(struct event *ev, struct __sk_buff *skb, __u8 type,
				       __u8 subtype, __u16 source_ep, const struct pkt *p)
{
	ev->type = type;
	ev->subtype = subtype;
	ev->source_ep = source_ep;
	ev->ifindex = skb->ifindex;
	ev->ktime_ns = bpf_ktime_get_boot_ns();
	ev->src_identity = 0;
	ev->dst_identity = 0;
	ev->len_orig = skb->len;
	ev->len_cap = 0;
	ev->dst_port = 0;
	ev->flags = 0;
	ev->match_type = 0;
	ev->verdict = 0;
	ev->proxy_port = 0;
	ev->pad0 = 0;
	ev->pad1 = 0;
	ev->pad2 = 0;
	if (p && p->family == 6) {
		__builtin_memcpy(ev->saddr6, p->saddr6, 16);
		__builtin_memcpy(ev->daddr6, p->daddr6, 16);
	} else {
		__builtin_memset(ev->saddr6, 0, 16);
		__builtin_memset(ev->daddr6, 0, 16);
	}
	if (p) {
		ev->ip_version = p->family;
		ev->protocol = p->protocol;
		ev->tcp_flags = p->tcp_flags;
		ev->saddr = p->saddr;
		ev->daddr = p->daddr;
		ev->sport = bpf_ntohs(p->sport);
		ev->dport = bpf_ntohs(p->dport);
		ev->icmp_type = p->icmp_type;
		ev->icmp_code = p->icmp_code;
	} else {
		ev->ip_version = 0;
		ev->protocol = 0;
		ev->tcp_flags = 0;
		ev->saddr = 0;
		ev->daddr = 0;
		ev->sport = 0;
		ev->dport = 0;
		ev->icmp_type = 0;
		ev->icmp_code = 0;
	}
}

/* A drop, with the packet's first bytes for a closer look. */
static __always_inline void emit_drop(struct __sk_buff *skb, __u16 ep_id, __u8 reason,
				      __u32 src_id, __u32 dst_id, __u8 flags, const struct pkt *p)
{
	struct event_capture *c = bpf_ringbuf_reserve(&cilium_events, sizeof(*c), 0);
	if (!c) {
		event_lost();
		return;
	}
	event_fill(&c->hdr, skb, EVENT_DROP, reason, ep_id, p);
	c->hdr.src_identity = src_id;
	c->hdr.dst_identity = dst_id;
	c->hdr.flags = flags;
	__u32 cap = skb->len;
	if (cap > EVENT_DATA_LEN)
		cap = EVENT_DATA_LEN;
	if (cap < 1 || bpf_skb_load_bytes(skb, 0, c->data, cap) < 0)
		cap = 0;
	c->hdr.len_cap = cap;
	bpf_ringbuf_submit(c, event_submit_flags(sizeof(*c)));
}

static __always_inline void emit_trace(struct __sk_buff *skb, __u16 ep_id, __u8 point,
				       __u32 src_id, __u32 dst_id, __u8 flags, const struct pkt *p)
{
	struct event *ev = bpf_ringbuf_reserve(&cilium_events, sizeof(*ev), 0);
	if (!ev) {
		event_lost();
		return;
	}
	event_fill(ev, skb, EVENT_TRACE, point, ep_id, p);
	ev->src_identity = src_id;
	ev->dst_identity = dst_id;
	ev->flags = flags;
	bpf_ringbuf_submit(ev, event_submit_flags(sizeof(*ev)));
}

static __always_inline void emit_verdict(struct __sk_buff *skb, __u16 ep_id, __u32 src_id,
					 __u32 dst_id, const struct pkt *p, __s32 verdict,
					 __u8 match_type, __u8 flags, __u16 proxy_port)
{
	struct event *ev = bpf_ringbuf_reserve(&cilium_events, sizeof(*ev), 0);
	if (!ev) {
		event_lost();
		return;
	}
	event_fill(ev, skb, EVENT_POLICY_VERDICT, 0, ep_id, p);
	ev->src_identity = src_id;
	ev->dst_identity = dst_id;
	ev->dst_port = bpf_ntohs(p->policy_port);
	ev->verdict = verdict;
	ev->match_type = match_type;
	ev->flags = flags;
	ev->proxy_port = bpf_ntohs(proxy_port);
	bpf_ringbuf_submit(ev, event_submit_flags(sizeof(*ev)));
}

#endif /* CILIUM_EVENTS_H */
