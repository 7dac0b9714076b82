//! `lifecycle`: a year of sales in minutes, to show that nothing grows with
//! the number of sales (issue 13).
//!
//! Two rounds, each of many coupons sold out and closed one after another:
//! every coupon gets `requests_per_coupon` requests from as many users
//! (stock 100, so most are answered `409 sold_out` at once once it is gone),
//! every tenth accepted request is followed by a long poll, and bad clients
//! are mixed in: a long poll for an id nobody sent on every 25th request,
//! and every request from another address as the trusted proxy names it
//! (the rate limiter is on, so each is a client it must remember). After a
//! round the scenario waits until every coupon's state left Redis, then runs
//! `firstcome-worker prune` and a plain `VACUUM`, as an operator's daily
//! job would.
//!
//! Every two seconds it samples the ingress's and the worker's resident
//! memory, Redis's `used_memory`, and the Postgres tables that retention
//! trims (ledger, failures, audit) apart from the ones that are the record
//! (coupons, holders, changes). The claim is that after each round the
//! first come back to where they were, and the second round ends where the
//! first did, instead of twice as high.
//!
//! The topics get a retention of 30 s (so `prune` may take rows 75 s old;
//! 3 s and 8 s in the smoke run) and the statuses a TTL of 60 s; with the
//! defaults (7 days, a day) the same happens on a scale of days. `prune` and
//! the worker's sweep are global: they trim the whole database, as in
//! production (the suite's smoke run gives it a Postgres of its own).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use serde::Serialize;
use serde_json::json;

use crate::env::BenchEnv;
use crate::load::{self, Outcome};
use crate::procs::{self, Proc};
use crate::svg::{Frame, Line};

/// How big the run is.
#[derive(Debug, Clone, Copy)]
pub struct LifecycleSize {
    /// Coupons per round (two rounds).
    pub coupons_per_round: u64,
    /// Requests per coupon, one per user.
    pub requests_per_coupon: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// The topics' `retention.ms` in the scenario.
    pub retention_ms: u64,
    /// The cutoff of `prune`: both topics' retention together, and a margin.
    pub prune_older_than: &'static str,
}

impl LifecycleSize {
    /// A thousand coupons, a million requests.
    pub const FULL: Self = Self {
        coupons_per_round: 500,
        requests_per_coupon: 1_000,
        clients: 64,
        retention_ms: 30_000,
        prune_older_than: "75s",
    };
    /// Seconds, so the tool never rots.
    pub const SMOKE: Self = Self {
        coupons_per_round: 3,
        requests_per_coupon: 200,
        clients: 8,
        retention_ms: 3_000,
        prune_older_than: "8s",
    };
}

/// Units per coupon.
const STOCK: i64 = 100;
/// How often the scenario samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Resident memory of the ingress, MiB.
    pub ingress_rss_mib: Option<f64>,
    /// Resident memory of the worker, MiB.
    pub worker_rss_mib: Option<f64>,
    /// Redis `used_memory`, MiB.
    pub redis_used_mib: f64,
    /// What retention trims: the ledger, failures and audit, MiB (tables
    /// and indexes).
    pub pg_trimmed_mib: f64,
    /// The record: coupons, holders and changes, MiB.
    pub pg_record_mib: f64,
    /// Coupons sold and closed so far.
    pub coupons_done: u64,
}

/// A point of the run worth a line on the plot.
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    /// Seconds since the start.
    pub t_s: f64,
    /// What happened.
    pub what: String,
}

/// What the run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Lifecycle {
    /// Coupons sold and closed.
    pub coupons: u64,
    /// Issue requests sent.
    pub requests: u64,
    /// Of them answered `202` (appended).
    pub accepted: u64,
    /// Of them answered `409` at once.
    pub answered_at_once: u64,
    /// Requests that failed (must be 0).
    pub errors: u64,
    /// Long polls of accepted requests.
    pub long_polls: u64,
    /// Long polls for ids nobody sent.
    pub bad_polls: u64,
    /// Ledger rows `prune` deleted, per round.
    pub pruned_rows: Vec<u64>,
    /// Every sample.
    pub samples: Vec<Sample>,
    /// When each phase began, for the plot's labels.
    pub marks: Vec<Mark>,
}

/// Counters shared by the load's clients.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    accepted: AtomicU64,
    at_once: AtomicU64,
    errors: AtomicU64,
    long_polls: AtomicU64,
    bad_polls: AtomicU64,
}

