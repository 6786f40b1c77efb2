//! Processes and namespaces for the lab: `ip` for topology, spawning
//! programs inside a network namespace, and finding every process that lives
//! in one.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

pub const NETNS_DIR: &str = "/var/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip` with arguments; fails with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn netns_add(name: &str) -> anyhow::Result<()> {
    if netns_path(name).exists() {
        bail!("network namespace {name} already exists (run `cilium lab down` first)");
    }
    ip(&["netns", "add", name])
}

pub fn netns_delete(name: &str) {
    if netns_path(name).exists() {
        let _ = ip(&["netns", "delete", name]);
    }
}

/// Network namespace names starting with `prefix`.
pub fn netns_list(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes a sysctl inside a named network namespace.
pub fn netns_sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let (k, v) = (key.to_string(), value.to_string());
    cilium_datapath::sys::in_netns(&netns_path(netns), move || cilium_datapath::sys::sysctl(&k, &v))?;
    Ok(())
}

fn cgroup_procs(cgroup: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs")).with_context(|| format!("opening cgroup {}", cgroup.display()))
}

/// A command that will run inside the network namespace `netns` (only the
/// network namespace changes: mounts, including bpffs, stay visible) and, if
/// given, the cgroup `cgroup` (where a node's socket load balancer applies).
pub fn command_in(netns: &str, cgroup: Option<&Path>, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
    let f = std::fs::File::open(netns_path(netns)).with_context(|| format!("network namespace {netns} does not exist"))?;
    let procs = cgroup.map(cgroup_procs).transpose()?;
    let mut cmd = Command::new(program);
    // SAFETY: setns and write are async-signal-safe; the fds stay open in the
    // parent until spawn returns because they are moved into the closure.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(p) = &procs {
                // "0" moves the writing process: the child, before exec
                if libc::write(std::os::fd::AsRawFd::as_raw_fd(p), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// Moves this process into `cgroup`.
pub fn join_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    cgroup_procs(cgroup)?.write_all(std::process::id().to_string().as_bytes()).with_context(|| format!("joining cgroup {}", cgroup.display()))
}

/// Pids of the processes in a cgroup and its descendants.
pub fn cgroup_processes(cgroup: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect();
    if let Ok(rd) = std::fs::read_dir(cgroup) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_processes(&e.path()));
            }
        }
    }
    out
}

/// Starts a long-running process in `netns` (and `cgroup`), in its own
/// session, output to `log`. Returns its pid.
pub fn spawn_daemon(netns: &str, cgroup: Option<&Path>, program: &Path, args: &[String], log: &Path) -> anyhow::Result<u32> {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = command_in(netns, cgroup, program)?;
    cmd.args(args).stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
    Ok(child.id())
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL.
pub fn stop(pid: u32, grace: std::time::Duration) {
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    let until = std::time::Instant::now() + grace;
    while alive(pid) && std::time::Instant::now() < until {
        reap(pid);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if alive(pid) {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    reap(pid);
}

fn reap(pid: u32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Pids of processes whose network namespace is one of `netns_names`.
pub fn processes_in(netns_names: &[String]) -> Vec<u32> {
    let inodes: Vec<u64> = netns_names
        .iter()
        .filter_map(|n| std::fs::metadata(netns_path(n)).ok().map(|m| m.ino()))
        .collect();
    if inodes.is_empty() {
        return vec![];
    }
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .filter(|pid| *pid != me)
                .filter(|pid| std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino())))
                .collect()
        })
        .unwrap_or_default()
}
