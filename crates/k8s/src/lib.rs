//! The Kubernetes objects the system reads besides policies: Node, Namespace, Pod,
//! Deployment and Service, with only the fields that matter here.
//!
//! Pure parsing: a multi-document manifest becomes a list of typed objects,
//! policies included (parsed and validated by `cilium-policy`). Errors name
//! the document, the field and the value. No IO.

use std::collections::BTreeMap;

use cilium_policy::api::{LabelSelector, ObjectMeta};
use cilium_policy::parse::{describe, parse_value, split_documents};
use cilium_policy::{PolicyDocument, PolicyError, Rule};
use serde::{Deserialize, Serialize};

pub use cilium_policy::PolicyError as ManifestError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_string()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default)]
    pub template: PodTemplate,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub metadata: ObjectMeta,
    pub spec: DeploymentSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<cilium_policy::api::IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    #[serde(default, rename = "externalIPs", skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(default, rename = "clientIP", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// A load balancer's status: the ingress IPs assigned to the service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default)]
    pub load_balancer: LoadBalancerStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<LoadBalancerIngress>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
    #[serde(default)]
    pub status: ServiceStatus,
}

/// A Node: only its name and labels matter here (in the lab, nodes are
/// made by `cilium lab up`; applying a Node sets its labels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub metadata: ObjectMeta,
}

/// One object of a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Node(Node),
    Namespace(Namespace),
    Pod(Pod),
    Deployment(Deployment),
    Service(Service),
    Policy(PolicyDocument, Vec<Rule>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Node(_) => "Node",
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::Policy(d, _) => d.kind().as_str(),
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Node(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Policy(d, _) => d.metadata(),
        }
    }

    /// `kind/namespace/name` (or `kind/name` for cluster-scoped objects).
    pub fn id(&self) -> String {
        let m = self.metadata();
        match self {
            Object::Namespace(_) => format!("Namespace/{}", m.name),
            Object::Node(_) => format!("Node/{}", m.name),
            Object::Policy(d, _) => d.key().to_string(),
            _ => format!("{}/{}/{}", self.kind(), m.namespace.as_deref().unwrap_or("default"), m.name),
        }
    }
}

fn typed<T: serde::de::DeserializeOwned>(doc: &str, value: serde_yaml::Value) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        let message = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        PolicyError::new(doc, if field == "." { "(document)" } else { &field }, "", message)
    })
}

fn check_name(doc: &str, field: &str, name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok { Ok(()) } else { Err(PolicyError::new(doc, field, name, "not a valid Kubernetes name (lowercase letters, digits, '-')")) }
}

fn check_ports(doc: &str, field: &str, spec: &PodSpec) -> Result<(), PolicyError> {
    for (i, c) in spec.containers.iter().enumerate() {
        for (j, p) in c.ports.iter().enumerate() {
            let f = format!("{field}.containers[{i}].ports[{j}]");
            if p.container_port == 0 {
                return Err(PolicyError::new(doc, &format!("{f}.containerPort"), "0", "must be 1-65535"));
            }
            if !matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                return Err(PolicyError::new(doc, &format!("{f}.protocol"), p.protocol.clone(), "want TCP, UDP or SCTP"));
            }
        }
    }
    Ok(())
}

