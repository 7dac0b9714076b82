//! The request-status cache in Redis: `pending` written by the ingress once
//! the broker acknowledged a request, the final status written by the worker
//! once Postgres stored the decision, each under `P req:{R}` with a TTL, and
//! the ids of every stored batch published on `P decided` for long polls.
//! Postgres stays the answer of record; a status missing here is read from
//! the ledger.
//!
//! [`StatusCache`] is the handle both binaries use; the functions under it
//! take any connection, for tests that need a raw one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::decision::Decision;
use crate::ids::{CouponId, RequestId, UserId};
use crate::keys::Keys;
use crate::record::{IssueRequest, Status};
use crate::redis_conn::{Connection, RedisConn};
use crate::state::StateError;

/// The keys this module owns.
impl Keys {
    /// The status key of one request (`P req:{R}`).
    pub fn request(&self, request: RequestId) -> String {
        // Built by hand: one per status written or read.
        let prefix = self.prefix();
        let mut key = String::with_capacity(prefix.len() + 42);
        key.push_str(prefix);
        key.push_str("req:{");
        key.push_str(request.encode(&mut [0; 36]));
        key.push('}');
        key
    }

    /// The channel on which the worker publishes the ids of each stored
    /// batch (space-separated), for the ingress's long polls.
    pub fn decided_channel(&self) -> String {
        format!("{}decided", self.prefix())
    }
}

/// The status cache of one key prefix, with the TTL of its entries. Cheap to
/// clone; clones share the connection.
#[derive(Clone)]
pub struct StatusCache {
    redis: RedisConn,
    keys: Keys,
    ttl: Duration,
}

impl StatusCache {
    /// The cache under `keys`, entries kept for `ttl`.
    pub fn new(redis: RedisConn, keys: Keys, ttl: Duration) -> Self {
        Self { redis, keys, ttl }
    }

    /// A request's cached status.
    pub async fn get(&self, request: RequestId) -> Result<Option<RequestStatus>, StateError> {
        get_status(&mut self.redis.clone(), &self.keys, request).await
    }

    /// Records just-accepted requests as pending, each unless a status is
    /// there already (see [`put_pending`]); how many were written.
    pub async fn put_pending(&self, statuses: &[RequestStatus]) -> Result<usize, StateError> {
        put_pending(&mut self.redis.clone(), &self.keys, statuses, self.ttl).await
    }

    /// Writes final statuses and announces them (see [`put_statuses`]).
    pub async fn put_final(&self, statuses: &[RequestStatus]) -> Result<(), StateError> {
        put_statuses(&mut self.redis.clone(), &self.keys, statuses, self.ttl).await
    }

    /// Writes a batch's final statuses and announces them with each
    /// coupon's progress (see [`put_decided`]).
    pub async fn put_decided(
        &self,
        statuses: &[RequestStatus],
        progress: &[(&CouponId, i64)],
    ) -> Result<(), StateError> {
        put_decided(
            &mut self.redis.clone(),
            &self.keys,
            statuses,
            progress,
            self.ttl,
        )
        .await
    }

    /// The channel the ids of stored batches are published on.
    pub fn decided_channel(&self) -> String {
        self.keys.decided_channel()
    }
}

/// What a status lookup answers; also the JSON kept under `req:{R}`. The
/// fields are the request's and its decision's, named as in the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // the names say it all; `decided_at` is `None` while pending
pub struct RequestStatus {
    pub request_id: RequestId,
    pub coupon_id: CouponId,
    pub user_id: UserId,
    pub status: Status,
    #[serde(serialize_with = "crate::time::serialize")]
    pub accepted_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::time::serialize_option")]
    pub decided_at: Option<DateTime<Utc>>,
    /// Where a pending request sits in its coupon's partition, as the
    /// broker acknowledged it: what its place in line is counted from.
    /// Kept in the cache only; a lookup answers the place instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_offset: Option<i64>,
}

impl RequestStatus {
    /// The status of a request that was just accepted.
    pub fn pending(r: &IssueRequest) -> Self {
        Self {
            request_id: r.request_id,
            coupon_id: r.coupon_id.clone(),
            user_id: r.user_id.clone(),
            status: Status::Pending,
            accepted_at: r.accepted_at,
            decided_at: None,
            log_offset: None,
        }
    }

    /// A pending status that knows its offset in the log.
    pub fn at_offset(self, offset: i64) -> Self {
        Self {
            log_offset: Some(offset),
            ..self
        }
    }

    /// The status of a decided request.
    pub fn decided(r: &IssueRequest, d: Decision) -> Self {
        Self {
            status: d.status,
            decided_at: Some(d.decided_at),
            ..Self::pending(r)
        }
    }
}

