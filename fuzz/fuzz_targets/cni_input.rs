//! CNI stdin and environment: any input yields a configuration or a CNI error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cilium_cni::parse_netconf(data);
    // the same bytes as CNI_* variables, split on NUL
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\0').collect();
    let names = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"];
    let _ = cilium_cni::parse_env(|k| names.iter().position(|n| *n == k).and_then(|i| parts.get(i)).map(|s| s.to_string()));
});
