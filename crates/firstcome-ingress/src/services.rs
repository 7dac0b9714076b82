//! What every handler shares: the services of the ingress, built once by
//! [`crate::app::Application::build`] and handed to the router.

use std::ops::Deref;
use std::sync::{Arc, RwLock};

use crate::metrics::IngressMetrics;
use firstcome::kafka::HealingProducer;
use firstcome::redis_conn::RedisConn;
use firstcome::state::{CouponState, Keys};
use firstcome::status::StatusCache;
use sqlx::PgPool;

use crate::config::IngressConfig;
use crate::issue::Issue;
use crate::waiters::Waiters;

/// The handlers' state. Cheap to clone; derefs to [`Services`].
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    /// Shares `services` among the handlers.
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The ingress's services.
pub struct Services {
    /// The settings, for the limits handlers enforce.
    pub cfg: IngressConfig,
    /// Postgres: coupons, the ledger, the audit.
    pub pool: PgPool,
    /// The issue rule: admission and the append.
    pub issue: Issue,
    /// Coupon states in Redis: live counters, the admin rebuild.
    pub states: CouponState,
    /// Request statuses in Redis.
    pub statuses: StatusCache,
    /// The Redis connection itself, for the idempotency keys and `/readyz`.
    pub redis: RedisConn,
    /// The key layout, for the idempotency keys.
    pub keys: Keys,
    /// The request topic's producer, for `/readyz`.
    pub producer: Arc<HealingProducer>,
    /// Admin tokens as `(id, token)`; the id names the admin in the audit.
    pub admin_tokens: Vec<(String, String)>,
    /// What `/metrics` shows.
    pub metrics: Arc<IngressMetrics>,
    /// Long polls waiting for decisions.
    pub waiters: Arc<Waiters>,
    /// Who the user of a request is.
    pub identity: crate::identity::Identity,
    /// The last look at the dependencies, for the probes.
    pub readiness: Readiness,
}

/// The last look at the dependencies (`http::health::watch` writes it, the
/// probes read it): kafka, postgres, redis; `None` until the first look is
/// done.
#[derive(Debug, Default)]
pub struct Readiness {
    last: RwLock<Option<[bool; 3]>>,
}

impl Readiness {
    /// Whether a `202` can be given now, and each dependency's health.
    pub fn read(&self) -> (bool, Option<[bool; 3]>) {
        let last = *self.last.read().expect("lock");
        (last.is_some_and(|[kafka, _, _]| kafka), last)
    }

    /// Keeps a look's result.
    pub fn set(&self, healthy: [bool; 3]) {
        *self.last.write().expect("lock") = Some(healthy);
    }
}
