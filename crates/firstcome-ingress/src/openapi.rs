//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers'
//! annotations in [`crate::routes`], served at `GET /openapi.json` and
//! committed as `docs/openapi.json` (a test keeps the two equal).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::{admin, routes};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "firstcome",
        description = "First-come-first-served coupon issuance. An issue request is appended to \
            an ordered log and answered 202 once the broker acknowledged it; a worker decides \
            requests in log order. Every error answers `{\"error\":{\"code\",\"message\"}}`.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        routes::create_coupon,
        routes::get_coupon,
        routes::issue,
        routes::get_request,
        routes::user_coupons,
        routes::healthz,
        routes::readyz,
        routes::openapi_json,
        admin::list_coupons,
        admin::get_counters,
        admin::add_stock,
        admin::close,
        admin::reopen,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, RequestStatusView)),
    modifiers(&AdminToken),
    tags(
        (name = "issue", description = "Asking for a coupon and following the request"),
        (name = "coupons", description = "Coupons and who holds them"),
        (name = "admin", description = "Behind the admin bearer token"),
        (name = "health", description = "Probes"),
    )
)]
pub struct ApiDoc;

/// The document as served, pretty JSON with a final newline.
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the document serializes");
    json.push('\n');
    json
}

struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
    /// On a `503 unavailable` for an issue request: the request that may or
    /// may not have been appended.
    #[schema(format = Uuid)]
    pub request_id: Option<String>,
    /// With `request_id`: where its status can be read.
    pub status_url: Option<String>,
}

/// The machine-readable code and a human-readable message.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable; clients branch on it.
    pub code: ErrorCode,
    /// For people; may change.
    pub message: String,
}

/// Every error code the API answers.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: admin token missing or wrong.
    Unauthorized,
    /// 422: malformed input; nothing changed.
    InvalidRequest,
    /// 422: the `Idempotency-Key` was used for another request.
    IdempotencyKeyReused,
    /// 409: the coupon id is taken.
    CouponExists,
    /// 404: no such coupon.
    CouponNotFound,
    /// 409: the coupon is sold out; nothing was appended.
    SoldOut,
    /// 409: outside the coupon's window; nothing was appended.
    NotOpen,
    /// 404: no such issue request.
    RequestNotFound,
    /// 404: no such endpoint.
    NotFound,
    /// 405: no such method on this endpoint.
    MethodNotAllowed,
    /// 413: body over the limit.
    PayloadTooLarge,
    /// 415: body not declared `application/json`.
    UnsupportedMediaType,
    /// 503: too many requests in flight; nothing was done.
    Overloaded,
    /// 429: over the per-client rate limit; nothing was done.
    RateLimited,
    /// 503: a dependency did not answer in time.
    Unavailable,
    /// 500: a bug; logged.
    Internal,
}

/// A status lookup.
#[derive(Serialize, ToSchema)]
#[schema(as = RequestStatus)]
pub struct RequestStatusView {
    /// The request.
    #[schema(format = Uuid)]
    pub request_id: String,
    /// Its coupon.
    pub coupon_id: String,
    /// Its user.
    pub user_id: String,
    /// Where it stands.
    pub status: firstcome::Status,
    /// When the ingress accepted it.
    pub accepted_at: DateTime<Utc>,
    /// When the worker decided it; null while pending.
    pub decided_at: Option<DateTime<Utc>>,
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
