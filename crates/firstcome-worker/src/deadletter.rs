//! Dead letters: records the worker cannot process. They go to the
//! dead-letter topic with the source record's key and value untouched and
//! headers that say what happened, and only once the broker acknowledged the
//! dead letter does the source offset move past it.
//!
//! This module owns the headers both ways: [`DeadLetter::record`] writes
//! them on the way to the dead-letter topic, [`replayed`] strips them and
//! raises the replay count on the way back to the request topic.

use chrono::{DateTime, Utc};
use rdkafka::message::{Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;

use crate::record::{REPLAY_COUNT_HEADER, Rec, Unreadable, replay_count};

/// The headers of a dead letter, as named on the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Why the record failed: one of [`ErrorKind`]'s names.
    ErrorKind,
    /// Human-readable detail.
    ErrorMessage,
    /// How many times processing was tried.
    Attempts,
    /// Where the record was read from.
    OriginalTopic,
    /// Partition it was read from.
    OriginalPartition,
    /// Offset it was read from.
    OriginalOffset,
    /// Its Kafka timestamp (ms since the epoch), when it had one.
    OriginalTimestamp,
    /// The consumer group that gave up on it.
    ConsumerGroup,
    /// First failure (RFC 3339).
    FirstFailedAt,
    /// Last failure (RFC 3339).
    LastFailedAt,
    /// How many times the record was replayed from the dead-letter topic;
    /// raised by each replay and kept through later failures.
    ReplayCount,
    /// The request id the ingress put on the record, kept as it was.
    RequestId,
}

impl Header {
    /// Every header.
    pub const ALL: [Header; 12] = [
        Header::ErrorKind,
        Header::ErrorMessage,
        Header::Attempts,
        Header::OriginalTopic,
        Header::OriginalPartition,
        Header::OriginalOffset,
        Header::OriginalTimestamp,
        Header::ConsumerGroup,
        Header::FirstFailedAt,
        Header::LastFailedAt,
        Header::ReplayCount,
        Header::RequestId,
    ];

    /// The prefixes of the headers a failure writes: what a replay strips
    /// (whichever of them a record carries), and what a new failure writes
    /// afresh.
    pub const FAILURE_PREFIXES: [&str; 4] = [
        "firstcome.error.",
        "firstcome.original.",
        "firstcome.failed_at.",
        "firstcome.consumer.",
    ];

    /// The name on the record.
    pub const fn as_str(self) -> &'static str {
        match self {
            Header::ErrorKind => "firstcome.error.kind",
            Header::ErrorMessage => "firstcome.error.message",
            Header::Attempts => "firstcome.error.attempts",
            Header::OriginalTopic => "firstcome.original.topic",
            Header::OriginalPartition => "firstcome.original.partition",
            Header::OriginalOffset => "firstcome.original.offset",
            Header::OriginalTimestamp => "firstcome.original.timestamp",
            Header::ConsumerGroup => "firstcome.consumer.group",
            Header::FirstFailedAt => "firstcome.failed_at.first",
            Header::LastFailedAt => "firstcome.failed_at.last",
            Header::ReplayCount => REPLAY_COUNT_HEADER,
            Header::RequestId => firstcome::record::REQUEST_ID_HEADER,
        }
    }

    /// Whether a header of this name is stripped by a replay.
    pub fn is_failure(name: &str) -> bool {
        Self::FAILURE_PREFIXES.iter().any(|p| name.starts_with(p))
    }
}

/// Why a record is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The value is not a valid issue request (not JSON, bad ids, missing fields).
    InvalidRecord,
    /// The record key is not the coupon id of its value, so the record may sit
    /// in the wrong partition and its place in the log means nothing.
    KeyMismatch,
    /// The coupon does not exist in Postgres.
    UnknownCoupon,
    /// Postgres refused to store the decision, attempt after attempt.
    PermanentFailure,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::InvalidRecord,
        ErrorKind::KeyMismatch,
        ErrorKind::UnknownCoupon,
        ErrorKind::PermanentFailure,
    ];

    /// The header spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRecord => "invalid_record",
            ErrorKind::KeyMismatch => "key_mismatch",
            ErrorKind::UnknownCoupon => "unknown_coupon",
            ErrorKind::PermanentFailure => "permanent_failure",
        }
    }
}

