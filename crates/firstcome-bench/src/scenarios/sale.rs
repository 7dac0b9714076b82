//! `flash-sale` and `huge-sale`: sales answered through the ingress and
//! decided by the worker, the promise checked with the oracle.

use super::*;

/// The coupons of a sale: (name, stock).
pub(crate) const SALE: [(&str, i64); 3] = [("a", 100), ("b", 300), ("c", 600)];

/// The user of the sale's request `i`, of `users`: fewer users than
/// requests, so many press more than once.
pub(crate) fn sale_user(i: u64, users: u64) -> String {
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
        if expected.get(&id.to_string()).map(|e| e.0.as_str()) != Some(status.as_str()) {
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
