//! Wiring the agent to the real kernel: start-up, background tasks, the API
//! server, and shutdown that leaves the datapath enforcing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use cilium_api::MonitorEvent;
use cilium_datapath::events::EventReader;
use cilium_datapath::{Datapath, LoadOptions, Loaded, sys};
use cilium_policy::PolicyOptions;
use tokio::sync::broadcast;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::hubble::{FlowMaker, HubbleRuntime};
use crate::metrics::AgentMetrics;
use crate::daemon::{Daemon, DaemonConfig};
use crate::server::{AppState, bind, router};
use crate::state::StateStore;

/// Everything that touches the system at start-up, in order, on a blocking
/// thread: bpffs, directories, saved state, host devices, the datapath.
fn setup(s: &Settings) -> anyhow::Result<(Daemon<Loaded>, aya::maps::Map, Option<Arc<crate::kvstore::KvIdentities>>)> {
    let bpffs = Path::new("/sys/fs/bpf");
    if s.bpf_root.starts_with(bpffs) {
        sys::ensure_bpffs(bpffs).context("mounting bpffs")?;
    }
    std::fs::create_dir_all(&s.bpf_root).with_context(|| format!("creating {}", s.bpf_root.display()))?;
    std::fs::create_dir_all(&s.state_dir).with_context(|| format!("creating {}", s.state_dir.display()))?;
    std::fs::create_dir_all(&s.cgroup_root).with_context(|| format!("creating the cgroup root {}", s.cgroup_root.display()))?;
    let store = StateStore::new(&s.state_dir);
    let saved = store.load().context("reading saved state")?;
    let saved_services = store.load_services().context("reading saved services")?;
    let router = cilium_ipam::Ipam::new(s.pod_cidr)?.router();
    let router6 = s.pod_cidr6.map(cilium_ipam::Ipam6::new).transpose()?.map(|i| i.router());
    let tunnel = (s.routing_mode == cilium_api::RoutingMode::Tunnel).then_some(crate::node::Tunnel { port: s.tunnel_port, mtu: s.mtu - cilium_api::RoutingMode::VXLAN_OVERHEAD });
    let node = crate::node::setup(router, router6, tunnel).context("setting up host devices")?;
    let devices = if s.devices.is_empty() { node.devices.clone() } else { s.devices.clone() };
    let mut dp = Loaded::load(LoadOptions {
        pin_dir: Some(s.bpf_root.clone()),
        ct_max: s.ct_max,
        policy_max: s.policy_max,
        ipcache_max: s.ipcache_max,
        endpoints_max: 65_536,
        events_bytes: s.events_bytes,
        maglev_size: s.maglev_table_size,
        monitor_aggregation: s.monitor_aggregation,
    })
    .context("loading the datapath")?;
    let events = dp.take_events().context("event ring buffer missing")?;
    dp.attach_cgroup(&s.cgroup_root).with_context(|| format!("attaching the socket load balancer to {}", s.cgroup_root.display()))?;
    dp.set_masquerade(if s.masquerade { node.ips.first().copied() } else { None }).context("configuring masquerading")?;
    for dev in &devices {
        dp.attach_netdev(dev).with_context(|| format!("attaching the service load balancer to device {dev} (see --devices)"))?;
    }
    if tunnel.is_some() {
        dp.attach_overlay(crate::node::TUNNEL_DEV).context("attaching the tunnel programs")?;
    }
    let cfg = DaemonConfig {
        routing_mode: s.routing_mode,
        node_name: s.node_name.clone(),
        pod_cidr: s.pod_cidr,
        pod_cidr6: s.pod_cidr6,
        mtu: s.mtu,
        policy: PolicyOptions { mode: s.enforcement, allow_localhost: s.allow_localhost, l7_proxy: s.l7_proxy },
        audit_mode: s.audit_mode,
        extended_ip_protocols: s.extended_ip_protocols,
        node_selector_labels: s.node_selector_labels,
        host_firewall: s.host_firewall,
        lb_algorithm: s.lb_algorithm,
        maglev_size: s.maglev_table_size,
        fqdn_min_ttl: s.fqdn_min_ttl,
        fqdn_max_ips: s.fqdn_max_ips,
    };
    let mut daemon = Daemon::new(cfg, dp, Some(store), node.ips)?;
    daemon.set_node_ips6(node.ips6);
    let mut kvstore = None;
    if let Some((address, timeout)) = &s.kvstore {
        let ids = Arc::new(crate::kvstore::KvIdentities::new(address, *timeout).context("--kvstore-opt etcd.address")?);
        info!(%address, "kvstore: cluster-wide identities and cluster state in etcd");
        daemon.set_kvstore(ids.clone());
        kvstore = Some(ids);
    }
    if let Some(svc) = saved_services {
        info!(services = svc.services.len(), "restoring services");
        daemon.set_services(svc);
    }
    match saved {
        Some(state) => {
            info!(endpoints = state.endpoints.len(), policies = state.policies.len(), "restoring state");
            daemon.restore(state)?;
        }
        None => {
            info!("no saved state: starting fresh");
            daemon.reconcile_datapath()?;
        }
    }
    Ok((daemon, events, kvstore))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    info!(node = %s.node_name, pod_cidr = %s.pod_cidr, bpf_root = %s.bpf_root.display(), state_dir = %s.state_dir.display(), "starting cilium-agent");
    let settings = s.clone();
    let (daemon, events, kvstore) = tokio::task::spawn_blocking(move || setup(&settings)).await??;
    let changes = daemon.change_counter();
    let daemon = Arc::new(Mutex::new(daemon));
    if let Some(kv) = &kvstore {
        kv.start_sync(daemon.clone(), changes.clone(), s.identity_gc_interval);
    }
    let (tx, _) = broadcast::channel(8192);
    let hubble = match s.hubble.clone() {
        Some(h) => Some(Arc::new(HubbleRuntime::new(&s.node_name, h).context("starting Hubble")?)),
        None => None,
    };
    let metrics = Arc::new(AgentMetrics::new());
    let health = match s.health_interval {
        Some(secs) => {
            crate::health::serve(crate::health::HEALTH_PORT).await?;
            let h = Arc::new(crate::health::Health::default());
            tokio::spawn(crate::health::probe_loop(daemon.clone(), changes.clone(), h.clone(), Duration::from_secs(secs)));
            Some(h)
        }
        None => None,
    };
    let state = Arc::new(AppState {
        daemon: daemon.clone(),
        monitor: tx.clone(),
        subscribers: AtomicUsize::new(0),
        monitor_lost: AtomicU64::new(0),
        bpf_root: s.bpf_root.display().to_string(),
        state_dir: s.state_dir.display().to_string(),
        socket: s.socket_path.display().to_string(),
        hubble: hubble.clone(),
        metrics: metrics.clone(),
        health,
        kvstore: s.kvstore.as_ref().map(|(a, _)| a.clone()),
        kv: kvstore.clone(),
    });

    if let Some(h) = &hubble {
        let hs = h.settings().clone();
        // bind before answering the API, so a ready agent has its Hubble socket
        let server = cilium_hubble::server::serve(h.hubble.clone(), Some(hs.socket_path.clone()), hs.listen);
        tokio::spawn(async move {
            if let Err(e) = server.await {
                error!(error = %e, "Hubble server");
            }
        });
        wait_for_socket(&hs.socket_path).await;
        if let Some(addr) = hs.metrics_addr {
            let h = h.clone();
            serve_metrics("hubble", addr, move || {
                let mut out = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut out, &h.registry);
                out
            })
            .await?;
        }
        tokio::spawn(hubble_lost_events(daemon.clone(), h.clone()));
    }
    if let Some(addr) = s.prometheus_addr {
        let (m, d) = (metrics.clone(), daemon.clone());
        serve_metrics("agent", addr, move || {
            m.refresh(&d.lock().unwrap_or_else(|p| p.into_inner()));
            m.encode()
        })
        .await?;
    }
    let maker = Arc::new(FlowMaker::new(changes.clone()));
    let mut l7 = None;
    if s.l7_proxy {
        let provider = Arc::new(crate::l7::Provider::new(daemon.clone(), changes.clone()));
        let log: Arc<dyn cilium_proxy::AccessLog> = match &hubble {
            Some(h) => Arc::new(crate::l7::HubbleLog { hubble: h.clone(), maker: maker.clone(), daemon: daemon.clone() }),
            None => Arc::new(crate::l7::NoLog),
        };
        let inherited = crate::handoff::receive(&handoff_socket(&s.state_dir));
        l7 = Some(crate::l7::start(provider, log, inherited)?);
    }
    tokio::spawn(monitor_events(events, tx, hubble.map(|h| (h, maker, daemon.clone()))));
    tokio::spawn(ct_gc(daemon.clone()));
    tokio::spawn(fqdn_gc(daemon.clone()));
    let store = StateStore::new(&s.state_dir);
    tokio::spawn(save_services(daemon.clone(), store.clone()));
    if let Some(dir) = s.policy_dir.clone() {
        tokio::spawn(watch_policy_dir(daemon.clone(), dir));
    }

    let listener = bind(&s.socket_path).with_context(|| format!("binding {}", s.socket_path.display()))?;
    info!(socket = %s.socket_path.display(), "API listening");
    let app = router(state);
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    server.await.context("API server")?;
    if let Some(h) = l7 {
        // idle proxied connections and the listeners survive the restart
        if let Err(e) = h.hand_over(&handoff_socket(&s.state_dir)).await {
            warn!(error = %e, "handing the L7 proxy's sockets over");
        }
    }
    flush_services(&daemon, &store);
    let _ = std::fs::remove_file(&s.socket_path);
    info!("stopped; the datapath keeps enforcing");
    Ok(())
}

