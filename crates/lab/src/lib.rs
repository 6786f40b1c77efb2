//! The lab: the embedded single-machine mode.
//!
//! A lab is a set of network namespaces on this machine: a node (its agent
//! runs inside it), a namespace standing for the outside world, and one per
//! pod, wired by the real `cilium-cni` and enforced by the real datapath. It
//! is built from Kubernetes manifests (Namespace, Pod, Deployment, Service,
//! CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy) and
//! every pod runs a built-in workload serving its containerPorts.
//!
//! Architecture invariant: no lab address is ever configured in, or routed
//! through, the machine's root namespace; the node reaches the "world" only
//! through the lab's own world namespace, and service ranges are blackholed.

pub mod probe;
pub mod sys;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use cilium_api::{Client, NamespaceMeta, PodMeta, PolicyChange, PolicyDelete, PolicyImport};
pub use cilium_api::RoutingMode;
use cilium_k8s::{Object, PodSpec};
use serde::{Deserialize, Serialize};

/// Where labs keep their state and logs.
pub const LAB_ROOT: &str = "/var/run/cilium-lab";
/// bpffs directory of all labs.
pub const LAB_BPF_ROOT: &str = "/sys/fs/bpf/cilium-lab";
/// cgroup v2 directory of all labs.
pub const LAB_CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/cilium-lab";
/// The world namespace's address on the underlay.
pub const WORLD_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// An address further out in the world, on the world namespace's loopback.
pub const WORLD_FAR_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The world's IPv6 address on the underlay (labs with IPv6).
pub const WORLD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 1);
/// An IPv6 address further out in the world, on its loopback.
pub const WORLD_FAR_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
/// Service addresses; blackholed so an untranslated one can never leave.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Where ClusterIPs are allocated from (inside SERVICE_CIDR).
const CLUSTER_IP_FIRST: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// LoadBalancer ingress IPs: routed from the world to the first node.
pub const LB_POOL: &str = "172.30.1.0/24";
const LB_IP_FIRST: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 1);
/// The Kubernetes node port range.
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Ports the world namespace serves (HTTP echo on TCP, echo on UDP).
pub const WORLD_PORTS: &[u16] = &[80, 443, 8080];
pub const WORLD_UDP_PORTS: &[u16] = &[53];

/// A node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Labs with IPv6: the node's IPv6 address and pod CIDR.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    #[serde(default)]
    pub pod_cidr6: Option<String>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpf_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub log: PathBuf,
    pub agent_pid: Option<u32>,
    /// The node's labels (as a Kubernetes Node's; `kubernetes.io/hostname`
    /// is always one of them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A pod of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    /// Labs with IPv6.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    pub container_id: String,
    /// (name, protocol, port)
    pub ports: Vec<(Option<String>, String, u16)>,
    pub workload_pid: Option<u32>,
    /// `Deployment/ns/name` for pods a Deployment made.
    pub owner: Option<String>,
    /// How long CNI ADD took (it returns once the endpoint is enforced).
    #[serde(default)]
    pub cni_add_ms: Option<f64>,
    /// When CNI ADD returned (microseconds since the Unix epoch).
    #[serde(default)]
    pub cni_added_at_us: Option<u64>,
}

/// Everything the lab made, persisted in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub nodes: Vec<NodeState>,
    pub world_netns: String,
    pub world_pid: Option<u32>,
    pub agent_args: Vec<String>,
    pub pods: BTreeMap<String, PodState>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Services as stored by the "API server": with their allocated
    /// clusterIP, nodePorts and load balancer IPs.
    pub services: BTreeMap<String, cilium_k8s::Service>,
    pub policies: BTreeSet<String>,
    /// hubble-relay, in the host's network namespace, over every node's
    /// Hubble socket.
    #[serde(default)]
    pub relay_pid: Option<u32>,
    #[serde(default)]
    pub relay_address: Option<String>,
    /// Agents share identities through etcd (in the world namespace).
    #[serde(default)]
    pub kvstore: bool,
    #[serde(default)]
    pub etcd_pid: Option<u32>,
    #[serde(default)]
    pub routing_mode: RoutingMode,
    /// Nodes, pods and the world are dual-stack (agents run --enable-ipv6).
    #[serde(default)]
    pub ipv6: bool,
}

/// How `Lab::up` builds the lab.
#[derive(Debug, Clone, Copy)]
pub struct LabOptions {
    /// 1 to 9.
    pub nodes: usize,
    /// Run etcd and give the agents `--kvstore=etcd` (tunnel mode implies
    /// it: the VNI carries cluster-wide identity numbers).
    pub kvstore: bool,
    /// Native: the world routes every node's pod CIDR to it. Tunnel: the
    /// world knows only node addresses; pods reach other nodes' pods
    /// through VXLAN between the nodes.
    pub routing_mode: RoutingMode,
    /// Dual-stack: IPv6 on the underlay, the world and every pod.
    pub ipv6: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions { nodes: 1, kvstore: false, routing_mode: RoutingMode::Native, ipv6: false }
    }
}

/// etcd's client address, in the world namespace (every node routes there).
pub const ETCD_ADDRESS: &str = "http://172.30.0.1:2379";

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|f| f.exists()))
}

/// An open lab (holding its lock).
pub struct Lab {
    pub state: LabState,
    dir: PathBuf,
    bin_dir: PathBuf,
    _lock: std::fs::File,
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A short, Kubernetes-looking, deterministic suffix.
fn suffix(seed: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = fnv(seed);
    (0..len)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 16 || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        bail!("lab name {name:?} must be 1-16 characters of a-z, 0-9 and '-'");
    }
    Ok(())
}

fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

