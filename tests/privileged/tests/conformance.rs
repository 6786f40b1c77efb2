//! The conformance suite with real traffic: the cases of tests/conformance
//! marked `lab: true` (all of them with CILIUM_CONFORMANCE_ALL=1, as
//! `scripts/conformance.sh` does), every step, the 9×9 matrix on TCP and UDP
//! ports 80 and 81, probed from inside the pods.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cilium_policy::conformance::{self, Step};
use cilium_policy::Protocol;
use cilium_privileged_tests::lab::TestLab;
use serde_json::Value;

fn probe_matrix(pods: &[(String, PathBuf, Ipv4Addr)]) -> std::collections::BTreeMap<(String, String, (Protocol, u16)), bool> {
    let mut jobs = Vec::new();
    for (f, ns, _) in pods {
        for (t, _, ip) in pods {
            for port in [(Protocol::Tcp, 80), (Protocol::Tcp, 81), (Protocol::Udp, 80), (Protocol::Udp, 81)] {
                jobs.push((f.clone(), ns.clone(), t.clone(), *ip, port));
            }
        }
    }
    let jobs = Arc::new(Mutex::new(jobs));
    let results = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (jobs, results) = (jobs.clone(), results.clone());
            std::thread::spawn(move || loop {
                let Some((f, ns, t, ip, port)) = jobs.lock().unwrap().pop() else { return };
                let (ok, _, _) = cilium_lab::probe::probe(ns, ip.into(), port.1, port.0 == Protocol::Udp, Duration::from_millis(700));
                results.lock().unwrap().insert((f, t, port), ok);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

fn apply_step(lab: &TestLab, case: &str, i: usize, step: &Step) {
    if let Some(text) = &step.apply {
        let f = lab.write(&format!("{case}-{i}.yaml"), text);
        lab.cilium_ok(&["policy", "import", f.to_str().unwrap()]);
    }
    for d in &step.delete {
        let parts: Vec<&str> = d.split('/').collect();
        let mut args = vec!["policy", "delete", parts[parts.len() - 1], "--kind", parts[0]];
        if parts.len() == 3 {
            args.extend(["--namespace", parts[1]]);
        }
        lab.cilium_ok(&args);
    }
}

#[test]
fn conformance_suite_with_real_traffic() {
    let all = std::env::var("CILIUM_CONFORMANCE_ALL").is_ok_and(|v| v == "1");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance");
    let cases: Vec<_> = conformance::load_cases(&dir).unwrap().into_iter().filter(|c| all || c.lab).collect();
    assert!(cases.len() >= 10, "the lab subset is there");
    let lab = TestLab::up(&[&conformance::manifest()]);
    let pods: Vec<(String, PathBuf, Ipv4Addr)> = lab
        .pods()
        .iter()
        .map(|p: &Value| {
            let key = format!("{}/{}", p["namespace"].as_str().unwrap(), p["name"].as_str().unwrap());
            let ip = p["ip"].as_str().unwrap().parse().unwrap();
            (key.clone(), lab.netns(&key), ip)
        })
        .collect();
    assert_eq!(pods.len(), 9);
    let mut failures = Vec::new();
    for case in &cases {
        lab.cilium_ok(&["policy", "delete", "--all"]);
        for (i, step) in case.steps.iter().enumerate() {
            apply_step(&lab, &case.name, i, step);
            let want = conformance::expected(step).unwrap();
            let got = probe_matrix(&pods);
            for port in [(Protocol::Tcp, 80), (Protocol::Tcp, 81), (Protocol::Udp, 80), (Protocol::Udp, 81)] {
                let g = |f: &str, t: &str| got[&(f.to_string(), t.to_string(), port)];
                let w = |f: &str, t: &str| want[&(f.to_string(), t.to_string(), port)];
                if conformance::pods().iter().any(|f| conformance::pods().iter().any(|t| g(f, t) != w(f, t))) {
                    failures.push(format!("case {} step {}:\n{}", case.name, i + 1, conformance::render(port, &g, &w)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
