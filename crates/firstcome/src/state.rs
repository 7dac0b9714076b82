//! The fast state in Redis: what the worker decides against, and the cache
//! the ingress answers status lookups from. Postgres stays the system of
//! record; everything here can be rebuilt from it.
//!
//! # Layout
//! With `P` the configured key prefix (e.g. `fc:`) and `C` a coupon id, all
//! keys of a coupon share the hash tag `{C}`, so one Lua call can touch them
//! all on Redis Cluster too:
//! - `P coupon:{C}:meta`    hash: `epoch`, `seq`, `total`, `issued`,
//!   `decisions`, `starts_at_us`, `ends_at_us`, and `paused_until_us` while
//!   `redis rebuild` is at work
//! - `P coupon:{C}:stock`   string: units left (the seed's counter)
//! - `P coupon:{C}:users`   set: users holding the coupon (the seed's set)
//! - `P coupon:{C}:decided` hash: record id → `outcome:decided_at_us:seq`
//! - the set and the hash also hold a marker, the empty string (no id is
//!   empty), so an installed state always has all four keys
//! - `P coupon:{C}:next:{E}:users|decided`: a state of epoch `E` being built
//! - `P req:{R}`            string: JSON status of request `R` (the cache of
//!   [`crate::status`], which owns it)
//!
//! # The fence
//! A coupon's state is only ever built from Postgres by [`install`], which
//! takes a new `epoch` from Postgres first (`coupon.redis_epoch`). Each new
//! decision gets the next number of the coupon's `seq`. Postgres stores a
//! batch of decisions only if they carry its current epoch and numbers past
//! its `coupon.decided_seq` ([`crate::db::persist`]). A Redis that was wiped,
//! restored from an older copy, failed over to a lagging replica or rebuilt
//! meanwhile fails that check, so no decision taken on it is ever stored or
//! published: the worker rebuilds the coupon and decides again.
//!
//! # A state that does not add up
//! `decide.lua` checks that the state counts itself right (`issued` holders
//! in the set, `decisions` entries in the hash, `stock = total - issued`)
//! before it decides. A key or an entry lost on its own (an eviction, a
//! partial restore, a hand) makes it answer [`Verdict::Uninitialized`], and
//! the state is built again from Postgres instead of being decided on.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::Script;
use redis::aio::ConnectionLike;

use crate::ids::{CouponId, UserId};
use crate::record::{IssueRequest, Status};
use crate::redis_conn::RedisConn;

pub use crate::decision::{CouponSnapshot, Decision};
pub use crate::keys::{BadPrefix, CouponKeys, Keys};

static DECIDE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("decide.lua")));
static UNDO: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("undo.lua")));
static INSTALL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("install.lua")));
static RETIRE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("retire.lua")));

/// How long a staging key of an unfinished build survives its builder.
const STAGING_TTL_SECS: i64 = 3_600;

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

/// The coupon states under one key prefix: what the ingress reads and the
/// worker decides on. Cheap to clone; clones share the connection. The
/// functions below it take any connection, for tests that need a raw one.
#[derive(Clone)]
pub struct CouponState {
    redis: RedisConn,
    keys: Keys,
}

impl CouponState {
    /// The states under `keys`.
    pub fn new(redis: RedisConn, keys: Keys) -> Self {
        Self { redis, keys }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A clone of the connection, for an operation of its own.
    pub fn connection(&self) -> RedisConn {
        self.redis.clone()
    }

    /// Decides one coupon's requests in log order (see [`decide`]).
    pub async fn decide(
        &self,
        coupon: &CouponId,
        requests: &[&IssueRequest],
        now: DateTime<Utc>,
        last_offset: Option<i64>,
    ) -> Result<Verdict, StateError> {
        decide_at(
            &mut self.redis.clone(),
            &self.keys.coupon(coupon),
            requests,
            now,
            last_offset,
        )
        .await
    }

    /// Where a coupon's decisions stand, for the place in line of its
    /// pending requests; `None` before its state holds a progress.
    pub async fn line(&self, coupon: &CouponId) -> Result<Option<Line>, StateError> {
        let keys = self.keys.coupon(coupon);
        let (offset, stock): (Option<i64>, Option<i64>) = redis::pipe()
            .cmd("HGET")
            .arg(&keys.meta)
            .arg("offset")
            .cmd("GET")
            .arg(&keys.stock)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(offset
            .zip(stock)
            .map(|(decided_offset, remaining_stock)| Line {
                decided_offset,
                remaining_stock,
            }))
    }

    /// Takes a request's decision back (see [`undo`]).
    pub async fn undo(&self, request: &IssueRequest) -> Result<Option<Status>, StateError> {
        undo(
            &mut self.redis.clone(),
            &self.keys.coupon(&request.coupon_id),
            request,
        )
        .await
    }

    /// A coupon's live counters; `None` without a state.
    pub async fn counters(&self, coupon: &CouponId) -> Result<Option<Counters>, StateError> {
        counters(&mut self.redis.clone(), &self.keys.coupon(coupon)).await
    }

    /// Deletes the coupon's state if it is of `epoch` or older (see
    /// [`retire`]).
    pub async fn retire(&self, coupon: &CouponId, epoch: i64) -> Result<Retired, StateError> {
        retire(&mut self.redis.clone(), &self.keys.coupon(coupon), epoch).await
    }

    /// How many requests for the coupon the ingress saw acknowledged.
    pub async fn accepted(&self, coupon: &CouponId) -> Result<Option<i64>, StateError> {
        Ok(redis::cmd("GET")
            .arg(self.keys.accepted(coupon))
            .query_async(&mut self.redis.clone())
            .await?)
    }
}

/// What [`decide`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The coupon has no state in Redis: build it with [`install`].
    Uninitialized,
    /// A rebuild is at work on the coupon; try again shortly.
    Paused,
    /// One decision per request, in the order given.
    Decided(Decisions),
}

