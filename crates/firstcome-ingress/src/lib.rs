//! The HTTP ingress of firstcome. It validates an issue request, appends it to
//! the request topic keyed by coupon id, and answers `202` only once the
//! broker acknowledged the record: from then on the request is in the log,
//! and the log order is the first-come order.
//!
//! # Layout
//! Modules sit in layers; each imports only from layers below it.
//!
//! - [`app`]: connecting, serving, graceful shutdown (the top)
//! - [`http`]: the router, one module per resource, extractors, middleware
//!   and the OpenAPI document
//! - [`services`]: what the handlers share, built once by [`app`]
//! - [`issue`]: the issue rule (admission, append, idempotency, pending)
//! - [`waiters`]: long polls woken by the worker's decisions
//! - [`identity`]: who the user of a request is (a JWT, a gateway's header,
//!   or the body on a trusted network)
//! - [`connections`]: the accept loop and what each connection may hold
//! - [`metrics`]: what `/metrics` shows
//! - [`config`], [`error`]: flags and environment variables; the one error
//!   type and its JSON shape

pub mod app;
pub mod config;
pub mod connections;
pub mod error;
pub mod http;
pub mod identity;
pub mod issue;
pub mod metrics;
pub mod services;
pub mod waiters;

pub use app::Application;
pub use config::IngressConfig;
