//! cilium-agent: parse and validate the configuration, set up logging, run.

/// jemalloc: the proxy and Hubble allocate and free small objects (flows,
/// DNS messages, request buffers) at a high rate across threads, where
/// glibc's malloc spent about a third of the DNS proxy's CPU time (see
/// BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Two arenas (the agent runs on two worker threads), and freed memory goes
/// back to the system within a second (a background thread purges), so the
/// resident size follows what is in use.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 70] = b"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() {
    if std::env::args().nth(1).as_deref() == Some("proxy-handoff-holder") {
        // the process that keeps the L7 proxy's sockets between two agents
        if let Err(e) = cilium_agent::handoff::hold() {
            eprintln!("cilium-agent proxy-handoff-holder: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let settings = match cilium_agent::config::load(std::env::args().collect()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cilium-agent: {e}");
            std::process::exit(cilium_agent::config::EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::new(settings.log_level.as_str().to_lowercase());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if settings.json_logs {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(cilium_agent::run::run(settings)) {
        tracing::error!(error = format!("{e:#}"), "agent failed");
        std::process::exit(1);
    }
}
