/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Programs attached to the host side of every endpoint's veth (lxc...):
 *   cil_from_container - tc ingress: packets the pod sends (egress policy)
 *   cil_to_container   - tc egress:  packets delivered to the pod (ingress policy)
 * to the node's own devices (the per-packet service load balancer):
 *   cil_from_netdev    - tc ingress: service frontends -> backends
 *   cil_to_netdev      - tc egress:  replies get their frontend back
 * and, in tunnel mode, to the node's VXLAN device (cilium_vxlan):
 *   cil_from_overlay   - tc ingress: the source identity from the VNI
 *   cil_to_overlay     - tc egress:  outer destination and VNI set
 *
 * One loaded copy serves every endpoint: the endpoint is found by the
 * device's ifindex in cilium_lxc, so creating an endpoint needs no compile and
 * no load, only map writes and an attach.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/events.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/nodeport.h"
#include "lib/masq.h"
#include "lib/proxy.h"

#define ETH_P_ARP_BE bpf_htons(0x0806)
#define ETH_P_IP_BE bpf_htons(0x0800)

static __always_inline int drop(struct __sk_buff *skb, __u16 ep_id, int reason, __u32 src_id,
				__u32 dst_id, __u8 flags, __u8 metric_dir, const struct pkt *p)
{
	emit_drop(skb, ep_id, (__u8)reason, src_id, dst_id, flags, p);
	metrics_update(skb, (__u8)reason, metric_dir);
	return TC_ACT_SHOT;
}

/* An egress packet not traced where it leaves: the local endpoint it goes to
 * traces it at its ingress (to-endpoint). */
#define TRACE_POINT_NONE 0xff

/*
 * The policy decision shared by both hooks. `egress` selects the endpoint's
 * egress (from-container) or ingress (to-container) policy; `peer_id` is the
 * identity of the other side; `out_point` is where an egress packet goes
 * (to-stack, to-network, or TRACE_POINT_NONE for a local endpoint), its
 * trace point unless aggregation is off (then: from-endpoint). Returns
 * TC_ACT_OK or TC_ACT_SHOT; when the connection belongs to the L7 proxy,
 * *proxy_port (network order) says which. `pair_kind` (conntrack.h):
 * CT_PAIR when the packet goes between two endpoints of this node, whose
 * connection has one conntrack entry for both; `shared`, the caller's lookup
 * that both of a pair's hooks use, so a packet is looked up and counted once
 * (else enforce() looks it up).
 */
