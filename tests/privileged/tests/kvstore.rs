//! The kvstore: a real etcd (Debian's etcd-server, started by the test),
//! cluster-wide identity allocation through it, and agents on several
//! nodes agreeing on identity numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cilium_kvstore::Etcd;
use cilium_privileged_tests::lab::TestLab;
use serde_json::Value;

/// etcd on a free loopback port, in a temporary directory; stopped on drop.
struct EtcdServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    fn start() -> EtcdServer {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (client, peer) = (free(), free());
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args([
                &format!("--data-dir={}", dir.path().display()),
                &format!("--listen-client-urls={url}"),
                &format!("--advertise-client-urls={url}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                &format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
                "--log-level=warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        EtcdServer { child, url, _dir: dir }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three clients allocate the same eight label sets at once, in different
/// orders: each label set gets one number, each number one label set.
#[test]
fn concurrent_allocation_agrees() {
    let etcd = EtcdServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for client in 0..3usize {
            let e = Etcd::connect(&etcd.url, Duration::from_secs(5)).unwrap();
            for i in 0..8usize {
                let e = e.clone();
                let labels = format!("k8s:app=a{};", (i + client * 3) % 8);
                tasks.push(tokio::spawn(async move { (labels.clone(), e.allocate_identity(&labels, 256, 65535).await.unwrap()) }));
            }
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let mut by_labels: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (l, id) in &results {
        by_labels.entry(l.clone()).or_default().insert(*id);
    }
    assert_eq!(by_labels.len(), 8);
    assert!(by_labels.values().all(|ids| ids.len() == 1), "one number per label set: {by_labels:?}");
    let numbers: BTreeSet<u32> = by_labels.values().flatten().copied().collect();
    assert_eq!(numbers.len(), 8, "one label set per number: {by_labels:?}");
    assert!(numbers.iter().all(|n| (256..=263).contains(n)), "the lowest free numbers: {numbers:?}");
    // and the reverse mapping is stored
    let _in = rt.enter();
    let e = Etcd::connect(&etcd.url, Duration::from_secs(5)).unwrap();
    let (labels, id) = by_labels.iter().next().map(|(l, ids)| (l.clone(), *ids.iter().next().unwrap())).unwrap();
    assert_eq!(rt.block_on(e.identity_labels(id)).unwrap(), Some(labels));
}

/// A watch sees puts and deletes under its prefix, and nothing else.
#[test]
fn watch_sees_changes_under_its_prefix() {
    let etcd = EtcdServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let e = Etcd::connect(&etcd.url, Duration::from_secs(5)).unwrap();
        let mut w = e.watch("cilium/state/ip/").await.unwrap();
        e.put("cilium/state/nodes/v1/default/n1", b"x").await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), w.changed()).await;
        assert!(quiet.is_err(), "a key outside the prefix is not seen: {quiet:?}");
        e.put("cilium/state/ip/v1/default/10.0.1.2", b"a").await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(2), w.changed()).await.unwrap().unwrap(), 1);
        e.delete("cilium/state/ip/v1/default/10.0.1.2").await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(2), w.changed()).await.unwrap().unwrap(), 1, "deletes too");
    });
}

const PODS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: w, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node2, containers: [{name: c}]}
"#;

fn identities(lab: &TestLab, node: &str) -> BTreeMap<String, u32> {
    let v: Vec<Value> = serde_json::from_str(&lab.cilium_on(node, &["identity", "list", "-o", "json"])).unwrap();
    v.iter()
        .filter_map(|i| {
            let app = i["labels"].as_array()?.iter().filter_map(|l| l.as_str()).find_map(|l| l.strip_prefix("k8s:app="))?.to_string();
            Some((app, i["id"].as_u64()? as u32))
        })
        .collect()
}

/// Until `f` holds (10 s at most); returns its last value.
fn eventually<T>(mut f: impl FnMut() -> (bool, T)) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, v) = f();
        if ok || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn all_identities(lab: &TestLab) -> Vec<BTreeMap<String, u32>> {
    ["node1", "node2", "node3"].iter().map(|n| identities(lab, n)).collect()
}

