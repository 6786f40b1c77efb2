/* SPDX-License-Identifier: Apache-2.0 */
/* Policy lookup: the per-endpoint verdict for (peer identity, direction, proto, port). */
#ifndef CILIUM_POLICY_H
#define CILIUM_POLICY_H

#include "maps.h"

struct policy_result {
	__s32 verdict;        /* 1 allowed, -DROP_POLICY or -DROP_POLICY_DENY */
	__u16 proxy_port;     /* network byte order */
	__u8 match_type;
	__u8 pad;
};

/*
 * Looks up the verdict for traffic between the endpoint and a peer identity.
 * Two lookups: the peer's identity and the wildcard identity 0. A deny in
 * either wins; otherwise an allow in either allows, the specific one first.
 * The agent guarantees that inside one identity the longest match already
 * reflects deny precedence.
 */
static __always_inline void policy_lookup(const struct endpoint_info *ep, __u32 identity,
					  int egress, const struct pkt *p,
					  struct policy_result *res)
{
	struct policy_key key = {
		.prefixlen = POLICY_PREFIX_FULL,
		.ep_id = ep->ep_id,
		.gen_dir = (egress ? POLICY_KEY_DIR_EGRESS : 0) |
			   ((ep->flags & EP_F_POLICY_GEN) ? POLICY_KEY_GEN : 0),
		.pad0 = 0,
		.identity = identity,
		.protocol = p->protocol,
		.pad1 = 0,
		.dport = p->policy_port,
	};
	struct policy_entry *specific = bpf_map_lookup_elem(&cilium_policy, &key);
	key.identity = 0;
	struct policy_entry *wildcard = bpf_map_lookup_elem(&cilium_policy, &key);

	res->proxy_port = 0;
	res->pad = 0;
	if (specific && (specific->flags & POLICY_F_DENY)) {
		res->verdict = -DROP_POLICY_DENY;
		res->match_type = specific->match_type;
		return;
	}
	if (wildcard && (wildcard->flags & POLICY_F_DENY)) {
		res->verdict = -DROP_POLICY_DENY;
		res->match_type = wildcard->match_type;
		return;
	}
	struct policy_entry *allow = specific ? specific : wildcard;
	if (allow) {
		res->match_type = allow->match_type;
		if (allow->proxy_port == bpf_htons(POLICY_PROXY_PORT_PENDING)) {
			/* L7 rules without an L7 proxy: fail closed */
			res->verdict = -DROP_PROXY_LOOKUP_FAILED;
			return;
		}
		res->verdict = 1;
		res->proxy_port = allow->proxy_port;
		return;
	}
	res->verdict = -DROP_POLICY;
	res->match_type = POLICY_MATCH_NONE;
}

#endif /* CILIUM_POLICY_H */
