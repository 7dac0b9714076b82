//! The scenarios. Each takes a [`Size`] (full run or smoke) and returns what
//! it measured; none asserts a speed. One module per kind; what they share
//! (sizes, rates, producing a backlog, Redis's figures) is here.

mod drain;
mod http;
mod raw;
mod sale;
mod seed;

pub use drain::*;
pub use http::*;
pub use raw::*;
pub use sale::*;
pub use seed::*;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, SubsecRound, Utc};
use firstcome::db::{self, Decided, TakenOn};
use firstcome::oracle;
use firstcome::state::{self, CouponSnapshot, Decision, Keys, Verdict};
use firstcome::{CouponId, IssueRequest, RequestId, Status, UserId};
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::json;

use crate::env::BenchEnv;
use crate::load::{self, Latency, Outcome, Step};
use crate::procs;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Seconds per load step.
    pub step: Duration,
    /// Arrival rates tried, in order, until saturation.
    pub rates: &'static [f64],
    /// Steps that then halve the gap between the last rate kept up with
    /// and the first one that was not.
    pub refine: usize,
    /// Records of the raw producer, drain and rows of raw-pg.
    pub records: usize,
    /// Requests of the flash sale and the seed baseline.
    pub sale_requests: u64,
    /// Concurrent clients of the flash sale and the seed baseline.
    pub sale_clients: usize,
}

impl Size {
    /// A full run.
    pub const FULL: Size = Size {
        step: Duration::from_secs(5),
        rates: &[
            1_000.0, 2_000.0, 4_000.0, 8_000.0, 12_000.0, 16_000.0, 20_000.0, 24_000.0, 28_000.0,
            32_000.0, 40_000.0, 50_000.0, 60_000.0, 70_000.0, 80_000.0, 100_000.0,
        ],
        refine: 2,
        records: 100_000,
        sale_requests: 30_000,
        sale_clients: 256,
    };
    /// Seconds per scenario, so the tool never rots.
    pub const SMOKE: Size = Size {
        step: Duration::from_millis(500),
        rates: &[200.0],
        refine: 0,
        records: 600,
        sale_requests: 300,
        sale_clients: 16,
    };
}

pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .expect("an HTTP client")
}

pub(crate) fn issue(
    http: &reqwest::Client,
    base: &str,
    coupon: &str,
    user: String,
) -> impl std::future::Future<Output = Outcome> + Send + use<> {
    let request = http
        .post(format!("{base}/v1/coupons/{coupon}/issue"))
        .json(&json!({ "user_id": user }));
    async move {
        match request.send().await {
            Ok(r) if r.status().is_success() => Outcome::Ok,
            _ => Outcome::Error,
        }
    }
}

/// Creates a coupon of `stock` units through the ingress, as the admin.
pub(crate) async fn create_coupon(
    http: &reqwest::Client,
    base: &str,
    env: &BenchEnv,
    id: &str,
    stock: i64,
) -> anyhow::Result<()> {
    let r = http
        .post(format!("{base}/v1/coupons"))
        .bearer_auth(&env.admin_token)
        .json(&json!({ "coupon_id": id, "name": id, "total_stock": stock }))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "creating coupon {id}: {}", r.status());
    Ok(())
}

/// A throughput figure.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    /// Units done.
    pub count: u64,
    /// Seconds taken.
    pub seconds: f64,
    /// Units per second.
    pub per_s: f64,
}

impl Rate {
    fn new(count: u64, since: Instant) -> Self {
        let seconds = since.elapsed().as_secs_f64();
        Self {
            count,
            seconds,
            per_s: count as f64 / seconds,
        }
    }
}

pub(crate) fn request(coupon: &CouponId, user: String) -> IssueRequest {
    IssueRequest {
        request_id: RequestId::new(),
        coupon_id: coupon.clone(),
        user_id: UserId::parse(user).expect("a valid user id"),
        accepted_at: Utc::now().trunc_subsecs(6),
    }
}

pub(crate) fn producer(env: &BenchEnv) -> anyhow::Result<FutureProducer> {
    // The ingress's settings (`FIRSTCOME_PRODUCE_LINGER` default 2).
    Ok(firstcome::kafka::producer_config(
        &env.common(),
        Duration::from_secs(30),
        Duration::from_millis(2),
    )?
    .create()?)
}

/// Writes `records` to the request topic with at most 10,000 in flight.
pub(crate) async fn produce(
    producer: &FutureProducer,
    topic: &str,
    records: Vec<IssueRequest>,
) -> anyhow::Result<()> {
    let mut sends = futures::stream::iter(records.into_iter().map(|r| {
        let producer = producer.clone();
        let topic = topic.to_owned();
        async move {
            let payload = r.to_json();
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(r.coupon_id.as_str())
                        .payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::Error::new(e))
        }
    }))
    .buffer_unordered(10_000);
    while let Some(r) = sends.next().await {
        r?;
    }
    Ok(())
}

pub(crate) async fn bench_coupon(pool: &sqlx::PgPool, id: &str, stock: i32) -> anyhow::Result<()> {
    let inserted = db::insert_coupon(
        pool,
        &db::Coupon {
            coupon_id: CouponId::parse(id)?,
            name: id.to_owned(),
            total_stock: stock,
            starts_at: None,
            ends_at: None,
        },
    )
    .await?;
    anyhow::ensure!(inserted, "coupon {id} exists already");
    Ok(())
}

/// Redis's `used_memory` (of a cluster, every node's together).
pub(crate) async fn redis_used_bytes(env: &BenchEnv) -> anyhow::Result<u64> {
    Ok(redis_info(env, "memory", "used_memory:")
        .await?
        .iter()
        .sum())
}

/// The pids of Redis's servers (of a cluster, every node's), for their CPU.
pub(crate) async fn redis_pids(env: &BenchEnv) -> anyhow::Result<Vec<u32>> {
    let pids = redis_info(env, "server", "process_id:").await?;
    Ok(pids.into_iter().map(|p| p as u32).collect())
}

/// A numeric field of `INFO section` of each node of `env`'s Redis.
async fn redis_info(env: &BenchEnv, section: &str, field: &str) -> anyhow::Result<Vec<u64>> {
    // A cluster's seed nodes are all its nodes here (the stack's).
    let mut values = Vec::new();
    for url in env.redis_url.split(',') {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await?;
        values.push(
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .with_context(|| format!("no {field} in INFO {section}"))?,
        );
    }
    Ok(values)
}
