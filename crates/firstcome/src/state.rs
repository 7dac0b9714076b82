//! The fast state in Redis: what the worker decides against, and the cache
//! the ingress answers status lookups from. Postgres stays the system of
//! record; everything here can be rebuilt from it.
//!
//! # Layout
//! With `P` the configured key prefix (e.g. `fc:`) and `C` a coupon id, all
//! keys of a coupon share the hash tag `{C}`, so one Lua call can touch them
//! all on Redis Cluster too:
//! - `P coupon:{C}:meta`    hash: `total`, `starts_at_us`, `ends_at_us`
//! - `P coupon:{C}:stock`   string: units left (the seed's counter)
//! - `P coupon:{C}:users`   set: users holding the coupon (the seed's set)
//! - `P coupon:{C}:decided` hash: request id → `status:decided_at_us`
//! - `P req:{R}`            string: JSON [`RequestStatus`] of request `R`,
//!   written `pending` by the ingress and final by the worker, with a TTL

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::Script;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::ids::{CouponId, RequestId, UserId};
use crate::record::{IssueRequest, Status};

static DECIDE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("decide.lua")));
static UNDO: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("undo.lua")));
static INIT_COUPON: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("init_coupon.lua")));

/// How many members one `SADD`/`HSET` carries when loading a coupon's state.
const LOAD_CHUNK: usize = 1_000;

/// A Redis failure, or a reply this code does not understand.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Redis could not be reached or refused the command.
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// A script or key held something this version does not expect.
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
}

/// The key prefix is not usable.
#[derive(Debug, thiserror::Error)]
#[error("redis key prefix {0:?} must not contain '{{' or '}}' (they would break the hash tags)")]
pub struct BadPrefix(pub String);

/// Builds every key of the layout above for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`, which must not contain braces.
    pub fn new(prefix: impl Into<String>) -> Result<Self, BadPrefix> {
        let prefix = prefix.into();
        if prefix.contains(['{', '}']) {
            return Err(BadPrefix(prefix));
        }
        Ok(Self { prefix })
    }

    /// The keys of one coupon.
    pub fn coupon(&self, coupon: &CouponId) -> CouponKeys {
        let base = format!("{}coupon:{{{coupon}}}", self.prefix);
        CouponKeys {
            meta: format!("{base}:meta"),
            stock: format!("{base}:stock"),
            users: format!("{base}:users"),
            decided: format!("{base}:decided"),
        }
    }

    /// The status key of one request.
    pub fn request(&self, request: RequestId) -> String {
        format!("{}req:{{{request}}}", self.prefix)
    }
}

/// The four keys of one coupon (see the module docs).
#[derive(Debug, Clone)]
pub struct CouponKeys {
    /// Window and total; its existence marks the state as initialized.
    pub meta: String,
    /// Units left.
    pub stock: String,
    /// Users holding the coupon.
    pub users: String,
    /// Request id → final status and decision time.
    pub decided: String,
}

/// A final answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Never `Pending`.
    pub status: Status,
    /// When the request was first decided; redelivery keeps it.
    pub decided_at: DateTime<Utc>,
}

/// Decides `requests` (all of one coupon, in log order) in one atomic call.
/// Returns `None` when the coupon has no state in Redis yet.
pub async fn decide<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    requests: &[&IssueRequest],
    now: DateTime<Utc>,
) -> Result<Option<Vec<Decision>>, StateError> {
    let mut call = DECIDE.prepare_invoke();
    call.key(&keys.meta)
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.decided)
        .arg(now.timestamp_micros());
    for r in requests {
        call.arg(r.request_id.to_string())
            .arg(r.user_id.as_str())
            .arg(r.accepted_at.timestamp_micros());
    }
    let reply: Vec<String> = call.invoke_async(conn).await?;
    match reply.first().map(String::as_str) {
        Some("uninitialized") => Ok(None),
        Some("ok") if reply.len() == 1 + 2 * requests.len() => reply[1..]
            .chunks_exact(2)
            .map(|pair| parse_decision(&pair[0], &pair[1]))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        _ => Err(StateError::Protocol(format!(
            "decide.lua answered {} items for {} requests",
            reply.len(),
            requests.len()
        ))),
    }
}

/// Takes back a request's decision, giving back the unit and the user's place
/// among the holders if it had been issued; a replay of the request is then
/// decided afresh. Returns the status it had.
pub async fn undo<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    request: &IssueRequest,
    failed_at: DateTime<Utc>,
) -> Result<Option<Status>, StateError> {
    let prior: String = UNDO
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.decided)
        .arg(request.request_id.to_string())
        .arg(request.user_id.as_str())
        .arg(failed_at.timestamp_micros())
        .invoke_async(conn)
        .await?;
    if prior.is_empty() {
        return Ok(None);
    }
    prior
        .parse()
        .map(Some)
        .map_err(|e| StateError::Protocol(format!("{e}")))
}

fn parse_decision(status: &str, decided_at: &str) -> Result<Decision, StateError> {
    let status: Status = status
        .parse()
        .map_err(|e| StateError::Protocol(format!("{e}")))?;
    let decided_at = decided_at
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| StateError::Protocol(format!("bad decision time {decided_at:?}")))?;
    if !status.is_final() {
        return Err(StateError::Protocol("a decision cannot be pending".into()));
    }
    Ok(Decision { status, decided_at })
}

