//! The kvstore: cluster state shared through etcd, as upstream's kvstore
//! mode. [`Etcd`] is a small client of etcd's v3 gRPC API (our own subset of
//! its protos, compiled without protoc); [`Etcd::allocate_identity`] gives
//! a set of labels the same number on every node, without races.
//!
//! Key layout (under `cilium/state/identities/v1/`):
//! `labels/<labels>` → the number, and `id/<number>` → the labels. Both
//! are created in one transaction that succeeds only if neither exists, so
//! two agents allocating at once can never give one number two meanings or
//! one set of labels two numbers: the loser reads the winner's number.
//!
//! Architecture invariant: nothing here decides policy or touches the
//! kernel; an unreachable etcd is an error for the caller (who keeps
//! enforcing what it has), never a wrong answer.

use std::collections::BTreeSet;
use std::time::Duration;

use tonic::transport::Channel;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request;
use pb::response_op::Response;

/// Where cluster-wide identities live.
pub const IDENTITIES_PREFIX: &str = "cilium/state/identities/v1/";

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("etcd: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no free identity left in {min}..={max}")]
    Exhausted { min: u32, max: u32 },
    #[error("identity allocation for [{labels}] kept losing races")]
    Contended { labels: String },
    #[error("malformed value under {key}: {value:?}")]
    Malformed { key: String, value: String },
}

/// A client of one etcd endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Etcd {
    kv: pb::kv_client::KvClient<Channel>,
    lease: pb::lease_client::LeaseClient<Channel>,
    watch: pb::watch_client::WatchClient<Channel>,
    timeout: Duration,
}

/// A watch on a prefix: each call to [`Watcher::changed`] waits for the
/// next batch of changes under it.
pub struct Watcher {
    responses: tonic::Streaming<pb::WatchResponse>,
    // the request stream stays open while the watch lives
    _requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
}

impl Watcher {
    /// Waits for the next change under the prefix; returns how many keys
    /// it touched. An error (etcd gone, the watch cancelled) ends the watch.
    pub async fn changed(&mut self) -> Result<usize, KvError> {
        loop {
            match self.responses.message().await? {
                Some(r) if r.canceled => return Err(KvError::Rpc(tonic::Status::cancelled(format!("watch cancelled: {}", r.cancel_reason)))),
                Some(r) if !r.events.is_empty() => return Ok(r.events.len()),
                Some(_) => continue,
                None => return Err(KvError::Rpc(tonic::Status::unavailable("watch stream ended"))),
            }
        }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// A client of `endpoint` (`http://host:port`). Connects lazily: an
    /// agent starts, and keeps enforcing, while etcd is away; each call
    /// fails after `timeout`.
    pub fn connect(endpoint: &str, timeout: Duration) -> Result<Etcd, KvError> {
        let bad = |reason: String| KvError::Endpoint { endpoint: endpoint.to_string(), reason };
        if !endpoint.starts_with("http://") {
            return Err(bad("want http://host:port".into()));
        }
        let channel = Channel::from_shared(endpoint.to_string()).map_err(|e| bad(e.to_string()))?.connect_timeout(timeout).timeout(timeout).connect_lazy();
        Ok(Etcd {
            kv: pb::kv_client::KvClient::new(channel.clone()),
            lease: pb::lease_client::LeaseClient::new(channel.clone()),
            watch: pb::watch_client::WatchClient::new(channel),
            timeout,
        })
    }

    async fn within<T>(&self, f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> Result<T, KvError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(KvError::Timeout(self.timeout)),
        }
    }

