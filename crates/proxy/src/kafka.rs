//! Kafka requests as the proxy reads them, and the authorization errors it
//! answers denied ones with.
//!
//! A request is a frame: a 4-byte size, then the header (API key, version,
//! correlation ID, client ID, tagged fields in flexible versions) and the
//! body. The parser reads the header of every request and, for the request
//! types whose topics policy looks at, the topic names and partitions —
//! every version of produce, fetch, list offsets, metadata, offset commit,
//! offset fetch, create and delete topics up to the ones that name topics by
//! ID only. Other types are passed on by header (a topic rule never matches
//! a body we could not read). Every count is checked against the bytes
//! left before anything is allocated: a hostile frame costs at most its
//! own size.
//!
//! Denied requests are answered with the protocol's authorization error
//! (TOPIC_AUTHORIZATION_FAILED per topic and partition, or
//! GROUP_AUTHORIZATION_FAILED for group requests), encoded at the request's
//! version, so the client sees a normal error and the connection stays
//! usable. Request types with no such response close the connection.

use bytes::BytesMut;
use kafka_protocol::messages::{self as km};
use kafka_protocol::protocol::{Encodable, StrBytes};

/// Largest request frame accepted (the broker's socket.request.max.bytes
/// default).
pub const MAX_FRAME: usize = 100 << 20;

/// Topics plus partitions a request may name for its topics to be read; a
/// request naming more is passed on by header only (a topic rule then
/// never matches it), so a hostile frame cannot make the proxy build
/// structures many times its size.
pub const MAX_ENTRIES: usize = 16_384;

/// TOPIC_AUTHORIZATION_FAILED.
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
/// GROUP_AUTHORIZATION_FAILED.
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
/// CLUSTER_AUTHORIZATION_FAILED.
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaError {
    #[error("request frame too short")]
    Short,
    #[error("request frame of {0} bytes (at most {MAX_FRAME})")]
    Size(i64),
    #[error("malformed request header")]
    Header,
}

/// A topic and the partitions a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub name: String,
    pub partitions: Vec<i32>,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: String,
    /// The topics named, when the body was read (`None`: not read, or
    /// topics named by ID only).
    pub topics: Option<Vec<Topic>>,
    /// Coordinator keys (find coordinator), for its error response.
    pub keys: Vec<String>,
    /// A produce request with acks=0: the broker sends no response.
    pub no_response: bool,
}

impl Request {
    /// What the policy rules look at.
    pub fn for_rules(&self) -> cilium_policy::kafka::Request {
        cilium_policy::kafka::Request {
            api_key: self.api_key,
            api_version: self.api_version,
            client_id: self.client_id.clone(),
            topics: self.topics.as_ref().map(|t| t.iter().map(|t| t.name.clone()).collect()),
        }
    }

    /// The first topic (what Hubble shows).
    pub fn topic(&self) -> &str {
        self.topics.as_ref().and_then(|t| t.first()).map(|t| t.name.as_str()).unwrap_or("")
    }
}

/// The size a frame's 4-byte prefix announces, checked.
pub fn frame_size(prefix: [u8; 4]) -> Result<usize, KafkaError> {
    let n = i32::from_be_bytes(prefix);
    if n < 8 || n as usize > MAX_FRAME {
        return Err(KafkaError::Size(i64::from(n)));
    }
    Ok(n as usize)
}

/// Bounded reads over a frame; every failure is "malformed".
struct Cursor<'a> {
    b: &'a [u8],
}