fn lock(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
    // SAFETY: flock on an owned, open fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Every lab with state on this machine.
pub fn list() -> Vec<String> {
    std::fs::read_dir(LAB_ROOT)
        .map(|rd| {
            let mut v: Vec<String> = rd
                .flatten()
                .filter(|e| e.path().join("lab.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default()
}

/// Reads all manifests first, so nothing is made when one is invalid.
pub fn parse_files(files: &[PathBuf]) -> anyhow::Result<Vec<Object>> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        out.extend(cilium_k8s::parse_manifest(&text, &f.display().to_string())?);
    }
    Ok(out)
}

impl Lab {
    /// Creates a lab: namespaces, underlay, world, the nodes and their
    /// agents, and etcd when the kvstore is on.
    pub fn up(name: &str, bin_dir: &Path, agent_args: Vec<String>, opts: LabOptions) -> anyhow::Result<Lab> {
        validate_name(name)?;
        let nodes = opts.nodes;
        if !(1..=9).contains(&nodes) {
            bail!("--nodes {nodes}: a lab has 1 to 9 nodes");
        }
        let kvstore = opts.kvstore || opts.routing_mode == RoutingMode::Tunnel;
        if kvstore && which("etcd").is_none() {
            bail!("--kvstore (and --routing-mode tunnel, which shares identities through etcd) needs etcd (apt-get install etcd-server)");
        }
        let dir = lab_dir(name);
        let lock = lock(&dir)?;
        if dir.join("lab.json").exists() {
            bail!("lab {name} already exists: use `cilium lab apply`, or `cilium lab down --name {name}` first");
        }
        for bin in ["cilium-agent", "cilium-cni", "hubble-relay"] {
            if !bin_dir.join(bin).exists() {
                bail!("{} not found next to this binary (build the workspace first)", bin_dir.join(bin).display());
            }
        }
        let lab_bpf = Path::new(LAB_BPF_ROOT).join(name);
        let lab_cg = Path::new(LAB_CGROUP_ROOT).join(name);
        // node i: 172.30.0.1i on the underlay, pods in 10.0.i.0/24
        let nodes = (1..=nodes as u8)
            .map(|i| {
                let node_name = format!("node{i}");
                NodeState {
                    netns: format!("cl-{name}-{node_name}"),
                    ip: Ipv4Addr::new(172, 30, 0, 10 + i),
                    pod_cidr: format!("10.0.{i}.0/24"),
                    // fd00:ff::1i on the underlay, pods in fd00:10:i::/112
                    ip6: opts.ipv6.then(|| Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 0x10 + u16::from(i))),
                    pod_cidr6: opts.ipv6.then(|| format!("fd00:10:{i}::/112")),
                    socket: dir.join(&node_name).join("cilium.sock"),
                    state_dir: dir.join(&node_name).join("state"),
                    bpf_root: lab_bpf.join(&node_name),
                    cgroup_root: lab_cg.join(&node_name),
                    log: dir.join(&node_name).join("agent.log"),
                    agent_pid: None,
                    labels: node_labels(&node_name, &BTreeMap::new()),
                    name: node_name,
                }
            })
            .collect();
        let state = LabState {
            name: name.to_string(),
            nodes,
            world_netns: format!("cl-{name}-world"),
            world_pid: None,
            agent_args,
            pods: BTreeMap::new(),
            namespaces: BTreeMap::from([("default".to_string(), BTreeMap::new())]),
            services: BTreeMap::new(),
            policies: BTreeSet::new(),
            relay_pid: None,
            relay_address: None,
            kvstore,
            etcd_pid: None,
            routing_mode: opts.routing_mode,
            ipv6: opts.ipv6,
        };
        let mut lab = Lab { state, dir, bin_dir: bin_dir.to_path_buf(), _lock: lock };
        // Record what we are about to make before making it, so `down`
        // finds it even if we crash half way.
        lab.save()?;
        if let Err(e) = lab.build_topology() {
            let _ = down(name);
            return Err(e.context(format!("creating lab {name} (rolled back)")));
        }
        Ok(lab)
    }

    fn build_topology(&mut self) -> anyhow::Result<()> {
        cilium_datapath::sys::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
        let world = self.state.world_netns.clone();
        sys::netns_add(&world)?;
        sys::ip(&["-n", &world, "link", "set", "lo", "up"])?;
        sys::ip(&["-n", &world, "addr", "add", &format!("{WORLD_FAR_IP}/32"), "dev", "lo"])?;
        sys::ip(&["-n", &world, "route", "add", "blackhole", SERVICE_CIDR])?;
        sys::netns_sysctl(&world, "net.ipv4.ip_forward", "1")?;
        let ipv6 = self.state.ipv6;
        sys::netns_sysctl(&world, "net.ipv6.conf.all.disable_ipv6", if ipv6 { "0" } else { "1" })?;
        if ipv6 {
            sys::netns_sysctl(&world, "net.ipv6.conf.all.forwarding", "1")?;
            sys::ip(&["-n", &world, "addr", "add", &format!("{WORLD_FAR_IP6}/128"), "dev", "lo", "nodad"])?;
        }
        if self.state.kvstore {
            // the world's underlay address exists once the first node is wired
            sys::ip(&["-n", &world, "addr", "add", &format!("{WORLD_IP}/32"), "dev", "lo"])?;
            self.start_etcd()?;
        }
        for i in 0..self.state.nodes.len() {
            let n = self.state.nodes[i].clone();
            sys::netns_add(&n.netns)?;
            sys::netns_sysctl(&n.netns, "net.ipv6.conf.all.disable_ipv6", if ipv6 { "0" } else { "1" })?;
            sys::ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
            let peer = format!("to-{}", n.name);
            sys::ip(&["-n", &n.netns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &world])?;
            // point to point through the world, which routes between nodes
            // (the underlay): every node reaches the others via the world
            sys::ip(&["-n", &n.netns, "addr", "add", &format!("{}/32", n.ip), "dev", "eth0"])?;
            sys::ip(&["-n", &n.netns, "link", "set", "eth0", "up"])?;
            sys::ip(&["-n", &world, "addr", "add", &format!("{WORLD_IP}/32"), "dev", &peer])?;
            sys::ip(&["-n", &world, "link", "set", &peer, "up"])?;
            sys::ip(&["-n", &world, "route", "add", &format!("{}/32", n.ip), "dev", &peer])?;
            sys::ip(&["-n", &n.netns, "route", "add", &WORLD_IP.to_string(), "dev", "eth0"])?;
            sys::ip(&["-n", &n.netns, "route", "add", "default", "via", &WORLD_IP.to_string()])?;
            sys::ip(&["-n", &n.netns, "route", "add", "blackhole", SERVICE_CIDR])?;
            if self.state.routing_mode == RoutingMode::Native {
                sys::ip(&["-n", &world, "route", "add", &n.pod_cidr, "via", &n.ip.to_string()])?;
            }
            if let (Some(ip6), Some(cidr6)) = (n.ip6, &n.pod_cidr6) {
                // the same underlay in IPv6 (no masquerading: the world
                // routes the pods' IPv6 CIDR to their node)
                sys::ip(&["-n", &n.netns, "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
                sys::ip(&["-n", &world, "addr", "add", &format!("{WORLD_IP6}/128"), "dev", &peer, "nodad"])?;
                sys::ip(&["-n", &world, "route", "add", &format!("{ip6}/128"), "dev", &peer])?;
                sys::ip(&["-n", &world, "route", "add", cidr6, "via", &ip6.to_string(), "dev", &peer])?;
                sys::ip(&["-n", &n.netns, "route", "add", &format!("{WORLD_IP6}/128"), "dev", "eth0"])?;
                sys::ip(&["-n", &n.netns, "route", "add", "default", "via", &WORLD_IP6.to_string(), "dev", "eth0"])?;
            }
            if i == 0 {
                sys::ip(&["-n", &world, "route", "add", LB_POOL, "via", &n.ip.to_string()])?;
            }
            std::fs::create_dir_all(n.log.parent().expect("node dir"))?;
            std::fs::create_dir_all(&n.cgroup_root).with_context(|| format!("creating cgroup {}", n.cgroup_root.display()))?;
            self.start_agent(i)?;
        }
        // with the kvstore, agents learn the other nodes there, and only
        // their own labels from this
        self.announce_nodes()?;
        self.start_world()?;
        self.start_relay()?;
        self.save()
    }

    /// Starts (or restarts) etcd in the world namespace, its data in the
    /// lab's directory, and waits until it answers.
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("etcd");
        let args = vec![
            "--name=lab".to_string(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={ETCD_ADDRESS}"),
            format!("--advertise-client-urls={ETCD_ADDRESS}"),
            "--listen-peer-urls=http://127.0.0.1:2380".to_string(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".to_string(),
            "--initial-cluster=lab=http://127.0.0.1:2380".to_string(),
            "--log-level=warn".to_string(),
        ];
        let etcd = which("etcd").ok_or_else(|| anyhow!("etcd not found (apt-get install etcd-server)"))?;
        let pid = sys::spawn_daemon(&self.state.world_netns, None, &etcd, &args, &self.dir.join("etcd.log"))?;
        self.state.etcd_pid = Some(pid);
        self.save()?;
        let world = sys::netns_path(&self.state.world_netns);
        let open = move || {
            cilium_datapath::sys::in_netns(&world, || {
                Ok(std::net::TcpStream::connect_timeout(&SocketAddr::from((WORLD_IP, 2379)), Duration::from_millis(200)).is_ok())
            })
            .unwrap_or(false)
        };
        wait_for(|| sys::alive(pid) && open(), Duration::from_secs(20))
        .map_err(|_| anyhow!("etcd did not start; its log ends:\n{}", std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()))
    }

    /// Stops etcd (its data stays).
    pub fn stop_etcd(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.state.etcd_pid.take() {
            sys::stop(pid, Duration::from_secs(5));
        }
        self.save()
    }

    /// Tells every agent about the nodes of the lab (as CiliumNode objects
    /// would).
    fn announce_nodes(&self) -> anyhow::Result<()> {
        let nodes: Vec<cilium_api::NodeMeta> = self
            .state
            .nodes
            .iter()
            .map(|n| cilium_api::NodeMeta { name: n.name.clone(), ip: n.ip, pod_cidr: n.pod_cidr.clone(), ip6: n.ip6, labels: n.labels.clone() })
            .collect();
        for c in self.clients() {
            let _: bool = block_on(c.call("PUT", "/v1/cluster/nodes", Some(&nodes)))?;
        }
        Ok(())
    }

    /// Starts hubble-relay on 127.0.0.1:4245 (upstream's port, what `hubble`
    /// dials by default) or, if another lab holds it, a free port.
    pub fn start_relay(&mut self) -> anyhow::Result<()> {
        let bin = self.bin_dir.join("hubble-relay");
        if !bin.exists() {
            bail!("{} not found next to this binary (build the workspace first)", bin.display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:4245")
            .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .and_then(|l| l.local_addr())
            .context("finding a port for hubble-relay")?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec!["serve".to_string(), format!("--listen-address={addr}")];
        for n in &self.state.nodes {
            args.push(format!("--static-peer={}=unix://{}", n.name, hubble_socket(n).display()));
        }
        let log = self.dir.join("relay.log");
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(&args).stdin(std::process::Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        // in the lab's cgroup, so teardown finds it even without lab.json
        let cg = Path::new(LAB_CGROUP_ROOT).join(&self.state.name).join("relay");
        std::fs::create_dir_all(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string()).with_context(|| format!("moving hubble-relay into {}", cg.display()))?;
        self.state.relay_pid = Some(child.id());
        self.state.relay_address = Some(addr.clone());
        self.save()?;
        wait_for(|| std::net::TcpStream::connect(&addr).is_ok(), Duration::from_secs(10)).with_context(|| format!("hubble-relay did not listen on {addr} (see {})", log.display()))?;
        Ok(())
    }

    fn start_world(&mut self) -> anyhow::Result<()> {
        let ready = self.dir.join("world.ready");
        let _ = std::fs::remove_file(&ready);
        let mut args = vec!["lab".to_string(), "workload".into(), "--pod".into(), "world".into()];
        for p in WORLD_PORTS {
            args.extend(["--tcp".into(), p.to_string()]);
        }
        for p in WORLD_UDP_PORTS {
            args.extend(["--udp".into(), p.to_string()]);
        }
        args.extend(["--ready-file".into(), ready.display().to_string()]);
        let pid = sys::spawn_daemon(&self.state.world_netns, None, &self.bin_dir.join("cilium"), &args, &self.dir.join("world.log"))?;
        self.state.world_pid = Some(pid);
        wait_for(|| ready.exists(), Duration::from_secs(10)).context("world workload did not start")?;
        Ok(())
    }

    /// Starts (or restarts) a node's agent and waits until it answers.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &self.state.nodes[i];
        let mut args = vec![
            format!("--node-name={}", n.name),
            format!("--ipv4-range={}", n.pod_cidr),
            format!("--bpf-root={}", n.bpf_root.display()),
            format!("--state-dir={}", n.state_dir.display()),
            format!("--socket-path={}", n.socket.display()),
            format!("--cgroup-root={}", n.cgroup_root.display()),
            format!("--hubble-socket-path={}", hubble_socket(n).display()),
            // in the node's network namespace, upstream's ports are free
            "--hubble-listen-address=:4244".to_string(),
            "--hubble-metrics-server=:9965".to_string(),
            "--hubble-metrics=flow,drop,tcp,icmp,port-distribution,policy,dns,http,kafka".to_string(),
            "--prometheus-serve-addr=:9962".to_string(),
            "--health-probe-interval=2".to_string(),
            format!("--routing-mode={}", self.state.routing_mode.as_str()),
        ];
        if let Some(cidr6) = &n.pod_cidr6 {
            args.extend(["--enable-ipv6".to_string(), format!("--ipv6-range={cidr6}")]);
        }
        if self.state.routing_mode == RoutingMode::Tunnel {
            // the world has no route back to pod CIDRs (a flag of the
            // lab's own --agent-arg, given later, still wins)
            args.push("--enable-ipv4-masquerade".to_string());
        }
        if self.state.kvstore {
            args.extend(["--kvstore=etcd".to_string(), format!("--kvstore-opt=etcd.address={ETCD_ADDRESS}")]);
        }
        args.extend(self.state.agent_args.iter().cloned());
        let pid = sys::spawn_daemon(&n.netns, None, &self.bin_dir.join("cilium-agent"), &args, &n.log)?;
        let client = Client::new(&n.socket);
        let log = n.log.clone();
        self.state.nodes[i].agent_pid = Some(pid);
        self.save()?;
        wait_for(
            || sys::alive(pid) && block_on(client.get::<String>("/v1/healthz")).is_ok(),
            Duration::from_secs(30),
        )
        .map_err(|_| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            anyhow!("the agent of {} did not become ready; its log ends:\n{}", self.state.nodes[i].name, tail.join("\n"))
        })?;
        // as a Kubernetes watcher re-lists after a restart
        self.sync_services_to(i)
    }

    /// Stops a node's agent (SIGTERM: the datapath keeps enforcing).
    pub fn stop_agent(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.state.nodes[i].agent_pid.take() {
            sys::stop(pid, Duration::from_secs(10));
        }
        self.save()
    }

    /// Kills a node's agent with SIGKILL, as a crash would.
    pub fn kill_agent(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.state.nodes[i].agent_pid.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            sys::stop(pid, Duration::from_secs(5));
        }
        self.save()
    }

    /// Opens an existing lab.
    pub fn open(name: &str, bin_dir: &Path) -> anyhow::Result<Lab> {
        validate_name(name)?;
        let dir = lab_dir(name);
        if !dir.join("lab.json").exists() {
            bail!("lab {name} does not exist (create it with `cilium lab up`)");
        }
        let lock = lock(&dir)?;
        let text = std::fs::read(dir.join("lab.json"))?;
        let state: LabState = serde_json::from_slice(&text).with_context(|| format!("reading {}/lab.json", dir.display()))?;
        Ok(Lab { state, dir, bin_dir: bin_dir.to_path_buf(), _lock: lock })
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = self.dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        std::fs::rename(&tmp, self.dir.join("lab.json"))?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node_index(&self, name: Option<&str>) -> anyhow::Result<usize> {
        match name {
            None => Ok(0),
            Some(n) => self.state.nodes.iter().position(|x| x.name == n).ok_or_else(|| anyhow!("no node {n} in lab {}", self.state.name)),
        }
    }

    pub fn client(&self, node: usize) -> Client {
        Client::new(&self.state.nodes[node].socket)
    }

    fn clients(&self) -> Vec<Client> {
        (0..self.state.nodes.len()).map(|i| self.client(i)).collect()
    }

    // --------------------------------------------------------- manifests ---

    /// Applies objects as `kubectl apply` would. Returns one line per object.
    pub fn apply(&mut self, objects: Vec<Object>) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        // Nodes are the lab's own: a Node object only relabels one of them
        let mut relabelled = false;
        for obj in &objects {
            if let Object::Node(n) = obj {
                let name = &n.metadata.name;
                let Some(node) = self.state.nodes.iter_mut().find(|x| x.name == *name) else {
                    bail!("Node {name:?}: no such node in this lab (nodes are made by `cilium lab up --nodes N`: node0, node1, ...)");
                };
                let labels = node_labels(name, &n.metadata.labels);
                let changed = node.labels != labels;
                node.labels = labels;
                relabelled |= changed;
                out.push(format!("node/{name} {}", if changed { "configured" } else { "unchanged" }));
            }
        }
        if relabelled {
            self.save()?;
            self.announce_nodes()?;
        }
        // namespaces first, then pod metadata, then policies, then wiring:
        // pods start life under the policy that selects them.
        let mut wanted_pods: Vec<(PodState, PodSpec)> = Vec::new();
        let mut policy_docs: Vec<(String, String)> = Vec::new();
        let mut deployments: Vec<(String, BTreeSet<String>)> = Vec::new();
        for obj in &objects {
            let ns = obj.metadata().namespace.clone().unwrap_or_else(|| "default".to_string());
            match obj {
                Object::Namespace(n) => {
                    let existed = self.state.namespaces.insert(n.metadata.name.clone(), n.metadata.labels.clone());
                    for c in self.clients() {
                        let _: bool = block_on(c.call("PUT", "/v1/k8s/namespace", Some(&NamespaceMeta { name: n.metadata.name.clone(), labels: n.metadata.labels.clone() })))?;
                    }
                    out.push(format!("namespace/{} {}", n.metadata.name, if existed.is_some() { "configured" } else { "created" }));
                }
                Object::Pod(p) => {
                    wanted_pods.push((self.pod_state(&ns, &p.metadata.name, &p.metadata.labels, &p.spec, None), p.spec.clone()));
                }
                Object::Deployment(d) => {
                    let owner = format!("Deployment/{ns}/{}", d.metadata.name);
                    let mut names = BTreeSet::new();
                    for i in 0..d.spec.replicas {
                        let name = format!("{}-{}-{}", d.metadata.name, suffix(&format!("{owner}/rs"), 10), suffix(&format!("{owner}/{i}"), 5));
                        names.insert(name.clone());
                        wanted_pods.push((self.pod_state(&ns, &name, &d.spec.template.metadata.labels, &d.spec.template.spec, Some(owner.clone())), d.spec.template.spec.clone()));
                    }
                    deployments.push((owner, names));
                }
                Object::Service(s) => {
                    let key = format!("{ns}/{}", s.metadata.name);
                    let svc = self.allocate_service(&key, s.clone())?;
                    let existed = self.state.services.insert(key, svc);
                    out.push(format!("service/{} {}", s.metadata.name, if existed.is_some() { "configured" } else { "created" }));
                }
                Object::Policy(doc, _) => {
                    policy_docs.push((doc.key().to_string(), serde_yaml::to_string(doc)?));
                }
                Object::Node(_) => {}
            }
        }
        self.place(&mut wanted_pods)?;
        // a pod that exists keeps its address (what the agents were told)
        for (p, _) in wanted_pods.iter_mut() {
            if let Some(existing) = self.state.pods.get(&format!("{}/{}", p.namespace, p.name)) {
                p.ip = existing.ip;
            }
        }
        for (p, _) in &wanted_pods {
            if !self.state.namespaces.contains_key(&p.namespace) {
                self.state.namespaces.insert(p.namespace.clone(), BTreeMap::new());
                for c in self.clients() {
                    let _: bool = block_on(c.call("PUT", "/v1/k8s/namespace", Some(&NamespaceMeta { name: p.namespace.clone(), labels: BTreeMap::new() })))?;
                }
            }
            for c in self.clients() {
                let _: bool = block_on(c.call("PUT", "/v1/k8s/pod", Some(&pod_meta(p))))?;
            }
        }
        if !policy_docs.is_empty() {
            let text = policy_docs.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("---\n");
            for c in self.clients() {
                let _: PolicyChange = block_on(c.call("PUT", "/v1/policy", Some(&PolicyImport { text: text.clone(), source: "cilium lab apply".into(), dry_run: false })))?;
            }
            for (key, _) in &policy_docs {
                let existed = !self.state.policies.insert(key.clone());
                out.push(format!("{} {}", kubectl_name(key), if existed { "configured" } else { "created" }));
            }
        }
        // scale down deployments
        for (owner, names) in &deployments {
            let extra: Vec<String> = self
                .state
                .pods
                .iter()
                .filter(|(_, p)| p.owner.as_deref() == Some(owner.as_str()) && !names.contains(&p.name))
                .map(|(k, _)| k.clone())
                .collect();
            for k in extra {
                self.delete_pod(&k)?;
            }
        }
        for (mut p, _spec) in wanted_pods {
            let key = format!("{}/{}", p.namespace, p.name);
            match self.state.pods.get(&key) {
                Some(existing) if existing.ports == p.ports && existing.ip.is_some() => {
                    let changed = existing.labels != p.labels;
                    if let Some(e) = self.state.pods.get_mut(&key) {
                        e.labels = p.labels.clone();
                    }
                    out.push(format!("pod/{} {}", p.name, if changed { "configured" } else { "unchanged" }));
                    continue;
                }
                Some(_) => self.delete_pod(&key)?,
                None => {}
            }
            self.create_pod(&mut p)?;
            // its address, for the agents of the other nodes (status.podIP)
            for c in self.clients() {
                let _: bool = block_on(c.call("PUT", "/v1/k8s/pod", Some(&pod_meta(&p))))?;
            }
            out.push(format!("pod/{} created ({})", p.name, p.ip.map(|i| i.to_string()).unwrap_or_default()));
            self.state.pods.insert(key, p);
            self.save()?;
        }
        for (owner, _) in deployments {
            out.push(format!("deployment.apps/{} applied", owner.rsplit('/').next().unwrap_or("")));
        }
        self.save()?;
        self.sync_services()?;
        Ok(out)
    }

    /// kvstore mode: waits until every agent has read every node and every
    /// pod of the lab from etcd, so what was applied is in force
    /// cluster-wide, as with the lab's direct feed (`cilium lab up|apply`
    /// wait for this; without the kvstore it returns at once).
    pub fn wait_for_cluster_view(&self, timeout: Duration) -> anyhow::Result<()> {
        if !self.state.kvstore {
            return Ok(());
        }
        let mut want: BTreeMap<String, usize> = self.state.nodes.iter().map(|n| (n.name.clone(), 0)).collect();
        for p in self.state.pods.values().filter(|p| p.ip.is_some()) {
            *want.entry(p.node.clone()).or_default() += 1;
        }
        let clients = self.clients();
        let mut lagging = String::new();
        let ok = wait_for(
            || {
                for (c, n) in clients.iter().zip(&self.state.nodes) {
                    let seen: Vec<cilium_api::NodeView> = block_on(c.get("/v1/cluster/nodes")).unwrap_or_default();
                    let seen: BTreeMap<String, usize> = seen.into_iter().map(|v| (v.name, v.pods)).collect();
                    if seen != want {
                        lagging = format!("{} sees nodes and pods {seen:?}, the lab has {want:?}", n.name);
                        return false;
                    }
                }
                true
            },
            timeout,
        );
        ok.map_err(|_| anyhow!("the agents did not learn the cluster from etcd within {timeout:?}: {lagging}"))
    }

    /// What the API server does to a new or updated Service: keeps or
    /// allocates its clusterIP, nodePorts and load balancer IP.
    fn allocate_service(&self, key: &str, mut svc: cilium_k8s::Service) -> anyhow::Result<cilium_k8s::Service> {
        let old = self.state.services.get(key);
        let others = || self.state.services.iter().filter(|(k, _)| k.as_str() != key).map(|(_, s)| s);
        let ty = svc.spec.service_type.clone().unwrap_or_else(|| "ClusterIP".into());
        if ty == "ExternalName" {
            return Ok(svc);
        }
        if svc.spec.cluster_ip.is_none() {
            let kept = old.and_then(|o| o.spec.cluster_ip.clone()).filter(|ip| ip != "None");
            let ip = match kept {
                Some(ip) => ip,
                None => {
                    let used: BTreeSet<String> = others().filter_map(|s| s.spec.cluster_ip.clone()).collect();
                    let mut ip = u32::from(CLUSTER_IP_FIRST);
                    while used.contains(&Ipv4Addr::from(ip).to_string()) {
                        ip += 1;
                    }
                    Ipv4Addr::from(ip).to_string()
                }
            };
            svc.spec.cluster_ip = Some(ip);
        } else if let Some(ip) = &svc.spec.cluster_ip {
            if let Some((k, _)) = self.state.services.iter().find(|(k, s)| k.as_str() != key && ip != "None" && s.spec.cluster_ip.as_ref() == Some(ip)) {
                bail!("service {key}: spec.clusterIP {ip} is already allocated to {k}");
            }
        }
        if ty == "NodePort" || ty == "LoadBalancer" {
            let mut used: BTreeSet<u16> = others().flat_map(|s| s.spec.ports.iter().filter_map(|p| p.node_port)).collect();
            for i in 0..svc.spec.ports.len() {
                let p = &svc.spec.ports[i];
                if let Some(np) = p.node_port {
                    if !used.insert(np) {
                        bail!("service {key}: spec.ports[{i}].nodePort {np} is already allocated");
                    }
                    continue;
                }
                let kept = old.and_then(|o| o.spec.ports.iter().find(|q| q.port == p.port && q.protocol == p.protocol)).and_then(|q| q.node_port);
                let np = match kept.filter(|n| !used.contains(n)) {
                    Some(n) => n,
                    None => NODE_PORTS.clone().find(|n| !used.contains(n)).ok_or_else(|| anyhow!("service {key}: no node ports left"))?,
                };
                used.insert(np);
                svc.spec.ports[i].node_port = Some(np);
            }
        }
        if ty == "LoadBalancer" && svc.status.load_balancer.ingress.is_empty() {
            let kept = old.map(|o| o.status.load_balancer.ingress.clone()).filter(|i| !i.is_empty());
            svc.status.load_balancer.ingress = match kept {
                Some(i) => i,
                None => {
                    let used: BTreeSet<String> = others().flat_map(|s| s.status.load_balancer.ingress.iter().filter_map(|i| i.ip.clone())).collect();
                    let mut ip = u32::from(LB_IP_FIRST);
                    while used.contains(&Ipv4Addr::from(ip).to_string()) {
                        ip += 1;
                    }
                    vec![cilium_k8s::LoadBalancerIngress { ip: Some(Ipv4Addr::from(ip).to_string()) }]
                }
            };
        }
        Ok(svc)
    }

    /// Sends every Service, with the endpoints its selector picks now, to
    /// every agent (the Service and EndpointSlice watchers' job). Agents
    /// write only what changed.
    fn sync_services(&self) -> anyhow::Result<()> {
        for i in 0..self.state.nodes.len() {
            self.sync_services_to(i)?;
        }
        Ok(())
    }

    /// One node's agent gets the full list (a re-list: Services it knows
    /// that are not listed go).
    fn sync_services_to(&self, node: usize) -> anyhow::Result<()> {
        let pods: Vec<&PodState> = self.state.pods.values().collect();
        let list: Vec<cilium_api::K8sService> = self.state.services.values().map(|s| k8s_service(s, &pods)).collect();
        let rejected: Vec<(String, String)> = block_on(self.client(node).call("PUT", "/v1/k8s/services", Some(&list)))?;
        if let Some((svc, e)) = rejected.first() {
            bail!("the agent of {} rejected service {svc}: {e}", self.state.nodes[node].name);
        }
        Ok(())
    }

    /// Deletes the objects (pods, deployments' pods, policies, services, namespaces).
    pub fn delete(&mut self, objects: Vec<Object>) -> anyhow::Result<Vec<String>> {
        if let Some(n) = objects.iter().find(|o| matches!(o, Object::Node(_))) {
            bail!("Node {:?}: a lab's nodes go away only with the lab (`cilium lab down`)", n.metadata().name);
        }
        let mut out = Vec::new();
        for obj in objects {
            let ns = obj.metadata().namespace.clone().unwrap_or_else(|| "default".to_string());
            let name = obj.metadata().name.clone();
            match obj {
                Object::Pod(_) => {
                    let key = format!("{ns}/{name}");
                    if self.state.pods.contains_key(&key) {
                        self.delete_pod(&key)?;
                        out.push(format!("pod/{name} deleted"));
                    }
                }
                Object::Deployment(_) => {
                    let owner = format!("Deployment/{ns}/{name}");
                    let keys: Vec<String> = self.state.pods.iter().filter(|(_, p)| p.owner.as_deref() == Some(owner.as_str())).map(|(k, _)| k.clone()).collect();
                    for k in keys {
                        self.delete_pod(&k)?;
                    }
                    out.push(format!("deployment.apps/{name} deleted"));
                }
                Object::Service(_) => {
                    if self.state.services.remove(&format!("{ns}/{name}")).is_some() {
                        out.push(format!("service/{name} deleted"));
                    }
                }
                Object::Policy(doc, _) => {
                    let key = doc.key();
                    for c in self.clients() {
                        let _: PolicyChange = block_on(c.call(
                            "DELETE",
                            "/v1/policy",
                            Some(&PolicyDelete { all: false, kind: Some(key.kind.as_str().into()), namespace: key.namespace.clone(), name: Some(key.name.clone()) }),
                        ))?;
                    }
                    self.state.policies.remove(&key.to_string());
                    out.push(format!("{} deleted", kubectl_name(&key.to_string())));
                }
                Object::Node(_) => unreachable!("refused above"),
                Object::Namespace(_) => {
                    let keys: Vec<String> = self.state.pods.iter().filter(|(_, p)| p.namespace == name).map(|(k, _)| k.clone()).collect();
                    for k in keys {
                        self.delete_pod(&k)?;
                    }
                    self.state.namespaces.remove(&name);
                    out.push(format!("namespace/{name} deleted"));
                }
            }
            self.save()?;
        }
        self.sync_services()?;
        Ok(out)
    }

    /// The scheduler, simply: a pod keeps the node it runs on; a new one
    /// without spec.nodeName goes to the node with the fewest pods.
    fn place(&self, pods: &mut [(PodState, PodSpec)]) -> anyhow::Result<()> {
        let mut count: BTreeMap<String, usize> = self.state.nodes.iter().map(|n| (n.name.clone(), 0)).collect();
        for p in self.state.pods.values() {
            *count.entry(p.node.clone()).or_default() += 1;
        }
        for (p, _) in pods.iter_mut() {
            if p.node.is_empty() {
                let key = format!("{}/{}", p.namespace, p.name);
                p.node = match self.state.pods.get(&key) {
                    Some(existing) => existing.node.clone(),
                    None => {
                        let n = count.iter().min_by_key(|(_, c)| **c).map(|(n, _)| n.clone()).expect("a lab has nodes");
                        *count.entry(n.clone()).or_default() += 1;
                        n
                    }
                };
            } else if !count.contains_key(&p.node) {
                bail!("pod {}/{}: spec.nodeName {:?} is not a node of lab {}", p.namespace, p.name, p.node, self.state.name);
            }
        }
        Ok(())
    }

    fn pod_state(&self, ns: &str, name: &str, labels: &BTreeMap<String, String>, spec: &PodSpec, owner: Option<String>) -> PodState {
        // spec.nodeName, else placed by `place`
        let node = spec.node_name.clone().unwrap_or_default();
        PodState {
            namespace: ns.to_string(),
            name: name.to_string(),
            labels: labels.clone(),
            node,
            netns: format!("cl-{}-{}", self.state.name, suffix(&format!("{ns}/{name}"), 12)),
            ip: None,
            ip6: None,
            container_id: format!("lab-{}-{}-{}", self.state.name, ns, name),
            ports: spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().map(|p| (p.name.clone(), p.protocol.clone(), p.container_port)))
                .collect(),
            workload_pid: None,
            owner,
            cni_add_ms: None,
            cni_added_at_us: None,
        }
    }

    fn cni(&self, node: usize, command: &str, p: &PodState) -> anyhow::Result<serde_json::Value> {
        use std::io::Write;
        let n = &self.state.nodes[node];
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "cilium",
            "type": "cilium-cni",
            "socket-path": n.socket.display().to_string(),
        });
        let mut cmd = sys::command_in(&n.netns, None, self.bin_dir.join("cilium-cni"))?;
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &p.container_id)
            .env("CNI_NETNS", sys::netns_path(&p.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin_dir)
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", p.namespace, p.name))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("running cilium-cni")?;
        child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("cilium-cni {command} for {}/{} failed: {}{}", p.namespace, p.name, stdout.trim(), String::from_utf8_lossy(&out.stderr).trim());
        }
        if stdout.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        Ok(serde_json::from_str(&stdout)?)
    }

    fn create_pod(&mut self, p: &mut PodState) -> anyhow::Result<()> {
        let node = self.node_index(Some(&p.node))?;
        sys::netns_add(&p.netns)?;
        let result = (|| -> anyhow::Result<()> {
            let started = Instant::now();
            let res = self.cni(node, "ADD", p)?;
            p.cni_add_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            p.cni_added_at_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_micros() as u64);
            let addr = res["ips"][0]["address"].as_str().ok_or_else(|| anyhow!("CNI result without an address: {res}"))?;
            p.ip = Some(addr.split('/').next().unwrap_or("").parse()?);
            p.ip6 = res["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse::<Ipv6Addr>().ok())
                .next();
            let tcp: Vec<u16> = p.ports.iter().filter(|(_, proto, _)| proto == "TCP").map(|(_, _, port)| *port).collect();
            let udp: Vec<u16> = p.ports.iter().filter(|(_, proto, _)| proto == "UDP").map(|(_, _, port)| *port).collect();
            let pods_dir = self.dir.join("pods");
            std::fs::create_dir_all(&pods_dir)?;
            let ready = pods_dir.join(format!("{}_{}.ready", p.namespace, p.name));
            let _ = std::fs::remove_file(&ready);
            let mut args = vec!["lab".to_string(), "workload".into(), "--pod".into(), format!("{}/{}", p.namespace, p.name)];
            for port in tcp {
                args.extend(["--tcp".into(), port.to_string()]);
            }
            for port in udp {
                args.extend(["--udp".into(), port.to_string()]);
            }
            args.extend(["--ready-file".into(), ready.display().to_string()]);
            let log = pods_dir.join(format!("{}_{}.log", p.namespace, p.name));
            let cgroup = self.state.nodes[node].cgroup_root.clone();
            let pid = sys::spawn_daemon(&p.netns, Some(&cgroup), &self.bin_dir.join("cilium"), &args, &log)?;
            p.workload_pid = Some(pid);
            wait_for(|| ready.exists() || !sys::alive(pid), Duration::from_secs(10))?;
            if !ready.exists() {
                bail!("the workload of {}/{} exited: {}", p.namespace, p.name, std::fs::read_to_string(&log).unwrap_or_default());
            }
            Ok(())
        })();
        if let Err(e) = result {
            if let Some(pid) = p.workload_pid {
                sys::stop(pid, Duration::from_secs(1));
            }
            let _ = self.cni(node, "DEL", p);
            sys::netns_delete(&p.netns);
            return Err(e);
        }
        Ok(())
    }

    fn delete_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let Some(p) = self.state.pods.get(key).cloned() else { return Ok(()) };
        if let Some(pid) = p.workload_pid {
            sys::stop(pid, Duration::from_secs(2));
        }
        for pid in sys::processes_in(std::slice::from_ref(&p.netns)) {
            sys::stop(pid, Duration::from_secs(1));
        }
        let node = self.node_index(Some(&p.node))?;
        self.cni(node, "DEL", &p)?;
        sys::netns_delete(&p.netns);
        for c in self.clients() {
            let _: Result<bool, _> = block_on(c.call::<(), bool>("DELETE", &format!("/v1/k8s/pod/{}/{}", p.namespace, p.name), None));
        }
        self.state.pods.remove(key);
        self.save()
    }

    /// Invokes the CNI plugin for a pod directly (for tests of its semantics).
    pub fn cni_raw(&self, command: &str, key: &str) -> anyhow::Result<serde_json::Value> {
        let p = self.state.pods.get(key).ok_or_else(|| anyhow!("no pod {key}"))?;
        self.cni(self.node_index(Some(&p.node))?, command, p)
    }

    /// The cgroup processes of a pod or node join, so the node's socket load
    /// balancer applies to them; none for `world` (it stands for the outside).
    pub fn cgroup_of(&self, target: &str) -> Option<PathBuf> {
        if let Some(n) = self.state.nodes.iter().find(|n| n.name == target) {
            return Some(n.cgroup_root.clone());
        }
        let key = if target.contains('/') { target.to_string() } else { format!("default/{target}") };
        let p = self.state.pods.get(&key)?;
        self.state.nodes.iter().find(|n| n.name == p.node).map(|n| n.cgroup_root.clone())
    }

    /// The network namespace and address of `ns/pod`, a node name, `world`,
    /// or an IP address (destination only): its IPv4 address, or with
    /// `ipv6` its IPv6 one.
    pub fn resolve(&self, target: &str, ipv6: bool) -> anyhow::Result<(String, Option<IpAddr>)> {
        let pick = |v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>| if ipv6 { v6.map(IpAddr::V6) } else { v4.map(IpAddr::V4) };
        if target == "world" {
            return Ok((self.state.world_netns.clone(), pick(Some(WORLD_IP), self.state.ipv6.then_some(WORLD_IP6))));
        }
        if let Some(n) = self.state.nodes.iter().find(|n| n.name == target) {
            return Ok((n.netns.clone(), pick(Some(n.ip), n.ip6)));
        }
        if let Ok(ip) = target.parse::<IpAddr>() {
            return Ok((String::new(), Some(ip)));
        }
        let key = if target.contains('/') { target.to_string() } else { format!("default/{target}") };
        let p = self.state.pods.get(&key).ok_or_else(|| anyhow!("no pod {key} in lab {} (see `cilium lab get pods`)", self.state.name))?;
        Ok((p.netns.clone(), pick(p.ip, p.ip6)))
    }
}

