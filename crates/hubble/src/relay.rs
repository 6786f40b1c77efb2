//! hubble-relay: one Observer over many agents. Each request fans out to
//! every peer; flows come back merged in time order; peers that cannot be
//! reached are reported as NODE_UNAVAILABLE node-status events and, while
//! following, retried until they come back.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::proto::observer::observer_client::ObserverClient;
use crate::proto::observer::observer_server::{Observer, ObserverServer};
use crate::proto::observer::{self as obs, get_flows_response::ResponseTypes};
use crate::proto::relay::{NodeState, NodeStatusEvent};
use crate::server::{PeerInfo, now_ts, ts_ns};

/// How long the merge holds a flow waiting for older ones from slower peers.
const SORT_WINDOW: Duration = Duration::from_millis(250);
/// How often a lost peer is retried while following.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct PeerConn {
    info: PeerInfo,
    channel: Channel,
}

/// The relay.
#[derive(Debug, Clone)]
pub struct Relay {
    peers: Arc<Vec<PeerConn>>,
    started: Instant,
    timeout: Duration,
}

fn status_event(state: NodeState, name: &str, message: String) -> obs::GetFlowsResponse {
    obs::GetFlowsResponse {
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: state as i32,
            node_names: vec![name.to_string()],
            message,
        })),
        node_name: String::new(),
        time: Some(now_ts()),
    }
}

fn resp_ns(r: &obs::GetFlowsResponse) -> i128 {
    r.time.as_ref().map(ts_ns).unwrap_or(0)
}

