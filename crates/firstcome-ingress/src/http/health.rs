//! The probes: `/healthz` (the process runs) and `/readyz` (the broker,
//! Redis and Postgres answer).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::services::AppState;

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

#[utoipa::path(
    get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process runs", body = HealthView))
)]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the broker, Redis and Postgres all answer within a second.
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Every dependency answers", body = ReadyView),
        (status = 503, description = "Some dependency does not", body = ReadyView),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    const LIMIT: Duration = Duration::from_secs(1);
    let pg = async {
        sqlx::query("SELECT 1")
            .execute(&state.pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let redis = async {
        redis::cmd("PING")
            .query_async::<String>(&mut state.redis.clone())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let producer = state.producer.producer();
    let topic = state.cfg.common.request_topic.clone();
    let kafka = async move {
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            producer
                .client()
                .fetch_metadata(Some(&topic), LIMIT)
                .map_err(|e| e.to_string())
                .and_then(|m| match m.topics().first() {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                    _ => Err(format!("topic {topic} is missing")),
                })
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let (pg, redis, kafka) = tokio::join!(
        within(LIMIT, pg),
        within(LIMIT, redis),
        within(LIMIT, kafka)
    );
    let checks = [("postgres", pg), ("redis", redis), ("kafka", kafka)];
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let detail: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(name, r)| {
            // Only "ok"/"failing" leaves the process; the cause goes to the log.
            if let Err(e) = &r {
                tracing::warn!(dependency = name, error = %e, "not ready");
            }
            (
                name.to_owned(),
                json!(if r.is_ok() { "ok" } else { "failing" }),
            )
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

/// Runs a readiness probe, failing it when it takes longer than `limit`.
async fn within(
    limit: Duration,
    probe: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(limit, probe)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct ReadyView {
    /// `ready` or `not_ready`.
    pub status: String,
    /// `ok` or `failing` per dependency.
    pub checks: BTreeMap<String, String>,
}

/// `/healthz`.
#[derive(Serialize, ToSchema)]
pub struct HealthView {
    /// Always `ok`.
    pub status: String,
}
