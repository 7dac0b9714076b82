//! Building and running the ingress: connect to the services, bind the
//! listener, serve until the shutdown token fires, then drain and flush.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use firstcome::db::{self, Coupon};
use firstcome::kafka::HealingProducer;
use firstcome::metrics::IngressMetrics;
use firstcome::ops::{self, OpsServer};
use firstcome::redis_conn::RedisConn;
use firstcome::state::{self, Keys};
use firstcome::{CouponId, kafka};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use rdkafka::producer::Producer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::IngressConfig;
use crate::connections::BoundedListener;
use crate::error::ApiError;
use crate::waiters::{self, Waiters};
use axum::serve::ListenerExt;

/// How long a replica trusts its copy of a coupon's definition.
const COUPON_CACHE: Duration = Duration::from_secs(1);

/// How long the sold-out check waits for Redis before letting the request
/// through to the log.
const STOCK_READ_TIMEOUT: Duration = Duration::from_millis(100);
use crate::routes;

/// One Postgres lookup of a coupon, awaited by every request that needs it.
pub(crate) type CouponLookup =
    Shared<BoxFuture<'static, Result<Option<Arc<Coupon>>, Arc<sqlx::Error>>>>;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: IngressConfig,
    pub(crate) pool: PgPool,
    pub(crate) redis: RedisConn,
    pub(crate) producer: HealingProducer,
    pub(crate) keys: Keys,
    /// Coupons seen in Postgres, each kept for [`COUPON_CACHE`] (an admin
    /// may close, reopen or restock a coupon through another replica);
    /// misses are not cached, so a coupon created elsewhere is seen at once.
    pub(crate) coupons: RwLock<HashMap<CouponId, (Instant, Arc<Coupon>)>>,
    /// Coupon lookups in flight, one per coupon, shared by every request
    /// that waits for it (see [`AppState::coupon`]).
    pub(crate) lookups: Mutex<HashMap<CouponId, CouponLookup>>,
    /// Until when `pending` status writes are skipped (Redis failing).
    pub(crate) pending_skip_until: Mutex<Option<Instant>>,
    /// Per coupon: when its stock was last read from Redis, and whether it
    /// was zero then.
    pub(crate) stock_seen: Mutex<HashMap<CouponId, (Instant, bool)>>,
    /// Admin tokens by id.
    pub(crate) admin_tokens: Vec<(String, String)>,
    /// What `/metrics` shows.
    pub(crate) metrics: Arc<IngressMetrics>,
    /// Long polls waiting for decisions.
    pub(crate) waiters: Arc<Waiters>,
    /// For the decisions subscription: one client per address of
    /// `REDIS_URL` (on a cluster any node hears every publication).
    redis_clients: Vec<redis::Client>,
}

impl Inner {
    /// Whether `pending` status writes are being skipped now.
    pub(crate) fn pending_skipped(&self) -> bool {
        self.pending_skip_until
            .lock()
            .expect("lock")
            .is_some_and(|until| Instant::now() < until)
    }

    /// Skips `pending` status writes for `period`; false when another
    /// failure already started a skip (writes in flight fail together).
    pub(crate) fn skip_pending_for(&self, period: Duration) -> bool {
        let mut until = self.pending_skip_until.lock().expect("lock");
        let now = Instant::now();
        let started = until.is_none_or(|u| u <= now);
        if started {
            *until = Some(now + period);
        }
        started
    }
}

