//! The conformance suite's case format, shared by its two runners: the pure
//! engine (every case, in `cargo test`) and real traffic in the lab.
//!
//! Modelled on the Kubernetes e2e NetworkPolicy suite: namespaces x, y and z,
//! each with pods a, b and c labelled `pod: <name>` (namespaces labelled
//! `ns: <name>`), every pod serving ports 80 and 81 over TCP, UDP and SCTP
//! (named `serve-80-tcp`, ...). A case applies policies step by step; after
//! each step the full from→to reachability matrix must match the step's
//! expectation. SCTP is checked by the engine only (this kernel has no SCTP).
//!
//! ```yaml
//! name: deny-all-ingress-in-x
//! lab: true                      # also run with real traffic in the suite
//! steps:
//! - apply: |                     # policy documents added at this step
//!     apiVersion: networking.k8s.io/v1
//!     ...
//!   delete: [NetworkPolicy/x/deny-all]   # policies removed at this step
//!   expect:                      # from an all-allowed matrix, in order:
//!   - deny: "* -> x/*"           # patterns are ns/pod, * matches any
//!   - allow: "x/b -> x/a"
//!     ports: [tcp/80]            # default: every port and protocol
//! ```

use serde::Deserialize;

use crate::rule::Protocol;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// Every (protocol, port) a matrix covers.
pub const PORTS: [(Protocol, u16); 6] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 81),
    (Protocol::Udp, 80),
    (Protocol::Udp, 81),
    (Protocol::Sctp, 80),
    (Protocol::Sctp, 81),
];

/// The pods, as `ns/pod`.
pub fn pods() -> Vec<String> {
    NAMESPACES.iter().flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}"))).collect()
}

/// The Kubernetes objects of the conformance cluster (namespaces and pods).
pub fn manifest() -> String {
    let mut out = String::new();
    for n in NAMESPACES {
        out.push_str(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}, labels: {{ns: {n}}}}}\n---\n"));
        for p in PODS {
            out.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {p}, namespace: {n}, labels: {{pod: {p}}}}}\nspec:\n  containers:\n  - name: c\n    ports:\n    - {{containerPort: 80, name: serve-80-tcp}}\n    - {{containerPort: 81, name: serve-81-tcp}}\n    - {{containerPort: 80, name: serve-80-udp, protocol: UDP}}\n    - {{containerPort: 81, name: serve-81-udp, protocol: UDP}}\n---\n"
            ));
        }
    }
    out
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Part of the lab subset run by the test suite.
    #[serde(default)]
    pub lab: bool,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub apply: Option<String>,
    /// `Kind/namespace/name` or `Kind/name`.
    #[serde(default)]
    pub delete: Vec<String>,
    #[serde(default)]
    pub expect: Vec<ExpectRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRule {
    #[serde(default)]
    pub allow: Option<String>,
    #[serde(default)]
    pub deny: Option<String>,
    /// `tcp/80`, ...; empty means all.
    #[serde(default)]
    pub ports: Vec<String>,
}

fn parse_port(s: &str) -> Result<(Protocol, u16), String> {
    let (proto, port) = s.split_once('/').ok_or_else(|| format!("port {s:?}: want proto/port"))?;
    let p = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return Err(format!("port {s:?}: unknown protocol")),
    };
    Ok((p, port.parse().map_err(|_| format!("port {s:?}: bad number"))?))
}

fn pattern_matches(pattern: &str, pod: &str) -> bool {
    let (pn, pp) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (n, p) = pod.split_once('/').unwrap_or((pod, ""));
    (pn == "*" || pn == n) && (pp == "*" || pp == p)
}

/// Expected reachability after a step: `(from, to, (proto, port)) -> reachable`.
pub fn expected(step: &Step) -> Result<std::collections::BTreeMap<(String, String, (Protocol, u16)), bool>, String> {
    let pods = pods();
    let mut m = std::collections::BTreeMap::new();
    for f in &pods {
        for t in &pods {
            for port in PORTS {
                m.insert((f.clone(), t.clone(), port), true);
            }
        }
    }
    for rule in &step.expect {
        let (edge, allow) = match (&rule.allow, &rule.deny) {
            (Some(e), None) => (e, true),
            (None, Some(e)) => (e, false),
            _ => return Err("each expectation is exactly one of allow or deny".into()),
        };
        let (from, to) = edge.split_once("->").ok_or_else(|| format!("edge {edge:?}: want 'from -> to'"))?;
        let (from, to) = (from.trim(), to.trim());
        let ports: Vec<(Protocol, u16)> =
            if rule.ports.is_empty() { PORTS.to_vec() } else { rule.ports.iter().map(|p| parse_port(p)).collect::<Result<_, _>>()? };
        for ((f, t, port), v) in m.iter_mut() {
            if pattern_matches(from, f) && pattern_matches(to, t) && ports.contains(port) {
                *v = allow;
            }
        }
    }
    // a pod reaching its own address never leaves its namespace (it goes
    // through its loopback), so no policy can stop it, as upstream's e2e
    // suite expects
    for ((f, t, _), v) in m.iter_mut() {
        if f == t {
            *v = true;
        }
    }
    Ok(m)
}

/// Renders a reachability matrix for one port, marking mismatches.
pub fn render(
    port: (Protocol, u16),
    got: &dyn Fn(&str, &str) -> bool,
    want: &dyn Fn(&str, &str) -> bool,
) -> String {
    let pods = pods();
    let mut out = format!("{}/{} (rows: from, columns: to; . reachable, X blocked, ! wrong)\n      ", port.0.name(), port.1);
    for t in &pods {
        out.push_str(&format!("{t:>4}"));
    }
    out.push('\n');
    for f in &pods {
        out.push_str(&format!("{f:>5} "));
        for t in &pods {
            let (g, w) = (got(f, t), want(f, t));
            out.push_str(&format!("{:>4}", if g != w { "!" } else if g { "." } else { "X" }));
        }
        out.push('\n');
    }
    out
}

/// Reads every case of a directory, in name order.
pub fn load_cases(dir: &std::path::Path) -> Result<Vec<Case>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            serde_yaml::from_str::<Case>(&text).map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect()
}