impl From<Unreadable> for DeadLetter {
    fn from(why: Unreadable) -> Self {
        let kind = match why {
            Unreadable::NoValue | Unreadable::Invalid(_) => ErrorKind::InvalidRecord,
            Unreadable::KeyMismatch { .. } => ErrorKind::KeyMismatch,
        };
        Self::new(kind, why.to_string())
    }
}

/// A record the worker gives up on, with the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Why.
    pub kind: ErrorKind,
    /// Detail for the operator.
    pub message: String,
    /// Processing attempts made.
    pub attempts: u32,
    /// When it first failed.
    pub first_failed_at: DateTime<Utc>,
}

impl DeadLetter {
    /// A record for a coupon Postgres does not know.
    pub fn unknown_coupon(coupon: &str) -> Self {
        Self::new(
            ErrorKind::UnknownCoupon,
            format!("coupon {coupon:?} does not exist"),
        )
    }

    /// A record whose decision Postgres refused `attempts` times.
    pub fn permanent(
        error: impl std::fmt::Display,
        attempts: u32,
        first_failed_at: DateTime<Utc>,
    ) -> Self {
        Self {
            kind: ErrorKind::PermanentFailure,
            message: error.to_string(),
            attempts,
            first_failed_at,
        }
    }

    fn new(kind: ErrorKind, message: String) -> Self {
        Self {
            kind,
            message,
            attempts: 1,
            first_failed_at: Utc::now(),
        }
    }

    /// The dead letter of `rec`, read from `topic` by `group`, for
    /// `dlq_topic`: the record's key and value with the headers that say
    /// what happened.
    pub fn record<'a>(
        &self,
        rec: &'a Rec,
        topic: &str,
        group: &str,
        dlq_topic: &'a str,
    ) -> FutureRecord<'a, [u8], [u8]> {
        let mut h = vec![
            (Header::ErrorKind, self.kind.as_str().to_owned()),
            (Header::ErrorMessage, self.message.clone()),
            (Header::Attempts, self.attempts.to_string()),
            (Header::OriginalTopic, topic.to_owned()),
            (Header::OriginalPartition, rec.partition.to_string()),
            (Header::OriginalOffset, rec.offset.to_string()),
            (Header::ConsumerGroup, group.to_owned()),
            (Header::FirstFailedAt, self.first_failed_at.to_rfc3339()),
            (Header::LastFailedAt, Utc::now().to_rfc3339()),
        ];
        if let Some(ts) = rec.timestamp_ms {
            h.push((Header::OriginalTimestamp, ts.to_string()));
        }
        if rec.replay_count > 0 {
            h.push((Header::ReplayCount, rec.replay_count.to_string()));
        }
        if let Some(id) = &rec.request_id_header {
            h.push((Header::RequestId, id.clone()));
        }
        let headers = h
            .into_iter()
            .fold(OwnedHeaders::new(), |acc, (key, value)| {
                acc.insert(rdkafka::message::Header {
                    key: key.as_str(),
                    value: Some(value.as_bytes()),
                })
            });
        let mut record = FutureRecord::to(dlq_topic).headers(headers);
        if let Some(k) = &rec.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &rec.payload {
            record = record.payload(p.as_slice());
        }
        record
    }
}

/// A dead letter put back for `request_topic`: its original key and value
/// (so the request keeps its `request_id`, and a decision already made
/// stands), without the failure headers and with the replay count raised.
pub fn replayed<'a>(m: &'a OwnedMessage, request_topic: &'a str) -> FutureRecord<'a, [u8], [u8]> {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            if h.key != Header::ReplayCount.as_str() && !Header::is_failure(h.key) {
                headers = headers.insert(rdkafka::message::Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
    }
    let next = (replay_count(m) + 1).to_string();
    headers = headers.insert(rdkafka::message::Header {
        key: Header::ReplayCount.as_str(),
        value: Some(next.as_bytes()),
    });
    let mut record = FutureRecord::to(request_topic).headers(headers);
    if let Some(k) = m.key() {
        record = record.key(k);
    }
    if let Some(v) = m.payload() {
        record = record.payload(v);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::Header;

    #[test]
    fn a_replay_strips_every_failure_header_and_keeps_the_count_and_the_request_id() {
        for h in Header::ALL {
            let kept = matches!(h, Header::ReplayCount | Header::RequestId);
            assert_eq!(Header::is_failure(h.as_str()), !kept, "{h:?}");
        }
        let mut names: Vec<&str> = Header::ALL.iter().map(|h| h.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Header::ALL.len(), "two headers share a name");
    }
}