/// Runs the scenario.
pub async fn lifecycle(size: LifecycleSize) -> anyhow::Result<Lifecycle> {
    let env = BenchEnv::new("life").await?;
    shorten_retention(&env, size.retention_ms).await?;
    let pool = env.common().connect_postgres().await?;
    let redis = redis::Client::open(env.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;

    let addr = procs::free_addr();
    let mut cmd = procs::command(&env, "firstcome-ingress")?;
    cmd.env("FIRSTCOME_LISTEN", addr.to_string())
        .env("FIRSTCOME_STATUS_TTL", "60s")
        .env("FIRSTCOME_RATE_LIMIT_PER_SEC", "1000")
        .env("FIRSTCOME_RATE_LIMIT_BURST", "1000")
        .env("FIRSTCOME_CLIENT_IP_HEADER", "x-forwarded-for")
        .env("FIRSTCOME_TRUSTED_PROXIES", "127.0.0.1");
    let ingress = procs::serve(cmd, addr, "the ingress").await?;
    let worker = Proc {
        child: procs::command(&env, "firstcome-worker")?
            .arg("run")
            .env("FIRSTCOME_STATUS_TTL", "60s")
            .env("FIRSTCOME_RETIRE_AFTER", "2s")
            .env("FIRSTCOME_RETIRE_INTERVAL", "1s")
            .kill_on_drop(true)
            .spawn()
            .context("starting the worker")?,
        addr: None,
    };

    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_until(
        Pids {
            ingress: ingress.child.id(),
            worker: worker.child.id(),
        },
        pool.clone(),
        redis.clone(),
        start,
        done.clone(),
        stop.clone(),
    ));
    let mut marks = Vec::new();
    let mut mark = |what: String| {
        tracing::info!(%what, "lifecycle");
        marks.push(Mark {
            t_s: start.elapsed().as_secs_f64(),
            what,
        });
    };
    // A baseline before any sale.
    tokio::time::sleep(SAMPLE_EVERY * 3).await;
    mark("start".into());

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()?;
    let base = format!("http://{addr}");
    let counts = Arc::new(Counts::default());
    let mut pruned_rows = Vec::new();
    for round in 0..2 {
        let mut coupons = Vec::new();
        for c in 0..size.coupons_per_round {
            let id = env.coupon(&format!("r{round}c{c}"));
            sell(&http, &base, &env, &id, size, &counts).await?;
            coupons.push(id);
            done.fetch_add(1, Ordering::Relaxed);
        }
        mark(format!("round {} sold", round + 1));
        wait_retired(&pool, &coupons).await?;
        mark(format!("round {} retired from Redis", round + 1));
        pruned_rows.push(prune(&env, &pool, size.prune_older_than).await?);
        mark(format!("round {} pruned", round + 1));
        // Flat for a while: what the next day starts from.
        tokio::time::sleep(SAMPLE_EVERY * 5).await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    ingress.stop().await;
    worker.stop().await;
    let c = &counts;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(Lifecycle {
        coupons: 2 * size.coupons_per_round,
        requests: load(&c.requests),
        accepted: load(&c.accepted),
        answered_at_once: load(&c.at_once),
        errors: load(&c.errors),
        long_polls: load(&c.long_polls),
        bad_polls: load(&c.bad_polls),
        pruned_rows,
        samples,
        marks,
    })
}

/// Gives the scenario's topics a short retention.
async fn shorten_retention(env: &BenchEnv, retention_ms: u64) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        firstcome::kafka::client_config(&env.common())?.create()?;
    let retention = retention_ms.to_string();
    let changes: Vec<AlterConfig<'_>> = [env.request_topic.as_str(), env.dlq_topic.as_str()]
        .into_iter()
        .map(|t| AlterConfig::new(ResourceSpecifier::Topic(t)).set("retention.ms", &retention))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    for r in admin.alter_configs(&changes, &opts).await? {
        r.map_err(|(what, code)| anyhow::anyhow!("setting the retention of {what:?}: {code}"))?;
    }
    Ok(())
}

