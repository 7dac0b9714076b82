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

/// How long a replica remembers that a coupon does not exist. Without it
/// every request for an unknown id costs a query, and a flood of them keeps
/// the pool's few connections busy (red team #1); a coupon created through
/// this replica is forgotten at once ([`CouponCache::forget`]), one created
/// elsewhere is seen within this time.
const MISS_CACHE: Duration = Duration::from_secs(1);

/// Most unknown ids remembered at once; past it the expired ones go, and
/// if that is not enough, all of them (a million distinct ids cost at most
/// this many entries, and a forgotten id costs one more query).
const MAX_MISSES: usize = 10_000;

/// Most lookups in flight at once, each a task of its own holding at most
/// one pool connection. A lookup the bound has no room for answers from a
/// stale copy if there is one, else `503 overloaded`: a flood of distinct
/// unknown ids costs at most this many tasks and queries, never the pool.
const MAX_LOOKUPS: usize = 64;

/// How long the sold-out check waits for Redis before letting the request
/// through to the log.
const STOCK_READ_TIMEOUT: Duration = Duration::from_millis(100);

/// A lookup's answer, shared by every request that waits for it.
type Found = Result<Option<Arc<Coupon>>, Arc<sqlx::Error>>;

/// One Postgres lookup of a coupon, awaited by every request that needs it.
type CouponLookup = Shared<BoxFuture<'static, Found>>;

/// Coupons seen in Postgres, each kept for [`COUPON_CACHE`] (an admin may
/// close, reopen or restock a coupon through another replica), and ids
/// Postgres did not know, each kept for [`MISS_CACHE`].
pub struct CouponCache {
    pool: PgPool,
    seen: RwLock<HashMap<CouponId, (Instant, Arc<Coupon>)>>,
    /// Ids Postgres did not know, and when it said so (at most
    /// [`MAX_MISSES`]).
    missing: Mutex<HashMap<CouponId, Instant>>,
    /// Lookups in flight, one per coupon, shared by every request that
    /// waits for it (see [`CouponCache::get`]); at most [`MAX_LOOKUPS`].
    lookups: Mutex<HashMap<CouponId, CouponLookup>>,
}

impl CouponCache {
    /// An empty cache in front of `pool`.
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            seen: RwLock::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
        })
    }

    /// Looks a coupon up, from memory when it was seen in the last
    /// [`COUPON_CACHE`] (or found missing in the last [`MISS_CACHE`]).
    ///
    /// A flash sale sends thousands of requests for one coupon at once, so
    /// a lookup is shared: however many requests miss the cache together,
    /// one query goes to Postgres and they all take its answer (a herd of
    /// queries would queue for the pool's few connections and time out
    /// while Postgres is merely slow). The query runs in a task of its own,
    /// so it finishes and leaves the map whether or not anyone still waits:
    /// a lookup whose clients all hung up can never keep a pool slot. A copy
    /// seen before answers at once while the task refreshes it, and when
    /// Postgres fails the last copy seen, however old, answers: the worker
    /// decides every request against the coupon's real state in log order
    /// anyway.
    pub async fn get(self: &Arc<Self>, id: &CouponId) -> Result<Option<Arc<Coupon>>, ApiError> {
        let stale = match self.seen.read().expect("lock").get(id) {
            Some((at, c)) if at.elapsed() < COUPON_CACHE => return Ok(Some(c.clone())),
            Some((_, c)) => Some(c.clone()),
            None => None,
        };
        if stale.is_none() {
            let mut missing = self.missing.lock().expect("lock");
            match missing.get(id) {
                Some(at) if at.elapsed() < MISS_CACHE => return Ok(None),
                Some(_) => {
                    missing.remove(id);
                }
                None => {}
            }
        }
        let lookup = self.lookup(id);
        if let Some(stale) = stale {
            // Refreshed in the background; this request does not wait.
            return Ok(Some(stale));
        }
        let Some(lookup) = lookup else {
            return Err(ApiError::Overloaded);
        };
        lookup.await.map_err(|e| ApiError::from_postgres(&e))
    }

    /// The lookup of `id` in flight, started if there is none and the bound
    /// has room; `None` when it has none.
    fn lookup(self: &Arc<Self>, id: &CouponId) -> Option<CouponLookup> {
        let mut lookups = self.lookups.lock().expect("lock");
        if let Some(l) = lookups.get(id) {
            return Some(l.clone());
        }
        if lookups.len() >= MAX_LOOKUPS {
            return None;
        }
        let (cache, key) = (self.clone(), id.clone());
        let task = tokio::spawn(async move {
            let found: Found = db::coupon(&cache.pool, &key)
                .await
                .map(|c| c.map(Arc::new))
                .map_err(Arc::new);
            match &found {
                Ok(Some(c)) => {
                    cache
                        .seen
                        .write()
                        .expect("lock")
                        .insert(key.clone(), (Instant::now(), c.clone()));
                }
                Ok(None) => cache.remember_missing(&key),
                Err(e) => {
                    tracing::warn!(error = %e, coupon = %key, "coupon lookup failed");
                }
            }
            cache.lookups.lock().expect("lock").remove(&key);
            found
        });
        let lookup = async move {
            task.await
                .unwrap_or_else(|e| Err(Arc::new(sqlx::Error::Protocol(e.to_string()))))
        }
        .boxed()
        .shared();
        lookups.insert(id.clone(), lookup.clone());
        Some(lookup)
    }

    /// Notes that Postgres does not know `id`, within [`MAX_MISSES`].
    fn remember_missing(&self, id: &CouponId) {
        let mut missing = self.missing.lock().expect("lock");
        if missing.len() >= MAX_MISSES {
            let now = Instant::now();
            missing.retain(|_, at| now.duration_since(*at) < MISS_CACHE);
            if missing.len() >= MAX_MISSES {
                missing.clear();
            }
        }
        missing.insert(id.clone(), Instant::now());
    }

    /// Drops what this replica knows of a coupon (after an admin change or
    /// its creation).
    pub fn forget(&self, id: &CouponId) {
        self.seen.write().expect("lock").remove(id);
        self.missing.lock().expect("lock").remove(id);
    }
}

/// Per coupon: whether the worker had its stock at zero when Redis was last
/// asked, at most `FIRSTCOME_SOLD_OUT_CHECK` ago.
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
