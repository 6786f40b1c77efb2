//! The REST API on the agent's unix socket.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use cilium_abi::{CtEntryFlag, DropReason, MetricDir};
use cilium_api::{
    CtEntry, Deleted, EndpointCreate, EndpointDelete, EndpointGc, ErrorBody, Identity, IpamRequest, IpamResponse,
    IpcacheEntry, K8sService, LbMapView, MapStatus, MetricEntry, MonitorEvent, NamespaceMeta, PodMeta, PolicyChange, PolicyDelete,
    PolicyImport, PolicyList, PolicyMapEntry, ServiceUpdate, ServiceView, Status,
};
use cilium_datapath::{Datapath, Loaded, be_to_ip};
use tokio::sync::broadcast;

use crate::daemon::{Daemon, DaemonError};

/// Shared by every request.
pub struct AppState {
    pub daemon: Arc<Mutex<Daemon<Loaded>>>,
    pub monitor: broadcast::Sender<Arc<MonitorEvent>>,
    pub subscribers: AtomicUsize,
    pub monitor_lost: AtomicU64,
    pub bpf_root: String,
    pub state_dir: String,
    pub socket: String,
    pub hubble: Option<Arc<crate::hubble::HubbleRuntime>>,
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    /// None when health checking is off.
    pub health: Option<Arc<crate::health::Health>>,
    /// etcd's address when the kvstore is on.
    pub kvstore: Option<String>,
    /// The kvstore's identity numbers, when it is on.
    pub kv: Option<Arc<crate::kvstore::KvIdentities>>,
}

type Shared = Arc<AppState>;

struct ApiError(StatusCode, ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        let (status, document, field, value) = match &e {
            DaemonError::Policy(p) => (StatusCode::BAD_REQUEST, Some(p.document.clone()), Some(p.field.clone()), Some(p.value.clone())),
            DaemonError::Invalid { field, value, .. } => (StatusCode::BAD_REQUEST, None, Some(field.clone()), Some(value.clone())),
            DaemonError::NotFound { .. } => (StatusCode::NOT_FOUND, None, None, None),
            DaemonError::Ipam(cilium_ipam::IpamError::Exhausted { .. }) => (StatusCode::SERVICE_UNAVAILABLE, None, None, None),
            DaemonError::Ipam(_) | DaemonError::Identity(_) => (StatusCode::CONFLICT, None, None, None),
            DaemonError::Service(cilium_lb::ServiceError::FrontendTaken { frontend, .. }) => (StatusCode::CONFLICT, None, Some("frontend".into()), Some(frontend.clone())),
            DaemonError::Service(cilium_lb::ServiceError::NoSuchService { id }) => (StatusCode::NOT_FOUND, None, Some("id".into()), Some(id.to_string())),
            DaemonError::Service(cilium_lb::ServiceError::Exhausted) => (StatusCode::SERVICE_UNAVAILABLE, None, None, None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None, None, None),
        };
        ApiError(status, ErrorBody { status: status.as_u16(), error: e.to_string(), document, field, value })
    }
}

/// Runs `f` on the daemon on a blocking thread (it may do syscalls).
async fn with<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&mut Daemon<Loaded>) -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, ApiError> {
    let d = s.daemon.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = d.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, ErrorBody { status: 500, error: e.to_string(), document: None, field: None, value: None }))?
    .map_err(ApiError::from)
}

