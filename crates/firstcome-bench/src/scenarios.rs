//! The scenarios. Each takes a [`Size`] (full run or smoke) and returns what
//! it measured; none asserts a speed.

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

/// An HTTP endpoint driven up to saturation.
#[derive(Debug, Clone, Serialize)]
pub struct HttpCurve {
    /// Every step, in order of rate.
    pub steps: Vec<Step>,
    /// The highest accepted rate of a step that kept up (≥ 95 % of the
    /// offered rate answered as wanted, p99 under a second).
    pub sustained_per_s: f64,
    /// A step at 80 % of the sustained rate.
    pub at_80_percent: Option<Step>,
    /// Peak RSS of a fresh server process through warm-up and the step at
    /// 80 %, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Peak RSS up to and through the overload step, MiB.
    pub overload_peak_rss_mib: Option<f64>,
    /// CPU time of the server process per answered request in the step at
    /// 80 %, microseconds: what one request costs, whatever else shares the
    /// machine.
    pub cpu_us_per_request: Option<f64>,
    /// The Kafka broker over the step at 80 %.
    pub broker: Option<procs::BrokerUsage>,
}

fn kept_up(s: &Step) -> bool {
    s.ok as f64 >= 0.95 * s.sent as f64 && s.latency.p99_ms < 1_000.0
}

/// Warm-up load, not reported: connections, the producer's metadata, caches.
async fn warm_up(http: &reqwest::Client, base: &str, coupon: &str, size: Size) {
    let (h, b, c) = (http.clone(), base.to_owned(), coupon.to_owned());
    let warm = load::open(size.rates[0].min(500.0), size.step, move |i| {
        issue(&h, &b, &c, format!("w{i}"))
    })
    .await;
    tracing::info!(p99_ms = warm.latency.p99_ms, "warm-up");
}

/// Steps up to saturation on the server `start` gives, then the step at
/// 80 % of the sustained rate on a fresh one (an overloaded process keeps
/// its queues and memory for a while, which is not what 80 % looks like).
async fn curve<F, Fut>(coupon: &str, size: Size, start: F) -> anyhow::Result<HttpCurve>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<procs::Proc>>,
{
    let http = http();
    let server = start().await?;
    let base = format!("http://{}", server.addr.expect("it listens"));
    warm_up(&http, &base, coupon, size).await;
    let mut steps = Vec::new();
    let mut sustained: f64 = 0.0;
    let mut offset = 0u64;
    let mut step_at = async |rate: f64, steps: &mut Vec<Step>| {
        let (h, b, c, off) = (http.clone(), base.clone(), coupon.to_owned(), offset);
        let step = load::open(rate, size.step, move |i| {
            issue(&h, &b, &c, format!("u{}", off + i))
        })
        .await;
        offset += step.sent;
        tracing::info!(
            rate,
            ok_per_s = step.ok_per_s,
            p99_ms = step.latency.p99_ms,
            "step"
        );
        let ok = kept_up(&step);
        let ok_per_s = step.ok_per_s;
        steps.push(step);
        ok.then_some(ok_per_s)
    };
    // Up the ladder until a step fails, then halve the gap between the last
    // step that kept up and the one that did not, `size.refine` times: the
    // ladder's steps are 4,000/s apart near the top, too coarse for a ratio.
    let (mut kept, mut failed) = (0.0, None);
    for &rate in size.rates {
        match step_at(rate, &mut steps).await {
            Some(ok_per_s) => {
                sustained = sustained.max(ok_per_s);
                kept = rate;
            }
            None => {
                failed = Some(rate);
                break;
            }
        }
    }
    if let Some(mut failed) = failed.filter(|_| kept > 0.0) {
        for _ in 0..size.refine {
            let rate = ((kept + failed) / 2.0 / 100.0).round() * 100.0;
            match step_at(rate, &mut steps).await {
                Some(ok_per_s) => {
                    sustained = sustained.max(ok_per_s);
                    kept = rate;
                }
                None => failed = rate,
            }
        }
    }
    steps.sort_by(|a, b| a.offered_per_s.total_cmp(&b.offered_per_s));
    let overload_peak_rss_mib = server.peak_rss_mib();
    server.stop().await;
    if sustained == 0.0 {
        return Ok(HttpCurve {
            steps,
            sustained_per_s: 0.0,
            at_80_percent: None,
            peak_rss_mib: None,
            overload_peak_rss_mib,
            cpu_us_per_request: None,
            broker: None,
        });
    }
    let server = start().await?;
    let base = format!("http://{}", server.addr.expect("it listens"));
    warm_up(&http, &base, coupon, size).await;
    let (h, b, c, off) = (http.clone(), base.clone(), coupon.to_owned(), offset);
    let cpu_before = server.cpu_seconds();
    let broker = procs::BrokerMeter::start();
    let at_80 = load::open(0.8 * sustained, size.step, move |i| {
        issue(&h, &b, &c, format!("v{}", off + i))
    })
    .await;
    let broker = broker.and_then(|m| m.finish(at_80.ok));
    let cpu_us_per_request = match (cpu_before, server.cpu_seconds()) {
        (Some(a), Some(b)) if at_80.ok > 0 => Some((b - a) * 1e6 / at_80.ok as f64),
        _ => None,
    };
    let peak_rss_mib = server.peak_rss_mib();
    server.stop().await;
    Ok(HttpCurve {
        steps,
        sustained_per_s: sustained,
        at_80_percent: Some(at_80),
        peak_rss_mib,
        overload_peak_rss_mib,
        cpu_us_per_request,
        broker,
    })
}

