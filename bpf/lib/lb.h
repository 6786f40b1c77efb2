/* SPDX-License-Identifier: Apache-2.0 */
/* Service load balancing: maps and backend selection. */
#ifndef CILIUM_LB_H
#define CILIUM_LB_H

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, 65536);
} cilium_lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, 65536);
} cilium_lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_maglev_key);
	__type(value, __u32);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cilium_lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(max_entries, 65536);
} cilium_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_sock_key);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, 262144);
} cilium_lb4_sock_revnat SEC(".maps");

/* How many reverse entries may exist for the connected sockets whose cookie
 * falls in each slot (cookie modulo the size): incremented when connect()
 * makes an entry, decremented when the release of its socket removes it. A socket whose slot
 * is zero has none, so its release skips the map, a random access to a large
 * table that every socket (most never translated) would otherwise pay for.
 * Entries the LRU evicts leave their slot higher than it should be, which
 * only costs a later release a needless removal. */
#define LB_SOCK_HINT_SLOTS 16384

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, LB_SOCK_HINT_SLOTS);
} cilium_lb4_sock_hint SEC(".maps");

static __always_inline struct lb4_service *lb4_lookup_service(__u32 addr, __u16 dport, __u8 proto)
{
	struct lb4_key key = { .address = addr, .dport = dport, .backend_slot = 0, .proto = proto };
	return bpf_map_lookup_elem(&cilium_lb4_services, &key);
}

/* A socket's Maglev hash: its cookie, mixed (murmur3's finalizer). Sockets
 * get consecutive cookies, which taken as they are would land in
 * consecutive Maglev slots, often all one backend's. */
static __always_inline __u32 cookie_hash(__u64 c)
{
	c ^= c >> 33;
	c *= 0xff51afd7ed558ccdULL;
	c ^= c >> 33;
	c *= 0xc4ceb9fe1a85ec53ULL;
	c ^= c >> 33;
	return (__u32)c;
}

/*
 * Picks a backend of a service: the client's affine backend while it lasts,
 * else Maglev (by `hash`) or a random slot. Returns the backend ID and the
 * backend, or 0 when there is none.
 */
static __always_inline __u32 lb4_select(const struct lb4_service *svc, __u32 addr, __u16 dport,
					__u8 proto, __u64 client, __u32 hash, __u32 maglev_size,
					__u32 now, struct lb4_backend **backend)
{
	__u32 id = 0;
	struct lb_affinity_key akey = { .client = client, .rev_nat_index = svc->rev_nat_index };

	*backend = 0;
	if (svc->count == 0)
		return 0;
	if (svc->flags & LB_F_AFFINITY) {
		struct lb_affinity_value *a = bpf_map_lookup_elem(&cilium_lb_affinity, &akey);
		if (a && now - a->last_used <= svc->affinity_timeout) {
			*backend = bpf_map_lookup_elem(&cilium_lb4_backends, &a->backend_id);
			if (*backend && !((*backend)->flags & LB_BACKEND_F_TERMINATING)) {
				a->last_used = now;
				return a->backend_id;
			}
		}
	}
	if ((svc->flags & LB_F_MAGLEV) && maglev_size) {
		struct lb_maglev_key mkey = { .rev_nat_index = svc->rev_nat_index, .slot = hash % maglev_size };
		__u32 *bid = bpf_map_lookup_elem(&cilium_lb4_maglev, &mkey);
		if (bid)
			id = *bid;
	}
	if (!id) {
		struct lb4_key key = {
			.address = addr,
			.dport = dport,
			.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1,
			.proto = proto,
		};
		struct lb4_service *slot = bpf_map_lookup_elem(&cilium_lb4_services, &key);
		if (!slot)
			return 0;
		id = slot->backend_id;
	}
	*backend = bpf_map_lookup_elem(&cilium_lb4_backends, &id);
	if (!*backend)
		return 0;
	if (svc->flags & LB_F_AFFINITY) {
		struct lb_affinity_value v = { .backend_id = id, .last_used = now };
		bpf_map_update_elem(&cilium_lb_affinity, &akey, &v, BPF_ANY);
	}
	return id;
}

#endif /* CILIUM_LB_H */
