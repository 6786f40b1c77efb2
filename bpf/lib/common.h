/* SPDX-License-Identifier: Apache-2.0 */
/* Includes, helper macros and packet parsing shared by every program. */
#ifndef CILIUM_COMMON_H
#define CILIUM_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

#ifndef PACKET_HOST
#define PACKET_HOST 0 /* linux/if_packet.h */
#endif

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* linux/icmp.h drags in libc headers; the fields we read are these. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	union {
		struct {
			__u16 id;
			__u16 sequence;
		} echo;
		__u32 gateway;
	} un;
};

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58 /* linux/in6.h */
#endif

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define ICMP_ECHOREPLY_T 0
#define ICMP_DEST_UNREACH_T 3
#define ICMP_ECHO_T 8
#define ICMP_TIME_EXCEEDED_T 11
#define ICMP_PARAMETERPROB_T 12

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* Headers we need in the linear part of the skb: Ethernet, IPv4 with options,
 * and an ICMP error carrying an inner IPv4 header plus 8 bytes of L4. */
#define PULL_LEN (ETH_HLEN + 60 + 8 + 60 + 8)

/* A parsed IPv4 or IPv6 packet: the tuple that conntrack and policy look at. */
struct pkt {
	__u32 saddr;          /* IPv4 (0 for IPv6) */
	__u32 daddr;
	__u16 sport;          /* network order; ICMP echo: identifier */
	__u16 dport;          /* network order; ICMP echo reply: identifier */
	__u16 policy_port;    /* network order: dport, or ICMP type */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 is_icmp_error;   /* inner tuple below is valid */
	__u8 is_echo_reply;
	__u8 untracked;       /* ICMP other than echo: no conntrack entry of its own */
	/* ICMP errors: the tuple of the packet that caused the error */
	__u32 inner_saddr;
	__u32 inner_daddr;
	__u16 inner_sport;
	__u16 inner_dport;
	__u8 inner_protocol;
	__u8 family;          /* 4 or 6 */
	__u8 hop_limit;       /* IPv6 */
	/* IPv6: the addresses (network order), and the quoted ones of an error */
	__u32 saddr6[4];
	__u32 daddr6[4];
	__u32 inner_saddr6[4];
	__u32 inner_daddr6[4];
};

static __always_inline int addr6_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Whether the packet's addresses are in the same family's field: the
 * source (or destination) is `addr`, IPv4 or IPv6 by the packet. */
static __always_inline int pkt_saddr_is(const struct pkt *p, __u32 v4, const __u8 *v6)
{
	if (p->family == 6)
		return addr6_eq(p->saddr6, (const __u32 *)v6);
	return p->saddr == v4;
}

static __always_inline int parse_l4_ports(void *l4, void *data_end, __u8 proto,
					  __u16 *sport, __u16 *dport)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		__u16 *ports = l4;
		if ((void *)(ports + 2) > data_end)
			return -DROP_CT_INVALID_HDR;
		*sport = ports[0];
		*dport = ports[1];
		return 0;
	}
	if (proto == IPPROTO_ICMP) {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		if (icmp->type == ICMP_ECHO_T) {
			*sport = icmp->un.echo.id;
			*dport = 0;
		} else if (icmp->type == ICMP_ECHOREPLY_T) {
			*sport = 0;
			*dport = icmp->un.echo.id;
		} else {
			*sport = 0;
			*dport = 0;
		}
		return 0;
	}
	*sport = 0;
	*dport = 0;
	return 0;
}