fn agree(ids: &[BTreeMap<String, u32>], app: &str) -> bool {
    ids[0].contains_key(app) && ids.iter().all(|m| m.get(app) == ids[0].get(app))
}

fn node_names(lab: &TestLab) -> Vec<String> {
    let out = lab.cilium(&["node", "list", "-o", "json"]);
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.iter().map(|n| n["name"].as_str().unwrap().to_string()).collect()
}

/// Three nodes with etcd: agents publish themselves and their endpoints
/// under leases and read the others', and give the same labels the same
/// number; with etcd stopped they keep enforcing; once it is back, new
/// labels get numbers that agree; a dead node's entries expire.
#[test]
fn agents_share_cluster_state_through_etcd() {
    let lab = TestLab::create(&[PODS], &[], &["--nodes", "3", "--kvstore"]);
    let ids = eventually(|| {
        let ids = all_identities(&lab);
        (agree(&ids, "web") && agree(&ids, "client"), ids)
    });
    assert!(agree(&ids, "web") && agree(&ids, "client"), "same numbers on every node: {ids:?}");
    let nodes = eventually(|| {
        let n = node_names(&lab);
        (n.len() == 3, n)
    });
    assert_eq!(nodes, vec!["node1", "node2", "node3"], "nodes from the kvstore");
    let status = String::from_utf8_lossy(&lab.cilium(&["status"]).stdout).into_owned();
    assert!(status.contains("KVStore:                 Ok   etcd: http://172.30.0.1:2379"), "{status}");
    let pods = lab.pods();
    let on = |node: &str| pods.iter().find(|p| p["labels"]["app"] == "web" && p["node"] == node).unwrap();
    let web3 = format!("default/{}", on("node3")["name"].as_str().unwrap());
    let web1 = format!("default/{}", on("node1")["name"].as_str().unwrap());
    assert!(lab.probe("default/client", &web3, 80, "tcp"));
    let web3_addr: std::net::SocketAddr = (on("node3")["ip"].as_str().unwrap().parse::<std::net::Ipv4Addr>().unwrap(), 80).into();
    let mut held = lab.connect_from("default/client", web3_addr).expect("connect to web on node3");
    cilium_privileged_tests::lab::http_roundtrip(&mut held).expect("a request before etcd stops");
    lab.lab(&["etcd", "stop"]);
    assert!(lab.probe("default/client", &web3, 80, "tcp"), "enforcing goes on without etcd");
    cilium_privileged_tests::lab::http_roundtrip(&mut held).expect("the connection lives on without etcd");
    lab.lab(&["etcd", "start"]);
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: late, labels: {app: late}}\nspec: {nodeName: node3, containers: [{name: l}]}\n");
    let ids = eventually(|| {
        let ids = all_identities(&lab);
        (agree(&ids, "late"), ids)
    });
    assert!(agree(&ids, "late"), "{ids:?}");
    cilium_privileged_tests::lab::http_roundtrip(&mut held).expect("and after etcd is back");
    // node3 dies: its lease expires, the others drop its node and pods
    let web3_ip = on("node3")["ip"].as_str().unwrap().to_string();
    lab.lab(&["agent", "kill", "--node", "node3"]);
    let nodes = eventually(|| {
        let n = node_names(&lab);
        (n.len() == 2, n)
    });
    assert_eq!(nodes, vec!["node1", "node2"], "node3's entries expired");
    let ipcache = String::from_utf8_lossy(&lab.cilium(&["bpf", "ipcache", "list", "-o", "json"]).stdout).into_owned();
    assert!(!ipcache.contains(&format!("\"{web3_ip}/32\"")), "node3's pod left the ipcache: {ipcache}");
    assert!(lab.probe("default/client", &web1, 80, "tcp"), "the others keep working");
}

/// Runs `f` against the lab's etcd (in its world namespace).
fn lab_etcd<T: Send + 'static, F: std::future::Future<Output = T>>(lab: &TestLab, f: impl FnOnce(Etcd) -> F + Send + 'static) -> T {
    let ns = lab.netns("world");
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&ns).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move { f(Etcd::connect(cilium_lab::ETCD_ADDRESS, Duration::from_secs(5)).unwrap()).await })
    })
    .join()
    .unwrap()
}

