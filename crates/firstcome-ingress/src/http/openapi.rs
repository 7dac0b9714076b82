//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers'
//! annotations in the resource modules, served at `GET /openapi.json` and
//! committed as `docs/openapi.json` (a test keeps the two equal), and
//! rendered for people at `GET /docs` (Redoc). It sits beside the router,
//! above every resource it lists.

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorCode, ErrorDetail};
use crate::http::{admin, coupons, health, issue, requests, users};
use crate::services::AppState;

/// The route of the document.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
}

/// The OpenAPI document of the public API, served at `/openapi.json`; the
/// suite checks it against `docs/openapi.json` and fuzzes every operation.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "firstcome",
        description = "First-come-first-served coupon issuance. An issue request is appended to \
            an ordered log and answered 202 once the broker acknowledged it; a worker decides \
            requests in log order. Every error answers `{\"error\":{\"code\",\"message\"}}`.",
        license(name = "Apache-2.0")
    ),
    paths(
        coupons::create_coupon,
        coupons::get_coupon,
        issue::issue,
        requests::get_request,
        users::user_coupons,
        health::healthz,
        health::readyz,
        openapi_json,
        docs,
        admin::list_coupons,
        admin::get_counters,
        admin::add_stock,
        admin::close,
        admin::reopen,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, requests::RequestStatusView)),
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

/// This API's OpenAPI document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(crate) async fn openapi_json() -> Response {
    // Built once: rebuilding and pretty-printing the document per call was
    // CPU any anonymous client could spend outside every bound (red team #5).
    static DOCUMENT: std::sync::LazyLock<axum::body::Bytes> =
        std::sync::LazyLock::new(|| document().into());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.clone(),
    )
        .into_response()
}

/// This API's documentation, rendered (Redoc).
#[utoipa::path(
    get, path = "/docs", tag = "health",
    responses((status = 200, description = "The OpenAPI document rendered by Redoc: an HTML page \
        with the document inside; the browser loads Redoc's script from its CDN", content_type = "text/html"))
)]
pub(crate) async fn docs() -> Response {
    // Built once, like the document: the page carries the whole document.
    static PAGE: std::sync::LazyLock<axum::body::Bytes> = std::sync::LazyLock::new(|| {
        utoipa_redoc::Redoc::new(ApiDoc::openapi())
            .to_html()
            .replace("<title>Redoc</title>", "<title>firstcome API</title>")
            .into()
    });
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE.clone(),
    )
        .into_response()
}
