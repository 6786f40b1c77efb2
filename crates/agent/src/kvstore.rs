//! The agent's side of the kvstore: cluster-scope identities numbered by
//! etcd, so the same labels have the same number on every node; this
//! node and its endpoints published under a lease (they vanish when the
//! agent stops renewing it), and the other nodes' read back into the
//! daemon's view of the cluster. A round (publish what changed, read
//! everything back) runs when etcd's watches report a change under the
//! node or endpoint prefixes, when this node's own state changed (the
//! daemon's change counter), and every few seconds regardless (watches
//! re-established after etcd was away may have missed changes); those
//! timed rounds also check that etcd still holds this agent's identities.
//!
//! Keys: `cilium/state/nodes/v1/default/<node>` (name, address, pod CIDR)
//! and `cilium/state/ip/v1/default/<ip>` (identity, labels, node), JSON.
//!
//! The etcd client runs on a runtime of its own: the daemon asks for a
//! number while holding its lock, and tasks of the agent's runtime may be
//! waiting for that lock, so the client must not need the agent's workers
//! to make progress.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cilium_datapath::Loaded;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::daemon::Daemon;
use crate::daemon::cluster::KvView;

use cilium_identity::{ClusterNumbers, MAX_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY, NumericIdentity, labels_key};
use cilium_kvstore::Etcd;
use cilium_labels::LabelSet;

/// Asks etcd for cluster-scope numbers.
#[derive(Debug)]
pub struct KvIdentities {
    etcd: Etcd,
    rt: Option<tokio::runtime::Runtime>,
}

impl KvIdentities {
    pub fn new(address: &str, timeout: Duration) -> anyhow::Result<KvIdentities> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("kvstore").enable_all().build()?;
        let etcd = {
            let _in = rt.enter();
            Etcd::connect(address, timeout)?
        };
        Ok(KvIdentities { etcd, rt: Some(rt) })
    }
}

impl Drop for KvIdentities {
    fn drop(&mut self) {
        // may be dropped inside the agent's runtime, where a blocking
        // shutdown is not allowed
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl ClusterNumbers for KvIdentities {
    /// Blocks until etcd answers (at most its operation timeout), on a
    /// thread of its own so it works from any context.
    fn number(&self, labels: &LabelSet) -> Result<NumericIdentity, String> {
        self.allocate(labels, None)
    }

    fn number_preferring(&self, labels: &LabelSet, preferred: NumericIdentity) -> Result<NumericIdentity, String> {
        self.allocate(labels, Some(preferred))
    }
}

impl KvIdentities {
    fn allocate(&self, labels: &LabelSet, preferred: Option<NumericIdentity>) -> Result<NumericIdentity, String> {
        let key = labels_key(labels);
        let etcd = self.etcd.clone();
        let handle = self.rt.as_ref().ok_or("the kvstore client is shut down")?.handle().clone();
        std::thread::scope(|s| s.spawn(move || handle.block_on(etcd.allocate_identity_preferring(&key, preferred, MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY))).join())
            .map_err(|_| "the kvstore client panicked".to_string())?
            .map_err(|e| e.to_string())
    }
}

const NODES_PREFIX: &str = "cilium/state/nodes/v1/default/";
const IP_PREFIX: &str = "cilium/state/ip/v1/default/";
/// A dead agent's entries are gone this long after its last renewal.
const LEASE_TTL: i64 = 10;
/// A round at least this often, watched changes or not.
const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// How often this node's change counter is looked at.
const LOCAL_POLL: Duration = Duration::from_millis(20);

/// An endpoint as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IpEntry {
    ip: IpAddr,
    identity: u32,
    labels: String,
    node: String,
}

impl KvIdentities {
    /// Publishes this node and its endpoints and reads the others', until
    /// the agent ends. Errors are logged and retried; the daemon keeps its
    /// last view meanwhile.
    pub fn start_sync(self: &Arc<Self>, daemon: Arc<Mutex<Daemon<Loaded>>>, changes: Arc<std::sync::atomic::AtomicU64>, gc_interval: Duration) {
        let Some(rt) = self.rt.as_ref() else { return };
        let notify = Arc::new(tokio::sync::Notify::new());
        for prefix in [NODES_PREFIX, IP_PREFIX] {
            rt.spawn(watch_loop(self.etcd.clone(), prefix, notify.clone()));
        }
        let me = self.clone();
        let d = daemon.clone();
        rt.spawn(async move { me.sync_loop(d, changes, notify).await });
        let me = self.clone();
        rt.spawn(async move { me.gc_loop(daemon, gc_interval).await });
    }