fn labels_in_etcd(lab: &TestLab, id: u32) -> Option<String> {
    lab_etcd(lab, move |e| async move { e.identity_labels(id).await.unwrap() })
}

/// Identity garbage collection: once no endpoint uses an identity, the
/// collecting agent frees it in etcd; an identity a running pod uses that
/// etcd lost is put back, with its number, by the agent holding it.
#[test]
fn unused_identities_are_freed_and_lost_ones_put_back() {
    let lab = TestLab::create(&[PODS], &["--identity-gc-interval=1s"], &["--nodes", "2", "--kvstore"]);
    const TEMP: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: temp, labels: {app: temp}}\nspec: {nodeName: node2, containers: [{name: t}]}\n";
    lab.apply(TEMP);
    let ids = identities(&lab, "node1");
    let (temp, client, web) = (ids["temp"], ids["client"], ids["web"]);
    let temp_labels = labels_in_etcd(&lab, temp).expect("allocated in etcd");
    assert!(temp_labels.contains("k8s:app=temp"), "{temp_labels}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(labels_in_etcd(&lab, temp).is_some(), "in use: kept");
    lab.delete(TEMP);
    let freed = eventually(|| {
        let l = labels_in_etcd(&lab, temp);
        (l.is_none(), l)
    });
    assert_eq!(freed, None, "identity {temp} freed once its pod is gone");
    // etcd loses the client's identity while the client runs
    let client_labels = labels_in_etcd(&lab, client).expect("client identity");
    let lost = client_labels.clone();
    lab_etcd(&lab, move |e| async move {
        e.delete(&format!("{}id/{client}", cilium_kvstore::IDENTITIES_PREFIX)).await.unwrap();
        e.delete(&format!("{}labels/{lost}", cilium_kvstore::IDENTITIES_PREFIX)).await.unwrap();
    });
    let back = eventually(|| {
        let l = labels_in_etcd(&lab, client);
        (l.is_some(), l)
    });
    assert_eq!(back.as_deref(), Some(client_labels.as_str()), "put back under its number");
    assert!(labels_in_etcd(&lab, web).is_some(), "the others untouched");
    let now = identities(&lab, "node2");
    assert_eq!((now["client"], now["web"]), (client, web), "no renumbering");
}

/// A pod whose labels need a new number from an etcd that does not answer
/// (its packets dropped, as in a partition) waits, and fails after etcd's
/// operation timeout; the agent answers everything else meanwhile.
#[test]
fn a_silent_etcd_holds_up_only_the_pod_that_needs_it() {
    let lab = TestLab::create(&["apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: a}}\nspec: {containers: [{name: a}]}\n"], &[], &["--kvstore"]);
    let nft = |args: &[&str]| {
        let mut a = vec!["exec", "node1", "--", "nft"];
        a.extend_from_slice(args);
        lab.lab(&a);
    };
    nft(&["add", "table", "inet", "partition"]);
    nft(&["add", "chain", "inet", "partition", "out", "{ type filter hook output priority 0 ; }"]);
    nft(&["add", "rule", "inet", "partition", "out", "tcp", "dport", "2379", "drop"]);
    let pod_b = lab.write("b.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: b, labels: {app: b}}\nspec: {containers: [{name: b}]}\n");
    let name = lab.name.clone();
    let apply = std::thread::spawn(move || cilium_privileged_tests::lab::cilium().args(["lab", "apply", "--name", &name, "-f"]).arg(&pod_b).output().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let status = lab.cilium_on("node1", &["status"]);
    let waited = t.elapsed();
    assert!(status.contains("KVStore:"), "{status}");
    assert!(!apply.is_finished(), "pod b still waits for etcd");
    assert!(waited < Duration::from_secs(2), "the agent answered at once, not after etcd's 5 s timeout: {waited:?}");
    let out = apply.join().unwrap();
    assert!(!out.status.success(), "pod b's CNI ADD fails when etcd does not answer");
    nft(&["delete", "table", "inet", "partition"]);
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: b, labels: {app: b}}\nspec: {containers: [{name: b}]}\n");
    assert!(identities(&lab, "node1").contains_key("b"), "pod b gets its identity once etcd answers");
}
