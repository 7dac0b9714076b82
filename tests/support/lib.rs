//! Harness of the end-to-end tests: reads the local stack's settings, gives
//! every test its own topics, consumer group, Redis key prefix and coupon ids,
//! and runs the ingress and the worker in-process on those.
//!
//! Tests never skip: when the stack is not up they fail and say how to start it.
//!
//! # Layout
//! - [`env`]: the stack's settings and a test's own names ([`TestEnv`])
//! - [`spawn`]: the binaries, in process or as children ([`Running`])
//! - [`client`]: HTTP to an ingress, and scrapes of `/metrics`
//! - [`proxy`]: a TCP proxy a test can cut
//! - [`topic`]: reading a topic back
//! - [`promise`]: the promise, checked with the oracle
//! - [`stream`]: the decision stream, read back and checked with the ledger,
//!   and the operator on call who aborts what Kafka left hanging
//! - [`load`]: clients that make load, and sales
//! - [`hostile`]: clients that behave as attackers do (hang up, send slowly)
//! - [`tokens`]: signed user tokens and their JWKS, for the verified identity
//! - [`services`]: private Postgres, Redis and Kafka a test may own
//! - [`sources`]: the workspace's own source files, for tests that read code

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use firstcome::config::CommonConfig;
use firstcome_ingress::{Application, IngressConfig};
use firstcome_worker::{Worker, WorkerConfig};
use rdkafka::message::Message;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod client;
pub mod env;
pub mod hostile;
pub mod load;
pub mod promise;
pub mod proxy;
pub mod services;
pub mod sources;
pub mod spawn;
pub mod stream;
pub mod tokens;
pub mod topic;

pub use client::*;
pub use env::*;
pub use load::*;
pub use promise::*;
pub use proxy::*;
pub use spawn::*;
pub use stream::*;
pub use topic::*;