/// Creates a coupon, sells it out to `requests_per_coupon` users and closes it.
async fn sell(
    http: &reqwest::Client,
    base: &str,
    env: &BenchEnv,
    id: &str,
    size: LifecycleSize,
    counts: &Arc<Counts>,
) -> anyhow::Result<()> {
    crate::scenarios::create_coupon(http, base, env, id, STOCK).await?;
    let (h, b, coupon, counts) = (http.clone(), base.to_owned(), id.to_owned(), counts.clone());
    load::closed(size.clients, size.requests_per_coupon, move |i| {
        let (h, b, coupon, counts) = (h.clone(), b.clone(), coupon.clone(), counts.clone());
        async move {
            let n = counts.requests.fetch_add(1, Ordering::Relaxed);
            // Every request from another address, as the proxy names it.
            let from = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
            let answer = h
                .post(format!("{b}/v1/coupons/{coupon}/issue"))
                .header("x-forwarded-for", from)
                .json(&json!({ "user_id": format!("u{i}") }))
                .send()
                .await;
            let outcome = match answer {
                Ok(r) if r.status() == 202 => {
                    counts.accepted.fetch_add(1, Ordering::Relaxed);
                    let id = r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["request_id"].as_str().map(str::to_owned));
                    if let Some(id) = id.filter(|_| i % 10 == 0) {
                        counts.long_polls.fetch_add(1, Ordering::Relaxed);
                        let _ = h
                            .get(format!("{b}/v1/issue-requests/{id}?wait_ms=1000"))
                            .send()
                            .await;
                    }
                    Outcome::Ok
                }
                Ok(r) if r.status() == 409 => {
                    counts.at_once.fetch_add(1, Ordering::Relaxed);
                    Outcome::Ok
                }
                _ => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    Outcome::Error
                }
            };
            if i % 25 == 0 {
                counts.bad_polls.fetch_add(1, Ordering::Relaxed);
                let nobody = uuid::Uuid::new_v4();
                let _ = h
                    .get(format!("{b}/v1/issue-requests/{nobody}?wait_ms=20"))
                    .send()
                    .await;
            }
            outcome
        }
    })
    .await;
    let r = http
        .post(format!("{base}/v1/admin/coupons/{id}/close"))
        .bearer_auth(&env.admin_token)
        .header("idempotency-key", format!("close-{id}"))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "closing coupon {id}: {}", r.status());
    Ok(())
}

/// Waits until the state of every coupon left Redis (at most 10 minutes).
async fn wait_retired(pool: &sqlx::PgPool, coupons: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM coupon WHERE coupon_id = ANY($1)
                AND retired_epoch IS DISTINCT FROM redis_epoch",
        )
        .bind(coupons)
        .fetch_one(pool)
        .await?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} coupon states never left Redis"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the last decision is older than the cutoff, then prunes
/// and vacuums as an operator's daily job would; the ledger rows deleted.
async fn prune(env: &BenchEnv, pool: &sqlx::PgPool, older_than: &str) -> anyhow::Result<u64> {
    let cutoff = humantime::parse_duration(older_than)?;
    let newest: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT max(decided_at) FROM request_ledger WHERE coupon_id LIKE $1")
            .bind(format!("{}-%", env.tag))
            .fetch_one(pool)
            .await?;
    if let Some(newest) = newest {
        let old_enough =
            newest + chrono::Duration::from_std(cutoff)? + chrono::Duration::seconds(1);
        if let Ok(wait) = (old_enough - chrono::Utc::now()).to_std() {
            tokio::time::sleep(wait).await;
        }
    }
    let out = procs::command(env, "firstcome-worker")?
        .args(["prune", "--older-than", older_than, "--json"])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "prune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pruned: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for vacuum in [
        "VACUUM request_ledger",
        "VACUUM request_failure",
        "VACUUM admin_audit",
    ] {
        sqlx::query(vacuum).execute(pool).await?;
    }
    Ok(pruned["ledger_rows"].as_u64().unwrap_or(0))
}

/// The processes sampled.
struct Pids {
    ingress: Option<u32>,
    worker: Option<u32>,
}