impl Relay {
    pub fn new(peers: Vec<PeerInfo>, timeout: Duration) -> anyhow::Result<Relay> {
        let peers = peers
            .into_iter()
            .map(|info| {
                Ok(PeerConn {
                    channel: crate::client::channel(&info.address, timeout)?,
                    info,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Relay {
            peers: Arc::new(peers),
            started: Instant::now(),
            timeout,
        })
    }

    fn client(&self, p: &PeerConn) -> ObserverClient<Channel> {
        ObserverClient::new(p.channel.clone())
    }

    /// Follows one peer: its flows into `tx`, its state changes as events;
    /// when not following, ends with the peer's stream.
    async fn pump(
        self,
        p: PeerConn,
        mut req: obs::GetFlowsRequest,
        tx: mpsc::Sender<obs::GetFlowsResponse>,
    ) {
        let mut announced: Option<NodeState> = None;
        loop {
            let mut client = self.client(&p);
            let res = tokio::time::timeout(self.timeout, client.get_flows(req.clone())).await;
            let stream = match res {
                Ok(Ok(s)) => Some(s.into_inner()),
                Ok(Err(e)) if e.code() == tonic::Code::InvalidArgument => {
                    let _ = tx
                        .send(status_event(
                            NodeState::NodeError,
                            &p.info.name,
                            e.message().to_string(),
                        ))
                        .await;
                    return;
                }
                Ok(Err(e)) => {
                    warn!(peer = %p.info.name, error = %e, "peer unavailable");
                    None
                }
                Err(_) => None,
            };
            match stream {
                Some(mut s) => {
                    if announced != Some(NodeState::NodeConnected) {
                        announced = Some(NodeState::NodeConnected);
                        if tx
                            .send(status_event(
                                NodeState::NodeConnected,
                                &p.info.name,
                                String::new(),
                            ))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    loop {
                        match s.next().await {
                            Some(Ok(r)) => {
                                if let Some(ResponseTypes::Flow(f)) = &r.response_types {
                                    // on reconnect, continue after the last flow seen
                                    if let Some(t) = f.time {
                                        let mut next = t;
                                        next.nanos += 1;
                                        req.since = Some(next);
                                        req.number = 0;
                                    }
                                }
                                if tx.send(r).await.is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => {
                                warn!(peer = %p.info.name, error = %e, "peer stream failed");
                                break;
                            }
                            None => {
                                if !req.follow {
                                    return;
                                }
                                break;
                            }
                        }
                    }
                }
                None => {}
            }
            if announced != Some(NodeState::NodeUnavailable) {
                announced = Some(NodeState::NodeUnavailable);
                if tx
                    .send(status_event(
                        NodeState::NodeUnavailable,
                        &p.info.name,
                        format!("cannot reach {}", p.info.address),
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<obs::GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for Relay {
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
        crate::filter::Filters::new(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (in_tx, mut in_rx) = mpsc::channel::<obs::GetFlowsResponse>(1024);
        for p in self.peers.iter() {
            tokio::spawn(self.clone().pump(p.clone(), req.clone(), in_tx.clone()));
        }
        drop(in_tx);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            if !req.follow {
                // everything, merged, then the count applies to the whole
                let mut all = Vec::new();
                let mut status = Vec::new();
                while let Some(r) = in_rx.recv().await {
                    match r.response_types {
                        Some(ResponseTypes::Flow(_)) => all.push(r),
                        _ => status.push(r),
                    }
                }
                all.sort_by_key(resp_ns);
                let n = req.number as usize;
                if n > 0 && all.len() > n {
                    if req.first {
                        all.truncate(n);
                    } else {
                        all.drain(..all.len() - n);
                    }
                }
                for r in status.into_iter().chain(all) {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                return;
            }
            let mut heap: BinaryHeap<Reverse<(i128, u64, Held)>> = BinaryHeap::new();
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut open = true;
            loop {
                tokio::select! {
                    r = in_rx.recv(), if open => match r {
                        Some(r) => {
                            let key = if matches!(r.response_types, Some(ResponseTypes::Flow(_))) { resp_ns(&r) } else { 0 };
                            seq += 1;
                            heap.push(Reverse((key, seq, Held(r))));
                        }
                        None => open = false,
                    },
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
                let horizon = ts_ns(&now_ts()) - SORT_WINDOW.as_nanos() as i128;
                while let Some(Reverse((t, _, _))) = heap.peek() {
                    if open && *t > horizon && heap.len() < 10_000 {
                        break;
                    }
                    let Some(Reverse((_, _, Held(r)))) = heap.pop() else {
                        break;
                    };
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                if !open && heap.is_empty() {
                    return;
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
            "agent events are not relayed by cilium-rs",
        ))
    }

    async fn get_debug_events(
        &self,
        _: Request<obs::GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented(
            "debug events are not relayed by cilium-rs",
        ))
    }

    async fn get_nodes(
        &self,
        _: Request<obs::GetNodesRequest>,
    ) -> Result<Response<obs::GetNodesResponse>, Status> {
        let mut nodes = Vec::new();
        for p in self.peers.iter() {
            let mut c = self.client(p);
            let st =
                tokio::time::timeout(self.timeout, c.server_status(obs::ServerStatusRequest {}))
                    .await;
            let node = match st {
                Ok(Ok(s)) => {
                    let s = s.into_inner();
                    obs::Node {
                        name: p.info.name.clone(),
                        version: s.version,
                        address: p.info.address.clone(),
                        state: NodeState::NodeConnected as i32,
                        tls: Some(obs::Tls::default()),
                        uptime_ns: s.uptime_ns,
                        num_flows: s.num_flows,
                        max_flows: s.max_flows,
                        seen_flows: s.seen_flows,
                    }
                }
                _ => obs::Node {
                    name: p.info.name.clone(),
                    address: p.info.address.clone(),
                    state: NodeState::NodeUnavailable as i32,
                    tls: Some(obs::Tls::default()),
                    ..Default::default()
                },
            };
            nodes.push(node);
        }
        Ok(Response::new(obs::GetNodesResponse { nodes }))
    }

    async fn get_namespaces(
        &self,
        _: Request<obs::GetNamespacesRequest>,
    ) -> Result<Response<obs::GetNamespacesResponse>, Status> {
        let mut set = BTreeSet::new();
        for p in self.peers.iter() {
            let mut c = self.client(p);
            if let Ok(Ok(r)) =
                tokio::time::timeout(self.timeout, c.get_namespaces(obs::GetNamespacesRequest {}))
                    .await
            {
                for n in r.into_inner().namespaces {
                    set.insert((n.cluster, n.namespace));
                }
            }
        }
        Ok(Response::new(obs::GetNamespacesResponse {
            namespaces: set
                .into_iter()
                .map(|(cluster, namespace)| obs::Namespace { cluster, namespace })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _: Request<obs::ServerStatusRequest>,
    ) -> Result<Response<obs::ServerStatusResponse>, Status> {
        let mut out = obs::ServerStatusResponse {
            version: crate::VERSION.to_string(),
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            ..Default::default()
        };
        let (mut up, mut down) = (0u32, 0u32);
        for p in self.peers.iter() {
            let mut c = self.client(p);
            match tokio::time::timeout(self.timeout, c.server_status(obs::ServerStatusRequest {}))
                .await
            {
                Ok(Ok(s)) => {
                    let s = s.into_inner();
                    up += 1;
                    out.num_flows += s.num_flows;
                    out.max_flows += s.max_flows;
                    out.seen_flows += s.seen_flows;
                    out.flows_rate += s.flows_rate;
                }
                _ => {
                    down += 1;
                    out.unavailable_nodes.push(p.info.name.clone());
                }
            }
        }
        out.num_connected_nodes = Some(pbjson_types::UInt32Value { value: up });
        out.num_unavailable_nodes = Some(pbjson_types::UInt32Value { value: down });
        Ok(Response::new(out))
    }
}

/// A response in the merge heap, ordered only by its key.
#[derive(Debug)]
struct Held(obs::GetFlowsResponse);

impl PartialEq for Held {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// Serves the relay on `listen` until the process ends.
pub async fn serve(relay: Relay, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    info!(addr = %listen, peers = relay.peers.len(), "hubble-relay listening");
    tonic::transport::Server::builder()
        .add_service(ObserverServer::new(relay))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
