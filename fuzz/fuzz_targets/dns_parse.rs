//! DNS messages as the DNS proxy reads them from pods and servers: parsing
//! never panics, and a REFUSED answer built from any parsed query parses
//! back as REFUSED for the same question.
#![no_main]
use cilium_proxy::dns::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::parse(data) else { return };
    let refused = m.refused(data);
    let r = Message::parse(&refused).expect("a refusal parses");
    assert!(r.response && r.rcode == 5 && r.addrs.is_empty());
    assert_eq!((r.id, r.qname.as_str(), r.qtype), (m.id, m.qname.as_str(), m.qtype));
});
