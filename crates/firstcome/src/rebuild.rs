//! Building a coupon's Redis state from Postgres: what the worker does when
//! it finds no state or a stale one, and what `firstcome-worker redis
//! rebuild` does on demand. See the fence in [`crate::state`].

use redis::aio::ConnectionLike;
use sqlx::PgPool;

use crate::db;
use crate::ids::CouponId;
use crate::state::{self, CouponState, Keys, StateError};

/// A rebuild that did not finish; running it again is safe.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Postgres could not be read or refused the new epoch.
    #[error("reading postgres")]
    Postgres(#[from] sqlx::Error),
    /// Redis could not take the state.
    #[error("writing redis")]
    Redis(#[from] StateError),
}

/// What a rebuild put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// The new epoch.
    pub epoch: i64,
    /// Decisions stored so far, where numbering resumes.
    pub seq: i64,
    /// Users holding the coupon.
    pub issued: usize,
    /// Earlier decisions loaded for redelivery.
    pub decisions: usize,
    /// `false` when a concurrent build of a newer epoch got there first
    /// (its state is as good).
    pub installed: bool,
}

/// Replaces the coupon's Redis state with one built from Postgres under a new
/// epoch, so anything decided on the old state can no longer be stored.
/// `None` when Postgres does not know the coupon.
pub async fn coupon<C: ConnectionLike + Send>(
    pool: &PgPool,
    conn: &mut C,
    keys: &Keys,
    id: &CouponId,
) -> Result<Option<Rebuilt>, RebuildError> {
    let Some(snapshot) = db::rebuild_snapshot(pool, id).await? else {
        return Ok(None);
    };
    let installed = state::install(conn, &keys.coupon(id), &snapshot).await?;
    Ok(Some(Rebuilt {
        epoch: snapshot.epoch,
        seq: snapshot.seq,
        issued: snapshot.issued_users.len(),
        decisions: snapshot.decisions.len(),
        installed,
    }))
}

/// [`coupon`] with deciding paused on the coupon meanwhile (workers hold its
/// partition and retry; the install lifts the pause, which also lapses by
/// itself after `pause`): how a rebuild runs while workers are live, for
/// `redis rebuild`. Anything decided on
/// the old state is refused by Postgres and decided again on the new one.
pub async fn coupon_paused<C: ConnectionLike + Send>(
    pool: &PgPool,
    conn: &mut C,
    keys: &Keys,
    id: &CouponId,
    pause: std::time::Duration,
) -> Result<Option<Rebuilt>, RebuildError> {
    let ck = keys.coupon(id);
    state::pause(conn, &ck, pause).await?;
    let built = match coupon(pool, conn, keys, id).await {
        Ok(built) => built,
        Err(e) => {
            // Best effort: the pause lapses by itself anyway.
            let _ = state::resume(conn, &ck).await;
            return Err(e);
        }
    };
    if !built.is_some_and(|b| b.installed) {
        state::resume(conn, &ck).await?;
    }
    Ok(built)
}

impl CouponState {
    /// Rebuilds a coupon's state from Postgres under a new epoch (see
    /// [`coupon`]); `None` when Postgres does not know the coupon.
    pub async fn rebuild(
        &self,
        pool: &PgPool,
        id: &CouponId,
    ) -> Result<Option<Rebuilt>, RebuildError> {
        coupon(pool, &mut self.connection(), self.keys(), id).await
    }
}