/// A Service with the endpoints its selector picks among `pods` (the
/// EndpointSlice controller's job): pods of its namespace with an address,
/// each port's targetPort resolved by number or by container port name.
pub fn k8s_service(svc: &cilium_k8s::Service, pods: &[&PodState]) -> cilium_api::K8sService {
    use cilium_policy::api::IntOrString;
    let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = &svc.spec;
    let mut endpoints = Vec::new();
    if !spec.selector.is_empty() {
        for p in pods.iter().filter(|p| p.namespace == ns && spec.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))) {
            let Some(ip) = p.ip else { continue };
            let ports: Vec<cilium_api::K8sEndpointPort> = spec
                .ports
                .iter()
                .filter_map(|sp| {
                    let port = match &sp.target_port {
                        None => Some(sp.port),
                        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                        Some(IntOrString::String(name)) => match name.parse::<u16>() {
                            Ok(n) => Some(n),
                            Err(_) => p.ports.iter().find(|(n, proto, _)| n.as_deref() == Some(name.as_str()) && *proto == sp.protocol).map(|(_, _, port)| *port),
                        },
                    }?;
                    Some(cilium_api::K8sEndpointPort { name: sp.name.clone(), protocol: sp.protocol.clone(), port })
                })
                .collect();
            if !ports.is_empty() {
                endpoints.push(cilium_api::K8sEndpoint { ip: ip.to_string(), node_name: Some(p.node.clone()), terminating: false, ports });
            }
        }
    }
    cilium_api::K8sService {
        namespace: ns,
        name: svc.metadata.name.clone(),
        annotations: svc.metadata.annotations.clone(),
        labels: svc.metadata.labels.clone(),
        selector: if spec.selector.is_empty() { None } else { Some(spec.selector.clone()) },
        service_type: spec.service_type.clone().unwrap_or_else(|| "ClusterIP".into()),
        cluster_ip: spec.cluster_ip.clone(),
        external_ips: spec.external_ips.clone(),
        load_balancer_ips: svc.status.load_balancer.ingress.iter().filter_map(|i| i.ip.clone()).collect(),
        ports: spec
            .ports
            .iter()
            .map(|p| cilium_api::K8sServicePort { name: p.name.clone(), protocol: p.protocol.clone(), port: p.port, node_port: p.node_port })
            .collect(),
        session_affinity: spec.session_affinity.clone(),
        session_affinity_timeout: spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds),
        external_traffic_policy: spec.external_traffic_policy.clone(),
        internal_traffic_policy: spec.internal_traffic_policy.clone(),
        load_balancer_source_ranges: spec.load_balancer_source_ranges.clone(),
        endpoints,
    }
}

