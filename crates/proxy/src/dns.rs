//! DNS messages (RFC 1035) as the DNS proxy reads them: the question, the
//! answers' addresses, names and TTLs, and the REFUSED answer it makes.
//! Untrusted bytes: every error is a value, never a panic (fuzzed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed DNS message: {0}")]
pub struct DnsError(pub &'static str);

/// What the proxy needs of a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
    /// The first question's name (lower case, no trailing dot) and type.
    pub qname: String,
    pub qtype: u16,
    /// A records: (owner name, address, TTL).
    pub addrs: Vec<(String, IpAddr, u32)>,
    /// CNAME records: (owner, target).
    pub cnames: Vec<(String, String)>,
    /// The first question's labels as sent, and its class.
    qlabels: Vec<Vec<u8>>,
    qclass: u16,
}

fn u16_at(b: &[u8], i: usize) -> Result<u16, DnsError> {
    b.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(DnsError("truncated"))
}

fn u32_at(b: &[u8], i: usize) -> Result<u32, DnsError> {
    b.get(i..i + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]])).ok_or(DnsError("truncated"))
}

/// Reads a (possibly compressed) name at `i`; returns it and where the
/// record continues.
fn name_at(b: &[u8], i: usize) -> Result<(String, usize), DnsError> {
    let (labels, end) = labels_at(b, i)?;
    let text: Vec<String> = labels.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    Ok((text.join(".").to_ascii_lowercase(), end))
}

fn labels_at(b: &[u8], mut i: usize) -> Result<(Vec<Vec<u8>>, usize), DnsError> {
    let mut labels: Vec<Vec<u8>> = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    let mut total = 0usize;
    loop {
        let len = *b.get(i).ok_or(DnsError("truncated name"))? as usize;
        if len & 0xc0 == 0xc0 {
            let ptr = (u16_at(b, i)? & 0x3fff) as usize;
            end.get_or_insert(i + 2);
            jumps += 1;
            if jumps > 16 || ptr >= b.len() {
                return Err(DnsError("bad compression pointer"));
            }
            i = ptr;
            continue;
        }
        if len & 0xc0 != 0 {
            return Err(DnsError("bad label length"));
        }
        if len == 0 {
            let end = end.unwrap_or(i + 1);
            return Ok((labels, end));
        }
        let label = b.get(i + 1..i + 1 + len).ok_or(DnsError("truncated label"))?;
        total += len + 1;
        if total > 255 {
            return Err(DnsError("name too long"));
        }
        labels.push(label.to_vec());
        i += 1 + len;
    }
}

impl Message {
    pub fn parse(b: &[u8]) -> Result<Message, DnsError> {
        if b.len() < 12 {
            return Err(DnsError("shorter than a header"));
        }
        let id = u16_at(b, 0)?;
        let flags = u16_at(b, 2)?;
        let (qd, an) = (u16_at(b, 4)?, u16_at(b, 6)?);
        if qd == 0 {
            return Err(DnsError("no question"));
        }
        let mut m = Message { id, response: flags & 0x8000 != 0, rcode: (flags & 0x000f) as u8, ..Default::default() };
        let mut i = 12;
        for q in 0..qd {
            let (labels, next) = labels_at(b, i)?;
            let qtype = u16_at(b, next)?;
            let qclass = u16_at(b, next + 2)?;
            if q == 0 {
                m.qname = name_at(b, i)?.0;
                m.qtype = qtype;
                m.qclass = qclass;
                m.qlabels = labels;
            }
            i = next + 4;
        }
        for _ in 0..an {
            let (owner, next) = name_at(b, i)?;
            let rtype = u16_at(b, next)?;
            let ttl = u32_at(b, next + 4)?;
            let rdlen = u16_at(b, next + 8)? as usize;
            let rdata = next + 10;
            if rdata + rdlen > b.len() {
                return Err(DnsError("truncated record"));
            }
            match rtype {
                1 if rdlen == 4 => m.addrs.push((owner, Ipv4Addr::new(b[rdata], b[rdata + 1], b[rdata + 2], b[rdata + 3]).into(), ttl)),
                28 if rdlen == 16 => {
                    let a: [u8; 16] = b[rdata..rdata + 16].try_into().expect("16 bytes");
                    m.addrs.push((owner, Ipv6Addr::from(a).into(), ttl));
                }
                5 => {
                    let (target, _) = name_at(b, rdata)?;
                    m.cnames.push((owner, target));
                }
                _ => {}
            }
            i = rdata + rdlen;
        }
        Ok(m)
    }