static __always_inline int enforce(struct __sk_buff *skb, const struct endpoint_info *ep,
				   struct pkt *p, int egress, __u32 peer_id, __u32 now,
				   __u16 *proxy_port, __u8 out_point, int pair_kind, struct ct_result *shared)
{
	int pair = pair_kind == CT_PAIR;
	__u8 metric_dir = egress ? METRIC_EGRESS : METRIC_INGRESS;
	__u32 idx = 0;
	const struct runtime_config *rt = bpf_map_lookup_elem(&cilium_runtime, &idx);
	__u32 aggregation = rt ? rt->monitor_aggregation : MONITOR_AGGREGATION_MEDIUM;
	__u8 point = !egress ? TRACE_TO_LXC
		     : aggregation == MONITOR_AGGREGATION_NONE ? TRACE_FROM_LXC : out_point;
	/* below MEDIUM every packet is traced, else those with new TCP flags */
	int every_packet = aggregation < MONITOR_AGGREGATION_MEDIUM;
	__u32 src_id = egress ? ep->sec_identity : peer_id;
	__u32 dst_id = egress ? peer_id : ep->sec_identity;
	__u8 dir_flag = egress ? 0 : EVENT_F_INGRESS;
	struct ct_result ct;

	*proxy_port = 0;
	/* Only TCP, UDP, SCTP, ICMP and ICMPv6, unless the agent lets pods use the
	 * protocols without ports (VRRP, GRE, ...), which are tracked by
	 * address pair. */
	int icmp = p->family == 6 ? p->protocol == IPPROTO_ICMPV6 : p->protocol == IPPROTO_ICMP;
	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP &&
	    p->protocol != IPPROTO_SCTP && !icmp && !(ep->flags & EP_F_EXTENDED_PROTOCOLS))
		return drop(skb, ep->ep_id, DROP_CT_UNKNOWN_PROTO, src_id, dst_id, dir_flag,
			    metric_dir, p);
	if (shared)
		ct = *shared;
	else
		ct_lookup(p, egress, pair_kind, skb->len, now, &ct);
	int traced = point != TRACE_POINT_NONE && (every_packet || ct.new_flags);
	/* a pair's acceptor keeps its verdict in the peer fields */
	int peer = pair && !egress;
	/* A pair's connection its acceptor has not let in yet is new to the
	 * acceptor: at its ingress, at its egress sending on it, and for ICMP
	 * errors about it either way (judged as unrelated to any connection). */
	if (pair && ct.status == CT_RELATED && !(ct.entry->flags & CT_F_PEER_VERDICT) &&
	    !ct_hook_opened(&ct, egress)) {
		ct.status = CT_NEW;
		ct.entry = 0;
		ct.key_src = 0;
	}
	int unaccepted = pair && ct.entry && !(ct.entry->flags & CT_F_PEER_VERDICT) &&
			 ct.status == (egress ? CT_REPLY : CT_ESTABLISHED);

	if ((ct.status == CT_REPLY && !unaccepted) || ct.status == CT_RELATED) {
		/* Replies of allowed connections pass without a policy lookup. */
		if (traced)
			emit_trace(skb, ep->ep_id, point, src_id, dst_id, dir_flag | (ct.status == CT_REPLY ? EVENT_F_REPLY : EVENT_F_RELATED), p);
		metrics_update(skb, 0, metric_dir);
		return TC_ACT_OK;
	}

	__u16 enforce_flag = egress ? EP_F_EGRESS_ENFORCE : EP_F_INGRESS_ENFORCE;
	__u32 rev = rt ? rt->policy_rev : 0;
	struct policy_result pol = { .verdict = 1, .proxy_port = 0, .match_type = POLICY_MATCH_ALL };

	if (ct.status == CT_ESTABLISHED && ct.entry && !unaccepted &&
	    (peer ? ct.entry->peer_policy_rev : ct.entry->policy_rev) == rev) {
		/* Verdict cached for this connection at the current policy revision. */
		*proxy_port = peer ? ct.entry->peer_proxy_port : ct.entry->proxy_port;
		if (traced && !*proxy_port)
			emit_trace(skb, ep->ep_id, point, src_id, dst_id, dir_flag, p);
		metrics_update(skb, 0, metric_dir);
		return TC_ACT_OK;
	}

	if (ep->flags & enforce_flag) {
		policy_lookup(ep, peer_id, egress, p, &pol);
		if (ct.status == CT_NEW || unaccepted)
			emit_verdict(skb, ep->ep_id, src_id, dst_id, p, pol.verdict,
				     pol.match_type,
				     dir_flag | ((pol.verdict < 0 && (ep->flags & EP_F_AUDIT))
							 ? EVENT_F_AUDIT : 0),
				     pol.proxy_port);
		if (pol.verdict < 0 && !(ep->flags & EP_F_AUDIT))
			return drop(skb, ep->ep_id, -pol.verdict, src_id, dst_id, dir_flag,
				    metric_dir, p);
	}

	*proxy_port = pol.proxy_port;
	if (ct.status == CT_NEW && !p->untracked && !p->is_icmp_error) {
		if (peer) {
			/* the entry its opener's egress just made */
			ct_set_peer_verdict(p, 0, rev, pol.proxy_port);
		} else {
			int ret = ct_create(p, egress, pair, skb->len, now, src_id, rev, pol.proxy_port);
			if (ret < 0)
				return drop(skb, ep->ep_id, -ret, src_id, dst_id, dir_flag, metric_dir, p);
		}
		if (!pol.proxy_port && point != TRACE_POINT_NONE)
			emit_trace(skb, ep->ep_id, point, src_id, dst_id, dir_flag, p);
	} else if (ct.status == CT_NEW) {
		/* untracked ICMP and ICMP errors: every packet is judged and traced */
		if (point != TRACE_POINT_NONE)
			emit_trace(skb, ep->ep_id, point, src_id, dst_id, dir_flag, p);
	} else if (ct.entry) {
		/* Re-checked after a policy change (or let in by a pair's
		 * acceptor): remember the new revision. What an acceptor sends
		 * on a connection it has not let in is judged packet by packet. */
		if (peer)
			ct_set_peer_verdict(p, ct.entry, rev, pol.proxy_port);
		else if (!unaccepted) {
			ct.entry->policy_rev = rev;
			ct.entry->proxy_port = pol.proxy_port;
		}
		if (traced && !pol.proxy_port)
			emit_trace(skb, ep->ep_id, point, src_id, dst_id, dir_flag, p);
	}
	metrics_update(skb, 0, metric_dir);
	return TC_ACT_OK;
}

