//! A minimal Kafka broker for the tests (no Kafka broker is installable
//! here): one node, topics created on first mention with one partition,
//! records kept in memory. It answers what a client needs to produce and
//! fetch — ApiVersions, Metadata, Produce, Fetch, ListOffsets — and closes
//! the connection on anything else. Requests are decoded and responses
//! encoded with the kafka-protocol crate, so what the real client library
//! (rskafka) sends is checked by an independent implementation.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes, decode_request_header_from_buffer};

/// Record batches of one partition, each with its first offset.
#[derive(Default)]
struct Log {
    batches: Vec<(i64, Bytes)>,
    next: i64,
}

type Logs = Arc<Mutex<HashMap<String, Log>>>;

/// Starts the broker inside the network namespace `netns`, listening on
/// `addr` (which it also advertises). It serves until the process ends.
pub fn spawn(netns: PathBuf, addr: SocketAddrV4) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        cilium_datapath::sys::enter_netns(&netns).expect("entering the broker's namespace");
        let l = TcpListener::bind(addr).expect("binding the test broker");
        ready_tx.send(()).unwrap();
        let logs: Logs = Arc::default();
        for c in l.incoming().flatten() {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let _ = serve(c, addr, &logs);
            });
        }
    });
    ready_rx.recv().expect("test broker started");
}

fn serve(mut c: TcpStream, addr: SocketAddrV4, logs: &Logs) -> anyhow::Result<()> {
    loop {
        let mut size = [0u8; 4];
        if c.read_exact(&mut size).is_err() {
            return Ok(());
        }
        let mut frame = vec![0u8; u32::from_be_bytes(size) as usize];
        c.read_exact(&mut frame)?;
        let mut b = Bytes::from(frame);
        let header = decode_request_header_from_buffer(&mut b)?;
        let key = ApiKey::try_from(header.request_api_key).map_err(|_| anyhow::anyhow!("unknown API key"))?;
        let v = header.request_api_version;
        let mut body = BytesMut::new();
        match key {
            ApiKey::ApiVersions => {
                let range = |k: ApiKey, min: i16, max: i16| api_versions_response::ApiVersion::default().with_api_key(k as i16).with_min_version(min).with_max_version(max);
                ApiVersionsResponse::default()
                    .with_api_keys(vec![
                        range(ApiKey::Produce, 3, 9),
                        range(ApiKey::Fetch, 4, 12),
                        range(ApiKey::ListOffsets, 1, 7),
                        range(ApiKey::Metadata, 0, 12),
                        range(ApiKey::ApiVersions, 0, 3),
                    ])
                    .encode(&mut body, v)?;
            }
            ApiKey::Metadata => {
                let req = MetadataRequest::decode(&mut b, v)?;
                let mut logs = logs.lock().unwrap();
                // the topics asked for (created on first mention), or all
                let names: Vec<String> = match &req.topics {
                    Some(ts) => ts.iter().filter_map(|t| t.name.as_ref().map(|n| n.0.to_string())).collect(),
                    None => logs.keys().cloned().collect(),
                };
                for n in &names {
                    logs.entry(n.clone()).or_default();
                }
                let topics = names
                    .iter()
                    .map(|n| {
                        metadata_response::MetadataResponseTopic::default().with_name(Some(TopicName(StrBytes::from_string(n.clone())))).with_partitions(vec![
                            metadata_response::MetadataResponsePartition::default().with_partition_index(0).with_leader_id(BrokerId(1)).with_replica_nodes(vec![BrokerId(1)]).with_isr_nodes(vec![BrokerId(1)]),
                        ])
                    })
                    .collect();
                MetadataResponse::default()
                    .with_brokers(vec![metadata_response::MetadataResponseBroker::default().with_node_id(BrokerId(1)).with_host(StrBytes::from_string(addr.ip().to_string())).with_port(i32::from(addr.port()))])
                    .with_controller_id(BrokerId(1))
                    .with_topics(topics)
                    .encode(&mut body, v)?;
            }
            ApiKey::Produce => {
                let req = ProduceRequest::decode(&mut b, v)?;
                let mut logs = logs.lock().unwrap();
                let mut responses = Vec::new();
                for t in &req.topic_data {
                    let log = logs.entry(t.name.0.to_string()).or_default();
                    let mut parts = Vec::new();
                    for p in &t.partition_data {
                        let base = log.next;
                        if let Some(r) = &p.records {
                            // a v2 record batch: base offset at 0, last offset delta at 23
                            let mut batch = r.to_vec();
                            anyhow::ensure!(batch.len() >= 27, "short record batch");
                            batch[..8].copy_from_slice(&base.to_be_bytes());
                            let delta = i32::from_be_bytes(batch[23..27].try_into()?);
                            log.next += i64::from(delta) + 1;
                            log.batches.push((base, Bytes::from(batch)));
                        }
                        parts.push(produce_response::PartitionProduceResponse::default().with_index(p.index).with_base_offset(base).with_log_append_time_ms(-1));
                    }
                    responses.push(produce_response::TopicProduceResponse::default().with_name(t.name.clone()).with_partition_responses(parts));
                }
                if req.acks == 0 {
                    continue;
                }
                ProduceResponse::default().with_responses(responses).encode(&mut body, v)?;
            }
            ApiKey::Fetch => {
                let req = FetchRequest::decode(&mut b, v)?;
                let logs = logs.lock().unwrap();
                let mut responses = Vec::new();
                for t in &req.topics {
                    let log = logs.get(t.topic.0.as_str());
                    let parts = t
                        .partitions
                        .iter()
                        .map(|p| {
                            let (hw, data) = match log {
                                Some(l) => {
                                    let mut data = BytesMut::new();
                                    for (i, (_, batch)) in l.batches.iter().enumerate() {
                                        let end = l.batches.get(i + 1).map(|n| n.0).unwrap_or(l.next);
                                        if end > p.fetch_offset {
                                            data.extend_from_slice(batch);
                                        }
                                    }
                                    (l.next, data.freeze())
                                }
                                None => (0, Bytes::new()),
                            };
                            fetch_response::PartitionData::default().with_partition_index(p.partition).with_high_watermark(hw).with_last_stable_offset(hw).with_records(Some(data))
                        })
                        .collect();
                    responses.push(fetch_response::FetchableTopicResponse::default().with_topic(t.topic.clone()).with_partitions(parts));
                }
                FetchResponse::default().with_responses(responses).encode(&mut body, v)?;
            }
            ApiKey::ListOffsets => {
                let req = ListOffsetsRequest::decode(&mut b, v)?;
                let logs = logs.lock().unwrap();
                let topics = req
                    .topics
                    .iter()
                    .map(|t| {
                        let next = logs.get(t.name.0.as_str()).map(|l| l.next).unwrap_or(0);
                        let parts = t.partitions.iter().map(|p| list_offsets_response::ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index).with_timestamp(-1).with_offset(if p.timestamp == -2 { 0 } else { next })).collect();
                        list_offsets_response::ListOffsetsTopicResponse::default().with_name(t.name.clone()).with_partitions(parts)
                    })
                    .collect();
                ListOffsetsResponse::default().with_topics(topics).encode(&mut body, v)?;
            }
            _ => anyhow::bail!("the test broker does not serve {key:?}"),
        }
        let mut head = BytesMut::new();
        ResponseHeader::default().with_correlation_id(header.correlation_id).encode(&mut head, key.response_header_version(v))?;
        let mut out = ((head.len() + body.len()) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&head);
        out.extend_from_slice(&body);
        c.write_all(&out)?;
    }
}
