//! Agent configuration: flags, then `CILIUM_*` environment variables, then a
//! config file (YAML map of flag names to values), then defaults. Everything
//! is validated before the agent touches anything; a bad value ends the agent
//! with status 64 and a message naming the setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser};
use cilium_policy::EnforcementMode;
use ipnet::Ipv4Net;

/// Exit status for invalid configuration (EX_USAGE, as linkerd2-proxy).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Clone, Parser)]
#[command(name = "cilium-agent", version, about = "cilium-rs node agent", args_override_self = true)]
pub struct Config {
    /// YAML file mapping flag names (without --) to values.
    #[arg(long, env = "CILIUM_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// This node's name.
    #[arg(long, env = "CILIUM_NODE_NAME")]
    pub node_name: Option<String>,

    /// The node's pod CIDR (host-scope IPAM); its first address is the router.
    #[arg(long = "ipv4-range", env = "CILIUM_IPV4_RANGE", value_name = "CIDR")]
    pub ipv4_range: Option<String>,

    /// Pods get IPv6 addresses too (from --ipv6-range) and the datapath
    /// enforces policy on their IPv6 traffic.
    #[arg(long, env = "CILIUM_ENABLE_IPV6", default_value_t = false)]
    pub enable_ipv6: bool,

    /// The node's IPv6 pod CIDR (with --enable-ipv6); its first address is
    /// the router.
    #[arg(long = "ipv6-range", env = "CILIUM_IPV6_RANGE", value_name = "CIDR")]
    pub ipv6_range: Option<String>,

    /// Directory on bpffs where this agent pins its maps and links.
    #[arg(long, env = "CILIUM_BPF_ROOT", default_value = "/sys/fs/bpf/cilium")]
    pub bpf_root: PathBuf,

    /// Directory keeping endpoints, identities, IPAM and policies across restarts.
    #[arg(long, env = "CILIUM_STATE_DIR", default_value = "/var/run/cilium/state")]
    pub state_dir: PathBuf,

    /// The API socket (mode 0600).
    #[arg(long, env = "CILIUM_SOCKET_PATH", default_value = cilium_api::DEFAULT_SOCKET)]
    pub socket_path: PathBuf,

    /// cgroup v2 directory for this agent's socket-level programs.
    #[arg(long, env = "CILIUM_CGROUP_ROOT", default_value = "/sys/fs/cgroup/unified/cilium")]
    pub cgroup_root: PathBuf,

    /// Policy enforcement: default, always or never.
    #[arg(long, env = "CILIUM_ENABLE_POLICY", default_value = "default")]
    pub enable_policy: String,

    /// Whether the host may always reach its endpoints: always or policy.
    #[arg(long, env = "CILIUM_ALLOW_LOCALHOST", default_value = "always")]
    pub allow_localhost: String,

    /// Report would-be policy drops as AUDIT verdicts and let the traffic pass.
    #[arg(long, env = "CILIUM_POLICY_AUDIT_MODE", default_value_t = false)]
    pub policy_audit_mode: bool,

    /// Let pods send and receive IP protocols other than TCP, UDP, SCTP and
    /// ICMP (VRRP, IGMP, GRE, IPIP, IPV6, ESP, AH), under policy; without it
    /// they are dropped and policies naming them are refused.
    #[arg(long, env = "CILIUM_ENABLE_EXTENDED_IP_PROTOCOLS", default_value_t = false)]
    pub enable_extended_ip_protocols: bool,

    /// Give other nodes identities of their own from their labels (as
    /// `node:` labels next to reserved:remote-node), so fromNodes/toNodes
    /// can select them; without it every other node is remote-node and
    /// policies with node selectors are refused.
    #[arg(long, env = "CILIUM_ENABLE_NODE_SELECTOR_LABELS", default_value_t = false)]
    pub enable_node_selector_labels: bool,

    /// Enforce host policies (CiliumClusterwideNetworkPolicy with a
    /// nodeSelector) on the node's own traffic: from and to the network,
    /// the tunnel and the node's pods. Without it such policies are refused.
    #[arg(long, env = "CILIUM_ENABLE_HOST_FIREWALL", default_value_t = false)]
    pub enable_host_firewall: bool,

    /// Directory of policy files, imported and re-imported on change.
    #[arg(long, env = "CILIUM_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,

    /// MTU of the node's network: endpoint interfaces get it in native
    /// routing, 50 bytes less in tunnel mode (the VXLAN headers).
    #[arg(long, env = "CILIUM_MTU", default_value_t = 1500)]
    pub mtu: u32,