/// Times every request for `cilium_api_process_time_seconds`, labelled by
/// the route (not the raw path, so IDs do not make new series).
async fn timed(State(s): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().to_string();
    let path = req.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    s.metrics.api_request(&method, &path, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
}

pub fn router(state: Shared) -> Router {
    let timing = axum::middleware::from_fn_with_state(state.clone(), timed);
    Router::new()
        .route("/v1/healthz", get(|| async { Json("ok") }))
        .route("/v1/status", get(status))
        .route("/v1/ipam", post(ipam_allocate))
        .route("/v1/ipam/{ip}", delete(ipam_release))
        .route("/v1/endpoint", put(endpoint_create).get(endpoint_list).delete(endpoint_delete))
        .route("/v1/endpoint/gc", post(endpoint_gc))
        .route("/v1/endpoint/{id}", get(endpoint_get))
        .route("/v1/identity", get(identity_list))
        .route("/v1/k8s/pod", put(pod_upsert))
        .route("/v1/k8s/pod/{ns}/{name}", delete(pod_delete))
        .route("/v1/k8s/namespace", put(namespace_upsert))
        .route("/v1/cluster/nodes", get(node_list).put(nodes_set))
        .route("/v1/cluster/health", get(cluster_health))
        .route("/v1/cluster/health/probe", post(cluster_health_probe))
        .route("/v1/k8s/service", put(k8s_service_upsert))
        .route("/v1/k8s/services", put(k8s_services_sync))
        .route("/v1/k8s/service/{ns}/{name}", delete(k8s_service_delete))
        .route("/v1/service", get(service_list).put(service_update))
        .route("/v1/service/{id}", delete(service_delete))
        .route("/v1/bpf/lb", get(|s| bpf_lb(s, false)))
        .route("/v1/bpf/lb/maglev", get(|s| bpf_lb(s, true)))
        .route("/v1/policy", put(policy_import).get(policy_list).delete(policy_delete))
        .route("/v1/policy/trace", post(policy_trace))
        .route("/v1/bpf/policy/{id}", get(bpf_policy))
        .route("/v1/bpf/ct", get(bpf_ct))
        .route("/v1/bpf/ipcache", get(bpf_ipcache))
        .route("/v1/bpf/metrics", get(bpf_metrics))
        .route("/v1/monitor", get(monitor))
        .route("/v1/fqdn/cache", get(fqdn_cache))
        // a re-list of 10,000 Services is several MB
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .route_layer(timing)
        .with_state(state)
}

async fn fqdn_cache(State(s): State<Shared>) -> Result<Json<Vec<cilium_api::FqdnCacheEntry>>, ApiError> {
    with(&s, |d| Ok(d.fqdn_cache())).await.map(Json)
}

async fn status(State(s): State<Shared>) -> Result<Json<Status>, ApiError> {
    let subscribers = s.subscribers.load(Ordering::Relaxed);
    let lost_stream = s.monitor_lost.load(Ordering::Relaxed);
    let (bpf_root, state_dir, socket) = (s.bpf_root.clone(), s.state_dir.clone(), s.socket.clone());
    let hubble = s.hubble.as_ref().map(|h| h.status());
    let cluster_health = s.health.as_ref().map(|h| h.summary());
    let kvstore = s.kvstore.clone();
    with(&s, move |d| {
        let cfg = d.config().clone();
        let lost = d.datapath().lost_events().unwrap_or(0) + lost_stream;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node_name: cfg.node_name.clone(),
            healthy: d.warnings().is_empty(),
            uptime_secs: d.uptime_secs(),
            pod_cidr: cfg.pod_cidr.to_string(),
            router_ip: d.router_ip(),
            node_ips: d.node_ips().to_vec(),
            endpoints: d.endpoint_ids().len(),
            endpoints_ready: d.endpoints_ready(),
            identities: d.identities().len(),
            policies: d.repository().len(),
            policy_revision: d.repository().revision(),
            enforcement: format!("{:?}", cfg.policy.mode).to_lowercase(),
            ipam_used: d.ipam().allocations().count(),
            ipam_available: d.ipam().available(),
            ipam6: d.ipam6().map(|i| {
                let used = i.allocations().count();
                format!("{used}/{} allocated from {}, router {}", used.saturating_add(i.available()), i.cidr(), i.router())
            }),
            maps: d
                .datapath()
                .pressure()
                .into_iter()
                .map(|p| MapStatus { name: p.name.to_string(), entries: p.entries, max_entries: p.max_entries })
                .collect(),
            monitor_lost_events: lost,
            monitor_subscribers: subscribers,
            state_dir,
            bpf_root,
            socket,
            warnings: d.warnings(),
            hubble,
            cluster_health,
            kvstore,
            routing_mode: cfg.routing_mode,
        })
    })
    .await
    .map(Json)
}

