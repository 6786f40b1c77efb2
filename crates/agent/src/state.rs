//! The agent's persisted state: everything a restart needs to rebuild its
//! view without touching traffic. Written atomically (temporary file, fsync,
//! rename) after every change and before the change is acknowledged.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use cilium_api::{NamespaceMeta, PodMeta};
use cilium_ipam::Ipam;
use cilium_labels::LabelSet;
use serde::{Deserialize, Serialize};

/// One endpoint as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: u16,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ipv4: Ipv4Addr,
    #[serde(default)]
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub mac: String,
    pub host_mac: String,
    pub namespace: String,
    pub pod_name: String,
    pub labels: LabelSet,
    pub identity: u32,
}

/// Everything the agent keeps on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub ipam: Ipam,
    /// IPv6 pod addresses (with --enable-ipv6).
    #[serde(default)]
    pub ipam6: Option<cilium_ipam::Ipam6>,
    pub endpoints: BTreeMap<u16, EndpointRecord>,
    /// Allocated identities and their labels (reference counts are derived
    /// from the endpoints on restore).
    pub identities: BTreeMap<u32, LabelSet>,
    /// Imported policy documents, as JSON, with the source they came from.
    pub policies: Vec<(String, serde_json::Value)>,
    pub pods: BTreeMap<String, PodMeta>,
    pub namespaces: BTreeMap<String, NamespaceMeta>,
    pub next_endpoint_id: u16,
    /// Addresses the DNS proxy learned: name -> address -> expiry (Unix
    /// seconds). Kept so `toFQDNs` rules allow the same after a restart.
    #[serde(default)]
    pub fqdn: BTreeMap<String, BTreeMap<std::net::IpAddr, u64>>,
    /// The other nodes of the cluster, by name.
    #[serde(default)]
    pub nodes: BTreeMap<String, cilium_api::NodeMeta>,
    /// The last view of the kvstore (kvstore mode), kept for a restart
    /// while it is unreachable.
    #[serde(default)]
    pub kvstore: Option<crate::daemon::cluster::KvView>,
}

/// Services, kept in a file of their own and written behind the change
/// (see `Daemon::services_snapshot`): the service maps outlive the agent and
/// Kubernetes re-lists Services after a restart, so a lost last write costs
/// nothing, while writing the whole table before acknowledging each change
/// would cost milliseconds at 10,000 services.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub version: u32,
    /// Services with their IDs and backend IDs.
    pub services: cilium_lb::ServiceTable,
    /// Kubernetes Services as received, by `namespace/name`.
    pub k8s_services: BTreeMap<String, cilium_api::K8sService>,
}

pub const STATE_VERSION: u32 = 1;

/// Reading or writing the state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid agent state ({detail}); move it away to start fresh")]
    Corrupt { path: String, detail: String },
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore { dir: dir.to_path_buf() }
    }

    /// The saved state, or `None` on first start.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        let state: Option<State> = self.read("state.json")?;
        if let Some(s) = &state {
            self.check_version("state.json", s.version)?;
        }
        Ok(state)
    }

    /// Saves atomically: a crash leaves the old or the new state, never a mix.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.write("state.json", state)
    }

    /// The saved services, or `None` if there are none yet.
    pub fn load_services(&self) -> Result<Option<ServiceState>, StateError> {
        let state: Option<ServiceState> = self.read("services.json")?;
        if let Some(s) = &state {
            self.check_version("services.json", s.version)?;
        }
        Ok(state)
    }

    pub fn save_services(&self, state: &ServiceState) -> Result<(), StateError> {
        self.write("services.json", state)
    }

    fn check_version(&self, name: &str, version: u32) -> Result<(), StateError> {
        if version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path: self.dir.join(name).display().to_string(),
                detail: format!("version {version} (this agent reads {STATE_VERSION})"),
            });
        }
        Ok(())
    }

    fn read<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path: path.display().to_string(), source }),
        };
        serde_json::from_slice(&text).map(Some).map_err(|e| StateError::Corrupt { path: path.display().to_string(), detail: e.to_string() })
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let io = |path: &Path| {
            let p = path.display().to_string();
            move |source| StateError::Io { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let file = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let data = serde_json::to_vec(value).expect("state serializes");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&data).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &file).map_err(io(&file))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}