    /// Connection tracking entries (TCP, UDP and ICMP share one table).
    #[arg(long, env = "CILIUM_BPF_CT_GLOBAL_TCP_MAX", default_value_t = 262_144)]
    pub bpf_ct_global_tcp_max: u32,

    /// Policy map entries, all endpoints together.
    #[arg(long, env = "CILIUM_BPF_POLICY_MAP_MAX", default_value_t = 1 << 20)]
    pub bpf_policy_map_max: u32,

    /// ipcache entries.
    #[arg(long, env = "CILIUM_BPF_IPCACHE_MAP_MAX", default_value_t = 512_000)]
    pub bpf_ipcache_map_max: u32,

    /// Event ring buffer size in bytes (a power of two).
    #[arg(long, env = "CILIUM_BPF_EVENTS_RING_SIZE", default_value_t = 1 << 21)]
    pub bpf_events_ring_size: u32,

    /// How much the datapath traces for Hubble and `cilium monitor`: none
    /// (every packet, where it leaves and where it reaches an endpoint),
    /// lowest or low (every packet, where it goes), medium or maximum (where
    /// it goes, only packets that open, close or reset a connection), or 0-4.
    /// Drops and policy verdicts are always reported. The default is what
    /// upstream's Helm chart installs.
    #[arg(long, env = "CILIUM_MONITOR_AGGREGATION", default_value = "medium")]
    pub monitor_aggregation: String,

    /// Slots of each Maglev table (a prime; upstream's --bpf-lb-maglev-table-size).
    #[arg(long, env = "CILIUM_BPF_LB_MAGLEV_TABLE_SIZE", default_value_t = 16381)]
    pub bpf_lb_maglev_table_size: u32,

    /// Node devices for the per-packet service load balancer (NodePort,
    /// LoadBalancer, external IPs from outside), comma-separated. Default:
    /// every device with an IPv4 address except ours.
    #[arg(long, env = "CILIUM_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,

    /// Default backend selection of services: random or maglev (a service
    /// overrides it with the annotation service.cilium.io/lb-algorithm).
    #[arg(long, env = "CILIUM_BPF_LB_ALGORITHM", default_value = "random")]
    pub bpf_lb_algorithm: String,

    /// Run the transparent L7 proxy (HTTP rules are enforced by it; without
    /// it traffic that L7 rules would allow is dropped).
    #[arg(long, env = "CILIUM_ENABLE_L7_PROXY", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_l7_proxy: bool,

    /// Seconds an address learned from DNS stays allowed at least
    /// (upstream's --tofqdns-min-ttl).
    #[arg(long, env = "CILIUM_TOFQDNS_MIN_TTL", default_value_t = 3600)]
    pub tofqdns_min_ttl: u32,

    /// Addresses kept per DNS name (upstream's
    /// --tofqdns-endpoint-max-ip-per-hostname).
    #[arg(long, env = "CILIUM_TOFQDNS_ENDPOINT_MAX_IP_PER_HOSTNAME", default_value_t = 50)]
    pub tofqdns_endpoint_max_ip_per_hostname: u32,

    /// Run the Hubble server (flows, Observer and Peer gRPC services).
    #[arg(long, env = "CILIUM_ENABLE_HUBBLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_hubble: bool,

    /// Hubble's unix socket. Default: hubble.sock next to the API socket.
    #[arg(long, env = "CILIUM_HUBBLE_SOCKET_PATH")]
    pub hubble_socket_path: Option<PathBuf>,

    /// Hubble's TCP address, e.g. ":4244" (empty: unix socket only).
    #[arg(long, env = "CILIUM_HUBBLE_LISTEN_ADDRESS", default_value = "")]
    pub hubble_listen_address: String,

    /// Flows kept in memory (upstream uses 2^n - 1).
    #[arg(long, env = "CILIUM_HUBBLE_EVENT_BUFFER_CAPACITY", default_value_t = 4095)]
    pub hubble_event_buffer_capacity: u32,

    /// Address of Hubble's Prometheus endpoint, e.g. ":9965" (empty: off).
    #[arg(long, env = "CILIUM_HUBBLE_METRICS_SERVER", default_value = "")]
    pub hubble_metrics_server: String,

    /// Hubble metric families: flow, drop, tcp, icmp, port-distribution,
    /// policy, dns, http (comma-separated).
    #[arg(long, env = "CILIUM_HUBBLE_METRICS", value_delimiter = ',')]
    pub hubble_metrics: Vec<String>,

    /// Masquerade pods' TCP and UDP to the world (outside the cluster) to the
    /// node's address, in BPF (upstream's enable-ipv4-masquerade with
    /// enable-bpf-masquerade; off by default here, see the README).
    #[arg(long, env = "CILIUM_ENABLE_IPV4_MASQUERADE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_ipv4_masquerade: bool,

