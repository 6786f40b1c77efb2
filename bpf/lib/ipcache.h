/* SPDX-License-Identifier: Apache-2.0 */
/* Address -> security identity. */
#ifndef CILIUM_IPCACHE_H
#define CILIUM_IPCACHE_H

#include "maps.h"

/* Identity of an address: the longest matching prefix, world when none matches. */
static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = bpf_map_lookup_elem(&cilium_ipcache, &key);
	return v ? v->sec_identity : IDENTITY_WORLD;
}

/* The same for an IPv6 address (world: IDENTITY_WORLD_IPV6). */
static __always_inline __u32 ipcache6_identity(const __u32 *addr)
{
	struct ipcache6_key key = { .prefixlen = 128 };
	__builtin_memcpy(key.addr, addr, 16);
	struct ipcache_value *v = bpf_map_lookup_elem(&cilium_ipcache6, &key);
	return v ? v->sec_identity : IDENTITY_WORLD_IPV6;
}

/* The identity of a packet's source (src) or destination address. */
static __always_inline __u32 pkt_identity(const struct pkt *p, int src)
{
	if (p->family == 6)
		return ipcache6_identity(src ? p->saddr6 : p->daddr6);
	return ipcache_identity(src ? p->saddr : p->daddr);
}

/* The local endpoint at a packet's source (src) or destination address. */
static __always_inline struct endpoint_info *pkt_endpoint(const struct pkt *p, int src)
{
	__u32 *ifindex;
	if (p->family == 6) {
		struct ip6_key k;
		__builtin_memcpy(k.addr, src ? p->saddr6 : p->daddr6, 16);
		ifindex = bpf_map_lookup_elem(&cilium_lxc_ip6, &k);
	} else {
		ifindex = bpf_map_lookup_elem(&cilium_lxc_ip, src ? &p->saddr : &p->daddr);
	}
	return ifindex ? bpf_map_lookup_elem(&cilium_lxc, ifindex) : 0;
}

/* Another node of the cluster: remote-node, or a node's own identity. */
static __always_inline int identity_is_remote_node(__u32 id)
{
	return id == IDENTITY_REMOTE_NODE ||
	       (id >= IDENTITY_MIN_REMOTE_NODE && id < IDENTITY_END_REMOTE_NODE);
}

/* Outside the cluster: the world, or a CIDR/FQDN identity. */
static __always_inline int identity_is_world(__u32 id)
{
	return id == IDENTITY_WORLD || id == IDENTITY_WORLD_IPV6 ||
	       (id >= IDENTITY_MIN_LOCAL && id < IDENTITY_MIN_REMOTE_NODE);
}

#endif /* CILIUM_IPCACHE_H */