impl AppState {
    /// Whether the worker has sold the coupon out, as Redis said at most
    /// `FIRSTCOME_SOLD_OUT_CHECK_MS` ago. Anything but a clear "stock is
    /// zero" (no state yet, Redis slow or down) answers false: the request
    /// then goes to the log, which decides it as always.
    ///
    /// `total_stock` is the coupon's total as Postgres had it: a state built
    /// with another total is behind an admin change (more stock) and says
    /// nothing.
    pub(crate) async fn sold_out(&self, id: &CouponId, total_stock: Option<i64>) -> bool {
        let fresh_for = Duration::from_millis(self.inner.cfg.sold_out_check_ms);
        if fresh_for.is_zero() {
            return false;
        }
        if let Some((at, sold_out)) = self.inner.stock_seen.lock().expect("lock").get(id)
            && at.elapsed() < fresh_for
        {
            return *sold_out;
        }
        let keys = self.inner.keys.coupon(id);
        let mut redis = self.inner.redis.clone();
        let read = tokio::time::timeout(STOCK_READ_TIMEOUT, state::counters(&mut redis, &keys));
        let sold_out = match read.await {
            Ok(Ok(Some(c))) => c.remaining <= 0 && total_stock.is_none_or(|t| t == c.total),
            Ok(Ok(None)) => false,
            // Not cached: the next request asks again.
            Ok(Err(_)) | Err(_) => return false,
        };
        self.inner
            .stock_seen
            .lock()
            .expect("lock")
            .insert(id.clone(), (Instant::now(), sold_out));
        sold_out
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
    pub(crate) async fn coupon(&self, id: &CouponId) -> Result<Option<Arc<Coupon>>, ApiError> {
        let stale = match self.inner.coupons.read().expect("lock").get(id) {
            Some((at, c)) if at.elapsed() < COUPON_CACHE => return Ok(Some(c.clone())),
            Some((_, c)) => Some(c.clone()),
            None => None,
        };
        let lookup = self
            .inner
            .lookups
            .lock()
            .expect("lock")
            .entry(id.clone())
            .or_insert_with(|| {
                let (state, id) = (self.clone(), id.clone());
                async move {
                    let found = db::coupon(&state.inner.pool, &id)
                        .await
                        .map(|c| c.map(Arc::new))
                        .map_err(Arc::new);
                    if let Ok(Some(c)) = &found {
                        state
                            .inner
                            .coupons
                            .write()
                            .expect("lock")
                            .insert(id.clone(), (Instant::now(), c.clone()));
                    }
                    state.inner.lookups.lock().expect("lock").remove(&id);
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

    /// Drops what this replica remembers of a coupon (after an admin change).
    pub(crate) fn forget(&self, id: &CouponId) {
        self.inner.coupons.write().expect("lock").remove(id);
        self.inner.stock_seen.lock().expect("lock").remove(id);
    }
}

/// A ready-to-serve ingress.
pub struct Application {
    listener: TcpListener,
    ops: OpsServer,
    state: AppState,
}

impl Application {
    /// Connects to Postgres, Redis and Kafka and binds the listener.
    pub async fn build(cfg: IngressConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let pool = cfg.common.connect_postgres().await?;
        let redis = cfg.common.connect_redis(Duration::from_secs(2)).await?;
        let producer = HealingProducer::new(kafka::producer_config(
            &cfg.common,
            cfg.produce_timeout(),
            Duration::from_millis(cfg.linger_ms),
        )?)
        .context("creating the Kafka producer (KAFKA_BROKERS)")?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let ops = OpsServer::bind(cfg.metrics_listen).await?;
        let keys = cfg.common.keys()?;
        let admin_tokens = cfg.admin_tokens()?;
        let redis_clients = cfg
            .common
            .redis_urls()
            .into_iter()
            .map(redis::Client::open)
            .collect::<Result<Vec<_>, _>>()
            .context("REDIS_URL")?;
        let metrics = IngressMetrics::new();
        Ok(Self {
            listener,
            ops,
            state: AppState {
                inner: Arc::new(Inner {
                    cfg,
                    pool,
                    redis,
                    producer,
                    keys,
                    coupons: RwLock::new(HashMap::new()),
                    lookups: Mutex::new(HashMap::new()),
                    pending_skip_until: Mutex::new(None),
                    stock_seen: Mutex::new(HashMap::new()),
                    waiters: Arc::new(Waiters::new(metrics.long_polls.clone())),
                    metrics,
                    admin_tokens,
                    redis_clients,
                }),
            },
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address of the operations port (`/metrics`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, waits for
    /// in-flight requests (bounded by the shutdown timeout) and flushes the
    /// producer.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            ops,
            state,
        } = self;
        let cfg = &state.inner.cfg;
        let grace = Duration::from_millis(cfg.shutdown_timeout_ms);
        tracing::info!(addr = %listener.local_addr()?, metrics = %ops.local_addr(), "ingress listening");
        let metrics = state.inner.metrics.clone();
        let scrape = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || async move { ops::metrics_response(metrics.render()) }),
        );
        let ops = ops.spawn(scrape, shutdown.clone());
        let app = routes::router(state.clone());
        // Long polls follow the worker's decisions; on shutdown they are
        // woken and answer what they know.
        let listening = tokio::spawn(waiters::listen(
            state.inner.redis_clients.clone(),
            state.inner.keys.decided_channel(),
            state.inner.waiters.clone(),
            shutdown.clone(),
        ));
        let stopping = shutdown.clone();
        let listener = BoundedListener::new(
            listener,
            cfg.max_connections,
            state.inner.metrics.connections.clone(),
        )
        // Only so that axum hands the client's address to the handlers.
        .tap_io(|_| {});
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stopping.cancelled().await });
        tokio::select! {
            r = serve => r.context("serving HTTP")?,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("shutdown timeout reached with requests still in flight");
            }
        }
        shutdown.cancel();
        let _ = listening.await;
        let _ = ops.await;
        let producer = state.inner.producer.producer();
        tokio::task::spawn_blocking(move || producer.flush(grace))
            .await?
            .context("flushing the producer")?;
        tracing::info!("ingress stopped");
        Ok(())
    }
}