    /// How pods reach other nodes' pods: tunnel (VXLAN between nodes, the
    /// source identity in the VNI, which needs the cluster-wide identity
    /// numbers of --kvstore) or native (the network routes pod CIDRs).
    /// Default: tunnel with a kvstore (upstream's default), native without
    /// one (this node's own numbers cannot cross the wire).
    #[arg(long, env = "CILIUM_ROUTING_MODE", default_value = "")]
    pub routing_mode: String,

    /// Encapsulation of tunnel mode (vxlan; geneve is not built into this
    /// kernel).
    #[arg(long, env = "CILIUM_TUNNEL_PROTOCOL", default_value = "vxlan")]
    pub tunnel_protocol: String,

    /// UDP port of the tunnel.
    #[arg(long, env = "CILIUM_TUNNEL_PORT", default_value_t = 8472)]
    pub tunnel_port: u16,

    /// kvstore mode: how often cluster identities no endpoint uses are
    /// collected in etcd (freed once unused for two rounds in a row), and
    /// this agent's own are checked to still be there: a Go-style
    /// duration ("15m0s", "90s") or seconds. Upstream's operator flag.
    #[arg(long, env = "CILIUM_IDENTITY_GC_INTERVAL", default_value = "15m0s")]
    pub identity_gc_interval: String,

    /// Cluster state store: "" (none: identities are this node's) or etcd.
    #[arg(long, env = "CILIUM_KVSTORE", default_value = "")]
    pub kvstore: String,

    /// kvstore options, key=value (comma-separated): etcd.address
    /// (http://host:port), etcd.operationTimeout (seconds).
    #[arg(long, env = "CILIUM_KVSTORE_OPT", value_delimiter = ',')]
    pub kvstore_opt: Vec<String>,

    /// Probe the other nodes (ICMP and HTTP to their agents' health port)
    /// and answer their probes (upstream's --enable-health-checking).
    #[arg(long, env = "CILIUM_ENABLE_HEALTH_CHECKING", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_health_checking: bool,

    /// Seconds between two rounds of node probes.
    #[arg(long, env = "CILIUM_HEALTH_PROBE_INTERVAL", default_value_t = 10)]
    pub health_probe_interval: u64,

    /// Address of the agent's Prometheus endpoint, e.g. ":9962" (empty: off).
    #[arg(long, env = "CILIUM_PROMETHEUS_SERVE_ADDR", default_value = "")]
    pub prometheus_serve_addr: String,

    /// File flows are exported to as JSON lines (empty: off).
    #[arg(long, env = "CILIUM_HUBBLE_EXPORT_FILE_PATH", default_value = "")]
    pub hubble_export_file_path: String,

    /// Size at which the export file is rotated, in MB.
    #[arg(long, env = "CILIUM_HUBBLE_EXPORT_FILE_MAX_SIZE_MB", default_value_t = 10)]
    pub hubble_export_file_max_size_mb: u32,

    /// Rotated export files kept.
    #[arg(long, env = "CILIUM_HUBBLE_EXPORT_FILE_MAX_BACKUPS", default_value_t = 5)]
    pub hubble_export_file_max_backups: u32,

    /// Flows to export: JSON FlowFilters (any matches).
    #[arg(long, env = "CILIUM_HUBBLE_EXPORT_ALLOWLIST", default_value = "")]
    pub hubble_export_allowlist: String,

    /// Flows not to export: JSON FlowFilters (any matches).
    #[arg(long, env = "CILIUM_HUBBLE_EXPORT_DENYLIST", default_value = "")]
    pub hubble_export_denylist: String,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "CILIUM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: text or json.
    #[arg(long, env = "CILIUM_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}={value:?}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

fn bad(key: &str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), value: value.to_string(), reason: reason.into() }
}

