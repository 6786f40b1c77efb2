/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of the datapath. Sizes here are defaults: the agent overrides
 * max_entries at load time from its configuration and pins the maps under its
 * bpffs directory, so enforcement survives agent restarts.
 */
#ifndef CILIUM_MAPS_H
#define CILIUM_MAPS_H

#include "common.h"

/* host-side ifindex -> endpoint */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(max_entries, 65536);
} cilium_lxc SEC(".maps");

/* local endpoint IPv4 (network order) -> host-side ifindex, for delivery
 * straight into the destination pod */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 65536);
} cilium_lxc_ip SEC(".maps");

/* local endpoint IPv6 -> host-side ifindex */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ip6_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
} cilium_lxc_ip6 SEC(".maps");

/* IPv6 prefix -> identity */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache6_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 512000);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cilium_ipcache6 SEC(".maps");

/* IPv4 prefix -> identity */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 512000);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cilium_ipcache SEC(".maps");

/* (endpoint, generation, direction, identity, protocol, port prefix) -> verdict */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cilium_policy SEC(".maps");

/* connection tracking, evicting least recently used when full */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 262144);
} cilium_ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct6_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 262144);
} cilium_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct runtime_config);
	__uint(max_entries, 1);
} cilium_runtime SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_MAX_ENTRIES);
} cilium_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} cilium_event_stats SEC(".maps");

/* drops, traces and policy verdicts for the agent's monitor and Hubble */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 21);
} cilium_events SEC(".maps");

#endif /* CILIUM_MAPS_H */
