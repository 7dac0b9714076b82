//! What the issue rule asks before a request is appended, kept in memory so
//! a flash sale does not ask Postgres and Redis once per request: the
//! coupon's definition ([`CouponCache`]) and whether the worker has sold it
//! out ([`SoldOutCheck`]). Both are hints a replica may hold for a moment;
//! the worker decides every appended request against the coupon's real
//! state in log order anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use firstcome::CouponId;
use firstcome::db::{self, Coupon};
use firstcome::state::CouponState;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use sqlx::PgPool;

use crate::error::ApiError;

/// How long a replica trusts its copy of a coupon's definition.
const COUPON_CACHE: Duration = Duration::from_secs(1);

/// How long the sold-out check waits for Redis before letting the request
/// through to the log.
const STOCK_READ_TIMEOUT: Duration = Duration::from_millis(100);

/// One Postgres lookup of a coupon, awaited by every request that needs it.
type CouponLookup = Shared<BoxFuture<'static, Result<Option<Arc<Coupon>>, Arc<sqlx::Error>>>>;

/// Coupons seen in Postgres, each kept for [`COUPON_CACHE`] (an admin may
/// close, reopen or restock a coupon through another replica); misses are
/// not cached, so a coupon created elsewhere is seen at once.
pub struct CouponCache {
    pool: PgPool,
    seen: RwLock<HashMap<CouponId, (Instant, Arc<Coupon>)>>,
    /// Lookups in flight, one per coupon, shared by every request that
    /// waits for it (see [`CouponCache::get`]).
    lookups: Mutex<HashMap<CouponId, CouponLookup>>,
}

impl CouponCache {
    /// An empty cache in front of `pool`.
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            seen: RwLock::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
        })
    }

    /// Looks a coupon up, from memory when it was seen in the last
    /// [`COUPON_CACHE`].
    ///
    /// A flash sale sends thousands of requests for one coupon at once, so
    /// a lookup is shared: however many requests miss the cache together,
    /// one query goes to Postgres and they all take its answer (a herd of
    /// queries would queue for the pool's few connections and time out
    /// while Postgres is merely slow). When Postgres fails, the last copy
    /// seen, however old, answers: the worker decides every request against
    /// the coupon's real state in log order anyway.
    pub async fn get(self: &Arc<Self>, id: &CouponId) -> Result<Option<Arc<Coupon>>, ApiError> {
        let stale = match self.seen.read().expect("lock").get(id) {
            Some((at, c)) if at.elapsed() < COUPON_CACHE => return Ok(Some(c.clone())),
            Some((_, c)) => Some(c.clone()),
            None => None,
        };
        let lookup = self
            .lookups
            .lock()
            .expect("lock")
            .entry(id.clone())
            .or_insert_with(|| {
                let (cache, id) = (self.clone(), id.clone());
                async move {
                    let found = db::coupon(&cache.pool, &id)
                        .await
                        .map(|c| c.map(Arc::new))
                        .map_err(Arc::new);
                    if let Ok(Some(c)) = &found {
                        cache
                            .seen
                            .write()
                            .expect("lock")
                            .insert(id.clone(), (Instant::now(), c.clone()));
                    }
                    cache.lookups.lock().expect("lock").remove(&id);
                    found
                }
                .boxed()
                .shared()
            })
            .clone();
        match lookup.await {
            Ok(found) => Ok(found),
            Err(e) if stale.is_some() => {
                tracing::warn!(error = %e, "postgres failed, answering from the last copy of the coupon");
                Ok(stale)
            }
            Err(e) => Err(ApiError::from_postgres(&e)),
        }
    }

    /// Drops the copy of a coupon (after an admin change).
    pub fn forget(&self, id: &CouponId) {
        self.seen.write().expect("lock").remove(id);
    }
}

/// Per coupon: whether the worker had its stock at zero when Redis was last
/// asked, at most `FIRSTCOME_SOLD_OUT_CHECK_MS` ago.
pub struct SoldOutCheck {
    states: CouponState,
    /// Zero turns the check off.
    fresh_for: Duration,
    seen: Mutex<HashMap<CouponId, (Instant, bool)>>,
}

impl SoldOutCheck {
    /// A check that trusts an answer for `fresh_for`.
    pub fn new(states: CouponState, fresh_for: Duration) -> Self {
        Self {
            states,
            fresh_for,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the worker has sold the coupon out. Anything but a clear
    /// "stock is zero" (no state yet, Redis slow or down) answers false: the
    /// request then goes to the log, which decides it as always.
    ///
    /// `total_stock` is the coupon's total as Postgres had it: a state built
    /// with another total is behind an admin change (more stock) and says
    /// nothing.
    pub async fn sold_out(&self, id: &CouponId, total_stock: Option<i64>) -> bool {
        if self.fresh_for.is_zero() {
            return false;
        }
        if let Some((at, sold_out)) = self.seen.lock().expect("lock").get(id)
            && at.elapsed() < self.fresh_for
        {
            return *sold_out;
        }
        let read = tokio::time::timeout(STOCK_READ_TIMEOUT, self.states.counters(id));
        let sold_out = match read.await {
            Ok(Ok(Some(c))) => c.remaining <= 0 && total_stock.is_none_or(|t| t == c.total),
            Ok(Ok(None)) => false,
            // Not cached: the next request asks again.
            Ok(Err(_)) | Err(_) => return false,
        };
        self.seen
            .lock()
            .expect("lock")
            .insert(id.clone(), (Instant::now(), sold_out));
        sold_out
    }

    /// Drops the last answer for a coupon (after an admin change).
    pub fn forget(&self, id: &CouponId) {
        self.seen.lock().expect("lock").remove(id);
    }
}
