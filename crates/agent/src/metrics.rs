//! The agent's Prometheus metrics (served on --prometheus-serve-addr,
//! upstream's :9962). State gauges are read from the daemon at scrape time;
//! the datapath's drop/forward counters and map operation counts are
//! carried over as deltas; policy changes and API timings are counted where
//! they happen.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use cilium_abi::{DropReason, MetricDir};
use cilium_datapath::Datapath;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::daemon::Daemon;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub endpoint_state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapOpLabels {
    pub map_name: String,
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub method: String,
    pub path: String,
    pub return_code: String,
}

/// The agent's metrics and their registry.
#[derive(Debug)]
pub struct AgentMetrics {
    pub registry: Registry,
    endpoint: Gauge,
    endpoint_state: Family<EndpointStateLabels, Gauge>,
    identity: Family<IdentityLabels, Gauge>,
    policy: Gauge,
    policy_change: Family<OutcomeLabels, Counter>,
    policy_delay: Histogram,
    drops: Family<DropLabels, Counter>,
    forwards: Family<DirectionLabels, Counter>,
    map_ops: Family<MapOpLabels, Counter>,
    map_pressure: Family<MapLabels, Gauge<f64, AtomicU64>>,
    api_time: Family<ApiLabels, Histogram>,
    /// Last datapath totals carried into the counters.
    carried: Mutex<HashMap<String, u64>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn dir_name(d: u8) -> &'static str {
    match MetricDir::from_code(d) {
        Some(MetricDir::Ingress) => "INGRESS",
        Some(MetricDir::Egress) => "EGRESS",
        _ => "UNKNOWN",
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::default();
        let reg = registry.sub_registry_with_prefix("cilium");
        let m = AgentMetrics {
            endpoint: Gauge::default(),
            endpoint_state: Family::default(),
            identity: Family::default(),
            policy: Gauge::default(),
            policy_change: Family::default(),
            policy_delay: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            drops: Family::default(),
            forwards: Family::default(),
            map_ops: Family::default(),
            map_pressure: Family::default(),
            api_time: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 4.0, 10))
            }),
            carried: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        reg.register(
            "endpoint",
            "Endpoints managed by this agent",
            m.endpoint.clone(),
        );
        reg.register(
            "endpoint_state",
            "Endpoints by state",
            m.endpoint_state.clone(),
        );
        reg.register(
            "identity",
            "Identities known to this agent, by type",
            m.identity.clone(),
        );
        reg.register("policy", "Policy rules loaded", m.policy.clone());
        reg.register(
            "policy_change",
            "Policy changes through the API, by outcome",
            m.policy_change.clone(),
        );
        reg.register(
            "policy_implementation_delay",
            "Seconds from a policy change's arrival to its enforcement in the datapath",
            m.policy_delay.clone(),
        );
        reg.register(
            "drop_count",
            "Packets dropped by the datapath, by reason and direction",
            m.drops.clone(),
        );
        reg.register(
            "forward_count",
            "Packets forwarded by the datapath, by direction",
            m.forwards.clone(),
        );
        reg.register(
            "bpf_map_ops",
            "BPF map operations, by map, operation and outcome",
            m.map_ops.clone(),
        );
        reg.register(
            "bpf_map_pressure",
            "Fill ratio of BPF maps",
            m.map_pressure.clone(),
        );
        reg.register(
            "api_process_time_seconds",
            "Seconds the agent's API took per request",
            m.api_time.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    /// One policy change through the API and how long it took to enforce.
    pub fn policy_changed(&self, ok: bool, seconds: f64) {
        self.policy_change
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "success" } else { "fail" }.into(),
            })
            .inc();
        if ok {
            self.policy_delay.observe(seconds);
        }
    }

    pub fn api_request(&self, method: &str, path: &str, code: u16, seconds: f64) {
        self.api_time
            .get_or_create(&ApiLabels {
                method: method.into(),
                path: path.into(),
                return_code: code.to_string(),
            })
            .observe(seconds);
    }

    fn carry(&self, counter: &Counter, key: String, total: u64) {
        let mut c = self.carried.lock().unwrap_or_else(|p| p.into_inner());
        let before = c.insert(key, total).unwrap_or(0);
        // a restarted map starts from zero again: count it afresh
        counter.inc_by(if total >= before {
            total - before
        } else {
            total
        });
    }

    /// Reads the daemon's state into the gauges and the datapath's totals
    /// into the counters, just before a scrape.
    pub fn refresh<D: Datapath>(&self, d: &Daemon<D>) {
        let ids = d.endpoint_ids();
        self.endpoint.set(ids.len() as i64);
        let mut states: HashMap<String, i64> =
            HashMap::from([("ready".into(), 0), ("policy-error".into(), 0)]);
        for id in ids {
            if let Some(e) = d.endpoint_view(id) {
                *states.entry(e.state).or_default() += 1;
            }
        }
        for (state, n) in states {
            self.endpoint_state
                .get_or_create(&EndpointStateLabels {
                    endpoint_state: state,
                })
                .set(n);
        }
        let mut by_type: HashMap<&str, i64> =
            HashMap::from([("reserved", 0), ("cluster_local", 0), ("node_local", 0)]);
        for id in d.identities().iter() {
            let t = if id.id < 256 {
                "reserved"
            } else if id.id >= 1 << 24 {
                "node_local"
            } else {
                "cluster_local"
            };
            *by_type.entry(t).or_default() += 1;
        }
        for (t, n) in by_type {
            self.identity
                .get_or_create(&IdentityLabels { r#type: t.into() })
                .set(n);
        }
        self.policy.set(d.repository().len() as i64);
        if let Ok(entries) = d.datapath().metrics() {
            for (k, v) in entries {
                let direction = dir_name(k.dir);
                if k.reason == 0 {
                    self.carry(
                        &self.forwards.get_or_create(&DirectionLabels {
                            direction: direction.into(),
                        }),
                        format!("fwd/{direction}"),
                        v.packets,
                    );
                } else {
                    let reason = DropReason::from_code(k.reason)
                        .map(|r| r.description().to_string())
                        .unwrap_or_else(|| format!("reason {}", k.reason));
                    let c = self.drops.get_or_create(&DropLabels {
                        reason: reason.clone(),
                        direction: direction.into(),
                    });
                    self.carry(&c, format!("drop/{reason}/{direction}"), v.packets);
                }
            }
        }
        for (map, op, outcome, n) in d.datapath().map_ops() {
            let c = self.map_ops.get_or_create(&MapOpLabels {
                map_name: map.into(),
                operation: op.into(),
                outcome: outcome.into(),
            });
            self.carry(&c, format!("ops/{map}/{op}/{outcome}"), n);
        }
        for p in d.datapath().pressure() {
            let ratio = if p.max_entries > 0 {
                p.entries as f64 / f64::from(p.max_entries)
            } else {
                0.0
            };
            self.map_pressure
                .get_or_create(&MapLabels {
                    map_name: p.name.into(),
                })
                .set(ratio);
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