    /// The REFUSED answer to this query: its ID and flags, and its first
    /// question written out again (uncompressed).
    pub fn refused(&self, query: &[u8]) -> Vec<u8> {
        let mut out = query.get(..12).map(<[u8]>::to_vec).unwrap_or_else(|| vec![0; 12]);
        let rd = out[2] & 0x01;
        out[2] = 0x80 | (out[2] & 0x78) | rd; // QR, opcode kept, RD kept
        out[3] = 0x80 | 5; // RA, REFUSED
        out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question, nothing else
        for l in &self.qlabels {
            out.push(l.len() as u8);
            out.extend_from_slice(l);
        }
        out.push(0);
        out.extend_from_slice(&self.qtype.to_be_bytes());
        out.extend_from_slice(&self.qclass.to_be_bytes());
        out
    }
}

/// Names of query types as Hubble prints them.
pub fn qtype_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        28 => "AAAA".into(),
        5 => "CNAME".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        33 => "SRV".into(),
        12 => "PTR".into(),
        2 => "NS".into(),
        6 => "SOA".into(),
        255 => "ANY".into(),
        t => format!("TYPE{t}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name`, type A.
    pub fn query(id: u16, name: &str) -> Vec<u8> {
        let mut b = vec![(id >> 8) as u8, id as u8, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            b.push(l.len() as u8);
            b.extend_from_slice(l.as_bytes());
        }
        b.extend_from_slice(&[0, 0, 1, 0, 1]);
        b
    }

    /// An answer to `query` with a CNAME and an A record (compressed names).
    pub fn answer(q: &[u8], target: &str, ip: [u8; 4], ttl: u32) -> Vec<u8> {
        let mut b = q.to_vec();
        b[2] = 0x81;
        b[3] = 0x80;
        b[7] = 2;
        // CNAME: owner = the question name (pointer to 12)
        b.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1]);
        b.extend_from_slice(&ttl.to_be_bytes());
        let mut t = Vec::new();
        for l in target.split('.') {
            t.push(l.len() as u8);
            t.extend_from_slice(l.as_bytes());
        }
        t.push(0);
        let target_at = b.len() + 2;
        b.extend_from_slice(&(t.len() as u16).to_be_bytes());
        b.extend_from_slice(&t);
        // A: owner = the CNAME target (pointer)
        b.extend_from_slice(&[0xc0 | (target_at >> 8) as u8, target_at as u8, 0, 1, 0, 1]);
        b.extend_from_slice(&ttl.to_be_bytes());
        b.extend_from_slice(&[0, 4]);
        b.extend_from_slice(&ip);
        b
    }

    #[test]
    fn aaaa_answers_carry_ipv6_addresses() {
        let q = query(7, "api6.example.com");
        // the A answer rewritten as AAAA: type 28, 16 bytes of address
        let mut a = q.clone();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        let ip: std::net::Ipv6Addr = "2001:db8:113::10".parse().unwrap();
        a.extend_from_slice(&ip.octets());
        let m = Message::parse(&a).unwrap();
        assert_eq!(m.addrs, vec![("api6.example.com".to_string(), IpAddr::V6(ip), 60)]);
        // a wrong length is not an address
        let n = a.len();
        a[n - 17] = 15;
        a.truncate(n - 1);
        assert!(Message::parse(&a).unwrap().addrs.is_empty());
    }

    #[test]
    fn queries_answers_and_refusals() {
        let q = query(0x1234, "API.Example.com");
        let m = Message::parse(&q).unwrap();
        assert_eq!((m.id, m.response, m.qname.as_str(), m.qtype), (0x1234, false, "api.example.com", 1));
        let a = answer(&q, "edge.example.net", [203, 0, 113, 10], 30);
        let m = Message::parse(&a).unwrap();
        assert!(m.response);
        assert_eq!(m.cnames, vec![("api.example.com".to_string(), "edge.example.net".to_string())]);
        assert_eq!(m.addrs, vec![("edge.example.net".to_string(), Ipv4Addr::new(203, 0, 113, 10).into(), 30)]);
        let r = Message::parse(&m.refused(&q)).unwrap();
        assert!(r.response && r.rcode == 5 && r.addrs.is_empty() && r.id == 0x1234 && r.qname == "api.example.com");
        for n in 0..a.len() {
            let _ = Message::parse(&a[..n]);
        }
        // a pointer loop is refused, not followed forever
        let mut looped = q.clone();
        looped.truncate(12);
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(Message::parse(&looped).is_err());
    }
}
