//! The HTTP API (see the README for the contract): one module per resource,
//! each with its own `routes()`, merged here under the middleware every
//! request goes through. Ids and bodies are validated at the edge
//! ([`extract`]); bad input is answered `422` before anything is touched.
//!
//! # Layout
//! - [`extract`]: validated bodies, path ids and the admin token
//! - [`middleware`]: the edge (rate limit, in-flight bound, headers, metrics,
//!   access line)
//! - [`coupons`], [`issue`], [`requests`], [`users`], [`admin`], [`health`]:
//!   the resources
//! - [`openapi`]: the document, generated from the resources' annotations
//!
//! A resource module imports [`extract`], the services and the error type,
//! never this module or another resource's handlers.

pub mod admin;
pub mod coupons;
pub mod extract;
pub mod health;
pub mod issue;
pub mod middleware;
pub mod openapi;
pub mod requests;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, StatusCode};
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;

use crate::error::ApiError;
use crate::services::AppState;
use middleware::Edge;
use middleware::ratelimit::{self, RateLimit};

/// The whole API on one router, so tests can serve it on any listener.
pub fn router(state: AppState) -> Router {
    let cfg = &state.cfg;
    let timeout = cfg.request_timeout;
    let edge = Arc::new(Edge {
        app: state.clone(),
        in_flight: Semaphore::new(cfg.max_in_flight),
        rate_limit: RateLimit::new(ratelimit::Settings {
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
            ipv6_prefix: cfg.rate_limit_ipv6_prefix,
        }),
    });
    Router::new()
        .merge(coupons::routes())
        .merge(issue::routes())
        .merge(requests::routes())
        .merge(users::routes())
        .merge(admin::routes())
        .merge(health::routes())
        .merge(openapi::routes())
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(edge, middleware::edge))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::middleware::ROUTES;
    use super::openapi;

    #[test]
    fn every_documented_path_has_its_own_metrics_label() {
        use utoipa::OpenApi;
        let doc = openapi::ApiDoc::openapi();
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
}
