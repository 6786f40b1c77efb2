//! Loading the datapath object, pinning, attaching, and typed map access.

use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapInfo, PerCpuArray};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle, qdisc_add_clsact};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSock, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};
use cilium_abi::{
    Ct6Key, CtEntry, CtKey, EndpointInfo, IpcacheValue, Lb4Backend, Lb4Key, Lb4Service, Lb4SrcRangeKey, LbMaglevKey, MetricsKey,
    MetricsValue, MonitorAggregation, PolicyEntry, PolicyKey, RuntimeConfig,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::{info, warn};

use crate::{BPF_LXC, BPF_SOCK, CtConn, Datapath, DatapathError, LbDump, LbOp, MapPressure, Result, be_to_ip, ip_to_be};

/// The programs of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    FromContainer,
    ToContainer,
    FromNetdev,
    ToNetdev,
    FromOverlay,
    ToOverlay,
}

impl Program {
    const ALL: [Program; 6] =
        [Program::FromContainer, Program::ToContainer, Program::FromNetdev, Program::ToNetdev, Program::FromOverlay, Program::ToOverlay];

    pub fn name(self) -> &'static str {
        match self {
            Program::FromContainer => "cil_from_container",
            Program::ToContainer => "cil_to_container",
            Program::FromNetdev => "cil_from_netdev",
            Program::ToNetdev => "cil_to_netdev",
            Program::FromOverlay => "cil_from_overlay",
            Program::ToOverlay => "cil_to_overlay",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Program::FromContainer | Program::FromNetdev | Program::FromOverlay => TcAttachType::Ingress,
            Program::ToContainer | Program::ToNetdev | Program::ToOverlay => TcAttachType::Egress,
        }
    }
}

/// Priority and handle of our cls_bpf filters on endpoint interfaces.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

fn is_eexist(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::TcError(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST))
}

const MAP_LXC: &str = "cilium_lxc";
const MAP_LXC_IP: &str = "cilium_lxc_ip";
const MAP_LXC_IP6: &str = "cilium_lxc_ip6";
const MAP_IPCACHE: &str = "cilium_ipcache";
const MAP_IPCACHE6: &str = "cilium_ipcache6";
const MAP_POLICY: &str = "cilium_policy";
const MAP_CT: &str = "cilium_ct4";
const MAP_CT6: &str = "cilium_ct6";
const MAP_RUNTIME: &str = "cilium_runtime";
const MAP_METRICS: &str = "cilium_metrics";
const MAP_EVENT_STATS: &str = "cilium_event_stats";
pub(crate) const MAP_EVENTS: &str = "cilium_events";

const MAP_LB_SERVICES: &str = "cilium_lb4_services";
const MAP_LB_BACKENDS: &str = "cilium_lb4_backends";
const MAP_LB_MAGLEV: &str = "cilium_lb4_maglev";
const MAP_LB_AFFINITY: &str = "cilium_lb_affinity";
const MAP_LB_SOCK_REVNAT: &str = "cilium_lb4_sock_revnat";
const MAP_LB_SOCK_HINT: &str = "cilium_lb4_sock_hint";
const MAP_LB_NAT: &str = "cilium_lb4_nat";
const MAP_LB_SRC_RANGE: &str = "cilium_lb4_source_range";

const ALL_MAPS: &[&str] = &[
    MAP_LXC,
    MAP_LXC_IP,
    MAP_LXC_IP6,
    MAP_IPCACHE,
    MAP_IPCACHE6,
    MAP_POLICY,
    MAP_CT,
    MAP_CT6,
    MAP_RUNTIME,
    MAP_METRICS,
    MAP_EVENT_STATS,
    MAP_EVENTS,
    MAP_LB_SERVICES,
    MAP_LB_BACKENDS,
    MAP_LB_MAGLEV,
    MAP_LB_AFFINITY,
    MAP_LB_SOCK_REVNAT,
    MAP_LB_SOCK_HINT,
    MAP_LB_NAT,
    MAP_LB_SRC_RANGE,
];

/// The socket-level programs and their attach points.
const SOCK_ADDR_PROGRAMS: &[&str] = &["cil_sock4_connect", "cil_sock4_sendmsg", "cil_sock4_recvmsg", "cil_sock4_getpeername"];
const SOCK_RELEASE_PROGRAM: &str = "cil_sock_release";

/// How to load the datapath.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// bpffs directory for maps and links. `None` loads private, unpinned
    /// maps (for BPF_PROG_RUN tests): nothing outlives the process.
    pub pin_dir: Option<PathBuf>,
    pub ct_max: u32,
    pub policy_max: u32,
    pub ipcache_max: u32,
    pub endpoints_max: u32,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub events_bytes: u32,
    /// Slots of each Maglev table (a prime).
    pub maglev_size: u32,
    /// How much the endpoint programs trace.
    pub monitor_aggregation: MonitorAggregation,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pin_dir: None,
            ct_max: 262_144,
            policy_max: 1 << 20,
            ipcache_max: 512_000,
            endpoints_max: 65_536,
            events_bytes: 1 << 21,
            maglev_size: 16381,
            monitor_aggregation: MonitorAggregation::Medium,
        }
    }
}

// LPM keys as aya wants them: Key<data> has the prefix length in front, which
// makes them byte-identical to the C structs (policy_key, ipcache_key).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PolicyLpm {
    ep_id: u16,
    gen_dir: u8,
    pad0: u8,
    identity: u32,
    protocol: u8,
    pad1: u8,
    dport: u16,
}
// SAFETY: repr(C), integers only, no padding.
unsafe impl Pod for PolicyLpm {}