/*
 * Parses the IPv4 packet of an skb whose L2 header is Ethernet. Returns 0, or a
 * negative drop reason. The caller has checked skb->protocol is IPv4.
 */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	/* Pull only when headers sit outside the linear area: pulling makes
	 * the skb writable, which copies every cloned (TCP) skb. */
	__u32 want = skb->len < PULL_LEN ? skb->len : PULL_LEN;
	if (data + want > data_end) {
		if (bpf_skb_pull_data(skb, want) < 0)
			return -DROP_INVALID;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return -DROP_INVALID;
	if (ip->version != 4)
		return -DROP_INVALID;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(struct iphdr))
		return -DROP_INVALID;

	__builtin_memset(p, 0, sizeof(*p));
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	p->family = 4;

	/* Non-first fragments carry no L4 header; fragment tracking is not
	 * implemented, so they are dropped rather than let through unchecked. */
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return -DROP_FRAG_NOSUPPORT;

	void *l4 = (void *)ip + ihl;
	int ret = parse_l4_ports(l4, data_end, p->protocol, &p->sport, &p->dport);
	if (ret < 0)
		return ret;
	p->policy_port = p->dport;

	if (p->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else if (p->protocol == IPPROTO_ICMP) {
		struct icmphdr *icmp = l4;
		/* bounds checked by parse_l4_ports, re-checked for the verifier */
		if ((void *)(icmp + 1) > data_end)
			return -DROP_CT_INVALID_HDR;
		p->icmp_type = icmp->type;
		p->icmp_code = icmp->code;
		p->policy_port = bpf_htons(icmp->type);
		p->is_echo_reply = icmp->type == ICMP_ECHOREPLY_T;
		p->untracked = icmp->type != ICMP_ECHO_T && icmp->type != ICMP_ECHOREPLY_T;
		if (icmp->type == ICMP_DEST_UNREACH_T || icmp->type == ICMP_TIME_EXCEEDED_T ||
		    icmp->type == ICMP_PARAMETERPROB_T) {
			struct iphdr *inner = (void *)(icmp + 1);
			if ((void *)(inner + 1) > data_end)
				return -DROP_CT_INVALID_HDR;
			__u32 inner_ihl = inner->ihl * 4;
			if (inner_ihl < sizeof(struct iphdr))
				return -DROP_CT_INVALID_HDR;
			void *inner_l4 = (void *)inner + inner_ihl;
			ret = parse_l4_ports(inner_l4, data_end, inner->protocol,
					     &p->inner_sport, &p->inner_dport);
			if (ret < 0)
				return ret;
			p->inner_saddr = inner->saddr;
			p->inner_daddr = inner->daddr;
			p->inner_protocol = inner->protocol;
			p->is_icmp_error = 1;
		}
	}
	return 0;
}

#define ETH_P_IPV6_BE bpf_htons(0x86DD)
#define ICMPV6_DEST_UNREACH_T 1
#define ICMPV6_PKT_TOOBIG_T 2
#define ICMPV6_TIME_EXCEED_T 3
#define ICMPV6_PARAMPROB_T 4
#define ICMPV6_ECHO_REQUEST_T 128
#define ICMPV6_ECHO_REPLY_T 129

