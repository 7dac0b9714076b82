//! The HTTP API (see the README for the contract). Ids are validated here, at
//! the edge; bad input is answered `422` before anything is touched.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SubsecRound, Utc};
use firstcome::db::{self, Coupon};
use firstcome::state::{self, RequestStatus};
use firstcome::{CouponId, IssueRequest, RequestId, Status, UserId};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;

use crate::admin;
use crate::app::AppState;
use crate::error::ApiError;
use crate::idempotency::{self, Prior};
use crate::openapi::{ErrorBody, HealthView, ReadyView, RequestStatusView};
use crate::ratelimit::{self, RateLimit};
use utoipa::ToSchema;

/// Largest `total_stock` a coupon may have.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Longest coupon name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// How long the ingress waits for Redis when recording a pending status.
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long pending-status writes are skipped after one failed.
const PENDING_SKIP: Duration = Duration::from_secs(1);

/// The whole API on one router, so tests can serve it on any listener.
pub fn router(state: AppState) -> Router {
    let cfg = &state.inner.cfg;
    let timeout = Duration::from_millis(cfg.request_timeout_ms);
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
    let rate_limit = RateLimit::new(ratelimit::Settings {
        per_sec: cfg.rate_limit_per_sec,
        burst: cfg.rate_limit_burst,
        clients: cfg.rate_limit_clients,
        header: cfg
            .client_ip_header
            .as_deref()
            .map(|h| HeaderName::try_from(h).expect("validated with the configuration")),
        trusted: cfg
            .trusted_proxy_nets()
            .expect("validated with the configuration"),
    });
    let mut api = Router::new()
        .route("/v1/coupons", post(create_coupon))
        .route("/v1/coupons/{coupon_id}", get(get_coupon))
        .route("/v1/coupons/{coupon_id}/issue", post(issue))
        .route("/v1/issue-requests/{request_id}", get(get_request))
        .route("/v1/users/{user_id}/coupons", get(user_coupons))
        .route("/v1/admin/coupons", get(admin::list_coupons))
        .route(
            "/v1/admin/coupons/{coupon_id}/counters",
            get(admin::get_counters),
        )
        .route(
            "/v1/admin/coupons/{coupon_id}/stock",
            post(admin::add_stock),
        )
        .route("/v1/admin/coupons/{coupon_id}/close", post(admin::close))
        .route("/v1/admin/coupons/{coupon_id}/reopen", post(admin::reopen))
        .route_layer(middleware::from_fn_with_state(in_flight, shed_load));
    // Checked before the in-flight bound: a client over its rate takes no slot.
    if let Some(limit) = rate_limit {
        api = api.route_layer(middleware::from_fn_with_state(limit, ratelimit::limit));
    }
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// Answers `503 overloaded` at once when `FIRSTCOME_MAX_IN_FLIGHT` requests
/// are being served, rather than queueing without bound.
async fn shed_load(
    State(in_flight): State<Arc<Semaphore>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    match in_flight.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::Overloaded.into_response(),
    }
}

/// Every route pattern, as the metrics label it (a path no route matched
/// is `other`, so the label set stays bounded).
const ROUTES: &[&str] = &[
    "/v1/coupons",
    "/v1/coupons/{coupon_id}",
    "/v1/coupons/{coupon_id}/issue",
    "/v1/issue-requests/{request_id}",
    "/v1/users/{user_id}/coupons",
    "/v1/admin/coupons",
    "/v1/admin/coupons/{coupon_id}/counters",
    "/v1/admin/coupons/{coupon_id}/stock",
    "/v1/admin/coupons/{coupon_id}/close",
    "/v1/admin/coupons/{coupon_id}/reopen",
    "/healthz",
    "/readyz",
    "/openapi.json",
];

