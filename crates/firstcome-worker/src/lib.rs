//! The worker of firstcome: a Kafka consumer group member that decides issue
//! requests in log order with one atomic Lua call per coupon and batch,
//! persists every decision in Postgres, and dead-letters what it cannot
//! process. Also the operator's tool: `migrate`, `topics`, `reconcile`,
//! `redis rebuild`, `dlq list|show|replay` and `prune`.
//!
//! # Layout
//! - [`config`]: flags and environment variables, the retry schedule
//! - [`consumer`]: the poll loop, partition tasks, rebalances
//! - [`record`]: a consumed record, its headers, the request it holds
//! - [`pipeline`]: one batch from records to a stored offset, in named steps
//! - [`retry`]: the retry policy and the steps it counts
//! - [`offsets`]: where the group's progress is stored and read
//! - [`stream`]: the decision stream, exactly once in Kafka transactions
//! - [`deadletter`]: dead-letter records and their headers, both ways
//! - [`metrics`]: what `/metrics` shows
//! - [`reconcile`]: compare Redis with Postgres
//! - [`rebuild`]: rebuild Redis from Postgres on demand
//! - [`dlq`]: list, show and replay dead letters
//! - [`prune`]: the retention of the ledger and the audit
//! - [`retire`]: a coupon's Redis state leaves Redis after its sale

pub mod commands;
pub mod config;
pub mod consumer;
pub mod deadletter;
pub mod gate;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod record;
pub mod retire;
pub mod retry;
pub mod services;
pub mod stream;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::WorkerMetrics;
use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use firstcome::kafka;
use firstcome::ops::{self, Liveness, OpsServer};
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use config::WorkerConfig;

use crate::consumer::{GroupOffsets, Partitions, Rebalancer};
use crate::services::Shared;
use firstcome::state::CouponState;
use firstcome::status::StatusCache;

/// A connected worker, subscribed and ready to poll.
pub struct Worker {
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer<Rebalancer>>,
    partitions: Partitions,
    ops: OpsServer,
}