/*
 * The host firewall. With --enable-host-firewall the agent writes the host
 * endpoint at key HOST_ENDPOINT_IFINDEX of cilium_lxc (identity host, its
 * policy entries under HOST_ENDPOINT_ID) and its policy applies to the
 * node's own traffic: what reaches the node from the network, the tunnel
 * and its pods (the host's ingress), and what the node sends to them (its
 * egress), with conntrack as for pods. Without the entry nothing changes.
 */
static __always_inline struct endpoint_info *host_endpoint(void)
{
	__u32 key = HOST_ENDPOINT_IFINDEX;
	return bpf_map_lookup_elem(&cilium_lxc, &key);
}

static __always_inline int host_enforce(struct __sk_buff *skb, struct pkt *p, int egress, __u32 peer_id)
{
	struct endpoint_info *h = host_endpoint();
	__u16 proxy = 0;
	if (!h)
		return TC_ACT_OK;
	/* its egress here is to a local endpoint, whose ingress follows */
	return enforce(skb, h, p, egress, peer_id, now_seconds(), &proxy, TRACE_POINT_NONE, 0, 0);
}

/* What the node sends out (to the network or the tunnel), for its host
 * firewall's egress. The L7 and DNS proxies' connections on behalf of pods
 * leave from the node's address too, but they are the pods' (judged at
 * their endpoints): only tracked here, so their replies pass the host's
 * ingress. */
static __always_inline int host_egress(struct __sk_buff *skb, struct pkt *p, __u32 dst_id)
{
	struct endpoint_info *h = host_endpoint();
	struct endpoint_info tracked;
	__u16 proxy = 0;
	if (!h)
		return TC_ACT_OK;
	if (from_proxy(skb)) {
		tracked = *h;
		tracked.flags &= ~(EP_F_INGRESS_ENFORCE | EP_F_EGRESS_ENFORCE);
		h = &tracked;
	}
	return enforce(skb, h, p, 1, dst_id, now_seconds(), &proxy, TRACE_TO_NETWORK, 0, 0);
}

/* Translated by the service load balancer and sent on from a tc ingress
 * (the mark is cleared: it means nothing past this device). */
static __always_inline int nodeport_forwarded(struct __sk_buff *skb)
{
	if ((skb->mark & MARK_MAGIC_MASK) != MARK_MAGIC_NODEPORT)
		return 0;
	skb->mark = 0;
	return 1;
}

/*
 * Delivers a packet from one local endpoint straight into another's network
 * namespace, as the node's router would, without the detour through the
 * node's stack: MACs rewritten, TTL decremented. The destination's ingress
 * policy has been applied by the caller. A TTL about to expire goes to the
 * stack instead, which answers with ICMP time exceeded.
 */
static __always_inline int redirect_to_endpoint(struct __sk_buff *skb, const struct endpoint_info *dst,
						__u16 src_ep, const struct pkt *p)
{
	if (p->family == 6) {
		__u8 hop_limit;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ip6hdr, hop_limit), &hop_limit, 1) < 0 ||
		    hop_limit <= 1)
			return TC_ACT_OK;
		hop_limit -= 1;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ip6hdr, hop_limit), &hop_limit, 1, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 0, dst->mac, 6, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 6, dst->node_mac, 6, 0) < 0)
			return drop(skb, src_ep, DROP_WRITE_ERROR, 0, 0, 0, METRIC_EGRESS, 0);
		return bpf_redirect_peer(dst->ifindex, 0);
	}
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (ip->ttl <= 1)
		return TC_ACT_OK;
	__u16 old = *(__u16 *)&ip->ttl;
	ip->ttl -= 1;
	__u16 new = *(__u16 *)&ip->ttl;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, new, 2) < 0 ||
	    bpf_skb_store_bytes(skb, 0, dst->mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, dst->node_mac, 6, 0) < 0)
		return drop(skb, src_ep, DROP_WRITE_ERROR, 0, 0, 0, METRIC_EGRESS, 0);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* Hands a packet of a proxied connection to the proxy, with a trace event
 * at the first packets (to-proxy), or drops it when the proxy is missing. */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct endpoint_info *ep, const struct pkt *p,
				    __u32 src_id, __u32 dst_id, __u8 dir_flag, __u16 proxy_port)
{
	/* the proxy listens on IPv4 only: IPv6 traffic its rules name fails closed */
	int ret = p->family == 6 ? -DROP_PROXY_LOOKUP_FAILED : redirect_to_proxy(skb, p, proxy_port);
	if (ret < 0)
		return drop(skb, ep->ep_id, -ret, src_id, dst_id, dir_flag, dir_flag ? METRIC_INGRESS : METRIC_EGRESS, p);
	if (p->protocol == IPPROTO_UDP || (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)))
		emit_trace(skb, ep->ep_id, TRACE_TO_PROXY, src_id, dst_id, dir_flag, p);
	return TC_ACT_OK;
}

