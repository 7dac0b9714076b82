//! `spread`: many sales at once. The same backlog of requests, spread over
//! 1, 100, 10,000 and 100,000 coupons open at the same time, drained by one
//! worker; for each, the drain rate and what each record and each coupon
//! cost: the worker's CPU and memory, Redis's memory, the broker's CPU.
//!
//! A marketplace where ten thousand sellers open a coupon at noon is this
//! shape: the worker makes one Lua call per coupon of a batch and keeps
//! state per coupon in Redis, so the cost per record may grow with the
//! number of coupons a batch spans. Each coupon has stock for half of its
//! requests, every request a distinct user of its coupon.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use firstcome::{CouponId, IssueRequest};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::env::{BenchEnv, PARTITIONS};
use crate::procs;
use crate::scenarios::{Rate, Size, produce, producer, redis_pids, redis_used_bytes, request};

/// One spread: the backlog over `coupons` coupons.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Coupons open at once.
    pub coupons: usize,
    /// Records decided, from the first decision to the last (the ledger's
    /// `decided_at`).
    pub drain: Rate,
    /// From the worker's start (group join included) until every record's
    /// offset was committed, i.e. every request final and stored.
    pub final_after_s: f64,
    /// The worker's CPU time per record, microseconds (its start included).
    pub worker_cpu_us_per_record: f64,
    /// The worker's peak resident memory, MiB.
    pub worker_peak_rss_mib: Option<f64>,
    /// What Redis holds more after the drain than before it, MiB: the
    /// coupons' states and the requests' statuses.
    pub redis_added_mib: f64,
    /// Of that, per coupon and per record together: bytes per record.
    pub redis_bytes_per_record: f64,
    /// The broker over the drain.
    pub broker: Option<procs::BrokerUsage>,
    /// Postgres's CPU time per record over the drain, microseconds.
    pub pg_cpu_us_per_record: f64,
    /// Redis's CPU time per record over the drain, microseconds.
    pub redis_cpu_us_per_record: f64,
    /// Units issued, checked against what the stocks and the requests make.
    pub issued: i64,
}

/// `spread`: every point.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    /// Records in each backlog.
    pub records: usize,
    /// One per number of coupons, fewest first.
    pub points: Vec<Point>,
}

/// The numbers of coupons a run spreads its backlog over.
fn spreads(smoke: bool) -> &'static [usize] {
    if smoke {
        &[1, 10, 100]
    } else {
        &[1, 100, 10_000, 100_000]
    }
}

/// Runs the scenario.
pub async fn spread(size: Size, smoke: bool) -> anyhow::Result<Spread> {
    let mut points = Vec::new();
    for &coupons in spreads(smoke) {
        let point = one(size.records, coupons)
            .await
            .with_context(|| format!("{coupons} coupons"))?;
        eprintln!(
            "[bench] spread over {coupons} coupons: {:.0} records/s, worker {:.0} µs CPU/record",
            point.drain.per_s, point.worker_cpu_us_per_record
        );
        points.push(point);
        // Each point's keys and rows go before the next, so Redis's memory
        // and Postgres's tables are measured on the same footing.
        crate::env::clean_up().await?;
    }
    Ok(Spread {
        records: size.records,
        points,
    })
}

