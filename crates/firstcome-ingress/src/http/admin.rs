//! Admin operations, behind an admin token and written to `admin_audit`.
//!
//! A change to a coupon (close, reopen, more stock) is applied exactly once,
//! in one Postgres transaction that also moves the coupon's Redis epoch
//! ([`db::apply_change`]): whatever was decided on the state before it is
//! refused by the fence and decided again on a state built with it, so the
//! change takes effect at one exact place in the coupon's log order. The
//! worker rebuilds the coupon's Redis state at its next decision; the
//! ingress does not (a rebuild loads every ledger row of the coupon, which
//! for a big sale is more than an API pod should hold, red team #10).
//!
//! Every change names itself with an `Idempotency-Key` (`422` without one):
//! a client that lost the answer (a cut connection, a timeout after the
//! commit) retries with the same key and changes nothing twice, and the same
//! key with another body is `422 idempotency_key_reused`, never silently
//! the first change (see docs/design.md, "Admin changes").

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SubsecRound, Utc};
use firstcome::db::{self, MAX_STOCK};
use firstcome::{CouponId, Status};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::http::extract::{Admin, Body, Id, invalid};
use crate::issue::idempotency;
use crate::services::AppState;

/// Names the change ids derived from idempotency keys.
const CHANGE_NAMESPACE: uuid::Uuid = uuid::uuid!("5b0c35e4-6f7e-4c41-9a52-8d1f2f3c6a10");
/// Largest page.
const MAX_PAGE: i64 = 500;

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/coupons", get(list_coupons))
        .route("/v1/admin/coupons/{coupon_id}/counters", get(get_counters))
        .route("/v1/admin/coupons/{coupon_id}/stock", post(add_stock))
        .route("/v1/admin/coupons/{coupon_id}/close", post(close))
        .route("/v1/admin/coupons/{coupon_id}/reopen", post(reopen))
}

/// A coupon as listed.
#[derive(Serialize, ToSchema)]
pub struct CouponSummary {
    coupon_id: String,
    name: String,
    total_stock: i32,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
}

/// A page of coupons.
#[derive(Serialize, ToSchema)]
pub struct CouponPage {
    coupons: Vec<CouponSummary>,
    /// Pass as `after` for the next page; null on the last one.
    next_after: Option<String>,
}

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Coupons per page, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// The last coupon id of the previous page.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    after: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/admin/coupons", tag = "admin",
    params(PageQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "A page of coupons, by id", body = CouponPage),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
pub(crate) async fn list_coupons(
    _admin: Admin,
    State(state): State<AppState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<CouponPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let after = q.after.map(CouponId::parse).transpose();
    let after = invalid(after)?;
    let page = db::coupons_page(&state.pool, after.as_ref().map(|a| a.as_str()), limit).await?;
    let next_after = (page.len() as i64 == limit)
        .then(|| page.last().map(|c| c.coupon_id.as_str().to_owned()))
        .flatten();
    Ok(Json(CouponPage {
        coupons: page
            .into_iter()
            .map(|c| CouponSummary {
                coupon_id: c.coupon_id.as_str().to_owned(),
                name: c.name,
                total_stock: c.total_stock,
                starts_at: c.starts_at,
                ends_at: c.ends_at,
            })
            .collect(),
        next_after,
    }))
}

/// A coupon's counters.
#[derive(Serialize, ToSchema)]
pub struct Counters {
    coupon_id: String,
    total_stock: i32,
    /// Users holding it (Postgres).
    issued: i64,
    /// Units left: total minus issued.
    remaining: i64,
    /// Decided requests by final status (Postgres).
    decided: std::collections::BTreeMap<Status, i64>,
    /// Requests acknowledged by the broker and not decided yet, as far as
    /// the ingress could count them (Redis; requests accepted while Redis
    /// was down are not counted).
    pending: i64,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
}

async fn counters(state: &AppState, id: &CouponId) -> Result<Counters, ApiError> {
    let coupon = db::coupon(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::CouponNotFound(id.to_string()))?;
    let decided: std::collections::BTreeMap<Status, i64> = db::decided_counts(&state.pool, id)
        .await?
        .into_iter()
        .collect();
    // Holders from `user_coupon`, which prune keeps (the ledger's `issued`
    // rows shrink after a prune, red team #12).
    let issued = db::issued_count(&state.pool, id).await?;
    let total_decided: i64 = decided.values().sum();
    let accepted: Option<i64> = state.states.accepted(id).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "accepted count unavailable");
        None
    });
    Ok(Counters {
        coupon_id: coupon.coupon_id.as_str().to_owned(),
        total_stock: coupon.total_stock,
        issued,
        remaining: i64::from(coupon.total_stock) - issued,
        pending: (accepted.unwrap_or(0) - total_decided).max(0),
        decided,
        starts_at: coupon.starts_at,
        ends_at: coupon.ends_at,
    })
}

#[utoipa::path(
    get, path = "/v1/admin/coupons/{coupon_id}/counters", tag = "admin",
    params(("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The coupon's counters", body = Counters),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
pub(crate) async fn get_counters(
    _admin: Admin,
    State(state): State<AppState>,
    Id(id): Id<CouponId>,
) -> Result<Json<Counters>, ApiError> {
    Ok(Json(counters(&state, &id).await?))
}

/// Units to add.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddStock {
    #[schema(minimum = 1, maximum = 1_000_000_000, example = 50)]
    add: i64,
}