static __always_inline int endpoint_has_ipv6(const struct endpoint_info *ep)
{
	const __u32 *a = (const __u32 *)ep->ipv6;
	return (a[0] | a[1] | a[2] | a[3]) != 0;
}

static __always_inline int icmp6_link_source_ok(const struct pkt *p, const struct endpoint_info *ep)
{
	const __u32 *s = p->saddr6;
	return (s[0] | s[1] | s[2] | s[3]) == 0 || (bpf_ntohl(s[0]) & 0xffc00000) == 0xfe800000 ||
	       addr6_eq(s, (const __u32 *)ep->ipv6);
}

static __always_inline int handle(struct __sk_buff *skb, int egress)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = bpf_map_lookup_elem(&cilium_lxc, &ifindex);
	__u8 metric_dir = egress ? METRIC_EGRESS : METRIC_INGRESS;
	__u8 dir_flag = egress ? 0 : EVENT_F_INGRESS;

	if (!ep)
		return drop(skb, 0, DROP_NO_CONFIG, 0, 0, dir_flag, metric_dir, 0);
	if (skb->protocol == ETH_P_ARP_BE)
		return TC_ACT_OK;

	/* IPv4; IPv6 for an endpoint that has an IPv6 address */
	struct pkt p;
	int ret = -DROP_UNKNOWN_L3;
	if (skb->protocol == ETH_P_IP_BE)
		ret = parse_ipv4(skb, &p);
	else if (skb->protocol == ETH_P_IPV6_BE && endpoint_has_ipv6(ep))
		ret = parse_ipv6(skb, &p);
	if (ret < 0)
		return drop(skb, ep->ep_id, -ret, 0, 0, dir_flag, metric_dir, 0);
	/* the link's own ICMPv6; from the pod, only from its own or a
	 * link-local (or the unspecified) address */
	if (is_icmp6_link_control(&p) && (!egress || icmp6_link_source_ok(&p, ep)))
		return TC_ACT_OK;

	__u32 now = now_seconds();
	__u16 proxy = 0;
	if (egress && (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_REINJECT) {
		/* Sent by the node's stack to this endpoint and judged at its tc
		 * egress, whose L7 ingress rules want the proxy: handed over
		 * here, at a tc ingress (the mark cannot come from the pod: it
		 * is cleared when a packet leaves the pod's namespace). */
		__u16 port = bpf_htons((__u16)(skb->mark >> 16));
		/* addressed to the pod's MAC: the local stack takes it as ours */
		bpf_skb_change_type(skb, PACKET_HOST);
		return to_proxy(skb, ep, &p, pkt_identity(&p, 1), ep->sec_identity, EVENT_F_INGRESS, port);
	}
	if (egress) {
		/* A pod may only send from its own address. */
		if (!pkt_saddr_is(&p, ep->ipv4, ep->ipv6))
			return drop(skb, ep->ep_id, DROP_INVALID_SIP, ep->sec_identity, 0,
				    dir_flag, metric_dir, &p);
		/* Another endpoint of this node: its identity is known without an
		 * ipcache lookup, its ingress policy is applied here, and the
		 * packet goes straight to it. */
		struct endpoint_info *dst = pkt_endpoint(&p, 0);
		__u32 dst_id = dst ? dst->sec_identity : pkt_identity(&p, 0);
		/* traced where it goes: a local endpoint's ingress traces it, else
		 * it goes to the stack (to the node too: under the host firewall
		 * the host's ingress then traces or drops it as well; telling the
		 * two apart here costs the verifier more than this program has) */
		if (!dst) {
			ret = enforce(skb, ep, &p, 1, dst_id, now, &proxy, TRACE_TO_STACK, 0, 0);
			if (ret != TC_ACT_OK)
				return ret;
			if (proxy)
				return to_proxy(skb, ep, &p, ep->sec_identity, dst_id, 0, proxy);
			/* to the node itself: its host firewall's ingress */
			return dst_id == IDENTITY_HOST ? host_enforce(skb, &p, 0, ep->sec_identity) : TC_ACT_OK;
		}
		/* a pair: one conntrack lookup for both ends' hooks */
		struct ct_result pair_ct;
		ct_lookup(&p, 1, CT_PAIR, skb->len, now, &pair_ct);
		ret = enforce(skb, ep, &p, 1, dst_id, now, &proxy, TRACE_POINT_NONE, CT_PAIR, &pair_ct);
		if (ret != TC_ACT_OK)
			return ret;
		/* The source's egress wants the L7 proxy: it goes there; the
		 * destination's ingress is applied to the proxy's own connection. */
		if (proxy)
			return to_proxy(skb, ep, &p, ep->sec_identity, dst_id, 0, proxy);
		ret = enforce(skb, dst, &p, 0, ep->sec_identity, now, &proxy, TRACE_POINT_NONE, CT_PAIR, &pair_ct);
		if (ret != TC_ACT_OK)
			return ret;
		if (proxy)
			return to_proxy(skb, dst, &p, ep->sec_identity, dst_id, EVENT_F_INGRESS, proxy);
		return redirect_to_endpoint(skb, dst, ep->ep_id, &p);
	}
	if (from_proxy(skb)) {
		/* The proxy's replies to a client (a reply of the client's own
		 * connection) or its upstream connection on behalf of a client,
		 * whose identity the mark carries. L7 rules of this endpoint were
		 * applied by the proxy, so an entry that would redirect allows. */
		__u32 id = proxy_identity(skb);
		struct endpoint_info *src = 0;
		if (!id) {
			/* the listener's, from the original destination: another
			 * endpoint of this node makes the connection a pair */
			src = pkt_endpoint(&p, 1);
			id = src ? src->sec_identity : pkt_identity(&p, 1);
		}
		return enforce(skb, ep, &p, 0, id, now, &proxy, TRACE_POINT_NONE, src ? CT_PAIR : 0, 0);
	}
	/* Traffic between local endpoints is delivered directly (above) and
	 * never arrives here: a local endpoint's address as source is spoofed. */
	if (pkt_endpoint(&p, 1))
		return drop(skb, ep->ep_id, DROP_INVALID_SIP, 0, ep->sec_identity, dir_flag, metric_dir, &p);
	__u32 src_id = pkt_identity(&p, 1);
	if (src_id == IDENTITY_HOST) {
		/* the node's own: its host firewall's egress first */
		ret = host_enforce(skb, &p, 1, ep->sec_identity);
		if (ret != TC_ACT_OK)
			return ret;
	}
	/* an ICMP error from the node may be about a pair's packet (its TTL ran
	 * out on the way to another endpoint of this node) */
	ret = enforce(skb, ep, &p, 0, src_id, now, &proxy, TRACE_POINT_NONE, CT_PAIR_ICMP_FROM_NODE, 0);
	if (ret == TC_ACT_OK && proxy) {
		/* L7 ingress rules for what the node's stack sends (its own
		 * connections, NodePort flows to this backend): the proxy is
		 * reached from a tc ingress only, and this is tc egress, so the
		 * packet goes back in at this device's ingress, marked. */
		skb->mark = MARK_MAGIC_REINJECT | ((__u32)bpf_ntohs(proxy) << 16);
		return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	}
	return ret;
}


