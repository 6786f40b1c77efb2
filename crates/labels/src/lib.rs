//! Security labels, label sets and label selectors.
//!
//! A label is `source:key=value` (`k8s:app=web`, `reserved:host`). Identities
//! are allocated for sets of labels, and policies select identities with
//! selectors. This crate is pure data and matching; it knows nothing about
//! identities' numbers, policies or the kernel.

use std::collections::BTreeMap;
use std::fmt;

mod filter;
pub use filter::{is_security_relevant, k8s_pod_labels};

/// Label source for Kubernetes labels.
pub const SOURCE_K8S: &str = "k8s";
/// Label source for Cilium's reserved labels.
pub const SOURCE_RESERVED: &str = "reserved";
/// Selector source that matches a label of any source.
pub const SOURCE_ANY: &str = "any";
/// Label source of CIDR identities.
pub const SOURCE_CIDR: &str = "cidr";
/// Label source of a node's labels (other nodes' identities).
pub const SOURCE_NODE: &str = "node";
/// Label source for labels given without a source.
pub const SOURCE_UNSPEC: &str = "unspec";

/// Label key of a pod's namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels that carry a pod's namespace's labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Label key of a pod's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Label key of the cluster a pod belongs to.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// A single label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Label {
        Label { source: source.to_string(), key: key.to_string(), value: value.to_string() }
    }

    /// `k8s:key=value`
    pub fn k8s(key: &str, value: &str) -> Label {
        Label::new(SOURCE_K8S, key, value)
    }

    /// `reserved:name`
    pub fn reserved(name: &str) -> Label {
        Label::new(SOURCE_RESERVED, name, "")
    }

    /// Parses `source:key=value`, `source:key`, or `key=value` (source unspec).
    pub fn parse(s: &str) -> Label {
        let (source, rest) = split_source(s);
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, v),
            None => (rest, ""),
        };
        Label::new(source.unwrap_or(SOURCE_UNSPEC), key, value)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// A Kubernetes label: an optional DNS-subdomain prefix and a name of at
/// most 63 characters; the value at most 63 characters of the same kind.
pub fn check_k8s_label(key: &str, value: &str) -> Result<(), String> {
    let name_ok = |s: &str| {
        s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let prefix_ok = |p: &str| !p.is_empty() && p.len() <= 253 && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    if name.is_empty() || !name_ok(name) || prefix.is_some_and(|p| !prefix_ok(p)) {
        return Err("not a label key (an optional DNS prefix and '/', then at most 63 of [A-Za-z0-9-_.])".into());
    }
    if !name_ok(value) {
        return Err("not a label value (at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric)".into());
    }
    Ok(())
}

/// Splits a leading `source:` off a key. CIDR keys contain ':' only in IPv6,
/// and only after a known source, so the first ':' decides.
pub fn split_source(s: &str) -> (Option<&str>, &str) {
    match s.split_once(':') {
        Some((src, rest)) if !src.is_empty() && !src.contains('=') && !src.contains('/') => {
            (Some(src), rest)
        }
        _ => (None, s),
    }
}

/// A set of labels, at most one per key, ordered.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet {
    labels: BTreeMap<String, Label>,
}

impl LabelSet {
    pub fn new() -> LabelSet {
        LabelSet::default()
    }

    /// Adds a label, replacing any with the same key.
    pub fn insert(&mut self, label: Label) {
        self.labels.insert(label.key.clone(), label);
    }

    pub fn get(&self, key: &str) -> Option<&Label> {
        self.labels.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.labels.values()
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// True when the set carries `reserved:<name>`.
    pub fn has_reserved(&self, name: &str) -> bool {
        self.labels.get(name).is_some_and(|l| l.source == SOURCE_RESERVED)
    }

    /// Parses labels written as `source:key=value`, one per item.
    pub fn parse_all<'a>(items: impl IntoIterator<Item = &'a str>) -> LabelSet {
        items.into_iter().map(Label::parse).collect()
    }

    /// The labels as strings, sorted.
    pub fn to_strings(&self) -> Vec<String> {
        self.labels.values().map(|l| l.to_string()).collect()
    }
}

