//! The agent's Hubble: datapath events become flows in the ring, counted by
//! Hubble's metrics and written by the exporter; the gRPC and metrics
//! servers run beside the API. Nothing here may block the event reader: the
//! exporter has its own thread behind a bounded queue, and the names
//! snapshot is refreshed only when the daemon's lock is free.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use cilium_api::HubbleStatus;
use cilium_hubble::Flow;
use cilium_hubble::metrics::Metrics;
use cilium_hubble::names::Names;
use cilium_hubble::parser::{L7Flow, Parser};
use cilium_hubble::server::{Hubble, PeerInfo};
use prometheus_client::registry::Registry;
use tracing::{error, warn};

use crate::config::HubbleSettings;

/// Flows waiting for the exporter.
const EXPORT_QUEUE: usize = 16_384;

/// Hubble inside the agent.
pub struct HubbleRuntime {
    pub hubble: Arc<Hubble>,
    metrics: Metrics,
    pub registry: Registry,
    export: Option<SyncSender<Arc<Flow>>>,
    lost_export: AtomicU64,
    settings: HubbleSettings,
}

impl HubbleRuntime {
    /// Builds the ring, metrics and exporter (checked already by config).
    pub fn new(node_name: &str, settings: HubbleSettings) -> anyhow::Result<HubbleRuntime> {
        let me = PeerInfo {
            name: node_name.to_string(),
            address: settings
                .listen
                .map(|a| a.to_string())
                .unwrap_or_else(|| format!("unix://{}", settings.socket_path.display())),
        };
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, &settings.metrics)?;
        let export = match &settings.export {
            None => None,
            Some(cfg) => {
                let mut exporter = cilium_hubble::export::Exporter::open(cfg.clone())?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Flow>>(EXPORT_QUEUE);
                std::thread::Builder::new()
                    .name("hubble-export".into())
                    .spawn(move || {
                        while let Ok(f) = rx.recv() {
                            if let Err(e) = exporter.export(&f) {
                                error!(error = %e, "exporting a flow");
                            }
                            // flush when the queue is drained, so the file is current
                            if let Ok(f) = rx.try_recv() {
                                if let Err(e) = exporter.export(&f) {
                                    error!(error = %e, "exporting a flow");
                                }
                            } else if let Err(e) = exporter.flush() {
                                error!(error = %e, "flushing the flow export");
                            }
                        }
                    })?;
                Some(tx)
            }
        };
        Ok(HubbleRuntime {
            hubble: Arc::new(Hubble::new(node_name, settings.capacity, vec![me])),
            metrics,
            registry,
            export,
            lost_export: AtomicU64::new(0),
            settings,
        })
    }

    pub fn settings(&self) -> &HubbleSettings {
        &self.settings
    }

    /// Takes a batch of flows: metrics, export, then the ring.
    pub fn ingest(&self, flows: Vec<Arc<Flow>>) {
        for f in &flows {
            self.metrics.observe(f);
            self.export(f);
        }
        self.hubble.ring.push_all(flows);
    }

    /// Takes an L7 flow: metrics from the record, and the ring builds the
    /// flow for each reader (the exporter, when there is one, now).
    pub fn ingest_l7(&self, f: L7Flow) {
        self.metrics.observe_l7(&f.view());
        if self.export.is_some() {
            self.export(&Arc::new(f.clone().build()));
        }
        self.hubble.ring.push_l7(f);
    }

    fn export(&self, f: &Arc<Flow>) {
        if let Some(tx) = &self.export {
            match tx.try_send(f.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.lost_export.fetch_add(1, Ordering::Relaxed);
                    self.metrics.lost("observer_events_queue", 1);
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Records the datapath's running count of lost events.
    pub fn set_lost_datapath(&self, total: u64) {
        let before = self.hubble.lost_datapath.swap(total, Ordering::Relaxed);
        if total > before {
            self.metrics.lost("perf_event_ring_buffer", total - before);
        }
    }

    pub fn status(&self) -> HubbleStatus {
        HubbleStatus {
            flows: self.hubble.ring.len() as u64,
            max_flows: self.hubble.ring.capacity() as u64,
            seen_flows: self.hubble.ring.seen(),
            lost_datapath_events: self.hubble.lost_datapath.load(Ordering::Relaxed),
            lost_export: self.lost_export.load(Ordering::Relaxed),
            socket: self.settings.socket_path.display().to_string(),
            listen_address: self.settings.listen.map(|a| a.to_string()),
        }
    }
}

/// The parser and the names it uses, refreshed when the daemon changed.
/// Shared by the event reader and the L7 proxy's access log.
pub struct FlowMaker {
    parser: Parser,
    names: std::sync::RwLock<Arc<Names>>,
    seen_change: AtomicU64,
    changes: Arc<AtomicU64>,
}

impl FlowMaker {
    pub fn new(changes: Arc<AtomicU64>) -> FlowMaker {
        FlowMaker { parser: Parser::default(), names: std::sync::RwLock::new(Arc::new(Names::default())), seen_change: AtomicU64::new(0), changes }
    }

    /// Refreshes the names if the daemon changed and its lock is free
    /// (never waits: a busy daemon means one more batch with old names).
    pub fn refresh<D: cilium_datapath::Datapath>(&self, daemon: &Mutex<crate::daemon::Daemon<D>>) {
        let now = self.changes.load(Ordering::Relaxed);
        if now == self.seen_change.load(Ordering::Relaxed) {
            return;
        }
        let names = match daemon.try_lock() {
            Ok(d) => d.hubble_names(),
            Err(std::sync::TryLockError::WouldBlock) => return,
            Err(std::sync::TryLockError::Poisoned(p)) => {
                warn!("daemon lock poisoned; using it anyway for names");
                p.into_inner().hubble_names()
            }
        };
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(names);
        self.seen_change.store(now, Ordering::Relaxed);
    }

    fn names(&self) -> Arc<Names> {
        self.names.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn flow(&self, ev: &cilium_flow::MonitorEvent) -> Flow {
        self.parser.flow(ev, &self.names())
    }

    pub fn http_flow(&self, r: cilium_hubble::parser::HttpRecord) -> L7Flow {
        self.parser.http_flow(r, &self.names())
    }

    pub fn dns_flow(&self, r: cilium_hubble::parser::DnsRecord) -> L7Flow {
        self.parser.dns_flow(r, &self.names())
    }

    pub fn kafka_flow(&self, r: cilium_hubble::parser::KafkaRecord) -> L7Flow {
        self.parser.kafka_flow(r, &self.names())
    }
}