/// Samples every [`SAMPLE_EVERY`] until `stop`.
async fn sample_until(
    pids: Pids,
    pool: sqlx::PgPool,
    mut redis: redis::aio::MultiplexedConnection,
    start: Instant,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        let used: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        let sizes: (i64, i64) = sqlx::query_as(
            "SELECT pg_total_relation_size('request_ledger')
                  + pg_total_relation_size('request_failure')
                  + pg_total_relation_size('admin_audit'),
                    pg_total_relation_size('coupon')
                  + pg_total_relation_size('user_coupon')
                  + pg_total_relation_size('coupon_change')",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or((0, 0));
        let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
        samples.push(Sample {
            t_s: start.elapsed().as_secs_f64(),
            ingress_rss_mib: pids.ingress.and_then(procs::rss_mib),
            worker_rss_mib: pids.worker.and_then(procs::rss_mib),
            redis_used_mib: mib(used),
            pg_trimmed_mib: mib(sizes.0 as f64),
            pg_record_mib: mib(sizes.1 as f64),
            coupons_done: done.load(Ordering::Relaxed),
        });
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    samples
}

impl Lifecycle {
    /// The first sample at or after `t_s`.
    fn at(&self, t_s: f64) -> Option<&Sample> {
        self.samples.iter().find(|s| s.t_s >= t_s)
    }

    /// The samples at each mark, for the table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "lifecycle: {} coupons, {} requests ({} accepted, {} answered at once, {} failed), \
             {} long polls, {} polls for unknown ids, ledger rows pruned {:?}\n\n\
             | when | ingress RSS MiB | worker RSS MiB | Redis used MiB | Postgres trimmed MiB | Postgres record MiB |\n\
             |---|---|---|---|---|---|\n",
            self.coupons,
            self.requests,
            self.accepted,
            self.answered_at_once,
            self.errors,
            self.long_polls,
            self.bad_polls,
            self.pruned_rows
        );
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        for m in &self.marks {
            if let Some(s) = self.at(m.t_s) {
                out.push_str(&format!(
                    "| {} ({:.0} s) | {} | {} | {:.1} | {:.1} | {:.1} |\n",
                    m.what,
                    m.t_s,
                    opt(s.ingress_rss_mib),
                    opt(s.worker_rss_mib),
                    s.redis_used_mib,
                    s.pg_trimmed_mib,
                    s.pg_record_mib
                ));
            }
        }
        let peak = |f: fn(&Sample) -> Option<f64>| {
            self.samples.iter().filter_map(f).fold(0.0f64, f64::max)
        };
        out.push_str(&format!(
            "| peak | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            peak(|s| s.ingress_rss_mib),
            peak(|s| s.worker_rss_mib),
            peak(|s| Some(s.redis_used_mib)),
            peak(|s| Some(s.pg_trimmed_mib)),
            peak(|s| Some(s.pg_record_mib)),
        ));
        out
    }

    /// The samples over time, one line per measure, the marks as verticals.
    pub fn svg(&self) -> String {
        use std::fmt::Write;
        let f = Frame {
            w: 860.0,
            h: 440.0,
            left: 60.0,
            bottom: 40.0,
            top: 30.0,
            right: 230.0,
        };
        let t_max = self.samples.last().map_or(1.0, |s| s.t_s).max(1.0);
        type Measure = (&'static str, &'static str, fn(&Sample) -> Option<f64>);
        let measures: [Measure; 5] = [
            ("ingress RSS", "#1f77b4", |s| s.ingress_rss_mib),
            ("worker RSS", "#ff7f0e", |s| s.worker_rss_mib),
            ("Redis used_memory", "#d62728", |s| Some(s.redis_used_mib)),
            ("Postgres: ledger, audit", "#2ca02c", |s| {
                Some(s.pg_trimmed_mib)
            }),
            ("Postgres: coupons, holders", "#9467bd", |s| {
                Some(s.pg_record_mib)
            }),
        ];
        let v_max = measures
            .iter()
            .flat_map(|(_, _, g)| self.samples.iter().filter_map(g))
            .fold(1.0f64, f64::max)
            * 1.1;
        let x = |t: f64| f.left + (f.w - f.left - f.right) * t / t_max;
        let y = |v: f64| f.h - f.bottom - (f.h - f.bottom - f.top) * v / v_max;
        let mut s = f.open(&format!(
            "Memory and storage over {} sales ({} requests)",
            self.coupons, self.requests
        ));
        let step = nice_step(v_max);
        let mut v = 0.0;
        while v <= v_max {
            f.grid(&mut s, y(v), &format!("{v} MiB"));
            v += step;
        }
        for m in &self.marks {
            let _ = writeln!(
                s,
                r##"<line x1="{x}" x2="{x}" y1="{}" y2="{}" stroke="#bbb" stroke-dasharray="4 3"/><text x="{x}" y="{ty}" font-size="10" transform="rotate(-90 {x} {ty})" text-anchor="end" dx="-4" dy="-3">{}</text>"##,
                f.top,
                f.h - f.bottom,
                m.what,
                x = x(m.t_s),
                ty = f.top + 4.0
            );
        }
        for (i, (name, color, g)) in measures.iter().enumerate() {
            let points: Vec<(f64, f64)> = self
                .samples
                .iter()
                .filter_map(|p| g(p).map(|v| (x(p.t_s), y(v))))
                .collect();
            let line = Line {
                name,
                color,
                width: 1.5,
                dash: "",
            };
            f.series(&mut s, &line, &points, f.top + 20.0 + 18.0 * i as f64);
        }
        f.caption(&mut s, f.h - 8.0, &format!("seconds (total {t_max:.0})"));
        Frame::close(&mut s);
        s
    }
}

/// A round grid step for values up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = max / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(raw)
}
