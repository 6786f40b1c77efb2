//! `cilium lab ...`

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cilium_lab::{Lab, probe, workload};
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Args, Clone)]
pub struct LabName {
    /// Which lab (default: $CILIUM_LAB, then "default").
    #[arg(long, global = true)]
    name: Option<String>,
}

impl LabName {
    fn get(&self) -> String {
        self.name.clone().unwrap_or_else(default_lab_name)
    }
}

pub fn default_lab_name() -> String {
    std::env::var("CILIUM_LAB").unwrap_or_else(|_| "default".to_string())
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Create a lab (node, world, agent) and apply manifests to it.
    Up {
        #[command(flatten)]
        lab: LabName,
        /// Manifest files (Namespace, Pod, Deployment, Service, policies).
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Extra agent flag, e.g. --agent-arg=--policy-audit-mode (repeatable).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Nodes, each a network namespace with its own agent and pod CIDR
        /// (node<i>: 172.30.0.1<i>, pods 10.0.<i>.0/24), routed to each other
        /// through the world namespace.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Run etcd (in the world namespace) and have the agents share
        /// identities through it (--kvstore=etcd).
        #[arg(long)]
        kvstore: bool,
        /// native: the world routes each node's pod CIDR to the node.
        /// tunnel: VXLAN between the nodes with the source identity in the
        /// VNI; pod CIDRs are not routed outside the nodes (implies
        /// --kvstore for cluster-wide identity numbers).
        #[arg(long, default_value = "native", value_parser = ["native", "tunnel"])]
        routing_mode: String,
        /// Dual-stack: the underlay, the world (fd00:ff::1, far away
        /// 2001:db8:113::10) and every pod get IPv6 too (node<i>: fd00:ff::1<i>,
        /// pods fd00:10:<i>::/112) and the agents run --enable-ipv6. The world
        /// routes pods' IPv6 CIDRs to their nodes (no IPv6 masquerading).
        #[arg(long)]
        ipv6: bool,
    },
    /// Create or update objects, as kubectl apply.
    Apply {
        #[command(flatten)]
        lab: LabName,
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the objects of manifest files.
    Delete {
        #[command(flatten)]
        lab: LabName,
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// List pods (or nodes).
    Get {
        #[command(flatten)]
        lab: LabName,
        /// pods or nodes
        what: String,
        /// text, json, name (namespace/name per line) or ip (one per line).
        #[arg(short, long, default_value = "text")]
        output: String,
        /// Only pods with this label (key=value).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Run a command in a pod's (or node's, or world's) network namespace.
    Exec {
        #[command(flatten)]
        lab: LabName,
        /// NAMESPACE/POD, POD (default namespace), a node name, or `world`.
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Try one connection and print a JSON verdict.
    Probe {
        #[command(flatten)]
        lab: LabName,
        #[arg(long)]
        from: String,
        /// NAMESPACE/POD, a node name, `world`, or an IP address.
        #[arg(long)]
        to: String,
        /// Destination port (ignored for icmp).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// tcp, udp or icmp (echo request; ICMPv6 with --ipv6).
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// To the target's IPv6 address (labs made with `up --ipv6`).
        #[arg(long)]
        ipv6: bool,
        /// Seconds.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
    /// Remove everything the lab made (also after a crash).
    Down {
        #[command(flatten)]
        lab: LabName,
    },
    /// List labs.
    List,
    /// Stop, start or restart a node's agent.
    Agent {
        #[command(flatten)]
        lab: LabName,
        /// stop (SIGTERM), kill (SIGKILL), start or restart
        action: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Stop or start the lab's etcd (a lab made with --kvstore).
    Etcd {
        #[command(flatten)]
        lab: LabName,
        /// stop or start
        action: String,
    },
    /// Print `export CILIUM_SOCK=...` for a node's agent and
    /// `export HUBBLE_SERVER=...` for the lab's hubble-relay.
    Env {
        #[command(flatten)]
        lab: LabName,
        #[arg(long)]
        node: Option<String>,
    },
    /// Invoke the CNI plugin for a pod (ADD, DEL, CHECK).
    #[command(hide = true)]
    Cni {
        #[command(flatten)]
        lab: LabName,
        command: String,
        pod: String,
    },
    /// The built-in pod workload (run by the lab inside each pod).
    #[command(hide = true)]
    Workload {
        #[arg(long)]
        pod: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn require_root() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the lab needs root (it creates network namespaces and loads BPF programs)");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

pub fn run(cmd: LabCmd) -> anyhow::Result<i32> {
    match cmd {
        LabCmd::Workload { pod, tcp, udp, ready_file } => {
            workload::serve(workload::Workload { pod, tcp, udp, ready_file })?;
            Ok(0)
        }
        LabCmd::List => {
            for l in cilium_lab::list() {
                println!("{l}");
            }
            Ok(0)
        }
        LabCmd::Up { lab, files, agent_args, nodes, kvstore, routing_mode, ipv6 } => {
            let routing_mode = cilium_lab::RoutingMode::parse(&routing_mode).context("--routing-mode")?;
            require_root()?;
            let objects = cilium_lab::parse_files(&files)?;
            let name = lab.get();
            let mut l = Lab::up(&name, &bin_dir()?, agent_args, cilium_lab::LabOptions { nodes, kvstore, routing_mode, ipv6 })?;
            for n in &l.state.nodes {
                println!("lab {name} is up: node {} ({}), agent socket {}", n.name, n.ip, n.socket.display());
            }
            for line in l.apply(objects)? {
                println!("{line}");
            }
            l.wait_for_cluster_view(Duration::from_secs(20))?;
            Ok(0)
        }
        LabCmd::Apply { lab, files } => {
            require_root()?;
            let objects = cilium_lab::parse_files(&files)?;
            let mut l = Lab::open(&lab.get(), &bin_dir()?)?;
            for line in l.apply(objects)? {
                println!("{line}");
            }
            l.wait_for_cluster_view(Duration::from_secs(20))?;
            Ok(0)
        }
        LabCmd::Delete { lab, files } => {
            require_root()?;
            let objects = cilium_lab::parse_files(&files)?;
            let mut l = Lab::open(&lab.get(), &bin_dir()?)?;
            for line in l.delete(objects)? {
                println!("{line}");
            }
            Ok(0)
        }
        LabCmd::Get { lab, what, output, selector } => {
            let l = Lab::open(&lab.get(), &bin_dir()?)?;
            match what.as_str() {
                "pods" | "pod" | "po" => get_pods(&l, &output, selector.as_deref()),
                "nodes" | "node" => {
                    if output == "json" {
                        println!("{}", serde_json::to_string_pretty(&l.state.nodes)?);
                    } else {
                        println!("NAME\tIP\tPOD CIDR\tAGENT");
                        for n in &l.state.nodes {
                            let alive = n.agent_pid.is_some_and(cilium_lab::sys::alive);
                            println!("{}\t{}\t{}\t{}", n.name, n.ip, n.pod_cidr, if alive { "running" } else { "stopped" });
                        }
                    }
                    Ok(0)
                }
                other => bail!("cannot get {other:?}: want pods or nodes"),
            }
        }
        LabCmd::Exec { lab, target, command } => {
            require_root()?;
            let l = Lab::open(&lab.get(), &bin_dir()?)?;
            let (netns, _) = l.resolve(&target, false)?;
            if netns.is_empty() {
                bail!("{target} is an address, not a pod, node or `world`");
            }
            let cgroup = l.cgroup_of(&target);
            drop(l);
            let status = cilium_lab::sys::command_in(&netns, cgroup.as_deref(), &command[0])?
                .args(&command[1..])
                .status()
                .with_context(|| format!("running {}", command[0]))?;
            Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        LabCmd::Probe { lab, from, to, port, protocol, ipv6, timeout } => {
            require_root()?;
            let kind = match protocol.to_ascii_lowercase().as_str() {
                "tcp" => probe::Kind::Tcp,
                "udp" => probe::Kind::Udp,
                "icmp" => probe::Kind::Icmp,
                other => bail!("--protocol {other:?}: want tcp, udp or icmp"),
            };
            let l = Lab::open(&lab.get(), &bin_dir()?)?;
            let (src_ns, _) = l.resolve(&from, false)?;
            if src_ns.is_empty() {
                bail!("--from {from}: want a pod, a node or `world`");
            }
            let (_, ip) = l.resolve(&to, ipv6)?;
            let ip = ip.with_context(|| format!("{to} has no {} address", if ipv6 { "IPv6" } else { "IPv4" }))?;
            // probe as a process of the pod or node would: under its node's
            // socket load balancer
            if let Some(cg) = l.cgroup_of(&from) {
                cilium_lab::sys::join_cgroup(&cg)?;
            }
            drop(l);
            let (reachable, detail, ms) = probe::probe_kind(cilium_lab::sys::netns_path(&src_ns), ip, port, kind, Duration::from_secs_f64(timeout));
            let r = probe::ProbeResult { from, to, ip, port, protocol: protocol.to_ascii_lowercase(), reachable, detail, latency_ms: (ms * 1000.0).round() / 1000.0 };
            println!("{}", serde_json::to_string(&r)?);
            Ok(0)
        }
        LabCmd::Down { lab } => {
            require_root()?;
            let name = lab.get();
            let done = cilium_lab::down(&name)?;
            if done.is_empty() {
                println!("lab {name}: nothing to remove");
            }
            for d in done {
                println!("lab {name}: {d}");
            }
            Ok(0)
        }
        LabCmd::Agent { lab, action, node } => {
            require_root()?;
            let mut l = Lab::open(&lab.get(), &bin_dir()?)?;
            let i = l.node_index(node.as_deref())?;
            match action.as_str() {
                "stop" => l.stop_agent(i)?,
                "kill" => l.kill_agent(i)?,
                "start" => l.start_agent(i)?,
                "restart" => {
                    l.stop_agent(i)?;
                    l.start_agent(i)?;
                }
                other => bail!("agent {other:?}: want stop, kill, start or restart"),
            }
            println!("agent of {}: {action} done", l.state.nodes[i].name);
            Ok(0)
        }
        LabCmd::Etcd { lab, action } => {
            require_root()?;
            let mut l = Lab::open(&lab.get(), &bin_dir()?)?;
            if !l.state.kvstore {
                bail!("lab {} has no kvstore (make it with --kvstore)", l.state.name);
            }
            match action.as_str() {
                "stop" => l.stop_etcd()?,
                "start" => l.start_etcd()?,
                other => bail!("etcd {other:?}: want stop or start"),
            }
            println!("etcd: {action} done");
            Ok(0)
        }
        LabCmd::Env { lab, node } => {
            let l = Lab::open(&lab.get(), &bin_dir()?)?;
            let i = l.node_index(node.as_deref())?;
            println!("export CILIUM_SOCK={}", l.state.nodes[i].socket.display());
            if let Some(a) = &l.state.relay_address {
                println!("export HUBBLE_SERVER={a}");
            }
            Ok(0)
        }
        LabCmd::Cni { lab, command, pod } => {
            require_root()?;
            let l = Lab::open(&lab.get(), &bin_dir()?)?;
            let key = if pod.contains('/') { pod } else { format!("default/{pod}") };
            let out = l.cni_raw(&command, &key)?;
            println!("{}", serde_json::to_string(&out)?);
            Ok(0)
        }
    }
}

fn get_pods(l: &Lab, output: &str, selector: Option<&str>) -> anyhow::Result<i32> {
    // each node's agent knows its own endpoints
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let eps: Vec<cilium_api::Endpoint> = (0..l.state.nodes.len())
        .flat_map(|i| rt.block_on(l.client(i).get::<Vec<cilium_api::Endpoint>>("/v1/endpoint")).unwrap_or_default())
        .collect();
    let sel = selector.map(|s| s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap_or((s.to_string(), String::new())));
    let mut pods = Vec::new();
    for p in l.state.pods.values() {
        if let Some((k, v)) = &sel {
            if p.labels.get(k) != Some(v) {
                continue;
            }
        }
        let ep = eps.iter().find(|e| e.container_id == p.container_id);
        pods.push(json!({
            "namespace": p.namespace,
            "name": p.name,
            "labels": p.labels,
            "ip": p.ip,
            "ip6": p.ip6,
            "node": p.node,
            "identity": ep.map(|e| e.identity),
            "endpoint": ep.map(|e| e.id),
            "status": match (ep, p.workload_pid.is_some_and(cilium_lab::sys::alive)) {
                (Some(e), true) if e.state == "ready" => "Running",
                (Some(_), true) => "PolicyError",
                (_, false) => "WorkloadStopped",
                (None, true) => "NoEndpoint",
            },
        }));
    }
    match output {
        "json" => {
            println!("{}", serde_json::to_string_pretty(&pods)?);
            return Ok(0);
        }
        "name" | "ip" => {
            for p in &pods {
                if output == "ip" {
                    println!("{}", p["ip"].as_str().unwrap_or(""));
                } else {
                    println!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or(""));
                }
            }
            return Ok(0);
        }
        "text" | "wide" => {}
        other => bail!("-o {other:?}: want text, json, name or ip"),
    }
    println!("{:<12} {:<32} {:<14} {:<10} {:<10} {:<8} LABELS", "NAMESPACE", "NAME", "STATUS", "IP", "IDENTITY", "NODE");
    for p in pods {
        let labels: Vec<String> = p["labels"].as_object().map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect()).unwrap_or_default();
        println!(
            "{:<12} {:<32} {:<14} {:<10} {:<10} {:<8} {}",
            p["namespace"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or(""),
            p["status"].as_str().unwrap_or(""),
            match p["ip6"].as_str() {
                Some(ip6) => format!("{},{ip6}", p["ip"].as_str().unwrap_or("-")),
                None => p["ip"].as_str().unwrap_or("-").to_string(),
            },
            p["identity"].as_u64().map(|i| i.to_string()).unwrap_or("-".into()),
            p["node"].as_str().unwrap_or(""),
            labels.join(",")
        );
    }
    Ok(0)
}