/// Everything needed to (re)create a coupon's Redis state, read from Postgres.
#[derive(Debug, Clone)]
pub struct CouponSnapshot {
    /// The coupon's total stock.
    pub total_stock: i64,
    /// Start of the issue window, if any.
    pub starts_at: Option<DateTime<Utc>>,
    /// End of the issue window, if any.
    pub ends_at: Option<DateTime<Utc>>,
    /// Users holding the coupon (rows of `user_coupon`).
    pub issued_users: Vec<UserId>,
    /// Final decisions already recorded in the ledger.
    pub decisions: Vec<(RequestId, Decision)>,
}

/// Creates a coupon's state from `snapshot` unless it already exists.
/// Returns whether it created it. Safe to run concurrently and repeatedly.
pub async fn init_coupon<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    snapshot: &CouponSnapshot,
) -> Result<bool, StateError> {
    for chunk in snapshot.issued_users.chunks(LOAD_CHUNK) {
        let members: Vec<&str> = chunk.iter().map(UserId::as_str).collect();
        redis::cmd("SADD")
            .arg(&keys.users)
            .arg(&members)
            .exec_async(conn)
            .await?;
    }
    for chunk in snapshot.decisions.chunks(LOAD_CHUNK) {
        // Every writer loads the same values, so overwriting is harmless.
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&keys.decided);
        for (request, d) in chunk {
            cmd.arg(request.to_string()).arg(format!(
                "{}:{}",
                d.status,
                d.decided_at.timestamp_micros()
            ));
        }
        cmd.exec_async(conn).await?;
    }
    let remaining = snapshot.total_stock - snapshot.issued_users.len() as i64;
    let created: i64 = INIT_COUPON
        .key(&keys.meta)
        .key(&keys.stock)
        .arg(snapshot.total_stock)
        .arg(micros_or_empty(snapshot.starts_at))
        .arg(micros_or_empty(snapshot.ends_at))
        .arg(remaining.max(0))
        .invoke_async(conn)
        .await?;
    Ok(created == 1)
}

fn micros_or_empty(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.timestamp_micros().to_string())
        .unwrap_or_default()
}

/// Live counters of a coupon, when its state exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Units left.
    pub remaining: i64,
    /// Users holding the coupon.
    pub issued: i64,
}

/// Reads a coupon's counters in one round trip; `None` when not initialized.
pub async fn counters<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
) -> Result<Option<Counters>, StateError> {
    let (exists, remaining, issued): (bool, Option<i64>, i64) = redis::pipe()
        .exists(&keys.meta)
        .get(&keys.stock)
        .scard(&keys.users)
        .query_async(conn)
        .await?;
    Ok(exists.then(|| Counters {
        remaining: remaining.unwrap_or(0),
        issued,
    }))
}

/// Everything Redis holds about a coupon, for comparing with Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `total` of the meta hash.
    pub total: i64,
    /// Units left.
    pub remaining: i64,
    /// Users holding the coupon.
    pub users: Vec<String>,
    /// How many requests have a recorded decision.
    pub decided: i64,
}

/// Reads a coupon's whole state; `None` when not initialized.
pub async fn observe<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
) -> Result<Option<Observed>, StateError> {
    let (total, remaining, users, decided): (Option<i64>, Option<i64>, Vec<String>, i64) =
        redis::pipe()
            .hget(&keys.meta, "total")
            .get(&keys.stock)
            .smembers(&keys.users)
            .hlen(&keys.decided)
            .query_async(conn)
            .await?;
    Ok(total.map(|total| Observed {
        total,
        remaining: remaining.unwrap_or(0),
        users,
        decided,
    }))
}

/// What a status lookup answers; also the JSON kept under `req:{R}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestStatus {
    /// The request.
    pub request_id: RequestId,
    /// Its coupon.
    pub coupon_id: CouponId,
    /// Its user.
    pub user_id: UserId,
    /// Where it stands.
    pub status: Status,
    /// When the ingress accepted it.
    pub accepted_at: DateTime<Utc>,
    /// When the worker decided it; `None` while pending.
    pub decided_at: Option<DateTime<Utc>>,
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

/// Records a just-accepted request as pending, unless a status is there
/// already: the worker may decide the request (and write its final status)
/// before the ingress gets here, and a final status must never be
/// overwritten by `pending`. Returns whether it wrote.
pub async fn put_pending<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &Keys,
    status: &RequestStatus,
    ttl: Duration,
) -> Result<bool, StateError> {
    let json = serde_json::to_string(status).expect("a RequestStatus always serializes");
    let written: Option<String> = redis::cmd("SET")
        .arg(keys.request(status.request_id))
        .arg(json)
        .arg("NX")
        .arg("EX")
        .arg(ttl.as_secs().max(1))
        .query_async(conn)
        .await?;
    Ok(written.is_some())
}

/// Writes final status entries in one pipeline, each expiring after `ttl`.
pub async fn put_statuses<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &Keys,
    statuses: &[RequestStatus],
    ttl: Duration,
) -> Result<(), StateError> {
    // A batch of dead letters only has no status to write; Redis refuses an
    // empty pipeline.
    if statuses.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for s in statuses {
        let json = serde_json::to_string(s).expect("a RequestStatus always serializes");
        pipe.set_ex(keys.request(s.request_id), json, ttl.as_secs().max(1))
            .ignore();
    }
    pipe.exec_async(conn).await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_coupon_shares_one_hash_tag() {
        let keys = Keys::new("fc:").unwrap();
        let k = keys.coupon(&CouponId::parse("c-1").unwrap());
        for key in [&k.meta, &k.stock, &k.users, &k.decided] {
            assert!(key.starts_with("fc:coupon:{c-1}:"), "{key}");
        }
    }

    #[test]
    fn a_prefix_with_braces_is_refused() {
        assert!(Keys::new("a{b").is_err());
        assert!(Keys::new("").is_ok());
    }
}
