//! The domain of firstcome, shared by the ingress and the worker.
//!
//! # Layout
//! - [`ids`]: validated `CouponId`, `UserId`, `RequestId`
//! - [`record`]: the Kafka record and the request statuses
//! - [`redis_conn`]: one connection type for a single Redis or Redis Cluster
//! - [`state`]: the coupon states in Redis, the Lua scripts and [`state::CouponState`]
//! - [`status`]: the request-status cache in Redis, [`status::StatusCache`]
//! - [`db`]: Postgres, the system of record, and its migrations
//! - [`rebuild`]: a coupon's Redis state built from Postgres
//! - [`kafka`]: client settings every producer and consumer starts from
//! - [`config`]: connection settings both binaries share, a plain struct;
//!   [`cli`] (feature `cli`): its flags, the one module that knows clap
//! - [`metrics`], [`ops`]: Prometheus metric names and the operations port
//! - [`oracle`]: the first-come rule as a pure function of the log, which
//!   the tests, the soak and the benchmark check against
//! - [`time`]: timestamps written as chrono writes them, for less; `json`:
//!   the record and the status written as serde_json writes them, for less
//! - [`telemetry`], [`shutdown`]: process plumbing

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod db;
pub mod decision;
pub mod ids;
mod json;
pub mod kafka;
pub mod keys;
pub mod metrics;
pub mod ops;
pub mod oracle;
pub mod rebuild;
pub mod record;
pub mod redis_conn;
pub mod shutdown;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod time;

pub use ids::{CouponId, RequestId, UserId};
pub use record::{IssueRequest, Status};
