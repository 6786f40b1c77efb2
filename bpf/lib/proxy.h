/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Steering a connection to the agent's transparent L7 proxy, as upstream's
 * TPROXY mode does it without iptables: at tc ingress the packet is handed
 * to the proxy's socket with bpf_sk_assign (the accepted socket of an
 * established proxied connection, else the listener on the proxy port) and
 * marked MARK_MAGIC_TO_PROXY, so the node's policy route delivers it locally
 * although it is addressed to the original destination, which the proxy's
 * transparent socket keeps as its local address.
 */
#ifndef CILIUM_PROXY_H
#define CILIUM_PROXY_H

#include "common.h"

/* Returns TC_ACT_OK with the socket assigned, or -DROP_PROXY_LOOKUP_FAILED
 * when no proxy socket takes it (the agent is not running its proxy). */
static __always_inline int redirect_to_proxy(struct __sk_buff *skb, const struct pkt *p, __u16 proxy_port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;

	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP)
		return -DROP_PROXY_LOOKUP_FAILED;
	tuple.ipv4.saddr = p->saddr;
	tuple.ipv4.daddr = p->daddr;
	tuple.ipv4.sport = p->sport;
	tuple.ipv4.dport = p->dport;
	if (p->protocol == IPPROTO_UDP) {
		/* datagrams (DNS): always the proxy's socket on its port */
		tuple.ipv4.dport = proxy_port;
		sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return -DROP_PROXY_LOOKUP_FAILED;
		goto assign;
	}
	/* a proxied connection in progress: its socket, also while the
	 * handshake is not finished (a request socket, hence skc_lookup) */
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT)
			goto assign;
		/* a listener of the node on the original port is not the proxy,
		 * and a closed connection's remains are not a connection */
		bpf_sk_release(sk);
	}
	tuple.ipv4.dport = proxy_port;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -DROP_PROXY_LOOKUP_FAILED;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -DROP_PROXY_LOOKUP_FAILED;
	}
assign:;
	long ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret)
		return -DROP_PROXY_LOOKUP_FAILED;
	skb->mark = MARK_MAGIC_TO_PROXY;
	return TC_ACT_OK;
}

/* A packet the proxy sent: its listener's replies to clients and its
 * upstream connections. */
static __always_inline int from_proxy(const struct __sk_buff *skb)
{
	return (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_PROXY;
}

/* The client identity an upstream connection of the proxy carries (0 for
 * the listener's own replies). */
static __always_inline __u32 proxy_identity(const struct __sk_buff *skb)
{
	return skb->mark >> 16;
}

#endif /* CILIUM_PROXY_H */
