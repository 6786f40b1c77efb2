//! A real, third-party container runtime for the CNI plugin: containerd 1.6
//! with crun, driven by `ctr run --cni` inside a lab node's network
//! namespace.
//!
//! What `ctr run --cni` (containerd 1.6, go-cni defaults) does and what this
//! module has to work around:
//! - it reads the *first* network configuration, sorted by file name, from
//!   the fixed directory /etc/cni/net.d and finds plugins only in the fixed
//!   /opt/cni/bin (no flag, no environment variable); it needs no `loopback`
//!   plugin (it sets up exactly one network, named eth0);
//! - it runs the plugin itself, in its own network namespace, with
//!   `CNI_CONTAINERID=<namespace>-<container id>` and
//!   `CNI_NETNS=/proc/<task pid>/ns/net`; DEL comes after the task exited,
//!   with no netns, and a failing DEL is only logged (ctr still exits 0);
//! - libcni caches results in /var/lib/cni/results.
//!
//! [`CniInstall`] puts uniquely named files in those fixed places, under a
//! machine-wide lock (two runs at once would otherwise both use whichever
//! configuration sorts first), and removes them, and any directory it had to
//! create, when dropped. It never replaces a file it did not create.
//!
//! [`Containerd`] runs a private containerd (own root, state, socket and
//! config, in a temporary directory) inside the node's network namespace and
//! a private mount namespace, in which:
//! - /run is a directory of the test, so the shims' sockets
//!   (/run/containerd/s, a fixed path in 1.6) never land on the machine;
//! - on a hybrid cgroup host whose cgroup2 hierarchy has controllers (crun
//!   1.8 refuses to create containers there: "cgroups in hybrid mode not
//!   supported, drop all controllers from cgroupv2") the cgroup2 mount at
//!   /sys/fs/cgroup/unified is detached, so crun sees a plain cgroup v1 host.
//!
//! `ctr` itself stays in the machine's mount namespace (the plugin it runs
//! needs the agent socket under /var/run/cilium-lab) and enters only the
//! node's network namespace. Dropping a [`Containerd`] deletes its tasks and
//! containers, stops it, kills anything left that it started, and removes
//! its directory.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where `ctr run --cni` reads network configurations (fixed in 1.6).
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Where `ctr run --cni` looks for plugins (fixed in 1.6).
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// libcni's cache of ADD results (fixed in 1.6).
pub const CNI_CACHE_DIR: &str = "/var/lib/cni/results";
/// The containerd namespace the tests use; part of the CNI container ID.
pub const NAMESPACE: &str = "default";
/// Serializes tests that put configuration in [`CNI_CONF_DIR`].
const LOCK_NAME: &str = "cilium-cni-containerd-test.lock";

