//! The CNI plugin's pure half: reading the network configuration and the
//! `CNI_*` environment, naming interfaces, and writing spec-conformant results
//! and errors. No IO here (fuzzed); `main.rs` does the wiring.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes of the CNI specification.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
}

/// A CNI error: code, message, details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The error as the spec wants it on stdout.
    pub fn to_json(&self, version: &str) -> String {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}

/// The network configuration on stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's socket (default: /var/run/cilium/cilium.sock).
    #[serde(default, rename = "socket-path")]
    pub socket_path: Option<String>,
    /// Overrides the agent's MTU for the pod interface.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// CNI 1.1 GC: attachments that must survive.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Everything else (prevResult, runtimeConfig, ...) is accepted.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Parses and checks the network configuration.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, "failed to decode network configuration", e.to_string()))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {:?}", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(code::INVALID_NETWORK_CONFIG, "network configuration has no name", "field: name"));
    }
    if let Some(m) = conf.mtu {
        if !(576..=65535).contains(&m) {
            return Err(CniError::new(code::INVALID_NETWORK_CONFIG, format!("mtu {m} out of range"), "field: mtu (576-65535)"));
        }
    }
    Ok(conf)
}

/// The CNI command and its parameters from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    pub fn pod_namespace(&self) -> &str {
        self.args.get("K8S_POD_NAMESPACE").map(String::as_str).unwrap_or("default")
    }

    /// The pod's name, falling back to the container ID for non-Kubernetes runtimes.
    pub fn pod_name(&self) -> &str {
        self.args.get("K8S_POD_NAME").map(String::as_str).unwrap_or(&self.container_id)
    }

    /// The IPAM owner key of this attachment.
    pub fn owner(&self) -> String {
        format!("{}/{}", self.container_id, self.ifname)
    }
}

/// Reads `CNI_*` variables through `get`. Which ones are required depends on
/// the command, as the spec says.
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let command = get("CNI_COMMAND").ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", ""))?;
    let needs = match command.as_str() {
        "ADD" | "CHECK" => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"][..],
        "DEL" => &["CNI_CONTAINERID", "CNI_IFNAME"][..],
        "VERSION" | "GC" | "STATUS" => &[][..],
        other => return Err(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"), "want ADD, DEL, CHECK, VERSION, GC or STATUS")),
    };
    for var in needs {
        if get(var).is_none_or(|v| v.is_empty()) {
            return Err(CniError::new(code::INVALID_ENV, format!("{var} is not set"), format!("required for {command}")));
        }
    }
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    if ifname.len() > 15 || ifname.contains('/') || ifname.contains(char::is_whitespace) {
        return Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {ifname:?} is not a valid interface name"), ""));
    }
    let mut args = BTreeMap::new();
    if let Some(a) = get("CNI_ARGS") {
        for kv in a.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("CNI_ARGS item {kv:?} is not KEY=VALUE"), ""))?;
            args.insert(k.to_string(), v.to_string());
        }
    }
    Ok(Invocation {
        command,
        container_id: get("CNI_CONTAINERID").unwrap_or_default(),
        netns: get("CNI_NETNS").unwrap_or_default(),
        ifname,
        args,
    })
}

/// The host-side interface name for an attachment: `lxc` and 12 hex digits
/// of a hash of container ID and interface, so it is stable across retries.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lxc{:012x}", h & 0xffff_ffff_ffff)
}

