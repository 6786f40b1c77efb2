//! BTF: any bytes parse or fail cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = cilium_abi::btf::Btf::parse(data) {
        let _ = btf.struct_by_name("event");
        for id in 0..64 {
            let _ = btf.size_of(id);
        }
    }
});
