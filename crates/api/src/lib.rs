//! The agent's API: JSON over HTTP/1.1 on a unix socket readable only by
//! root, as upstream's. This crate holds the request and response models and a
//! small client; the server is in `cilium-agent`. It knows nothing about how
//! the agent does its work.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use cilium_flow::MonitorEvent;

/// Default socket of the agent.
pub const DEFAULT_SOCKET: &str = "/var/run/cilium/cilium.sock";

/// An error the agent returned, or a failure to reach it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the agent at {socket}: {source} (is cilium-agent running? set -H/--host or CILIUM_SOCK)")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(ErrorBody),
    #[error("talking to the agent: {0}")]
    Protocol(String),
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    pub error: String,
    /// For invalid input: the document, field and value at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

// ------------------------------------------------------------------ models ---

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: usize,
    pub max_entries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub node_name: String,
    pub healthy: bool,
    pub uptime_secs: u64,
    pub pod_cidr: String,
    pub router_ip: Ipv4Addr,
    pub node_ips: Vec<Ipv4Addr>,
    pub endpoints: usize,
    pub endpoints_ready: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_revision: u64,
    pub enforcement: String,
    pub ipam_used: usize,
    pub ipam_available: usize,
    /// With IPv6 enabled: "used/total allocated from CIDR, router IP".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam6: Option<String>,
    pub maps: Vec<MapStatus>,
    pub monitor_lost_events: u64,
    pub monitor_subscribers: usize,
    pub state_dir: String,
    pub bpf_root: String,
    pub socket: String,
    /// Problems worth a human's attention (e.g. a policy that did not fit).
    pub warnings: Vec<String>,
    /// None when Hubble is disabled.
    #[serde(default)]
    pub hubble: Option<HubbleStatus>,
    /// None when health checking is off.
    #[serde(default)]
    pub cluster_health: Option<ClusterHealth>,
    /// etcd's address when the kvstore is on.
    #[serde(default)]
    pub kvstore: Option<String>,
    #[serde(default)]
    pub routing_mode: RoutingMode,
}

/// How pods reach other nodes' pods (upstream's `routingMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// Through the underlay, which routes pod CIDRs; the receiving node
    /// finds the source's identity in its ipcache.
    #[default]
    Native,
    /// VXLAN between nodes with the source identity in the VNI.
    Tunnel,
}

impl RoutingMode {
    /// Bytes the outer headers take (IPv4, UDP, VXLAN, inner Ethernet):
    /// pods' MTU is the device's minus this in tunnel mode.
    pub const VXLAN_OVERHEAD: u32 = 50;

    pub fn parse(s: &str) -> Option<RoutingMode> {
        match s {
            "native" => Some(RoutingMode::Native),
            "tunnel" => Some(RoutingMode::Tunnel),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Native => "native",
            RoutingMode::Tunnel => "tunnel",
        }
    }
}

/// `Cluster health: reachable/total`: nodes (this one included) whose
/// host and agent answered the last probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHealth {
    pub reachable: usize,
    pub total: usize,
    /// Unix seconds of the last round (0: none yet).
    pub probed_at: u64,
}

/// One probe's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub ok: bool,
    /// Round-trip time in microseconds (when ok).
    pub rtt_us: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A node's connectivity as this agent last probed it (`cilium-health
/// status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub name: String,
    pub ip: Ipv4Addr,
    /// This agent's own node.
    pub local: bool,
    /// ICMP echo to the node's address (its stack).
    pub icmp: ProbeResult,
    /// HTTP to the node's agent health port.
    pub http: ProbeResult,
    /// Unix seconds.
    pub probed_at: u64,
}

impl NodeHealth {
    pub fn reachable(&self) -> bool {
        self.icmp.ok && self.http.ok
    }
}

/// One address the DNS proxy learned for a name (`cilium fqdn cache list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnCacheEntry {
    pub name: String,
    pub ip: std::net::IpAddr,
    /// Unix seconds.
    pub expires: u64,
}

