//! `/v1/coupons`: creating a coupon (admin) and reading one with its live
//! counters.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SubsecRound, Utc};
use firstcome::CouponId;
use firstcome::db::{self, Coupon, MAX_STOCK};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::extract::{Admin, Body, Id, invalid};
use crate::services::AppState;

/// Longest coupon name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/coupons", post(create_coupon))
        .route("/v1/coupons/{coupon_id}", get(get_coupon))
}

/// A new coupon.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCoupon {
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
pub struct CouponView {
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
            coupon_id: c.coupon_id.as_str().to_owned(),
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
    let id = invalid(CouponId::parse(body.coupon_id))?;
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
        coupon_id: id.clone(),
        name: name.to_owned(),
        total_stock: i32::try_from(body.total_stock).expect("bounded above"),
        // Postgres keeps microseconds; keep the same here so the answer
        // matches what a later read returns.
        starts_at: body.starts_at.map(|t| t.trunc_subsecs(6)),
        ends_at: body.ends_at.map(|t| t.trunc_subsecs(6)),
    };
    if !db::insert_coupon(&state.pool, &coupon).await? {
        return Err(ApiError::CouponExists(id.to_string()));
    }
    // A lookup just before may have noted the id as unknown.
    state.issue.forget(&id);
    audit_created(&state, &admin, &id, coupon.total_stock).await?;
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
#[tracing::instrument(skip_all, fields(coupon_id = %id))]
pub(crate) async fn get_coupon(
    State(state): State<AppState>,
    Id(id): Id<CouponId>,
) -> Result<Json<CouponView>, ApiError> {
    let coupon = state
        .issue
        .coupon(&id)
        .await?
        .ok_or_else(|| ApiError::CouponNotFound(id.to_string()))?;
    let live = state.states.counters(&id).await;
    let (remaining, issued) = match live {
        Ok(Some(c)) => (c.remaining, c.issued),
        // No Redis state (yet), or Redis is down: Postgres knows the issued
        // rows, which are at most a batch behind.
        other => {
            if let Err(e) = other {
                tracing::warn!(error = %e, "redis counters unavailable, reading postgres");
            }
            let issued = db::issued_count(&state.pool, &id).await?;
            (i64::from(coupon.total_stock) - issued, issued)
        }
    };
    Ok(Json(CouponView::new(&coupon, remaining, issued)))
}

/// Records a coupon's creation in the admin audit.
async fn audit_created(
    state: &AppState,
    admin: &Admin,
    id: &CouponId,
    total_stock: i32,
) -> Result<(), ApiError> {
    db::audit(
        &state.pool,
        &admin.0,
        "create_coupon",
        Some(id.as_str()),
        json!({ "total_stock": total_stock }),
    )
    .await?;
    Ok(())
}
