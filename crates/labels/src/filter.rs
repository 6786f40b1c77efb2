//! Which Kubernetes labels are security relevant, and the label set of a pod.

use std::collections::BTreeMap;

use crate::{
    CLUSTER_LABEL, Label, LabelSet, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
};

/// Label keys that never become part of an identity, following upstream's
/// default label filter: runtime and controller bookkeeping that would split
/// one workload into many identities.
const IGNORED_PREFIXES: &[&str] = &[
    "io.kubernetes",
    "kubernetes.io",
    "statefulset.kubernetes.io",
    "apps.kubernetes.io",
    "batch.kubernetes.io",
    "k8s.io",
    "pod-template-generation",
    "pod-template-hash",
    "controller-revision-hash",
    "controller-uid",
    "job-name",
    "annotation.",
    "etcd_node",
];

/// True when a Kubernetes label key belongs in an identity.
pub fn is_security_relevant(key: &str) -> bool {
    if key == POD_NAMESPACE_LABEL
        || key.starts_with(NAMESPACE_LABELS_PREFIX)
        || key.starts_with("io.cilium.k8s.policy")
    {
        return true;
    }
    if key.contains("beta.kubernetes.io") {
        return false;
    }
    !IGNORED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// True for keys only the system may set: the namespace, namespace labels,
/// service account and cluster. A pod carrying one of these labels itself
/// would otherwise claim another namespace's labels (upstream strips them).
fn is_reserved_key(key: &str) -> bool {
    key == POD_NAMESPACE_LABEL || key.starts_with("io.cilium.k8s.")
}

/// The security labels of a pod: its own relevant labels, its namespace, its
/// namespace's labels, its service account and its cluster, all `k8s:`. A
/// pod's own labels can never set the system-owned keys.
pub fn k8s_pod_labels(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
    service_account: &str,
    cluster: &str,
) -> LabelSet {
    let mut set = LabelSet::new();
    for (k, v) in pod_labels {
        if is_security_relevant(k) && !is_reserved_key(k) {
            set.insert(Label::k8s(k, v));
        }
    }
    let mut ns_labels = namespace_labels.clone();
    ns_labels.entry("kubernetes.io/metadata.name".to_string()).or_insert_with(|| namespace.to_string());
    for (k, v) in &ns_labels {
        set.insert(Label::k8s(&format!("{NAMESPACE_LABELS_PREFIX}{k}"), v));
    }
    set.insert(Label::k8s(POD_NAMESPACE_LABEL, namespace));
    set.insert(Label::k8s(SERVICE_ACCOUNT_LABEL, service_account));
    set.insert(Label::k8s(CLUSTER_LABEL, cluster));
    set
}