const _: () = assert!(size_of::<Key<PolicyLpm>>() == size_of::<PolicyKey>());

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SrcRangeLpm {
    rev_nat_index: u16,
    pad: u16,
    addr: u32,
}
// SAFETY: repr(C), integers only, no padding.
unsafe impl Pod for SrcRangeLpm {}
const _: () = assert!(size_of::<Key<SrcRangeLpm>>() == size_of::<cilium_abi::Lb4SrcRangeKey>());
const _: () = assert!(size_of::<Key<u32>>() == size_of::<cilium_abi::IpcacheKey>());

fn to_lpm(k: &PolicyKey) -> Key<PolicyLpm> {
    Key::new(
        k.prefixlen,
        PolicyLpm {
            ep_id: k.ep_id,
            gen_dir: k.gen_dir,
            pad0: 0,
            identity: k.identity,
            protocol: k.protocol,
            pad1: 0,
            dport: k.dport,
        },
    )
}

fn from_lpm(k: &Key<PolicyLpm>) -> PolicyKey {
    let d = k.data();
    PolicyKey {
        prefixlen: k.prefix_len(),
        ep_id: d.ep_id,
        gen_dir: d.gen_dir,
        pad0: 0,
        identity: d.identity,
        protocol: d.protocol,
        pad1: 0,
        dport: d.dport,
    }
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map { map, source: Box::new(e) }
}

/// True when the kernel said the map has no room (E2BIG or ENOSPC).
fn is_full(e: &aya::maps::MapError) -> bool {
    if let aya::maps::MapError::SyscallError(s) = e {
        return matches!(s.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC));
    }
    false
}

/// The datapath loaded into the kernel: the tc programs (bpf_lxc.o, which
/// owns every map) and the socket-level load balancer (bpf_sock.o), which
/// shares the service maps through the pin directory. Without one (BPF_PROG_RUN
/// tests) the socket programs see maps of their own.
pub struct Loaded {
    ebpf: Ebpf,
    sock: Ebpf,
    opts: LoadOptions,
    /// (map, operation, outcome) -> count, for `cilium_bpf_map_ops_total`.
    ops: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str, &'static str), u64>>,
}