impl FromIterator<Label> for LabelSet {
    fn from_iter<T: IntoIterator<Item = Label>>(iter: T) -> Self {
        let mut s = LabelSet::new();
        for l in iter {
            s.insert(l);
        }
        s
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<String> = self.to_strings();
        f.write_str(&v.join(" "))
    }
}

impl serde::Serialize for LabelSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.to_strings())
    }
}

impl<'de> serde::Deserialize<'de> for LabelSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        Ok(LabelSet::parse_all(v.iter().map(String::as_str)))
    }
}

/// Operator of a selector requirement.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Operator {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// One requirement of a selector on one label key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Requirement {
    /// `any` matches labels of every source.
    pub source: String,
    pub key: String,
    pub op: Operator,
}

impl Requirement {
    fn label<'a>(&self, labels: &'a LabelSet) -> Option<&'a Label> {
        labels
            .get(&self.key)
            .filter(|l| self.source == SOURCE_ANY || l.source == self.source)
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        let found = self.label(labels);
        match &self.op {
            Operator::In(values) => found.is_some_and(|l| values.iter().any(|v| *v == l.value)),
            Operator::NotIn(values) => found.is_none_or(|l| !values.iter().any(|v| *v == l.value)),
            Operator::Exists => found.is_some(),
            Operator::DoesNotExist => found.is_none(),
        }
    }
}

/// A label selector: every requirement must match. The empty selector
/// matches every label set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// Why a selector is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown operator {operator:?} (want In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator { operator: String },
    #[error("operator {operator} needs at least one value")]
    MissingValues { operator: String },
    #[error("operator {operator} takes no values, got {values:?}")]
    UnexpectedValues { operator: String, values: Vec<String> },
    #[error("empty label key")]
    EmptyKey,
}

impl Selector {
    /// The selector that matches everything.
    pub fn wildcard() -> Selector {
        Selector::default()
    }

    pub fn is_wildcard(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Builds a selector from matchLabels and matchExpressions. Keys without a
    /// source get `default_source` (`any` for Cilium policies, `k8s` for
    /// Kubernetes NetworkPolicy).
    pub fn from_parts<'a>(
        match_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        match_expressions: impl IntoIterator<Item = (&'a str, &'a str, &'a [String])>,
        default_source: &str,
    ) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in match_labels {
            let (source, key) = split_source(k);
            if key.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            requirements.push(Requirement {
                source: source.unwrap_or(default_source).to_string(),
                key: key.to_string(),
                op: Operator::In(vec![v.to_string()]),
            });
        }
        for (k, operator, values) in match_expressions {
            let (source, key) = split_source(k);
            if key.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            let op = match operator {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        return Err(SelectorError::MissingValues { operator: operator.to_string() });
                    }
                    if operator == "In" {
                        Operator::In(values.to_vec())
                    } else {
                        Operator::NotIn(values.to_vec())
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err(SelectorError::UnexpectedValues {
                            operator: operator.to_string(),
                            values: values.to_vec(),
                        });
                    }
                    if operator == "Exists" { Operator::Exists } else { Operator::DoesNotExist }
                }
                other => return Err(SelectorError::UnknownOperator { operator: other.to_string() }),
            };
            requirements.push(Requirement {
                source: source.unwrap_or(default_source).to_string(),
                key: key.to_string(),
                op,
            });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }

    /// A selector for exactly one label (`reserved:host`, `k8s:app=web`).
    pub fn for_label(label: &Label) -> Selector {
        Selector {
            requirements: vec![Requirement {
                source: label.source.clone(),
                key: label.key.clone(),
                op: Operator::In(vec![label.value.clone()]),
            }],
        }
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True when some requirement constrains the given key (any source).
    pub fn has_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key == key)
    }

    /// Adds a requirement (keeps the requirements sorted).
    pub fn with(mut self, requirement: Requirement) -> Selector {
        self.requirements.push(requirement);
        self.requirements.sort();
        self.requirements.dedup();
        self
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| {
                let k = format!("{}:{}", r.source, r.key);
                match &r.op {
                    Operator::In(v) if v.len() == 1 => format!("{k}={}", v[0]),
                    Operator::In(v) => format!("{k} in ({})", v.join(",")),
                    Operator::NotIn(v) => format!("{k} notin ({})", v.join(",")),
                    Operator::Exists => k,
                    Operator::DoesNotExist => format!("!{k}"),
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests;