/// The external programs, found on PATH.
#[derive(Debug, Clone)]
pub struct Tools {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub crun: PathBuf,
    pub busybox: PathBuf,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// Finds every program the containerd tests need; fails (never skips) with
/// the Debian package to install when one is missing.
pub fn require_tools() -> Tools {
    crate::require_root();
    let need = |name: &str, package: &str| {
        find_program(name).unwrap_or_else(|| panic!("`{name}` not found on PATH: install it with `apt-get install {package}`"))
    };
    let containerd = need("containerd", "containerd");
    let ctr = need("ctr", "containerd");
    // containerd finds its shim on PATH
    need("containerd-shim-runc-v2", "containerd");
    let crun = need("crun", "crun");
    let busybox = need("busybox", "busybox-static");
    need("tar", "tar");
    need("sha256sum", "coreutils");
    need("ip", "iproute2");
    let dynamic = Command::new("ldd").arg(&busybox).output().is_ok_and(|o| o.status.success());
    assert!(!dynamic, "{} is dynamically linked; the image needs a static one: `apt-get install busybox-static`", busybox.display());
    Tools { containerd, ctr, crun, busybox }
}

/// Builds the busybox OCI image tar with scripts/oci-busybox-image.sh.
/// Returns the image name recorded in it.
pub fn build_busybox_image(tools: &Tools, out: &Path, name: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/oci-busybox-image.sh");
    let o = Command::new("sh")
        .arg(&script)
        .arg(out)
        .arg(name)
        .env("BUSYBOX", &tools.busybox)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    check(o, &format!("{} {}", script.display(), out.display()));
    name.to_string()
}

fn check(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what} failed ({}):\nstdout: {stdout}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Runs a command, killing it after `timeout`.
fn output_within(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (mut out, mut err) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let s = child.wait()?;
            let _ = (t_out.join(), t_err.join());
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out after {timeout:?} ({s})")));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() })
}

// ------------------------------------------------------------ host lock ---

/// An exclusive lock file in /run/lock, deleted when released.
struct HostLock {
    path: PathBuf,
    _file: File,
}

impl HostLock {
    fn acquire(name: &str, timeout: Duration) -> HostLock {
        let dir = if Path::new("/run/lock").is_dir() { Path::new("/run/lock") } else { Path::new("/tmp") };
        let path = dir.join(name);
        let until = Instant::now() + timeout;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            // SAFETY: flock on an owned, open fd.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // the holder before us deletes the file before unlocking: a
                // lock on a deleted file is no lock
                let same = std::fs::metadata(&path).is_ok_and(|m| f.metadata().is_ok_and(|fm| fm.ino() == m.ino() && fm.dev() == m.dev()));
                if same {
                    return HostLock { path, _file: f };
                }
                continue;
            }
            assert!(
                Instant::now() < until,
                "another test holds {} for over {timeout:?} (a containerd CNI test running elsewhere on this machine?)",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        // delete first, then unlock (closing the file)
        let _ = std::fs::remove_file(&self.path);
    }
}

// ----------------------------------------------------------- CNI files ---

/// The directories from `dir` up that do not exist yet, deepest first.
fn missing_dirs(dir: &Path) -> Vec<PathBuf> {
    dir.ancestors().take_while(|p| !p.exists()).map(Path::to_path_buf).collect()
}

/// Our plugin and a network configuration selecting it, installed where
/// `ctr run --cni` looks; removed (with any directory this made) on drop.
pub struct CniInstall {
    /// Network name, also the plugin's file name in [`CNI_BIN_DIR`].
    pub network: String,
    pub conf_file: PathBuf,
    pub plugin_link: PathBuf,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    _lock: HostLock,
}

impl CniInstall {
    /// `unique` makes the names unique (e.g. the lab's name); `plugin` is the
    /// cilium-cni binary; `socket` the agent socket it talks to.
    pub fn install(unique: &str, plugin: &Path, socket: &Path) -> CniInstall {
        let lock = HostLock::acquire(LOCK_NAME, Duration::from_secs(300));
        let network = format!("cilium-cni-test-{unique}");
        let mut me = CniInstall {
            conf_file: Path::new(CNI_CONF_DIR).join(format!("00-{network}.conflist")),
            plugin_link: Path::new(CNI_BIN_DIR).join(&network),
            network,
            files: Vec::new(),
            dirs: Vec::new(),
            _lock: lock,
        };
        for d in [CNI_CONF_DIR, CNI_BIN_DIR, CNI_CACHE_DIR] {
            for m in missing_dirs(Path::new(d)) {
                if !me.dirs.contains(&m) {
                    me.dirs.push(m);
                }
            }
        }
        // deepest first, whichever tree they are in
        me.dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in [CNI_CONF_DIR, CNI_BIN_DIR] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {d}: {e}"));
        }
        // a symlink named after the network: never clobbers an installed cilium-cni
        std::os::unix::fs::symlink(plugin, &me.plugin_link)
            .unwrap_or_else(|e| panic!("creating {} (not replacing anything): {e}", me.plugin_link.display()));
        me.files.push(me.plugin_link.clone());
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": me.network,
            "plugins": [{
                "type": me.network,
                "socket-path": socket.display().to_string(),
            }],
        });
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&me.conf_file)
            .unwrap_or_else(|e| panic!("creating {} (not replacing anything): {e}", me.conf_file.display()));
        me.files.push(me.conf_file.clone());
        f.write_all(serde_json::to_string_pretty(&conf).expect("json").as_bytes()).expect("writing the CNI configuration");
        drop(f);
        // ctr uses the first configuration in name order: it must be ours
        let mut confs: Vec<String> = std::fs::read_dir(CNI_CONF_DIR)
            .expect("reading the CNI configuration directory")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| [".conf", ".conflist", ".json"].iter().any(|ext| n.ends_with(ext)))
            .collect();
        confs.sort();
        let ours = me.conf_file.file_name().expect("name").to_string_lossy().into_owned();
        assert_eq!(
            confs.first(),
            Some(&ours),
            "{CNI_CONF_DIR} holds a configuration that sorts before ours; `ctr run --cni` would use it instead (all: {confs:?})"
        );
        me
    }
}