struct ip6hdr {
	__u8 ver_tc;
	__u8 tc_flow[3];
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* Extension headers skipped on the way to the L4 header. */
#define IPV6_EXT_MAX 4
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

/*
 * Parses the IPv6 packet of an skb whose L2 header is Ethernet, as
 * parse_ipv4 does: up to IPV6_EXT_MAX extension headers are skipped; a
 * non-first fragment is dropped (157), a fragment chain too long to follow
 * is invalid. Headers are copied with bpf_skb_load_bytes, so nothing needs
 * to be linear.
 */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p)
{
	struct ip6hdr ip6;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return -DROP_INVALID;
	if ((ip6.ver_tc >> 4) != 6)
		return -DROP_INVALID;
	__builtin_memset(p, 0, sizeof(*p));
	p->family = 6;
	p->hop_limit = ip6.hop_limit;
	__builtin_memcpy(p->saddr6, ip6.saddr, 16);
	__builtin_memcpy(p->daddr6, ip6.daddr, 16);

	__u32 off = ETH_HLEN + sizeof(ip6);
	__u8 nh = ip6.nexthdr;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 ext[8];
		if (nh != NEXTHDR_HOP && nh != NEXTHDR_ROUTING && nh != NEXTHDR_FRAGMENT &&
		    nh != NEXTHDR_AUTH && nh != NEXTHDR_DEST)
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
			return -DROP_INVALID;
		if (nh == NEXTHDR_FRAGMENT) {
			if (((ext[2] << 8) | ext[3]) & 0xfff8)
				return -DROP_FRAG_NOSUPPORT;
			off += 8;
		} else if (nh == NEXTHDR_AUTH) {
			off += ((__u32)ext[1] + 2) * 4;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		nh = ext[0];
	}
	if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_FRAGMENT ||
	    nh == NEXTHDR_AUTH || nh == NEXTHDR_DEST)
		return -DROP_INVALID;
	p->protocol = nh;

	if (nh == IPPROTO_TCP || nh == IPPROTO_UDP || nh == IPPROTO_SCTP) {
		__u8 l4[14];
		__u32 want = nh == IPPROTO_TCP ? 14 : 4;
		if (bpf_skb_load_bytes(skb, off, l4, want == 14 ? 14 : 4) < 0)
			return -DROP_CT_INVALID_HDR;
		p->sport = *(__u16 *)&l4[0];
		p->dport = *(__u16 *)&l4[2];
		if (nh == IPPROTO_TCP)
			p->tcp_flags = l4[13];
	} else if (nh == IPPROTO_ICMPV6) {
		__u8 icmp[8];
		if (bpf_skb_load_bytes(skb, off, icmp, sizeof(icmp)) < 0)
			return -DROP_CT_INVALID_HDR;
		p->icmp_type = icmp[0];
		p->icmp_code = icmp[1];
		if (icmp[0] == ICMPV6_ECHO_REQUEST_T)
			p->sport = *(__u16 *)&icmp[4];
		else if (icmp[0] == ICMPV6_ECHO_REPLY_T)
			p->dport = *(__u16 *)&icmp[4];
		p->is_echo_reply = icmp[0] == ICMPV6_ECHO_REPLY_T;
		p->untracked = icmp[0] != ICMPV6_ECHO_REQUEST_T && icmp[0] != ICMPV6_ECHO_REPLY_T;
		if (icmp[0] >= ICMPV6_DEST_UNREACH_T && icmp[0] <= ICMPV6_PARAMPROB_T) {
			/* the quoted packet: its header and first ports */
			struct ip6hdr inner;
			__u16 ports[2] = {};
			if (bpf_skb_load_bytes(skb, off + 8, &inner, sizeof(inner)) < 0)
				return -DROP_CT_INVALID_HDR;
			if (inner.nexthdr == IPPROTO_TCP || inner.nexthdr == IPPROTO_UDP ||
			    inner.nexthdr == IPPROTO_SCTP) {
				if (bpf_skb_load_bytes(skb, off + 8 + sizeof(inner), ports, sizeof(ports)) < 0)
					return -DROP_CT_INVALID_HDR;
			} else if (inner.nexthdr == IPPROTO_ICMPV6) {
				__u8 q[8];
				if (bpf_skb_load_bytes(skb, off + 8 + sizeof(inner), q, sizeof(q)) < 0)
					return -DROP_CT_INVALID_HDR;
				if (q[0] == ICMPV6_ECHO_REQUEST_T)
					ports[0] = *(__u16 *)&q[4];
				else if (q[0] == ICMPV6_ECHO_REPLY_T)
					ports[1] = *(__u16 *)&q[4];
			}
			__builtin_memcpy(p->inner_saddr6, inner.saddr, 16);
			__builtin_memcpy(p->inner_daddr6, inner.daddr, 16);
			p->inner_sport = ports[0];
			p->inner_dport = ports[1];
			p->inner_protocol = inner.nexthdr;
			p->is_icmp_error = 1;
		}
	}
	p->policy_port = nh == IPPROTO_ICMPV6 ? bpf_htons(p->icmp_type) : p->dport;
	return 0;
}

/* fe80::/10 (link-local unicast) or ff02::/16 (link-local multicast). */
static __always_inline int ipv6_is_link_scope(const __u32 *a)
{
	__u32 w = bpf_ntohl(a[0]);
	return (w & 0xffc00000) == 0xfe800000 || (w >> 16) == 0xff02;
}

/* Neighbour discovery and multicast listener messages: the link's own
 * plumbing (as ARP for IPv4), not subject to policy -- only as the link
 * carries them: to a link-scope destination, with the hop limit that
 * proves they were never forwarded (255 for neighbour discovery, 1 for
 * MLD). Anything else of these types is judged like any ICMPv6. */
static __always_inline int is_icmp6_link_control(const struct pkt *p)
{
	if (p->family != 6 || p->protocol != IPPROTO_ICMPV6 || !ipv6_is_link_scope(p->daddr6))
		return 0;
	if (p->icmp_type >= 133 && p->icmp_type <= 137)
		return p->hop_limit == 255;
	if ((p->icmp_type >= 130 && p->icmp_type <= 132) || p->icmp_type == 143)
		return p->hop_limit == 1;
	return 0;
}

/* Seconds of CLOCK_MONOTONIC at tick resolution, the clock of conntrack
 * lifetimes and every other timestamp in seconds the maps keep: reading the
 * tick costs nothing, while the precise clocks read the TSC (in a profile of
 * new connections, ktime_get_boot_fast_ns was 0.8% of the CPU's samples,
 * this and the events' timestamps together). */
static __always_inline __u32 now_seconds(void)
{
	return (__u32)(bpf_ktime_get_coarse_ns() / 1000000000ULL);
}

#endif /* CILIUM_COMMON_H */