/// The metrics label of a request's route.
fn route_label(request: &axum::extract::Request) -> &'static str {
    request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|m| ROUTES.iter().find(|r| **r == m.as_str()))
        .copied()
        .unwrap_or("other")
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The metrics label of a method.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// What every answer goes through: the headers an API gateway expects of a
/// JSON API (nothing is cached, sniffed, framed or referred); the request
/// metrics; and one structured access line per request (target `access`:
/// method, path, status, duration; never headers or bodies, so no token or
/// secret can reach it; `RUST_LOG=access=off` silences it). One middleware
/// for all, as each layer costs an allocation per request.
async fn edge(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    use axum::http::HeaderValue;
    use axum::http::header;
    let started = std::time::Instant::now();
    let metrics = &state.inner.metrics;
    let route = route_label(&request);
    let method = method_label(request.method());
    let logged = tracing::enabled!(target: "access", tracing::Level::INFO)
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
    // A guard, not a decrement after the await: a client that hangs up
    // drops this future half-way.
    let in_flight = InFlight::enter(&metrics.in_flight);
    let mut response = next.run(request).await;
    drop(in_flight);
    let status = response.status().as_u16();
    let took = started.elapsed();
    metrics.answered(route, method, status, took);
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if let Some((method, path)) = logged {
        tracing::info!(
            target: "access",
            %method,
            path,
            status,
            duration_ms = took.as_secs_f64() * 1e3,
        );
    }
    response
}

/// A JSON body whose rejections answer in our error shape.
pub(crate) struct Body<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(Body(v))
    }
}

/// Proof that the request carried an admin bearer token, and which one (its
/// id, for the audit table).
pub(crate) struct Admin(pub(crate) String);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        // Every token is compared, whichever matches.
        let mut found = None;
        for (id, token) in &state.inner.admin_tokens {
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                found = Some(id.clone());
            }
        }
        found.map(Admin).ok_or(ApiError::Unauthorized)
    }
}

/// Compares without an early exit, so response time does not leak how much
/// of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn parse<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

/// A new coupon.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateCoupon {
    /// Chosen by the admin; never reused.
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$", example = "summer")]
    coupon_id: String,
    /// Display name, 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200, example = "Summer sale")]
    name: String,
    /// Units to hand out.
    #[schema(minimum = 0, maximum = 1_000_000_000, example = 100)]
    #[serde(deserialize_with = "json_integer")]
    total_stock: i64,
    /// Requests accepted before this are `not_open`.
    #[serde(default)]
    starts_at: Option<DateTime<Utc>>,
    /// Requests accepted after this are `not_open`.
    #[serde(default)]
    ends_at: Option<DateTime<Utc>>,
}

/// A JSON integer, also when written with a zero fraction (`100.0` is the
/// integer 100 to JSON Schema, and clients that only have doubles send it
/// so); any other fraction is an error.
fn json_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(serde::de::Error::custom(format!("{n} is not an integer"))),
    }
}

/// A coupon and its live counters.
#[derive(Serialize, ToSchema)]
pub(crate) struct CouponView {
    coupon_id: String,
    name: String,
    total_stock: i32,
    /// Units left (Redis; Postgres when Redis is unavailable).
    remaining_stock: i64,
    /// Users holding it.
    issued_count: i64,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
}

impl CouponView {
    fn new(c: &Coupon, remaining_stock: i64, issued_count: i64) -> Self {
        Self {
            coupon_id: c.coupon_id.clone(),
            name: c.name.clone(),
            total_stock: c.total_stock,
            remaining_stock,
            issued_count,
            starts_at: c.starts_at,
            ends_at: c.ends_at,
        }
    }
}