/// A node's Hubble socket.
pub fn hubble_socket(n: &NodeState) -> PathBuf {
    n.socket.with_file_name("hubble.sock")
}

fn pod_meta(p: &PodState) -> PodMeta {
    PodMeta {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        labels: p.labels.clone(),
        service_account: "default".into(),
        ports: p.ports.clone(),
        workload: p.owner.as_deref().map(|o| {
            let kind = o.split('/').next().unwrap_or("");
            format!("{kind}/{}", o.rsplit('/').next().unwrap_or(""))
        }),
        ip: p.ip,
        ip6: p.ip6,
        node: Some(p.node.clone()),
    }
}

/// A lab node's labels: the given ones, and `kubernetes.io/hostname` as
/// the kubelet sets it.
fn node_labels(name: &str, given: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = given.clone();
    labels.insert("kubernetes.io/hostname".to_string(), name.to_string());
    labels
}

fn kubectl_name(key: &str) -> String {
    let mut parts = key.split('/');
    let kind = parts.next().unwrap_or("");
    let name = key.rsplit('/').next().unwrap_or("");
    let res = match kind {
        "CiliumNetworkPolicy" => "ciliumnetworkpolicy.cilium.io",
        "CiliumClusterwideNetworkPolicy" => "ciliumclusterwidenetworkpolicy.cilium.io",
        "CiliumCIDRGroup" => "ciliumcidrgroup.cilium.io",
        _ => "networkpolicy.networking.k8s.io",
    };
    format!("{res}/{name}")
}

