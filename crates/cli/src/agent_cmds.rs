//! Commands answered by the agent over its socket, and `policy validate`,
//! which needs no agent.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cilium_api::{
    Client, CtEntry, Endpoint, Identity, IpcacheEntry, MetricEntry, MonitorEvent, PolicyChange, PolicyDelete, PolicyImport,
    LbMapView, PolicyList, PolicyMapEntry, ServiceUpdate, ServiceView, Status,
};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct StatusArgs {
    /// Output format: text or json.
    #[arg(short, long, default_value = "text")]
    output: String,
    /// Exit non-zero unless the agent is healthy.
    #[arg(long)]
    brief: bool,
    /// Each node's health: ICMP to its stack and HTTP to its agent, with
    /// round-trip times (as cilium-health status).
    #[arg(long)]
    all_health: bool,
}

#[derive(Subcommand)]
pub enum EndpointCmd {
    /// List endpoints.
    List {
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Show one endpoint.
    Get { id: u16 },
}

#[derive(Subcommand)]
pub enum IdentityCmd {
    /// List identities.
    List {
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List the nodes of the cluster this agent knows.
    List {
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Import policy files (YAML or JSON; `-` for stdin). All or nothing.
    Import { files: Vec<PathBuf> },
    /// Print the imported policies.
    Get {
        #[arg(short, long, default_value = "yaml")]
        output: String,
    },
    /// Delete a policy by name, or all of them.
    Delete {
        name: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(short, long)]
        namespace: Option<String>,
        /// CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy or CiliumCIDRGroup.
        #[arg(long)]
        kind: Option<String>,
    },
    /// Explain the verdict for traffic from a source to a destination, in both
    /// directions: the source's egress and the destination's ingress.
    Trace(TraceArgs),
    /// Check policy files without an agent. Exits 1 if any is invalid.
    Validate {
        files: Vec<PathBuf>,
        /// Print what each valid document means (its normalized rules).
        #[arg(long)]
        print: bool,
    },
}

#[derive(Args)]
pub struct TraceArgs {
    /// Source pod, `namespace:pod` (or namespace/pod).
    #[arg(long)]
    src_k8s_pod: Option<String>,
    /// Destination pod, `namespace:pod`.
    #[arg(long)]
    dst_k8s_pod: Option<String>,
    /// Source identity.
    #[arg(long)]
    src_identity: Option<u32>,
    /// Destination identity.
    #[arg(long)]
    dst_identity: Option<u32>,
    /// Source labels (`k8s:app=web`), repeatable.
    #[arg(short = 's', long = "src")]
    src: Vec<String>,
    /// Destination labels, repeatable.
    #[arg(short = 'd', long = "dst")]
    dst: Vec<String>,
    /// Destination port and protocol: `80`, `80/TCP`, `53/UDP`, `8/ICMP`, `128/ICMPv6`.
    #[arg(long, default_value = "0/TCP")]
    dport: String,
    /// Also check an HTTP request against L7 rules: its method...
    #[arg(long)]
    http_method: Option<String>,
    /// ...and path (with --http-method).
    #[arg(long)]
    http_path: Option<String>,
    /// Host header of the HTTP request.
    #[arg(long, default_value = "")]
    http_host: String,
    /// Headers of the HTTP request, "Name: value", repeatable.
    #[arg(long = "http-header")]
    http_headers: Vec<String>,
    #[arg(short, long, default_value = "text")]
    output: String,
}

#[derive(Subcommand)]
pub enum BpfCmd {
    /// The policy map.
    #[command(subcommand)]
    Policy(BpfPolicyCmd),
    /// Connection tracking.
    #[command(subcommand)]
    Ct(BpfListCmd),
    /// The ipcache.
    #[command(subcommand)]
    Ipcache(BpfListCmd),
    /// Forwarded and dropped packet counters.
    #[command(subcommand)]
    Metrics(BpfListCmd),
    /// The service load balancing maps.
    #[command(subcommand)]
    Lb(BpfLbCmd),
}

#[derive(Subcommand)]
pub enum BpfLbCmd {
    /// Frontends and their backend slots, as the datapath sees them.
    List {
        /// Show the Maglev tables instead (slots per backend).
        #[arg(long)]
        maglev: bool,
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

#[derive(Subcommand)]
pub enum FqdnCmd {
    /// The FQDN cache.
    #[command(subcommand)]
    Cache(FqdnCacheCmd),
}

#[derive(Subcommand)]
pub enum FqdnCacheCmd {
    /// Names, the addresses learned for them, and when they expire.
    List {
        /// Only names matching this (exact, or a pattern with '*').
        #[arg(long)]
        matchpattern: Option<String>,
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

pub async fn fqdn(c: &Client, cmd: FqdnCmd) -> anyhow::Result<i32> {
    let FqdnCmd::Cache(FqdnCacheCmd::List { matchpattern, output }) = cmd;
    let mut list: Vec<cilium_api::FqdnCacheEntry> = c.get("/v1/fqdn/cache").await?;
    if let Some(p) = matchpattern {
        let m = cilium_policy::fqdn::NameMatcher::new(&cilium_policy::api::FqdnSelector { match_name: None, match_pattern: Some(p) });
        list.retain(|e| m.matches(&e.name));
    }
    if output == "json" {
        return json(&list);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    println!("{:<40} {:<8} {:<22} {}", "FQDN", "TTL", "ExpirationTime", "IPs");
    for e in list {
        let ttl = e.expires.saturating_sub(now);
        let when = format!("in {}m{:02}s", ttl / 60, ttl % 60);
        println!("{:<40} {:<8} {:<22} {}", format!("{}.", e.name), ttl, if ttl == 0 { "expired (in use)".to_string() } else { when }, e.ip);
    }
    Ok(0)
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// List services: frontends and backends.
    List {
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Create or update a service with one frontend.
    Update {
        /// Service ID (kept across updates).
        #[arg(long)]
        id: u16,
        /// Frontend address, IP:PORT.
        #[arg(long)]
        frontend: String,
        /// Backend addresses, IP:PORT, comma-separated.
        #[arg(long, value_delimiter = ',')]
        backends: Vec<String>,
        /// TCP or UDP.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// Backend selection: random or maglev (default: the agent's).
        #[arg(long)]
        algorithm: Option<String>,
    },
    /// Delete a service.
    Delete {
        id: u16,
    },
}

#[derive(Subcommand)]
pub enum BpfPolicyCmd {
    /// Show an endpoint's policy map entries.
    Get {
        id: Option<u16>,
        #[arg(long)]
        all: bool,
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

#[derive(Subcommand)]
pub enum BpfListCmd {
    /// List entries (`global` accepted for upstream compatibility).
    List {
        #[arg(hide = true)]
        scope: Option<String>,
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

#[derive(Args)]
pub struct MonitorArgs {
    /// Only these event types: drop, trace, policy-verdict (repeatable).
    #[arg(short = 't', long = "type")]
    types: Vec<String>,
    /// Output format: text or json.
    #[arg(short, long, default_value = "text")]
    output: String,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<usize>,
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(0)
}

fn table(rows: Vec<Vec<String>>) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{:w$}", s, w = widths[i])).collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// Each node's probe results, as `cilium-health status` prints them.
pub fn print_node_health(nodes: &[cilium_api::NodeHealth]) {
    let probe = |p: &cilium_api::ProbeResult| if p.ok { format!("OK, RTT={}µs", p.rtt_us) } else { format!("Failed: {}", p.error) };
    for n in nodes {
        println!("  {}{}:", n.name, if n.local { " (localhost)" } else { "" });
        println!("    Host connectivity to {}:", n.ip);
        println!("      ICMP to stack:   {}", probe(&n.icmp));
        println!("      HTTP to agent:   {}", probe(&n.http));
    }
}

pub async fn status(c: &Client, a: StatusArgs) -> anyhow::Result<i32> {
    let s: Status = c.get("/v1/status").await?;
    if a.output == "json" {
        return json(&s);
    }
    if a.brief {
        println!("{}", if s.healthy { "OK" } else { "Warning" });
        return Ok(if s.healthy { 0 } else { 1 });
    }
    match &s.kvstore {
        Some(a) => println!("KVStore:                 Ok   etcd: {a} (cluster-wide identities)"),
        None => println!("KVStore:                 Disabled"),
    }
    println!("Kubernetes:              Disabled (pods and namespaces are fed through the agent API)");
    println!("Cilium:                  {}   {} (cilium-rs), node {}, up {}s", if s.healthy { "Ok" } else { "Warning" }, s.version, s.node_name, s.uptime_secs);
    println!("NodeMonitor:             Listening for events: {} subscribers, {} events lost", s.monitor_subscribers, s.monitor_lost_events);
    match &s.hubble {
        Some(h) => {
            let pct = if h.max_flows > 0 { h.flows as f64 * 100.0 / h.max_flows as f64 } else { 0.0 };
            println!(
                "Hubble:                  Ok   Current/Max Flows: {}/{} ({pct:.2}%), {} seen, lost: {} from the datapath, {} by export   [{}{}]",
                h.flows,
                h.max_flows,
                h.seen_flows,
                h.lost_datapath_events,
                h.lost_export,
                h.socket,
                h.listen_address.as_deref().map(|a| format!(", {a}")).unwrap_or_default()
            );
        }
        None => println!("Hubble:                  Disabled"),
    }
    println!("IPAM:                    IPv4: {}/{} allocated from {}, router {}", s.ipam_used, s.ipam_used + s.ipam_available, s.pod_cidr, s.router_ip);
    if let Some(v6) = &s.ipam6 {
        println!("                         IPv6: {v6}");
    }
    match s.routing_mode {
        cilium_api::RoutingMode::Native => println!("Routing:                 Network: Native   Host: Legacy"),
        cilium_api::RoutingMode::Tunnel => println!("Routing:                 Network: Tunnel [vxlan]   Host: Legacy"),
    }
    match &s.cluster_health {
        Some(h) if h.probed_at == 0 => println!("Cluster health:          probing"),
        Some(h) => println!("Cluster health:          {}/{} reachable   ({})", h.reachable, h.total, unix_time(h.probed_at)),
        None => println!("Cluster health:          Probe disabled"),
    }
    if a.all_health {
        let nodes: Vec<cilium_api::NodeHealth> = c.get("/v1/cluster/health").await?;
        print_node_health(&nodes);
    }
    println!("Endpoints:               {}/{} ready", s.endpoints_ready, s.endpoints);
    println!("Identities:              {}", s.identities);
    println!("Policy:                  revision {}, {} policies, enforcement {}", s.policy_revision, s.policies, s.enforcement);
    println!("BPF Maps:");
    for m in &s.maps {
        let pct = if m.max_entries > 0 { 100.0 * m.entries as f64 / m.max_entries as f64 } else { 0.0 };
        println!("  {:<22} {:>8}/{:<8} ({:.1}%)", m.name, m.entries, m.max_entries, pct);
    }
    println!("State:                   {}   bpffs: {}   socket: {}", s.state_dir, s.bpf_root, s.socket);
    for w in &s.warnings {
        println!("Warning:                 {w}");
    }
    Ok(0)
}

/// Unix seconds as RFC 3339 (UTC).
pub fn unix_time(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| secs.to_string())
}

pub async fn endpoint(c: &Client, cmd: EndpointCmd) -> anyhow::Result<i32> {
    match cmd {
        EndpointCmd::List { output } => {
            let eps: Vec<Endpoint> = c.get("/v1/endpoint").await?;
            if output == "json" {
                return json(&eps);
            }
            let mut rows = vec![
                vec!["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY", "LABELS (source:key[=value])", "IPv6", "IPv4", "STATUS"].into_iter().map(String::from).collect(),
                vec!["", "ENFORCEMENT", "ENFORCEMENT", "", "", "", "", ""].into_iter().map(String::from).collect::<Vec<String>>(),
            ];
            let enf = |b: bool| if b { "Enabled" } else { "Disabled" }.to_string();
            for e in eps {
                let labels: Vec<&String> = e.labels.iter().filter(|l| !l.contains("io.cilium.k8s.namespace.labels") && !l.contains("io.cilium.k8s.policy")).collect();
                let first = labels.first().map(|s| s.to_string()).unwrap_or_default();
                rows.push(vec![e.id.to_string(), enf(e.ingress_enforced), enf(e.egress_enforced), e.identity.to_string(), first, e.ipv6.map(|a| a.to_string()).unwrap_or_default(), e.ipv4.to_string(), e.state.clone()]);
                for l in labels.iter().skip(1) {
                    rows.push(vec![String::new(), String::new(), String::new(), String::new(), l.to_string()]);
                }
            }
            table(rows);
            Ok(0)
        }
        EndpointCmd::Get { id } => {
            let e: Endpoint = c.get(&format!("/v1/endpoint/{id}")).await?;
            json(&e)
        }
    }
}

pub async fn identity(c: &Client, cmd: IdentityCmd) -> anyhow::Result<i32> {
    let IdentityCmd::List { output } = cmd;
    let ids: Vec<Identity> = c.get("/v1/identity").await?;
    if output == "json" {
        return json(&ids);
    }
    let mut rows = vec![vec!["ID".to_string(), "LABELS".to_string()]];
    for i in ids {
        let mut labels = i.labels.into_iter().filter(|l| !l.contains("io.cilium.k8s.namespace.labels"));
        rows.push(vec![i.id.to_string(), labels.next().unwrap_or_default()]);
        for l in labels {
            rows.push(vec![String::new(), l]);
        }
    }
    table(rows);
    Ok(0)
}

pub async fn node(c: &Client, cmd: NodeCmd) -> anyhow::Result<i32> {
    let NodeCmd::List { output } = cmd;
    let nodes: Vec<cilium_api::NodeView> = c.get("/v1/cluster/nodes").await?;
    if output == "json" {
        return json(&nodes);
    }
    let mut rows = vec![vec!["Name".to_string(), "IPv4 Address".into(), "Endpoint CIDR".into(), "Pods".into(), "Identity".into(), "Source".into()]];
    for n in nodes {
        rows.push(vec![n.name, n.ip.to_string(), n.pod_cidr, n.pods.to_string(), n.identity.to_string(), if n.local { "local".into() } else { "custom-resource".into() }]);
    }
    table(rows);
    Ok(0)
}

fn read_inputs(files: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    if files.is_empty() {
        bail!("name at least one file (or - for stdin)");
    }
    files
        .iter()
        .map(|f| {
            if f.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                Ok(("<stdin>".to_string(), s))
            } else {
                Ok((f.display().to_string(), std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?))
            }
        })
        .collect()
}

pub async fn policy(c: &Client, cmd: PolicyCmd) -> anyhow::Result<i32> {
    match cmd {
        PolicyCmd::Import { files } => {
            let inputs = read_inputs(&files)?;
            // every file is checked before anything is sent: all or nothing
            for (name, text) in &inputs {
                cilium_policy::parse_policies(text, name)?;
            }
            let text = inputs.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n---\n");
            let source = inputs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
            let r: PolicyChange = c.call("PUT", "/v1/policy", Some(&PolicyImport { text, source, dry_run: false })).await?;
            println!("Revision: {}", r.revision);
            for p in r.policies {
                println!("  imported {p}");
            }
            Ok(0)
        }
        PolicyCmd::Get { output } => {
            let l: PolicyList = c.get("/v1/policy").await?;
            if output == "json" {
                return json(&l);
            }
            for d in &l.documents {
                println!("---\n{}", serde_yaml::to_string(d)?.trim_end());
            }
            println!("Revision: {}", l.revision);
            Ok(0)
        }
        PolicyCmd::Delete { name, all, namespace, kind } => {
            if !all && name.is_none() {
                bail!("name a policy or pass --all");
            }
            let r: PolicyChange = c.call("DELETE", "/v1/policy", Some(&PolicyDelete { all, kind, namespace, name })).await?;
            if r.policies.is_empty() {
                println!("No matching policy (revision {})", r.revision);
                return Ok(if all { 0 } else { 1 });
            }
            println!("Revision: {}", r.revision);
            for p in r.policies {
                println!("  deleted {p}");
            }
            Ok(0)
        }
        PolicyCmd::Trace(t) => {
            let (port, proto) = match t.dport.split_once('/') {
                Some((p, proto)) => (p, proto.to_string()),
                None => (t.dport.as_str(), "TCP".to_string()),
            };
            let dport: u16 = port.parse().with_context(|| format!("--dport {:?}: not a port", t.dport))?;
            let req = cilium_api::PolicyTraceRequest {
                src: cilium_api::TraceParty { pod: t.src_k8s_pod, identity: t.src_identity, labels: t.src },
                dst: cilium_api::TraceParty { pod: t.dst_k8s_pod, identity: t.dst_identity, labels: t.dst },
                protocol: proto,
                dport,
                http: match (t.http_method, t.http_path) {
                    (None, None) => None,
                    (m, p) => Some(cilium_api::TraceHttp { method: m.unwrap_or_else(|| "GET".into()), path: p.unwrap_or_else(|| "/".into()), host: t.http_host, headers: t.http_headers }),
                },
            };
            let r: cilium_api::PolicyTraceResponse = c.call("POST", "/v1/policy/trace", Some(&req)).await?;
            if t.output == "json" {
                return json(&r);
            }
            print!("{}", r.rendered);
            Ok(if r.verdict == "ALLOWED" { 0 } else { 1 })
        }
        PolicyCmd::Validate { files, print } => {
            let mut failed = false;
            for (name, text) in read_inputs(&files)? {
                match cilium_policy::parse_policies(&text, &name) {
                    Ok(docs) => {
                        for (d, rules) in docs {
                            println!("OK: {name}: {}", d.key());
                            if print {
                                println!("{}", serde_json::to_string_pretty(&rules)?);
                            }
                        }
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("Invalid: {e}");
                    }
                }
            }
            Ok(if failed { 1 } else { 0 })
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "ANY".into(),
        n => cilium_policy::Protocol::from_number(n).map_or_else(|| n.to_string(), |p| p.name().to_string()),
    }
}

pub async fn bpf(c: &Client, cmd: BpfCmd) -> anyhow::Result<i32> {
    match cmd {
        BpfCmd::Policy(BpfPolicyCmd::Get { id, all, output }) => {
            let ids: Vec<u16> = match (id, all) {
                (Some(i), _) => vec![i],
                (None, true) => c.get::<Vec<Endpoint>>("/v1/endpoint").await?.into_iter().map(|e| e.id).collect(),
                (None, false) => bail!("name an endpoint ID or pass --all"),
            };
            for id in ids {
                let entries: Vec<PolicyMapEntry> = c.get(&format!("/v1/bpf/policy/{id}")).await?;
                if output == "json" {
                    json(&entries)?;
                    continue;
                }
                println!("Endpoint {id}:");
                let mut rows = vec!["POLICY DIRECTION IDENTITY LABELS PORT/PROTO PROXY-PORT".split(' ').map(|s| s.replace('-', " ")).collect::<Vec<String>>()];
                for e in entries {
                    let port = if e.protocol == 0 || e.port_prefix == 0 {
                        proto_name(e.protocol)
                    } else if e.port_prefix == 16 {
                        format!("{}/{}", e.port, proto_name(e.protocol))
                    } else {
                        let hi = e.port as u32 + (1u32 << (16 - e.port_prefix as u32)) - 1;
                        format!("{}-{}/{}", e.port, hi, proto_name(e.protocol))
                    };
                    rows.push(vec![
                        if e.deny { "Deny" } else { "Allow" }.into(),
                        if e.egress { "Egress" } else { "Ingress" }.into(),
                        e.identity.to_string(),
                        e.labels.iter().filter(|l| !l.contains("io.cilium.k8s.namespace.labels") && !l.contains("io.cilium.k8s.policy")).cloned().collect::<Vec<_>>().join(","),
                        port,
                        if e.proxy_port == 0 { "NONE".into() } else { e.proxy_port.to_string() },
                    ]);
                }
                table(rows);
            }
            Ok(0)
        }
        BpfCmd::Ct(BpfListCmd::List { output, .. }) => {
            let entries: Vec<CtEntry> = c.get("/v1/bpf/ct").await?;
            if output == "json" {
                return json(&entries);
            }
            for e in entries {
                println!(
                    "{} {} {} -> {} expires={}s RxPackets={} RxBytes={} TxPackets={} TxBytes={} Flags=[{}] SourceSecurityID={}",
                    proto_name(e.protocol),
                    e.direction,
                    e.src,
                    e.dst,
                    e.expires_in_secs,
                    e.rx_packets,
                    e.rx_bytes,
                    e.tx_packets,
                    e.tx_bytes,
                    e.flags.join(","),
                    e.src_identity
                );
            }
            Ok(0)
        }
        BpfCmd::Ipcache(BpfListCmd::List { output, .. }) => {
            let entries: Vec<IpcacheEntry> = c.get("/v1/bpf/ipcache").await?;
            if output == "json" {
                return json(&entries);
            }
            let mut rows = vec![vec!["IP PREFIX/ADDRESS".to_string(), "IDENTITY".into(), "TUNNEL ENDPOINT".into()]];
            for e in entries {
                rows.push(vec![e.prefix, format!("identity={}", e.identity), e.tunnel_endpoint.to_string()]);
            }
            table(rows);
            Ok(0)
        }
        BpfCmd::Lb(BpfLbCmd::List { maglev, output }) => {
            let v: LbMapView = c.get(if maglev { "/v1/bpf/lb/maglev" } else { "/v1/bpf/lb" }).await?;
            if output == "json" {
                return json(&v);
            }
            if maglev {
                let mut rows = vec![vec!["SVC ID".to_string(), "SLOTS".into(), "BACKEND ID (SLOTS)".into()]];
                for (id, table) in &v.maglev {
                    let mut per: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
                    for b in table {
                        *per.entry(*b).or_default() += 1;
                    }
                    let shares: Vec<String> = per.iter().map(|(b, n)| format!("{b} ({n})")).collect();
                    rows.push(vec![id.to_string(), table.len().to_string(), shares.join(", ")]);
                }
                table(rows);
                return Ok(0);
            }
            let mut rows = vec![vec!["SERVICE ADDRESS".to_string(), "BACKEND ADDRESS (REVNAT_ID) (SLOT)".into()]];
            for e in v.services {
                let flags = if e.flags.is_empty() { String::new() } else { format!(" [{}]", e.flags.join(", ")) };
                rows.push(vec![e.frontend.clone(), format!("0.0.0.0:0 ({}) (0) [{} backends]{flags}", e.service_id, e.count)]);
                for (i, (id, addr)) in e.slots.iter().enumerate() {
                    let addr = if addr.is_empty() { format!("backend {id} missing") } else { addr.clone() };
                    rows.push(vec![String::new(), format!("{addr} ({}) ({})", e.service_id, i + 1)]);
                }
            }
            table(rows);
            Ok(0)
        }
        BpfCmd::Metrics(BpfListCmd::List { output, .. }) => {
            let entries: Vec<MetricEntry> = c.get("/v1/bpf/metrics").await?;
            if output == "json" {
                return json(&entries);
            }
            let mut rows = vec![vec!["REASON".to_string(), "DIRECTION".into(), "PACKETS".into(), "BYTES".into()]];
            for e in entries {
                rows.push(vec![e.reason, e.direction, e.packets.to_string(), e.bytes.to_string()]);
            }
            table(rows);
            Ok(0)
        }
    }
}

pub async fn service(c: &Client, cmd: ServiceCmd) -> anyhow::Result<i32> {
    match cmd {
        ServiceCmd::List { output } => {
            let list: Vec<ServiceView> = c.get("/v1/service").await?;
            if output == "json" {
                return json(&list);
            }
            let mut rows = vec![vec!["ID".to_string(), "Frontend".into(), "Service Type".into(), "Backend".into()]];
            for s in list {
                for (i, f) in s.frontends.iter().enumerate() {
                    let first = i == 0;
                    let backends: Vec<String> = s.backends.iter().enumerate().map(|(n, b)| format!("{} => {} ({})", n + 1, b.address, b.state)).collect();
                    let mut kind = f.kind.clone();
                    if first && s.algorithm == "maglev" {
                        kind.push_str(", maglev");
                    }
                    if let (true, Some(t)) = (first, s.affinity_timeout) {
                        kind.push_str(&format!(", affinity {t}s"));
                    }
                    rows.push(vec![
                        if first { s.id.to_string() } else { String::new() },
                        f.address.clone(),
                        kind,
                        backends.first().cloned().unwrap_or_default(),
                    ]);
                    for b in backends.iter().skip(1) {
                        rows.push(vec![String::new(), String::new(), String::new(), b.clone()]);
                    }
                }
            }
            table(rows);
            Ok(0)
        }
        ServiceCmd::Update { id, frontend, backends, protocol, algorithm } => {
            let req = ServiceUpdate { id: Some(id), frontend, protocol: protocol.to_ascii_uppercase(), backends, algorithm };
            let id: u16 = c.call("PUT", "/v1/service", Some(&req)).await?;
            println!("Service {id} updated");
            Ok(0)
        }
        ServiceCmd::Delete { id } => {
            let _: bool = c.call::<(), bool>("DELETE", &format!("/v1/service/{id}"), None).await?;
            println!("Service {id} deleted");
            Ok(0)
        }
    }
}

pub async fn monitor(c: &Client, a: MonitorArgs) -> anyhow::Result<i32> {
    for t in &a.types {
        if !matches!(t.as_str(), "drop" | "trace" | "policy-verdict") {
            bail!("--type {t:?}: want drop, trace or policy-verdict");
        }
    }
    if a.output != "json" {
        println!("Listening for events. Press Ctrl-C to quit");
    }
    let mut seen = 0usize;
    c.stream::<MonitorEvent>("/v1/monitor", |ev| {
        if !a.types.is_empty() && !a.types.contains(&ev.kind) {
            return true;
        }
        if a.output == "json" {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        } else {
            println!("{}", ev.summary());
        }
        seen += 1;
        a.count.is_none_or(|n| seen < n)
    })
    .await?;
    Ok(0)
}
