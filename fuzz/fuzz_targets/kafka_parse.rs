//! Kafka request frames as the Kafka proxy reads them from pods: parsing
//! never panics nor allocates beyond the frame, and the authorization error
//! built for any parsed request is a well-formed frame that carries the
//! request's correlation ID.
#![no_main]
use cilium_proxy::kafka::{denied_response, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = parse(data) else { return };
    let _ = req.for_rules();
    if let Some(out) = denied_response(&req) {
        assert!(out.len() >= 8);
        let size = i32::from_be_bytes(out[..4].try_into().unwrap());
        assert_eq!(size as usize, out.len() - 4);
        assert_eq!(i32::from_be_bytes(out[4..8].try_into().unwrap()), req.correlation_id);
    }
});
