//! Reading policy documents from YAML or JSON text, with errors that name the
//! document, the field and the offending value.

use serde::de::DeserializeOwned;

use crate::api::{CidrGroup, CiliumPolicy, NetworkPolicy, PolicyDocument};
use crate::rule::{Rule, translate};

/// A policy document that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{document}: {field}: {message}{}", value_suffix(.value))]
pub struct PolicyError {
    /// Which document: source name, position, kind and name when known.
    pub document: String,
    /// Path of the field (`spec.ingress[0].toPorts[0].ports[0].protocol`).
    pub field: String,
    /// The offending value as written, when there is one.
    pub value: String,
    pub message: String,
}

fn value_suffix(v: &str) -> String {
    if v.is_empty() { String::new() } else { format!(" (got {v:?})") }
}

impl PolicyError {
    pub fn new(document: &str, field: &str, value: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            document: document.to_string(),
            field: field.to_string(),
            value: value.into(),
            message: message.into(),
        }
    }
}

/// Splits YAML (or JSON) text into documents, skipping empty ones and
/// expanding `kind: List`. `source` names the text in errors.
pub fn split_documents(text: &str, source: &str) -> Result<Vec<(String, serde_yaml::Value)>, PolicyError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let name = format!("{source} document {}", i + 1);
        let value = serde::Deserialize::deserialize(de)
            .map_err(|e| PolicyError::new(&name, "(document)", "", format!("invalid YAML: {e}")))?;
        let value: serde_yaml::Value = value;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                out.push((format!("{name} item {}", j + 1), item));
            }
            continue;
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Describes a document for error messages: `source document 2 (CiliumNetworkPolicy "x")`.
pub fn describe(name: &str, value: &serde_yaml::Value) -> String {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    match value.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()) {
        Some(n) => format!("{name} ({kind} {n:?})"),
        None => format!("{name} ({kind})"),
    }
}

fn typed<T: DeserializeOwned>(doc: &str, value: serde_yaml::Value) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_yaml appends " at line ..": positions refer to the re-serialised
        // value, not the user's file, so drop them.
        let message = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        PolicyError::new(doc, if field == "." { "(document)" } else { &field }, "", message)
    })
}

/// True for the kinds this crate handles.
pub fn is_policy_kind(kind: &str) -> bool {
    matches!(kind, "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" | "NetworkPolicy" | "CiliumCIDRGroup")
}

/// Parses one document value into a policy and checks it completely, by
/// translating it into rules. The returned rules are what the document means.
pub fn parse_value(name: &str, value: serde_yaml::Value) -> Result<(PolicyDocument, Vec<Rule>), PolicyError> {
    let doc_name = describe(name, &value);
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let doc = match kind.as_str() {
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            if api_version != "cilium.io/v2" {
                return Err(PolicyError::new(&doc_name, "apiVersion", api_version, "must be cilium.io/v2"));
            }
            PolicyDocument::Cilium(typed::<CiliumPolicy>(&doc_name, value)?)
        }
        "NetworkPolicy" => {
            if api_version != "networking.k8s.io/v1" {
                return Err(PolicyError::new(
                    &doc_name,
                    "apiVersion",
                    api_version,
                    "must be networking.k8s.io/v1",
                ));
            }
            PolicyDocument::Kubernetes(typed::<NetworkPolicy>(&doc_name, value)?)
        }
        "CiliumCIDRGroup" => {
            if !matches!(api_version.as_str(), "cilium.io/v2alpha1" | "cilium.io/v2") {
                return Err(PolicyError::new(&doc_name, "apiVersion", api_version, "must be cilium.io/v2alpha1 or cilium.io/v2"));
            }
            PolicyDocument::CidrGroup(typed::<CidrGroup>(&doc_name, value)?)
        }
        "" => return Err(PolicyError::new(&doc_name, "kind", "", "missing")),
        other => {
            return Err(PolicyError::new(
                &doc_name,
                "kind",
                other,
                "not a policy kind (want CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy or CiliumCIDRGroup)",
            ));
        }
    };
    if doc.metadata().name.is_empty() {
        return Err(PolicyError::new(&doc_name, "metadata.name", "", "missing"));
    }
    let rules = translate(&doc, &doc_name)?;
    Ok((doc, rules))
}

/// Parses every document of a policy text. All or nothing: the first invalid
/// document fails the whole text.
pub fn parse_policies(text: &str, source: &str) -> Result<Vec<(PolicyDocument, Vec<Rule>)>, PolicyError> {
    split_documents(text, source)?
        .into_iter()
        .map(|(name, value)| parse_value(&name, value))
        .collect()
}