    /// Every `interval`, the agent whose node name sorts first frees the
    /// identities no published endpoint and no identity of its own uses,
    /// once they were unused, unchanged, in two rounds in a row (upstream's
    /// operator does this). Taking a number rewrites its key, so a number
    /// taken between two rounds, or between a round's listing and its
    /// delete, is never freed.
    async fn gc_loop(&self, daemon: Arc<Mutex<Daemon<Loaded>>>, interval: Duration) {
        let mut unused: BTreeMap<u32, i64> = BTreeMap::new();
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.gc_round(&daemon, &mut unused).await {
                warn!(error = %e, "identity garbage collection");
            }
        }
    }

    /// Puts back identities of this agent etcd no longer has under the
    /// same labels (etcd lost its data, say), keeping their numbers when
    /// free (a re-claim).
    async fn check_own_identities(&self, daemon: &Arc<Mutex<Daemon<Loaded>>>) -> anyhow::Result<()> {
        let d = daemon.clone();
        let held = tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).cluster_identities()).await?;
        let in_etcd = self.etcd.identities().await?;
        let names: BTreeMap<u32, &str> = in_etcd.iter().map(|(id, labels, _)| (*id, labels.as_str())).collect();
        if held.iter().any(|(id, labels)| names.get(id) != Some(&labels.as_str())) {
            warn!("identities of this node are missing from the kvstore: re-claiming them");
            let d = daemon.clone();
            tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).kvstore_reclaim()).await??;
        }
        Ok(())
    }

    async fn gc_round(&self, daemon: &Arc<Mutex<Daemon<Loaded>>>, unused: &mut BTreeMap<u32, i64>) -> anyhow::Result<()> {
        let d = daemon.clone();
        let (collector, held) = tokio::task::spawn_blocking(move || {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            let nodes = d.nodes();
            let me = nodes.first().map(|n| n.name.clone());
            (nodes.iter().map(|n| n.name.clone()).min() == me, d.cluster_identities())
        })
        .await?;
        if !collector {
            unused.clear();
            return Ok(());
        }
        let in_etcd = self.etcd.identities().await?;
        let mut used: std::collections::BTreeSet<u32> = held.iter().map(|(id, _)| *id).collect();
        used.extend(self.etcd.list(IP_PREFIX).await?.iter().filter_map(|(_, v)| serde_json::from_slice::<IpEntry>(v).ok()).map(|e| e.identity));
        let mut next = BTreeMap::new();
        for (id, labels, revision) in in_etcd {
            if used.contains(&id) {
                continue;
            }
            if unused.get(&id) == Some(&revision) {
                if self.etcd.release_identity(id, &labels, revision).await? {
                    tracing::info!(id, %labels, "unused identity freed in the kvstore");
                }
            } else {
                next.insert(id, revision);
            }
        }
        *unused = next;
        Ok(())
    }

    async fn sync_loop(&self, daemon: Arc<Mutex<Daemon<Loaded>>>, changes: Arc<std::sync::atomic::AtomicU64>, notify: Arc<tokio::sync::Notify>) {
        let mut lease: Option<(i64, tokio::task::JoinHandle<cilium_kvstore::KvError>)> = None;
        let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut reclaimed = false;
        let mut seen = u64::MAX;
        let mut next = tokio::time::Instant::now();
        loop {
            let now = changes.load(std::sync::atomic::Ordering::Relaxed);
            if now != seen || tokio::time::Instant::now() >= next {
                let timed = tokio::time::Instant::now() >= next;
                seen = now;
                next = tokio::time::Instant::now() + RESYNC_EVERY;
                if timed && reclaimed {
                    if let Err(e) = self.check_own_identities(&daemon).await {
                        warn!(error = %e, "kvstore identity check");
                    }
                }
                if let Err(e) = self.round(&daemon, &mut reclaimed, &mut lease, &mut published).await {
                    warn!(error = %e, "kvstore sync");
                    // etcd away: try again in a second, not at every poll
                    next = tokio::time::Instant::now() + Duration::from_secs(1);
                }
                // (what the round applied may move the counter: one more
                // round then finds nothing to do)
                continue;
            }
            tokio::select! {
                _ = notify.notified() => next = tokio::time::Instant::now(),
                _ = tokio::time::sleep(LOCAL_POLL) => {}
            }
        }
    }

    async fn round(
        &self,
        daemon: &Arc<Mutex<Daemon<Loaded>>>,
        reclaimed: &mut bool,
        lease: &mut Option<(i64, tokio::task::JoinHandle<cilium_kvstore::KvError>)>,
        published: &mut BTreeMap<String, Vec<u8>>,
    ) -> anyhow::Result<()> {
        if lease.as_ref().is_some_and(|(_, k)| k.is_finished()) {
            if let Some((_, k)) = lease.take() {
                let reason = k.await.map(|e| e.to_string()).unwrap_or_default();
                warn!(%reason, "kvstore lease lost: publishing again");
            }
            published.clear();
        }
        if !*reclaimed {
            // restored numbers first: nothing is published under another meaning
            let d = daemon.clone();
            tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).kvstore_reclaim()).await??;
            *reclaimed = true;
        }
        let id = match lease {
            Some((id, _)) => *id,
            None => {
                let id = self.etcd.lease_grant(LEASE_TTL).await?;
                let etcd = self.etcd.clone();
                *lease = Some((id, tokio::spawn(async move { etcd.keep_alive(id, Duration::from_secs(LEASE_TTL as u64 / 3)).await })));
                id
            }
        };
        let d = daemon.clone();
        let (me, eps) = tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).kvstore_published()).await?;
        let mut wanted: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        wanted.insert(format!("{NODES_PREFIX}{}", me.name), serde_json::to_vec(&me)?);
        for (ip, identity, labels) in eps {
            let e = IpEntry { ip, identity, labels: labels_key(&labels), node: me.name.clone() };
            wanted.insert(format!("{IP_PREFIX}{ip}"), serde_json::to_vec(&e)?);
        }
        for (k, v) in &wanted {
            if published.get(k) != Some(v) {
                self.etcd.put_leased(k, v, id).await?;
                published.insert(k.clone(), v.clone());
            }
        }
        let gone: Vec<String> = published.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for k in gone {
            self.etcd.delete(&k).await?;
            published.remove(&k);
        }
        let mut view = KvView::default();
        for (_, v) in self.etcd.list(NODES_PREFIX).await? {
            if let Ok(n) = serde_json::from_slice::<cilium_api::NodeMeta>(&v) {
                if n.name != me.name {
                    view.nodes.insert(n.name.clone(), n);
                }
            }
        }
        for (_, v) in self.etcd.list(IP_PREFIX).await? {
            if let Ok(e) = serde_json::from_slice::<IpEntry>(&v) {
                if e.node != me.name {
                    let labels = LabelSet::parse_all(e.labels.split(';').filter(|l| !l.is_empty()));
                    // a pod's identity is made of Kubernetes labels only: one
                    // claiming another source (a node's, a reserved one) is ignored
                    if labels.iter().any(|l| l.source != cilium_labels::SOURCE_K8S) {
                        warn!(ip = %e.ip, node = %e.node, labels = %e.labels, "ignoring a kvstore endpoint with labels that are not a pod's");
                        continue;
                    }
                    view.endpoints.insert(e.ip, (labels, e.node));
                }
            }
        }
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).kvstore_sync(view)).await??;
        Ok(())
    }
}

/// Wakes the sync loop at every change under `prefix`, re-creating the
/// watch (after a second) whenever it ends; a new watch wakes it too, for
/// what happened while there was none.
async fn watch_loop(etcd: cilium_kvstore::Etcd, prefix: &'static str, notify: Arc<tokio::sync::Notify>) {
    loop {
        match etcd.watch(prefix).await {
            Ok(mut w) => {
                notify.notify_one();
                while w.changed().await.is_ok() {
                    notify.notify_one();
                }
            }
            Err(e) => tracing::debug!(error = %e, prefix, "kvstore watch"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