/// The Hubble server's state, as `cilium status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubbleStatus {
    pub flows: u64,
    pub max_flows: u64,
    pub seen_flows: u64,
    /// Events the datapath could not hand to the agent (ring buffer full).
    pub lost_datapath_events: u64,
    /// Flows the exporter could not keep up with.
    pub lost_export: u64,
    pub socket: String,
    pub listen_address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamRequest {
    /// Who holds the address: container ID and interface.
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamResponse {
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub cidr: String,
    pub mtu: u32,
    /// With IPv6 enabled: the pod's IPv6 address, its gateway and CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<IpamResponse6>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamResponse6 {
    pub ip: std::net::Ipv6Addr,
    pub gateway: std::net::Ipv6Addr,
    pub cidr: String,
}

/// What the CNI plugin tells the agent after wiring a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCreate {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub ipv4: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub mac: String,
    pub namespace: String,
    pub pod_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: u16,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ipv4: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub mac: String,
    pub namespace: String,
    pub pod_name: String,
    pub labels: Vec<String>,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub policy_revision: u64,
    /// "ready", "not-ready", or "policy-error".
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub policy_entries: usize,
    pub selected_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDelete {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointGc {
    /// Attachments still valid: (container ID, interface).
    pub valid: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: u32,
    pub labels: Vec<String>,
    pub references: u32,
}

/// A pod as the Kubernetes API would describe it (fed by the lab today, by
/// the pod watcher later): the agent learns endpoints' labels from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// Container ports: (name, protocol, port).
    #[serde(default)]
    pub ports: Vec<(Option<String>, String, u16)>,
    /// The workload owning the pod, `Kind/name` (e.g. `Deployment/web`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The pod's address, once it has one (status.podIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Its IPv6 address in a dual-stack cluster (the other of status.podIPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The node it runs on (spec.nodeName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A node of the cluster, as its agent announces it (upstream's
/// CiliumNode): its name, its address and its pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    pub pod_cidr: String,
    /// Its IPv6 address in a dual-stack cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The node's labels (the Kubernetes Node's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A node as `cilium node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    pub pod_cidr: String,
    /// This agent's own node.
    pub local: bool,
    /// Pods of this node this agent knows addresses of.
    pub pods: usize,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The identity this agent gives the node's addresses (host for
    /// itself; remote-node, or the node's own with
    /// --enable-node-selector-labels).
    #[serde(default)]
    pub identity: u32,
}

fn default_sa() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceMeta {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyImport {
    /// YAML or JSON, one or more documents.
    pub text: String,
    /// Names the text in error messages (a file name).
    pub source: String,
    /// Only validate; change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyChange {
    pub revision: u64,
    /// `Kind/namespace/name` of each policy touched.
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyList {
    pub revision: u64,
    /// The documents, as JSON.
    pub documents: Vec<serde_json::Value>,
}

/// Which policies `DELETE /v1/policy` removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDelete {
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// One side of a policy trace: a pod, an identity, or labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceParty {
    /// `namespace/pod` or `namespace:pod`.
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub identity: Option<u32>,
    /// `source:key=value` labels.
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTraceRequest {
    pub src: TraceParty,
    pub dst: TraceParty,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or an extended protocol's name.
    pub protocol: String,
    /// Destination port (ICMP, ICMPv6: type).
    pub dport: u16,
    /// An HTTP request to check against L7 rules too (method, path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<TraceHttp>,
}

/// The HTTP request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHttp {
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    #[serde(default)]
    pub host: String,
    /// "Name: value" headers.
    #[serde(default)]
    pub headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyTraceResponse {
    pub src_labels: Vec<String>,
    pub dst_labels: Vec<String>,
    /// "ALLOWED" or "DENIED".
    pub verdict: String,
    /// The full explanation, structured.
    pub trace: serde_json::Value,
    /// The explanation as `cilium policy trace` prints it.
    pub rendered: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyMapEntry {
    pub egress: bool,
    pub identity: u32,
    pub labels: Vec<String>,
    pub protocol: u8,
    /// First port and prefix bits, as in the map.
    pub port: u16,
    pub port_prefix: u8,
    pub deny: bool,
    pub proxy_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtEntry {
    pub protocol: u8,
    pub src: String,
    pub dst: String,
    pub direction: String,
    pub expires_in_secs: i64,
    pub flags: Vec<String>,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub src_identity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcacheEntry {
    pub prefix: String,
    pub identity: u32,
    pub tunnel_endpoint: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricEntry {
    pub reason: String,
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
}

// ---------------------------------------------------------------- services ---

/// A Kubernetes Service with its endpoints, as the Service and EndpointSlice
/// watchers deliver them (in the lab, `cilium lab` plays the control plane).
/// Addresses are strings so the agent can name a bad one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sService {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// metadata.labels (what `k8sServiceSelector` in policies matches).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// spec.selector; none for a Service whose endpoints are kept by hand
    /// (`toServices` then means its endpoint addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// ClusterIP, NodePort or LoadBalancer.
    #[serde(rename = "type", default = "cluster_ip")]
    pub service_type: String,
    /// The allocated ClusterIP, or "None" for a headless service.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "externalIPs", skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<String>,
    /// status.loadBalancer.ingress IPs.
    #[serde(default, rename = "loadBalancerIPs", skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<K8sServicePort>,
    /// "ClientIP" or "None".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// sessionAffinityConfig.clientIP.timeoutSeconds (default 10800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout: Option<u32>,
    /// Cluster (default) or Local: NodePort, LoadBalancer and external IP
    /// traffic only to this node's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    /// Cluster (default) or Local: ClusterIP traffic only to this node's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// Clients allowed to reach the LoadBalancer IPs (CIDRs); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<K8sEndpoint>,
}

fn cluster_ip() -> String {
    "ClusterIP".to_string()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

fn tcp() -> String {
    "TCP".to_string()
}

/// One endpoint of an EndpointSlice: an address and its port for each
/// service port name it serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sEndpoint {
    pub ip: String,
    /// The node the endpoint runs on (for the Local traffic policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<K8sEndpointPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sEndpointPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: u16,
}

/// `cilium service update`: a frontend and its backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUpdate {
    /// Keeps this ID (updates the service that has it, or creates it).
    pub id: Option<u16>,
    /// `IP:PORT`.
    pub frontend: String,
    /// TCP or UDP.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// `IP:PORT` each.
    pub backends: Vec<String>,
    /// random or maglev.
    #[serde(default)]
    pub algorithm: Option<String>,
}

/// A service as `cilium service list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub id: u16,
    /// `namespace/name` (port name after a colon), empty when made through the API.
    pub name: String,
    pub frontends: Vec<FrontendView>,
    pub backends: Vec<BackendView>,
    pub algorithm: String,
    pub affinity_timeout: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendView {
    /// `IP:PORT/PROTO`.
    pub address: String,
    /// ClusterIP, NodePort, LoadBalancer or ExternalIP.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub id: u32,
    /// `IP:PORT/PROTO`.
    pub address: String,
    /// active or terminating.
    pub state: String,
}

/// The service maps, as `cilium bpf lb list` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbMapView {
    /// Per frontend: `IP:PORT/PROTO` and its slots, slot 0 first.
    pub services: Vec<LbServiceEntry>,
    /// Maglev tables: service ID and backend ID per slot (only with `?maglev`).
    #[serde(default)]
    pub maglev: Vec<(u16, Vec<u32>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbServiceEntry {
    pub frontend: String,
    pub service_id: u16,
    pub count: u16,
    pub flags: Vec<String>,
    /// Slot 1..count: backend ID and `IP:PORT` (empty when the backend entry is missing).
    pub slots: Vec<(u32, String)>,
}

// ------------------------------------------------------------------ client ---

/// A client of one agent socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Unreachable { socket: self.socket.display().to_string(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cilium-agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiError::Protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| ApiError::Protocol(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.map_err(|e| ApiError::Protocol(e.to_string()))?.to_bytes();
            let err = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                status,
                error: String::from_utf8_lossy(&bytes).into_owned(),
                document: None,
                field: None,
                value: None,
            });
            return Err(ApiError::Agent(err));
        }
        Ok(resp)
    }

    /// Sends a request and decodes the JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, method: &str, path: &str, body: Option<&Req>) -> Result<Resp, ApiError> {
        let body = body.map(|b| serde_json::to_vec(b)).transpose().map_err(|e| ApiError::Protocol(e.to_string()))?;
        let resp = self.send(method, path, body).await?;
        let bytes = resp.into_body().collect().await.map_err(|e| ApiError::Protocol(e.to_string()))?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol(format!("decoding {path}: {e}")))
    }

    pub async fn get<Resp: DeserializeOwned>(&self, path: &str) -> Result<Resp, ApiError> {
        self.call::<(), Resp>("GET", path, None).await
    }

    /// Streams newline-delimited JSON values (the monitor), calling `f` for
    /// each until it returns false or the stream ends.
    pub async fn stream<T: DeserializeOwned>(&self, path: &str, mut f: impl FnMut(T) -> bool) -> Result<(), ApiError> {
        let resp = self.send("GET", path, None).await?;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::Protocol(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if line.len() <= 1 {
                        continue;
                    }
                    let v: T = serde_json::from_slice(&line).map_err(|e| ApiError::Protocol(e.to_string()))?;
                    if !f(v) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}
