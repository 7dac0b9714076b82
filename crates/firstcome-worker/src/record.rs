//! A record of the request topic as the worker sees it: copied out of the
//! consumer ([`Rec::from_message`]) so it can cross into a partition task,
//! its headers read once, and parsed into an issue request whose key matches
//! its coupon ([`Rec::parse`]), or into the reason it is not one
//! ([`Unreadable`], which becomes a dead letter). It also owns the headers a
//! request-topic record carries; the failure headers of a dead letter belong
//! to the dead-letter module.

use firstcome::IssueRequest;
use firstcome::record::REQUEST_ID_HEADER;
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// How many times a record was replayed from the dead-letter topic; absent
/// on a record the ingress wrote.
pub const REPLAY_COUNT_HEADER: &str = "firstcome.replay.count";

/// Why a record holds no issue request.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    /// The record has no value.
    #[error("record has no value")]
    NoValue,
    /// The value is not a valid issue request (not JSON, bad ids, missing
    /// fields).
    #[error("{0}")]
    Invalid(serde_json::Error),
    /// The key is not the coupon id of the value, so the record may sit in
    /// the wrong partition and its place in the log means nothing.
    #[error("record key {key:?} differs from coupon_id {coupon:?}")]
    KeyMismatch {
        /// The key, as text where it is.
        key: Option<String>,
        /// The value's coupon.
        coupon: String,
    },
}

/// A record copied out of the consumer.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Partition it was read from: where its offset is stored.
    pub partition: i32,
    /// Its place in the partition, the first-come order.
    pub offset: i64,
    /// The coupon id, for records the ingress wrote; checked against the
    /// value, since a record under another key may sit in the wrong
    /// partition.
    pub key: Option<Vec<u8>>,
    /// The issue request as JSON, for records the ingress wrote.
    pub payload: Option<Vec<u8>>,
    /// Its Kafka timestamp (ms since the epoch), kept on its dead letter.
    pub timestamp_ms: Option<i64>,
    /// How often it was replayed from the dead-letter topic (0 for a record
    /// the ingress wrote); kept on its dead letter, so replays stay bounded.
    pub replay_count: u32,
    /// Its request id header ([`REQUEST_ID_HEADER`]), kept on its dead
    /// letter so an operator finds the request without parsing the value.
    pub request_id_header: Option<String>,
}

impl Rec {
    /// Copies what the pipeline needs out of a consumed message.
    pub fn from_message(m: &BorrowedMessage<'_>) -> Self {
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp_ms: m.timestamp().to_millis(),
            replay_count: replay_count(m),
            request_id_header: header(m, REQUEST_ID_HEADER),
        }
    }

    /// The issue request this record holds, whose key matches its coupon.
    pub fn parse(&self) -> Result<IssueRequest, Unreadable> {
        let payload = self.payload.as_deref().ok_or(Unreadable::NoValue)?;
        let request = IssueRequest::from_json(payload).map_err(Unreadable::Invalid)?;
        if self.key.as_deref() != Some(request.coupon_id.as_str().as_bytes()) {
            return Err(Unreadable::KeyMismatch {
                key: self
                    .key
                    .as_deref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                coupon: request.coupon_id.to_string(),
            });
        }
        Ok(request)
    }
}

/// The replay count a record carries (0 when it has none).
pub fn replay_count<M: Message>(m: &M) -> u32 {
    header(m, REPLAY_COUNT_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A text header of a record.
pub fn header<M: Message>(m: &M, key: &str) -> Option<String> {
    let h = m.headers()?;
    let value = h.iter().find(|h| h.key == key)?.value?;
    std::str::from_utf8(value).ok().map(str::to_owned)
}