SEC("classifier")
int cil_from_container(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

SEC("classifier")
int cil_to_container(struct __sk_buff *skb)
{
	return handle(skb, 0);
}

/*
 * Traffic from outside the node to a local endpoint's own address: the
 * endpoint's ingress policy is applied here, at the tc ingress of the device
 * it arrived on, where a connection that needs L7 rules can be handed to the
 * proxy (the endpoint's own hook is a tc egress, where it cannot), and an
 * allowed packet goes straight into the pod. `src_id` is the source's
 * identity: from the ipcache, or from the tunnel header; `saddr_id` what
 * the ipcache says of the source address (callers have looked it up).
 * Returns -1 when the packet is not for a local endpoint.
 */
static __always_inline int to_local_endpoint(struct __sk_buff *skb, struct pkt *p, __u32 src_id, __u32 saddr_id)
{
	__u32 *ifindex = bpf_map_lookup_elem(&cilium_lxc_ip, &p->daddr);
	struct endpoint_info *ep = ifindex ? bpf_map_lookup_elem(&cilium_lxc, ifindex) : 0;
	if (!ep)
		return -1;
	/* From outside the node, a source that is one of this node's pods or
	 * addresses is spoofed (the real ones never arrive this way). */
	if (bpf_map_lookup_elem(&cilium_lxc_ip, &p->saddr) || saddr_id == IDENTITY_HOST)
		return drop(skb, ep->ep_id, DROP_INVALID_SIP, src_id, ep->sec_identity, EVENT_F_INGRESS, METRIC_INGRESS, p);
	__u16 proxy = 0;
	int ret = enforce(skb, ep, p, 0, src_id, now_seconds(), &proxy, TRACE_POINT_NONE, 0, 0);
	if (ret != TC_ACT_OK)
		return ret;
	if (proxy)
		return to_proxy(skb, ep, p, src_id, ep->sec_identity, EVENT_F_INGRESS, proxy);
	return redirect_to_endpoint(skb, ep, ep->ep_id, p);
}

/* What arrives from outside the node, from a device or the tunnel: for a
 * local endpoint's address, delivered under its ingress policy; else the
 * per-packet service load balancer's, which may translate it to a backend
 * of this node, delivered the same way (and to its L7 proxy: a packet the
 * stack forwarded to the pod could not be handed to the proxy's socket for
 * the same addresses), or send it on; what is left is the node's own, under
 * its host firewall (a host-network backend's too). One copy of each
 * policy path, for the verifier. */
static __always_inline int from_outside(struct __sk_buff *skb, struct pkt *p, __u32 src_id, __u32 saddr_id)
{
	int ret;
	if (!bpf_map_lookup_elem(&cilium_lxc_ip, &p->daddr)) {
		ret = nodeport_ingress(skb, p);
		if (ret != NODEPORT_LOCAL && ret != TC_ACT_OK)
			return ret; /* translated and sent on, or dropped */
		/* not translated, or to a host-network backend: the node's own */
		if (!bpf_map_lookup_elem(&cilium_lxc_ip, &p->daddr)) {
			if (host_endpoint() && ipcache_identity(p->daddr) == IDENTITY_HOST)
				return host_enforce(skb, p, 0, src_id);
			return TC_ACT_OK;
		}
	}
	ret = to_local_endpoint(skb, p, src_id, saddr_id);
	return ret == -1 ? TC_ACT_OK : ret;
}

/* A packet for the node that cannot be parsed (a fragment, a truncated L4
 * header) would reach the node's sockets unjudged once the stack
 * reassembles it: while the host firewall enforces ingress, it is dropped. */
static __always_inline int host_unparsed(struct __sk_buff *skb, int reason)
{
	struct endpoint_info *h = host_endpoint();
	__u32 daddr;
	if (!h || !(h->flags & EP_F_INGRESS_ENFORCE))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, daddr), &daddr, sizeof(daddr)) < 0 ||
	    ipcache_identity(daddr) != IDENTITY_HOST)
		return TC_ACT_OK;
	return drop(skb, h->ep_id, reason, 0, IDENTITY_HOST, EVENT_F_INGRESS, METRIC_INGRESS, 0);
}

