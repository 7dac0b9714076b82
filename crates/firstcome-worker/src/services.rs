//! The services every partition task of the worker shares, built once by
//! [`crate::Worker::build`], and how a step of theirs is retried.

use std::future::Future;
use std::sync::Arc;

use firstcome::state::CouponState;
use firstcome::status::StatusCache;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::metrics::{RetryStep, WorkerMetrics};
use crate::offsets::Offsets;
use crate::retry::{Aborted, Failure, Policy, Stop};
use crate::stream::DecisionStream;

/// What every partition task shares.
pub struct Shared {
    /// The worker's settings: topics, group, retry schedule.
    pub cfg: WorkerConfig,
    /// Postgres, the system of record.
    pub pool: PgPool,
    /// The coupon states in Redis, where decisions are made.
    pub states: CouponState,
    /// The request-status cache the ingress answers lookups from.
    pub statuses: StatusCache,
    /// Producer for the dead-letter topic.
    pub dlq: firstcome::kafka::HealingProducer,
    /// Where the group's offsets are stored and read.
    pub offsets: Arc<dyn Offsets>,
    /// The decision stream, when it is on: it takes each stored batch and
    /// commits the offsets.
    pub stream: Option<Arc<DecisionStream>>,
    /// What `/metrics` shows.
    pub metrics: Arc<WorkerMetrics>,
    /// When the poll loop last went round (`/healthz`).
    pub liveness: firstcome::ops::Liveness,
}

impl Shared {
    /// The retry policy of the pipeline's steps.
    pub(crate) fn policy(&self) -> Policy<'_> {
        Policy {
            backoff: self.cfg.backoff(),
            permanent_attempts: self.cfg.permanent_attempts,
            transient_attempts: None,
            metrics: Some(&self.metrics),
        }
    }

    /// Runs a step whose failures are all transient until it succeeds.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        what: RetryStep,
        cancel: &CancellationToken,
        mut step: F,
    ) -> Result<T, Aborted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let transient = || {
            let f = step();
            async move { f.await.map_err(Failure::Transient) }
        };
        match self.policy().run(what, cancel, transient).await {
            Ok(v) => Ok(v),
            Err(Stop::Aborted) => Err(Aborted),
            Err(Stop::GaveUp { .. }) => {
                unreachable!("a step with only transient failures never gives up")
            }
        }
    }
}
