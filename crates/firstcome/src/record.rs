//! The issue request as it travels through Kafka, and the status it ends in.
//!
//! The record key is the coupon id, so every request for one coupon lands in
//! one partition and that partition's offset order is the first-come order.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{CouponId, RequestId, UserId};

/// Kafka header carrying the request id on every record the ingress
/// writes, so one request can be followed through the log, the worker's logs
/// and the dead-letter topic without parsing the value (replays keep it).
pub const REQUEST_ID_HEADER: &str = "firstcome.request.id";

/// The value of a record on the request topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    /// Made by the ingress; the key of every later status lookup.
    pub request_id: RequestId,
    /// Also the record key.
    pub coupon_id: CouponId,
    /// Who asks for the coupon.
    pub user_id: UserId,
    /// When the ingress accepted the request; the coupon's window is judged on it.
    #[serde(serialize_with = "crate::time::serialize")]
    pub accepted_at: DateTime<Utc>,
}

impl IssueRequest {
    /// Parses a record value, validating every id.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Where an issue request stands. Every status but `Pending` is final: once
/// decided, a request keeps its status forever, also when redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted and in the log, not decided yet.
    Pending,
    /// The user got the coupon.
    Issued,
    /// The user already held this coupon from an earlier request.
    Duplicate,
    /// The stock was gone when the request's turn came.
    SoldOut,
    /// Accepted before `starts_at` or after `ends_at`.
    NotOpen,
    /// Decided, but the decision could not be stored for good; whatever it
    /// took was given back and the record is in the dead-letter topic.
    Failed,
}

impl Status {
    /// Every final status.
    pub const FINAL: [Status; 5] = [
        Status::Issued,
        Status::Duplicate,
        Status::SoldOut,
        Status::NotOpen,
        Status::Failed,
    ];

    /// The wire and database spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Issued => "issued",
            Status::Duplicate => "duplicate",
            Status::SoldOut => "sold_out",
            Status::NotOpen => "not_open",
            Status::Failed => "failed",
        }
    }

    /// Whether the status can still change.
    pub const fn is_final(self) -> bool {
        !matches!(self, Status::Pending)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the statuses.
#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => Status::Pending,
            "issued" => Status::Issued,
            "duplicate" => Status::Duplicate,
            "sold_out" => Status::SoldOut,
            "not_open" => Status::NotOpen,
            "failed" => Status::Failed,
            other => return Err(UnknownStatus(other.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_json() {
        let r = IssueRequest {
            request_id: RequestId::new(),
            coupon_id: CouponId::parse("c1").unwrap(),
            user_id: UserId::parse("u1").unwrap(),
            accepted_at: Utc::now(),
        };
        assert_eq!(IssueRequest::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn a_record_with_an_invalid_id_or_extra_field_does_not_parse() {
        let rid = RequestId::new();
        let bad_user = format!(
            r#"{{"request_id":"{rid}","coupon_id":"c","user_id":"a b","accepted_at":"2026-01-01T00:00:00Z"}}"#
        );
        assert!(IssueRequest::from_json(bad_user.as_bytes()).is_err());
        let extra = format!(
            r#"{{"request_id":"{rid}","coupon_id":"c","user_id":"u","accepted_at":"2026-01-01T00:00:00Z","x":1}}"#
        );
        assert!(IssueRequest::from_json(extra.as_bytes()).is_err());
    }

    #[test]
    fn statuses_round_trip_through_their_spelling() {
        for s in [
            Status::Pending,
            Status::Issued,
            Status::Duplicate,
            Status::SoldOut,
            Status::NotOpen,
            Status::Failed,
        ] {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("failed?".parse::<Status>().is_err());
    }
}
