//! A coupon's Redis state leaves Redis once its sale is over and every
//! record of it is stored, so Redis holds the coupons on sale, not every
//! coupon ever sold (see docs/design.md, "A coupon's state leaves Redis").
//!
//! Every `FIRSTCOME_RETIRE_INTERVAL` a sweep takes the coupons whose
//! window ended more than `FIRSTCOME_RETIRE_AFTER` ago (no ingress
//! accepts for them any more) and whose current state was not retired, and
//! for each:
//! 1. reads the end of its partition (the high watermark) and records it with
//!    the epoch it was read at: every record of the coupon lies before it;
//! 2. once the group's committed offset of that partition has reached it
//!    (every record before it is stored or dead-lettered) and the epoch is
//!    still the same, deletes the state of that epoch (`retire.lua`).
//!
//! Retiring is safe whenever it happens: it is a loss of Redis state like
//! any other, which the fence and the rebuild already cover (a decision in
//! flight on the deleted state is stored or refused by Postgres as before;
//! the next record finds no state and rebuilds it). The offsets only keep a
//! sweep from deleting a state that is still in use. Any worker may sweep;
//! two sweeps of one coupon do the same thing twice.

use std::sync::Arc;

use firstcome::db::{self, RetireCandidate};
use firstcome::state::Retired;
use tokio_util::sync::CancellationToken;

use crate::services::Shared;

/// Coupons looked at per sweep.
const SWEEP_LIMIT: i64 = 100;

/// Sweeps every `FIRSTCOME_RETIRE_INTERVAL` until `stop`.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.cfg.retire_interval;
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match sweep(&shared).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(coupons = n, "coupon states retired from Redis"),
            Err(e) => {
                tracing::warn!(error = %e, "retiring coupon states failed; the next sweep tries again")
            }
        }
    }
}

/// One sweep; returns the coupon states it deleted.
pub async fn sweep(shared: &Shared) -> anyhow::Result<usize> {
    let over_for = shared.cfg.retire_after;
    let mut deleted = 0;
    for c in db::retire_candidates(&shared.pool, over_for, SWEEP_LIMIT).await? {
        if stored_through_end(shared, &c).await? && retire(shared, &c).await? {
            deleted += 1;
            shared.metrics.states_retired.inc();
        }
    }
    Ok(deleted)
}

/// Whether every record of the coupon is stored: the group's committed
/// offset has reached the end of its partition as read after the sale was
/// over, at the current epoch. A coupon with no stored record has nothing
/// to wait for.
async fn stored_through_end(shared: &Shared, c: &RetireCandidate) -> anyhow::Result<bool> {
    let Some(partition) = c.kafka_partition else {
        return Ok(true);
    };
    let end = match (c.retire_epoch, c.retire_offset) {
        (Some(epoch), Some(end)) if epoch == c.redis_epoch => end,
        _ => {
            let end = high_watermark(shared, partition).await?;
            if !db::mark_retire_offset(&shared.pool, &c.coupon_id, c.redis_epoch, end).await? {
                return Ok(false);
            }
            end
        }
    };
    // Read after the end: what is committed now covers what was there then.
    Ok(committed(shared, partition).await? >= end)
}

/// Deletes the state of the candidate's epoch; whether it is now retired.
async fn retire(shared: &Shared, c: &RetireCandidate) -> anyhow::Result<bool> {
    let id = c.coupon_id.clone();
    match shared.states.retire(&id, c.redis_epoch).await? {
        Retired::Kept => Ok(false),
        found @ (Retired::Deleted | Retired::Absent) => {
            let marked = db::mark_retired(&shared.pool, &c.coupon_id, c.redis_epoch).await?;
            Ok(marked && found == Retired::Deleted)
        }
    }
}

/// The offset the next record of `partition` will get.
async fn high_watermark(shared: &Shared, partition: i32) -> anyhow::Result<i64> {
    let offsets = shared.offsets.clone();
    tokio::task::spawn_blocking(move || offsets.high_watermark(partition)).await?
}

/// The group's committed offset of `partition` (the next record to
/// decide); 0 when none was committed.
async fn committed(shared: &Shared, partition: i32) -> anyhow::Result<i64> {
    let offsets = shared.offsets.clone();
    tokio::task::spawn_blocking(move || offsets.committed(partition)).await?
}