/// A new end of the window; null or absent: no end.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reopen {
    #[serde(default)]
    ends_at: Option<DateTime<Utc>>,
}

/// The id of a change, named by the client's `Idempotency-Key` (so a retry
/// is the same change); a change without one is refused.
fn change_id(headers: &HeaderMap, id: &CouponId, action: &str) -> Result<uuid::Uuid, ApiError> {
    let key = idempotency::key(headers)?.ok_or_else(|| {
        ApiError::InvalidRequest(
            "an admin change needs an Idempotency-Key: a retry with the same key applies it once"
                .into(),
        )
    })?;
    Ok(uuid::Uuid::new_v5(
        &CHANGE_NAMESPACE,
        format!("{action}\n{id}\n{key}").as_bytes(),
    ))
}

/// Applies the change once (see the module's docs) and answers the
/// coupon's counters.
async fn apply(
    state: &AppState,
    admin: &Admin,
    headers: &HeaderMap,
    id: &CouponId,
    change: db::Change,
    detail: serde_json::Value,
) -> Result<Json<Counters>, ApiError> {
    let change_id = change_id(headers, id, change.kind())?;
    let outcome = db::apply_change(&state.pool, change_id, id, change, &admin.0, detail).await?;
    match outcome {
        db::ChangeOutcome::Applied(_) => {
            tracing::info!(token_id = %admin.0, action = change.kind(), coupon = %id, %change_id, "admin change applied");
        }
        db::ChangeOutcome::AppliedBefore => {
            tracing::info!(coupon = %id, %change_id, "admin change retried; applied before");
        }
        db::ChangeOutcome::IdTaken => return Err(ApiError::IdempotencyKeyReused),
        db::ChangeOutcome::NotFound => return Err(ApiError::CouponNotFound(id.to_string())),
        db::ChangeOutcome::Invalid(why) => return Err(ApiError::InvalidRequest(why)),
    }
    state.issue.forget(id);
    Ok(Json(counters(state, id).await?))
}

#[utoipa::path(
    post, path = "/v1/admin/coupons/{coupon_id}/stock", tag = "admin",
    params(("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = String, Header, pattern = r"^[!-~]{1,128}$",
         description = "Names the change: a retry with the same key changes nothing twice")),
    request_body = AddStock,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Added; the new units go to the next requests in log order", body = Counters),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_request` (the total would pass 1,000,000,000), or `idempotency_key_reused` (the key named another change)", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
pub(crate) async fn add_stock(
    admin: Admin,
    State(state): State<AppState>,
    Id(id): Id<CouponId>,
    headers: HeaderMap,
    Body(body): Body<AddStock>,
) -> Result<Json<Counters>, ApiError> {
    if !(1..=MAX_STOCK).contains(&body.add) {
        return Err(ApiError::InvalidRequest(format!(
            "add must be 1 to {MAX_STOCK}"
        )));
    }
    let change = db::Change::AddStock {
        units: body.add,
        max_total: MAX_STOCK,
    };
    apply(
        &state,
        &admin,
        &headers,
        &id,
        change,
        json!({ "add": body.add }),
    )
    .await
}

#[utoipa::path(
    post, path = "/v1/admin/coupons/{coupon_id}/close", tag = "admin",
    params(("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = String, Header, pattern = r"^[!-~]{1,128}$",
         description = "Names the change: a retry with the same key changes nothing twice")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Closed: requests accepted from now on are `not_open`", body = Counters),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_request`, or `idempotency_key_reused` (the key named another change)", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
pub(crate) async fn close(
    admin: Admin,
    State(state): State<AppState>,
    Id(id): Id<CouponId>,
    headers: HeaderMap,
) -> Result<Json<Counters>, ApiError> {
    let now = Utc::now().trunc_subsecs(6);
    apply(
        &state,
        &admin,
        &headers,
        &id,
        db::Change::Close(now),
        json!({ "at": now }),
    )
    .await
}

#[utoipa::path(
    post, path = "/v1/admin/coupons/{coupon_id}/reopen", tag = "admin",
    params(("coupon_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = String, Header, pattern = r"^[!-~]{1,128}$",
         description = "Names the change: a retry with the same key changes nothing twice")),
    request_body = Reopen,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Reopened until `ends_at` (or without an end)", body = Counters),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`coupon_not_found`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_request` (`ends_at` in the past or before `starts_at`), or `idempotency_key_reused` (the key named another change)", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
pub(crate) async fn reopen(
    admin: Admin,
    State(state): State<AppState>,
    Id(id): Id<CouponId>,
    headers: HeaderMap,
    Body(body): Body<Reopen>,
) -> Result<Json<Counters>, ApiError> {
    let ends_at = body.ends_at.map(|e| e.trunc_subsecs(6));
    if ends_at.is_some_and(|e| e <= Utc::now()) {
        return Err(ApiError::InvalidRequest(
            "ends_at must be in the future".into(),
        ));
    }
    apply(
        &state,
        &admin,
        &headers,
        &id,
        db::Change::Reopen(ends_at),
        json!({ "ends_at": ends_at }),
    )
    .await
}
