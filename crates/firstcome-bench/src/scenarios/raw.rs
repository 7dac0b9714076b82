//! The engines alone, the ceilings the product is measured against:
//! `raw-produce`, `raw-consume`, `raw-redis` (the Lua call) and `raw-pg`
//! (the store's rows).

use super::*;

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