async fn ipam_allocate(State(s): State<Shared>, Json(req): Json<IpamRequest>) -> Result<Json<IpamResponse>, ApiError> {
    with(&s, move |d| {
        let (ip, ip6) = d.ipam_allocate(&req.owner)?;
        let ipv6 = match (ip6, d.router_ip6(), d.config().pod_cidr6) {
            (Some(ip), Some(gateway), Some(cidr)) => Some(cilium_api::IpamResponse6 { ip, gateway, cidr: cidr.to_string() }),
            _ => None,
        };
        Ok(IpamResponse { ip, gateway: d.router_ip(), cidr: d.config().pod_cidr.to_string(), mtu: d.config().pod_mtu(), ipv6 })
    })
    .await
    .map(Json)
}

async fn ipam_release(State(s): State<Shared>, UrlPath(ip): UrlPath<std::net::IpAddr>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.ipam_release(ip)).await.map(Json)
}

async fn endpoint_create(State(s): State<Shared>, Json(req): Json<EndpointCreate>) -> Result<Json<cilium_api::Endpoint>, ApiError> {
    // kvstore mode: the pod's identity number is fetched from etcd before
    // the daemon's lock is taken, so an unreachable etcd holds up this
    // request only, not every other (inside, the number is one quick read)
    if let Some(kv) = s.kv.clone() {
        let (ns, pod) = (req.namespace.clone(), req.pod_name.clone());
        let labels = with(&s, move |d| Ok(d.labels_for(&ns, &pod))).await?;
        let shown = labels.to_string();
        tokio::task::spawn_blocking(move || cilium_identity::ClusterNumbers::number(&*kv, &labels))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, ErrorBody { status: 500, error: e.to_string(), document: None, field: None, value: None }))?
            .map_err(|reason| ApiError::from(DaemonError::Identity(cilium_identity::IdentityError::Cluster { labels: shown, reason })))?;
    }
    with(&s, move |d| {
        let id = d.endpoint_create(&req)?;
        d.endpoint_view(id).ok_or(DaemonError::NotFound { what: format!("endpoint {id}") })
    })
    .await
    .map(Json)
}

async fn endpoint_list(State(s): State<Shared>) -> Result<Json<Vec<cilium_api::Endpoint>>, ApiError> {
    with(&s, |d| Ok(d.endpoint_ids().into_iter().filter_map(|id| d.endpoint_view(id)).collect())).await.map(Json)
}

async fn endpoint_get(State(s): State<Shared>, UrlPath(id): UrlPath<u16>) -> Result<Json<cilium_api::Endpoint>, ApiError> {
    with(&s, move |d| d.endpoint_view(id).ok_or(DaemonError::NotFound { what: format!("endpoint {id}") })).await.map(Json)
}

async fn endpoint_delete(State(s): State<Shared>, Json(req): Json<EndpointDelete>) -> Result<Json<Deleted>, ApiError> {
    with(&s, move |d| {
        let id = d.endpoint_delete(&req.container_id, &req.ifname)?;
        Ok(Deleted { deleted: id.map(|i| vec![i.to_string()]).unwrap_or_default() })
    })
    .await
    .map(Json)
}

async fn endpoint_gc(State(s): State<Shared>, Json(req): Json<EndpointGc>) -> Result<Json<Deleted>, ApiError> {
    with(&s, move |d| Ok(Deleted { deleted: d.endpoint_gc(&req.valid)? })).await.map(Json)
}

async fn identity_list(State(s): State<Shared>) -> Result<Json<Vec<Identity>>, ApiError> {
    with(&s, |d| {
        Ok(d.identities()
            .iter()
            .map(|i| Identity { id: i.id, labels: i.labels.to_strings(), references: i.references })
            .collect())
    })
    .await
    .map(Json)
}

async fn pod_upsert(State(s): State<Shared>, Json(p): Json<PodMeta>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.pod_upsert(p).map(|_| true)).await.map(Json)
}

