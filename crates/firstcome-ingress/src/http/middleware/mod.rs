//! What every request goes through before and after its handler, in one
//! middleware ([`edge`]): on the API's routes the per-client rate limit
//! ([`ratelimit`]) and the in-flight bound, then on every route the
//! security headers, the request metrics and the access line.

pub mod ratelimit;

use std::sync::Arc;

use axum::extract::{MatchedPath, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::ApiError;
use crate::services::AppState;
use ratelimit::RateLimit;

/// What [`edge`] holds.
pub struct Edge {
    /// The services, for the metrics.
    pub app: AppState,
    /// `FIRSTCOME_MAX_IN_FLIGHT` permits: past them the API answers `503
    /// overloaded` at once rather than queueing without bound.
    pub in_flight: Semaphore,
    /// The per-client rate limit, when on.
    pub rate_limit: Option<RateLimit>,
}

impl Edge {
    /// Lets an API request in (`route` is its label): a client over its
    /// rate is refused first, so it takes no slot; then the slot, held for
    /// as long as the returned permit lives. Probes and the document are
    /// neither limited nor counted.
    fn admit(
        &self,
        route: &str,
        request: &axum::extract::Request,
    ) -> Result<Option<SemaphorePermit<'_>>, ApiError> {
        if !route.starts_with("/v1/") {
            return Ok(None);
        }
        if let Some(limit) = &self.rate_limit {
            limit.check(request)?;
        }
        match self.in_flight.try_acquire() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(ApiError::Overloaded),
        }
    }
}

/// Every route pattern, as the metrics label it (a path no route matched
/// is `other`, so the label set stays bounded).
pub(crate) const ROUTES: &[&str] = &[
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
    "/docs",
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

/// What every request goes through: on the API, [`Edge::admit`]; on every
/// answer the headers an API gateway expects of a JSON API (nothing is
/// cached, sniffed, framed or referred), the request metrics and one
/// structured access line (target `access`: method, path, status,
/// duration; never headers or bodies, so no token or secret can reach it;
/// `RUST_LOG=access=off` silences it). One middleware for all, as each
/// layer costs allocations per request (each `from_fn` layer clones and
/// boxes the service below it: about 2,000 instructions).
pub async fn edge(
    State(edge): State<Arc<Edge>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    use axum::http::HeaderValue;
    use axum::http::header;
    let started = std::time::Instant::now();
    let metrics = &edge.app.metrics;
    let route = route_label(&request);
    let method = method_label(request.method());
    let logged = tracing::enabled!(target: "access", tracing::Level::INFO)
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
    // A guard, not a decrement after the await: a client that hangs up
    // drops this future half-way.
    let in_flight = InFlight::enter(&metrics.in_flight);
    let mut response = match edge.admit(route, &request) {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(refused) => refused.into_response(),
    };
    drop(in_flight);
    let status = response.status().as_u16();
    let took = started.elapsed();
    metrics.answered(route, method, status, took);
    let headers = response.headers_mut();
    // Room for all five at once rather than a regrowth half-way.
    headers.reserve(5);
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
