//! `drain` and `drain-stream`: a backlog decided and stored by one worker.

use super::*;

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
pub(crate) async fn ledger_span(
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