/// Records just-accepted requests as pending, each unless a status is
/// there already: the worker may decide a request (and write its final
/// status) before the ingress gets here, and a final status must never be
/// overwritten by `pending`. Each coupon's count of accepted requests rides
/// along. One round trip for the lot (on a cluster, one per node). Returns
/// how many were written.
pub async fn put_pending<C: Connection>(
    conn: &mut C,
    keys: &Keys,
    statuses: &[RequestStatus],
    ttl: Duration,
) -> Result<usize, StateError> {
    let ttl = ttl.as_secs().max(1);
    let set = |s: &RequestStatus| set_status(keys, s, ttl, true);
    // One increment per run of one coupon's requests (a flash sale is one
    // long run); a coupon met again later gets another, which adds up the
    // same, and the pass stays linear however many coupons a batch holds.
    let mut accepted: Vec<(&CouponId, i64)> = Vec::new();
    for s in statuses {
        match accepted.last_mut() {
            Some((c, n)) if *c == &s.coupon_id => *n += 1,
            _ => accepted.push((&s.coupon_id, 1)),
        }
    }
    if conn.clustered() {
        // Each status key has a hash slot of its own: one command each, all
        // in flight together (the client pipelines them per node).
        let writes = statuses.iter().map(|s| {
            let mut c = conn.clone();
            let cmd = set(s);
            async move { cmd.query_async::<Option<String>>(&mut c).await }
        });
        let counts = accepted.iter().map(|(coupon, n)| {
            let mut c = conn.clone();
            let mut cmd = redis::cmd("INCRBY");
            cmd.arg(keys.accepted(coupon)).arg(*n);
            async move { cmd.query_async::<i64>(&mut c).await }
        });
        let (written, _) = futures::try_join!(
            futures::future::try_join_all(writes),
            futures::future::try_join_all(counts)
        )?;
        return Ok(written.iter().filter(|w| w.is_some()).count());
    }
    let mut pipe = redis::pipe();
    for s in statuses {
        pipe.add_command(set(s));
    }
    for (coupon, n) in &accepted {
        pipe.incr(keys.accepted(coupon), *n).ignore();
    }
    let written: Vec<Option<String>> = pipe.query_async(conn).await?;
    Ok(written.iter().filter(|w| w.is_some()).count())
}

/// Writes final status entries in one pipeline, each expiring after `ttl`.
pub async fn put_statuses<C: Connection>(
    conn: &mut C,
    keys: &Keys,
    statuses: &[RequestStatus],
    ttl: Duration,
) -> Result<(), StateError> {
    put_decided(conn, keys, statuses, &[], ttl).await
}

/// [`put_statuses`], and announces with the ids each coupon's progress in
/// its partition (`@{coupon}={offset}`: the log offset of its last decided
/// record), which wakes the long polls waiting for a place in line to fall.
pub async fn put_decided<C: Connection>(
    conn: &mut C,
    keys: &Keys,
    statuses: &[RequestStatus],
    progress: &[(&CouponId, i64)],
    ttl: Duration,
) -> Result<(), StateError> {
    // A batch of dead letters only has no status to write; Redis refuses an
    // empty pipeline.
    if statuses.is_empty() {
        return Ok(());
    }
    let ttl = ttl.as_secs().max(1);
    let mut ids = String::with_capacity(statuses.len() * 37 + progress.len() * 40);
    for s in statuses {
        if !ids.is_empty() {
            ids.push(' ');
        }
        ids.push_str(s.request_id.encode(&mut [0; 36]));
    }
    for (coupon, offset) in progress {
        use std::fmt::Write;
        let _ = write!(ids, " @{}={offset}", coupon.as_str());
    }
    let set = |s: &RequestStatus| set_status(keys, s, ttl, false);
    if conn.clustered() {
        // Each status key has a hash slot of its own: one command each, all
        // in flight together (the client pipelines them per node), and the
        // publication once they are all written.
        let writes = statuses.iter().map(|s| {
            let mut c = conn.clone();
            let cmd = set(s);
            async move { cmd.exec_async(&mut c).await }
        });
        futures::future::try_join_all(writes).await?;
        redis::cmd("PUBLISH")
            .arg(keys.decided_channel())
            .arg(ids)
            .exec_async(conn)
            .await?;
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for s in statuses {
        pipe.add_command(set(s)).ignore();
    }
    // After the statuses, so a woken long poll reads the final one.
    pipe.publish(keys.decided_channel(), ids).ignore();
    pipe.exec_async(conn).await?;
    Ok(())
}

/// `SET P req:{R} <status JSON> [NX] EX ttl`; `NX` for a pending entry,
/// which must never overwrite a final status.
fn set_status(keys: &Keys, s: &RequestStatus, ttl: u64, if_absent: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(keys.request(s.request_id)).arg(s.to_json());
    if if_absent {
        cmd.arg("NX");
    }
    cmd.arg("EX").arg(ttl);
    cmd
}

/// Reads a request's cached status.
pub async fn get_status<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &Keys,
    request: RequestId,
) -> Result<Option<RequestStatus>, StateError> {
    let json: Option<String> = redis::cmd("GET")
        .arg(keys.request(request))
        .query_async(conn)
        .await?;
    json.map(|j| {
        serde_json::from_str(&j).map_err(|e| StateError::Protocol(format!("status entry: {e}")))
    })
    .transpose()
}