type R<T> = Result<T, ()>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.b.len() {
            return Err(());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn skip(&mut self, n: usize) -> R<()> {
        self.take(n).map(|_| ())
    }
    fn i8(&mut self) -> R<i8> {
        Ok(self.take(1)?[0] as i8)
    }
    fn i16(&mut self) -> R<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().map_err(|_| ())?))
    }
    fn i32(&mut self) -> R<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().map_err(|_| ())?))
    }
    fn uvarint(&mut self) -> R<u32> {
        let mut v: u32 = 0;
        for i in 0..5 {
            let b = self.take(1)?[0];
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(())
    }
    /// A (nullable) string, compact in flexible versions.
    fn string(&mut self, flex: bool) -> R<Option<String>> {
        let len = if flex {
            match self.uvarint()? {
                0 => return Ok(None),
                n => (n - 1) as usize,
            }
        } else {
            match self.i16()? {
                -1 => return Ok(None),
                n if n < 0 => return Err(()),
                n => n as usize,
            }
        };
        Ok(Some(String::from_utf8_lossy(self.take(len)?).into_owned()))
    }
    fn name(&mut self, flex: bool) -> R<String> {
        self.string(flex)?.ok_or(())
    }
    /// Skips (nullable) bytes.
    fn skip_bytes(&mut self, flex: bool) -> R<()> {
        let len = if flex {
            match self.uvarint()? {
                0 => return Ok(()),
                n => (n - 1) as usize,
            }
        } else {
            match self.i32()? {
                -1 => return Ok(()),
                n if n < 0 => return Err(()),
                n => n as usize,
            }
        };
        self.skip(len)
    }
    /// An array's length (null counts as empty), bounded by the bytes left
    /// at `min` bytes per element.
    fn array(&mut self, flex: bool, min: usize) -> R<usize> {
        let n = if flex {
            match self.uvarint()? {
                0 => 0,
                n => (n - 1) as usize,
            }
        } else {
            match self.i32()? {
                -1 => 0,
                n if n < 0 => return Err(()),
                n => n as usize,
            }
        };
        if n.saturating_mul(min.max(1)) > self.b.len() {
            return Err(());
        }
        Ok(n)
    }
    /// Whether the array is null (then the cursor has consumed it).
    fn null_array(&mut self, flex: bool) -> R<bool> {
        let null = if flex { self.b.first() == Some(&0) } else { self.b.get(..4) == Some(&[0xff; 4][..]) };
        if null {
            self.skip(if flex { 1 } else { 4 })?;
        }
        Ok(null)
    }
    fn tags(&mut self, flex: bool) -> R<()> {
        if !flex {
            return Ok(());
        }
        let n = self.uvarint()? as usize;
        if n > self.b.len() {
            return Err(());
        }
        for _ in 0..n {
            self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.skip(size)?;
        }
        Ok(())
    }
}

/// The version from which a request type's body (and header) is flexible.
fn flexible_from(key: i16) -> Option<i16> {
    Some(match key {
        0 => 9,
        1 => 12,
        2 => 6,
        3 => 9,
        8 => 8,
        9 => 6,
        10 => 3,
        11 => 6,
        12 => 4,
        13 => 4,
        14 => 4,
        18 => 3,
        19 => 5,
        20 => 4,
        _ => return None,
    })
}

/// A list of topics with their partitions: per topic a name, then per
/// partition its index and what `rest` skips (`min` bytes at least).
fn topic_list(c: &mut Cursor, flex: bool, min: usize, mut rest: impl FnMut(&mut Cursor) -> R<()>) -> R<Vec<Topic>> {
    let mut topics = Vec::new();
    let mut entries = 0usize;
    for _ in 0..c.array(flex, 2)? {
        let name = c.name(flex)?;
        let mut partitions = Vec::new();
        for _ in 0..c.array(flex, min)? {
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(());
            }
            partitions.push(c.i32()?);
            rest(c)?;
            c.tags(flex)?;
        }
        c.tags(flex)?;
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(());
        }
        topics.push(Topic { name, partitions });
    }
    Ok(topics)
}

/// Parses one request frame (without its size prefix).
pub fn parse(frame: &[u8]) -> Result<Request, KafkaError> {
    let mut c = Cursor { b: frame };
    let api_key = c.i16().map_err(|_| KafkaError::Short)?;
    let api_version = c.i16().map_err(|_| KafkaError::Short)?;
    let correlation_id = c.i32().map_err(|_| KafkaError::Short)?;
    // controlled shutdown v0 has no client ID (request header v0)
    let client_id = if api_key == 7 && api_version == 0 { None } else { c.string(false).map_err(|_| KafkaError::Header)? };
    let mut req = Request { api_key, api_version, correlation_id, client_id: client_id.unwrap_or_default(), topics: None, keys: Vec::new(), no_response: false };
    let Some(flex_from) = flexible_from(api_key) else { return Ok(req) };
    let flex = api_version >= flex_from;
    // the request header is flexible with the body (only ApiVersions'
    // response header never is)
    if c.tags(flex).is_err() {
        return Err(KafkaError::Header);
    }
    // a body we cannot read leaves the topics unknown
    let _ = body(&mut c, &mut req, flex);
    Ok(req)
}