/* IPv6 from the network goes to the stack, which routes it to the pod's
 * veth, where its ingress policy is applied -- with the identity of the
 * source address, which from outside must not be this node's own or one of
 * its pods' (the real ones never arrive this way): spoofed, dropped here. */
static __always_inline int from_netdev6(struct __sk_buff *skb)
{
	__u32 saddr[4];
	struct ip6_key k;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ip6hdr, saddr), saddr, sizeof(saddr)) < 0)
		return TC_ACT_OK;
	__builtin_memcpy(k.addr, saddr, 16);
	__u32 id = ipcache6_identity(saddr);
	if (bpf_map_lookup_elem(&cilium_lxc_ip6, &k) || id == IDENTITY_HOST)
		return drop(skb, 0, DROP_INVALID_SIP, id, 0, EVENT_F_INGRESS, METRIC_INGRESS, 0);
	return TC_ACT_OK;
}

SEC("classifier")
int cil_from_netdev(struct __sk_buff *skb)
{
	if (skb->protocol == ETH_P_IPV6_BE)
		return from_netdev6(skb);
	if (skb->protocol != ETH_P_IP_BE)
		return TC_ACT_OK;
	/* parsed once for both uses */
	struct pkt p;
	int perr = parse_ipv4(skb, &p);
	if (perr < 0)
		/* not ours to judge, the stack sees it as is; unless for a node
		 * under its host firewall */
		return host_unparsed(skb, -perr);
	int ret = masq_ingress(skb, &p);
	if (ret != TC_ACT_OK)
		return ret;
	__u32 id = ipcache_identity(p.saddr);
	return from_outside(skb, &p, id, id);
}