/// Validated settings the agent runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    /// With --enable-ipv6.
    pub pod_cidr6: Option<ipnet::Ipv6Net>,
    pub bpf_root: PathBuf,
    pub state_dir: PathBuf,
    pub socket_path: PathBuf,
    pub cgroup_root: PathBuf,
    pub enforcement: EnforcementMode,
    pub allow_localhost: bool,
    pub audit_mode: bool,
    pub extended_ip_protocols: bool,
    pub node_selector_labels: bool,
    pub host_firewall: bool,
    pub policy_dir: Option<PathBuf>,
    pub mtu: u32,
    pub ct_max: u32,
    pub policy_max: u32,
    pub ipcache_max: u32,
    pub events_bytes: u32,
    pub maglev_table_size: u32,
    pub lb_algorithm: cilium_lb::Algorithm,
    pub monitor_aggregation: cilium_abi::MonitorAggregation,
    /// Empty: detect.
    pub devices: Vec<String>,
    pub log_level: tracing::Level,
    pub json_logs: bool,
    /// None: Hubble off.
    pub hubble: Option<HubbleSettings>,
    pub l7_proxy: bool,
    pub fqdn_min_ttl: u32,
    pub fqdn_max_ips: usize,
    pub prometheus_addr: Option<std::net::SocketAddr>,
    /// Seconds between node probes; None: health checking off.
    pub health_interval: Option<u64>,
    /// etcd's address and the operation timeout, when the kvstore is etcd.
    pub kvstore: Option<(String, std::time::Duration)>,
    pub masquerade: bool,
    pub routing_mode: cilium_api::RoutingMode,
    pub tunnel_port: u16,
    pub identity_gc_interval: std::time::Duration,
}

/// A Go-style duration ("15m0s", "1h30m", "90s", "500ms") or plain seconds.
fn duration(key: &str, s: &str) -> Result<std::time::Duration, ConfigError> {
    let err = || bad(key, s, "want a duration such as 15m0s, 90s or 500ms (or seconds)");
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        total += match &rest[..unit] {
            "h" => std::time::Duration::from_secs(n * 3600),
            "m" => std::time::Duration::from_secs(n * 60),
            "s" => std::time::Duration::from_secs(n),
            "ms" => std::time::Duration::from_millis(n),
            _ => return Err(err()),
        };
        rest = &rest[unit..];
    }
    if total.is_zero() {
        return Err(err());
    }
    Ok(total)
}

/// Hubble's validated settings.
#[derive(Debug, Clone)]
pub struct HubbleSettings {
    pub socket_path: PathBuf,
    pub listen: Option<std::net::SocketAddr>,
    pub capacity: usize,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub metrics: Vec<String>,
    pub export: Option<cilium_hubble::export::ExportConfig>,
}

/// ":4244", "0.0.0.0:4244", "127.0.0.1:4244", "[::]:4244"; empty is off.
fn listen_addr(key: &str, s: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
    full.parse().map(Some).map_err(|_| bad(key, s, "want [host]:port, e.g. :4244"))
}

/// Parses flags, environment and config file. `args` includes argv[0].
pub fn load(args: Vec<String>) -> Result<Settings, ConfigError> {
    let first = Config::try_parse_from(&args).map_err(clap_error)?;
    let merged = match &first.config_file {
        None => first,
        Some(path) => {
            let mut argv = vec![args[0].clone()];
            argv.extend(file_args(path)?);
            argv.extend(args.iter().skip(1).cloned());
            let matches = Config::command().try_get_matches_from(argv).map_err(clap_error)?;
            Config::from_arg_matches(&matches).map_err(clap_error)?
        }
    };
    merged.validate()
}

fn clap_error(e: clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let key = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().unwrap_or("").trim_start_matches('-').to_string(),
        _ => "(arguments)".to_string(),
    };
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let reason = e.render().to_string().lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
    ConfigError { key, value, reason }
}

/// Turns the config file into `--key=value` arguments, skipping keys whose
/// environment variable is set (the environment wins over the file).
fn file_args(path: &Path) -> Result<Vec<String>, ConfigError> {
    let key = "config-file";
    let text = std::fs::read_to_string(path).map_err(|e| bad(key, path.display(), format!("cannot read: {e}")))?;
    let map: BTreeMap<String, serde_yaml::Value> =
        serde_yaml::from_str(&text).map_err(|e| bad(key, path.display(), format!("not a YAML map of settings: {e}")))?;
    let cmd = Config::command();
    let mut out = Vec::new();
    for (k, v) in map {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(k.as_str()))
            .ok_or_else(|| bad(&k, "", format!("unknown setting in {}", path.display())))?;
        if k == key {
            return Err(bad(&k, "", "a config file cannot name another config file"));
        }
        if let Some(env) = arg.get_env() {
            if std::env::var_os(env).is_some() {
                continue;
            }
        }
        let value = match v {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            other => return Err(bad(&k, format!("{other:?}"), "must be a string, number or boolean")),
        };
        out.push(format!("--{k}={value}"));
    }
    Ok(out)
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".to_string())
}