async fn pod_delete(State(s): State<Shared>, UrlPath((ns, name)): UrlPath<(String, String)>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.pod_delete(&ns, &name)).await.map(Json)
}

async fn k8s_service_upsert(State(s): State<Shared>, Json(k): Json<K8sService>) -> Result<Json<Vec<u16>>, ApiError> {
    with(&s, move |d| d.k8s_service_upsert(k)).await.map(Json)
}

/// A re-list: every Kubernetes Service. Answers the rejected ones as
/// (namespace/name, error).
async fn k8s_services_sync(State(s): State<Shared>, Json(list): Json<Vec<K8sService>>) -> Result<Json<Vec<(String, String)>>, ApiError> {
    with(&s, move |d| Ok(d.k8s_services_sync(list)?.into_iter().map(|(k, e)| (k, e.to_string())).collect())).await.map(Json)
}

async fn k8s_service_delete(State(s): State<Shared>, UrlPath((ns, name)): UrlPath<(String, String)>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.k8s_service_delete(&ns, &name)).await.map(Json)
}

async fn service_list(State(s): State<Shared>) -> Result<Json<Vec<ServiceView>>, ApiError> {
    with(&s, |d| Ok(d.service_list())).await.map(Json)
}

async fn service_update(State(s): State<Shared>, Json(req): Json<ServiceUpdate>) -> Result<Json<u16>, ApiError> {
    with(&s, move |d| d.service_update(&req)).await.map(Json)
}

async fn service_delete(State(s): State<Shared>, UrlPath(id): UrlPath<u16>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.service_delete(id).map(|_| true)).await.map(Json)
}

async fn bpf_lb(State(s): State<Shared>, maglev: bool) -> Result<Json<LbMapView>, ApiError> {
    with(&s, move |d| d.lb_map_view(maglev)).await.map(Json)
}

async fn cluster_health(State(s): State<Shared>) -> Json<Vec<cilium_api::NodeHealth>> {
    Json(s.health.as_ref().map(|h| h.nodes()).unwrap_or_default())
}

/// Probes every node now and returns the results (`cilium-health status --probe`).
async fn cluster_health_probe(State(s): State<Shared>) -> Result<Json<Vec<cilium_api::NodeHealth>>, ApiError> {
    match &s.health {
        Some(h) => Ok(Json(h.probe_now(std::time::Duration::from_secs(5)).await)),
        None => Err(ApiError::from(DaemonError::NotFound { what: "health checking (the agent runs with --enable-health-checking=false)".into() })),
    }
}

async fn node_list(State(s): State<Shared>) -> Result<Json<Vec<cilium_api::NodeView>>, ApiError> {
    with(&s, |d| Ok(d.nodes())).await.map(Json)
}

async fn nodes_set(State(s): State<Shared>, Json(n): Json<Vec<cilium_api::NodeMeta>>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.nodes_set(n).map(|_| true)).await.map(Json)
}

async fn namespace_upsert(State(s): State<Shared>, Json(n): Json<NamespaceMeta>) -> Result<Json<bool>, ApiError> {
    with(&s, move |d| d.namespace_upsert(n).map(|_| true)).await.map(Json)
}

async fn policy_import(State(s): State<Shared>, Json(req): Json<PolicyImport>) -> Result<Json<PolicyChange>, ApiError> {
    let started = std::time::Instant::now();
    let dry_run = req.dry_run;
    let r = with(&s, move |d| {
        let (revision, policies) = d.policy_import(&req.text, &req.source, req.dry_run)?;
        Ok(PolicyChange { revision, policies })
    })
    .await;
    if !dry_run {
        s.metrics.policy_changed(r.is_ok(), started.elapsed().as_secs_f64());
    }
    r.map(Json)
}

async fn policy_list(State(s): State<Shared>) -> Result<Json<PolicyList>, ApiError> {
    with(&s, |d| {
        Ok(PolicyList {
            revision: d.repository().revision(),
            documents: d.policies().into_iter().map(|p| serde_json::to_value(p).expect("serializes")).collect(),
        })
    })
    .await
    .map(Json)
}

