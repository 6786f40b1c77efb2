//! HTTP/1.1 as the L7 proxy reads it from clients and servers: request and
//! response heads, body framing, chunked bodies in arbitrary pieces, and
//! policy rules (with header actions) applied to whatever parsed. Nothing
//! may panic; a chunked body's end must not depend on how it was split.
#![no_main]
use cilium_policy::api::{HeaderMatch, HttpRule};
use cilium_proxy::http::{Chunked, Request, Response};
use cilium_proxy::rules::HttpRules;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((mut req, n))) = Request::parse(data) {
        assert!(n <= data.len());
        let _ = req.framing();
        let _ = req.wants_close();
        let rules = HttpRules::compile(&[
            HttpRule { method: Some("GET|POST".into()), path: Some("/api/.*".into()), headers: vec!["X-Key".into(), "X-Mode: fast".into()], ..Default::default() },
            HttpRule { header_matches: vec![HeaderMatch { name: "X-Token".into(), value: Some("ok".into()), mismatch: Some("REPLACE".into()), secret: None }], ..Default::default() },
        ])
        .expect("rules compile");
        let _ = rules.check(&mut req);
        // what is forwarded parses back to the same request
        let encoded = req.encode();
        if let Ok(Some((back, _))) = Request::parse(&encoded) {
            assert_eq!(back.method, req.method);
            assert_eq!(back.target, req.target);
        }
    }
    if let Ok(Some((resp, _))) = Response::parse(data) {
        let _ = resp.framing("GET");
        let _ = resp.framing("HEAD");
    }
    let mut whole = Chunked::default();
    let a = whole.feed(data);
    let split = data.len() / 2;
    let mut parts = Chunked::default();
    let b = parts.feed(&data[..split]).and_then(|x| if x == split && !parts.done() { parts.feed(&data[split..]).map(|y| x + y) } else { Ok(x) });
    if let (Ok(a), Ok(b)) = (&a, &b) {
        assert_eq!(a, b, "the end of a chunked body does not depend on the split");
    }
});