/// `raw-http`: the bare handler.
pub async fn raw_http(size: Size) -> anyhow::Result<HttpCurve> {
    let env = BenchEnv::new("rawhttp").await?;
    curve("c", size, || procs::own_server(&env, "serve-raw-http")).await
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

/// `ingress`: the real ingress, to the broker.
pub async fn ingress(size: Size) -> anyhow::Result<HttpCurve> {
    let env = BenchEnv::new("ingress").await?;
    let coupon = env.coupon("hot");
    let pool = env.common().connect_postgres().await?;
    bench_coupon(&pool, &coupon, 1_000_000).await?;
    curve(&coupon, size, || procs::ingress(&env)).await
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

/// `raw-produce`: the producer alone, the ingress's settings and payloads.
pub async fn raw_produce(size: Size) -> anyhow::Result<Rate> {
    let env = BenchEnv::new("rawprod").await?;
    let coupon = CouponId::parse(env.coupon("hot"))?;
    let records: Vec<IssueRequest> = (0..size.records)
        .map(|i| request(&coupon, format!("u{i}")))
        .collect();
    let producer = producer(&env)?;
    let since = Instant::now();
    produce(&producer, &env.request_topic, records).await?;
    Ok(Rate::new(size.records as u64, since))
}

/// `raw-consume`: a plain consumer reading a backlog, once spread over every
/// partition and once all in one partition (one hot coupon, the drain's
/// case): the broker's fetch ceilings.
pub async fn raw_consume(size: Size) -> anyhow::Result<(Rate, Rate)> {
    let spread = consume_backlog("rawcons", crate::env::PARTITIONS as usize * 2, size).await?;
    let one = consume_backlog("rawhot", 1, size).await?;
    Ok((spread, one))
}

/// Produces `size.records` requests over `coupons` coupons of a fresh topic,
/// then times a consumer reading them all.
async fn consume_backlog(name: &str, coupons: usize, size: Size) -> anyhow::Result<Rate> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let env = BenchEnv::new(name).await?;
    let coupons: Vec<CouponId> = (0..coupons)
        .map(|i| CouponId::parse(env.coupon(&format!("c{i}"))))
        .collect::<Result<_, _>>()?;
    let records: Vec<IssueRequest> = (0..size.records)
        .map(|i| request(&coupons[i % coupons.len()], format!("u{i}")))
        .collect();
    produce(&producer(&env)?, &env.request_topic, records).await?;
    let consumer: StreamConsumer = firstcome::kafka::client_config(&env.common())?
        .set("group.id", &env.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..crate::env::PARTITIONS {
        tpl.add_partition_offset(&env.request_topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let since = Instant::now();
    let mut read = 0u64;
    while read < size.records as u64 {
        tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("no record for 60 s")??;
        read += 1;
    }
    Ok(Rate::new(read, since))
}

/// Requests per Lua call in `raw-redis` (the worker's default batch).
const LUA_BATCH: usize = 500;

/// `raw-redis`: the decision script alone, 500 requests a call, 4 calls in
/// flight, every request a new user (the costliest path: SADD + HSET).
pub async fn raw_redis(size: Size) -> anyhow::Result<Rate> {
    let env = BenchEnv::new("rawredis").await?;
    let client = redis::Client::open(env.redis_url.as_str())?;
    let conn = client.get_multiplexed_async_connection().await?;
    let keys = Keys::new(env.prefix.clone())?;
    let coupon = CouponId::parse(env.coupon("hot"))?;
    let ck = keys.coupon(&coupon);
    let snapshot = CouponSnapshot {
        epoch: 1,
        seq: 0,
        total_stock: 1_000_000_000,
        starts_at: None,
        ends_at: None,
        issued_users: vec![],
        decisions: vec![],
    };
    state::install(&mut conn.clone(), &ck, &snapshot).await?;
    let calls = size.records.div_ceil(LUA_BATCH);
    let batches: Vec<Vec<IssueRequest>> = (0..calls)
        .map(|c| {
            (0..LUA_BATCH)
                .map(|i| request(&coupon, format!("u{c}x{i}")))
                .collect()
        })
        .collect();
    let since = Instant::now();
    let mut done = futures::stream::iter(batches.iter().map(|batch| {
        let (mut conn, ck) = (conn.clone(), ck.clone());
        async move {
            let refs: Vec<&IssueRequest> = batch.iter().collect();
            match state::decide(&mut conn, &ck, &refs, Utc::now()).await? {
                Verdict::Decided(d) => Ok(d.decisions.len()),
                other => anyhow::bail!("unexpected verdict {other:?}"),
            }
        }
    }))
    .buffer_unordered(4);
    let mut decided = 0u64;
    while let Some(n) = done.next().await {
        decided += n? as u64;
    }
    let rate = Rate::new(decided, since);
    let _: () = redis::cmd("DEL")
        .arg(&ck.meta)
        .arg(&ck.stock)
        .arg(&ck.users)
        .arg(&ck.decided)
        .query_async(&mut conn.clone())
        .await?;
    Ok(rate)
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

/// `raw-pg`: the worker's statement alone: batches of 500 issued decisions
/// of one coupon, fenced, one after another (as one partition is stored).
pub async fn raw_pg(size: Size) -> anyhow::Result<Rate> {
    let env = BenchEnv::new("rawpg").await?;
    let pool = env.common().connect_postgres().await?;
    let coupon = CouponId::parse(env.coupon("hot"))?;
    bench_coupon(&pool, coupon.as_str(), 2_000_000_000).await?;
    let requests: Vec<IssueRequest> = (0..size.records)
        .map(|i| request(&coupon, format!("u{i}")))
        .collect();
    let now = Utc::now().trunc_subsecs(6);
    let since = Instant::now();
    for (b, chunk) in requests.chunks(LUA_BATCH).enumerate() {
        let batch: Vec<Decided<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let n = (b * LUA_BATCH + i) as i64;
                Decided {
                    request: r,
                    decision: Decision {
                        status: Status::Issued,
                        decided_at: now,
                    },
                    partition: 0,
                    offset: n,
                    taken_on: Some(TakenOn {
                        epoch: 0,
                        seq: n + 1,
                    }),
                }
            })
            .collect();
        let refused = db::persist(&pool, &batch).await?;
        anyhow::ensure!(refused.is_empty(), "the fence refused a raw batch");
    }
    Ok(Rate::new(size.records as u64, since))
}

/// `drain`: a backlog decided and stored by one worker.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// Every record, from the first ledger row to the last.
    pub all: Rate,
    /// The hot coupon's records alone.
    pub hot: Rate,
    /// Wall time from starting the worker (group join included).
    pub wall_seconds: f64,
    /// Accept→decide latency from the ledger (mostly time in the backlog).
    pub accept_to_decide: Latency,
    /// Peak RSS of the worker, MiB.
    pub worker_peak_rss_mib: Option<f64>,
    /// The Kafka broker from the worker's start to the last decision.
    pub broker: Option<procs::BrokerUsage>,
}

/// Ledger spans of `coupons`: (count, first decided_at, last decided_at).
async fn ledger_span(
    pool: &sqlx::PgPool,
    coupons: &[String],
) -> anyhow::Result<(i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    Ok(sqlx::query_as("SELECT count(*), min(decided_at), max(decided_at) FROM request_ledger WHERE coupon_id = ANY($1)")
        .bind(coupons)
        .fetch_one(pool)
        .await?)
}

pub(crate) async fn wait_ledger(
    pool: &sqlx::PgPool,
    coupons: &[String],
    n: i64,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (count, _, _) = ledger_span(pool, coupons).await?;
        if count >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {count} of {n} decided after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn latency_from_ledger(pool: &sqlx::PgPool, coupons: &[String]) -> anyhow::Result<Latency> {
    let micros: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM decided_at - accepted_at) * 1e6)::bigint FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(coupons)
    .fetch_all(pool)
    .await?;
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    for m in micros {
        h.saturating_record(m.max(1) as u64);
    }
    Ok(Latency::of(&h))
}

/// `drain`: one hot coupon with most of the traffic and a tail of 20.
pub async fn drain(size: Size) -> anyhow::Result<Drain> {
    drain_with(size, false).await
}

/// `drain-stream`: the drain with the decision stream on (every decision
/// read back and published in the worker's transactions).
pub async fn drain_stream(size: Size) -> anyhow::Result<Drain> {
    drain_with(size, true).await
}

async fn drain_with(size: Size, stream: bool) -> anyhow::Result<Drain> {
    let env = BenchEnv::new(if stream { "dstream" } else { "drain" }).await?;
    let pool = env.common().connect_postgres().await?;
    let hot = env.coupon("hot");
    bench_coupon(&pool, &hot, 1_000).await?;
    let tail: Vec<String> = (0..20).map(|i| env.coupon(&format!("t{i}"))).collect();
    for t in &tail {
        bench_coupon(&pool, t, 50).await?;
    }
    let (hot_id, tail_ids): (CouponId, Vec<CouponId>) = (
        CouponId::parse(hot.clone())?,
        tail.iter()
            .map(|t| CouponId::parse(t.clone()))
            .collect::<Result<_, _>>()?,
    );
    let records: Vec<IssueRequest> = (0..size.records)
        .map(|i| {
            let coupon = if i % 5 == 4 {
                &tail_ids[(i / 5) % tail_ids.len()]
            } else {
                &hot_id
            };
            request(coupon, format!("u{}", (i * 7_919) % 50_000))
        })
        .collect();
    let hot_count = records.iter().filter(|r| r.coupon_id == hot_id).count() as i64;
    produce(&producer(&env)?, &env.request_topic, records).await?;

    let started = Instant::now();
    let broker = procs::BrokerMeter::start();
    let worker = procs::worker_with(
        &env,
        &[(
            "FIRSTCOME_DECISION_STREAM",
            if stream { "true" } else { "false" },
        )],
    )?;
    let mut all: Vec<String> = tail.clone();
    all.push(hot.clone());
    // Decision times are per batch, too coarse for a rate: time the ledger
    // filling up instead, from its first row to its last.
    let (mut first_row, mut hot_done) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let (count, _, _) = ledger_span(&pool, &all).await?;
        let now = Instant::now();
        if count > 0 && first_row.is_none() {
            first_row = Some(now);
        }
        if hot_done.is_none() {
            let (h, _, _) = ledger_span(&pool, std::slice::from_ref(&hot)).await?;
            if h >= hot_count {
                hot_done = Some(now);
            }
        }
        if count >= size.records as i64 && hot_done.is_some() {
            break now;
        }
        anyhow::ensure!(
            now < deadline,
            "only {count} of {} decided after 10 min",
            size.records
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    let broker = broker.and_then(|m| m.finish(size.records as u64));
    let worker_peak_rss_mib = worker.peak_rss_mib();
    worker.stop().await;
    let first = first_row.expect("rows were seen");
    let rate = |count: i64, end: Instant| {
        let seconds = (end - first).as_secs_f64().max(1e-3);
        Rate {
            count: count as u64,
            seconds,
            per_s: count as f64 / seconds,
        }
    };
    Ok(Drain {
        all: rate(size.records as i64, done),
        hot: rate(hot_count, hot_done.expect("the hot coupon was done")),
        wall_seconds,
        accept_to_decide: latency_from_ledger(&pool, &all).await?,
        worker_peak_rss_mib,
        broker,
    })
}

/// The coupons of a sale: (name, stock).
pub(crate) const SALE: [(&str, i64); 3] = [("a", 100), ("b", 300), ("c", 600)];

/// The user of the sale's request `i`, of `users`: fewer users than
/// requests, so many press more than once.
fn sale_user(i: u64, users: u64) -> String {
    format!("u{}", (i * 7_919) % users)
}

/// `flash-sale`: the whole path.
#[derive(Debug, Clone, Serialize)]
pub struct FlashSale {
    /// The burst at the ingress (202s and 409s).
    pub burst: Step,
    /// Requests answered `409 sold_out` at once by the ingress's
    /// short-circuit, never appended.
    pub short_circuited: u64,
    /// Requests per second until every request was final.
    pub end_to_end_per_s: f64,
    /// From the first request until the last unit was issued, seconds.
    pub sold_out_after_s: f64,
    /// From the first request until every request was decided, seconds.
    pub all_final_after_s: f64,
    /// Decisions that differ from the log order (must be 0).
    pub violations: u64,
    /// Requests decided, by status.
    pub statuses: HashMap<String, u64>,
    /// Peak RSS of the ingress (the largest replica's), MiB.
    pub ingress_peak_rss_mib: Option<f64>,
    /// Peak RSS of the worker (the largest replica's), MiB.
    pub worker_peak_rss_mib: Option<f64>,
    /// The ingresses' CPU time per request of the burst, microseconds.
    pub ingress_cpu_us_per_request: Option<f64>,
    /// The workers' CPU time per appended request, microseconds.
    pub worker_cpu_us_per_record: Option<f64>,
    /// What Redis holds more after the sale than before it, MiB.
    pub redis_added_mib: f64,
    /// The broker (or brokers) from the burst's start to every request
    /// final, per request of the burst.
    pub broker: Option<procs::BrokerUsage>,
    /// Postgres's CPU time over the same window per request, microseconds.
    pub pg_cpu_us_per_request: f64,
    /// Redis's CPU time (every node's) over the same window per request.
    pub redis_cpu_us_per_request: f64,
}

/// `flash-sale`: many users, three coupons, stock far below demand, all at once.
pub async fn flash_sale(size: Size) -> anyhow::Result<FlashSale> {
    let n = size.sale_requests;
    sale("sale", &SALE, n, (n / 2).max(1), size.sale_clients).await
}

/// One huge sale's requests, users and stock (full run; smoke a
/// thousandth of them).
const HUGE: (u64, u64, i64) = (1_000_000, 600_000, 100_000);

/// `huge-sale`: one coupon of stock 100,000, a million requests from
/// 600,000 users, all at once (a closed burst: as fast as the ingress takes
/// them).
pub async fn huge_sale(size: Size, smoke: bool) -> anyhow::Result<FlashSale> {
    let scale = if smoke { 1_000 } else { 1 };
    let (requests, users, stock) = (HUGE.0 / scale, HUGE.1 / scale, HUGE.2 / scale as i64);
    sale(
        "huge",
        &[("huge", stock)],
        requests,
        users,
        size.sale_clients,
    )
    .await
}

/// A sale of `requests` over `coupons` (name, stock) round robin, from
/// `users` users (request `i`'s is a fixed spread of `i`, so many press
/// more than once), by `clients` clients at once.
async fn sale(
    scenario: &str,
    coupons: &[(&str, i64)],
    n: u64,
    users: u64,
    clients: usize,
) -> anyhow::Result<FlashSale> {
    let env = BenchEnv::new(scenario).await?;
    sale_on(env, Placement::single(), coupons, n, users, clients).await
}

/// How many of each process a sale runs, and the brokers it measures.
pub struct Placement {
    /// Ingress replicas; the clients spread over them round robin.
    pub ingresses: usize,
    /// Worker replicas, one consumer group.
    pub workers: usize,
    /// The brokers' pids (none: the bench's broker, if known).
    pub broker_pids: Vec<u32>,
}

impl Placement {
    /// One ingress and one worker on the bench's broker.
    pub fn single() -> Self {
        Self {
            ingresses: 1,
            workers: 1,
            broker_pids: Vec::new(),
        }
    }
}

/// [`sale`] on `env`'s services with `placement`'s processes.
pub async fn sale_on(
    env: BenchEnv,
    placement: Placement,
    coupons: &[(&str, i64)],
    n: u64,
    users: u64,
    clients: usize,
) -> anyhow::Result<FlashSale> {
    let pool = env.common().connect_postgres().await?;
    let mut ingresses = Vec::new();
    for _ in 0..placement.ingresses {
        ingresses.push(procs::ingress(&env).await?);
    }
    let workers: Vec<procs::Proc> = (0..placement.workers)
        .map(|_| procs::worker(&env))
        .collect::<anyhow::Result<_>>()?;
    let bases: Vec<String> = ingresses
        .iter()
        .map(|i| format!("http://{}", i.addr.expect("it listens")))
        .collect();
    let base = bases[0].clone();
    let http = http();
    // Warm up: one request decided means the worker has joined its group.
    let warm = env.coupon("warmup");
    create_coupon(&http, &base, &env, &warm, 1).await?;
    let r: serde_json::Value = http
        .post(format!("{base}/v1/coupons/{warm}/issue"))
        .json(&json!({"user_id": "w"}))
        .send()
        .await?
        .json()
        .await?;
    let warm_id = r["request_id"]
        .as_str()
        .context("warm-up request id")?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s: serde_json::Value = http
            .get(format!("{base}/v1/issue-requests/{warm_id}"))
            .send()
            .await?
            .json()
            .await?;
        if s["status"] == "issued" {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker never decided the warm-up request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let coupons: Vec<(String, i64)> = coupons.iter().map(|(n, s)| (env.coupon(n), *s)).collect();
    for (id, stock) in &coupons {
        create_coupon(&http, &base, &env, id, *stock).await?;
    }
    let ids: Vec<String> = coupons.iter().map(|(c, _)| c.clone()).collect();
    let redis_before = redis_used_bytes(&env).await?;
    let (pg_cpu, redis_cpu) = (
        procs::CpuMeter::postgres(),
        procs::CpuMeter::pids(redis_pids(&env).await?),
    );
    let cpu = |procs: &[procs::Proc]| procs.iter().map(procs::Proc::cpu_seconds).sum();
    let cpu_before: (Option<f64>, Option<f64>) = (cpu(&ingresses), cpu(&workers));
    let broker = if placement.broker_pids.is_empty() {
        procs::BrokerMeter::start()
    } else {
        procs::BrokerMeter::of(placement.broker_pids.clone())
    };
    let t0 = Utc::now();
    let (h, bs, cs) = (http.clone(), bases.clone(), ids.clone());
    let short = Arc::new(AtomicU64::new(0));
    let counted = short.clone();
    let burst = load::closed(clients, n, move |i| {
        let request = h
            .post(format!(
                "{}/v1/coupons/{}/issue",
                bs[(i % bs.len() as u64) as usize],
                cs[(i % cs.len() as u64) as usize]
            ))
            .json(&json!({ "user_id": sale_user(i, users) }));
        let counted = counted.clone();
        async move {
            match request.send().await.map(|r| r.status().as_u16()) {
                Ok(202) => Outcome::Ok,
                // Final at once: sold out, never appended.
                Ok(409) => {
                    counted.fetch_add(1, Ordering::Relaxed);
                    Outcome::Ok
                }
                _ => Outcome::Error,
            }
        }
    })
    .await;
    let burst_end = t0 + chrono::Duration::microseconds((burst.seconds * 1e6) as i64);
    anyhow::ensure!(
        burst.errors == 0,
        "{} requests of the burst failed",
        burst.errors
    );
    let short_circuited = short.load(Ordering::Relaxed);
    let appended = n - short_circuited;
    wait_ledger(&pool, &ids, appended as i64, Duration::from_secs(600)).await?;
    let (_, _, last) = ledger_span(&pool, &ids).await?;
    // Every request is final once the last appended one is decided and the
    // last 409 was answered.
    let last = last.map(|l| l.max(burst_end));
    let sold_out: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(decided_at) FROM request_ledger WHERE coupon_id = ANY($1) AND status = 'issued'")
            .bind(&ids)
            .fetch_one(&pool)
            .await?;
    let secs = |t: Option<DateTime<Utc>>| {
        t.map_or(f64::NAN, |t| {
            (t - t0).num_microseconds().unwrap_or(0) as f64 / 1e6
        })
    };
    let all_final_after_s = secs(last);
    let broker = broker.and_then(|b| b.finish(n));
    let (pg_cpu_us_per_request, redis_cpu_us_per_request) = (pg_cpu.us_per(n), redis_cpu.us_per(n));
    let (violations, statuses) = check_promise(&env, &pool, &coupons).await?;
    let peak = |procs: &[procs::Proc]| {
        procs
            .iter()
            .filter_map(procs::Proc::peak_rss_mib)
            .reduce(f64::max)
    };
    let (ingress_peak_rss_mib, worker_peak_rss_mib) = (peak(&ingresses), peak(&workers));
    let per = |before: Option<f64>, after: Option<f64>, items: u64| {
        before
            .zip(after)
            .map(|(b, a)| (a - b) * 1e6 / items.max(1) as f64)
    };
    let ingress_cpu_us_per_request = per(cpu_before.0, cpu(&ingresses), n);
    let worker_cpu_us_per_record = per(cpu_before.1, cpu(&workers), appended);
    let redis_added_mib =
        redis_used_bytes(&env).await?.saturating_sub(redis_before) as f64 / 1024.0 / 1024.0;
    for w in workers {
        w.stop().await;
    }
    for i in ingresses {
        i.stop().await;
    }
    Ok(FlashSale {
        broker,
        pg_cpu_us_per_request,
        redis_cpu_us_per_request,
        ingress_cpu_us_per_request,
        worker_cpu_us_per_record,
        redis_added_mib,
        burst,
        short_circuited,
        end_to_end_per_s: n as f64 / all_final_after_s,
        sold_out_after_s: secs(sold_out),
        all_final_after_s,
        violations,
        statuses,
        ingress_peak_rss_mib,
        worker_peak_rss_mib,
    })
}

/// Replays the request log per coupon and counts the ledger statuses that
/// differ from what the log order implies (issued while stock lasts for each
/// new user, duplicate for a holder, sold out after), and holders twice.
async fn check_promise(
    env: &BenchEnv,
    pool: &sqlx::PgPool,
    coupons: &[(String, i64)],
) -> anyhow::Result<(u64, HashMap<String, u64>)> {
    let common = env.common();
    let log = tokio::task::spawn_blocking(move || {
        firstcome::kafka::read_topic(&common, &common.request_topic, Duration::from_secs(120))
    })
    .await??;
    let rules: HashMap<String, oracle::Rules> = coupons
        .iter()
        .map(|(c, s)| (c.clone(), oracle::Rules::stock(*s)))
        .collect();
    let log = log.iter().map(|m| {
        use rdkafka::message::Message;
        oracle::Logged {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
        }
    });
    let expected = oracle::replay(log, &HashMap::new(), &rules).expected;
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT request_id, status FROM request_ledger WHERE coupon_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    let mut statuses: HashMap<String, u64> = HashMap::new();
    let mut violations = 0u64;
    for (id, status) in &rows {
        *statuses.entry(status.clone()).or_default() += 1;
        if expected.get(&id.to_string()).map(|e| e.0) != Some(status.as_str()) {
            violations += 1;
        }
    }
    violations += expected.len().abs_diff(rows.len()) as u64;
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM user_coupon WHERE coupon_id = ANY($1) GROUP BY coupon_id, user_id HAVING count(*) > 1) t",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    Ok((violations + twice as u64, statuses))
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

/// `seed-baseline`: the report's design behind the same burst.
#[derive(Debug, Clone, Serialize)]
pub struct Seed {
    /// The burst, answered directly.
    pub burst: Step,
    /// Requests answered per second.
    pub per_s: f64,
    /// Later requests issued while an earlier one was told sold out, counted
    /// as sold-out requests that arrived before some issued one.
    pub first_come_violations: u64,
    /// Rows its asynchronous writes stored (of `burst.ok` answered).
    pub rows_stored: u64,
    /// Answers by status.
    pub statuses: HashMap<String, u64>,
}

/// `seed-baseline`.
pub async fn seed(size: Size) -> anyhow::Result<Seed> {
    let env = BenchEnv::new("seed").await?;
    let pool = env.common().connect_postgres().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_seed_issue (coupon_id text NOT NULL, user_id text NOT NULL,
                                                      arrival bigint NOT NULL, status text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let mut redis = redis::Client::open(env.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let coupons: Vec<(String, i64)> = SALE.iter().map(|(n, s)| (env.coupon(n), *s)).collect();
    for (id, stock) in &coupons {
        let _: () = redis::cmd("SET")
            .arg(format!("{}seed:{id}:stock", env.prefix))
            .arg(stock)
            .query_async(&mut redis)
            .await?;
    }
    let server = procs::own_server(&env, "serve-seed").await?;
    let base = format!("http://{}", server.addr.expect("it listens"));
    let ids: Vec<String> = coupons.iter().map(|(c, _)| c.clone()).collect();
    let n = size.sale_requests;
    let (h, b, cs) = (http(), base.clone(), ids.clone());
    let burst = load::closed(size.sale_clients, n, move |i| {
        issue(&h, &b, &cs[(i % 3) as usize], sale_user(i, (n / 2).max(1)))
    })
    .await;
    let per_s = burst.ok as f64 / burst.seconds;
    // Its writes are asynchronous: give them a moment to land.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows_stored = loop {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM bench_seed_issue WHERE coupon_id = ANY($1)")
                .bind(&ids)
                .fetch_one(&pool)
                .await?;
        if rows as u64 >= burst.ok || Instant::now() > deadline {
            break rows as u64;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.stop().await;
    let violations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bench_seed_issue s WHERE s.coupon_id = ANY($1) AND s.status = 'sold_out'
           AND s.arrival < (SELECT max(arrival) FROM bench_seed_issue w
                            WHERE w.coupon_id = s.coupon_id AND w.status = 'issued')",
    )
    .bind(&ids)
    .fetch_one(&pool)
    .await?;
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM bench_seed_issue WHERE coupon_id = ANY($1) GROUP BY status",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    Ok(Seed {
        burst,
        per_s,
        first_come_violations: violations as u64,
        rows_stored,
        statuses: statuses.into_iter().map(|(s, c)| (s, c as u64)).collect(),
    })
}
