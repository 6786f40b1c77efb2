//! Driving a lab through the real `cilium` binary, as a user would. Each
//! [`TestLab`] has a unique name and is torn down when dropped, also when the
//! test panics.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The directory holding the workspace's binaries (target/debug or release).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CILIUM_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    for b in ["cilium", "cilium-agent", "cilium-cni"] {
        assert!(dir.join(b).exists(), "{} missing: build the workspace first (cargo build --workspace)", dir.join(b).display());
    }
    dir
}

pub fn cilium() -> Command {
    Command::new(bin_dir().join("cilium"))
}

fn check(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what} failed ({}):\nstdout: {stdout}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A lab for one test.
pub struct TestLab {
    pub name: String,
    dir: tempfile::TempDir,
}

impl TestLab {
    /// Creates a lab from manifest texts.
    pub fn up(manifests: &[&str]) -> TestLab {
        Self::up_with(manifests, &[])
    }

    pub fn up_with(manifests: &[&str], agent_args: &[&str]) -> TestLab {
        Self::create(manifests, agent_args, &[])
    }

    /// A lab of `nodes` nodes.
    pub fn up_nodes(manifests: &[&str], nodes: usize) -> TestLab {
        Self::create(manifests, &[], &["--nodes", &nodes.to_string()])
    }