SEC("classifier")
int cil_to_netdev(struct __sk_buff *skb)
{
	if (skb->protocol != ETH_P_IP_BE)
		return TC_ACT_OK;
	struct pkt p;
	if (parse_ipv4(skb, &p) < 0)
		return TC_ACT_OK;
	/* the node's own traffic (judged before pods' gets the node's address) */
	if (host_endpoint() && !nodeport_forwarded(skb) && ipcache_identity(p.saddr) == IDENTITY_HOST) {
		int hret = host_egress(skb, &p, ipcache_identity(p.daddr));
		if (hret != TC_ACT_OK)
			return hret;
	}
	/* what pods opened to the world leaves from the node; otherwise a
	 * local backend's reply to a NodePort client gets its frontend back */
	int ret = masq_egress(skb, &p);
	if (ret != -1)
		return ret;
	return nodeport_egress(skb, &p);
}

/*
 * Tunnel mode. Packets the node routes to another node's pod CIDR (pods'
 * traffic, the node's own, the proxy's upstream connections, NodePort flows
 * to remote backends) leave through cilium_vxlan, a VXLAN device in
 * collect-metadata mode: its tc egress names the outer destination (the
 * node the ipcache says the address lives on) and puts the source's
 * security identity in the VNI, so the receiving node enforces ingress
 * policy with it instead of looking the source up.
 */

/* The identity a packet entering the tunnel carries: the proxy's client, a
 * local endpoint, or what the ipcache says of the source (the node itself
 * is host). Node-local identities mean nothing elsewhere: a CIDR's is the
 * world, another node's own is remote-node. */
static __always_inline __u32 overlay_source_identity(const struct __sk_buff *skb, __u32 saddr)
{
	if (from_proxy(skb)) {
		__u32 id = proxy_identity(skb);
		if (id)
			return id;
	}
	__u32 *ifindex = bpf_map_lookup_elem(&cilium_lxc_ip, &saddr);
	struct endpoint_info *ep = ifindex ? bpf_map_lookup_elem(&cilium_lxc, ifindex) : 0;
	if (ep)
		return ep->sec_identity;
	__u32 id = ipcache_identity(saddr);
	if (identity_is_remote_node(id))
		return IDENTITY_REMOTE_NODE;
	return id >= IDENTITY_MIN_LOCAL ? IDENTITY_WORLD : id;
}

SEC("classifier")
int cil_to_overlay(struct __sk_buff *skb)
{
	if (skb->protocol != ETH_P_IP_BE)
		return drop(skb, 0, DROP_UNKNOWN_L3, 0, 0, 0, METRIC_EGRESS, 0);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return drop(skb, 0, DROP_INVALID, 0, 0, 0, METRIC_EGRESS, 0);
	__u32 saddr = ip->saddr;
	struct ipcache_key key = { .prefixlen = 32, .addr = ip->daddr };
	struct ipcache_value *dst = bpf_map_lookup_elem(&cilium_ipcache, &key);
	__u32 src_id = overlay_source_identity(skb, saddr);
	if (!dst || !dst->tunnel_endpoint)
		return drop(skb, 0, DROP_NO_TUNNEL_ENDPOINT, src_id, dst ? dst->sec_identity : IDENTITY_WORLD,
			    0, METRIC_EGRESS, 0);
	__u32 dst_id = dst->sec_identity;
	__u32 tunnel_endpoint = dst->tunnel_endpoint;
	if (host_endpoint() && !nodeport_forwarded(skb) && ipcache_identity(saddr) == IDENTITY_HOST) {
		/* the node's own traffic to another node's pod (or the proxy's,
		 * tracked) */
		struct pkt p;
		int ret = parse_ipv4(skb, &p);
		if (ret < 0)
			return drop(skb, 0, -ret, src_id, dst_id, 0, METRIC_EGRESS, 0);
		ret = host_egress(skb, &p, dst_id);
		if (ret != TC_ACT_OK)
			return ret;
	}
	struct bpf_tunnel_key tk = {};
	tk.remote_ipv4 = bpf_ntohl(tunnel_endpoint);
	tk.tunnel_id = src_id;
	tk.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_ZERO_CSUM_TX) < 0)
		return drop(skb, 0, DROP_WRITE_ERROR, src_id, dst_id, 0, METRIC_EGRESS, 0);
	return TC_ACT_OK;
}

