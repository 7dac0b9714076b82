//! The probes: `/healthz` (the process runs) and `/readyz` (a `202` can be
//! given: the broker takes the request topic's records).
//!
//! Neither touches a dependency when it is asked. A background task
//! ([`watch`]) checks the broker, Redis and Postgres once a second and keeps
//! the result; the probes read it. So a flood of probes costs no pool slot,
//! no Redis command and no broker request (red team #5), and the probes are
//! served on the operations port too, where the kubelet asks them, beside
//! `/metrics` and away from the public listener's connection bound.
//!
//! Readiness follows the broker alone. The ingress answers without Redis
//! (statuses from the ledger, no idempotency keys) and without Postgres
//! (known coupons from its cache), so a blip of either must not take every
//! replica out of the Service at once; their health is in the answer's
//! `checks` and in `firstcome_ingress_dependency_up` for the alerts.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::services::AppState;

/// How often [`watch`] checks the dependencies, and how long each check
/// may take.
const INTERVAL: Duration = Duration::from_secs(1);

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The dependencies, in the order the answer lists them.
pub const DEPENDENCIES: [&str; 3] = ["kafka", "postgres", "redis"];

#[utoipa::path(
    get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process runs", body = HealthView))
)]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the broker answered the last look (at most a second ago).
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "The broker takes records; `checks` shows each dependency", body = ReadyView),
        (status = 503, description = "The broker does not (or the first look is not done)", body = ReadyView),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let (ready, last) = state.readiness.read();
    let detail: serde_json::Map<String, serde_json::Value> = DEPENDENCIES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let word = match last {
                None => "unknown",
                Some(ok) if ok[i] => "ok",
                Some(_) => "failing",
            };
            ((*name).to_owned(), json!(word))
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = if ready { "ready" } else { "not_ready" };
    (status, Json(json!({ "status": word, "checks": detail }))).into_response()
}

/// Checks the broker, Redis and Postgres every [`INTERVAL`] until
/// `shutdown`, keeping the result for the probes and the metrics.
pub async fn watch(state: AppState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        look(&state).await;
    }
}

/// One look at the dependencies (at most [`INTERVAL`]), kept for the
/// probes and the metrics. `Application::build` takes the first.
pub async fn look(state: &AppState) {
    let (kafka, pg, redis) = tokio::join!(
        within(INTERVAL, kafka(state)),
        within(INTERVAL, postgres(state)),
        within(INTERVAL, redis(state)),
    );
    let results = [kafka, pg, redis];
    let mut ok = [false; 3];
    for (i, r) in results.into_iter().enumerate() {
        ok[i] = r.is_ok();
        state.metrics.dependency(DEPENDENCIES[i], ok[i]);
        if let Err(e) = r {
            tracing::warn!(dependency = DEPENDENCIES[i], error = %e, "dependency failing");
        }
    }
    state.readiness.set(ok);
}

async fn postgres(state: &AppState) -> Result<(), String> {
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn redis(state: &AppState) -> Result<(), String> {
    redis::cmd("PING")
        .query_async::<String>(&mut state.redis.clone())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn kafka(state: &AppState) -> Result<(), String> {
    let producer = state.producer.producer();
    let topic = state.cfg.common.request_topic.clone();
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        producer
            .client()
            .fetch_metadata(Some(&topic), INTERVAL)
            .map_err(|e| e.to_string())
            .and_then(|m| match m.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                _ => Err(format!("topic {topic} is missing")),
            })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// Runs a check, failing it when it takes longer than `limit`.
async fn within(
    limit: Duration,
    check: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(limit, check)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct ReadyView {
    /// `ready` or `not_ready`.
    pub status: String,
    /// `ok`, `failing` or `unknown` (before the first look) per dependency:
    /// `kafka`, `postgres`, `redis`.
    pub checks: BTreeMap<String, String>,
}

/// `/healthz`.
#[derive(Serialize, ToSchema)]
pub struct HealthView {
    /// Always `ok`.
    pub status: String,
}
