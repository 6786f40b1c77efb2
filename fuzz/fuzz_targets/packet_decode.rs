//! Datapath events and captured packets: decoding never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cilium_flow::decode_packet(data);
    if let Some((ev, capture)) = cilium_abi::Event::from_bytes(data) {
        if let Some(m) = cilium_flow::MonitorEvent::from_event(&ev, capture, u64::MAX / 2) {
            let _ = m.summary();
        }
    }
});
