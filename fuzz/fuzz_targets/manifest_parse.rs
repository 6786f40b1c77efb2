//! Lab manifests: any text parses to objects or to an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cilium_k8s::parse_manifest(&String::from_utf8_lossy(data), "fuzz");
});