impl Worker {
    /// Connects to Postgres, Redis and Kafka and subscribes to the request topic.
    pub async fn build(cfg: WorkerConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let pool = cfg.common.connect_postgres().await?;
        // Longer than the ingress: a Lua call deciding a large batch may take a while.
        let redis = cfg.common.connect_redis(Duration::from_secs(5)).await?;
        let dlq = kafka::HealingProducer::new(kafka::producer_config(
            &cfg.common,
            Duration::from_secs(10),
            Duration::ZERO,
        )?)
        .context("creating the dead-letter producer")?;

        let ops = OpsServer::bind(cfg.metrics_listen).await?;
        let metrics = WorkerMetrics::new();
        let partitions: Partitions = Arc::new(Mutex::new(HashMap::new()));
        // With the decision stream on, offsets are committed by its
        // transactions only (see `stream`).
        let stream = match cfg.decision_stream {
            true => Some(Arc::new(stream::DecisionStream::new(
                &cfg,
                metrics.clone(),
            )?)),
            false => None,
        };
        let context = Rebalancer::new(
            cfg.common.request_topic.clone(),
            partitions.clone(),
            metrics.clone(),
            stream.clone(),
        );
        let mut consumer_cfg = kafka::client_config(&cfg.common)?;
        consumer_cfg
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", (stream.is_none()).to_string())
            .set(
                "auto.commit.interval.ms",
                cfg.commit_interval.as_millis().to_string(),
            )
            // Offsets are stored by hand, only once a batch is durable.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "session.timeout.ms",
                cfg.session_timeout.as_millis().to_string(),
            )
            .set(
                "max.poll.interval.ms",
                cfg.max_poll_interval.as_millis().to_string(),
            )
            // A member learns of a rebalance from a heartbeat's answer, so
            // a joining worker waits up to one interval for the others: 3 s
            // (the Java client's default), or a third of a shorter session.
            .set(
                "heartbeat.interval.ms",
                (cfg.session_timeout.as_millis() / 3).min(3_000).to_string(),
            )
            .set("fetch.wait.max.ms", "100")
            // librdkafka prefetches up to this much per partition, and a
            // pause (a full partition buffer) throws the prefetched records
            // away, to be fetched again on resume. At the default 64 MiB the
            // broker served a hot partition several times over: the drain of
            // one hot coupon went from about 11,000 to 18,000-22,000
            // records/s at 2 MiB. It must stay above a partition's fetch size
            // (`max.partition.fetch.bytes`, 1 MiB), or fetching stalls (512
            // KiB: 5,000/s). docs/benchmarks.md, "Tuning, measured".
            .set("queued.max.messages.kbytes", "2048")
            // For the consumer lag per partition on /metrics.
            .set(
                "statistics.interval.ms",
                cfg.stats_interval.as_millis().to_string(),
            );
        if stream.is_some() {
            // KIP-447: a partition's new owner starts only once the offsets
            // a transaction still open carries for it are committed or
            // aborted (a member frozen past its session commits its last
            // one when it thaws, if the broker has not timed it out yet);
            // otherwise it starts below them and streams those decisions
            // again. librdkafka asks for stable offsets exactly when it
            // reads committed records: its default, stated here because the
            // stream depends on it.
            consumer_cfg.set("isolation.level", "read_committed");
        }
        if !cfg.group_instance_id.is_empty() {
            consumer_cfg.set("group.instance.id", &cfg.group_instance_id);
        }
        for (k, v) in cfg.common.kafka_options()? {
            consumer_cfg.set(k, v);
        }
        let consumer: StreamConsumer<Rebalancer> = consumer_cfg
            .create_with_context(context)
            .context("creating the Kafka consumer")?;
        consumer
            .subscribe(&[&cfg.common.request_topic])
            .context("subscribing to the request topic")?;
        let keys = cfg.common.keys()?;
        let consumer = Arc::new(consumer);
        let offsets = GroupOffsets::new(consumer.clone(), cfg.common.request_topic.clone());
        Ok(Self {
            shared: Arc::new(Shared {
                states: CouponState::new(redis.clone(), keys.clone()),
                statuses: StatusCache::new(redis, keys, cfg.common.status_ttl()),
                cfg,
                pool,
                dlq,
                offsets: Arc::new(offsets),
                stream,
                metrics,
                liveness: Liveness::default(),
            }),
            consumer,
            partitions,
            ops,
        })
    }

    /// The partitions of the request topic this worker owns, kept current
    /// across rebalances (for readiness checks and tests).
    pub fn assignment(&self) -> tokio::sync::watch::Receiver<BTreeSet<i32>> {
        self.consumer.context().assignment()
    }

    /// The address of the operations port (`/metrics`, `/healthz`, `/readyz`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// Consumes until `shutdown` is cancelled, then finishes the batches in
    /// hand and commits.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            topic = %self.shared.cfg.common.request_topic,
            group = %self.shared.cfg.group_id,
            metrics = %self.ops.local_addr(),
            "worker consuming"
        );
        self.shared.liveness.beat();
        let ops = self
            .ops
            .spawn(ops_router(self.shared.clone()), shutdown.clone());
        let retiring = tokio::spawn(retire::run(self.shared.clone(), shutdown.clone()));
        let watching = self.shared.stream.is_some().then(|| {
            tokio::spawn(stream::watch_stalls(
                Arc::new(self.shared.cfg.clone()),
                self.shared.metrics.clone(),
                shutdown.clone(),
            ))
        });
        let consumed = consumer::run(
            self.consumer,
            self.shared,
            self.partitions,
            shutdown.clone(),
        )
        .await;
        // The sweep stops with everything else; a run of it cut short
        // leaves nothing half done.
        shutdown.cancel();
        retiring.abort();
        if let Some(w) = watching {
            w.abort();
        }
        let _ = ops.await;
        tracing::info!("worker stopped");
        consumed
    }
}

/// How long the poll loop may stay silent before `/healthz` fails (and the
/// orchestrator restarts the worker). Far above its one-second heartbeat.
const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// How long `/readyz` waits for Postgres and Redis.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `/metrics`, `/healthz` and `/readyz` of the worker.
fn ops_router(shared: Arc<Shared>) -> Router {
    let metrics = shared.metrics.clone();
    let live = shared.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || async move { ops::metrics_response(metrics.render()) }),
        )
        .route(
            "/healthz",
            get(move || async move {
                let silent = live.liveness.silent_for();
                if silent < LIVENESS_LIMIT {
                    (StatusCode::OK, Json(json!({"status": "ok"})))
                } else {
                    let message =
                        format!("the poll loop has been silent for {} s", silent.as_secs());
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"status": "stuck", "message": message})),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                let pg = async {
                    sqlx::query("SELECT 1")
                        .execute(&shared.pool)
                        .await
                        .map(|_| ())
                };
                let redis = async {
                    redis::cmd("PING")
                        .query_async::<()>(&mut shared.states.connection())
                        .await
                };
                let pg = matches!(tokio::time::timeout(READY_TIMEOUT, pg).await, Ok(Ok(())));
                let redis = matches!(tokio::time::timeout(READY_TIMEOUT, redis).await, Ok(Ok(())));
                let status = if pg && redis {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, Json(json!({"postgres": pg, "redis": redis})))
            }),
        )
}
