//! The operator's commands: `cilium` (agent commands, the lab) and
//! `cilium-health` share this library.

pub mod agent_cmds;
pub mod lab_cmds;

use std::path::PathBuf;

/// The agent-socket flag both binaries take.
#[derive(clap::Args, Debug, Clone)]
pub struct HostArg {
    /// Agent socket (`unix:///path` or a path). Default: $CILIUM_SOCK, then
    /// /var/run/cilium/cilium.sock, then the default lab's node.
    #[arg(short = 'H', long = "host", global = true)]
    pub host: Option<String>,
}

impl HostArg {
    pub fn socket(&self) -> PathBuf {
        resolve_socket(self.host.as_deref())
    }
}

/// Where the agent's socket is.
pub fn resolve_socket(host: Option<&str>) -> PathBuf {
    if let Some(h) = host {
        return PathBuf::from(h.strip_prefix("unix://").unwrap_or(h));
    }
    if let Ok(s) = std::env::var("CILIUM_SOCK") {
        return PathBuf::from(s.strip_prefix("unix://").unwrap_or(&s));
    }
    let default = PathBuf::from(cilium_api::DEFAULT_SOCKET);
    if default.exists() {
        return default;
    }
    let lab = std::path::Path::new(cilium_lab::LAB_ROOT).join(lab_cmds::default_lab_name()).join("node1").join("cilium.sock");
    if lab.exists() {
        return lab;
    }
    default
}

