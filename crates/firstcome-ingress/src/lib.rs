//! The HTTP ingress of firstcome. It validates an issue request, appends it to
//! the request topic keyed by coupon id, and answers `202` only once the
//! broker acknowledged the record: from then on the request is in the log,
//! and the log order is the first-come order.
//!
//! # Layout
//! - [`admin`]: the admin operations and their audit
//! - [`config`]: flags and environment variables
//! - [`app`]: connecting, serving, graceful shutdown
//! - [`routes`]: the handlers of the public API
//! - [`error`]: the one error type and its JSON shape
//! - [`idempotency`]: `Idempotency-Key` on issue requests
//! - [`openapi`]: the OpenAPI document, generated from the handlers
//! - [`waiters`]: long polls woken by the worker's decisions
//! - [`ratelimit`]: the per-client rate limit
//! - [`connections`]: the bound on open connections

pub mod admin;
pub mod app;
pub mod config;
pub mod connections;
pub mod error;
pub mod idempotency;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod waiters;

pub use app::Application;
pub use config::IngressConfig;
