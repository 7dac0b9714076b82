//! `firstcome-worker redis rebuild`: rebuilds coupons' Redis state from
//! Postgres, coupon by coupon, with deciding paused on each while it runs.
//!
//! It is safe while workers run: a coupon is paused (the workers hold its
//! partition where it is and retry), rebuilt under a new epoch, and resumed
//! by the install itself. Should the pause lapse or the tool die half-way,
//! the fence still holds: a decision taken on the old state is refused by
//! Postgres and taken again on the new one (see [`firstcome::state`]).

use std::time::Duration;

use anyhow::Context;
use firstcome::state::Keys;
use firstcome::{CouponId, db};
use redis::aio::ConnectionLike;
use serde::Serialize;
use sqlx::PgPool;

/// One coupon rebuilt.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    /// The coupon.
    pub coupon_id: String,
    /// The epoch of the new state.
    pub epoch: i64,
    /// Total stock.
    pub total_stock: i64,
    /// Users holding it.
    pub issued: i64,
    /// Units left.
    pub remaining: i64,
    /// Earlier decisions loaded, so redelivered requests get them back.
    pub decisions: i64,
    /// `false` when a worker installed a newer state meanwhile (as good).
    pub installed: bool,
}

/// A connection to a Redis that answers: waits up to `wait` for one that is
/// down or still loading its data (it answers `LOADING` meanwhile), which is
/// when an operator rebuilds, right after a restart or a restore.
pub async fn ready_redis(
    common: &firstcome::config::CommonConfig,
    wait: Duration,
) -> anyhow::Result<firstcome::redis_conn::RedisConn> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let attempt = async {
            let mut conn = common.connect_redis(Duration::from_secs(10)).await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            anyhow::Ok(conn)
        };
        match attempt.await {
            Ok(conn) => return Ok(conn),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "redis does not answer yet; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("redis did not answer within {wait:?}"))),
        }
    }
}

/// Rebuilds the coupons `only`, or every coupon whose sale has not ended
/// when it is empty ([`db::live_coupons`]), each paused for at most
/// `pause`. Unknown coupons are refused before anything is touched.
pub async fn rebuild<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    keys: &Keys,
    only: &[CouponId],
    pause: Duration,
) -> anyhow::Result<Vec<Report>> {
    let coupons = if only.is_empty() {
        db::live_coupons(pool).await?
    } else {
        let mut found = Vec::with_capacity(only.len());
        for id in only {
            found.push(
                db::coupon(pool, id)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("coupon {id} does not exist"))?,
            );
        }
        found
    };
    let mut reports = Vec::with_capacity(coupons.len());
    for c in coupons {
        let id = c.coupon_id.clone();
        let built = firstcome::rebuild::coupon_paused(pool, redis, keys, &id, pause)
            .await
            .with_context(|| format!("rebuilding coupon {id}"))?
            .ok_or_else(|| anyhow::anyhow!("coupon {id} vanished from postgres"))?;
        tracing::info!(coupon = %id, epoch = built.epoch, issued = built.issued, "coupon rebuilt");
        let total = i64::from(c.total_stock);
        reports.push(Report {
            coupon_id: c.coupon_id.as_str().to_owned(),
            epoch: built.epoch,
            total_stock: total,
            issued: built.issued as i64,
            remaining: total - built.issued as i64,
            decisions: built.decisions as i64,
            installed: built.installed,
        });
    }
    Ok(reports)
}

/// The reports as a table for people.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10}  {}\n",
        "coupon", "epoch", "total", "issued", "remaining", "decisions", "state"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10}  {}\n",
            r.coupon_id,
            r.epoch,
            r.total_stock,
            r.issued,
            r.remaining,
            r.decisions,
            if r.installed {
                "rebuilt"
            } else {
                "rebuilt by a worker meanwhile"
            }
        ));
    }
    out.push_str(&format!(
        "{} coupon(s) rebuilt from postgres\n",
        reports.len()
    ));
    out
}

/// The arguments of `redis rebuild`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The settings every binary shares.
    #[command(flatten)]
    pub common: firstcome::config::CommonConfig,
    /// Only these coupons (repeatable); every coupon when absent.
    #[arg(long)]
    pub coupon: Vec<String>,
    /// Longest a coupon stays paused, should this tool die half-way.
    #[arg(long, default_value_t = 60)]
    pub pause_secs: u64,
    /// How long to wait for Redis to answer first (down, or still loading
    /// its data after a restart: the usual moment to rebuild).
    #[arg(long, default_value_t = 60)]
    pub wait_secs: u64,
    /// JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Rebuilds and prints what it did. Exit code 0: rebuilt; 2: failed (run it
/// again).
pub async fn run(args: Args) -> std::process::ExitCode {
    super::or_exit_2(rebuild_all(args).await)
}

async fn rebuild_all(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let Args {
        common,
        coupon,
        pause_secs,
        wait_secs,
        json,
    } = args;
    super::start(&common)?;
    let only = coupon
        .iter()
        .map(|c| CouponId::parse(c.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let pool = common.connect_postgres().await?;
    let mut redis = ready_redis(&common, Duration::from_secs(wait_secs)).await?;
    let reports = rebuild(
        &pool,
        &mut redis,
        &common.keys()?,
        &only,
        Duration::from_secs(pause_secs.max(1)),
    )
    .await?;
    super::print(json, true, &reports, || table(&reports))?;
    Ok(std::process::ExitCode::SUCCESS)
}