/// How far a coupon's decisions have come: the log offset of its last
/// decided record (only ever raised) and the units left as last decided.
/// A pending request at offset `o` of the coupon's partition has at most
/// `o - decided_offset - 1` of the coupon's requests ahead of it: every
/// record between is counted, the coupon's or not, so the figure is an
/// upper bound, exact when the coupon has its partition to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// The log offset of the coupon's last decided record.
    pub decided_offset: i64,
    /// Units left.
    pub remaining_stock: i64,
}

impl Line {
    /// At most how many requests are ahead of the one at `offset` and not
    /// decided yet.
    pub fn ahead_of(&self, offset: i64) -> i64 {
        (offset - self.decided_offset - 1).max(0)
    }
}

/// Decisions of one call, and the state they were taken on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    /// Epoch of the state (see the module docs).
    pub epoch: i64,
    /// Each request's decision with its sequence number (0 for a decision
    /// loaded from Postgres by a rebuild).
    pub decisions: Vec<(Decision, i64)>,
}

/// Decides `requests` (all of one coupon, in log order) in one atomic call.
pub async fn decide<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    requests: &[&IssueRequest],
    now: DateTime<Utc>,
) -> Result<Verdict, StateError> {
    decide_at(conn, keys, requests, now, None).await
}

/// [`decide`], and raises the coupon's progress in its partition to
/// `last_offset`, the log offset of the last of `requests` (see [`Line`]).
pub async fn decide_at<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    requests: &[&IssueRequest],
    now: DateTime<Utc>,
    last_offset: Option<i64>,
) -> Result<Verdict, StateError> {
    let mut call = DECIDE.prepare_invoke();
    call.key(&keys.meta)
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.decided)
        .arg(now.timestamp_micros());
    match last_offset {
        Some(o) => call.arg(o),
        None => call.arg(""),
    };
    for r in requests {
        call.arg("r")
            .arg(r.request_id.to_string())
            .arg(r.user_id.as_str())
            .arg(r.accepted_at.timestamp_micros());
    }
    let reply: Vec<String> = call.invoke_async(conn).await?;
    match reply.first().map(String::as_str) {
        Some("uninitialized") => Ok(Verdict::Uninitialized),
        Some("paused") => Ok(Verdict::Paused),
        Some("ok") if reply.len() == 2 + 3 * requests.len() => {
            let epoch = number(&reply[1], "epoch")?;
            let decisions = reply[2..]
                .chunks_exact(3)
                .map(|t| Ok((parse_decision(&t[0], &t[1])?, number(&t[2], "seq")?)))
                .collect::<Result<Vec<_>, StateError>>()?;
            Ok(Verdict::Decided(Decisions { epoch, decisions }))
        }
        _ => Err(StateError::Protocol(format!(
            "decide.lua answered {} items for {} requests",
            reply.len(),
            requests.len()
        ))),
    }
}

fn number(s: &str, what: &str) -> Result<i64, StateError> {
    s.parse()
        .map_err(|_| StateError::Protocol(format!("{what} {s:?} is not a number")))
}

/// Takes back a request's decision, giving back the unit and the user's place
/// among the holders if it had been issued; a replay of the request is then
/// decided afresh. Returns the status it had.
pub async fn undo<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    request: &IssueRequest,
) -> Result<Option<Status>, StateError> {
    let prior: String = UNDO
        .key(&keys.meta)
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.decided)
        .arg(request.request_id.to_string())
        .arg(request.user_id.as_str())
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

