//! The agent's side of the kvstore: cluster-scope identities numbered by
//! etcd, so the same labels have the same number on every node.
//!
//! The etcd client runs on a runtime of its own: the daemon asks for a
//! number while holding its lock, and tasks of the agent's runtime may be
//! waiting for that lock, so the client must not need the agent's workers
//! to make progress.

use std::time::Duration;

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
        let key = labels_key(labels);
        let etcd = self.etcd.clone();
        let handle = self.rt.as_ref().ok_or("the kvstore client is shut down")?.handle().clone();
        std::thread::scope(|s| s.spawn(move || handle.block_on(etcd.allocate_identity(&key, MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY))).join())
            .map_err(|_| "the kvstore client panicked".to_string())?
            .map_err(|e| e.to_string())
    }
}