impl Loaded {
    /// Loads the object. With a pin directory, maps already pinned there are
    /// reused (so enforcement state survives restarts) unless their shape
    /// changed, in which case they are replaced and a warning says so.
    pub fn load(opts: LoadOptions) -> Result<Loaded> {
        let mut pins = Vec::new();
        // the policy revision goes on from where it was, also when the
        // runtime map is replaced: conntrack entries remember revisions, and
        // one of an older policy must never match again
        let mut policy_rev = None;
        if let Some(dir) = &opts.pin_dir {
            std::fs::create_dir_all(dir)
                .map_err(|source| DatapathError::Io { what: format!("creating {}", dir.display()), source })?;
            policy_rev = pinned_policy_revision(&dir.join(MAP_RUNTIME));
            for name in ALL_MAPS {
                let path = dir.join(name);
                drop_incompatible_pin(&path, name, &opts);
                pins.push((*name, path));
            }
        }
        let loader = |obj: &[u8]| -> Result<Ebpf> {
            let mut loader = EbpfLoader::new();
            // Our programs use no CO-RE relocations, so the kernel's BTF (several
            // MB once parsed) is not needed: skipping it keeps the agent small.
            loader
                .btf(None)
                .map_max_entries(MAP_CT, opts.ct_max)
                .map_max_entries(MAP_CT6, opts.ct_max)
                .map_max_entries(MAP_IPCACHE6, opts.ipcache_max)
                .map_max_entries(MAP_LXC_IP6, opts.endpoints_max)
                .map_max_entries(MAP_POLICY, opts.policy_max)
                .map_max_entries(MAP_IPCACHE, opts.ipcache_max)
                .map_max_entries(MAP_LXC, opts.endpoints_max)
                .map_max_entries(MAP_LXC_IP, opts.endpoints_max)
                .map_max_entries(MAP_EVENTS, opts.events_bytes);
            for (name, path) in &pins {
                loader.map_pin_path(name, path.as_path());
            }
            loader.load(obj).map_err(|e| DatapathError::Load(Box::new(e)))
        };
        let mut ebpf = loader(BPF_LXC)?;
        for p in Program::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(p.name())
                .ok_or_else(|| DatapathError::Netlink(format!("program {} missing from object", p.name())))?
                .try_into()
                .map_err(|e| DatapathError::Program { name: p.name(), source: Box::new(e) })?;
            prog.load().map_err(|e| DatapathError::Program { name: p.name(), source: Box::new(e) })?;
        }
        let mut sock = loader(BPF_SOCK)?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = sock
                .program_mut(name)
                .ok_or_else(|| DatapathError::Netlink(format!("program {name} missing from object")))?
                .try_into()
                .map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
            prog.load().map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        }
        let name = SOCK_RELEASE_PROGRAM;
        let prog: &mut CgroupSock = sock
            .program_mut(name)
            .ok_or_else(|| DatapathError::Netlink(format!("program {name} missing from object")))?
            .try_into()
            .map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        prog.load().map_err(|e| DatapathError::Program { name, source: Box::new(e) })?;
        let mut loaded = Loaded { ebpf, sock, opts, ops: Default::default() };
        let (maglev_size, monitor_aggregation) = (loaded.opts.maglev_size, loaded.opts.monitor_aggregation.code());
        loaded.update_runtime(|rt| {
            rt.maglev_size = maglev_size;
            rt.monitor_aggregation = monitor_aggregation;
            if let Some(rev) = policy_rev {
                rt.policy_rev = rt.policy_rev.max(rev);
            }
        })?;
        Ok(loaded)
    }

    /// How much the endpoint programs trace, changed after loading.
    pub fn set_monitor_aggregation(&mut self, level: MonitorAggregation) -> Result<()> {
        self.update_runtime(|rt| rt.monitor_aggregation = level.code()).map(|_| ())
    }

    /// The node address pods' traffic to the world leaves from (BPF
    /// masquerading); None turns masquerading off.
    pub fn set_masquerade(&mut self, addr: Option<std::net::Ipv4Addr>) -> Result<()> {
        self.update_runtime(|rt| rt.masq_addr = addr.map(crate::ip_to_be).unwrap_or(0)).map(|_| ())
    }

    /// Changes the runtime configuration (cilium_runtime, index 0); returns it as written.
    fn update_runtime(&mut self, change: impl FnOnce(&mut RuntimeConfig)) -> Result<RuntimeConfig> {
        let m = self.ebpf.map_mut(MAP_RUNTIME).ok_or_else(|| DatapathError::Netlink("runtime map missing".into()))?;
        let mut a: Array<&mut MapData, RuntimeConfig> = Array::try_from(m).map_err(map_err(MAP_RUNTIME))?;
        let mut rt = a.get(&0, 0).map_err(map_err(MAP_RUNTIME))?;
        change(&mut rt);
        a.set(0, rt, 0).map_err(map_err(MAP_RUNTIME))?;
        Ok(rt)
    }

    fn map_dump<K: Pod + Default, V: Pod + Default>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        crate::sys::map_dump_batched(self.hash_fd(name)?, 4096).map_err(|source| DatapathError::Io { what: format!("reading {name}"), source })
    }

    fn hash_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self.ebpf.map(name) {
            Some(aya::maps::Map::HashMap(d)) | Some(aya::maps::Map::LruHashMap(d)) => Ok(d.fd().as_fd()),
            _ => Err(DatapathError::Netlink(format!("map {name} missing or not a hash map"))),
        }
    }

    /// Counts a map operation for the agent's metrics.
    fn count(&self, map: &'static str, op: &'static str, ok: bool) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        *ops.entry((map, op, if ok { "success" } else { "fail" })).or_default() += 1;
    }

    fn update_batched<K: Pod, V: Pod>(&self, name: &'static str, keys: &[K], values: &[V]) -> Result<()> {
        let r = crate::sys::map_update_batched(self.hash_fd(name)?, keys, values, 4096).map_err(|source| {
            if matches!(source.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC)) {
                DatapathError::MapFull { map: name, max: 0, detail: source.to_string() }
            } else {
                DatapathError::Io { what: format!("writing {name}"), source }
            }
        });
        self.count(name, "update", r.is_ok());
        r
    }

    fn delete_batched<K: Pod>(&self, name: &'static str, keys: &[K]) -> Result<()> {
        let r = crate::sys::map_delete_batched(self.hash_fd(name)?, keys, 4096)
            .map(|_| ())
            .map_err(|source| DatapathError::Io { what: format!("deleting from {name}"), source });
        self.count(name, "delete", r.is_ok());
        r
    }

    fn src_range_set(&mut self, key: &Lb4SrcRangeKey) -> Result<()> {
        let k = Key::new(key.prefixlen, SrcRangeLpm { rev_nat_index: key.rev_nat_index, pad: 0, addr: key.addr });
        self.lpm_mut::<SrcRangeLpm, u8>(MAP_LB_SRC_RANGE)?.insert(&k, 1, 0).map_err(map_err(MAP_LB_SRC_RANGE))
    }

    fn src_range_del(&mut self, key: &Lb4SrcRangeKey) -> Result<()> {
        let k = Key::new(key.prefixlen, SrcRangeLpm { rev_nat_index: key.rev_nat_index, pad: 0, addr: key.addr });
        absent_ok(self.lpm_mut::<SrcRangeLpm, u8>(MAP_LB_SRC_RANGE)?.remove(&k), MAP_LB_SRC_RANGE)
    }

    /// Attaches a pair of programs to an interface as cls_bpf filters
    /// (idempotent; replaces them atomically when attached already).
    fn attach_pair(&mut self, ifname: &str, pair: [Program; 2]) -> Result<()> {
        let iferr = |detail: String| DatapathError::Interface { ifname: ifname.to_string(), detail };
        if crate::sys::ifindex(ifname).is_none() {
            return Err(iferr("no such interface".into()));
        }
        // clsact + cls_bpf filters: attaching takes ~1 ms (TCX links wait for
        // an RCU grace period, ~10 ms each here), they outlive this process
        // without pinning, and a restarted agent swaps programs atomically
        // by replacing the filter at the same priority and handle.
        if let Err(e) = qdisc_add_clsact(ifname) {
            let exists = matches!(&e, TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(iferr(format!("adding clsact qdisc: {e}")));
            }
        }
        for p in pair {
            let prog = self.prog(p)?;
            let opts = TcAttachOptions::Netlink(NlOptions { priority: TC_PRIORITY, handle: TC_HANDLE, classid: None });
            let id = match prog.attach_with_options(ifname, p.attach_type(), opts) {
                Ok(id) => id,
                Err(e) if is_eexist(&e) => {
                    // already attached (agent restart): replace atomically
                    let link = SchedClassifierLink::attached(ifname, p.attach_type(), TC_PRIORITY, TC_HANDLE, None)
                        .map_err(|e| iferr(e.to_string()))?;
                    prog.attach_to_link(link).map_err(|e| iferr(format!("replacing {}: {e}", p.name())))?
                }
                Err(e) => return Err(iferr(format!("attaching {}: {e}", p.name()))),
            };
            // Dropping a link detaches it; the attachment must outlive us.
            let link = prog.take_link(id).map_err(|e| iferr(e.to_string()))?;
            std::mem::forget(link);
        }
        Ok(())
    }

    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    fn prog(&mut self, p: Program) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(p.name())
            .and_then(|prog| prog.try_into().ok())
            .ok_or_else(|| DatapathError::Netlink(format!("program {} not loaded", p.name())))
    }

    /// Runs a program once on a packet through BPF_PROG_RUN, as if it arrived
    /// on the interface `ifindex`. Returns the verdict and the packet after.
    pub fn test_run(&mut self, p: Program, packet: &[u8], ifindex: u32) -> Result<(i32, Vec<u8>)> {
        let (ret, out, _) = self.test_run_repeat(p, packet, ifindex, 1)?;
        Ok((ret, out))
    }

    /// [`Self::test_run`] `repeat` times in the kernel; also returns the
    /// average time of one run (for the per-packet benchmark).
    pub fn test_run_repeat(&mut self, p: Program, packet: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Vec<u8>, std::time::Duration)> {
        use aya::programs::TestRun as _;
        // struct __sk_buff with only ifindex (offset 40) set
        let mut ctx = vec![0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; packet.len() + 256];
        let prog = self.prog(p)?;
        let res = prog
            .test_run(aya::programs::TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .map_err(|e| DatapathError::Program { name: p.name(), source: Box::new(e) })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value as i32, out, res.duration))
    }

    fn ct_map(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let m = self.ebpf.map(name).ok_or_else(|| DatapathError::Netlink(format!("conntrack map {name} missing")))?;
        let aya::maps::Map::LruHashMap(data) = m else {
            return Err(DatapathError::Netlink(format!("conntrack map {name} is not an LRU hash")));
        };
        Ok(data.fd().as_fd())
    }

    /// Every entry of a conntrack map (cilium_ct4 or cilium_ct6).
    fn ct_keys<K: Copy + Default>(&self, name: &'static str) -> Result<Vec<(K, CtEntry)>> {
        crate::sys::map_dump_batched::<K, CtEntry>(self.ct_map(name)?, 4096)
            .map_err(|source| DatapathError::Io { what: format!("reading {name}"), source })
    }

    fn ct_delete<K: Copy>(&mut self, name: &'static str, keys: &[K]) -> Result<usize> {
        crate::sys::map_delete_batched(self.ct_map(name)?, keys, 4096)
            .map_err(|source| DatapathError::Io { what: format!("deleting from {name}"), source })
    }

    /// Removes the address keys of an endpoint that still lead to it,
    /// except those `keep` (its new entry) still has.
    fn forget_addresses(&mut self, old: &EndpointInfo, keep: Option<&EndpointInfo>) -> Result<()> {
        let ifindex = old.ifindex;
        if keep.is_none_or(|k| k.ipv4 != old.ipv4) {
            let mut ips = self.hash_mut::<u32, u32>(MAP_LXC_IP)?;
            if ips.get(&old.ipv4, 0).ok() == Some(ifindex) {
                absent_ok(ips.remove(&old.ipv4), MAP_LXC_IP)?;
            }
        }
        if has_ipv6(old) && keep.is_none_or(|k| k.ipv6 != old.ipv6) {
            let mut ips6 = self.hash_mut::<[u8; 16], u32>(MAP_LXC_IP6)?;
            if ips6.get(&old.ipv6, 0).ok() == Some(ifindex) {
                absent_ok(ips6.remove(&old.ipv6), MAP_LXC_IP6)?;
            }
        }
        Ok(())
    }

    /// Takes the event ring buffer (once) for an [`crate::events::EventReader`].
    pub fn take_events(&mut self) -> Option<aya::maps::Map> {
        self.ebpf.take_map(MAP_EVENTS)
    }

    fn hash<K: Pod, V: Pod>(&self, name: &'static str) -> Result<HashMap<&MapData, K, V>> {
        let m = self.ebpf.map(name).ok_or_else(|| DatapathError::Netlink(format!("map {name} missing")))?;
        HashMap::try_from(m).map_err(map_err(name))
    }

    fn hash_mut<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<HashMap<&mut MapData, K, V>> {
        let m = self.ebpf.map_mut(name).ok_or_else(|| DatapathError::Netlink(format!("map {name} missing")))?;
        HashMap::try_from(m).map_err(map_err(name))
    }

    fn lpm<K: Pod, V: Pod>(&self, name: &'static str) -> Result<LpmTrie<&MapData, K, V>> {
        let m = self.ebpf.map(name).ok_or_else(|| DatapathError::Netlink(format!("map {name} missing")))?;
        LpmTrie::try_from(m).map_err(map_err(name))
    }

    fn lpm_mut<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<LpmTrie<&mut MapData, K, V>> {
        let m = self.ebpf.map_mut(name).ok_or_else(|| DatapathError::Netlink(format!("map {name} missing")))?;
        LpmTrie::try_from(m).map_err(map_err(name))
    }

}