#[utoipa::path(
    post, path = "/v1/coupons", tag = "admin",
    request_body = CreateCoupon,
    security(("admin_token" = [])),
    responses(
        (status = 201, description = "Created", body = CouponView),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`coupon_exists`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_request`; nothing changed", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(coupon_id))]
pub(crate) async fn create_coupon(
    admin: Admin,
    State(state): State<AppState>,
    Body(body): Body<CreateCoupon>,
) -> Result<Response, ApiError> {
    let id = parse(CouponId::parse(body.coupon_id))?;
    tracing::Span::current().record("coupon_id", id.as_str());
    let name = body.name.trim();
    // Control characters have no place in a name, and Postgres text cannot
    // hold NUL at all (it would fail the insert with a 500).
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::InvalidRequest(format!(
            "name must be 1 to {MAX_NAME_CHARS} characters, none of them control characters"
        )));
    }
    if !(0..=MAX_STOCK).contains(&body.total_stock) {
        return Err(ApiError::InvalidRequest(format!(
            "total_stock must be between 0 and {MAX_STOCK}"
        )));
    }
    if let (Some(s), Some(e)) = (body.starts_at, body.ends_at)
        && e < s
    {
        return Err(ApiError::InvalidRequest(
            "ends_at must not be before starts_at".into(),
        ));
    }
    let coupon = Coupon {
        coupon_id: id.to_string(),
        name: name.to_owned(),
        total_stock: i32::try_from(body.total_stock).expect("bounded above"),
        // Postgres keeps microseconds; keep the same here so the answer
        // matches what a later read returns.
        starts_at: body.starts_at.map(|t| t.trunc_subsecs(6)),
        ends_at: body.ends_at.map(|t| t.trunc_subsecs(6)),
    };
    if !db::insert_coupon(&state.inner.pool, &coupon).await? {
        return Err(ApiError::CouponExists(id.to_string()));
    }
    admin::audit_created(&state, &admin, &id, coupon.total_stock).await?;
    // The worker builds the coupon's Redis state from Postgres on its first
    // request (see `firstcome::rebuild`).
    tracing::info!(total_stock = coupon.total_stock, "coupon created");
    let view = CouponView::new(&coupon, coupon.total_stock.into(), 0);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(
    get, path = "/v1/coupons/{coupon_id}", tag = "coupons",
    params(("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The coupon", body = CouponView),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_coupon(
    State(state): State<AppState>,
    Path(coupon_id): Path<String>,
) -> Result<Json<CouponView>, ApiError> {
    let id = parse(CouponId::parse(coupon_id))?;
    let coupon = state
        .coupon(&id)
        .await?
        .ok_or_else(|| ApiError::CouponNotFound(id.to_string()))?;
    let keys = state.inner.keys.coupon(&id);
    let live = state::counters(&mut state.inner.redis.clone(), &keys).await;
    let (remaining, issued) = match live {
        Ok(Some(c)) => (c.remaining, c.issued),
        // No Redis state (yet), or Redis is down: Postgres knows the issued
        // rows, which are at most a batch behind.
        other => {
            if let Err(e) = other {
                tracing::warn!(error = %e, "redis counters unavailable, reading postgres");
            }
            let issued = db::issued_count(&state.inner.pool, &id).await?;
            (i64::from(coupon.total_stock) - issued, issued)
        }
    };
    Ok(Json(CouponView::new(&coupon, remaining, issued)))
}

/// Who asks.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssueBody {
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    user_id: String,
}

/// The `202` answer: the request is in the log.
#[derive(Serialize, ToSchema)]
pub(crate) struct AcceptedView {
    #[schema(value_type = String, format = Uuid)]
    request_id: RequestId,
    /// Always `pending`.
    #[schema(value_type = String, example = "pending")]
    status: Status,
    /// Where to follow it.
    #[schema(example = "/v1/issue-requests/0193c6a0-0000-7000-8000-000000000000")]
    status_url: String,
}

#[utoipa::path(
    post, path = "/v1/coupons/{coupon_id}/issue", tag = "issue",
    params(
        ("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,128}$",
         description = "1-128 visible ASCII characters; a retry with the same key and user gets the same request back"),
    ),
    request_body = IssueBody,
    responses(
        (status = 202, description = "In the log; it will be decided", body = AcceptedView),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 409, description = "`sold_out` or `not_open`, answered at once; nothing appended", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_request` or `idempotency_key_reused`; nothing appended", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` (names the request, which may still be decided) or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip(state, body), fields(request_id))]
pub(crate) async fn issue(
    State(state): State<AppState>,
    Path(coupon_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body<IssueBody>,
) -> Result<Response, ApiError> {
    let coupon_id = parse(CouponId::parse(coupon_id))?;
    let user_id = parse(UserId::parse(body.user_id))?;
    let slot = idempotency::key(&headers)?.map(|key| {
        let ttl = Duration::from_secs(state.inner.cfg.idempotency_ttl_secs);
        idempotency::Slot::new(&state.inner.keys, &coupon_id, &key, ttl)
    });
    let mut redis = state.inner.redis.clone();
    let prior = match &slot {
        Some(slot) => slot.prior(&mut redis, &coupon_id, &user_id).await?,
        None => Prior::None,
    };
    let request = match prior {
        Prior::Confirmed(id) => return Ok(accepted(id)),
        Prior::Refused(refusal) => return Err(refusal.error(&coupon_id)),
        Prior::Unconfirmed(request) => request,
        Prior::None => {
            let admitted = admit(&state, coupon_id.clone(), user_id.clone()).await;
            let Some(slot) = &slot else {
                return append_and_answer(&state, admitted?, None, &mut redis).await;
            };
            // The first attempt to claim the key fixes its answer (see
            // `idempotency`); an answer that may change (503) fixes nothing.
            let outcome = match &admitted {
                Ok(request) => idempotency::Outcome::Admitted(request),
                Err(e) => match idempotency::Refusal::of(e) {
                    Some(refusal) => idempotency::Outcome::Refused(refusal),
                    None => return Err(admitted.expect_err("matched an error")),
                },
            };
            if slot.claim(&mut redis, &user_id, outcome).await? {
                admitted?
            } else {
                match slot.prior(&mut redis, &coupon_id, &user_id).await? {
                    Prior::Confirmed(id) => return Ok(accepted(id)),
                    Prior::Refused(refusal) => return Err(refusal.error(&coupon_id)),
                    Prior::Unconfirmed(first) => first,
                    // Claimed and expired in between: as if alone.
                    Prior::None => admitted?,
                }
            }
        }
    };
    append_and_answer(&state, request, slot.as_ref(), &mut redis).await
}

/// Appends an admitted request, marks its key confirmed, and answers `202`.
async fn append_and_answer(
    state: &AppState,
    request: IssueRequest,
    slot: Option<&idempotency::Slot>,
    redis: &mut firstcome::redis_conn::RedisConn,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("request_id", tracing::field::display(request.request_id));
    append(state, &request).await?;
    if let Some(slot) = slot {
        slot.confirm(redis, &request).await;
    }
    Ok(accepted(request.request_id))
}

/// The checks before a new request is appended (the coupon exists, its
/// window is open, it is not sold out), and the request.
async fn admit(
    state: &AppState,
    coupon_id: CouponId,
    user_id: UserId,
) -> Result<IssueRequest, ApiError> {
    // Microseconds: what Postgres and the Lua script keep.
    let accepted_at = Utc::now().trunc_subsecs(6);
    let mut total_stock = None;
    match state.coupon(&coupon_id).await {
        // Outside the coupon's window the request would be decided
        // `not_open`, so it is answered now and never appended.
        Ok(Some(c))
            if c.starts_at.is_some_and(|s| accepted_at < s)
                || c.ends_at.is_some_and(|e| accepted_at > e) =>
        {
            state.inner.metrics.short_circuit("not_open");
            return Err(ApiError::NotOpen(coupon_id.to_string()));
        }
        Ok(Some(c)) => total_stock = Some(i64::from(c.total_stock)),
        Ok(None) => return Err(ApiError::CouponNotFound(coupon_id.to_string())),
        // Postgres is down and this replica has not seen the coupon yet: a
        // coupon with a state in Redis exists, and the log, not Postgres,
        // takes the request.
        Err(e) => {
            let keys = state.inner.keys.coupon(&coupon_id);
            match state::counters(&mut state.inner.redis.clone(), &keys).await {
                Ok(Some(_)) => {
                    tracing::warn!(error = %e, "postgres unavailable, coupon known to redis")
                }
                _ => return Err(e),
            }
        }
    }
    // Decisions only take stock, so once the worker has it at zero every
    // request appended later is decided `sold_out` (until an admin adds
    // stock, which this replica sees within FIRSTCOME_SOLD_OUT_CHECK_MS):
    // answering that now spares the log (docs/design.md).
    if state.sold_out(&coupon_id, total_stock).await {
        state.inner.metrics.short_circuit("sold_out");
        return Err(ApiError::SoldOut(coupon_id.to_string()));
    }
    Ok(IssueRequest {
        request_id: RequestId::new(),
        coupon_id,
        user_id,
        accepted_at,
    })
}

/// The `202` answer.
fn accepted(id: RequestId) -> Response {
    let body = AcceptedView {
        request_id: id,
        status: Status::Pending,
        status_url: format!("/v1/issue-requests/{id}"),
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// Appends the request and waits for the broker's acknowledgement, then
/// records its `pending` status.
async fn append(state: &AppState, request: &IssueRequest) -> Result<(), ApiError> {
    let payload = request.to_json();
    let id = request.request_id.to_string();
    let record = FutureRecord::to(&state.inner.cfg.common.request_topic)
        .key(request.coupon_id.as_str())
        .payload(&payload)
        .headers(OwnedHeaders::new().insert(Header {
            key: firstcome::record::REQUEST_ID_HEADER,
            value: Some(id.as_str()),
        }));
    let timeout = state.inner.cfg.produce_timeout();
    // The delivery report arrives at the latest after `message.timeout.ms`
    // (= the produce timeout); the outer timeout only guards against a stuck
    // client.
    let metrics = &state.inner.metrics;
    let started = std::time::Instant::now();
    let delivered = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        state.inner.producer.send(record, timeout),
    )
    .await;
    metrics.produced(started.elapsed());
    // Not acknowledged does not mean not written: the answer carries the
    // request id, whose status tells the truth once the log is readable.
    let id = request.request_id;
    match delivered {
        Ok(Ok(())) => {
            metrics.accepted.inc();
        }
        Ok(Err(e)) => {
            metrics.broker_error("error");
            return Err(ApiError::not_acknowledged(id, format!("kafka: {e}")));
        }
        Err(_) => {
            metrics.broker_error("timeout");
            return Err(ApiError::not_acknowledged(
                id,
                "kafka: no delivery report in time",
            ));
        }
    }
    // The record is in the log, so the request will be decided whatever
    // happens next; the pending entry only lets lookups say "pending" rather
    // than 404 until then.
    // After a failed write the next ones are skipped for a while, so a
    // Redis outage does not cost every request the write's timeout.
    if !state.inner.pending_skipped() {
        let pending = RequestStatus::pending(request);
        let ttl = state.inner.cfg.common.status_ttl();
        let mut redis = state.inner.redis.clone();
        let write = state::put_pending(&mut redis, &state.inner.keys, &pending, ttl);
        let failed = match tokio::time::timeout(STATUS_WRITE_TIMEOUT, write).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        if let Some(error) = failed
            && state.inner.skip_pending_for(PENDING_SKIP)
        {
            tracing::warn!(%error, "accepted, but the pending status was not cached; skipping it for a second");
        }
    }
    Ok(())
}

/// `?wait_ms=N`: hold the lookup until the request is final or `N` ms pass.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// Milliseconds to wait for a final status (at most the configured
    /// maximum, 10,000 by default); absent or 0 answers at once.
    #[param(minimum = 0, maximum = 10_000)]
    wait_ms: Option<u64>,
}

#[utoipa::path(
    get, path = "/v1/issue-requests/{request_id}", tag = "issue",
    params(("request_id" = String, Path, format = Uuid), WaitQuery),
    responses(
        (status = 200, description = "Where the request stands", body = RequestStatusView),
        (status = 404, description = "`request_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_request(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<RequestStatus>, ApiError> {
    let id = parse(RequestId::parse(&request_id))?;
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let max = state.inner.cfg.max_wait_ms;
    let wait = match query.wait_ms {
        Some(ms) if ms > max => {
            return Err(ApiError::InvalidRequest(format!(
                "wait_ms must be at most {max}"
            )));
        }
        Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
        _ => None,
    };
    let Some(wait) = wait else {
        return lookup(&state, id).await.map(Json);
    };
    // Registered before the first look, so a decision in between wakes it.
    let waiter = state.inner.waiters.register(id);
    match lookup(&state, id).await {
        Ok(s) if s.status != Status::Pending => return Ok(Json(s)),
        // Pending, or not (yet) known: a request whose 503 hid a write, or
        // whose pending entry was skipped, may still be decided.
        Ok(_) | Err(ApiError::RequestNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    waiter.wait(wait).await;
    lookup(&state, id).await.map(Json)
}

/// A request's status: the cache, else the ledger.
async fn lookup(state: &AppState, id: RequestId) -> Result<RequestStatus, ApiError> {
    let cached = state::get_status(&mut state.inner.redis.clone(), &state.inner.keys, id).await;
    match cached {
        Ok(Some(s)) => return Ok(s),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "redis status unavailable, reading the ledger"),
    }
    let corrupt = |e: String| ApiError::Internal(anyhow::anyhow!("ledger row {id}: {e}"));
    let Some(row) = db::ledger_row(&state.inner.pool, id).await? else {
        // Failed, and the ledger refused even its `failed` row.
        let (failed_at, record) = db::failure(&state.inner.pool, id)
            .await?
            .ok_or_else(|| ApiError::RequestNotFound(id.to_string()))?;
        let r = IssueRequest::from_json(&record).map_err(|e| corrupt(e.to_string()))?;
        return Ok(RequestStatus {
            status: Status::Failed,
            decided_at: Some(failed_at),
            ..RequestStatus::pending(&r)
        });
    };
    Ok(RequestStatus {
        request_id: id,
        coupon_id: CouponId::parse(row.coupon_id).map_err(|e| corrupt(e.to_string()))?,
        user_id: UserId::parse(row.user_id).map_err(|e| corrupt(e.to_string()))?,
        status: row.status.parse().map_err(|e| corrupt(format!("{e}")))?,
        accepted_at: row.accepted_at,
        decided_at: Some(row.decided_at),
    })
}

/// A coupon a user holds.
#[derive(Serialize, ToSchema)]
pub(crate) struct HeldCouponView {
    coupon_id: String,
    request_id: uuid::Uuid,
    issued_at: DateTime<Utc>,
}

#[utoipa::path(
    get, path = "/v1/users/{user_id}/coupons", tag = "coupons",
    params(("user_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The coupons the user holds", body = Vec<HeldCouponView>),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn user_coupons(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<Vec<HeldCouponView>>, ApiError> {
    let user = parse(UserId::parse(user_id))?;
    let held = db::user_coupons(&state.inner.pool, &user).await?;
    Ok(Json(
        held.into_iter()
            .map(|h| HeldCouponView {
                coupon_id: h.coupon_id,
                request_id: h.request_id,
                issued_at: h.issued_at,
            })
            .collect(),
    ))
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
    let inner = &state.inner;
    let pg = async {
        sqlx::query("SELECT 1")
            .execute(&inner.pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let redis = async {
        redis::cmd("PING")
            .query_async::<String>(&mut inner.redis.clone())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let producer = inner.producer.producer();
    let topic = inner.cfg.common.request_topic.clone();
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

/// This API's OpenAPI document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
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

#[cfg(test)]
mod tests {
    use super::{ROUTES, constant_time_eq};

    #[test]
    fn every_documented_path_has_its_own_metrics_label() {
        use utoipa::OpenApi;
        let doc = crate::openapi::ApiDoc::openapi();
        for path in doc.paths.paths.keys() {
            assert!(
                ROUTES.contains(&path.as_str()),
                "{path} would be labelled `other`"
            );
        }
        assert_eq!(
            ROUTES.len(),
            doc.paths.paths.len(),
            "a label for a path that does not exist"
        );
    }

    #[test]
    fn token_comparison_needs_every_byte_and_the_length() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-tokem", b"secret-token"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }
}