    /// The value of `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let r = self.within(self.kv.clone().range(pb::RangeRequest { key: key.into(), ..Default::default() })).await?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Every key under `prefix` with its value.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let r = self.within(self.kv.clone().range(pb::RangeRequest { key: prefix.into(), range_end: prefix_end(prefix.as_bytes()), ..Default::default() })).await?;
        Ok(r.kvs.into_iter().map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value)).collect())
    }

    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.within(self.kv.clone().put(pb::PutRequest { key: key.into(), value: value.to_vec(), ..Default::default() })).await?;
        Ok(())
    }

    /// Writes `key` bound to `lease`: it goes when the lease expires.
    pub async fn put_leased(&self, key: &str, value: &[u8], lease: i64) -> Result<(), KvError> {
        self.within(self.kv.clone().put(pb::PutRequest { key: key.into(), value: value.to_vec(), lease, ..Default::default() })).await?;
        Ok(())
    }

    /// A lease of `ttl` seconds.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, KvError> {
        let r = self.within(self.lease.clone().lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })).await?;
        Ok(r.id)
    }

    /// Keeps `lease` alive, refreshing it every `every`, until etcd says it
    /// is gone or cannot be reached; returns why it stopped.
    pub async fn keep_alive(&self, lease: i64, every: Duration) -> KvError {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // etcd answers the stream's headers with its first response: the
        // first request must be queued before waiting for them
        if tx.send(pb::LeaseKeepAliveRequest { id: lease }).await.is_err() {
            return KvError::Timeout(self.timeout);
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses = match self.within(self.lease.clone().lease_keep_alive(stream)).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) && tx.send(pb::LeaseKeepAliveRequest { id: lease }).await.is_err() {
                return KvError::Timeout(self.timeout);
            }
            match tokio::time::timeout(self.timeout, responses.message()).await {
                Ok(Ok(Some(r))) if r.ttl > 0 => {}
                Ok(Ok(_)) => return KvError::Rpc(tonic::Status::not_found(format!("lease {lease:x} expired"))),
                Ok(Err(e)) => return KvError::Rpc(e),
                Err(_) => return KvError::Timeout(self.timeout),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Watches every key under `prefix`; returns once etcd created the
    /// watch, so no change after this call is missed.
    pub async fn watch(&self, prefix: &str) -> Result<Watcher, KvError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = pb::WatchCreateRequest { key: prefix.into(), range_end: prefix_end(prefix.as_bytes()), ..Default::default() };
        // as with keep-alive: the request goes before etcd answers the headers
        if tx.send(pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) }).await.is_err() {
            return Err(KvError::Timeout(self.timeout));
        }
        let mut responses = self.within(self.watch.clone().watch(tokio_stream::wrappers::ReceiverStream::new(rx))).await?;
        match tokio::time::timeout(self.timeout, responses.message()).await {
            Ok(Ok(Some(r))) if r.created && !r.canceled => Ok(Watcher { responses, _requests: tx }),
            Ok(Ok(Some(r))) => Err(KvError::Rpc(tonic::Status::cancelled(format!("watch on {prefix} refused: {}", r.cancel_reason)))),
            Ok(Ok(None)) => Err(KvError::Rpc(tonic::Status::unavailable("watch stream ended"))),
            Ok(Err(e)) => Err(KvError::Rpc(e)),
            Err(_) => Err(KvError::Timeout(self.timeout)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.within(self.kv.clone().delete_range(pb::DeleteRangeRequest { key: key.into(), ..Default::default() })).await?;
        Ok(())
    }

    /// The number of `labels` (their canonical string) cluster-wide:
    /// the one already allocated, else the lowest free one in
    /// `min..=max`, claimed atomically.
    pub async fn allocate_identity(&self, labels: &str, min: u32, max: u32) -> Result<u32, KvError> {
        self.allocate_identity_preferring(labels, None, min, max).await
    }

    /// As [`Etcd::allocate_identity`], trying `preferred` first when the
    /// labels have no number yet.
    pub async fn allocate_identity_preferring(&self, labels: &str, preferred: Option<u32>, min: u32, max: u32) -> Result<u32, KvError> {
        let labels_key = format!("{IDENTITIES_PREFIX}labels/{labels}");
        let parse = |key: &str, v: &[u8]| {
            let s = String::from_utf8_lossy(v);
            s.parse::<u32>().map_err(|_| KvError::Malformed { key: key.to_string(), value: s.into_owned() })
        };
        for _ in 0..32 {
            if let Some(v) = self.get(&labels_key).await? {
                let id = parse(&labels_key, &v)?;
                // taking a number is a write (its number key rewritten while
                // the labels still name it): a collector that saw it unused
                // cannot free it now, its compare on that key's revision fails
                let id_key = format!("{IDENTITIES_PREFIX}id/{id}");
                let same = pb::Compare { result: CompareResult::Equal as i32, target: CompareTarget::Value as i32, key: labels_key.clone().into(), target_union: Some(TargetUnion::Value(v)), range_end: Vec::new() };
                let put = pb::RequestOp { request: Some(Request::RequestPut(pb::PutRequest { key: id_key.into(), value: labels.into(), ..Default::default() })) };
                if self.within(self.kv.clone().txn(pb::TxnRequest { compare: vec![same], success: vec![put], failure: vec![] })).await?.succeeded {
                    return Ok(id);
                }
                // freed or renumbered meanwhile: allocate again
                continue;
            }
            let id_prefix = format!("{IDENTITIES_PREFIX}id/");
            let used: BTreeSet<u32> = self.list(&id_prefix).await?.iter().filter_map(|(k, _)| k.strip_prefix(&id_prefix)?.parse().ok()).collect();
            let id = match preferred.filter(|p| (min..=max).contains(p) && !used.contains(p)) {
                Some(p) => p,
                None => (min..=max).find(|n| !used.contains(n)).ok_or(KvError::Exhausted { min, max })?,
            };
            let id_key = format!("{id_prefix}{id}");
            let absent = |key: &str| pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: key.into(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            };
            let put = |key: &str, value: &str| pb::RequestOp { request: Some(Request::RequestPut(pb::PutRequest { key: key.into(), value: value.into(), ..Default::default() })) };
            let txn = pb::TxnRequest {
                compare: vec![absent(&labels_key), absent(&id_key)],
                success: vec![put(&labels_key, &id.to_string()), put(&id_key, labels)],
                failure: vec![pb::RequestOp { request: Some(Request::RequestRange(pb::RangeRequest { key: labels_key.clone().into(), ..Default::default() })) }],
            };
            let r = self.within(self.kv.clone().txn(txn)).await?;
            if r.succeeded {
                return Ok(id);
            }
            // lost a race: for these labels (take the winner's number), or
            // for that number (try the next free one)
            if let Some(Response::ResponseRange(range)) = r.responses.into_iter().next().and_then(|op| op.response) {
                if let Some(kv) = range.kvs.first() {
                    return parse(&labels_key, &kv.value);
                }
            }
        }
        Err(KvError::Contended { labels: labels.to_string() })
    }

    /// The labels (canonical string) of a cluster-wide identity.
    /// Every allocated identity: (number, labels, the revision its number
    /// key was last written at).
    pub async fn identities(&self) -> Result<Vec<(u32, String, i64)>, KvError> {
        let prefix = format!("{IDENTITIES_PREFIX}id/");
        let r = self.within(self.kv.clone().range(pb::RangeRequest { key: prefix.clone().into(), range_end: prefix_end(prefix.as_bytes()), ..Default::default() })).await?;
        Ok(r.kvs
            .into_iter()
            .filter_map(|kv| {
                let id = String::from_utf8_lossy(&kv.key).strip_prefix(&prefix)?.parse().ok()?;
                Some((id, String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision))
            })
            .collect())
    }

    /// Frees `id` (its number and labels keys, in one transaction) if its
    /// number key is unchanged since `revision` and its labels still name
    /// it. Returns whether it was freed.
    pub async fn release_identity(&self, id: u32, labels: &str, revision: i64) -> Result<bool, KvError> {
        let id_key = format!("{IDENTITIES_PREFIX}id/{id}");
        let labels_key = format!("{IDENTITIES_PREFIX}labels/{labels}");
        let delete = |key: &str| pb::RequestOp { request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest { key: key.into(), ..Default::default() })) };
        let txn = pb::TxnRequest {
            compare: vec![
                pb::Compare { result: CompareResult::Equal as i32, target: CompareTarget::Mod as i32, key: id_key.clone().into(), target_union: Some(TargetUnion::ModRevision(revision)), range_end: Vec::new() },
                pb::Compare { result: CompareResult::Equal as i32, target: CompareTarget::Value as i32, key: labels_key.clone().into(), target_union: Some(TargetUnion::Value(id.to_string().into())), range_end: Vec::new() },
            ],
            success: vec![delete(&id_key), delete(&labels_key)],
            failure: vec![],
        };
        Ok(self.within(self.kv.clone().txn(txn)).await?.succeeded)
    }

    pub async fn identity_labels(&self, id: u32) -> Result<Option<String>, KvError> {
        Ok(self.get(&format!("{IDENTITIES_PREFIX}id/{id}")).await?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(matches!(Etcd::connect("127.0.0.1:2379", Duration::from_secs(1)), Err(KvError::Endpoint { .. })));
    }
}
