//! Pinned state across agent versions: a pinned map of an older shape is
//! replaced, and the policy revision goes on from where it was (conntrack
//! entries remember revisions; one of an older policy must never match).

use std::path::{Path, PathBuf};
use std::process::Command;

use cilium_datapath::{Datapath, LoadOptions, Loaded};
use cilium_privileged_tests::require_root;

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool").args(args).output().expect("bpftool");
    assert!(out.status.success(), "bpftool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_replaced_runtime_map_keeps_the_policy_revision() {
    require_root();
    cilium_datapath::sys::ensure_bpffs(Path::new("/sys/fs/bpf")).unwrap();
    let dir = PathBuf::from(format!("/sys/fs/bpf/cilium-test-pins-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    // an older agent's runtime map: 12 bytes of value, policy revision 77
    let runtime = dir.join("cilium_runtime");
    let runtime = runtime.to_str().unwrap();
    bpftool(&["map", "create", runtime, "type", "array", "key", "4", "value", "12", "entries", "1", "name", "cilium_runtime"]);
    bpftool(&["map", "update", "pinned", runtime, "key", "0", "0", "0", "0", "value", "77", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"]);
    let opts = LoadOptions { pin_dir: Some(dir.clone()), ct_max: 16384, policy_max: 4096, ipcache_max: 1024, endpoints_max: 64, events_bytes: 1 << 16, maglev_size: 251, ..Default::default() };
    let mut dp = Loaded::load(opts.clone()).expect("load over the old pins");
    assert_eq!(dp.bump_policy_revision().unwrap(), 78, "the revision went on from the old map's");
    drop(dp);
    // and a plain restart keeps the (now current) map and its revision
    let mut dp = Loaded::load(opts).expect("load again");
    assert_eq!(dp.bump_policy_revision().unwrap(), 79);
}
