//! Small system facilities: bpffs, network namespaces, sysctls, clocks.

use std::ffi::CString;
use std::fs::File;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use crate::{DatapathError, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs at `mount_point` unless one is there already.
pub fn ensure_bpffs(mount_point: &Path) -> Result<()> {
    if is_bpffs(mount_point) {
        return Ok(());
    }
    std::fs::create_dir_all(mount_point)
        .map_err(|source| DatapathError::Io { what: format!("creating {}", mount_point.display()), source })?;
    nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(
        |e| DatapathError::Io { what: format!("mounting bpffs at {}", mount_point.display()), source: e.into() },
    )
}

/// The bpffs mount point that contains `path` (walking up until one is).
pub fn bpffs_root_of(path: &Path) -> Option<&Path> {
    let mut p = Some(path);
    while let Some(cur) = p {
        if cur.exists() && is_bpffs(cur) {
            let parent = cur.parent();
            if parent.is_none_or(|pp| !is_bpffs(pp)) {
                return Some(cur);
            }
        }
        p = cur.parent();
    }
    None
}

/// ifindex of an interface in the current network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|source| DatapathError::Io { what: format!("writing {path}"), source })
}

/// Seconds of CLOCK_BOOTTIME, the clock conntrack lifetimes use.
pub fn boottime_secs() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u32)
        .unwrap_or(0)
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|source| DatapathError::Io { what: format!("opening netns {}", path.display()), source })?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .map_err(|e| DatapathError::Io { what: format!("entering netns {}", path.display()), source: e.into() })
}

/// Runs `f` on a new thread inside the network namespace at `path`, and
/// returns its result. The caller's thread never changes namespace.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&path)?;
        f()
    })
    .join()
    .map_err(|_| DatapathError::Netlink("netns worker thread panicked".into()))?
}
