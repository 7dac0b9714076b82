//! `Idempotency-Key` on `POST /v1/coupons/{id}/issue`: a client that lost an
//! answer (a timeout, a 503) sends the same request with the same key and
//! gets the same `request_id`, never a second request.
//!
//! A key belongs to one coupon. An admitted request's key is kept in Redis
//! for `FIRSTCOME_IDEMPOTENCY_TTL`, with the request it stands for and
//! whether the broker acknowledged it. A retry of a confirmed request is
//! answered from there and appends nothing. A retry of an unconfirmed one
//! within [`REAPPEND_WINDOW`] appends the *same* record again: if the first
//! copy did reach the log, the worker gives the second its first answer back
//! (decisions are per `request_id`), so nothing is decided twice either way.
//! Past the window the retry asks the status cache and the ledger first, and
//! a request neither knows goes through admission again (window, stock) as
//! the same `request_id` accepted now: an unconfirmed key no longer lets a
//! client append past the sale's end for a day (red team #14).
//!
//! Attempts with one key may run at the same time (a client that timed out
//! and retried at once). Each makes its admission checks, then claims the
//! key with its outcome (`SET NX`); the one that claims first fixes the
//! answer, and every other attempt gives that answer instead of its own. So
//! an attempt that found the coupon sold out a moment after another took the
//! last unit answers that other's `202`, and the key's answer never depends
//! on which attempt the client happens to read. A `503` fixes nothing.
//!
//! A refusal (`404 coupon_not_found`, `409 sold_out`, `409 not_open`) claims
//! the key for [`REFUSAL_TTL`] only: long enough to order attempts that run
//! together, never long enough to matter. Kept for a day, a refusal was an
//! anonymous write of a few hundred bytes per fresh key that filled Redis
//! (red team #4), and it outlived its truth: a click a second before the
//! start stayed `not_open` for the whole sale, a `sold_out` outlived an
//! added stock. At one ingress core's rate of refusals (about 25,000 a
//! second) the refusals held at once stay under 30,000 keys, about 6 MiB.

use std::time::Duration;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use firstcome::redis_conn::RedisConn;
use firstcome::state::Keys;
use firstcome::{CouponId, IssueRequest, RequestId, UserId};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The request header that carries a client's idempotency key (lower
/// case: how `http` compares header names).
pub const HEADER: &str = "idempotency-key";
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 128;
/// How long a key operation may wait for Redis.
const TIMEOUT: Duration = Duration::from_millis(500);
/// How long a refusal holds its key (see the module docs).
pub const REFUSAL_TTL: Duration = Duration::from_secs(1);
/// How long after its first attempt an unconfirmed request is appended
/// again as it was. The first copy was either acknowledged or given up by
/// the producer within `FIRSTCOME_PRODUCE_TIMEOUT`; a minute leaves room
/// for a slow client's retries.
pub const REAPPEND_WINDOW: Duration = Duration::from_secs(60);

/// What a key stands for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    request_id: RequestId,
    user_id: UserId,
    accepted_at: DateTime<Utc>,
    confirmed: bool,
    /// The refusal's code, when the first attempt was refused (nothing was
    /// appended then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
}

/// A refusal a key remembers: the admission's answers that hold for the
/// request whenever it is asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `404 coupon_not_found`.
    CouponNotFound,
    /// `409 sold_out`.
    SoldOut,
    /// `409 not_open`.
    NotOpen,
}

impl Refusal {
    /// The refusal `e` is, if it is one a key remembers.
    pub fn of(e: &ApiError) -> Option<Self> {
        match e {
            ApiError::CouponNotFound(_) => Some(Self::CouponNotFound),
            ApiError::SoldOut(_) => Some(Self::SoldOut),
            ApiError::NotOpen(_) => Some(Self::NotOpen),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::CouponNotFound => "coupon_not_found",
            Self::SoldOut => "sold_out",
            Self::NotOpen => "not_open",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::CouponNotFound, Self::SoldOut, Self::NotOpen]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    /// The answer, for `coupon`.
    pub fn error(self, coupon: &CouponId) -> ApiError {
        let c = coupon.to_string();
        match self {
            Self::CouponNotFound => ApiError::CouponNotFound(c),
            Self::SoldOut => ApiError::SoldOut(c),
            Self::NotOpen => ApiError::NotOpen(c),
        }
    }
}

/// What the first attempt with a key came to.
pub enum Outcome<'a> {
    /// Admitted as this request.
    Admitted(&'a IssueRequest),
    /// Refused, nothing appended.
    Refused(Refusal),
}

/// What an earlier use of the key says about this request.
pub enum Prior {
    /// The key is new (nothing stored yet).
    None,
    /// The broker acknowledged this request earlier: answer it again.
    Confirmed(RequestId),
    /// Sent before without an acknowledgement, within [`REAPPEND_WINDOW`]:
    /// append it again, as it was.
    Unconfirmed(IssueRequest),
    /// Sent before without an acknowledgement, longer ago than
    /// [`REAPPEND_WINDOW`]: ask where it stands before anything else.
    Stale(IssueRequest),
    /// Refused before: refuse again.
    Refused(Refusal),
}

/// The key of the request, if it carries one; `422` if it is malformed.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "Idempotency-Key must be 1-{MAX_KEY_LEN} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_owned()))
}