/// The policy revision in a pinned runtime map of any size (it is the first
/// field of every version of the struct).
fn pinned_policy_revision(path: &Path) -> Option<u32> {
    let fd = crate::sys::obj_get(path).ok()?;
    // a buffer larger than any runtime_config: the kernel writes its size
    let value: [u32; 16] = crate::sys::map_lookup(std::os::fd::AsFd::as_fd(&fd), &0u32).ok()??;
    Some(value[0])
}

/// Removes a pinned map whose shape no longer matches what this build loads,
/// so loading creates a fresh one instead of failing.
fn drop_incompatible_pin(path: &Path, name: &str, opts: &LoadOptions) {
    if !path.exists() {
        return;
    }
    let expected_max = match name {
        MAP_CT | MAP_CT6 => Some(opts.ct_max),
        MAP_POLICY => Some(opts.policy_max),
        MAP_IPCACHE | MAP_IPCACHE6 => Some(opts.ipcache_max),
        MAP_LXC | MAP_LXC_IP | MAP_LXC_IP6 => Some(opts.endpoints_max),
        MAP_EVENTS => Some(opts.events_bytes),
        _ => None,
    };
    let expected_sizes: Option<(usize, usize)> = match name {
        MAP_LXC => Some((4, size_of::<EndpointInfo>())),
        MAP_LXC_IP => Some((4, 4)),
        MAP_LXC_IP6 => Some((16, 4)),
        MAP_IPCACHE => Some((size_of::<cilium_abi::IpcacheKey>(), size_of::<IpcacheValue>())),
        MAP_IPCACHE6 => Some((size_of::<cilium_abi::Ipcache6Key>(), size_of::<IpcacheValue>())),
        MAP_POLICY => Some((size_of::<PolicyKey>(), size_of::<PolicyEntry>())),
        MAP_CT => Some((size_of::<CtKey>(), size_of::<CtEntry>())),
        MAP_CT6 => Some((size_of::<Ct6Key>(), size_of::<CtEntry>())),
        MAP_RUNTIME => Some((4, size_of::<RuntimeConfig>())),
        MAP_METRICS => Some((4, size_of::<MetricsValue>())),
        _ => None,
    };
    let ok = match MapInfo::from_pin(path) {
        Ok(info) => {
            expected_max.is_none_or(|m| m == info.max_entries())
                && expected_sizes.is_none_or(|(k, v)| k == info.key_size() as usize && v == info.value_size() as usize)
        }
        Err(_) => false,
    };
    if !ok {
        warn!(map = name, path = %path.display(), "pinned map has a different shape; replacing it (its entries are lost)");
        let _ = std::fs::remove_file(path);
    }
}

