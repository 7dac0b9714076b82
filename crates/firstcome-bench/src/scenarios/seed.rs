//! `seed-baseline`: the report's design (a Redis lock, `DECR`/`SADD`, an
//! async write) behind the same burst.

use super::*;

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
