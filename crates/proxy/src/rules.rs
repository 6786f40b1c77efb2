//! HTTP rules of a policy, compiled: method, path and host are regular
//! expressions that must match the whole value (upstream's semantics: the
//! path is the request target, query included); `headers` entries are
//! "Name" (present) or "Name: value" (equal); `headerMatches` compare a
//! header with a value and, on mismatch, deny (no action) or LOG, ADD,
//! DELETE or REPLACE and let the rule match. A request passes when any rule
//! matches all of its fields.

use cilium_policy::api::HttpRule;
use regex::Regex;

use crate::http::Request;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mismatch {
    Deny,
    Log,
    Add,
    Delete,
    Replace,
}

#[derive(Debug, Clone)]
struct HeaderMatch {
    name: String,
    value: Option<String>,
    mismatch: Mismatch,
}

#[derive(Debug, Clone)]
struct Compiled {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    /// (name, Some(value) to equal, None to be present)
    headers: Vec<(String, Option<String>)>,
    matches: Vec<HeaderMatch>,
}

/// A compiled list of HTTP rules.
#[derive(Debug, Clone)]
pub struct HttpRules(Vec<Compiled>);

/// What to check on one connection: one entry per side whose policy is L7
/// (the client's egress, the server's ingress); a request must pass all.
#[derive(Debug, Clone)]
pub enum Check {
    /// Every request passes.
    Unrestricted,
    /// Every request must match these.
    Rules(HttpRules),
    /// DNS queries must name something these match.
    Dns(Vec<cilium_policy::fqdn::NameMatcher>),
    /// Kafka requests must pass these.
    Kafka(Vec<cilium_policy::kafka::Matcher>),
    /// Nothing passes (the connection is closed).
    Denied,
}

/// Whether an HTTP request passes every check of its connection (header
/// actions of matching rules applied); another protocol's rules on the
/// same connection pass nothing.
pub fn http_allows(checks: &[Check], req: &mut Request) -> bool {
    let mut allowed = true;
    for c in checks {
        allowed &= match c {
            Check::Unrestricted => true,
            Check::Rules(r) => r.check(req) != Verdict::Denied,
            Check::Dns(_) | Check::Kafka(_) | Check::Denied => false,
        };
    }
    allowed
}

/// A request's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it (with the header changes already applied); log lines for
    /// LOG mismatches.
    Allowed(Vec<String>),
    Denied,
}

fn full(field: &str, re: &Option<String>) -> Result<Option<Regex>, String> {
    re.as_ref().map(|r| Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("{field} {r:?}: {e}"))).transpose()
}

impl HttpRules {
    /// Compiles rules (already validated at import; errors name the field).
    pub fn compile(rules: &[HttpRule]) -> Result<HttpRules, String> {
        let mut out = Vec::new();
        for r in rules {
            let headers = r
                .headers
                .iter()
                .map(|h| match h.split_once(':') {
                    Some((n, v)) => (n.trim().to_string(), Some(v.trim().to_string())),
                    None => (h.trim().to_string(), None),
                })
                .collect();
            let matches = r
                .header_matches
                .iter()
                .map(|m| HeaderMatch {
                    name: m.name.clone(),
                    value: m.value.clone(),
                    mismatch: match m.mismatch.as_deref() {
                        Some("LOG") => Mismatch::Log,
                        Some("ADD") => Mismatch::Add,
                        Some("DELETE") => Mismatch::Delete,
                        Some("REPLACE") => Mismatch::Replace,
                        _ => Mismatch::Deny,
                    },
                })
                .collect();
            out.push(Compiled { method: full("method", &r.method)?, path: full("path", &r.path)?, host: full("host", &r.host)?, headers, matches });
        }
        Ok(HttpRules(out))
    }

    /// Checks a request; on a match applies its header actions.
    pub fn check(&self, req: &mut Request) -> Verdict {
        for rule in &self.0 {
            if let Some(logs) = rule.matches(req) {
                rule.apply(req);
                return Verdict::Allowed(logs);
            }
        }
        Verdict::Denied
    }
}

fn value_of<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(_, v)| std::str::from_utf8(v).ok()).map(str::trim)
}

impl Compiled {
    /// Some(log lines) when the rule matches.
    fn matches(&self, req: &Request) -> Option<Vec<String>> {
        if self.method.as_ref().is_some_and(|m| !m.is_match(&req.method)) {
            return None;
        }
        if self.path.as_ref().is_some_and(|p| !p.is_match(&req.target)) {
            return None;
        }
        if self.host.as_ref().is_some_and(|h| !h.is_match(req.host())) {
            return None;
        }
        for (name, want) in &self.headers {
            match (value_of(req, name), want) {
                (None, _) => return None,
                (Some(got), Some(want)) if got != want => return None,
                _ => {}
            }
        }
        let mut logs = Vec::new();
        for m in &self.matches {
            let got = value_of(req, &m.name);
            let ok = match &m.value {
                None => got.is_some(),
                Some(v) => got == Some(v.as_str()),
            };
            if ok {
                continue;
            }
            match m.mismatch {
                Mismatch::Deny => return None,
                Mismatch::Log => logs.push(format!("header {} mismatch", m.name)),
                _ => {}
            }
        }
        Some(logs)
    }