/// Writes the services behind their changes, at most every 100 ms.
async fn save_services(daemon: Arc<Mutex<Daemon<Loaded>>>, store: StateStore) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let (d, st) = (daemon.clone(), store.clone());
        let _ = tokio::task::spawn_blocking(move || flush_services(&d, &st)).await;
    }
}

fn flush_services(daemon: &Mutex<Daemon<Loaded>>, store: &StateStore) {
    // one writer at a time, so an older snapshot never overwrites a newer one
    static WRITER: Mutex<()> = Mutex::new(());
    let _w = WRITER.lock().unwrap_or_else(|p| p.into_inner());
    let snapshot = daemon.lock().unwrap_or_else(|p| p.into_inner()).services_snapshot();
    if let Some(s) = snapshot {
        if let Err(e) = store.save_services(&s) {
            error!(error = %e, "saving services");
            daemon.lock().unwrap_or_else(|p| p.into_inner()).services_unsaved();
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
}

/// Offset from CLOCK_BOOTTIME to the Unix epoch, in nanoseconds.
fn boot_to_unix_ns() -> u64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    now.saturating_sub(boot)
}

/// Where a stopping agent offers its proxy sockets to the next one.
fn handoff_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("proxy-handoff.sock")
}

/// Waits (briefly) until a just-spawned server's socket exists.
async fn wait_for_socket(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serves `GET /metrics` on `addr` with what `render` returns (run on a
/// blocking thread: the agent's renderer takes the daemon's lock).
async fn serve_metrics(what: &'static str, addr: std::net::SocketAddr, render: impl Fn() -> String + Send + Sync + 'static) -> anyhow::Result<()> {
    let render = Arc::new(render);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the {what} metrics server to {addr}"))?;
    info!(%addr, what, "metrics server listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, what, "metrics server");
        }
    });
    Ok(())
}

