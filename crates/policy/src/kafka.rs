//! Kafka rules of a policy (`rules.kafka`), with upstream's semantics:
//! `role` (produce or consume) stands for the API keys those operations
//! need, `apiKey` names one key, `apiVersion` and `clientID` must be equal,
//! and `topic` must be named by the request — a request naming several
//! topics passes only when every one of them is allowed by some rule. A
//! topic constraint does not apply to request types that carry no topic
//! (heartbeat, apiversions…). Names are case-insensitive.

use std::collections::BTreeSet;

use crate::api::KafkaRule;

/// API keys a rule may name (upstream's table: keys 0–33).
pub const API_KEYS: [(&str, i16); 34] = [
    ("produce", 0),
    ("fetch", 1),
    ("offsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
    ("deleterecords", 21),
    ("initproducerid", 22),
    ("offsetforleaderepoch", 23),
    ("addpartitionstotxn", 24),
    ("addoffsetstotxn", 25),
    ("endtxn", 26),
    ("writetxnmarkers", 27),
    ("txnoffsetcommit", 28),
    ("describeacls", 29),
    ("createacls", 30),
    ("deleteacls", 31),
    ("describeconfigs", 32),
    ("alterconfigs", 33),
];

/// The keys `role: produce` allows.
const PRODUCE: [i16; 3] = [0, 3, 18];
/// The keys `role: consume` allows.
const CONSUME: [i16; 11] = [1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18];

/// Request types that carry topics (a rule's topic applies to them).
const TOPIC_KEYS: [i16; 19] = [0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37];

/// Longest topic name a rule may give.
pub const MAX_TOPIC_LEN: usize = 255;

/// An API key's name, or its number when it has none.
pub fn api_key_name(key: i16) -> String {
    API_KEYS.iter().find(|(_, k)| *k == key).map(|(n, _)| n.to_string()).unwrap_or_else(|| key.to_string())
}

/// The number of an API key name.
pub fn api_key(name: &str) -> Option<i16> {
    let name = name.to_ascii_lowercase();
    API_KEYS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

/// Whether requests with this key carry topics. Keys newer than the
/// table count as carrying them: a topic rule never lets them through.
pub fn carries_topics(key: i16) -> bool {
    TOPIC_KEYS.contains(&key) || !API_KEYS.iter().any(|(_, k)| *k == key)
}

/// Checks one rule; the error names the field (relative to the rule) and
/// the reason.
pub fn validate(r: &KafkaRule) -> Result<(), (&'static str, String, &'static str)> {
    let role = r.role.as_deref().unwrap_or("");
    let key = r.api_key.as_deref().unwrap_or("");
    if !role.is_empty() && !key.is_empty() {
        return Err(("apiKey", key.to_string(), "role and apiKey are mutually exclusive"));
    }
    if !role.is_empty() && !matches!(role.to_ascii_lowercase().as_str(), "produce" | "consume") {
        return Err(("role", role.to_string(), "want produce or consume"));
    }
    if !key.is_empty() && api_key(key).is_none() {
        return Err(("apiKey", key.to_string(), "unknown Kafka API key (see https://kafka.apache.org/protocol#protocol_api_keys)"));
    }
    if let Some(v) = r.api_version.as_deref().filter(|v| !v.is_empty()) {
        if !v.parse::<i16>().is_ok_and(|n| n >= 0) {
            return Err(("apiVersion", v.to_string(), "want a version number (0-32767)"));
        }
    }
    if let Some(t) = r.topic.as_deref().filter(|t| !t.is_empty()) {
        if t.len() > MAX_TOPIC_LEN {
            return Err(("topic", t.to_string(), "longer than 255 characters"));
        }
        if !t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(("topic", t.to_string(), "not a topic name (letters, digits, '.', '_', '-')"));
        }
    }
    Ok(())
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    /// Empty: every key.
    keys: Vec<i16>,
    version: Option<i16>,
    client_id: Option<String>,
    topic: Option<String>,
}

impl Matcher {
    /// Compiles a rule validated at import (an invalid one matches nothing).
    pub fn new(r: &KafkaRule) -> Matcher {
        let nonempty = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
        let keys = match r.role.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("produce") => PRODUCE.to_vec(),
            Some("consume") => CONSUME.to_vec(),
            Some(r) if !r.is_empty() => vec![-1],
            _ => match nonempty(&r.api_key) {
                Some(k) => vec![api_key(&k).unwrap_or(-1)],
                None => Vec::new(),
            },
        };
        let version = nonempty(&r.api_version).map(|v| v.parse::<i16>().unwrap_or(-1));
        Matcher { keys, version, client_id: nonempty(&r.client_id), topic: nonempty(&r.topic) }
    }
}

