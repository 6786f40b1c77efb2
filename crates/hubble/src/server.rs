//! The agent's Hubble server: the Observer service over the flow ring and
//! the Peer service, on a unix socket and optionally TCP.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::filter::Filters;
use crate::proto::flow::{Flow, LostEvent, LostEventSource};
use crate::proto::observer::observer_server::{Observer, ObserverServer};
use crate::proto::observer::{self as obs, get_flows_response::ResponseTypes};
use crate::proto::peer::peer_server::{Peer, PeerServer};
use crate::proto::peer::{ChangeNotification, ChangeNotificationType, NotifyRequest};
use crate::proto::relay::NodeState;
use crate::ring::Ring;

/// A peer the Peer service announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    /// `unix:///path` or `host:port`.
    pub address: String,
}

/// One node's Hubble: the ring and its counters.
#[derive(Debug)]
pub struct Hubble {
    pub ring: Ring,
    pub node_name: String,
    started: Instant,
    /// Events the datapath could not hand over (its ring buffer was full).
    pub lost_datapath: AtomicU64,
    /// Peers announced by the Peer service (this node first).
    pub peers: Vec<PeerInfo>,
}

/// Nanoseconds since the Unix epoch of a protobuf timestamp.
pub fn ts_ns(t: &pbjson_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

pub fn now_ts() -> pbjson_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn flow_ns(f: &Flow) -> i128 {
    f.time.as_ref().map(ts_ns).unwrap_or(0)
}

/// Which stored flows a request wants, before following.
pub fn select_history(
    flows: &[Arc<Flow>],
    req: &obs::GetFlowsRequest,
    filters: &Filters,
) -> Vec<Arc<Flow>> {
    let since = req.since.as_ref().map(ts_ns);
    let until = req.until.as_ref().map(ts_ns);
    let in_window =
        |f: &Flow| since.is_none_or(|s| flow_ns(f) >= s) && until.is_none_or(|u| flow_ns(f) <= u);
    let matching = flows.iter().filter(|f| in_window(f) && filters.matches(f));
    let n = req.number;
    if n == 0 {
        // no count: a time window gives everything in it; a plain follow
        // gives only what comes next; otherwise everything held
        if since.is_none() && until.is_none() && req.follow {
            return Vec::new();
        }
        return matching.cloned().collect();
    }
    if req.first {
        matching
            .take(n.min(usize::MAX as u64) as usize)
            .cloned()
            .collect()
    } else {
        let all: Vec<Arc<Flow>> = matching.cloned().collect();
        let skip = all.len().saturating_sub(n.min(usize::MAX as u64) as usize);
        all[skip..].to_vec()
    }
}

impl Hubble {
    pub fn new(node_name: &str, capacity: usize, peers: Vec<PeerInfo>) -> Hubble {
        Hubble {
            ring: Ring::new(capacity),
            node_name: node_name.to_string(),
            started: Instant::now(),
            lost_datapath: AtomicU64::new(0),
            peers,
        }
    }

    fn response(
        &self,
        r: ResponseTypes,
        time: Option<pbjson_types::Timestamp>,
    ) -> obs::GetFlowsResponse {
        obs::GetFlowsResponse {
            response_types: Some(r),
            node_name: self.node_name.clone(),
            time,
        }
    }

    fn status(&self) -> obs::ServerStatusResponse {
        let now = now_ts();
        let minute_ago = ts_ns(&now) - 60_000_000_000;
        let (held, recent) = self.ring.count_since(minute_ago);
        obs::ServerStatusResponse {
            num_flows: held as u64,
            max_flows: self.ring.capacity() as u64,
            seen_flows: self.ring.seen(),
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            num_connected_nodes: None,
            num_unavailable_nodes: None,
            unavailable_nodes: Vec::new(),
            version: crate::VERSION.to_string(),
            flows_rate: recent as f64 / 60.0,
        }
    }
}

/// The gRPC services of one [`Hubble`].
#[derive(Debug, Clone)]
pub struct Service(pub Arc<Hubble>);

type FlowStream = Pin<Box<dyn Stream<Item = Result<obs::GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for Service {
    type GetFlowsStream = FlowStream;
    type GetAgentEventsStream =
        Pin<Box<dyn Stream<Item = Result<obs::GetAgentEventsResponse, Status>> + Send>>;
    type GetDebugEventsStream =
        Pin<Box<dyn Stream<Item = Result<obs::GetDebugEventsResponse, Status>> + Send>>;

    async fn get_flows(
        &self,
        request: Request<obs::GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = request.into_inner();
        let filters = Filters::new(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let hubble = self.0.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut wake = hubble.ring.subscribe();
            let (flows, mut next) = hubble.ring.snapshot();
            for f in select_history(&flows, &req, &filters) {
                let time = f.time;
                if tx
                    .send(Ok(hubble.response(ResponseTypes::Flow((*f).clone()), time)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            let until = req.until.as_ref().map(ts_ns);
            let mut lost_dp = hubble.lost_datapath.load(Ordering::Relaxed);
            loop {
                tokio::select! {
                    changed = wake.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                let read = hubble.ring.read_from(next);
                next = read.next;
                let dp = hubble.lost_datapath.load(Ordering::Relaxed);
                for (source, n) in [
                    (LostEventSource::HubbleRingBuffer, read.lost),
                    (
                        LostEventSource::PerfEventRingBuffer,
                        dp.saturating_sub(lost_dp),
                    ),
                ] {
                    if n > 0 {
                        let now = now_ts();
                        let ev = LostEvent {
                            source: source as i32,
                            num_events_lost: n,
                            cpu: None,
                            first: None,
                            last: None,
                        };
                        if tx
                            .send(Ok(hubble.response(ResponseTypes::LostEvents(ev), Some(now))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                lost_dp = dp;
                for f in read.flows {
                    if until.is_some_and(|u| flow_ns(&f) > u) {
                        return;
                    }
                    if !filters.matches(&f) {
                        continue;
                    }
                    let time = f.time;
                    if tx
                        .send(Ok(hubble.response(ResponseTypes::Flow((*f).clone()), time)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_agent_events(
        &self,
        _: Request<obs::GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented(
            "agent events are not recorded by cilium-rs yet",
        ))
    }

    async fn get_debug_events(
        &self,
        _: Request<obs::GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented(
            "the cilium-rs datapath emits no debug events",
        ))
    }

    async fn get_nodes(
        &self,
        _: Request<obs::GetNodesRequest>,
    ) -> Result<Response<obs::GetNodesResponse>, Status> {
        let s = self.0.status();
        let me = self.0.peers.first();
        Ok(Response::new(obs::GetNodesResponse {
            nodes: vec![obs::Node {
                name: self.0.node_name.clone(),
                version: s.version,
                address: me.map(|p| p.address.clone()).unwrap_or_default(),
                state: NodeState::NodeConnected as i32,
                tls: Some(obs::Tls {
                    enabled: false,
                    server_name: String::new(),
                }),
                uptime_ns: s.uptime_ns,
                num_flows: s.num_flows,
                max_flows: s.max_flows,
                seen_flows: s.seen_flows,
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _: Request<obs::GetNamespacesRequest>,
    ) -> Result<Response<obs::GetNamespacesResponse>, Status> {
        let (flows, _) = self.0.ring.snapshot();
        let mut set = BTreeSet::new();
        for f in &flows {
            for e in [&f.source, &f.destination].into_iter().flatten() {
                if !e.namespace.is_empty() {
                    set.insert(e.namespace.clone());
                }
            }
        }
        Ok(Response::new(obs::GetNamespacesResponse {
            namespaces: set
                .into_iter()
                .map(|namespace| obs::Namespace {
                    cluster: String::new(),
                    namespace,
                })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _: Request<obs::ServerStatusRequest>,
    ) -> Result<Response<obs::ServerStatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }
}

type PeerStream = Pin<Box<dyn Stream<Item = Result<ChangeNotification, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for Service {
    type NotifyStream = PeerStream;

    async fn notify(&self, _: Request<NotifyRequest>) -> Result<Response<PeerStream>, Status> {
        let peers = self.0.peers.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for p in peers {
                let n = ChangeNotification {
                    name: p.name,
                    address: p.address,
                    r#type: ChangeNotificationType::PeerAdded as i32,
                    tls: None,
                };
                if tx.send(Ok(n)).await.is_err() {
                    return;
                }
            }
            // the set is static: hold the stream open until the client goes
            tx.closed().await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the Observer and Peer services on a unix socket and, if given, a
/// TCP address, until the process ends.
pub async fn serve(
    hubble: Arc<Hubble>,
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let svc = Service(hubble);
    let mut tasks = Vec::new();
    if let Some(path) = unix {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        info!(socket = %path.display(), "Hubble server listening");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let router = tonic::transport::Server::builder()
            .add_service(ObserverServer::new(svc.clone()))
            .add_service(PeerServer::new(svc.clone()));
        tasks.push(tokio::spawn(async move {
            router.serve_with_incoming(incoming).await
        }));
    }
    if let Some(addr) = tcp {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        info!(%addr, "Hubble server listening");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router = tonic::transport::Server::builder()
            .add_service(ObserverServer::new(svc.clone()))
            .add_service(PeerServer::new(svc));
        tasks.push(tokio::spawn(async move {
            router.serve_with_incoming(incoming).await
        }));
    }
    for t in tasks {
        if let Err(e) = t.await? {
            warn!(error = %e, "Hubble server stopped");
        }
    }
    Ok(())
}