/// Carries the datapath's lost-event count into Hubble every second.
async fn hubble_lost_events(daemon: Arc<Mutex<Daemon<Loaded>>>, h: Arc<HubbleRuntime>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let d = daemon.clone();
        if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).datapath().lost_events()).await {
            h.set_lost_datapath(n);
        }
    }
}

type HubbleFeed = (Arc<HubbleRuntime>, Arc<FlowMaker>, Arc<Mutex<Daemon<Loaded>>>);

async fn monitor_events(map: aya::maps::Map, tx: broadcast::Sender<Arc<MonitorEvent>>, hubble: Option<HubbleFeed>) {
    let mut reader = match EventReader::new(map) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot read datapath events");
            return;
        }
    };
    let offset = boot_to_unix_ns();
    loop {
        match reader.next_batch().await {
            Ok(batch) => {
                let mut flows = Vec::new();
                if let Some((_, maker, daemon)) = &hubble {
                    maker.refresh(daemon);
                }
                for (ev, capture) in batch {
                    if let Some(m) = MonitorEvent::from_event(&ev, &capture, offset) {
                        if let Some((_, maker, _)) = &hubble {
                            flows.push(Arc::new(maker.flow(&m)));
                        }
                        // no subscriber is fine: events are dropped here, the datapath never waits
                        let _ = tx.send(Arc::new(m));
                    }
                }
                if let Some((h, _, _)) = &hubble {
                    h.ingest(flows);
                }
            }
            Err(e) => {
                error!(error = %e, "reading datapath events");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Expires learned DNS addresses that no tracked connection still uses.
async fn fqdn_gc(daemon: Arc<Mutex<Daemon<Loaded>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let d = daemon.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut g = d.lock().unwrap_or_else(|p| p.into_inner());
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            if !g.fqdn_expired(now) {
                return Ok(0);
            }
            let in_use: std::collections::BTreeSet<std::net::IpAddr> =
                g.datapath().ct_dump().map_err(crate::daemon::DaemonError::from)?.iter().flat_map(|(k, _)| [k.local, k.remote]).collect();
            g.fqdn_gc(now, &in_use)
        })
        .await;
        match res {
            Ok(Ok(n)) if n > 0 => info!(removed = n, "expired DNS addresses removed"),
            Ok(Err(e)) => warn!(error = %e, "FQDN cache GC"),
            _ => {}
        }
    }
}