fn body(c: &mut Cursor, req: &mut Request, flex: bool) -> R<()> {
    let v = req.api_version;
    let mut topics = Vec::new();
    match req.api_key {
        // produce
        0 => {
            if v >= 3 {
                c.string(flex)?;
            }
            req.no_response = c.i16()? == 0;
            c.i32()?;
            if v >= 13 {
                return Err(());
            }
            topics = topic_list(c, flex, 4, |c| c.skip_bytes(flex))?;
        }
        // fetch
        1 => {
            if v <= 14 {
                c.i32()?;
            }
            c.skip(8)?;
            if v >= 3 {
                c.i32()?;
            }
            if v >= 4 {
                c.i8()?;
            }
            if v >= 7 {
                c.skip(8)?;
            }
            if v >= 13 {
                return Err(());
            }
            let part = 16 + if v >= 9 { 4 } else { 0 } + if v >= 12 { 4 } else { 0 } + if v >= 5 { 8 } else { 0 };
            topics = topic_list(c, flex, part, |c| c.skip(part - 4))?;
        }
        // list offsets
        2 => {
            c.i32()?;
            if v >= 2 {
                c.i8()?;
            }
            let part = 12 + if v >= 4 { 4 } else { 0 } + if v == 0 { 4 } else { 0 };
            topics = topic_list(c, flex, part, |c| c.skip(part - 4))?;
        }
        // metadata (null or, in v0, empty: every topic)
        3 => {
            if !c.null_array(flex)? {
                for _ in 0..c.array(flex, 2)? {
                    if v >= 10 {
                        c.skip(16)?;
                    }
                    let name = c.name(flex)?;
                    c.tags(flex)?;
                    topics.push(Topic { name, partitions: Vec::new() });
                }
            }
        }
        // offset commit
        8 => {
            c.string(flex)?;
            if v >= 1 {
                c.i32()?;
                c.string(flex)?;
            }
            if v >= 7 {
                c.string(flex)?;
            }
            if (2..=4).contains(&v) {
                c.skip(8)?;
            }
            if v >= 10 {
                return Err(());
            }
            topics = topic_list(c, flex, 12, |c| {
                c.skip(8)?;
                if v >= 6 {
                    c.i32()?;
                }
                if v == 1 {
                    c.skip(8)?;
                }
                c.string(flex)?;
                Ok(())
            })?;
        }
        // offset fetch
        9 => {
            let groups = if v >= 8 { c.array(flex, 2)? } else { 1 };
            for _ in 0..groups {
                c.string(flex)?;
                if v >= 9 {
                    c.string(flex)?;
                    c.i32()?;
                }
                if v >= 10 {
                    return Err(());
                }
                if !c.null_array(flex)? {
                    for _ in 0..c.array(flex, 2)? {
                        let name = c.name(flex)?;
                        let n = c.array(flex, 4)?;
                        let mut parts = Vec::with_capacity(n);
                        for _ in 0..n {
                            parts.push(c.i32()?);
                        }
                        c.tags(flex)?;
                        topics.push(Topic { name, partitions: parts });
                    }
                }
                if v >= 8 {
                    c.tags(flex)?;
                }
            }
        }
        // find coordinator: the keys, for the error response
        10 => {
            if v <= 3 {
                req.keys.push(c.name(flex)?);
            } else {
                c.i8()?;
                for _ in 0..c.array(flex, 1)? {
                    req.keys.push(c.name(flex)?);
                }
            }
            return Ok(());
        }
        // create topics
        19 => {
            for _ in 0..c.array(flex, 2)? {
                let name = c.name(flex)?;
                c.skip(6)?;
                for _ in 0..c.array(flex, 5)? {
                    c.i32()?;
                    let n = c.array(flex, 4)?;
                    c.skip(4 * n)?;
                    c.tags(flex)?;
                }
                for _ in 0..c.array(flex, 2)? {
                    c.string(flex)?;
                    c.string(flex)?;
                    c.tags(flex)?;
                }
                c.tags(flex)?;
                topics.push(Topic { name, partitions: Vec::new() });
            }
        }
        // delete topics
        20 => {
            for _ in 0..c.array(flex, 1)? {
                let name = c.name(flex)?;
                if v >= 6 {
                    c.skip(16)?;
                    c.tags(flex)?;
                }
                topics.push(Topic { name, partitions: Vec::new() });
            }
        }
        _ => return Ok(()),
    }
    if topics.len() + topics.iter().map(|t| t.partitions.len()).sum::<usize>() > MAX_ENTRIES {
        return Err(());
    }
    req.topics = Some(topics);
    Ok(())
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn topic_name(v: &str) -> km::TopicName {
    km::TopicName(s(v))
}

/// The authorization error response to a denied request, framed (size
/// prefix included); `None` when the request type has none we can encode
/// (the connection is then closed).
pub fn denied_response(req: &Request) -> Option<Vec<u8>> {
    use km::*;
    let key = ApiKey::try_from(req.api_key).ok()?;
    let v = req.api_version;
    if !(key.valid_versions().min..=key.valid_versions().max).contains(&v) {
        return None;
    }
    let topics = || req.topics.clone().unwrap_or_default();
    let (t, g) = (TOPIC_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED);
    let mut body = BytesMut::new();
    let enc = |m: &dyn Fn(&mut BytesMut) -> anyhow::Result<()>, b: &mut BytesMut| m(b).ok();
    match key {
        ApiKey::Produce => {
            let r = ProduceResponse::default().with_responses(
                topics()
                    .iter()
                    .map(|tp| {
                        produce_response::TopicProduceResponse::default().with_name(topic_name(&tp.name)).with_partition_responses(
                            tp.partitions.iter().map(|p| produce_response::PartitionProduceResponse::default().with_index(*p).with_error_code(t).with_base_offset(-1)).collect(),
                        )
                    })
                    .collect(),
            );
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::Fetch => {
            let r = FetchResponse::default().with_responses(
                topics()
                    .iter()
                    .map(|tp| {
                        fetch_response::FetchableTopicResponse::default().with_topic(topic_name(&tp.name)).with_partitions(
                            tp.partitions
                                .iter()
                                .map(|p| fetch_response::PartitionData::default().with_partition_index(*p).with_error_code(t).with_high_watermark(-1).with_last_stable_offset(-1).with_log_start_offset(-1))
                                .collect(),
                        )
                    })
                    .collect(),
            );
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::ListOffsets => {
            let r = ListOffsetsResponse::default().with_topics(
                topics()
                    .iter()
                    .map(|tp| {
                        list_offsets_response::ListOffsetsTopicResponse::default()
                            .with_name(topic_name(&tp.name))
                            .with_partitions(tp.partitions.iter().map(|p| list_offsets_response::ListOffsetsPartitionResponse::default().with_partition_index(*p).with_error_code(t)).collect())
                    })
                    .collect(),
            );
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::Metadata => {
            let r = MetadataResponse::default()
                .with_controller_id(BrokerId(-1))
                .with_topics(topics().iter().map(|tp| metadata_response::MetadataResponseTopic::default().with_name(Some(topic_name(&tp.name))).with_error_code(t)).collect());
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::OffsetCommit => {
            let r = OffsetCommitResponse::default().with_topics(
                topics()
                    .iter()
                    .map(|tp| {
                        offset_commit_response::OffsetCommitResponseTopic::default()
                            .with_name(topic_name(&tp.name))
                            .with_partitions(tp.partitions.iter().map(|p| offset_commit_response::OffsetCommitResponsePartition::default().with_partition_index(*p).with_error_code(t)).collect())
                    })
                    .collect(),
            );
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::OffsetFetch if v <= 7 => {
            let r = OffsetFetchResponse::default().with_topics(
                topics()
                    .iter()
                    .map(|tp| {
                        offset_fetch_response::OffsetFetchResponseTopic::default().with_name(topic_name(&tp.name)).with_partitions(
                            tp.partitions.iter().map(|p| offset_fetch_response::OffsetFetchResponsePartition::default().with_partition_index(*p).with_committed_offset(-1).with_metadata(Some(s(""))).with_error_code(t)).collect(),
                        )
                    })
                    .collect(),
            );
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::CreateTopics => {
            let r = CreateTopicsResponse::default().with_topics(topics().iter().map(|tp| create_topics_response::CreatableTopicResult::default().with_name(topic_name(&tp.name)).with_error_code(t)).collect());
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::DeleteTopics => {
            let r = DeleteTopicsResponse::default().with_responses(topics().iter().map(|tp| delete_topics_response::DeletableTopicResult::default().with_name(Some(topic_name(&tp.name))).with_error_code(t)).collect());
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::FindCoordinator => {
            let r = if v <= 3 {
                FindCoordinatorResponse::default().with_error_code(g).with_node_id(BrokerId(-1)).with_port(-1)
            } else {
                FindCoordinatorResponse::default().with_coordinators(req.keys.iter().map(|k| find_coordinator_response::Coordinator::default().with_key(s(k)).with_node_id(BrokerId(-1)).with_port(-1).with_error_code(g)).collect())
            };
            enc(&|b| r.encode(b, v), &mut body)?;
        }
        ApiKey::JoinGroup => enc(&|b| JoinGroupResponse::default().with_error_code(g).with_generation_id(-1).encode(b, v), &mut body)?,
        ApiKey::Heartbeat => enc(&|b| HeartbeatResponse::default().with_error_code(g).encode(b, v), &mut body)?,
        ApiKey::LeaveGroup => enc(&|b| LeaveGroupResponse::default().with_error_code(g).encode(b, v), &mut body)?,
        ApiKey::SyncGroup => enc(&|b| SyncGroupResponse::default().with_error_code(g).encode(b, v), &mut body)?,
        ApiKey::ApiVersions => enc(&|b| ApiVersionsResponse::default().with_error_code(CLUSTER_AUTHORIZATION_FAILED).encode(b, v), &mut body)?,
        _ => return None,
    }
    let mut head = BytesMut::new();
    ResponseHeader::default().with_correlation_id(req.correlation_id).encode(&mut head, key.response_header_version(v)).ok()?;
    let mut out = Vec::with_capacity(4 + head.len() + body.len());
    out.extend_from_slice(&((head.len() + body.len()) as i32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::{Decodable, HeaderVersion};

    /// Encodes a request as a client would, with kafka-protocol's encoder.
    fn frame<M: Encodable + HeaderVersion>(key: i16, v: i16, m: &M) -> Vec<u8> {
        let mut b = BytesMut::new();
        RequestHeader::default().with_request_api_key(key).with_request_api_version(v).with_correlation_id(7).with_client_id(Some(s("app"))).encode(&mut b, M::header_version(v)).unwrap();
        m.encode(&mut b, v).unwrap();
        b.to_vec()
    }

    fn produce(topics: &[(&str, &[i32])], acks: i16) -> ProduceRequest {
        ProduceRequest::default().with_acks(acks).with_topic_data(
            topics
                .iter()
                .map(|(n, ps)| produce_request::TopicProduceData::default().with_name(topic_name(n)).with_partition_data(ps.iter().map(|p| produce_request::PartitionProduceData::default().with_index(*p).with_records(Some(bytes::Bytes::from_static(b"recs")))).collect()))
                .collect(),
        )
    }

    #[test]
    fn produce_topics_at_every_supported_version() {
        for v in 3..=12 {
            let r = parse(&frame(0, v, &produce(&[("orders", &[0, 2]), ("audit", &[1])], 1))).unwrap();
            assert_eq!((r.api_key, r.api_version, r.correlation_id, r.client_id.as_str()), (0, v, 7, "app"));
            assert_eq!(r.topics, Some(vec![Topic { name: "orders".into(), partitions: vec![0, 2] }, Topic { name: "audit".into(), partitions: vec![1] }]), "v{v}");
            assert!(!r.no_response);
        }
        assert!(parse(&frame(0, 7, &produce(&[("t", &[0])], 0))).unwrap().no_response);
        assert_eq!(parse(&frame(0, 13, &produce(&[("t", &[0])], 1))).unwrap().topics, None, "v13 names topics by ID");
    }

    #[test]
    fn fetch_metadata_and_offsets_topics() {
        for v in 4..=12 {
            let m = FetchRequest::default().with_topics(vec![fetch_request::FetchTopic::default().with_topic(topic_name("orders")).with_partitions(vec![fetch_request::FetchPartition::default().with_partition(3)])]);
            let r = parse(&frame(1, v, &m)).unwrap();
            assert_eq!(r.topics, Some(vec![Topic { name: "orders".into(), partitions: vec![3] }]), "fetch v{v}");
        }
        for v in 0..=12 {
            let m = MetadataRequest::default().with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(topic_name("a"))), metadata_request::MetadataRequestTopic::default().with_name(Some(topic_name("b")))]));
            let r = parse(&frame(3, v, &m)).unwrap();
            assert_eq!(r.topics.map(|t| t.into_iter().map(|t| t.name).collect::<Vec<_>>()), Some(vec!["a".to_string(), "b".into()]), "metadata v{v}");
        }
        let all = parse(&frame(3, 4, &MetadataRequest::default().with_topics(None))).unwrap();
        assert_eq!(all.topics, Some(vec![]), "null: every topic, names none");
        for v in 1..=9 {
            let m = ListOffsetsRequest::default().with_topics(vec![list_offsets_request::ListOffsetsTopic::default().with_name(topic_name("x")).with_partitions(vec![list_offsets_request::ListOffsetsPartition::default().with_partition_index(5)])]);
            assert_eq!(parse(&frame(2, v, &m)).unwrap().topics, Some(vec![Topic { name: "x".into(), partitions: vec![5] }]), "list offsets v{v}");
        }
        for v in 2..=9 {
            let m = OffsetCommitRequest::default().with_group_id(GroupId(s("g"))).with_topics(vec![offset_commit_request::OffsetCommitRequestTopic::default().with_name(topic_name("c")).with_partitions(vec![offset_commit_request::OffsetCommitRequestPartition::default().with_partition_index(1)])]);
            assert_eq!(parse(&frame(8, v, &m)).unwrap().topics, Some(vec![Topic { name: "c".into(), partitions: vec![1] }]), "offset commit v{v}");
        }
        for v in 1..=9 {
            let m = if v <= 7 {
                OffsetFetchRequest::default().with_group_id(GroupId(s("g"))).with_topics(Some(vec![offset_fetch_request::OffsetFetchRequestTopic::default().with_name(topic_name("f")).with_partition_indexes(vec![0, 1])]))
            } else {
                OffsetFetchRequest::default().with_groups(vec![offset_fetch_request::OffsetFetchRequestGroup::default().with_group_id(GroupId(s("g"))).with_topics(Some(vec![offset_fetch_request::OffsetFetchRequestTopics::default().with_name(topic_name("f")).with_partition_indexes(vec![0, 1])]))])
            };
            assert_eq!(parse(&frame(9, v, &m)).unwrap().topics, Some(vec![Topic { name: "f".into(), partitions: vec![0, 1] }]), "offset fetch v{v}");
        }
        for v in 2..=7 {
            let m = CreateTopicsRequest::default().with_topics(vec![create_topics_request::CreatableTopic::default().with_name(topic_name("new")).with_num_partitions(3)]);
            assert_eq!(parse(&frame(19, v, &m)).unwrap().topics.unwrap()[0].name, "new", "create topics v{v}");
        }
        for v in 1..=6 {
            let m = if v <= 5 { DeleteTopicsRequest::default().with_topic_names(vec![topic_name("old")]) } else { DeleteTopicsRequest::default().with_topics(vec![delete_topics_request::DeleteTopicState::default().with_name(Some(topic_name("old")))]) };
            assert_eq!(parse(&frame(20, v, &m)).unwrap().topics.unwrap()[0].name, "old", "delete topics v{v}");
        }
    }

    #[test]
    fn requests_without_topics_parse_by_header() {
        let r = parse(&frame(18, 3, &ApiVersionsRequest::default().with_client_software_name(s("x")))).unwrap();
        assert_eq!((r.api_key, r.client_id.as_str(), r.topics.clone()), (18, "app", None));
        let r = parse(&frame(12, 4, &HeartbeatRequest::default().with_group_id(GroupId(s("g"))))).unwrap();
        assert_eq!((r.api_key, r.api_version), (12, 4));
    }

    #[test]
    fn hostile_frames_are_errors_not_allocations() {
        assert_eq!(parse(&[0, 0]), Err(KafkaError::Short));
        // a produce request claiming 2^31-1 topics in a few bytes
        let mut f = vec![0, 0, 0, 7, 0, 0, 0, 1, 0, 1, b'a', 0xff, 0xff, 0, 1, 0, 0, 0, 0];
        f.extend_from_slice(&i32::MAX.to_be_bytes());
        let r = parse(&f).unwrap();
        assert_eq!(r.topics, None);
        assert_eq!(frame_size((MAX_FRAME as i32 + 1).to_be_bytes()), Err(KafkaError::Size(MAX_FRAME as i64 + 1)));
        // more names than MAX_ENTRIES: read by header only
        let many: Vec<metadata_request::MetadataRequestTopic> = (0..MAX_ENTRIES + 1).map(|i| metadata_request::MetadataRequestTopic::default().with_name(Some(topic_name(&format!("t{i}"))))).collect();
        let r = parse(&frame(3, 4, &MetadataRequest::default().with_topics(Some(many)))).unwrap();
        assert_eq!((r.api_key, r.topics), (3, None));
        assert_eq!(frame_size((-1i32).to_be_bytes()), Err(KafkaError::Size(-1)));
    }

    #[test]
    fn denied_responses_decode_as_the_client_would() {
        let req = parse(&frame(0, 7, &produce(&[("orders", &[0, 1])], 1))).unwrap();
        let out = denied_response(&req).unwrap();
        assert_eq!(i32::from_be_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
        let mut b = bytes::Bytes::from(out[4..].to_vec());
        let h = ResponseHeader::decode(&mut b, ProduceResponse::header_version(7)).unwrap();
        assert_eq!(h.correlation_id, 7);
        let r = ProduceResponse::decode(&mut b, 7).unwrap();
        assert_eq!(r.responses.len(), 1);
        assert_eq!(r.responses[0].partition_responses.iter().map(|p| (p.index, p.error_code)).collect::<Vec<_>>(), vec![(0, 29), (1, 29)]);
        let req = parse(&frame(3, 12, &MetadataRequest::default().with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(topic_name("a")))])))).unwrap();
        let out = denied_response(&req).unwrap();
        let mut b = bytes::Bytes::from(out[4..].to_vec());
        ResponseHeader::decode(&mut b, MetadataResponse::header_version(12)).unwrap();
        let r = MetadataResponse::decode(&mut b, 12).unwrap();
        assert_eq!((r.topics[0].error_code, r.topics[0].name.as_ref().map(|n| n.0.to_string())), (29, Some("a".to_string())));
        let hb = parse(&frame(12, 2, &HeartbeatRequest::default().with_group_id(GroupId(s("g"))))).unwrap();
        let mut b = bytes::Bytes::from(denied_response(&hb).unwrap()[4..].to_vec());
        ResponseHeader::decode(&mut b, 0).unwrap();
        assert_eq!(HeartbeatResponse::decode(&mut b, 2).unwrap().error_code, 30);
        let odd = Request { api_key: 33, api_version: 1, correlation_id: 1, client_id: String::new(), topics: None, keys: vec![], no_response: false };
        assert_eq!(denied_response(&odd), None, "alterconfigs: closed instead");
    }
}
