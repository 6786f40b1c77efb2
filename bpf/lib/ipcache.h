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

/* Another node of the cluster: remote-node, or a node's own identity. */
static __always_inline int identity_is_remote_node(__u32 id)
{
	return id == IDENTITY_REMOTE_NODE ||
	       (id >= IDENTITY_MIN_REMOTE_NODE && id < IDENTITY_END_REMOTE_NODE);
}

/* Outside the cluster: the world, or a CIDR/FQDN identity. */
static __always_inline int identity_is_world(__u32 id)
{
	return id == IDENTITY_WORLD || (id >= IDENTITY_MIN_LOCAL && id < IDENTITY_MIN_REMOTE_NODE);
}

#endif /* CILIUM_IPCACHE_H */
