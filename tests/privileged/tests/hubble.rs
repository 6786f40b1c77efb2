//! Hubble end to end: real traffic in a lab, flows read back through the
//! agent's Hubble socket and through hubble-relay with the real `hubble`
//! binary; metrics scraped by a real Prometheus server; flow export.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cilium_privileged_tests::lab::{TestLab, bin_dir};
use serde_json::Value;

/// Three pods a, b, c serving TCP 80 and 81.
const ABC: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: a}}
spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 81}]}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: b}
spec:
  replicas: 1
  selector: {matchLabels: {app: b}}
  template:
    metadata: {labels: {app: b}}
    spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: c}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
"#;

/// a accepts only b, on port 80.
const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-from-b}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

fn lab_state(lab: &TestLab) -> Value {
    serde_json::from_slice(
        &std::fs::read(format!("/var/run/cilium-lab/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap()
}

fn relay(lab: &TestLab) -> String {
    lab_state(lab)["relay_address"]
        .as_str()
        .expect("the lab runs hubble-relay")
        .to_string()
}

fn hubble_socket(lab: &TestLab) -> String {
    format!("unix:///var/run/cilium-lab/{}/node1/hubble.sock", lab.name)
}

fn hubble(args: &[&str]) -> Output {
    Command::new(bin_dir().join("hubble"))
        .args(args)
        .output()
        .expect("run hubble")
}

fn hubble_ok(args: &[&str]) -> String {
    let out = hubble(args);
    assert!(
        out.status.success(),
        "hubble {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every flow of `hubble observe … -o json` output.
fn flows(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("flow").cloned())
        .collect()
}

/// Polls `hubble observe` until `pred` holds for some flow.
fn wait_flow(args: &[&str], pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = flows(&hubble_ok(args));
        if let Some(f) = all.iter().find(|f| pred(f)) {
            return (f.clone(), all);
        }
        assert!(
            Instant::now() < deadline,
            "no matching flow from hubble {args:?}; got {} flows: {:#?}",
            all.len(),
            all.iter().rev().take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_pod(e: &Value, ns: &str, prefix: &str) -> bool {
    e["namespace"] == ns
        && e["pod_name"]
            .as_str()
            .is_some_and(|p| p.starts_with(prefix))
}

#[test]
fn denied_and_allowed_flows_with_names_verdicts_and_filters() {
    let lab = TestLab::up(&[ABC, POLICY]);
    let b = lab.pod("b");
    assert!(lab.probe(&b, "default/a", 80, "tcp"), "b may reach a:80");
    assert!(
        !lab.probe("default/c", "default/a", 80, "tcp"),
        "c may not reach a"
    );
    let relay = relay(&lab);

    // the denied curl: a DROPPED flow, POLICY_DENIED, both pod names
    let (drop, _) = wait_flow(
        &[
            "observe", "--server", &relay, "-o", "json", "--last", "1000", "--type", "drop",
        ],
        |f| f["verdict"] == "DROPPED" && is_pod(&f["source"], "default", "c"),
    );
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");
    assert!(is_pod(&drop["destination"], "default", "a"), "{drop:#}");
    assert_eq!(drop["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(drop["node_name"], "node1");
    assert_eq!(drop["traffic_direction"], "INGRESS");
    assert_eq!(drop["event_type"]["type"], 1);
    // the allowed one: a policy verdict FORWARDED (L3-L4 match), from b's Deployment
    let (verdict, _) = wait_flow(
        &[
            "observe",
            "--server",
            &relay,
            "-o",
            "json",
            "--last",
            "1000",
            "--type",
            "policy-verdict",
        ],
        |f| f["verdict"] == "FORWARDED" && is_pod(&f["source"], "default", "b-"),
    );
    assert_eq!(verdict["policy_match_type"], 2);
    // named: the policy that allowed it
    assert_eq!(verdict["ingress_allowed_by"][0]["name"], "a-from-b", "{verdict:#}");
    assert_eq!(verdict["ingress_allowed_by"][0]["namespace"], "default");
    assert_eq!(verdict["ingress_allowed_by"][0]["kind"], "CiliumNetworkPolicy");
    assert_eq!(verdict["source"]["workloads"][0]["kind"], "Deployment");
    assert_eq!(verdict["source"]["workloads"][0]["name"], "b");
    assert!(
        verdict["destination"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "k8s:app=a")
    );
    // and traced all the way to the endpoint
    wait_flow(
        &[
            "observe",
            "--server",
            &relay,
            "-o",
            "json",
            "--all",
            "-t",
            "trace:to-endpoint",
            "--to-pod",
            "default/a",
        ],
        |f| f["verdict"] == "FORWARDED",
    );

    // compact lines look like upstream's
    let compact = hubble_ok(&[
        "observe",
        "--server",
        &hubble_socket(&lab),
        "--last",
        "1000",
        "--to-pod",
        "default/a",
        "--to-port",
        "80",
    ]);
    assert!(
        compact.lines().any(|l| l.contains(" default/c:")
            && l.contains("-> default/a:80 (ID:")
            && l.ends_with("Policy denied DROPPED (TCP Flags: SYN)")),
        "{compact}"
    );
    assert!(
        compact.lines().any(|l| l.contains(&format!(" {b}:"))
            && l.contains("policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)")),
        "{compact}"
    );

    // filters: verdict, namespace, pods, labels, --not
    let dropped = flows(&hubble_ok(&[
        "observe",
        "--server",
        &relay,
        "-o",
        "json",
        "--all",
        "--verdict",
        "DROPPED",
        "--namespace",
        "default",
    ]));
    assert!(!dropped.is_empty() && dropped.iter().all(|f| f["verdict"] == "DROPPED"));
    let from_c = flows(&hubble_ok(&[
        "observe",
        "--server",
        &relay,
        "-o",
        "json",
        "--all",
        "--from-pod",
        "c",
    ]));
    assert!(!from_c.is_empty() && from_c.iter().all(|f| is_pod(&f["source"], "default", "c")));
    let labelled = flows(&hubble_ok(&[
        "observe",
        "--server",
        &relay,
        "-o",
        "json",
        "--all",
        "--from-label",
        "app=b",
        "--to-label",
        "app=a",
    ]));
    assert!(
        !labelled.is_empty()
            && labelled
                .iter()
                .all(|f| is_pod(&f["source"], "default", "b-")
                    && is_pod(&f["destination"], "default", "a"))
    );
    let not_dropped = flows(&hubble_ok(&[
        "observe",
        "--server",
        &relay,
        "-o",
        "json",
        "--all",
        "--not",
        "--verdict",
        "DROPPED",
    ]));
    assert!(!not_dropped.is_empty() && not_dropped.iter().all(|f| f["verdict"] != "DROPPED"));
    assert_eq!(
        flows(&hubble_ok(&[
            "observe",
            "--server",
            &relay,
            "-o",
            "json",
            "--all",
            "--namespace",
            "elsewhere"
        ]))
        .len(),
        0
    );
    // first/last
    let first2 = flows(&hubble_ok(&[
        "observe", "--server", &relay, "-o", "json", "--first", "2",
    ]));
    assert_eq!(first2.len(), 2);
    // a bad filter is refused with the flag named
    let out = hubble(&["observe", "--server", &relay, "--verdict", "SOMETIMES"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"verdict\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = hubble(&["observe", "--server", &relay, "--from-ip", "10.0.0.300"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("source_ip"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // status, nodes, namespaces
    let st = hubble_ok(&["status", "--server", &relay]);
    assert!(
        st.contains("Healthcheck (via")
            && st.contains("Current/Max Flows:")
            && st.contains("Connected Nodes: 1/1"),
        "{st}"
    );
    let nodes = hubble_ok(&["list", "nodes", "--server", &relay]);
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("node1") && l.contains("Connected")),
        "{nodes}"
    );
    assert!(
        hubble_ok(&["list", "namespaces", "--server", &hubble_socket(&lab)])
            .lines()
            .any(|l| l == "default")
    );
    let cs = lab.cilium_ok(&["status"]);
    assert!(
        cs.contains("Hubble:") && cs.contains("Current/Max Flows:") && cs.contains("/4095"),
        "{cs}"
    );
}

/// The seed walkthroughs' commands, as written (follow modes bounded by a
/// timeout). Two of seed 004's use `--type dns`/`--type http`, which
/// upstream's CLI refuses too: they must fail with a clear message.
#[test]
fn seed_commands_work_as_written() {
    let lab = TestLab::up(&[ABC, POLICY]);
    assert!(!lab.probe("default/c", "default/a", 80, "tcp"));
    let relay = relay(&lab);
    let run = |args: &[&str]| {
        Command::new(bin_dir().join("hubble"))
            .args(args)
            .env("HUBBLE_SERVER", &relay)
            .output()
            .expect("hubble")
    };
    for cmd in [
        "observe --namespace default --verdict DROPPED",
        "observe --namespace default --type drop --output compact",
        "observe --since 1m",
        "observe --namespace production --verdict DROPPED",
        "observe --from-label app=frontend --to-label app=backend",
        "observe --namespace default -o json",
        "observe --verdict DROPPED --namespace default",
        "status",
    ] {
        let out = run(&cmd.split(' ').collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "hubble {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&[
        "observe",
        "--namespace",
        "default",
        "--type",
        "drop",
        "--output",
        "compact",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Policy denied DROPPED"));
    for cmd in ["observe --type dns", "observe --type http --output json"] {
        let out = run(&cmd.split(' ').collect::<Vec<_>>());
        assert!(!out.status.success(), "hubble {cmd} should be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--protocol"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // follow modes: a new drop arrives while following
    for cmd in [
        "observe --follow",
        "observe --namespace default --follow",
        "observe --verdict DROPPED --follow",
        "observe --namespace default --protocol tcp -f",
    ] {
        let mut child = Command::new(bin_dir().join("hubble"))
            .args(cmd.split(' '))
            .env("HUBBLE_SERVER", &relay)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!lab.probe("default/c", "default/a", 80, "tcp"));
        let got = rx.recv_timeout(Duration::from_secs(10));
        let _ = child.kill();
        let _ = child.wait();
        let line = got.unwrap_or_else(|_| panic!("hubble {cmd} printed nothing"));
        assert!(
            line.contains("default/c") || line.contains("default/a"),
            "hubble {cmd}: {line}"
        );
    }
}

/// A follower through the relay survives the agent restarting: it sees the
/// node go unavailable, come back, and the flows after it.
#[test]
fn relay_follow_survives_an_agent_restart() {
    let lab = TestLab::up(&[ABC, POLICY]);
    let relay = relay(&lab);
    let mut child = Command::new(bin_dir().join("hubble"))
        .args([
            "observe",
            "--server",
            &relay,
            "-f",
            "-o",
            "json",
            "--to-port",
            "81",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!lab.probe("default/c", "default/a", 81, "tcp"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a flow before the restart");
        if l.contains("\"flow\"") {
            break;
        }
        assert!(l.contains("NODE_CONNECTED"), "{l}");
        assert!(Instant::now() < deadline);
    }
    lab.lab(&["agent", "restart"]);
    // the relay notices and reconnects
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut probed = false;
    loop {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
            seen.push(l);
        }
        if !probed && seen.iter().any(|l| l.contains("NODE_CONNECTED")) {
            assert!(!lab.probe("default/c", "default/a", 81, "tcp"));
            probed = true;
        }
        if probed
            && seen
                .iter()
                .rev()
                .any(|l| l.contains("\"flow\"") && l.contains("\"destination_port\":81"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no flow after the restart; saw {seen:#?}"
        );
    }
    assert!(
        seen.iter().any(|l| l.contains("NODE_UNAVAILABLE")),
        "{seen:#?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// hubble-relay over two agents (two labs) merges their flows in time order
/// and names each flow's node.
#[test]
fn relay_merges_two_agents_in_time_order() {
    let one = TestLab::up(&[ABC, POLICY]);
    let two = TestLab::up_with(&[ABC, POLICY], &["--node-name=node2"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let relay = Command::new(bin_dir().join("hubble-relay"))
        .args([
            "serve",
            "--listen-address",
            &addr,
            "--static-peer",
            &format!("node1={}", hubble_socket(&one)),
            "--static-peer",
            &format!("node2={}", hubble_socket(&two)),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reaper = Reaper(vec![relay]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "relay did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..2 {
        assert!(!one.probe("default/c", "default/a", 80, "tcp"));
        assert!(!two.probe("default/c", "default/a", 80, "tcp"));
    }
    let (_, all) = wait_flow(
        &[
            "observe",
            "--server",
            &addr,
            "-o",
            "json",
            "--all",
            "--verdict",
            "DROPPED",
        ],
        |f| f["node_name"] == "node2",
    );
    let nodes: std::collections::BTreeSet<&str> =
        all.iter().filter_map(|f| f["node_name"].as_str()).collect();
    assert_eq!(
        nodes.into_iter().collect::<Vec<_>>(),
        vec!["node1", "node2"]
    );
    let times: Vec<String> = all
        .iter()
        .map(|f| f["time"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "merged in time order");
    let st = hubble_ok(&["status", "--server", &addr]);
    assert!(st.contains("Connected Nodes: 2/2"), "{st}");
    // --print-node-name shows where each flow was seen
    let compact = hubble_ok(&[
        "observe",
        "--server",
        &addr,
        "--all",
        "--verdict",
        "DROPPED",
        "--print-node-name",
    ]);
    assert!(
        compact.contains(" [node1]: ") && compact.contains(" [node2]: "),
        "{compact}"
    );
    drop(two);
    let st = hubble_ok(&["status", "--server", &addr]);
    assert!(
        st.contains("Connected Nodes: 1/2") && st.contains("Unavailable Nodes: node2"),
        "{st}"
    );
    let nodes = hubble_ok(&["list", "nodes", "--server", &addr]);
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("node2") && l.contains("Unavailable")),
        "{nodes}"
    );
}

/// Flows exported to a file, filtered, appended across an agent restart.
#[test]
fn flows_export_to_a_file_with_filters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.json");
    let lab = TestLab::up_with(
        &[ABC, POLICY],
        &[
            &format!("--hubble-export-file-path={}", path.display()),
            r#"--hubble-export-allowlist={"verdict":["DROPPED"]}"#,
            "--hubble-export-file-max-size-mb=1",
        ],
    );
    assert!(!lab.probe("default/c", "default/a", 80, "tcp"));
    assert!(lab.probe(&lab.pod("b"), "default/a", 80, "tcp"));
    let read = |p: &PathBuf| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(&path).is_empty() {
        assert!(Instant::now() < deadline, "nothing exported");
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = read(&path);
    assert!(
        lines.iter().all(|l| l["flow"]["verdict"] == "DROPPED"),
        "only DROPPED flows pass the allowlist"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["flow"]["drop_reason_desc"] == "POLICY_DENIED" && l["node_name"] == "node1")
    );
    let n = lines.len();
    lab.lab(&["agent", "restart"]);
    assert!(!lab.probe("default/c", "default/a", 80, "tcp"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(&path).len() <= n {
        assert!(
            Instant::now() < deadline,
            "nothing exported after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A real Prometheus server scrapes the agent (:9962) and Hubble (:9965)
/// inside the node's namespace; the counters move with traffic.
#[test]
fn prometheus_scrapes_agent_and_hubble_metrics() {
    let prom = PathBuf::from("/usr/bin/prometheus");
    assert!(prom.exists(), "prometheus missing: run scripts/setup.sh");
    let lab = TestLab::up(&[ABC, POLICY]);
    let ns = lab.netns("node1");
    let ns_name = ns.file_name().unwrap().to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(&cfg, "global: {scrape_interval: 1s}\nscrape_configs:\n- job_name: agent\n  static_configs: [{targets: ['127.0.0.1:9962']}]\n- job_name: hubble\n  static_configs: [{targets: ['127.0.0.1:9965']}]\n").unwrap();
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns_name,
            "/usr/bin/prometheus",
            &format!("--config.file={}", cfg.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            "--web.listen-address=127.0.0.1:19090",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reaper = Reaper(vec![server]);
    let query = |q: &str| -> Option<f64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns_name,
                "curl",
                "-s",
                "--max-time",
                "2",
                "http://127.0.0.1:19090/api/v1/query",
                "--data-urlencode",
                &format!("query={q}"),
            ])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let wait = |q: &str, pred: &dyn Fn(f64) -> bool| -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = query(q) {
                if pred(v) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "{q}: last value {:?}", query(q));
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // both targets up, the gauges right
    wait("sum(up)", &|v| v == 2.0);
    wait("cilium_endpoint", &|v| v == 3.0);
    wait("cilium_policy", &|v| v == 1.0);
    wait(r#"cilium_identity{type="cluster_local"}"#, &|v| v >= 3.0);
    let drops0 = query(r#"sum(cilium_drop_count_total{reason="Policy denied"})"#).unwrap_or(0.0);
    let hdrops0 = query(r#"sum(hubble_drop_total{reason="POLICY_DENIED"})"#).unwrap_or(0.0);
    let flows0 = query("sum(hubble_flows_processed_total)").unwrap_or(0.0);
    let syn0 = query(r#"sum(hubble_tcp_flags_total{flag="SYN"})"#).unwrap_or(0.0);
    for _ in 0..3 {
        assert!(!lab.probe("default/c", "default/a", 80, "tcp"));
    }
    assert!(lab.probe(&lab.pod("b"), "default/a", 80, "tcp"));
    wait(
        r#"sum(cilium_drop_count_total{reason="Policy denied"})"#,
        &|v| v >= drops0 + 3.0,
    );
    wait(r#"sum(hubble_drop_total{reason="POLICY_DENIED"})"#, &|v| {
        v >= hdrops0 + 3.0
    });
    wait("sum(hubble_flows_processed_total)", &|v| v > flows0 + 3.0);
    wait(r#"sum(hubble_tcp_flags_total{flag="SYN"})"#, &|v| v > syn0);
    wait(
        r#"sum(hubble_policy_verdicts_total{action="forwarded",direction="ingress"})"#,
        &|v| v >= 1.0,
    );
    wait(r#"sum(hubble_port_distribution_total{port="80"})"#, &|v| {
        v >= 1.0
    });
    wait("sum(cilium_forward_count_total)", &|v| v > 0.0);
    wait(
        r#"sum(cilium_bpf_map_ops_total{map_name="cilium_policy",operation="update",outcome="success"})"#,
        &|v| v > 0.0,
    );
    wait(r#"cilium_bpf_map_pressure{map_name="cilium_lxc"}"#, &|v| {
        v > 0.0
    });
    // a policy change is counted and timed; API calls are timed
    lab.apply("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: extra}\nspec:\n  endpointSelector: {matchLabels: {app: c}}\n  ingress: [{}]\n");
    wait(
        r#"sum(cilium_policy_change_total{outcome="success"})"#,
        &|v| v >= 1.0,
    );
    wait("sum(cilium_policy_implementation_delay_count)", &|v| {
        v >= 1.0
    });
    wait("sum(cilium_api_process_time_seconds_count)", &|v| v > 0.0);
    wait("sum(hubble_lost_events_total)", &|v| v == 0.0);
}
