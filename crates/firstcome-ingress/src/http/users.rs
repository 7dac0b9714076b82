//! `GET /v1/users/{user_id}/coupons`: the coupons a user holds (Postgres).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use firstcome::{UserId, db};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::extract::{Id, Peer};
use crate::services::AppState;
use axum::http::HeaderMap;

/// The routes of this resource.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/users/{user_id}/coupons", get(user_coupons))
}

/// A coupon a user holds.
#[derive(Serialize, ToSchema)]
pub struct HeldCouponView {
    coupon_id: String,
    request_id: uuid::Uuid,
    issued_at: DateTime<Utc>,
}

#[utoipa::path(
    get, path = "/v1/users/{user_id}/coupons", tag = "coupons",
    params(("user_id" = String, Path, pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The coupons the user holds", body = Vec<HeldCouponView>),
        (status = 401, description = "`unauthorized` (with a verified identity: no valid token)", body = ErrorBody),
        (status = 403, description = "`forbidden` (with a verified identity: another user's holdings)", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable` or `overloaded`, with `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user))]
pub(crate) async fn user_coupons(
    State(state): State<AppState>,
    Id(user): Id<UserId>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Json<Vec<HeldCouponView>>, ApiError> {
    // With a verified identity, a user's holdings are the user's own.
    state.identity.check_own(&headers, peer, &user)?;
    let held = db::user_coupons(&state.pool, &user).await?;
    Ok(Json(
        held.into_iter()
            .map(|h| HeldCouponView {
                coupon_id: h.coupon_id.to_string(),
                request_id: h.request_id.as_uuid(),
                issued_at: h.issued_at,
            })
            .collect(),
    ))
}
