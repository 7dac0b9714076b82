//! This tool's own HTTP servers, run as child processes:
//! - `serve-raw-http`: the HTTP ceiling of the machine: parses and validates
//!   the same body as the ingress, builds the same record, answers 202, and
//!   stops there (no Kafka);
//! - `serve-seed`: the design of the report this project grew from: a
//!   per-coupon Redis lock, `SADD` for the duplicate check, `DECR` rolled back
//!   below zero, then the database insert off the request path (`@Async`),
//!   answering the user directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{SubsecRound, Utc};
use firstcome::{CouponId, IssueRequest, RequestId, UserId};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    user_id: String,
}

async fn healthz() -> StatusCode {
    StatusCode::OK
}

async fn serve(listen: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            term.recv().await;
        })
        .await?;
    Ok(())
}

/// Serves the bare handler until SIGTERM.
pub async fn raw_http(listen: SocketAddr) -> anyhow::Result<()> {
    async fn issue(
        Path(coupon): Path<String>,
        Json(body): Json<IssueBody>,
    ) -> (StatusCode, Json<serde_json::Value>) {
        let (Ok(coupon_id), Ok(user_id)) = (CouponId::parse(coupon), UserId::parse(body.user_id))
        else {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": {"code": "invalid_request"}})),
            );
        };
        let request = IssueRequest {
            request_id: RequestId::new(),
            coupon_id,
            user_id,
            accepted_at: Utc::now().trunc_subsecs(6),
        };
        let payload = request.to_json();
        std::hint::black_box(payload);
        let id = request.request_id;
        (
            StatusCode::ACCEPTED,
            Json(json!({
                "request_id": id,
                "status": "pending",
                "status_url": format!("/v1/issue-requests/{id}"),
            })),
        )
    }
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/coupons/{coupon}/issue", post(issue));
    serve(listen, app).await
}

struct Seed {
    redis: redis::aio::ConnectionManager,
    pool: sqlx::PgPool,
    prefix: String,
    arrivals: AtomicI64,
}

static UNLOCK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});

/// How long a request waits for the coupon's lock before giving up (the
/// report's `tryLock` wait time).
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// The lock's lease.
const LOCK_LEASE_MS: u64 = 3_000;

// It writes to `bench_seed_issue`, which the scenario creates.

/// Serves the seed design until SIGTERM.
pub async fn seed(listen: SocketAddr) -> anyhow::Result<()> {
    let env = crate::env::BenchEnv {
        database_url: std::env::var("DATABASE_URL")?,
        redis_url: std::env::var("REDIS_URL")?,
        redis_cluster: false,
        kafka_brokers: String::new(),
        prefix: std::env::var("FIRSTCOME_REDIS_PREFIX")?,
        request_topic: String::new(),
        dlq_topic: String::new(),
        group_id: String::new(),
        admin_token: String::new(),
        session_timeout: String::new(),
        tag: String::new(),
    };
    let redis =
        redis::aio::ConnectionManager::new(redis::Client::open(env.redis_url.as_str())?).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&env.database_url)
        .await?;
    let state = Arc::new(Seed {
        redis,
        pool,
        prefix: env.prefix,
        arrivals: AtomicI64::new(0),
    });

    async fn issue(
        State(seed): State<Arc<Seed>>,
        Path(coupon): Path<String>,
        Json(body): Json<IssueBody>,
    ) -> (StatusCode, Json<serde_json::Value>) {
        let arrival = seed.arrivals.fetch_add(1, Ordering::Relaxed);
        match decide(&seed, &coupon, &body.user_id).await {
            Ok(status) => {
                // The report's `@Async` save: off the request path.
                let (pool, user) = (seed.pool.clone(), body.user_id);
                tokio::spawn(async move {
                    let _ = sqlx::query(
                        "INSERT INTO bench_seed_issue (coupon_id, user_id, arrival, status) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(coupon)
                    .bind(user)
                    .bind(arrival)
                    .bind(status)
                    .execute(&pool)
                    .await;
                });
                (StatusCode::OK, Json(json!({ "status": status })))
            }
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": {"code": "unavailable", "message": e.to_string()}})),
            ),
        }
    }

    async fn decide(seed: &Seed, coupon: &str, user: &str) -> anyhow::Result<&'static str> {
        let mut redis = seed.redis.clone();
        let p = &seed.prefix;
        let lock = format!("{p}seed:{coupon}:lock");
        let token = uuid::Uuid::new_v4().to_string();
        let since = Instant::now();
        loop {
            let got: Option<String> = redis::cmd("SET")
                .arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(LOCK_LEASE_MS)
                .query_async(&mut redis)
                .await?;
            if got.is_some() {
                break;
            }
            anyhow::ensure!(since.elapsed() < LOCK_WAIT, "lock wait timed out");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let users = format!("{p}seed:{coupon}:users");
        let stock = format!("{p}seed:{coupon}:stock");
        let added: i64 = redis::cmd("SADD")
            .arg(&users)
            .arg(user)
            .query_async(&mut redis)
            .await?;
        let status = if added == 0 {
            "duplicate"
        } else {
            let left: i64 = redis::cmd("DECR")
                .arg(&stock)
                .query_async(&mut redis)
                .await?;
            if left < 0 {
                let _: i64 = redis::cmd("INCR")
                    .arg(&stock)
                    .query_async(&mut redis)
                    .await?;
                let _: i64 = redis::cmd("SREM")
                    .arg(&users)
                    .arg(user)
                    .query_async(&mut redis)
                    .await?;
                "sold_out"
            } else {
                "issued"
            }
        };
        let _: i64 = UNLOCK
            .key(&lock)
            .arg(&token)
            .invoke_async(&mut redis)
            .await?;
        Ok(status)
    }

    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/coupons/{coupon}/issue", post(issue))
        .with_state(state);
    serve(listen, app).await
}