async fn policy_delete(State(s): State<Shared>, Json(req): Json<PolicyDelete>) -> Result<Json<PolicyChange>, ApiError> {
    if !req.all && req.name.is_none() {
        return Err(ApiError::from(DaemonError::Invalid {
            field: "name".into(),
            value: String::new(),
            message: "name a policy, or ask for all".into(),
        }));
    }
    with(&s, move |d| {
        let (revision, policies) = d.policy_delete(|k| {
            req.all
                || (req.name.as_deref() == Some(k.name.as_str())
                    && req.kind.as_deref().is_none_or(|kind| kind == k.kind.as_str())
                    && req.namespace.as_deref().is_none_or(|ns| k.namespace.as_deref().unwrap_or("") == ns))
        })?;
        Ok(PolicyChange { revision, policies })
    })
    .await
    .map(Json)
}

async fn policy_trace(State(s): State<Shared>, Json(req): Json<cilium_api::PolicyTraceRequest>) -> Result<Json<cilium_api::PolicyTraceResponse>, ApiError> {
    with(&s, move |d| d.policy_trace(&req)).await.map(Json)
}

async fn bpf_policy(State(s): State<Shared>, UrlPath(id): UrlPath<u16>) -> Result<Json<Vec<PolicyMapEntry>>, ApiError> {
    let entries = with(&s, move |d| {
        let p = d.endpoint_policy(id).ok_or(DaemonError::NotFound { what: format!("endpoint {id}") })?;
        Ok(p.entries
            .iter()
            .map(|(k, v)| PolicyMapEntry {
                egress: k.egress,
                identity: k.identity,
                labels: if k.identity == 0 {
                    vec!["(any)".into()]
                } else {
                    d.identities().get(k.identity).map(|i| i.labels.to_strings()).unwrap_or_default()
                },
                protocol: k.protocol,
                port: k.port,
                port_prefix: k.port_prefix,
                deny: v.deny,
                proxy_port: v.proxy_port,
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(entries))
}

async fn bpf_ct(State(s): State<Shared>) -> Result<Json<Vec<CtEntry>>, ApiError> {
    with(&s, |d| {
        let now = cilium_datapath::sys::monotonic_secs() as i64;
        Ok(d.datapath().ct_dump()?.iter().flat_map(|(k, v)| ct_rows(k, v, now)).collect::<Vec<_>>())
    })
    .await
    .map(Json)
}

/// The rows `cilium bpf ct list` shows for one entry: the end that keeps
/// it, or both ends of a connection between two local endpoints (one entry
/// for both, listed as each end's, as upstream keeps them) — the opener's
/// alone until the acceptor has let the connection in.
fn ct_rows(k: &cilium_datapath::CtConn, v: &cilium_abi::CtEntry, now: i64) -> Vec<CtEntry> {
    let flags: Vec<String> =
        [CtEntryFlag::TxClosing, CtEntryFlag::RxClosing, CtEntryFlag::SeenReply].into_iter().filter(|&f| v.flags & f as u16 != 0).map(|f| format!("{f:?}")).collect();
    let local = std::net::SocketAddr::new(k.local, k.lport).to_string();
    let remote = std::net::SocketAddr::new(k.remote, k.rport).to_string();
    let opened_here = v.flags & CtEntryFlag::Egress as u16 != 0;
    let (src, dst) = if opened_here { (local, remote) } else { (remote, local) };
    let pair = v.flags & CtEntryFlag::Pair as u16 != 0;
    let directions: &[&str] = if pair && v.flags & CtEntryFlag::PeerVerdict as u16 != 0 {
        &["OUT", "IN"]
    } else if pair || opened_here {
        &["OUT"]
    } else {
        &["IN"]
    };
    directions
        .iter()
        .map(|direction| CtEntry {
            protocol: k.protocol,
            src: src.clone(),
            dst: dst.clone(),
            direction: direction.to_string(),
            expires_in_secs: v.lifetime as i64 - now,
            flags: flags.clone(),
            tx_packets: v.tx_packets,
            tx_bytes: v.tx_bytes,
            rx_packets: v.rx_packets,
            rx_bytes: v.rx_bytes,
            src_identity: v.src_sec_id,
        })
        .collect()
}

async fn bpf_ipcache(State(s): State<Shared>) -> Result<Json<Vec<IpcacheEntry>>, ApiError> {
    with(&s, |d| {
        Ok(d.datapath()
            .ipcache_dump()?
            .into_iter()
            .map(|(p, v)| IpcacheEntry { prefix: p.to_string(), identity: v.sec_identity, tunnel_endpoint: be_to_ip(v.tunnel_endpoint) })
            .collect())
    })
    .await
    .map(Json)
}

async fn bpf_metrics(State(s): State<Shared>) -> Result<Json<Vec<MetricEntry>>, ApiError> {
    with(&s, |d| {
        Ok(d.datapath()
            .metrics()?
            .into_iter()
            .map(|(k, v)| MetricEntry {
                reason: if k.reason == 0 {
                    "Forwarded".into()
                } else {
                    DropReason::from_code(k.reason).map(|r| r.description().to_string()).unwrap_or_else(|| k.reason.to_string())
                },
                direction: if k.dir == MetricDir::Ingress as u8 { "INGRESS" } else { "EGRESS" }.into(),
                packets: v.packets,
                bytes: v.bytes,
            })
            .collect())
    })
    .await
    .map(Json)
}

async fn monitor(State(s): State<Shared>) -> Response {
    let mut rx = s.monitor.subscribe();
    let st = s.clone();
    st.subscribers.fetch_add(1, Ordering::Relaxed);
    let stream = async_stream(move |tx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let mut line = serde_json::to_vec(&*ev).expect("event serializes");
                    line.push(b'\n');
                    if tx.send(Ok::<_, std::io::Error>(line)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    st.monitor_lost.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        st.subscribers.fetch_sub(1, Ordering::Relaxed);
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // created unreadable for others from the start, not chmod-ed after
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flags: u16) -> cilium_abi::CtEntry {
        cilium_abi::CtEntry { flags, lifetime: 110, tx_packets: 3, rx_packets: 2, ..Default::default() }
    }

    #[test]
    fn a_local_pairs_entry_is_listed_as_both_ends() {
        let k = cilium_datapath::CtConn {
            local: "10.0.1.5".parse().unwrap(),
            remote: "10.0.1.9".parse().unwrap(),
            lport: 80,
            rport: 40000,
            protocol: 6,
        };
        // kept from the acceptor's side (the lower address), opened by the other end
        let rows = ct_rows(&k, &entry(CtEntryFlag::Pair as u16 | CtEntryFlag::PeerVerdict as u16 | CtEntryFlag::SeenReply as u16), 100);
        assert_eq!(rows.iter().map(|r| r.direction.as_str()).collect::<Vec<_>>(), ["OUT", "IN"]);
        for r in &rows {
            assert_eq!((r.src.as_str(), r.dst.as_str()), ("10.0.1.9:40000", "10.0.1.5:80"));
            assert_eq!((r.expires_in_secs, r.tx_packets, r.rx_packets), (10, 3, 2));
            assert_eq!(r.flags, ["SeenReply"]);
        }
        // not let in by its acceptor (denied, or taken by the opener's L7 proxy): the opener's only
        let rows = ct_rows(&k, &entry(CtEntryFlag::Pair as u16), 100);
        assert_eq!(rows.iter().map(|r| (r.direction.as_str(), r.src.as_str())).collect::<Vec<_>>(), [("OUT", "10.0.1.9:40000")]);
        // an endpoint's own: one row, its direction
        let out = ct_rows(&k, &entry(CtEntryFlag::Egress as u16), 100);
        assert_eq!(out.iter().map(|r| (r.direction.as_str(), r.src.as_str())).collect::<Vec<_>>(), [("OUT", "10.0.1.5:80")]);
        let inn = ct_rows(&k, &entry(0), 100);
        assert_eq!(inn.iter().map(|r| (r.direction.as_str(), r.src.as_str())).collect::<Vec<_>>(), [("IN", "10.0.1.9:40000")]);
    }
}