async fn ct_gc(daemon: Arc<Mutex<Daemon<Loaded>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let d = daemon.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut g = d.lock().unwrap_or_else(|p| p.into_inner());
            g.datapath_mut().ct_gc(sys::monotonic_secs())
        })
        .await;
        match res {
            Ok(Ok(n)) if n > 0 => info!(removed = n, "conntrack garbage collected"),
            Ok(Err(e)) => warn!(error = %e, "conntrack GC"),
            _ => {}
        }
    }
}

/// The directory's files, concatenated in name order, and a fingerprint.
fn read_policy_dir(dir: &Path) -> std::io::Result<(String, Vec<(PathBuf, SystemTime, u64)>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
        .collect();
    files.sort();
    let mut text = String::new();
    let mut stamp = Vec::new();
    for f in files {
        let meta = std::fs::metadata(&f)?;
        stamp.push((f.clone(), meta.modified()?, meta.len()));
        text.push_str(&std::fs::read_to_string(&f)?);
        text.push_str("\n---\n");
    }
    Ok((text, stamp))
}

/// Polls the policy directory and re-imports it as one set when it changes;
/// an invalid set is reported and the previous one stays in force.
async fn watch_policy_dir(daemon: Arc<Mutex<Daemon<Loaded>>>, dir: PathBuf) {
    let source = format!("policy-dir:{}", dir.display());
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (text, stamp) = match read_policy_dir(&dir) {
            Ok(v) => v,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "reading the policy directory");
                continue;
            }
        };
        if last.as_ref() == Some(&stamp) {
            continue;
        }
        last = Some(stamp);
        let d = daemon.clone();
        let src = source.clone();
        let res = tokio::task::spawn_blocking(move || d.lock().unwrap_or_else(|p| p.into_inner()).policy_replace_source(&src, &text)).await;
        match res {
            Ok(Ok(rev)) => info!(dir = %dir.display(), revision = rev, "policy directory imported"),
            Ok(Err(e)) => error!(dir = %dir.display(), error = %e, "policy directory rejected; previous policies stay in force"),
            Err(e) => error!(error = %e, "policy directory import panicked"),
        }
    }
}
