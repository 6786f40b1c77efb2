/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level load balancing, attached to the agent's cgroup: a connect()
 * or sendto() to a service frontend is rewritten to a backend before any
 * packet exists, so local clients pay no per-packet translation and policy
 * sees the backend directly. recvmsg() and getpeername() show the frontend
 * again, so UDP clients get their answers from the address they asked; the
 * reverse entry goes when the socket does.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

static __always_inline __u32 maglev_size(void)
{
	__u32 idx = 0;
	struct runtime_config *rt = bpf_map_lookup_elem(&cilium_runtime, &idx);
	return rt ? rt->maglev_size : 0;
}

static __always_inline int sock4_xlate(struct bpf_sock_addr *ctx, int connecting)
{
	__u8 proto = ctx->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	__u32 addr = ctx->user_ip4;
	__u16 dport = (__u16)ctx->user_port;
	struct lb4_service *svc = lb4_lookup_service(addr, dport, proto);
	if (!svc)
		return 1;
	struct lb4_backend *backend;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 id = lb4_select(svc, addr, dport, proto, bpf_get_netns_cookie(ctx), cookie_hash(cookie),
			      maglev_size(), now_seconds(), &backend);
	if (!id || !backend) {
		/* no backend: refuse at once rather than black-hole the client */
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	struct lb_sock_key skey = { .cookie = cookie, .address = backend->address, .port = backend->port };
	struct lb4_reverse_nat new_rev = { .address = addr, .port = dport };
	struct lb4_reverse_nat *rev;
	if (connecting) {
		/* A connect() is nearly always the socket's first: inserted
		 * without looking first (a lookup of a key not there costs a
		 * cache miss per connection), and counted, as its socket's
		 * release knows the backend and removes the entry. */
		__u32 slot = (__u32)cookie % LB_SOCK_HINT_SLOTS;
		if (bpf_map_update_elem(&cilium_lb4_sock_revnat, &skey, &new_rev, BPF_NOEXIST) == 0) {
			__u32 *hint = bpf_map_lookup_elem(&cilium_lb4_sock_hint, &slot);
			if (hint)
				__sync_fetch_and_add(hint, 1);
			goto translate;
		}
	}
	/* A socket sending to this backend again (UDP) keeps its entry,
	 * pointed at the frontend it asked for last; sendto()'s new entries
	 * are left to the LRU (their sockets have no single destination). */
	rev = bpf_map_lookup_elem(&cilium_lb4_sock_revnat, &skey);
	if (rev) {
		rev->address = addr;
		rev->port = dport;
	} else if (!connecting) {
		bpf_map_update_elem(&cilium_lb4_sock_revnat, &skey, &new_rev, BPF_NOEXIST);
	}
translate:
	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return 1;
}

static __always_inline int sock4_revnat(struct bpf_sock_addr *ctx)
{
	struct lb_sock_key skey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct lb4_reverse_nat *rev = bpf_map_lookup_elem(&cilium_lb4_sock_revnat, &skey);
	if (rev) {
		ctx->user_ip4 = rev->address;
		ctx->user_port = rev->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int cil_sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, 1);
}

SEC("cgroup/sendmsg4")
int cil_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, 0);
}

SEC("cgroup/recvmsg4")
int cil_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return sock4_revnat(ctx);
}

SEC("cgroup/getpeername4")
int cil_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return sock4_revnat(ctx);
}

/* A translated socket goes away: so does its reverse entry (an LRU map that
 * fills up evicts on every insert, which new connections would pay for);
 * a socket never translated skips the map (cilium_lb4_sock_hint). An
 * unconnected UDP socket has no single destination: its entries are left to
 * the LRU. A count can be too high (a failed or repeated connect leaves its
 * entry to the LRU) or, after an upgrade that reused older entries, too low:
 * either only costs a needless removal or leaves an entry to the LRU. */
SEC("cgroup/sock_release")
int cil_sock_release(struct bpf_sock *ctx)
{
	if (ctx->family != 2 /* AF_INET */ || !ctx->dst_ip4)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 slot = (__u32)cookie % LB_SOCK_HINT_SLOTS;
	__u32 *hint = bpf_map_lookup_elem(&cilium_lb4_sock_hint, &slot);
	if (hint && !*hint)
		return 1; /* never translated (or its entry is gone) */
	struct lb_sock_key skey = {
		.cookie = cookie,
		.address = ctx->dst_ip4,
		.port = (__u16)ctx->dst_port,
	};
	if (bpf_map_delete_elem(&cilium_lb4_sock_revnat, &skey) == 0 && hint)
		__sync_fetch_and_sub(hint, 1);
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