impl Drop for CniInstall {
    fn drop(&mut self) {
        for f in &self.files {
            if let Err(e) = std::fs::remove_file(f) {
                eprintln!("removing {}: {e}", f.display());
            }
        }
        // libcni's cache entries of our network (left if DEL never ran)
        if let Ok(rd) = std::fs::read_dir(CNI_CACHE_DIR) {
            let prefix = format!("{}-", self.network);
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // directories we made, if nothing else is in them now
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

// ----------------------------------------------------------- containerd ---

fn is_hybrid_with_v2_controllers() -> bool {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, TMPFS_MAGIC, statfs};
    let is = |p: &str, t| statfs(p).is_ok_and(|s| s.filesystem_type() == t);
    is("/sys/fs/cgroup", TMPFS_MAGIC)
        && is("/sys/fs/cgroup/unified", CGROUP2_SUPER_MAGIC)
        && std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").is_ok_and(|c| !c.trim().is_empty())
}

/// `cmd` will run in the network namespace at `netns` (nothing else changes).
fn in_netns(cmd: &mut Command, netns: &Path) {
    let f = File::open(netns).unwrap_or_else(|e| panic!("opening network namespace {}: {e}", netns.display()));
    // SAFETY: setns is async-signal-safe and allocates nothing; `f` moves
    // into the closure and stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect())
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// A private containerd in a lab node's network namespace; stopped and
/// removed, with everything it started, on drop.
pub struct Containerd {
    pub tools: Tools,
    pub netns: PathBuf,
    pub address: PathBuf,
    /// overlayfs when containerd supports it here, else native
    pub snapshotter: String,
    dir: PathBuf,
    child: Child,
    /// container ids run through [`Containerd::spawn_run`]
    ids: Mutex<Vec<String>>,
    tmp: tempfile::TempDir,
}

impl Containerd {
    pub fn start(tools: &Tools, netns: &Path) -> Containerd {
        // /tmp, not $TMPDIR: the directory must not be under /run, which
        // containerd's mount namespace replaces
        let tmp = tempfile::Builder::new().prefix("cilium-ctrd-").tempdir_in("/tmp").expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let address = dir.join("containerd.sock");
        for d in ["root", "state", "run", "opt", "crun", "fifo"] {
            std::fs::create_dir(dir.join(d)).expect("containerd dirs");
        }
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
# the CRI plugin is Kubernetes' way in; ctr does not need it
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        let log = File::create(dir.join("containerd.log")).expect("containerd log");

        let hide_unified = is_hybrid_with_v2_controllers();
        let netns_f = File::open(netns).unwrap_or_else(|e| panic!("opening network namespace {}: {e}", netns.display()));
        let run_src = CString::new(dir.join("run").as_os_str().as_bytes()).expect("path");
        let mut cmd = Command::new(&tools.containerd);
        cmd.arg("--config").arg(dir.join("config.toml")).stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        // SAFETY: only async-signal-safe syscalls on data prepared before
        // the fork; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if libc::setsid() < 0 {
                    return fail();
                }
                if libc::setns(netns_f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return fail();
                }
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                // nothing done below may propagate to the machine
                if libc::mount(c"none".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
                    return fail();
                }
                if hide_unified && libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH) != 0 {
                    return fail();
                }
                if libc::mount(run_src.as_ptr(), c"/run".as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
                    return fail();
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", tools.containerd.display()));
        let mut me = Containerd {
            tools: tools.clone(),
            netns: netns.to_path_buf(),
            address,
            snapshotter: "native".into(),
            dir,
            child,
            ids: Mutex::new(Vec::new()),
            tmp,
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = me.child.try_wait() {
                panic!("containerd exited ({st}):\n{}", me.log());
            }
            if me.address.exists() && me.ctr_output(&["version"]).is_ok_and(|o| o.status.success()) {
                break;
            }
            assert!(Instant::now() < until, "containerd did not answer within 30s:\n{}", me.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        let plugins = me.ctr_ok(&["plugins", "ls"]);
        if plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&"overlayfs") && f.last() == Some(&"ok")
        }) {
            me.snapshotter = "overlayfs".into();
        }
        me
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ctr --address <ours> --namespace default`, in the node's network
    /// namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(&self.tools.ctr);
        in_netns(&mut cmd, &self.netns);
        cmd.arg("--address").arg(&self.address).args(["--namespace", NAMESPACE]);
        cmd
    }

    fn ctr_output(&self, args: &[&str]) -> std::io::Result<Output> {
        output_within(self.ctr().args(args), Duration::from_secs(60))
    }

    /// For cleanup: a shorter leash, errors ignored by the caller.
    fn ctr_quick(&self, args: &[&str]) -> String {
        output_within(self.ctr().args(args), Duration::from_secs(15)).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr_output(args).unwrap_or_else(|e| panic!("ctr {}: {e}", args.join(" ")));
        check(out, &format!("ctr {}", args.join(" ")))
    }

    /// Imports an image tar (OCI layout) and unpacks it.
    pub fn import(&self, tar: &Path) {
        self.ctr_ok(&["images", "import", "--snapshotter", &self.snapshotter, tar.to_str().expect("path")]);
    }

    /// The crun state directory of a container (crun's `--root`).
    pub fn runtime_state(&self, id: &str) -> PathBuf {
        self.dir.join("crun").join(NAMESPACE).join(id)
    }

    /// The CNI container ID ctr uses for a container.
    pub fn cni_container_id(id: &str) -> String {
        format!("{NAMESPACE}-{id}")
    }

    /// Starts `ctr run --cni --rm` (crun as the runtime) with piped stdio.
    pub fn spawn_run(&self, image: &str, id: &str, argv: &[&str]) -> RunningCtr {
        self.ids.lock().expect("ids").push(id.to_string());
        let mut cmd = self.ctr();
        cmd.args(["run", "--cni", "--rm", "--snapshotter", &self.snapshotter])
            .arg("--runc-binary")
            .arg(&self.tools.crun)
            .arg("--runc-root")
            .arg(self.dir.join("crun"))
            .arg("--fifo-dir")
            .arg(self.dir.join("fifo"))
            // one level, removed by crun with the container
            .arg("--cgroup")
            .arg(format!("/{id}"))
            .arg(image)
            .arg(id)
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting ctr run: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(String::new()));
        let err2 = err.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                err2.lock().expect("stderr").push_str(&line);
                line.clear();
            }
        });
        RunningCtr { stdin: child.stdin.take(), child, lines: rx, stdout: Vec::new(), stderr: err }
    }

    /// The pid of a running task, from `ctr task ls`.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        self.ctr_ok(&["tasks", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(1).and_then(|p| p.parse().ok())).flatten()
        })
    }

    /// Container ids containerd knows.
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["containers", "ls", "-q"]).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }

    fn cleanup(&mut self) {
        let running = matches!(self.child.try_wait(), Ok(None));
        if running {
            // tasks first (the shim runs `crun delete`), then containers
            for t in self.ctr_quick(&["tasks", "ls", "-q"]).lines().filter(|l| !l.is_empty()) {
                eprintln!("deleting leftover task {t}");
                self.ctr_quick(&["tasks", "kill", "--signal", "SIGKILL", t]);
                self.ctr_quick(&["tasks", "delete", "--force", t]);
            }
            for c in self.ctr_quick(&["containers", "ls", "-q"]).lines().filter(|l| !l.is_empty()) {
                eprintln!("deleting leftover container {c}");
                self.ctr_quick(&["containers", "delete", c]);
            }
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // whatever it started and left: shims (they name our socket) and
        // the containers they parent
        let needle = format!("-address\0{}\0", self.address.display());
        let shims: Vec<u32> = pids()
            .into_iter()
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_bytes())))
            .collect();
        for p in pids() {
            if ppid(p).is_some_and(|pp| shims.contains(&pp)) {
                eprintln!("killing leftover container process {p}");
                kill(p);
            }
        }
        for p in &shims {
            eprintln!("killing leftover shim {p}");
            kill(*p);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while shims.iter().any(|p| alive(*p)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        // cgroups crun would have removed with the container
        let ids = self.ids.lock().map(|v| v.clone()).unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in mounts.lines() {
            let Some((pre, post)) = l.split_once(" - ") else { continue };
            let fstype = post.split_whitespace().next().unwrap_or("");
            let Some(mnt) = pre.split_whitespace().nth(4) else { continue };
            if fstype == "cgroup" || fstype == "cgroup2" {
                for id in &ids {
                    let cg = Path::new(mnt).join(id);
                    if cg.is_dir() && std::fs::remove_dir(&cg).is_err() {
                        eprintln!("could not remove cgroup {}", cg.display());
                    }
                }
            }
        }
        // mounts only ever live in containerd's own mount namespace, which
        // is gone with its processes; refuse to recurse into one anyway
        if mounts.lines().any(|l| l.split_whitespace().nth(4).is_some_and(|m| Path::new(m).starts_with(&self.dir))) {
            eprintln!("{} still has mounts; leaving it", self.dir.display());
            self.tmp.disable_cleanup(true);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("containerd's log ends:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        self.cleanup();
    }
}

/// A `ctr run` in progress; killed on drop if still running.
pub struct RunningCtr {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every stdout line received so far.
    pub stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl RunningCtr {
    /// Waits for a stdout line containing `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.stdout.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no line with {needle:?} within {timeout:?}; {}", self.describe()),
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200));
                    panic!("ctr closed its output before printing {needle:?}; {}", self.describe())
                }
            }
        }
    }

    /// Writes a line to the container's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(format!("{line}\n").as_bytes()).expect("writing to ctr's stdin");
        stdin.flush().expect("flushing ctr's stdin");
    }

    /// Waits for ctr to exit; collects the rest of stdout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let until = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for ctr") {
                break s;
            }
            assert!(Instant::now() < until, "ctr run did not exit within {timeout:?}; {}", self.describe());
            std::thread::sleep(Duration::from_millis(20));
        };
        self.stdin = None;
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stdout.push(l);
        }
        status
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn describe(&self) -> String {
        format!("ctr stdout so far:\n{}\nctr stderr:\n{}", self.stdout.join("\n"), self.stderr())
    }
}

impl Drop for RunningCtr {
    fn drop(&mut self) {
        self.stdin = None;
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
