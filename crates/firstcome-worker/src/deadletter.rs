//! Dead letters: records the worker cannot process. They go to the
//! dead-letter topic with the source record's key and value untouched and
//! headers that say what happened, and only once the broker acknowledged the
//! dead letter does the source offset move past it.

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};

use crate::pipeline::Rec;

/// Header names on a dead letter.
pub mod headers {
    /// Why the record failed: one of [`super::ErrorKind`]'s names.
    pub const ERROR_KIND: &str = "firstcome.error.kind";
    /// Human-readable detail.
    pub const ERROR_MESSAGE: &str = "firstcome.error.message";
    /// How many times processing was tried.
    pub const ATTEMPTS: &str = "firstcome.error.attempts";
    /// Where the record was read from.
    pub const ORIGINAL_TOPIC: &str = "firstcome.original.topic";
    /// Partition it was read from.
    pub const ORIGINAL_PARTITION: &str = "firstcome.original.partition";
    /// Offset it was read from.
    pub const ORIGINAL_OFFSET: &str = "firstcome.original.offset";
    /// Its Kafka timestamp (ms since the epoch), when it had one.
    pub const ORIGINAL_TIMESTAMP: &str = "firstcome.original.timestamp";
    /// The consumer group that gave up on it.
    pub const CONSUMER_GROUP: &str = "firstcome.consumer.group";
    /// First failure (RFC 3339).
    pub const FIRST_FAILED_AT: &str = "firstcome.failed_at.first";
    /// Last failure (RFC 3339).
    pub const LAST_FAILED_AT: &str = "firstcome.failed_at.last";
    /// How many times the record was replayed from the dead-letter topic.
    pub const REPLAY_COUNT: &str = "firstcome.replay.count";
    /// The prefix of every header above but the replay count: what a replay
    /// strips, and what a new failure writes afresh.
    pub const ERROR_PREFIXES: [&str; 4] = [
        "firstcome.error.",
        "firstcome.original.",
        "firstcome.failed_at.",
        "firstcome.consumer.",
    ];
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
    /// A record whose value does not parse or validate.
    pub fn invalid_record(e: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidRecord, e.to_string())
    }

    /// A record whose key is not its coupon id.
    pub fn key_mismatch(key: Option<&[u8]>, coupon: &str) -> Self {
        let key = key.map(String::from_utf8_lossy);
        Self::new(
            ErrorKind::KeyMismatch,
            format!("record key {key:?} differs from coupon_id {coupon:?}"),
        )
    }

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

    /// The headers of the dead-letter record.
    pub fn headers(&self, rec: &Rec, topic: &str, group: &str) -> OwnedHeaders {
        let mut h = vec![
            (headers::ERROR_KIND, self.kind.as_str().to_owned()),
            (headers::ERROR_MESSAGE, self.message.clone()),
            (headers::ATTEMPTS, self.attempts.to_string()),
            (headers::ORIGINAL_TOPIC, topic.to_owned()),
            (headers::ORIGINAL_PARTITION, rec.partition.to_string()),
            (headers::ORIGINAL_OFFSET, rec.offset.to_string()),
            (headers::CONSUMER_GROUP, group.to_owned()),
            (headers::FIRST_FAILED_AT, self.first_failed_at.to_rfc3339()),
            (headers::LAST_FAILED_AT, Utc::now().to_rfc3339()),
        ];
        if let Some(ts) = rec.timestamp_ms {
            h.push((headers::ORIGINAL_TIMESTAMP, ts.to_string()));
        }
        if rec.replay_count > 0 {
            h.push((headers::REPLAY_COUNT, rec.replay_count.to_string()));
        }
        if let Some(id) = &rec.request_id_header {
            h.push((firstcome::record::REQUEST_ID_HEADER, id.clone()));
        }
        h.into_iter()
            .fold(OwnedHeaders::new(), |acc, (key, value)| {
                acc.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            })
    }
}