/// What the rules look at in a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: String,
    /// The topics it names; `None` when its body could not be read (then
    /// no topic constraint can be satisfied).
    pub topics: Option<Vec<String>>,
}

/// Whether `rules` allow the request: a rule without a topic (or a request
/// type without topics) passes it outright; rules with topics pass it once
/// every topic it names was allowed by one of them.
pub fn allows(rules: &[Matcher], req: &Request) -> bool {
    let mut left: Option<BTreeSet<&str>> = None;
    for r in rules {
        if !(r.keys.is_empty() || r.keys.contains(&req.api_key)) {
            continue;
        }
        if r.version.is_some_and(|v| v != req.api_version) {
            continue;
        }
        if r.client_id.as_ref().is_some_and(|c| *c != req.client_id) {
            continue;
        }
        let Some(topic) = &r.topic else { return true };
        if !carries_topics(req.api_key) {
            return true;
        }
        let Some(topics) = &req.topics else { continue };
        let left = left.get_or_insert_with(|| topics.iter().map(String::as_str).collect());
        if left.remove(topic.as_str()) && left.is_empty() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(role: &str, key: &str, version: &str, client: &str, topic: &str) -> Matcher {
        let o = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Matcher::new(&KafkaRule { role: o(role), api_key: o(key), api_version: o(version), client_id: o(client), topic: o(topic) })
    }

    fn req(key: i16, topics: &[&str]) -> Request {
        Request { api_key: key, api_version: 7, client_id: "app".into(), topics: Some(topics.iter().map(|t| t.to_string()).collect()) }
    }

    #[test]
    fn roles_expand_to_their_keys() {
        let produce = [rule("produce", "", "", "", "orders")];
        assert!(allows(&produce, &req(0, &["orders"])));
        assert!(allows(&produce, &req(3, &["orders"])));
        assert!(allows(&produce, &req(18, &[])), "apiversions carries no topic");
        assert!(!allows(&produce, &req(1, &["orders"])), "fetch is consume's");
        assert!(!allows(&produce, &req(0, &["payments"])));
        let consume = [rule("Consume", "", "", "", "orders")];
        assert!(allows(&consume, &req(1, &["orders"])));
        assert!(allows(&consume, &req(12, &[])), "heartbeat carries no topic");
        assert!(!allows(&consume, &req(0, &["orders"])));
    }

    #[test]
    fn every_topic_must_be_allowed() {
        let rules = [rule("", "produce", "", "", "a"), rule("", "produce", "", "", "b")];
        assert!(allows(&rules, &req(0, &["a", "b"])));
        assert!(!allows(&rules, &req(0, &["a", "c"])));
        assert!(!allows(&rules, &req(3, &["a"])), "metadata is another key");
        assert!(!allows(&rules[..1], &req(0, &[])), "a topic rule needs the topic named");
        let unknown = Request { topics: None, ..req(0, &[]) };
        assert!(!allows(&rules, &unknown), "an unreadable body satisfies no topic rule");
        assert!(allows(&[rule("", "", "", "", "")], &unknown), "an empty rule allows everything");
        let newer = Request { api_key: 44, topics: None, ..req(0, &[]) };
        assert!(!allows(&[rule("", "", "", "", "a")], &newer), "a key newer than the table fails a topic rule");
    }

    #[test]
    fn version_and_client_id_are_exact() {
        let rules = [rule("", "fetch", "7", "app", "")];
        assert!(allows(&rules, &req(1, &["x"])));
        assert!(!allows(&rules, &Request { api_version: 6, ..req(1, &["x"]) }));
        assert!(!allows(&rules, &Request { client_id: "other".into(), ..req(1, &["x"]) }));
    }

    #[test]
    fn validation_names_the_field() {
        let k = |role: &str, key: &str, version: &str, topic: &str| {
            let o = |s: &str| (!s.is_empty()).then(|| s.to_string());
            validate(&KafkaRule { role: o(role), api_key: o(key), api_version: o(version), client_id: None, topic: o(topic) }).map_err(|e| e.0)
        };
        assert_eq!(k("produce", "", "", "t"), Ok(()));
        assert_eq!(k("PRODUCE", "", "", ""), Ok(()));
        assert_eq!(k("", "Fetch", "3", ""), Ok(()));
        assert_eq!(k("write", "", "", ""), Err("role"));
        assert_eq!(k("produce", "fetch", "", ""), Err("apiKey"));
        assert_eq!(k("", "fetchall", "", ""), Err("apiKey"));
        assert_eq!(k("", "", "-1", ""), Err("apiVersion"));
        assert_eq!(k("", "", "x", ""), Err("apiVersion"));
        assert_eq!(k("", "", "", "a/b"), Err("topic"));
        assert_eq!(k("", "", "", &"t".repeat(256)), Err("topic"));
    }
}
