/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Masquerading (upstream's BPF masquerade): TCP, UDP and ICMP echo (the
 * identifier standing for the port) from a local pod to
 * an address outside the cluster (the world, or a CIDR/FQDN identity) leave
 * the node from the node's address, at the node device's tc egress; replies
 * get the pod back at its tc ingress. Only connections the pod opened (its
 * conntrack entry says egress) are masqueraded: replies of connections from
 * outside keep the pod's address. Traffic to pods, nodes and the host keeps
 * its source. Entries live in cilium_lb4_nat (MASQ_FWD/MASQ_REV); a
 * flow takes a port of the NAT range (61000-65535, above the node's own
 * ephemeral ports) that no other flow holds towards the same peer.
 */
#ifndef CILIUM_MASQ_H
#define CILIUM_MASQ_H

#include "nodeport.h"
#include "ipcache.h"
#include "conntrack.h"

static __always_inline __u32 masq_addr(void)
{
	__u32 idx = 0;
	struct runtime_config *rt = bpf_map_lookup_elem(&cilium_runtime, &idx);
	return rt ? rt->masq_addr : 0;
}

/* Outside the cluster: the world, or a node-local (CIDR, FQDN) identity. */
static __always_inline int masq_destination(__u32 daddr)
{
	return identity_is_world(ipcache_identity(daddr));
}

/* What is masqueraded: TCP, UDP, and ICMP echo requests out, echo replies
 * back in. */
static __always_inline int masq_protocol(const struct pkt *p, int egress)
{
	if (p->protocol == IPPROTO_TCP || p->protocol == IPPROTO_UDP)
		return 1;
	return p->protocol == IPPROTO_ICMP && (egress ? p->icmp_type == ICMP_ECHO_T : p->is_echo_reply);
}

/* tc egress of a node device. Returns -1 when the packet is not to be
 * masqueraded (a pod's reply to a connection from outside, e.g. through a
 * NodePort, has a conntrack entry its ingress made: it is never). */
static __always_inline int masq_egress(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 addr = masq_addr();
	if (!addr || !masq_protocol(p, 1) || !bpf_map_lookup_elem(&cilium_lxc_ip, &p->saddr) ||
	    !masq_destination(p->daddr))
		return -1;
	struct ct_entry *ce = ct_entry_op(p, 1, 0, 0);
	if (!ce || !(ce->flags & CT_F_EGRESS))
		return -1;
	__u32 now = now_seconds();
	struct lb4_nat_key fk = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport,
				  .dport = p->dport, .proto = p->protocol, .dir = LB_NAT_MASQ_FWD };
	struct lb4_nat_entry *f = bpf_map_lookup_elem(&cilium_lb4_nat, &fk);
	__u16 port = p->sport;
	struct lb4_nat_key rk = { .saddr = p->daddr, .daddr = addr, .sport = p->dport,
				  .proto = p->protocol, .dir = LB_NAT_MASQ_REV };
	if (f) {
		port = f->port;
		f->last_seen = now;
	} else {
		__u32 h = flow_hash(p);
		port = nat_port(h, 0);
#pragma unroll
		for (int i = 1; i <= 8; i++) {
			rk.dport = port;
			struct lb4_nat_entry *held = bpf_map_lookup_elem(&cilium_lb4_nat, &rk);
			if (!held || (held->addr == p->saddr && held->port == p->sport))
				break;
			port = nat_port(h, i);
		}
		struct lb4_nat_entry fe = { .addr = addr, .port = port, .last_seen = now };
		if (bpf_map_update_elem(&cilium_lb4_nat, &fk, &fe, BPF_ANY) < 0) {
			metrics_update(skb, DROP_CT_CREATE_FAILED, METRIC_EGRESS);
			return TC_ACT_SHOT;
		}
	}
	/* the reverse entry is (re)written every time: the LRU may take it */
	rk.dport = port;
	struct lb4_nat_entry re = { .addr = p->saddr, .port = p->sport, .last_seen = now };
	if (bpf_map_update_elem(&cilium_lb4_nat, &rk, &re, BPF_ANY) < 0 ||
	    rewrite_l3l4(skb, p->protocol, 1, p->saddr, addr, p->sport, port) < 0) {
		metrics_update(skb, DROP_WRITE_ERROR, METRIC_EGRESS);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* tc ingress of a node device: a reply to a masqueraded flow goes back to
 * its pod (p is updated to the restored destination). */
static __always_inline int masq_ingress(struct __sk_buff *skb, struct pkt *p)
{
	if (!masq_protocol(p, 0))
		return TC_ACT_OK;
	struct lb4_nat_key rk = { .saddr = p->saddr, .daddr = p->daddr, .sport = p->sport,
				  .dport = p->dport, .proto = p->protocol, .dir = LB_NAT_MASQ_REV };
	struct lb4_nat_entry *r = bpf_map_lookup_elem(&cilium_lb4_nat, &rk);
	if (!r)
		return TC_ACT_OK;
	r->last_seen = now_seconds();
	__u32 pod = r->addr;
	__u16 port = r->port;
	if (rewrite_l3l4(skb, p->protocol, 0, p->daddr, pod, p->dport, port) < 0)
		return lb_drop(skb, DROP_WRITE_ERROR, p);
	p->daddr = pod;
	p->dport = port;
	return TC_ACT_OK;
}

#endif /* CILIUM_MASQ_H */