    /// `cilium lab up` with the manifests, agent flags and flags of its own
    /// (`--nodes`, `--kvstore`, `--routing-mode`).
    pub fn create(manifests: &[&str], agent_args: &[&str], lab_args: &[&str]) -> TestLab {
        crate::require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}x{n}", std::process::id() % 100_000);
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = TestLab { name, dir };
        let mut cmd = cilium();
        cmd.args(["lab", "up", "--name", &lab.name]).args(lab_args);
        for (i, m) in manifests.iter().enumerate() {
            cmd.arg("-f").arg(lab.write(&format!("m{i}.yaml"), m));
        }
        for a in agent_args {
            cmd.arg(format!("--agent-arg={a}"));
        }
        check(cmd.output().expect("run cilium lab up"), "cilium lab up");
        lab
    }

    /// Writes a file in the test's temporary directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write manifest");
        p
    }

    /// `cilium lab <args> --name <lab>`, asserting success.
    pub fn lab(&self, args: &[&str]) -> String {
        let out = self.lab_output(args);
        check(out, &format!("cilium lab {}", args.join(" ")))
    }

    pub fn lab_output(&self, args: &[&str]) -> Output {
        let mut cmd = cilium();
        cmd.arg("lab");
        // `exec` takes everything after `--` literally: the name goes before it
        match args.iter().position(|a| *a == "--") {
            Some(i) => cmd.args(&args[..i]).args(["--name", &self.name]).args(&args[i..]),
            None => cmd.args(args).args(["--name", &self.name]),
        };
        cmd.output().expect("run cilium lab")
    }

    /// `cilium <args>` against the lab's agent.
    pub fn cilium(&self, args: &[&str]) -> Output {
        cilium().args(args).env("CILIUM_SOCK", self.socket()).output().expect("run cilium")
    }

    /// `cilium ARGS` against the agent of `node`; its stdout, the command
    /// having succeeded.
    pub fn cilium_on(&self, node: &str, args: &[&str]) -> String {
        let sock = format!("/var/run/cilium-lab/{}/{node}/cilium.sock", self.name);
        check(cilium().args(args).env("CILIUM_SOCK", sock).output().expect("run cilium"), "cilium")
    }

    /// `cilium-health ARGS` against the agent of `node`.
    pub fn cilium_health_on(&self, node: &str, args: &[&str]) -> Output {
        let sock = format!("/var/run/cilium-lab/{}/{node}/cilium.sock", self.name);
        Command::new(bin_dir().join("cilium-health")).args(args).env("CILIUM_SOCK", sock).output().expect("run cilium-health")
    }

    pub fn cilium_ok(&self, args: &[&str]) -> String {
        check(self.cilium(args), &format!("cilium {}", args.join(" ")))
    }

    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/cilium-lab/{}/node1/cilium.sock", self.name))
    }

    pub fn apply(&self, yaml: &str) -> String {
        let f = self.write(&format!("apply-{}.yaml", COUNTER.fetch_add(1, Ordering::SeqCst)), yaml);
        self.lab(&["apply", "-f", f.to_str().unwrap()])
    }

    pub fn delete(&self, yaml: &str) -> String {
        let f = self.write(&format!("delete-{}.yaml", COUNTER.fetch_add(1, Ordering::SeqCst)), yaml);
        self.lab(&["delete", "-f", f.to_str().unwrap()])
    }

    pub fn pods(&self) -> Vec<Value> {
        serde_json::from_str(&self.lab(&["get", "pods", "-o", "json"])).expect("pods json")
    }

    /// `namespace/name` of the (first) pod with label app=<app>.
    pub fn pod(&self, app: &str) -> String {
        self.pods()
            .into_iter()
            .find(|p| p["labels"]["app"] == app)
            .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap(), p["name"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("no pod with app={app}"))
    }

    pub fn pod_ip(&self, app: &str) -> Ipv4Addr {
        let p = self.pods().into_iter().find(|p| p["labels"]["app"] == app).expect("pod");
        p["ip"].as_str().unwrap().parse().unwrap()
    }

    /// One probe; returns whether it got an answer.
    /// A probe's full result (`reachable`, `detail`, ...).
    pub fn probe_json(&self, from: &str, to: &str, port: u16, protocol: &str) -> Value {
        let out = self.lab(&["probe", "--from", from, "--to", to, "--port", &port.to_string(), "--protocol", protocol, "--timeout", "1"]);
        serde_json::from_str(out.trim()).expect("probe json")
    }

    /// Which pod answered a probe (`namespace/name`), if one did.
    pub fn probe_pod(&self, from: &str, to: &str, port: u16, protocol: &str) -> Option<String> {
        let v = self.probe_json(from, to, port, protocol);
        if v["reachable"] != true {
            return None;
        }
        let detail = v["detail"].as_str().unwrap_or("");
        detail.split_whitespace().find_map(|w| w.strip_prefix("pod=")).map(str::to_string)
    }

    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: &str) -> bool {
        self.probe_family(from, to, port, protocol, false)
    }

    /// [`Self::probe`] to the target's IPv6 address with `ipv6` (labs made
    /// with `--ipv6`).
    pub fn probe_family(&self, from: &str, to: &str, port: u16, protocol: &str, ipv6: bool) -> bool {
        let port = port.to_string();
        let mut args = vec!["probe", "--from", from, "--to", to, "--port", &port, "--protocol", protocol, "--timeout", "1"];
        if ipv6 {
            args.push("--ipv6");
        }
        let v: Value = serde_json::from_str(self.lab(&args).trim()).expect("probe json");
        if ipv6 {
            assert!(v["ip"].as_str().is_some_and(|ip| ip.contains(':')), "an IPv6 destination: {v}");
        }
        v["reachable"].as_bool().expect("reachable field")
    }

    /// Path of a pod's (or node's, or world's) network namespace.
    pub fn netns(&self, target: &str) -> PathBuf {
        let state: Value = serde_json::from_slice(&std::fs::read(format!("/var/run/cilium-lab/{}/lab.json", self.name)).unwrap()).unwrap();
        let name = if target == "world" {
            state["world_netns"].as_str().unwrap().to_string()
        } else if let Some(n) = state["nodes"].as_array().unwrap().iter().find(|n| n["name"] == target) {
            n["netns"].as_str().unwrap().to_string()
        } else {
            state["pods"][target]["netns"].as_str().unwrap_or_else(|| panic!("no pod {target}")).to_string()
        };
        PathBuf::from("/var/run/netns").join(name)
    }

    /// A TCP connection opened from inside a namespace (it stays usable from
    /// any thread afterwards).
    pub fn connect_from(&self, target: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let ns = self.netns(target);
        std::thread::spawn(move || {
            cilium_datapath::sys::enter_netns(&ns).map_err(std::io::Error::other)?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .join()
        .expect("connect thread")
    }

    /// Whether a datagram of IP protocol `proto` (one without ports, e.g.
    /// VRRP) sent by a raw socket in `from` reaches a raw socket in `to`.
    pub fn raw_reaches(&self, from: &str, to: &str, proto: u8) -> bool {
        let raw_in = |target: &str| {
            let ns = self.netns(target);
            std::thread::spawn(move || {
                cilium_datapath::sys::enter_netns(&ns).expect("enter netns");
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(proto as i32))).expect("raw socket");
                s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                s
            })
            .join()
            .expect("raw socket thread")
        };
        let rx = raw_in(to);
        let tx = raw_in(from);
        let state: Value = serde_json::from_slice(&std::fs::read(format!("/var/run/cilium-lab/{}/lab.json", self.name)).unwrap()).unwrap();
        let ip: Ipv4Addr = state["pods"][to]["ip"].as_str().expect("pod address").parse().unwrap();
        let dst = SocketAddr::from((ip, 0));
        let marker: [u8; 8] = std::process::id().wrapping_mul(2654435761).wrapping_add(proto as u32).to_be_bytes().repeat(2).try_into().unwrap();
        for _ in 0..3 {
            tx.send_to(&marker, &dst.into()).expect("send raw");
            let until = std::time::Instant::now() + Duration::from_millis(300);
            while std::time::Instant::now() < until {
                let mut buf = [0u8; 2048];
                let Ok(n) = std::io::Read::read(&mut &rx, &mut buf) else { break };
                // the IPv4 header comes first; the payload is the marker
                let got = &buf[..n];
                if got.len() >= 28 && got[9] == proto && got[got.len() - 8..] == marker {
                    return true;
                }
            }
        }
        false
    }

    /// A UDP socket bound inside a namespace (usable from any thread).
    pub fn udp_in(&self, target: &str, bind: SocketAddr) -> std::net::UdpSocket {
        let ns = self.netns(target);
        std::thread::spawn(move || {
            cilium_datapath::sys::enter_netns(&ns).expect("enter netns");
            std::net::UdpSocket::bind(bind).expect("bind udp")
        })
        .join()
        .expect("udp thread")
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let out = cilium().args(["lab", "down", "--name", &self.name]).output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!("cilium lab down {} failed: {}", self.name, String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

/// One HTTP request on an open keep-alive connection; returns the body.
pub fn http_roundtrip(s: &mut TcpStream) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /keepalive HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut len = 0usize;
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad status line {line:?}")));
    }
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
