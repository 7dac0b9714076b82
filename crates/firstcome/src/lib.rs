//! The domain of firstcome, shared by the ingress and the worker.
//!
//! # Layout
//! - [`ids`]: validated `CouponId`, `UserId`, `RequestId`
//! - [`record`]: the Kafka record and the request statuses
//! - [`redis_conn`]: one connection type for a single Redis or Redis Cluster
//! - [`state`]: the Redis state, the decision Lua script and its wrapper
//! - [`db`]: Postgres, the system of record, and its migrations
//! - [`rebuild`]: a coupon's Redis state built from Postgres
//! - [`kafka`]: client settings every producer and consumer starts from
//! - [`config`]: connection settings both binaries share
//! - [`metrics`], [`ops`]: Prometheus metrics and the operations port
//! - [`telemetry`], [`shutdown`]: process plumbing

pub mod config;
pub mod db;
pub mod ids;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod rebuild;
pub mod record;
pub mod redis_conn;
pub mod shutdown;
pub mod state;
pub mod telemetry;

pub use ids::{CouponId, RequestId, UserId};
pub use record::{IssueRequest, Status};