async fn one(records: usize, coupons: usize) -> anyhow::Result<Point> {
    let env = BenchEnv::new("spread").await?;
    let pool = env.common().connect_postgres().await?;
    let ids: Vec<String> = (0..coupons).map(|i| env.coupon(&format!("s{i}"))).collect();
    let per_coupon = records.div_ceil(coupons);
    let stock = (per_coupon / 2).max(1) as i32;
    // One statement for all of them: 100,000 inserts one by one would be
    // most of the scenario.
    sqlx::query(
        "INSERT INTO coupon (coupon_id, name, total_stock)
         SELECT id, id, $2 FROM unnest($1::text[]) id",
    )
    .bind(&ids)
    .bind(stock)
    .execute(&pool)
    .await?;
    let parsed: Vec<CouponId> = ids
        .iter()
        .map(|id| CouponId::parse(id.clone()))
        .collect::<Result<_, _>>()?;
    // Round robin over the coupons, so every batch spans as many of them as
    // it can; the users of a coupon are all distinct.
    let backlog: Vec<IssueRequest> = (0..records)
        .map(|i| request(&parsed[i % coupons], format!("u{}", i / coupons)))
        .collect();
    produce(&producer(&env)?, &env.request_topic, backlog).await?;

    let redis_before = redis_used_bytes(&env).await?;
    let (pg_cpu, redis_cpu) = (
        procs::CpuMeter::postgres(),
        procs::CpuMeter::pids(redis_pids(&env).await?),
    );
    let committed = CommittedOffsets::new(&env)?;
    let started = Instant::now();
    let broker = procs::BrokerMeter::start();
    let worker = procs::worker(&env)?;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let n = committed.sum()?;
        let now = Instant::now();
        if n >= records as i64 {
            break;
        }
        anyhow::ensure!(
            now < deadline,
            "{n} of {records} records final after 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let final_after_s = started.elapsed().as_secs_f64();
    let broker = broker.and_then(|m| m.finish(records as u64));
    let (pg_cpu_us_per_record, redis_cpu_us_per_record) = (
        pg_cpu.us_per(records as u64),
        redis_cpu.us_per(records as u64),
    );
    let (cpu, rss) = (worker.cpu_seconds(), worker.peak_rss_mib());
    worker.stop().await;
    let redis_added = redis_used_bytes(&env).await?.saturating_sub(redis_before);
    // The promise, in sum: each coupon issued its stock, or one unit to each
    // of its users when it had fewer requests than units.
    let expected: i64 = (0..coupons)
        .map(|k| {
            (records / coupons + usize::from(k < records % coupons)).min(stock as usize) as i64
        })
        .sum();
    let issued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_coupon WHERE coupon_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&pool)
            .await?;
    anyhow::ensure!(
        issued == expected,
        "{issued} units issued where the stocks and the requests make {expected}"
    );
    // The rate from the ledger, first decision to last, as `drain` times
    // it: commits come once a second, too coarse for it.
    let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT min(decided_at), max(decided_at) FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&pool)
    .await?;
    let span = first.zip(last).context("no ledger rows")?;
    let seconds = ((span.1 - span.0).num_microseconds().unwrap_or(0) as f64 / 1e6).max(1e-3);
    Ok(Point {
        coupons,
        drain: Rate {
            count: records as u64,
            seconds,
            per_s: records as f64 / seconds,
        },
        final_after_s,
        worker_cpu_us_per_record: cpu.unwrap_or(f64::NAN) * 1e6 / records as f64,
        worker_peak_rss_mib: rss,
        redis_added_mib: redis_added as f64 / 1024.0 / 1024.0,
        redis_bytes_per_record: redis_added as f64 / records as f64,
        broker,
        pg_cpu_us_per_record,
        redis_cpu_us_per_record,
        issued,
    })
}

/// The offsets the scenario's worker group committed: a record is final
/// (decided and stored) once its offset is committed. Read without joining
/// the group.
struct CommittedOffsets {
    consumer: BaseConsumer,
    partitions: rdkafka::TopicPartitionList,
}

impl CommittedOffsets {
    fn new(env: &BenchEnv) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = firstcome::kafka::client_config(&env.common())?
            .set("group.id", &env.group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = rdkafka::TopicPartitionList::new();
        for p in 0..PARTITIONS {
            partitions.add_partition(&env.request_topic, p);
        }
        Ok(Self {
            consumer,
            partitions,
        })
    }

    /// Records committed over every partition (all written from offset 0).
    fn sum(&self) -> anyhow::Result<i64> {
        let tpl = self
            .consumer
            .committed_offsets(self.partitions.clone(), Duration::from_secs(10))?;
        Ok(tpl
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            })
            .sum())
    }
}