/// Puts the state of `snapshot` in place of whatever Redis holds for the
/// coupon, unless a state of the same or a newer epoch is there already.
/// Returns whether it installed it. Safe to run concurrently and repeatedly.
pub async fn install<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    snapshot: &CouponSnapshot,
) -> Result<bool, StateError> {
    let (users, decided) = keys.staging(snapshot.epoch);
    redis::cmd("DEL")
        .arg(&users)
        .arg(&decided)
        .exec_async(conn)
        .await?;
    for chunk in snapshot.issued_users.chunks(LOAD_CHUNK) {
        let members: Vec<&str> = chunk.iter().map(UserId::as_str).collect();
        redis::pipe()
            .sadd(&users, &members)
            .ignore()
            .expire(&users, STAGING_TTL_SECS)
            .ignore()
            .exec_async(conn)
            .await?;
    }
    for chunk in snapshot.decisions.chunks(LOAD_CHUNK) {
        let fields: Vec<(String, String)> = chunk
            .iter()
            .map(|(request, d)| {
                (
                    request.to_string(),
                    format!("{}:{}", d.status, d.decided_at.timestamp_micros()),
                )
            })
            .collect();
        redis::pipe()
            .hset_multiple(&decided, &fields)
            .ignore()
            .expire(&decided, STAGING_TTL_SECS)
            .ignore()
            .exec_async(conn)
            .await?;
    }
    let installed: i64 = INSTALL
        .key(&keys.meta)
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.decided)
        .key(&users)
        .key(&decided)
        .arg(snapshot.epoch)
        .arg(snapshot.total_stock)
        .arg(micros_or_empty(snapshot.starts_at))
        .arg(micros_or_empty(snapshot.ends_at))
        .arg(snapshot.seq)
        .invoke_async(conn)
        .await?;
    Ok(installed == 1)
}

/// What [`retire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The state of that epoch is gone from Redis.
    Deleted,
    /// A state of a newer epoch is there (a rebuild came in between); kept.
    Kept,
    /// There was no state (what was left of a partial one is gone).
    Absent,
}

/// Takes the coupon's state of `epoch` (or an older, stale one) out of
/// Redis, atomically, with the ingress's count of its accepted requests. A later record of the coupon
/// finds no state and rebuilds it from Postgres, as after any loss.
pub async fn retire<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    epoch: i64,
) -> Result<Retired, StateError> {
    let found: i64 = RETIRE
        .key(&keys.meta)
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.decided)
        .key(&keys.accepted)
        .arg(epoch)
        .invoke_async(conn)
        .await?;
    match found {
        1 => Ok(Retired::Deleted),
        0 => Ok(Retired::Kept),
        -1 => Ok(Retired::Absent),
        other => Err(StateError::Protocol(format!("retire.lua answered {other}"))),
    }
}

/// Stops decisions on the coupon for up to `ttl` (see [`Verdict::Paused`]);
/// [`install`] or [`resume`] ends the pause.
pub async fn pause<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
    ttl: Duration,
) -> Result<(), StateError> {
    let until = Utc::now() + ttl;
    redis::cmd("HSET")
        .arg(&keys.meta)
        .arg("paused_until_us")
        .arg(until.timestamp_micros())
        .exec_async(conn)
        .await?;
    Ok(())
}

/// Ends a [`pause`].
pub async fn resume<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
) -> Result<(), StateError> {
    redis::cmd("HDEL")
        .arg(&keys.meta)
        .arg("paused_until_us")
        .exec_async(conn)
        .await?;
    Ok(())
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
    /// The total stock the state was built with (or changed to).
    pub total: i64,
}

/// Reads a coupon's counters in one round trip; `None` when not initialized.
pub async fn counters<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &CouponKeys,
) -> Result<Option<Counters>, StateError> {
    let (exists, total, remaining, issued): (bool, Option<i64>, Option<i64>, i64) = redis::pipe()
        .hexists(&keys.meta, "epoch")
        .hget(&keys.meta, "total")
        .get(&keys.stock)
        .scard(&keys.users)
        .query_async(conn)
        .await?;
    Ok(exists.then(|| Counters {
        remaining: remaining.unwrap_or(0),
        issued: (issued - 1).max(0),
        total: total.unwrap_or(0),
    }))
}

/// Everything Redis holds about a coupon, for comparing with Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Epoch of the installed state.
    pub epoch: i64,
    /// Decisions numbered so far.
    pub seq: i64,
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
    type Reply = (
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Vec<String>,
        i64,
    );
    let (epoch, seq, total, remaining, users, decided): Reply = redis::pipe()
        .hget(&keys.meta, "epoch")
        .hget(&keys.meta, "seq")
        .hget(&keys.meta, "total")
        .get(&keys.stock)
        .smembers(&keys.users)
        .hlen(&keys.decided)
        .query_async(conn)
        .await?;
    Ok(epoch.map(|epoch| Observed {
        epoch,
        seq: seq.unwrap_or(0),
        total: total.unwrap_or(0),
        remaining: remaining.unwrap_or(0),
        users: users.into_iter().filter(|u| !u.is_empty()).collect(),
        decided: (decided - 1).max(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_coupon_shares_one_hash_tag() {
        let keys = Keys::new("fc:").unwrap();
        let k = keys.coupon(&CouponId::parse("c-1").unwrap());
        let (next_users, next_decided) = k.staging(3);
        for key in [
            &k.meta,
            &k.stock,
            &k.users,
            &k.decided,
            &next_users,
            &next_decided,
        ] {
            assert!(key.starts_with("fc:coupon:{c-1}:"), "{key}");
        }
        assert_eq!(k.meta, "fc:coupon:{c-1}:meta");
        assert_eq!(k.accepted, "fc:coupon:{c-1}:accepted");
        assert_eq!(keys.accepted(&CouponId::parse("c-1").unwrap()), k.accepted);
    }

    #[test]
    fn a_prefix_with_braces_is_refused() {
        assert!(Keys::new("a{b").is_err());
        assert!(Keys::new("").is_ok());
    }
}
