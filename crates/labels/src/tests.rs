use super::*;

fn set(items: &[&str]) -> LabelSet {
    LabelSet::parse_all(items.iter().copied())
}

fn sel(labels: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> Selector {
    let owned: Vec<(String, String, Vec<String>)> = exprs
        .iter()
        .map(|(k, o, v)| (k.to_string(), o.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    Selector::from_parts(
        labels.iter().copied(),
        owned.iter().map(|(k, o, v)| (k.as_str(), o.as_str(), v.as_slice())),
        SOURCE_ANY,
    )
    .unwrap()
}

#[test]
fn label_parse_and_display_round_trip() {
    for s in ["k8s:app=web", "reserved:host", "cidr:10.0.0.0/8", "k8s:io.kubernetes.pod.namespace=prod"] {
        assert_eq!(Label::parse(s).to_string(), s);
    }
    let l = Label::parse("app=web");
    assert_eq!((l.source.as_str(), l.key.as_str(), l.value.as_str()), ("unspec", "app", "web"));
}

#[test]
fn match_labels_any_source() {
    let s = sel(&[("app", "web")], &[]);
    assert!(s.matches(&set(&["k8s:app=web", "k8s:tier=fe"])));
    assert!(!s.matches(&set(&["k8s:app=db"])));
    assert!(!s.matches(&set(&[])));
}

#[test]
fn match_labels_explicit_source() {
    let s = sel(&[("reserved:host", "")], &[]);
    assert!(s.matches(&set(&["reserved:host"])));
    assert!(!s.matches(&set(&["k8s:host"])));
}

#[test]
fn expressions_follow_kubernetes_semantics() {
    let in_ = sel(&[], &[("env", "In", &["prod", "staging"])]);
    assert!(in_.matches(&set(&["k8s:env=prod"])));
    assert!(!in_.matches(&set(&["k8s:env=dev"])));
    assert!(!in_.matches(&set(&[])));

    let not_in = sel(&[], &[("env", "NotIn", &["prod"])]);
    assert!(not_in.matches(&set(&["k8s:env=dev"])));
    assert!(not_in.matches(&set(&[])), "NotIn matches when the key is absent");
    assert!(!not_in.matches(&set(&["k8s:env=prod"])));

    let exists = sel(&[], &[("env", "Exists", &[])]);
    assert!(exists.matches(&set(&["k8s:env=x"])));
    assert!(!exists.matches(&set(&["k8s:app=x"])));

    let dne = sel(&[], &[("env", "DoesNotExist", &[])]);
    assert!(!dne.matches(&set(&["k8s:env=x"])));
    assert!(dne.matches(&set(&["k8s:app=x"])));
}

#[test]
fn empty_selector_matches_everything() {
    assert!(Selector::wildcard().matches(&set(&["reserved:world"])));
    assert!(Selector::wildcard().is_wildcard());
}

#[test]
fn invalid_expressions_are_errors() {
    let bad = |k: &str, o: &str, v: &[String]| {
        Selector::from_parts([], [(k, o, v)], SOURCE_ANY).unwrap_err()
    };
    assert!(matches!(bad("a", "Equals", &[]), SelectorError::UnknownOperator { .. }));
    assert!(matches!(bad("a", "In", &[]), SelectorError::MissingValues { .. }));
    assert!(matches!(bad("a", "Exists", &["x".into()]), SelectorError::UnexpectedValues { .. }));
    assert!(matches!(bad("", "Exists", &[]), SelectorError::EmptyKey));
}

#[test]
fn pod_labels_are_filtered_and_namespaced() {
    let mut pod = BTreeMap::new();
    pod.insert("app".to_string(), "web".to_string());
    pod.insert("pod-template-hash".to_string(), "abc123".to_string());
    pod.insert("controller-revision-hash".to_string(), "1".to_string());
    let mut ns = BTreeMap::new();
    ns.insert("team".to_string(), "blue".to_string());
    let l = k8s_pod_labels("prod", &pod, &ns, "default", "default");
    let strings = l.to_strings();
    assert!(strings.contains(&"k8s:app=web".to_string()));
    assert!(strings.contains(&"k8s:io.kubernetes.pod.namespace=prod".to_string()));
    assert!(strings.contains(&"k8s:io.cilium.k8s.namespace.labels.team=blue".to_string()));
    assert!(strings.contains(&"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod".to_string()));
    assert!(strings.contains(&"k8s:io.cilium.k8s.policy.serviceaccount=default".to_string()));
    assert!(!strings.iter().any(|s| s.contains("pod-template-hash")));
    assert!(!strings.iter().any(|s| s.contains("controller-revision-hash")));
}

#[test]
fn label_set_serde_round_trip() {
    let s = set(&["k8s:app=web", "reserved:host"]);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(json, r#"["k8s:app=web","reserved:host"]"#);
    let back: LabelSet = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn pods_cannot_claim_namespace_labels() {
    let mut pod = BTreeMap::new();
    pod.insert("io.cilium.k8s.namespace.labels.team".to_string(), "payments".to_string());
    pod.insert("io.kubernetes.pod.namespace".to_string(), "payments-db".to_string());
    pod.insert("io.cilium.k8s.policy.serviceaccount".to_string(), "admin".to_string());
    let l = k8s_pod_labels("dev", &pod, &BTreeMap::new(), "default", "default");
    assert!(l.get("io.cilium.k8s.namespace.labels.team").is_none());
    assert_eq!(l.get("io.kubernetes.pod.namespace").unwrap().value, "dev");
    assert_eq!(l.get("io.cilium.k8s.policy.serviceaccount").unwrap().value, "default");
}