impl Config {
    /// Checks every value; touches nothing.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let cidr_text = self.ipv4_range.clone().ok_or_else(|| bad("ipv4-range", "", "required: the node's pod CIDR, e.g. 10.0.1.0/24"))?;
        let pod_cidr: Ipv4Net = cidr_text.parse().map_err(|_| bad("ipv4-range", &cidr_text, "not an IPv4 CIDR"))?;
        if pod_cidr.prefix_len() > 28 {
            return Err(bad("ipv4-range", &cidr_text, "too small: use at most a /28"));
        }
        if pod_cidr.trunc() != pod_cidr {
            return Err(bad("ipv4-range", &cidr_text, format!("host bits set: did you mean {}?", pod_cidr.trunc())));
        }
        let pod_cidr6 = match (self.enable_ipv6, &self.ipv6_range) {
            (false, None) => None,
            (false, Some(r)) => return Err(bad("ipv6-range", r, "needs --enable-ipv6")),
            (true, None) => return Err(bad("ipv6-range", "", "required with --enable-ipv6: the node's IPv6 pod CIDR, e.g. fd00:10:1::/112")),
            (true, Some(r)) => {
                let net: ipnet::Ipv6Net = r.parse().map_err(|_| bad("ipv6-range", r, "not an IPv6 CIDR"))?;
                if net.prefix_len() > 120 {
                    return Err(bad("ipv6-range", r, "too small: use at most a /120"));
                }
                if net.trunc() != net {
                    return Err(bad("ipv6-range", r, format!("host bits set: did you mean {}?", net.trunc())));
                }
                if self.enable_host_firewall {
                    return Err(bad("enable-ipv6", "true", "the host firewall judges IPv4 only: use one or the other"));
                }
                Some(net)
            }
        };
        let kvstore = match self.kvstore.as_str() {
            "" => None,
            "etcd" => {
                let mut address = None;
                let mut timeout = std::time::Duration::from_secs(5);
                for opt in &self.kvstore_opt {
                    match opt.split_once('=') {
                        Some(("etcd.address", v)) if v.starts_with("http://") => address = Some(v.to_string()),
                        Some(("etcd.address", v)) => return Err(bad("kvstore-opt", opt, format!("etcd.address {v:?}: want http://host:port"))),
                        Some(("etcd.operationTimeout", v)) => {
                            let secs: u64 = v.trim_end_matches('s').parse().map_err(|_| bad("kvstore-opt", opt, "etcd.operationTimeout: want seconds"))?;
                            timeout = std::time::Duration::from_secs(secs.max(1));
                        }
                        _ => return Err(bad("kvstore-opt", opt, "unknown option: want etcd.address=http://host:port or etcd.operationTimeout=N")),
                    }
                }
                Some((address.ok_or_else(|| bad("kvstore-opt", self.kvstore_opt.join(","), "--kvstore=etcd needs etcd.address=http://host:port"))?, timeout))
            }
            other => return Err(bad("kvstore", other, "want etcd (or empty for none)")),
        };
        if self.health_probe_interval == 0 || self.health_probe_interval > 3600 {
            return Err(bad("health-probe-interval", self.health_probe_interval, "want 1 to 3600 seconds"));
        }
        let enforcement: EnforcementMode = self.enable_policy.parse().map_err(|e: String| bad("enable-policy", &self.enable_policy, e))?;
        let allow_localhost = match self.allow_localhost.as_str() {
            "always" | "auto" => true,
            "policy" => false,
            other => return Err(bad("allow-localhost", other, "want always, auto or policy")),
        };
        for (key, p) in [("bpf-root", &self.bpf_root), ("state-dir", &self.state_dir), ("socket-path", &self.socket_path), ("cgroup-root", &self.cgroup_root)] {
            if !p.is_absolute() {
                return Err(bad(key, p.display(), "must be an absolute path"));
            }
        }
        if !self.bpf_root.starts_with("/sys/fs/bpf") && !cilium_datapath::sys::is_bpffs(self.bpf_root.parent().unwrap_or(Path::new("/"))) {
            return Err(bad("bpf-root", self.bpf_root.display(), "must be on a bpf filesystem (under /sys/fs/bpf)"));
        }
        if self.cgroup_root.exists() && !self.cgroup_root.is_dir() {
            return Err(bad("cgroup-root", self.cgroup_root.display(), "exists and is not a directory"));
        }
        if let Some(d) = &self.policy_dir {
            if !d.is_dir() {
                return Err(bad("policy-dir", d.display(), "not a directory"));
            }
        }
        if !(576..=65535).contains(&self.mtu) {
            return Err(bad("mtu", self.mtu, "must be between 576 and 65535"));
        }
        if self.bpf_ct_global_tcp_max < 1024 {
            return Err(bad("bpf-ct-global-tcp-max", self.bpf_ct_global_tcp_max, "must be at least 1024"));
        }
        if self.bpf_policy_map_max < 1024 {
            return Err(bad("bpf-policy-map-max", self.bpf_policy_map_max, "must be at least 1024"));
        }
        if self.bpf_ipcache_map_max < 1024 {
            return Err(bad("bpf-ipcache-map-max", self.bpf_ipcache_map_max, "must be at least 1024"));
        }
        if !self.bpf_events_ring_size.is_power_of_two() || self.bpf_events_ring_size < 4096 {
            return Err(bad("bpf-events-ring-size", self.bpf_events_ring_size, "must be a power of two of at least 4096"));
        }
        let m = self.bpf_lb_maglev_table_size;
        if !(251..=65521).contains(&m) || !cilium_lb::maglev::is_prime(m) {
            return Err(bad("bpf-lb-maglev-table-size", m, "must be a prime between 251 and 65521 (e.g. 16381)"));
        }
        let lb_algorithm = cilium_lb::Algorithm::parse(&self.bpf_lb_algorithm).ok_or_else(|| bad("bpf-lb-algorithm", &self.bpf_lb_algorithm, "want random or maglev"))?;
        let monitor_aggregation = cilium_abi::MonitorAggregation::parse(&self.monitor_aggregation)
            .ok_or_else(|| bad("monitor-aggregation", &self.monitor_aggregation, "want none, lowest, low, medium, maximum or 0-4"))?;
        let log_level: tracing::Level = self.log_level.parse().map_err(|_| bad("log-level", &self.log_level, "want error, warn, info, debug or trace"))?;
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(bad("log-format", other, "want text or json")),
        };
        let prometheus_addr = listen_addr("prometheus-serve-addr", &self.prometheus_serve_addr)?;
        let hubble = if self.enable_hubble {
            let capacity = self.hubble_event_buffer_capacity;
            if capacity == 0 || capacity > 1 << 20 {
                return Err(bad("hubble-event-buffer-capacity", capacity, "must be between 1 and 1048576"));
            }
            let mut probe = prometheus_client::registry::Registry::default();
            cilium_hubble::metrics::Metrics::register(&mut probe, &self.hubble_metrics).map_err(|e| bad("hubble-metrics", self.hubble_metrics.join(","), e.to_string()))?;
            let export = if self.hubble_export_file_path.is_empty() {
                None
            } else {
                let path = PathBuf::from(&self.hubble_export_file_path);
                if !path.is_absolute() {
                    return Err(bad("hubble-export-file-path", path.display(), "must be an absolute path"));
                }
                if self.hubble_export_file_max_size_mb == 0 {
                    return Err(bad("hubble-export-file-max-size-mb", 0, "must be at least 1"));
                }
                let allow = cilium_hubble::export::parse_filters("hubble-export-allowlist", &self.hubble_export_allowlist).map_err(|e| bad("hubble-export-allowlist", &self.hubble_export_allowlist, e.to_string()))?;
                let deny = cilium_hubble::export::parse_filters("hubble-export-denylist", &self.hubble_export_denylist).map_err(|e| bad("hubble-export-denylist", &self.hubble_export_denylist, e.to_string()))?;
                Some(cilium_hubble::export::ExportConfig { path, max_size_bytes: u64::from(self.hubble_export_file_max_size_mb) << 20, max_backups: self.hubble_export_file_max_backups, allow, deny })
            };
            let socket_path = match &self.hubble_socket_path {
                Some(p) if !p.is_absolute() => return Err(bad("hubble-socket-path", p.display(), "must be an absolute path")),
                Some(p) => p.clone(),
                None => self.socket_path.parent().unwrap_or(Path::new("/")).join("hubble.sock"),
            };
            Some(HubbleSettings {
                socket_path,
                listen: listen_addr("hubble-listen-address", &self.hubble_listen_address)?,
                capacity: capacity as usize,
                metrics_addr: listen_addr("hubble-metrics-server", &self.hubble_metrics_server)?,
                metrics: self.hubble_metrics.clone(),
                export,
            })
        } else {
            None
        };
        let identity_gc_interval = duration("identity-gc-interval", &self.identity_gc_interval)?;
        let routing_mode = match self.routing_mode.as_str() {
            "" if kvstore.is_some() => cilium_api::RoutingMode::Tunnel,
            "" => cilium_api::RoutingMode::Native,
            m => cilium_api::RoutingMode::parse(m).ok_or_else(|| bad("routing-mode", m, "want tunnel or native"))?,
        };
        if routing_mode == cilium_api::RoutingMode::Tunnel && kvstore.is_none() {
            return Err(bad("routing-mode", "tunnel", "the VNI carries identity numbers every node must agree on: tunnel mode needs --kvstore=etcd (or use --routing-mode=native)"));
        }
        match self.tunnel_protocol.as_str() {
            "vxlan" => {}
            "geneve" => return Err(bad("tunnel-protocol", "geneve", "GENEVE is not built into this kernel; use vxlan")),
            other => return Err(bad("tunnel-protocol", other, "want vxlan")),
        }
        if self.tunnel_port == 0 {
            return Err(bad("tunnel-port", 0, "must be a UDP port (1-65535)"));
        }
        if routing_mode == cilium_api::RoutingMode::Tunnel && self.mtu < 576 + cilium_api::RoutingMode::VXLAN_OVERHEAD {
            return Err(bad("mtu", self.mtu, "leaves pods less than 576 bytes under the tunnel's 50 bytes of headers"));
        }
        if self.tofqdns_endpoint_max_ip_per_hostname == 0 {
            return Err(bad("tofqdns-endpoint-max-ip-per-hostname", 0, "must be at least 1"));
        }
        Ok(Settings {
            l7_proxy: self.enable_l7_proxy,
            fqdn_min_ttl: self.tofqdns_min_ttl,
            fqdn_max_ips: self.tofqdns_endpoint_max_ip_per_hostname as usize,
            hubble,
            prometheus_addr,
            health_interval: self.enable_health_checking.then_some(self.health_probe_interval),
            kvstore,
            masquerade: self.enable_ipv4_masquerade,
            routing_mode,
            tunnel_port: self.tunnel_port,
            identity_gc_interval,
            node_name: self.node_name.unwrap_or_else(hostname),
            pod_cidr,
            pod_cidr6,
            bpf_root: self.bpf_root,
            state_dir: self.state_dir,
            socket_path: self.socket_path,
            cgroup_root: self.cgroup_root,
            enforcement,
            allow_localhost,
            audit_mode: self.policy_audit_mode,
            extended_ip_protocols: self.enable_extended_ip_protocols,
            node_selector_labels: self.enable_node_selector_labels,
            host_firewall: self.enable_host_firewall,
            policy_dir: self.policy_dir,
            mtu: self.mtu,
            ct_max: self.bpf_ct_global_tcp_max,
            policy_max: self.bpf_policy_map_max,
            ipcache_max: self.bpf_ipcache_map_max,
            events_bytes: self.bpf_events_ring_size,
            maglev_table_size: m,
            lb_algorithm,
            monitor_aggregation,
            devices: self.devices,
            log_level,
            json_logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("cilium-agent").chain(a.iter().copied()).map(String::from).collect()
    }

    #[test]
    fn minimal_flags() {
        let s = load(args(&["--ipv4-range", "10.0.1.0/24", "--node-name", "n1"])).unwrap();
        assert_eq!(s.pod_cidr.to_string(), "10.0.1.0/24");
        assert_eq!(s.node_name, "n1");
        assert_eq!(s.enforcement, EnforcementMode::Default);
        assert!(s.allow_localhost);
    }

    #[test]
    fn ipv6_flags() {
        let v4 = ["--ipv4-range", "10.0.1.0/24"];
        let with = |extra: &[&str]| load(args(&[&v4[..], extra].concat()));
        assert_eq!(with(&[]).unwrap().pod_cidr6, None);
        let s = with(&["--enable-ipv6", "--ipv6-range", "fd00:10:1::/112"]).unwrap();
        assert_eq!(s.pod_cidr6.unwrap().to_string(), "fd00:10:1::/112");
        let e = with(&["--enable-ipv6"]).unwrap_err();
        assert_eq!(e.key, "ipv6-range");
        let e = with(&["--ipv6-range", "fd00:10:1::/112"]).unwrap_err();
        assert!(e.key == "ipv6-range" && e.reason.contains("--enable-ipv6"), "{e}");
        let e = with(&["--enable-ipv6", "--ipv6-range", "fd00:10:1::5/112"]).unwrap_err();
        assert!(e.reason.contains("fd00:10:1::/112"), "{e}");
        let e = with(&["--enable-ipv6", "--ipv6-range", "10.0.0.0/8"]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("ipv6-range", "10.0.0.0/8"));
        let e = with(&["--enable-ipv6", "--ipv6-range", "fd00::/124"]).unwrap_err();
        assert!(e.reason.contains("/120"), "{e}");
        let e = with(&["--enable-ipv6", "--ipv6-range", "fd00:10:1::/112", "--enable-host-firewall"]).unwrap_err();
        assert_eq!(e.key, "enable-ipv6");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = load(args(&["--ipv4-range", "10.0.1.5/24"])).unwrap_err();
        assert_eq!(e.key, "ipv4-range");
        assert!(e.reason.contains("10.0.1.0/24"), "{e}");
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--enable-policy", "sometimes"])).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("enable-policy", "sometimes"));
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--mtu", "abc"])).unwrap_err();
        assert_eq!(e.key, "mtu");
        let e = load(args(&[])).unwrap_err();
        assert_eq!(e.key, "ipv4-range");
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--bpf-events-ring-size", "5000"])).unwrap_err();
        assert_eq!(e.key, "bpf-events-ring-size");
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--bpf-lb-maglev-table-size", "16384"])).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("bpf-lb-maglev-table-size", "16384"));
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--bpf-lb-algorithm", "round-robin"])).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("bpf-lb-algorithm", "round-robin"));
        let s = load(args(&["--ipv4-range", "10.0.1.0/24", "--bpf-lb-algorithm", "maglev", "--bpf-lb-maglev-table-size", "251"])).unwrap();
        assert_eq!((s.lb_algorithm, s.maglev_table_size), (cilium_lb::Algorithm::Maglev, 251));
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--monitor-aggregation", "5"])).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("monitor-aggregation", "5"));
    }

    #[test]
    fn monitor_aggregation_levels() {
        use cilium_abi::MonitorAggregation as M;
        let level = |v: &[&str]| load(args(&[&["--ipv4-range", "10.0.1.0/24"], v].concat())).unwrap().monitor_aggregation;
        assert_eq!(level(&[]), M::Medium, "upstream's Helm default");
        for (v, want) in [("none", M::None), ("disabled", M::None), ("0", M::None), ("lowest", M::Lowest), ("Low", M::Low), ("3", M::Medium), ("max", M::Maximum), ("maximum", M::Maximum)] {
            assert_eq!(level(&["--monitor-aggregation", v]), want, "{v}");
        }
    }

    #[test]
    fn routing_modes() {
        const KV: [&str; 4] = ["--kvstore", "etcd", "--kvstore-opt", "etcd.address=http://127.0.0.1:2379"];
        let with_kv = |extra: &[&str]| load(args(&[&["--ipv4-range", "10.0.1.0/24"], &KV[..], extra].concat()));
        let s = with_kv(&[]).unwrap();
        assert_eq!((s.routing_mode, s.tunnel_port), (cilium_api::RoutingMode::Tunnel, 8472), "upstream's default, with a kvstore");
        let s = load(args(&["--ipv4-range", "10.0.1.0/24"])).unwrap();
        assert_eq!(s.routing_mode, cilium_api::RoutingMode::Native, "without one: node-local numbers cannot cross the wire");
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--routing-mode", "tunnel"])).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("routing-mode", "tunnel"));
        assert!(e.reason.contains("--kvstore=etcd"), "{e}");
        assert_eq!(with_kv(&["--routing-mode", "native"]).unwrap().routing_mode, cilium_api::RoutingMode::Native);
        let e = load(args(&["--ipv4-range", "10.0.1.0/24", "--routing-mode", "direct"])).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("routing-mode", "direct"));
        let e = with_kv(&["--tunnel-protocol", "geneve"]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("tunnel-protocol", "geneve"));
        let e = with_kv(&["--mtu", "600"]).unwrap_err();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("mtu", "600"));
        load(args(&["--ipv4-range", "10.0.1.0/24", "--mtu", "600"])).unwrap();
    }

    #[test]
    fn durations_as_upstream_writes_them() {
        for (text, secs) in [("15m0s", 900), ("90s", 90), ("1h30m", 5400), ("7", 7)] {
            assert_eq!(duration("x", text).unwrap(), std::time::Duration::from_secs(secs), "{text}");
        }
        assert_eq!(duration("x", "250ms").unwrap(), std::time::Duration::from_millis(250));
        for bad in ["", "0s", "15 m", "m", "1d", "-1s"] {
            let e = duration("identity-gc-interval", bad).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_str()), ("identity-gc-interval", bad));
        }
    }

    #[test]
    fn config_file_is_below_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "ipv4-range: 10.0.2.0/24\nmtu: 1400\nnode-name: from-file\n").unwrap();
        let s = load(args(&["--config-file", f.to_str().unwrap(), "--node-name", "from-flag"])).unwrap();
        assert_eq!(s.pod_cidr.to_string(), "10.0.2.0/24");
        assert_eq!(s.mtu, 1400);
        assert_eq!(s.node_name, "from-flag");
    }

    #[test]
    fn config_file_unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "ipv4-range: 10.0.2.0/24\nmtuu: 1400\n").unwrap();
        let e = load(args(&["--config-file", f.to_str().unwrap()])).unwrap_err();
        assert_eq!(e.key, "mtuu");
    }
}
