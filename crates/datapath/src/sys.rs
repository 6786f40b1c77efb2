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

/// Seconds of CLOCK_MONOTONIC, the datapath's clock in seconds (conntrack
/// lifetimes; `now_seconds()` in bpf/lib/common.h).
pub fn monotonic_secs() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
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

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the size
    // passed; the kernel reads and writes only within it and the buffers it
    // points to, which the callers size for `count` elements.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, size_of::<BatchAttr>() as u32) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Reads a whole hash map in batches of `chunk` (BPF_MAP_LOOKUP_BATCH): a
/// handful of syscalls instead of two per entry, so walking a full
/// conntrack table does not hold up the datapath.
pub fn map_dump_batched<K: Copy + Default, V: Copy + Default>(fd: std::os::fd::BorrowedFd<'_>, chunk: usize) -> std::io::Result<Vec<(K, V)>> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    let mut token: u64 = 0;
    let mut first = true;
    loop {
        let mut next: u64 = 0;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token as *const u64 as u64 },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// Deletes keys of a hash map in one syscall per `chunk` (BPF_MAP_DELETE_BATCH).
/// Keys already gone are skipped. Returns how many were deleted.
pub fn map_delete_batched<K: Copy>(fd: std::os::fd::BorrowedFd<'_>, keys: &[K], chunk: usize) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut deleted = 0;
    for part in keys.chunks(chunk) {
        let mut attr = BatchAttr {
            keys: part.as_ptr() as u64,
            count: part.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        match bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => deleted += attr.count as usize,
            // a key vanished meanwhile (LRU eviction, the datapath): fall back
            // to counting what went before it and carry on with the rest
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                deleted += attr.count as usize;
                let rest = &part[(attr.count as usize + 1).min(part.len())..];
                deleted += map_delete_batched(fd, rest, chunk)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Writes entries of a map in one syscall per `chunk` (BPF_MAP_UPDATE_BATCH).
/// On failure, the entries before the failing one are written.
pub fn map_update_batched<K: Copy, V: Copy>(fd: std::os::fd::BorrowedFd<'_>, keys: &[K], values: &[V], chunk: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (k, v) in keys.chunks(chunk).zip(values.chunks(chunk)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// Looks one key up in a map (BPF_MAP_LOOKUP_ELEM; for an LPM trie, the
/// longest prefix matching the key). None when nothing matches.
pub fn map_lookup<K: Copy, V: Copy + Default>(fd: std::os::fd::BorrowedFd<'_>, key: &K) -> std::io::Result<Option<V>> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = V::default();
    let mut attr = ElemAttr { map_fd: fd.as_raw_fd() as u32, pad: 0, key: key as *const K as u64, value: &mut value as *mut V as u64, flags: 0 };
    // SAFETY: attr is a valid bpf_attr prefix; key and value outlive the call
    // and have the map's key and value sizes (the caller's types).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, &mut attr as *mut ElemAttr, size_of::<ElemAttr>() as u32) };
    if rc == 0 {
        return Ok(Some(value));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Opens a pinned BPF object (a link, a map) by path.
pub fn obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, pad: 0 };
    // SAFETY: attr is a valid bpf_attr prefix; pathname outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &mut attr as *mut ObjAttr, size_of::<ObjAttr>() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Points a BPF link at another program, atomically (BPF_LINK_UPDATE).
pub fn link_update(link: std::os::fd::BorrowedFd<'_>, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = UpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    // SAFETY: attr is a valid bpf_attr prefix of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &mut attr as *mut UpdateAttr, size_of::<UpdateAttr>() as u32) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