/// The ADD result, in the configuration's CNI version: the IPv4 address,
/// and the IPv6 one (with its gateway) when the pod has one.
pub fn add_result(
    version: &str,
    host: (&str, &str),
    pod: (&str, &str, &str),
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    ip6: Option<(Ipv6Addr, Ipv6Addr)>,
) -> Value {
    let (host_name, host_mac) = host;
    let (pod_name, pod_mac, sandbox) = pod;
    let one = |address: String, gateway: String, family: &str| {
        let mut ipc = json!({"address": address, "gateway": gateway, "interface": 1});
        if version.starts_with("0.3") {
            ipc["version"] = json!(family);
        }
        ipc
    };
    let mut ips = vec![one(format!("{ip}/32"), gateway.to_string(), "4")];
    let mut routes = vec![json!({"dst": "0.0.0.0/0", "gw": gateway.to_string()})];
    if let Some((ip6, gw6)) = ip6 {
        ips.push(one(format!("{ip6}/128"), gw6.to_string(), "6"));
        routes.push(json!({"dst": "::/0", "gw": gw6.to_string()}));
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": host_name, "mac": host_mac},
            {"name": pod_name, "mac": pod_mac, "sandbox": sandbox}
        ],
        "ips": ips,
        "routes": routes,
        "dns": {}
    })
}

/// The VERSION result.
pub fn version_result(version: &str) -> Value {
    json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn netconf_accepts_extra_fields() {
        let c = parse_netconf(br#"{"cniVersion":"1.0.0","name":"cilium","type":"cilium-cni","socket-path":"/tmp/x.sock","prevResult":{},"runtimeConfig":{"portMappings":[]}}"#).unwrap();
        assert_eq!(c.socket_path.as_deref(), Some("/tmp/x.sock"));
        assert!(c.other.contains_key("prevResult"));
    }

    #[test]
    fn netconf_errors_use_spec_codes() {
        assert_eq!(parse_netconf(b"{").unwrap_err().code, code::DECODE_FAILURE);
        assert_eq!(parse_netconf(br#"{"cniVersion":"9.9.9","name":"x","type":"cilium-cni"}"#).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        assert_eq!(parse_netconf(br#"{"cniVersion":"1.0.0","name":"","type":"cilium-cni"}"#).unwrap_err().code, code::INVALID_NETWORK_CONFIG);
        assert_eq!(parse_netconf(br#"{"cniVersion":"1.0.0","name":"x","type":"cilium-cni","mtu":10}"#).unwrap_err().code, code::INVALID_NETWORK_CONFIG);
    }

    #[test]
    fn env_parsing() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-1"),
        ];
        let inv = parse_env(env(&vars)).unwrap();
        assert_eq!(inv.pod_namespace(), "prod");
        assert_eq!(inv.pod_name(), "web-1");
        assert_eq!(inv.owner(), "abc/eth0");
        let e = parse_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"));
        // DEL needs no netns
        assert!(parse_env(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")])).is_ok());
        assert_eq!(parse_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err().code, code::INVALID_ENV);
        let bad = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "novalue")];
        assert_eq!(parse_env(env(&bad)).unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn host_names_are_stable_and_short() {
        let a = host_ifname("container-1", "eth0");
        assert_eq!(a, host_ifname("container-1", "eth0"));
        assert_ne!(a, host_ifname("container-2", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("lxc"));
    }

    #[test]
    fn result_shape() {
        let r = add_result("1.0.0", ("lxc1", "aa"), ("eth0", "bb", "/var/run/netns/x"), Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 1), None);
        assert_eq!(r["ips"][0]["address"], "10.0.1.2/32");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["interfaces"][1]["sandbox"], "/var/run/netns/x");
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["ips"].as_array().unwrap().len(), 1);
        let old = add_result("0.3.1", ("lxc1", "aa"), ("eth0", "bb", "x"), Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 1), None);
        assert_eq!(old["ips"][0]["version"], "4");
        let dual = add_result(
            "0.3.1",
            ("lxc1", "aa"),
            ("eth0", "bb", "x"),
            Ipv4Addr::new(10, 0, 1, 2),
            Ipv4Addr::new(10, 0, 1, 1),
            Some(("fd00:10:1::2".parse().unwrap(), "fd00:10:1::1".parse().unwrap())),
        );
        assert_eq!(dual["ips"][1]["address"], "fd00:10:1::2/128");
        assert_eq!(dual["ips"][1]["version"], "6");
        assert_eq!(dual["routes"][1]["dst"], "::/0");
    }
}
