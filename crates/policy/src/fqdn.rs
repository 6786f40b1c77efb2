//! DNS names in policy: `matchName` (exact) and `matchPattern` (`*` is any
//! run of characters within one label, a leading `**.` any number of labels,
//! a lone `*` every name), case-insensitive, the trailing dot ignored —
//! upstream's rules for `toFQDNs` and for the DNS proxy's `dns` rules.

use regex::Regex;

use crate::api::FqdnSelector;

/// A name as compared: lower case, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A compiled selector.
#[derive(Debug, Clone)]
pub struct NameMatcher(Regex);

impl NameMatcher {
    pub fn new(sel: &FqdnSelector) -> NameMatcher {
        let re = match (&sel.match_name, &sel.match_pattern) {
            (Some(n), _) => format!("^{}$", regex::escape(&normalize(n))),
            (None, Some(p)) if p.trim() == "*" => "^.*$".to_string(),
            (None, Some(p)) => {
                let p = normalize(p);
                let (prefix, rest) = match p.strip_prefix("**.") {
                    Some(rest) => ("(?:[-a-z0-9_]+\\.)+", rest.to_string()),
                    None => ("", p),
                };
                let body: Vec<String> = rest.split('*').map(regex::escape).collect();
                format!("^{prefix}{}$", body.join("[-a-z0-9_]*"))
            }
            // validated at import: one of the two is set
            (None, None) => "^$".to_string(),
        };
        NameMatcher(Regex::new(&re).unwrap_or_else(|_| Regex::new("^$").expect("valid")))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.is_match(&normalize(name))
    }
}

/// Whether any selector matches the name.
pub fn any_matches(sels: &[FqdnSelector], name: &str) -> bool {
    sels.iter().any(|s| NameMatcher::new(s).matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> FqdnSelector {
        FqdnSelector { match_name: Some(n.into()), match_pattern: None }
    }
    fn pat(p: &str) -> FqdnSelector {
        FqdnSelector { match_name: None, match_pattern: Some(p.into()) }
    }

    #[test]
    fn names_and_patterns() {
        assert!(NameMatcher::new(&name("api.stripe.com")).matches("API.Stripe.com."));
        assert!(!NameMatcher::new(&name("api.stripe.com")).matches("xapi.stripe.com"));
        assert!(NameMatcher::new(&pat("*")).matches("anything.example.org"));
        let sub = NameMatcher::new(&pat("*.cilium.io"));
        assert!(sub.matches("docs.cilium.io") && !sub.matches("a.b.cilium.io") && !sub.matches("cilium.io"));
        let deep = NameMatcher::new(&pat("**.cilium.io"));
        assert!(deep.matches("a.b.cilium.io") && deep.matches("docs.cilium.io") && !deep.matches("cilium.io"));
        let mid = NameMatcher::new(&pat("api-*.example.com"));
        assert!(mid.matches("api-v2.example.com") && !mid.matches("web.example.com"));
    }
}