    fn apply(&self, req: &mut Request) {
        for m in &self.matches {
            let got = value_of(req, &m.name).map(str::to_string);
            let ok = match &m.value {
                None => got.is_some(),
                Some(v) => got.as_deref() == Some(v.as_str()),
            };
            if ok {
                continue;
            }
            let value = m.value.clone().unwrap_or_default().into_bytes();
            req.reencode |= matches!(m.mismatch, Mismatch::Add | Mismatch::Delete | Mismatch::Replace);
            match m.mismatch {
                Mismatch::Add => req.headers.push((m.name.clone(), value)),
                Mismatch::Delete => req.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&m.name)),
                Mismatch::Replace => {
                    req.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&m.name));
                    req.headers.push((m.name.clone(), value));
                }
                Mismatch::Deny | Mismatch::Log => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cilium_policy::api::HeaderMatch as Hm;

    fn req(raw: &str) -> Request {
        Request::parse(raw.as_bytes()).unwrap().unwrap().0
    }

    fn rule(method: Option<&str>, path: Option<&str>) -> HttpRule {
        HttpRule { method: method.map(Into::into), path: path.map(Into::into), ..Default::default() }
    }

    #[test]
    fn method_path_host_match_the_whole_value() {
        let r = HttpRules::compile(&[rule(Some("GET"), Some("/api/v1/public/.*"))]).unwrap();
        assert!(matches!(r.check(&mut req("GET /api/v1/public/x?y=1 HTTP/1.1\r\n\r\n")), Verdict::Allowed(_)));
        assert_eq!(r.check(&mut req("GET /api/v1/private HTTP/1.1\r\n\r\n")), Verdict::Denied);
        assert_eq!(r.check(&mut req("POST /api/v1/public/x HTTP/1.1\r\n\r\n")), Verdict::Denied);
        assert_eq!(r.check(&mut req("GET /x/api/v1/public/ HTTP/1.1\r\n\r\n")), Verdict::Denied, "anchored at the start");
        let r = HttpRules::compile(&[rule(Some("GE"), None)]).unwrap();
        assert_eq!(r.check(&mut req("GET / HTTP/1.1\r\n\r\n")), Verdict::Denied, "anchored at the end");
        let r = HttpRules::compile(&[HttpRule { host: Some("api\\.example\\.com".into()), ..Default::default() }]).unwrap();
        assert!(matches!(r.check(&mut req("GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")), Verdict::Allowed(_)));
        assert_eq!(r.check(&mut req("GET / HTTP/1.1\r\nHost: evil.com\r\n\r\n")), Verdict::Denied);
        // an empty rule allows everything; no rules allow nothing
        assert!(matches!(HttpRules::compile(&[HttpRule::default()]).unwrap().check(&mut req("DELETE /x HTTP/1.1\r\n\r\n")), Verdict::Allowed(_)));
        assert_eq!(HttpRules::compile(&[]).unwrap().check(&mut req("GET / HTTP/1.1\r\n\r\n")), Verdict::Denied);
    }

    #[test]
    fn headers_present_or_equal() {
        let r = HttpRules::compile(&[HttpRule { method: Some("POST".into()), path: Some("/api/v1/users".into()), headers: vec!["X-API-Key".into()], ..Default::default() }]).unwrap();
        assert!(matches!(r.check(&mut req("POST /api/v1/users HTTP/1.1\r\nx-api-key: s3cret\r\n\r\n")), Verdict::Allowed(_)));
        assert_eq!(r.check(&mut req("POST /api/v1/users HTTP/1.1\r\n\r\n")), Verdict::Denied);
        let r = HttpRules::compile(&[HttpRule { headers: vec!["X-Mode: fast".into()], ..Default::default() }]).unwrap();
        assert!(matches!(r.check(&mut req("GET / HTTP/1.1\r\nX-Mode: fast\r\n\r\n")), Verdict::Allowed(_)));
        assert_eq!(r.check(&mut req("GET / HTTP/1.1\r\nX-Mode: slow\r\n\r\n")), Verdict::Denied);
    }

    #[test]
    fn header_matches_and_mismatch_actions() {
        let hm = |mismatch: Option<&str>| HttpRule { header_matches: vec![Hm { name: "X-Token".into(), value: Some("ok".into()), mismatch: mismatch.map(Into::into), secret: None }], ..Default::default() };
        let mut r = req("GET / HTTP/1.1\r\nX-Token: bad\r\n\r\n");
        assert_eq!(HttpRules::compile(&[hm(None)]).unwrap().check(&mut r), Verdict::Denied);
        assert_eq!(HttpRules::compile(&[hm(Some("LOG"))]).unwrap().check(&mut r), Verdict::Allowed(vec!["header X-Token mismatch".into()]));
        assert!(!r.reencode, "LOG leaves the head as it came");
        let mut a = r.clone();
        HttpRules::compile(&[hm(Some("ADD"))]).unwrap().check(&mut a);
        assert_eq!(a.headers.iter().filter(|(n, _)| n == "X-Token").count(), 2);
        assert!(a.reencode);
        let mut d = r.clone();
        HttpRules::compile(&[hm(Some("DELETE"))]).unwrap().check(&mut d);
        assert!(!d.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("x-token")));
        let mut p = r.clone();
        HttpRules::compile(&[hm(Some("REPLACE"))]).unwrap().check(&mut p);
        assert_eq!(value_of(&p, "x-token"), Some("ok"));
        assert!(d.reencode && p.reencode);
        let mut good = req("GET / HTTP/1.1\r\nX-Token: ok\r\n\r\n");
        assert_eq!(HttpRules::compile(&[hm(Some("REPLACE"))]).unwrap().check(&mut good), Verdict::Allowed(vec![]));
        assert!(!good.reencode, "a matching header is not replaced");
    }
}