SEC("classifier")
int cil_from_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tk = {};
	if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) < 0)
		return drop(skb, 0, DROP_NO_CONFIG, 0, 0, EVENT_F_INGRESS, METRIC_INGRESS, 0);
	/* The VNI is believed only from another node of the cluster: anyone
	 * else (a pod sending to the tunnel port) could claim any identity. */
	__u32 outer = bpf_htonl(tk.remote_ipv4);
	__u32 outer_id = ipcache_identity(outer);
	if (!identity_is_remote_node(outer_id))
		return drop(skb, 0, DROP_INVALID_SIP, outer_id, 0, EVENT_F_INGRESS, METRIC_INGRESS, 0);
	/* another node's own traffic is that node here (remote-node, or its
	 * own identity when nodes are told apart by their labels) */
	__u32 src_id = tk.tunnel_id == IDENTITY_HOST ? outer_id : tk.tunnel_id;
	/* the inner frame is addressed to the sending node's tunnel device */
	bpf_skb_change_type(skb, PACKET_HOST);
	if (skb->protocol != ETH_P_IP_BE)
		return drop(skb, 0, DROP_UNKNOWN_L3, src_id, 0, EVENT_F_INGRESS, METRIC_INGRESS, 0);
	struct pkt p;
	int ret = parse_ipv4(skb, &p);
	if (ret < 0)
		return drop(skb, 0, -ret, src_id, 0, EVENT_F_INGRESS, METRIC_INGRESS, 0);
	/* and a node speaks only for the addresses behind it */
	struct ipcache_key ik = { .prefixlen = 32, .addr = p.saddr };
	struct ipcache_value *iv = bpf_map_lookup_elem(&cilium_ipcache, &ik);
	if (iv && iv->tunnel_endpoint && iv->tunnel_endpoint != outer)
		return drop(skb, 0, DROP_INVALID_SIP, src_id, 0, EVENT_F_INGRESS, METRIC_INGRESS, &p);
	__u32 saddr_id = iv ? iv->sec_identity : IDENTITY_WORLD;
	return from_outside(skb, &p, src_id, saddr_id);
}

/*
 * Anchor for the ABI check: puts every shared type into the object's BTF,
 * including those only ever written to the ring buffer. Never attached.
 */
struct abi_anchor {
	struct endpoint_info endpoint_info;
	struct ipcache_key ipcache_key;
	struct ipcache6_key ipcache6_key;
	struct ip6_key ip6_key;
	struct ipcache_value ipcache_value;
	struct policy_key policy_key;
	struct policy_entry policy_entry;
	struct ct_key ct_key;
	struct ct6_key ct6_key;
	struct ct_entry ct_entry;
	struct runtime_config runtime_config;
	struct metrics_value metrics_value;
	struct event event;
	struct event_capture event_capture;
	struct lb4_key lb4_key;
	struct lb4_service lb4_service;
	struct lb4_backend lb4_backend;
	struct lb4_reverse_nat lb4_reverse_nat;
	struct lb_maglev_key lb_maglev_key;
	struct lb_affinity_key lb_affinity_key;
	struct lb_affinity_value lb_affinity_value;
	struct lb4_nat_key lb4_nat_key;
	struct lb4_nat_entry lb4_nat_entry;
	struct lb_sock_key lb_sock_key;
	struct lb4_src_range_key lb4_src_range_key;
	enum lb_nat_dir lb_nat_dir;
	enum lb_flags lb_flags;
	enum lb_backend_flags lb_backend_flags;
	enum reserved_identity reserved_identity;
	enum drop_reason drop_reason;
	enum event_type event_type;
	enum trace_point trace_point;
	enum policy_match policy_match;
	enum event_flags event_flags;
	enum endpoint_flags endpoint_flags;
	enum policy_entry_flags policy_entry_flags;
	enum ct_entry_flags ct_entry_flags;
	enum metric_dir metric_dir;
	enum monitor_aggregation monitor_aggregation;
};

__attribute__((noinline)) int cilium_abi_anchor(struct abi_anchor *a)
{
	return a != 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
