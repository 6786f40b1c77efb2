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

/* A parsed IPv4 packet: the tuple that conntrack and policy look at. */
struct pkt {
	__u32 saddr;
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
};

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

	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	p->tcp_flags = 0;
	p->icmp_type = 0;
	p->icmp_code = 0;
	p->is_icmp_error = 0;
	p->is_echo_reply = 0;
	p->untracked = 0;
	p->inner_saddr = 0;
	p->inner_daddr = 0;
	p->inner_sport = 0;
	p->inner_dport = 0;
	p->inner_protocol = 0;

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

static __always_inline __u32 now_seconds(void)
{
	return (__u32)(bpf_ktime_get_boot_ns() / 1000000000ULL);
}

#endif /* CILIUM_COMMON_H */