/// The checks the API server makes on a Service that matter here.
fn check_service(doc: &str, spec: &ServiceSpec) -> Result<(), PolicyError> {
    let ty = spec.service_type.as_deref().unwrap_or("ClusterIP");
    if !matches!(ty, "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
        return Err(PolicyError::new(doc, "spec.type", ty, "want ClusterIP, NodePort, LoadBalancer or ExternalName"));
    }
    if let Some(ip) = &spec.cluster_ip {
        if ip != "None" && ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(PolicyError::new(doc, "spec.clusterIP", ip.clone(), "want an IPv4 address or None"));
        }
        if ip == "None" && ty != "ClusterIP" {
            return Err(PolicyError::new(doc, "spec.clusterIP", ip.clone(), "a headless service must be of type ClusterIP"));
        }
    }
    for (i, ip) in spec.external_ips.iter().enumerate() {
        if ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(PolicyError::new(doc, &format!("spec.externalIPs[{i}]"), ip.clone(), "want an IPv4 address"));
        }
    }
    for (i, r) in spec.load_balancer_source_ranges.iter().enumerate() {
        if r.parse::<ipnet::Ipv4Net>().is_err() {
            return Err(PolicyError::new(doc, &format!("spec.loadBalancerSourceRanges[{i}]"), r.clone(), "want an IPv4 CIDR"));
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None") | Some("ClientIP") => {}
        Some(other) => return Err(PolicyError::new(doc, "spec.sessionAffinity", other, "want ClientIP or None")),
    }
    if let Some(t) = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds) {
        if !(1..=86_400).contains(&t) {
            return Err(PolicyError::new(doc, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", t.to_string(), "must be 1-86400"));
        }
    }
    for (name, field) in [(&spec.external_traffic_policy, "externalTrafficPolicy"), (&spec.internal_traffic_policy, "internalTrafficPolicy")] {
        if let Some(v) = name {
            if !matches!(v.as_str(), "Cluster" | "Local") {
                return Err(PolicyError::new(doc, &format!("spec.{field}"), v.clone(), "want Cluster or Local"));
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        if !matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(PolicyError::new(doc, &format!("{f}.protocol"), p.protocol.clone(), "want TCP, UDP or SCTP"));
        }
        if p.port == 0 {
            return Err(PolicyError::new(doc, &format!("{f}.port"), "0", "must be 1-65535"));
        }
        if let Some(np) = p.node_port {
            if !(30000..=32767).contains(&np) {
                return Err(PolicyError::new(doc, &format!("{f}.nodePort"), np.to_string(), "must be in the node port range 30000-32767"));
            }
        }
        match &p.target_port {
            Some(cilium_policy::api::IntOrString::Int(n)) if !(1..=65535).contains(n) => {
                return Err(PolicyError::new(doc, &format!("{f}.targetPort"), n.to_string(), "must be 1-65535 or a port name"));
            }
            Some(cilium_policy::api::IntOrString::String(s)) if s.is_empty() => {
                return Err(PolicyError::new(doc, &format!("{f}.targetPort"), "", "must be 1-65535 or a port name"));
            }
            _ => {}
        }
        if spec.ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() {
            return Err(PolicyError::new(doc, &format!("{f}.name"), "", "required when a service has several ports"));
        }
        if !seen.insert((p.port, p.protocol.clone())) {
            return Err(PolicyError::new(doc, &format!("{f}.port"), p.port.to_string(), "duplicate port and protocol"));
        }
    }
    Ok(())
}

/// Parses a manifest text. All or nothing: one bad document fails the text.
pub fn parse_manifest(text: &str, source: &str) -> Result<Vec<Object>, PolicyError> {
    let mut out = Vec::new();
    for (name, value) in split_documents(text, source)? {
        let doc = describe(&name, &value);
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let obj = match kind.as_str() {
            "Namespace" => Object::Namespace(typed(&doc, value)?),
            "Node" => Object::Node(typed(&doc, value)?),
            "Pod" => {
                let p: Pod = typed(&doc, value)?;
                check_ports(&doc, "spec", &p.spec)?;
                Object::Pod(p)
            }
            "Deployment" => {
                let d: Deployment = typed(&doc, value)?;
                check_ports(&doc, "spec.template.spec", &d.spec.template.spec)?;
                let sel = &d.spec.selector.match_labels;
                let tl = &d.spec.template.metadata.labels;
                if let Some((k, v)) = sel.iter().find(|(k, v)| tl.get(*k) != Some(*v)) {
                    return Err(PolicyError::new(
                        &doc,
                        &format!("spec.selector.matchLabels.{k}"),
                        v.clone(),
                        "does not match spec.template.metadata.labels",
                    ));
                }
                Object::Deployment(d)
            }
            "Service" => {
                let svc: Service = typed(&doc, value)?;
                check_service(&doc, &svc.spec)?;
                Object::Service(svc)
            }
            k if cilium_policy::parse::is_policy_kind(k) => {
                let (d, r) = parse_value(&name, value)?;
                Object::Policy(d, r)
            }
            "" => return Err(PolicyError::new(&doc, "kind", "", "missing")),
            other => {
                return Err(PolicyError::new(
                    &doc,
                    "kind",
                    other,
                    "unsupported kind (want Node, Namespace, Pod, Deployment, Service, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy or CiliumCIDRGroup)",
                ));
            }
        };
        check_name(&doc, "metadata.name", &obj.metadata().name)?;
        if let Some(ns) = &obj.metadata().namespace {
            check_name(&doc, "metadata.namespace", ns)?;
        }
        if !matches!(obj, Object::Policy(..)) {
            for (k, v) in &obj.metadata().labels {
                cilium_labels::check_k8s_label(k, v).map_err(|m| PolicyError::new(&doc, &format!("metadata.labels.{k}"), v.clone(), m))?;
            }
        }
        out.push(obj);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_001_deployment() {
        let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: backend
spec:
  replicas: 1
  selector:
    matchLabels:
      app: backend
  template:
    metadata:
      labels:
        app: backend
    spec:
      containers:
      - name: httpd
        image: httpd:latest
        ports:
        - containerPort: 8080
"#;
        let objs = parse_manifest(text, "backend.yaml").unwrap();
        let Object::Deployment(d) = &objs[0] else { panic!() };
        assert_eq!(d.spec.replicas, 1);
        assert_eq!(d.spec.template.spec.containers[0].ports[0].container_port, 8080);
        assert_eq!(d.spec.template.spec.containers[0].ports[0].protocol, "TCP");
        assert_eq!(objs[0].id(), "Deployment/default/backend");
    }

    #[test]
    fn bad_documents_are_named() {
        let e = parse_manifest("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "m.yaml").unwrap_err();
        assert_eq!((e.field.as_str(), e.value.as_str()), ("kind", "ConfigMap"));
        let e = parse_manifest(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, ports: [{containerPort: 80, protocol: TPC}]}]}\n",
            "m.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].ports[0].protocol");
        let e = parse_manifest("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n", "m.yaml").unwrap_err();
        assert_eq!((e.field.as_str(), e.value.as_str()), ("metadata.name", "Bad_Name"));
        let e = parse_manifest(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {selector: {matchLabels: {app: a}}, template: {metadata: {labels: {app: b}}}}\n",
            "m.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.selector.matchLabels.app");
    }

    #[test]
    fn services_are_checked_like_the_api_server() {
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  selector: {app: web}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports:\n  - {name: http, port: 80, targetPort: http, nodePort: 30080}\n  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n";
        let objs = parse_manifest(ok, "s.yaml").unwrap();
        let Object::Service(s) = &objs[0] else { panic!() };
        assert_eq!(s.spec.ports[0].target_port, Some(cilium_policy::api::IntOrString::String("http".into())));
        assert_eq!(s.spec.session_affinity_config.as_ref().unwrap().client_ip.as_ref().unwrap().timeout_seconds, Some(60));
        for (bad, field, value) in [
            ("spec: {type: Magic, ports: [{port: 80}]}", "spec.type", "Magic"),
            ("spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}", "spec.clusterIP", "10.96.0.300"),
            ("spec: {ports: [{port: 80, protocol: ICMP}]}", "spec.ports[0].protocol", "ICMP"),
            ("spec: {type: NodePort, ports: [{port: 80, nodePort: 80}]}", "spec.ports[0].nodePort", "80"),
            ("spec: {ports: [{port: 80, targetPort: 70000}]}", "spec.ports[0].targetPort", "70000"),
            ("spec: {ports: [{name: a, port: 80}, {port: 81}]}", "spec.ports[1].name", ""),
            ("spec: {ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1].port", "80"),
            ("spec: {sessionAffinity: Sticky, ports: [{port: 80}]}", "spec.sessionAffinity", "Sticky"),
            ("spec: {externalIPs: [nope], ports: [{port: 80}]}", "spec.externalIPs[0]", "nope"),
            ("spec: {externalTrafficPolicy: Nearby, ports: [{port: 80}]}", "spec.externalTrafficPolicy", "Nearby"),
        ] {
            let text = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n{bad}\n");
            let e = parse_manifest(&text, "s.yaml").unwrap_err();
            assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{bad}");
        }
    }
}
