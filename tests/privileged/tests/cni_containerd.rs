//! Interoperability with a container runtime nobody here wrote: containerd
//! (`ctr run --cni`) with crun runs a busybox container in a lab node, and
//! our CNI plugin, called by ctr, wires it into the lab's datapath.
//!
//! Needs root and the Debian packages containerd, crun and busybox-static
//! (see cilium_privileged_tests::containerd for what ctr expects where).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use cilium_privileged_tests::containerd::{CniInstall, Containerd, build_busybox_image, require_tools};
use cilium_privileged_tests::lab::{TestLab, bin_dir};
use serde_json::Value;

const WEB: &str =
    "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\n";
const IMAGE: &str = "localhost/cilium-busybox:latest";
const READY: &str = "cilium-test-ready";
const DONE: &str = "cilium-test-done";

fn endpoints(lab: &TestLab) -> Vec<Value> {
    serde_json::from_str(&lab.cilium_ok(&["endpoint", "list", "-o", "json"])).expect("endpoint list json")
}

/// Whether a link exists in the lab node's network namespace.
fn node_has_link(lab: &TestLab, name: &str) -> bool {
    let ns = lab.netns("node1");
    let ns = ns.file_name().expect("netns name").to_str().expect("utf-8");
    std::process::Command::new("ip").args(["-n", ns, "link", "show", "dev", name]).output().expect("run ip").status.success()
}

/// The text after `prefix` on the line that starts with it.
fn field<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("the container printed no {prefix:?} line; it printed:\n{}", lines.join("\n")))
}

#[test]
fn ctr_run_cni_with_crun_gets_wired_by_cilium_cni() {
    let started = Instant::now();
    let tools = require_tools();
    let lab = TestLab::up(&[WEB]);
    let web_ip = lab.pod_ip("web");
    let cni = CniInstall::install(&lab.name, &bin_dir().join("cilium-cni"), &lab.socket());
    let ctrd = Containerd::start(&tools, &lab.netns("node1"));
    eprintln!("containerd up in {} (snapshotter {}) after {:?}", ctrd.dir().display(), ctrd.snapshotter, started.elapsed());

    let tar = ctrd.dir().join("busybox.tar");
    build_busybox_image(&tools, &tar, IMAGE);
    ctrd.import(&tar);

    let before = endpoints(&lab);
    let id = format!("cni-{}", lab.name);
    let cni_id = Containerd::cni_container_id(&id);
    assert!(before.iter().all(|e| e["container_id"] != cni_id.as_str()));
    let script = format!(
        "echo \"eth0: $(ip -4 -o addr show dev eth0)\"\n\
         echo \"fetch: $(timeout 10 wget -q -O - http://{web_ip}:80/ 2>&1 || echo FAILED)\"\n\
         echo {READY}\n\
         read reply\n\
         echo \"{DONE} $reply\"\n"
    );
    let mut run = ctrd.spawn_run(IMAGE, &id, &["sh", "-c", &script]);
    run.wait_for_line(READY, Duration::from_secs(60));
    eprintln!("container ran its checks after {:?}:\n{}", started.elapsed(), run.stdout.join("\n"));

    // --- while the container runs ---------------------------------------
    let eth0 = field(&run.stdout, "eth0: ");
    let addr: Ipv4Addr = eth0
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address on the container's eth0: {eth0:?}"));
    let pod_cidr: ipnet::Ipv4Net = "10.0.1.0/24".parse().expect("cidr");
    assert!(pod_cidr.contains(&addr), "container address {addr} is outside the lab's pod CIDR {pod_cidr}");
    assert_ne!(addr, web_ip);
    let fetch = field(&run.stdout, "fetch: ");
    assert!(fetch.contains("pod=default/web"), "the container could not fetch http://{web_ip}/ from the web pod: {fetch:?}");

    let during = endpoints(&lab);
    assert_eq!(during.len(), before.len() + 1, "one more endpoint while the container runs: {during:#?}");
    let ep = during
        .iter()
        .find(|e| e["container_id"] == cni_id.as_str())
        .unwrap_or_else(|| panic!("no endpoint with container_id {cni_id} (the CNI ID ctr uses); endpoints: {during:#?}"));
    eprintln!("the agent's endpoint for the ctr container: {ep:#}");
    assert_eq!(ep["ifname"], "eth0");
    assert_eq!(ep["ipv4"], addr.to_string(), "the endpoint's address is the one on the container's eth0");
    assert_eq!(ep["state"], "ready");
    // the plugin was handed the namespace of this very task, by ctr
    let pid = ctrd.task_pid(&id).unwrap_or_else(|| panic!("ctr lists no task {id}"));
    assert_eq!(ep["netns"], format!("/proc/{pid}/ns/net"), "CNI_NETNS is the task's namespace");
    let host_if = ep["host_ifname"].as_str().expect("host_ifname").to_string();
    assert!(node_has_link(&lab, &host_if), "host side {host_if} exists in the node");
    // and the runtime is crun: its state, under the root ctr gave it
    let state = ctrd.runtime_state(&id).join("status");
    let status: Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap_or_else(|e| panic!("crun state {}: {e}", state.display()))).expect("crun status json");
    assert_eq!(status["pid"], pid, "crun's state names the task");

    // --- let it exit: ctr deletes the task, then calls CNI DEL ----------
    run.send_line("go");
    let exit = run.wait(Duration::from_secs(60));
    assert!(exit.success(), "ctr run exited with {exit}; {}", run.describe());
    assert!(run.stdout.iter().any(|l| l == &format!("{DONE} go")), "{}", run.describe());
    let stderr = run.stderr();
    assert!(!stderr.contains("level=error"), "ctr reported an error (a failed CNI DEL is only logged): {stderr}");

    let after = endpoints(&lab);
    assert!(after.iter().all(|e| e["container_id"] != cni_id.as_str()), "CNI DEL removed the endpoint: {after:#?}");
    assert_eq!(after.len(), before.len());
    assert!(!node_has_link(&lab, &host_if), "CNI DEL removed the host side {host_if}");
    assert!(!ctrd.containers().contains(&id), "ctr --rm removed the container");
    assert!(!ctrd.runtime_state(&id).exists(), "crun's state is gone");
    // the lab is unharmed: the node still reaches the web pod
    assert!(lab.probe("node1", "default/web", 80, "tcp"));

    drop(ctrd);
    drop(cni);
    eprintln!("done after {:?}", started.elapsed());
}
