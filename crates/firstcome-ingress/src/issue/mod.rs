//! The issue rule: the checks before a request is appended ([`Issue::admit`])
//! and the append itself ([`Issue::append`]), which returns only once the
//! broker acknowledged the record. From then on the request is in the log,
//! and the log order is the first-come order. The HTTP handler
//! (`crate::http::issue`) adds `Idempotency-Key` ([`idempotency`]) around it.
//!
//! # Layout
//! - [`admission`]: the coupon and sold-out caches admission asks
//! - [`idempotency`]: what a key remembers, in Redis
//! - [`pending`]: the `pending` status written after the acknowledgement

pub mod admission;
pub mod idempotency;
pub mod pending;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{BrokerError, IngressMetrics};
use chrono::{SubsecRound, Utc};
use firstcome::db::Coupon;
use firstcome::kafka::HealingProducer;
use firstcome::record::REQUEST_ID_HEADER;
use firstcome::state::CouponState;
use firstcome::{CouponId, IssueRequest, RequestId, Status, UserId};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::error::ApiError;
use admission::{CouponCache, SoldOutCheck};
use pending::PendingWrites;

/// Admission and the append, with what they need. Shared by every request.
pub struct Issue {
    coupons: Arc<CouponCache>,
    sold_out: SoldOutCheck,
    pending: PendingWrites,
    /// Asked when Postgres cannot say whether a coupon exists.
    states: CouponState,
    producer: Arc<HealingProducer>,
    topic: String,
    /// How long the broker may take to acknowledge (`message.timeout.ms`).
    produce_timeout: Duration,
    metrics: Arc<IngressMetrics>,
}

/// What [`Issue::new`] is built from.
pub struct IssueParts {
    /// Coupon definitions.
    pub coupons: Arc<CouponCache>,
    /// The sold-out hint.
    pub sold_out: SoldOutCheck,
    /// The `pending` status writes.
    pub pending: PendingWrites,
    /// The coupon states in Redis.
    pub states: CouponState,
    /// The request topic's producer.
    pub producer: Arc<HealingProducer>,
    /// The request topic.
    pub topic: String,
    /// The producer's delivery timeout.
    pub produce_timeout: Duration,
    /// The ingress's metrics.
    pub metrics: Arc<IngressMetrics>,
}

impl Issue {
    /// The rule over its parts.
    pub fn new(p: IssueParts) -> Self {
        Self {
            coupons: p.coupons,
            sold_out: p.sold_out,
            pending: p.pending,
            states: p.states,
            producer: p.producer,
            topic: p.topic,
            produce_timeout: p.produce_timeout,
            metrics: p.metrics,
        }
    }

    /// A coupon's definition, through the cache admission uses.
    pub async fn coupon(&self, id: &CouponId) -> Result<Option<Arc<Coupon>>, ApiError> {
        self.coupons.get(id).await
    }

    /// Drops what this replica remembers of a coupon (after an admin change).
    pub fn forget(&self, id: &CouponId) {
        self.coupons.forget(id);
        self.sold_out.forget(id);
    }

    /// The checks before a new request is appended (the coupon exists, its
    /// window is open, it is not sold out), and the request.
    pub async fn admit(
        &self,
        coupon_id: CouponId,
        user_id: UserId,
    ) -> Result<IssueRequest, ApiError> {
        // Microseconds: what Postgres and the Lua script keep.
        let accepted_at = Utc::now().trunc_subsecs(6);
        let mut total_stock = None;
        match self.coupons.get(&coupon_id).await {
            // Outside the coupon's window the request would be decided
            // `not_open`, so it is answered now and never appended.
            Ok(Some(c))
                if c.starts_at.is_some_and(|s| accepted_at < s)
                    || c.ends_at.is_some_and(|e| accepted_at > e) =>
            {
                self.metrics.short_circuit(Status::NotOpen);
                return Err(ApiError::NotOpen(coupon_id.to_string()));
            }
            Ok(Some(c)) => total_stock = Some(i64::from(c.total_stock)),
            Ok(None) => return Err(ApiError::CouponNotFound(coupon_id.to_string())),
            // Postgres is down and this replica has not seen the coupon yet: a
            // coupon with a state in Redis exists, and the log, not Postgres,
            // takes the request.
            Err(e) => match self.states.counters(&coupon_id).await {
                Ok(Some(_)) => {
                    tracing::warn!(error = %e, "postgres unavailable, coupon known to redis")
                }
                _ => return Err(e),
            },
        }
        // Decisions only take stock, so once the worker has it at zero every
        // request appended later is decided `sold_out` (until an admin adds
        // stock, which this replica sees within FIRSTCOME_SOLD_OUT_CHECK):
        // answering that now spares the log (docs/design.md).
        if self.sold_out.sold_out(&coupon_id, total_stock).await {
            self.metrics.short_circuit(Status::SoldOut);
            return Err(ApiError::SoldOut(coupon_id.to_string()));
        }
        Ok(IssueRequest {
            request_id: RequestId::new(),
            coupon_id,
            user_id,
            accepted_at,
        })
    }

    /// Appends the request and waits for the broker's acknowledgement, then
    /// records its `pending` status.
    pub async fn append(&self, request: &IssueRequest) -> Result<(), ApiError> {
        let payload = request.to_json();
        let id = request.request_id.to_string();
        let record = FutureRecord::to(&self.topic)
            .key(request.coupon_id.as_str())
            .payload(&payload)
            .headers(OwnedHeaders::new().insert(Header {
                key: REQUEST_ID_HEADER,
                value: Some(id.as_str()),
            }));
        let timeout = self.produce_timeout;
        // The delivery report arrives at the latest after `message.timeout.ms`
        // (= the produce timeout); the outer timeout only guards against a
        // stuck client.
        let started = std::time::Instant::now();
        let delivered = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            self.producer.send(record, timeout),
        )
        .await;
        self.metrics.produced(started.elapsed());
        // Not acknowledged does not mean not written: the answer carries the
        // request id, whose status tells the truth once the log is readable.
        let id = request.request_id;
        let offset = match delivered {
            Ok(Ok((_, offset))) => {
                self.metrics.accepted.inc();
                offset
            }
            Ok(Err(e)) => {
                self.metrics.broker_error(BrokerError::Error);
                return Err(ApiError::not_acknowledged(id, format!("kafka: {e}")));
            }
            Err(_) => {
                self.metrics.broker_error(BrokerError::Timeout);
                return Err(ApiError::not_acknowledged(
                    id,
                    "kafka: no delivery report in time",
                ));
            }
        };
        // The record is in the log, so the request will be decided whatever
        // happens next; the pending entry only lets lookups say "pending"
        // rather than 404 until then.
        self.pending.record(request, offset).await;
        Ok(())
    }
}