/// A map removal whose key may already be gone.
fn absent_ok(r: std::result::Result<(), aya::maps::MapError>, map: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(map)(e)),
    }
}

fn ipcache_key(prefix: Ipv4Net) -> Key<u32> {
    Key::new(prefix.prefix_len() as u32, ip_to_be(prefix.network()))
}

fn ipcache6_key(prefix: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(prefix.prefix_len() as u32, prefix.network().octets())
}

fn has_ipv6(info: &EndpointInfo) -> bool {
    info.ipv6 != [0; 16]
}

impl Datapath for Loaded {
    fn endpoint_upsert(&mut self, info: &EndpointInfo) -> Result<()> {
        let r = (|| -> Result<()> {
            let max = self.opts.endpoints_max;
            let full = |map: &'static str| {
                move |e: aya::maps::MapError| {
                    if is_full(&e) { DatapathError::MapFull { map, max, detail: e.to_string() } } else { map_err(map)(e) }
                }
            };
            let previous = self.hash::<u32, EndpointInfo>(MAP_LXC)?.get(&info.ifindex, 0).ok();
            self.hash_mut::<u32, EndpointInfo>(MAP_LXC)?.insert(info.ifindex, *info, 0).map_err(full(MAP_LXC))?;
            if let Some(old) = previous.filter(|_| info.ifindex != cilium_abi::HOST_ENDPOINT_IFINDEX) {
                // an address the endpoint no longer has stops leading to it
                self.forget_addresses(&old, Some(info))?;
            }
            if info.ifindex == cilium_abi::HOST_ENDPOINT_IFINDEX {
                // the host endpoint's addresses are the node's, not a pod's
                return Ok(());
            }
            self.hash_mut::<u32, u32>(MAP_LXC_IP)?.insert(info.ipv4, info.ifindex, 0).map_err(full(MAP_LXC_IP))?;
            if has_ipv6(info) {
                self.hash_mut::<[u8; 16], u32>(MAP_LXC_IP6)?.insert(info.ipv6, info.ifindex, 0).map_err(full(MAP_LXC_IP6))?;
            }
            Ok(())
        })();
        self.count(MAP_LXC, "update", r.is_ok());
        r
    }

    fn endpoint_delete(&mut self, ifindex: u32) -> Result<()> {
        let r = (|| -> Result<()> {
            let existing = self.hash::<u32, EndpointInfo>(MAP_LXC)?.get(&ifindex, 0).ok();
            if let Some(info) = existing {
                self.forget_addresses(&info, None)?;
            }
            let r = self.hash_mut::<u32, EndpointInfo>(MAP_LXC)?.remove(&ifindex);
            absent_ok(r, MAP_LXC)
        })();
        self.count(MAP_LXC, "delete", r.is_ok());
        r
    }

    fn endpoints(&self) -> Result<Vec<EndpointInfo>> {
        let m = self.hash::<u32, EndpointInfo>(MAP_LXC)?;
        m.iter().map(|r| r.map(|(_, v)| v).map_err(map_err(MAP_LXC))).collect()
    }

    fn ipcache_upsert(&mut self, prefix: IpNet, value: &IpcacheValue) -> Result<()> {
        let max = self.opts.ipcache_max;
        let full = |map: &'static str| {
            move |e: aya::maps::MapError| if is_full(&e) { DatapathError::MapFull { map, max, detail: e.to_string() } } else { map_err(map)(e) }
        };
        let (map, r) = match prefix {
            IpNet::V4(p) => (MAP_IPCACHE, self.lpm_mut::<u32, IpcacheValue>(MAP_IPCACHE).and_then(|mut m| m.insert(&ipcache_key(p), *value, 0).map_err(full(MAP_IPCACHE)))),
            IpNet::V6(p) => (MAP_IPCACHE6, self.lpm_mut::<[u8; 16], IpcacheValue>(MAP_IPCACHE6).and_then(|mut m| m.insert(&ipcache6_key(p), *value, 0).map_err(full(MAP_IPCACHE6)))),
        };
        self.count(map, "update", r.is_ok());
        r
    }

    fn ipcache_delete(&mut self, prefix: IpNet) -> Result<()> {
        let (map, r) = match prefix {
            IpNet::V4(p) => (MAP_IPCACHE, self.lpm_mut::<u32, IpcacheValue>(MAP_IPCACHE).and_then(|mut m| absent_ok(m.remove(&ipcache_key(p)), MAP_IPCACHE))),
            IpNet::V6(p) => (MAP_IPCACHE6, self.lpm_mut::<[u8; 16], IpcacheValue>(MAP_IPCACHE6).and_then(|mut m| absent_ok(m.remove(&ipcache6_key(p)), MAP_IPCACHE6))),
        };
        self.count(map, "delete", r.is_ok());
        r
    }

    fn ipcache_dump(&self) -> Result<Vec<(IpNet, IpcacheValue)>> {
        let bad = |e: ipnet::PrefixLenError| DatapathError::Netlink(format!("bad ipcache prefix: {e}"));
        let mut out = Vec::new();
        for r in self.lpm::<u32, IpcacheValue>(MAP_IPCACHE)?.iter() {
            let (k, v) = r.map_err(map_err(MAP_IPCACHE))?;
            out.push((IpNet::V4(Ipv4Net::new(be_to_ip(k.data()), k.prefix_len() as u8).map_err(bad)?), v));
        }
        for r in self.lpm::<[u8; 16], IpcacheValue>(MAP_IPCACHE6)?.iter() {
            let (k, v) = r.map_err(map_err(MAP_IPCACHE6))?;
            out.push((IpNet::V6(Ipv6Net::new(std::net::Ipv6Addr::from(k.data()), k.prefix_len() as u8).map_err(bad)?), v));
        }
        Ok(out)
    }

    fn policy_insert(&mut self, key: &PolicyKey, entry: &PolicyEntry) -> Result<()> {
        let r = (|| -> Result<()> {
            let max = self.opts.policy_max;
            let mut m = self.lpm_mut::<PolicyLpm, PolicyEntry>(MAP_POLICY)?;
            m.insert(&to_lpm(key), *entry, 0).map_err(|e| {
                if is_full(&e) {
                    DatapathError::MapFull { map: MAP_POLICY, max, detail: e.to_string() }
                } else {
                    map_err(MAP_POLICY)(e)
                }
            })
        })();
        self.count(MAP_POLICY, "update", r.is_ok());
        r
    }

    fn policy_delete(&mut self, key: &PolicyKey) -> Result<()> {
        let r = (|| -> Result<()> {
            let mut m = self.lpm_mut::<PolicyLpm, PolicyEntry>(MAP_POLICY)?;
            absent_ok(m.remove(&to_lpm(key)), MAP_POLICY)
        })();
        self.count(MAP_POLICY, "delete", r.is_ok());
        r
    }

    fn policy_dump(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>> {
        let m = self.lpm::<PolicyLpm, PolicyEntry>(MAP_POLICY)?;
        m.iter().map(|r| r.map(|(k, v)| (from_lpm(&k), v)).map_err(map_err(MAP_POLICY))).collect()
    }

    fn bump_policy_revision(&mut self) -> Result<u32> {
        Ok(self.update_runtime(|rt| rt.policy_rev = rt.policy_rev.wrapping_add(1))?.policy_rev)
    }

    fn attach(&mut self, ifname: &str) -> Result<()> {
        self.attach_pair(ifname, [Program::FromContainer, Program::ToContainer])?;
        // the endpoint's egress program turns what the node sends it back
        // into the device's ingress when the L7 proxy must see it; the
        // node's own source address must not make that a martian
        crate::sys::sysctl(&format!("net.ipv4.conf.{ifname}.accept_local"), "1")?;
        info!(ifname, "endpoint programs attached");
        Ok(())
    }

    fn attach_netdev(&mut self, ifname: &str) -> Result<()> {
        self.attach_pair(ifname, [Program::FromNetdev, Program::ToNetdev])?;
        info!(ifname, "service load balancer attached to node device");
        Ok(())
    }

    fn attach_overlay(&mut self, ifname: &str) -> Result<()> {
        self.attach_pair(ifname, [Program::FromOverlay, Program::ToOverlay])?;
        info!(ifname, "tunnel programs attached");
        Ok(())
    }

    fn link(&self, ifname: &str) -> Result<Option<(u32, [u8; 6])>> {
        let name = ifname.to_string();
        Ok(crate::netlink::run(|h| async move { crate::netlink::link(&h, &name).await })?.map(|l| (l.index, l.mac)))
    }

    fn link_up(&mut self, ifname: &str) -> Result<()> {
        let name = ifname.to_string();
        crate::netlink::run(|h| async move {
            let l = crate::netlink::link(&h, &name)
                .await?
                .ok_or_else(|| DatapathError::Interface { ifname: name.clone(), detail: "no such interface".into() })?;
            crate::netlink::set_up(&h, l.index).await
        })
    }

    fn route(&mut self, prefix: IpNet, ifname: &str, src: std::net::IpAddr) -> Result<()> {
        let name = ifname.to_string();
        crate::netlink::run(|h| async move {
            let l = crate::netlink::link(&h, &name)
                .await?
                .ok_or_else(|| DatapathError::Interface { ifname: name.clone(), detail: "no such interface".into() })?;
            crate::netlink::route_replace_dev(&h, prefix, l.index, Some(src)).await
        })
    }

    fn unroute(&mut self, prefix: IpNet) -> Result<()> {
        crate::netlink::run(|h| async move { crate::netlink::route_delete(&h, prefix).await })
    }

    fn routes_via(&self, ifname: &str) -> Result<Vec<IpNet>> {
        let name = ifname.to_string();
        crate::netlink::run(|h| async move {
            match crate::netlink::link(&h, &name).await? {
                Some(l) => crate::netlink::routes_via(&h, l.index).await,
                None => Ok(Vec::new()),
            }
        })
    }

    fn lb_apply(&mut self, ops: &[LbOp]) -> Result<()> {
        let mut i = 0;
        while i < ops.len() {
            let kind = ops[i].kind();
            let n = ops[i..].iter().take_while(|o| o.kind() == kind).count();
            let run = &ops[i..i + n];
            match run[0] {
                LbOp::BackendSet(..) => {
                    let (k, v): (Vec<u32>, Vec<Lb4Backend>) = run.iter().filter_map(|o| if let LbOp::BackendSet(k, v) = o { Some((*k, *v)) } else { None }).unzip();
                    self.update_batched(MAP_LB_BACKENDS, &k, &v)?;
                }
                LbOp::ServiceSet(..) => {
                    let (k, v): (Vec<Lb4Key>, Vec<Lb4Service>) = run.iter().filter_map(|o| if let LbOp::ServiceSet(k, v) = o { Some((*k, *v)) } else { None }).unzip();
                    self.update_batched(MAP_LB_SERVICES, &k, &v)?;
                }
                LbOp::MaglevSet(..) => {
                    let (k, v): (Vec<LbMaglevKey>, Vec<u32>) = run.iter().filter_map(|o| if let LbOp::MaglevSet(k, v) = o { Some((*k, *v)) } else { None }).unzip();
                    self.update_batched(MAP_LB_MAGLEV, &k, &v)?;
                }
                LbOp::BackendDel(..) => {
                    let k: Vec<u32> = run.iter().filter_map(|o| if let LbOp::BackendDel(k) = o { Some(*k) } else { None }).collect();
                    self.delete_batched(MAP_LB_BACKENDS, &k)?;
                }
                LbOp::ServiceDel(..) => {
                    let k: Vec<Lb4Key> = run.iter().filter_map(|o| if let LbOp::ServiceDel(k) = o { Some(*k) } else { None }).collect();
                    self.delete_batched(MAP_LB_SERVICES, &k)?;
                }
                LbOp::MaglevDel(..) => {
                    let k: Vec<LbMaglevKey> = run.iter().filter_map(|o| if let LbOp::MaglevDel(k) = o { Some(*k) } else { None }).collect();
                    self.delete_batched(MAP_LB_MAGLEV, &k)?;
                }
                LbOp::SrcRangeSet(..) | LbOp::SrcRangeDel(..) => {
                    for o in run {
                        match o {
                            LbOp::SrcRangeSet(k) => self.src_range_set(k)?,
                            LbOp::SrcRangeDel(k) => self.src_range_del(k)?,
                            _ => unreachable!("a run holds one kind"),
                        }
                    }
                }
            }
            i += n;
        }
        Ok(())
    }
    fn lb_dump(&self) -> Result<LbDump> {
        Ok(LbDump {
            services: self.map_dump(MAP_LB_SERVICES)?,
            backends: self.map_dump(MAP_LB_BACKENDS)?,
            maglev: self.map_dump(MAP_LB_MAGLEV)?,
            source_ranges: self
                .lpm::<SrcRangeLpm, u8>(MAP_LB_SRC_RANGE)?
                .keys()
                .map(|k| k.map_err(map_err(MAP_LB_SRC_RANGE)))
                .map(|k| k.map(|k| Lb4SrcRangeKey { prefixlen: k.prefix_len(), rev_nat_index: k.data().rev_nat_index, pad: 0, addr: k.data().addr }))
                .collect::<Result<_>>()?,
        })
    }

    fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        use std::os::fd::AsFd;
        let cg = std::fs::File::open(cgroup).map_err(|source| DatapathError::Io { what: format!("opening cgroup {}", cgroup.display()), source })?;
        let pin_dir = self.opts.pin_dir.clone();
        for name in SOCK_ADDR_PROGRAMS.iter().chain([&SOCK_RELEASE_PROGRAM]) {
            let perr = |e: aya::programs::ProgramError| DatapathError::Program { name, source: Box::new(e) };
            let program = self.sock.program_mut(name).ok_or_else(|| DatapathError::Netlink(format!("program {name} not loaded")))?;
            let pin = pin_dir.as_ref().map(|d| d.join(format!("link_{name}")));
            if let Some(pin) = &pin {
                // attached by an earlier agent: swap the program atomically
                if let Ok(link) = crate::sys::obj_get(pin) {
                    let prog_fd = program.fd().map_err(perr)?;
                    match crate::sys::link_update(link.as_fd(), prog_fd.as_fd()) {
                        Ok(()) => continue,
                        Err(e) => {
                            warn!(program = name, error = %e, "pinned cgroup link unusable, attaching again");
                            let _ = std::fs::remove_file(pin);
                        }
                    }
                }
            }
            let link = match program {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
                    FdLink::try_from(p.take_link(id).map_err(perr)?)
                }
                aya::programs::Program::CgroupSock(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
                    FdLink::try_from(p.take_link(id).map_err(perr)?)
                }
                _ => return Err(DatapathError::Netlink(format!("program {name} is not a cgroup program"))),
            };
            let fd = link.map_err(|e| DatapathError::Pin { path: cgroup.display().to_string(), detail: e.to_string() })?;
            match pin {
                Some(pin) => {
                    fd.pin(&pin).map_err(|e| DatapathError::Pin { path: pin.display().to_string(), detail: e.to_string() })?;
                }
                // not pinned: the attachment lives as long as this process
                None => std::mem::forget(fd),
            }
        }
        info!(cgroup = %cgroup.display(), "socket load balancer attached");
        Ok(())
    }

    fn ct_dump(&self) -> Result<Vec<(CtConn, CtEntry)>> {
        let mut out: Vec<(CtConn, CtEntry)> = self.ct_keys::<CtKey>(MAP_CT)?.iter().map(|(k, v)| (CtConn::from(k), *v)).collect();
        out.extend(self.ct_keys::<Ct6Key>(MAP_CT6)?.iter().map(|(k, v)| (CtConn::from(k), *v)));
        Ok(out)
    }

    fn ct_flush_ip(&mut self, ip: std::net::IpAddr) -> Result<usize> {
        match ip {
            std::net::IpAddr::V4(v4) => {
                let be = ip_to_be(v4);
                let doomed: Vec<CtKey> = self.ct_keys::<CtKey>(MAP_CT)?.into_iter().filter(|(k, _)| k.local == be || k.remote == be).map(|(k, _)| k).collect();
                self.ct_delete(MAP_CT, &doomed)
            }
            std::net::IpAddr::V6(v6) => {
                let o = v6.octets();
                let doomed: Vec<Ct6Key> = self.ct_keys::<Ct6Key>(MAP_CT6)?.into_iter().filter(|(k, _)| k.local == o || k.remote == o).map(|(k, _)| k).collect();
                self.ct_delete(MAP_CT6, &doomed)
            }
        }
    }

    fn ct_gc(&mut self, now_secs: u32) -> Result<usize> {
        let expired: Vec<CtKey> = self.ct_keys::<CtKey>(MAP_CT)?.into_iter().filter(|(_, v)| v.lifetime < now_secs).map(|(k, _)| k).collect();
        let expired6: Vec<Ct6Key> = self.ct_keys::<Ct6Key>(MAP_CT6)?.into_iter().filter(|(_, v)| v.lifetime < now_secs).map(|(k, _)| k).collect();
        Ok(self.ct_delete(MAP_CT, &expired)? + self.ct_delete(MAP_CT6, &expired6)?)
    }

    fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>> {
        let m = self.ebpf.map(MAP_METRICS).ok_or_else(|| DatapathError::Netlink("metrics map missing".into()))?;
        let a: PerCpuArray<&MapData, MetricsValue> = PerCpuArray::try_from(m).map_err(map_err(MAP_METRICS))?;
        let mut out = Vec::new();
        for (i, r) in a.iter().enumerate() {
            let per_cpu = r.map_err(map_err(MAP_METRICS))?;
            let sum = per_cpu.iter().fold(MetricsValue::default(), |a, v| MetricsValue {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            });
            if sum.packets > 0 {
                out.push((MetricsKey::from_index(i as u32), sum));
            }
        }
        Ok(out)
    }

    fn lost_events(&self) -> Result<u64> {
        let m = self.ebpf.map(MAP_EVENT_STATS).ok_or_else(|| DatapathError::Netlink("event stats map missing".into()))?;
        let a: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(m).map_err(map_err(MAP_EVENT_STATS))?;
        let v = a.get(&0, 0).map_err(map_err(MAP_EVENT_STATS))?;
        Ok(v.iter().sum())
    }

    fn map_ops(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(&(m, o, r), &n)| (m, o, r, n)).collect()
    }

    fn pressure(&self) -> Vec<MapPressure> {
        let lxc = self.hash::<u32, EndpointInfo>(MAP_LXC).map(|m| m.keys().count()).unwrap_or(0);
        let ipcache = self.lpm::<u32, IpcacheValue>(MAP_IPCACHE).map(|m| m.keys().count()).unwrap_or(0);
        let policy = self.lpm::<PolicyLpm, PolicyEntry>(MAP_POLICY).map(|m| m.keys().count()).unwrap_or(0);
        let ct = self.ct_dump().map(|v| v.len()).unwrap_or(0);
        vec![
            MapPressure { name: MAP_LXC, entries: lxc, max_entries: self.opts.endpoints_max },
            MapPressure { name: MAP_IPCACHE, entries: ipcache, max_entries: self.opts.ipcache_max },
            MapPressure { name: MAP_POLICY, entries: policy, max_entries: self.opts.policy_max },
            MapPressure { name: MAP_CT, entries: ct, max_entries: self.opts.ct_max },
        ]
    }
}