/// One key of one coupon, in Redis.
pub struct Slot {
    redis_key: String,
    ttl: Duration,
}

impl Slot {
    /// The slot of `key` for `coupon`.
    pub fn new(keys: &Keys, coupon: &CouponId, key: &str, ttl: Duration) -> Self {
        Self {
            // In the coupon's hash slot, beside its state.
            redis_key: format!("{}idem:{{{coupon}}}:{key}", keys.prefix()),
            ttl,
        }
    }

    /// What an earlier use says, for a request by `user`; `422` if the key
    /// was used for another user.
    pub async fn prior(
        &self,
        redis: &mut RedisConn,
        coupon: &CouponId,
        user: &UserId,
    ) -> Result<Prior, ApiError> {
        let stored: Option<String> =
            with_timeout(redis::cmd("GET").arg(&self.redis_key).query_async(redis)).await?;
        let Some(stored) = stored else {
            return Ok(Prior::None);
        };
        let entry: Entry = serde_json::from_str(&stored)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("idempotency entry: {e}")))?;
        if &entry.user_id != user {
            return Err(ApiError::IdempotencyKeyReused);
        }
        if let Some(code) = &entry.refused {
            let refusal = Refusal::parse(code).ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("idempotency entry: refusal {code:?}"))
            })?;
            return Ok(Prior::Refused(refusal));
        }
        if entry.confirmed {
            return Ok(Prior::Confirmed(entry.request_id));
        }
        let age = (Utc::now() - entry.accepted_at)
            .to_std()
            .unwrap_or_default();
        let request = IssueRequest {
            request_id: entry.request_id,
            coupon_id: coupon.clone(),
            user_id: entry.user_id,
            accepted_at: entry.accepted_at,
        };
        Ok(if age < REAPPEND_WINDOW {
            Prior::Unconfirmed(request)
        } else {
            Prior::Stale(request)
        })
    }

    /// Stores the first attempt's outcome under the key, unless another
    /// attempt stored one first (false: look again with [`Slot::prior`]).
    pub async fn claim(
        &self,
        redis: &mut RedisConn,
        user: &UserId,
        outcome: Outcome<'_>,
    ) -> Result<bool, ApiError> {
        let (entry, ttl) = match outcome {
            Outcome::Admitted(request) => (entry_json(request, false), self.ttl),
            Outcome::Refused(refusal) => (
                serde_json::to_string(&Entry {
                    request_id: RequestId::new(),
                    user_id: user.clone(),
                    accepted_at: Utc::now(),
                    confirmed: false,
                    refused: Some(refusal.as_str().to_owned()),
                })
                .expect("an entry always serializes"),
                REFUSAL_TTL.min(self.ttl),
            ),
        };
        let set: Option<String> = with_timeout(
            redis::cmd("SET")
                .arg(&self.redis_key)
                .arg(entry)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                .query_async(redis),
        )
        .await?;
        Ok(set.is_some())
    }

    /// Marks the request acknowledged. Best effort: if it fails, a retry
    /// appends the same record again, which decides nothing twice.
    pub async fn confirm(&self, redis: &mut RedisConn, request: &IssueRequest) {
        let done: Result<Option<String>, ApiError> = with_timeout(
            redis::cmd("SET")
                .arg(&self.redis_key)
                .arg(entry_json(request, true))
                .arg("XX")
                .arg("KEEPTTL")
                .query_async(redis),
        )
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "idempotency key not marked confirmed");
        }
    }
}

fn entry_json(request: &IssueRequest, confirmed: bool) -> String {
    serde_json::to_string(&Entry {
        request_id: request.request_id,
        user_id: request.user_id.clone(),
        accepted_at: request.accepted_at,
        confirmed,
        refused: None,
    })
    .expect("an entry always serializes")
}

/// Redis within [`TIMEOUT`]; failing that, `503`: without its key store the
/// ingress cannot keep the key's promise, and the client may retry.
async fn with_timeout<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, ApiError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::unavailable(format!(
            "redis (idempotency key): {e}"
        ))),
        Err(_) => Err(ApiError::unavailable("redis (idempotency key): timed out")),
    }
}