fn wait_for(mut f: impl FnMut() -> bool, timeout: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?}")
}

/// Removes everything a lab made, whatever state it is in: processes in its
/// namespaces, the namespaces, its bpffs pins, cgroups and state.
pub fn down(name: &str) -> anyhow::Result<Vec<String>> {
    validate_name(name)?;
    let dir = lab_dir(name);
    let mut done = Vec::new();
    let state: Option<LabState> = std::fs::read(dir.join("lab.json")).ok().and_then(|t| serde_json::from_slice(&t).ok());
    let prefix = format!("cl-{name}-");
    let namespaces = sys::netns_list(&prefix);
    let mut pids: BTreeSet<u32> = sys::processes_in(&namespaces).into_iter().collect();
    pids.extend(sys::cgroup_processes(&Path::new(LAB_CGROUP_ROOT).join(name)));
    pids.remove(&std::process::id());
    if let Some(s) = &state {
        pids.extend(s.nodes.iter().filter_map(|n| n.agent_pid));
        pids.extend(s.pods.values().filter_map(|p| p.workload_pid));
        pids.extend(s.world_pid);
        pids.extend(s.relay_pid);
    }
    for pid in &pids {
        if sys::alive(*pid) {
            sys::stop(*pid, Duration::from_secs(5));
        }
    }
    // a stopping agent hands its proxy sockets to a holder process it
    // starts on the way out: take those too
    let late: Vec<u32> = sys::processes_in(&namespaces).into_iter().filter(|p| *p != std::process::id() && !pids.contains(p)).collect();
    for pid in &late {
        sys::stop(*pid, Duration::from_secs(2));
    }
    let stopped = pids.len() + late.len();
    if stopped > 0 {
        done.push(format!("stopped {stopped} processes"));
    }
    for ns in &namespaces {
        sys::netns_delete(ns);
    }
    if !namespaces.is_empty() {
        done.push(format!("deleted {} network namespaces", namespaces.len()));
    }
    let bpf = Path::new(LAB_BPF_ROOT).join(name);
    if bpf.exists() {
        std::fs::remove_dir_all(&bpf).with_context(|| format!("removing {}", bpf.display()))?;
        done.push(format!("removed {}", bpf.display()));
    }
    let cg = Path::new(LAB_CGROUP_ROOT).join(name);
    if cg.exists() {
        remove_cgroup_tree(&cg);
        done.push(format!("removed {}", cg.display()));
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        done.push(format!("removed {}", dir.display()));
    }
    Ok(done)
}

fn remove_cgroup_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}
