//! A decision and what a coupon's state is built from: the values the Redis
//! engine ([`crate::state`]) and the system of record ([`crate::db`]) pass
//! each other, so neither imports the other for them.

use chrono::{DateTime, Utc};

use crate::ids::{RequestId, UserId};
use crate::record::Status;

/// A final answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Never `Pending`.
    pub status: Status,
    /// When the request was first decided; redelivery keeps it.
    pub decided_at: DateTime<Utc>,
}

/// Everything needed to (re)create a coupon's Redis state, read from Postgres.
#[derive(Debug, Clone)]
pub struct CouponSnapshot {
    /// The epoch taken for this build (`coupon.redis_epoch`).
    pub epoch: i64,
    /// Decisions stored so far (`coupon.decided_seq`).
    pub seq: i64,
    /// The coupon's total stock.
    pub total_stock: i64,
    /// Start of the issue window, if any.
    pub starts_at: Option<DateTime<Utc>>,
    /// End of the issue window, if any.
    pub ends_at: Option<DateTime<Utc>>,
    /// Users holding the coupon (rows of `user_coupon`).
    pub issued_users: Vec<UserId>,
    /// Decisions recorded in the ledger (not the `failed` ones, which hold
    /// no decision).
    pub decisions: Vec<(RequestId, Decision)>,
}
