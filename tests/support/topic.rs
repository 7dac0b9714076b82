//! Reading a topic back, whole; which topics a broker holds.

use super::*;

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// With `offset`, the record's place in the log: the order the oracle
    /// replays, and what the ledger must name.
    pub partition: i32,
    /// See `partition`.
    pub offset: i64,
    /// The coupon id, which decides the partition.
    pub key: Option<Vec<u8>>,
    /// The request (JSON), or a poison record's bytes.
    pub payload: Option<Vec<u8>>,
    /// The request-id header and, in a dead letter, the error headers.
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Reads a whole topic from the beginning to the high watermark of each partition.
pub fn read_topic(common: &CommonConfig, topic: &str) -> Vec<LogRecord> {
    firstcome::kafka::read_topic(common, topic, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("reading {topic}: {e:#}"))
        .into_iter()
        .map(|m| LogRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: firstcome::kafka::text_headers(&m),
        })
        .collect()
}

/// The topics on `brokers` whose names start with `prefix`.
pub fn topics_starting_with(brokers: &str, prefix: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .expect("the broker answers; is the stack up? Run `scripts/stack up`");
    meta.topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}
