//! Reading a topic back, whole.

use super::*;

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
    /// Its headers, as text.
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
