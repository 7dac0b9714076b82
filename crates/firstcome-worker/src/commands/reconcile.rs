//! `firstcome-worker reconcile`: compares each coupon's Redis state with
//! Postgres and reports drift. Read-only.
//!
//! While requests are being decided, Redis runs up to a batch ahead of
//! Postgres (a decision is made before it is persisted), so a busy coupon can
//! show passing drift; run it again, or when the coupon is quiet, before
//! acting on it.

use std::collections::BTreeSet;

use firstcome::CouponId;
use firstcome::db;
use firstcome::state::{self, Keys};
use redis::aio::ConnectionLike;
use serde::Serialize;
use sqlx::PgPool;

/// One coupon compared.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    /// The coupon.
    pub coupon_id: String,
    /// Its total stock in Postgres.
    pub total_stock: i64,
    /// Users holding it in Postgres.
    pub pg_issued: i64,
    /// Users holding it in Redis; `None` when Redis has no state for it.
    pub redis_issued: Option<i64>,
    /// Units left in Redis.
    pub redis_remaining: Option<i64>,
    /// Its sale is over and its state left Redis on purpose (see
    /// [`crate::retire`]): no state in Redis is then no drift.
    pub retired: bool,
    /// What differs; empty when the two agree.
    pub drift: Vec<String>,
}

/// Compares one coupon, or every coupon.
pub async fn reconcile<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    keys: &Keys,
    only: Option<&CouponId>,
) -> anyhow::Result<Vec<Report>> {
    let coupons = match only {
        Some(id) => db::coupon(pool, id)
            .await?
            .map(|c| vec![c])
            .ok_or_else(|| anyhow::anyhow!("coupon {id} does not exist"))?,
        None => db::coupons(pool).await?,
    };
    let mut reports = Vec::with_capacity(coupons.len());
    for c in coupons {
        let id = c.coupon_id.clone();
        // Compared as text: Redis's set may hold anything, and what it holds
        // that no user id could be is drift to show, not a read to fail.
        let pg_users: BTreeSet<String> = db::issued_users(pool, &id)
            .await?
            .iter()
            .map(|u| u.as_str().to_owned())
            .collect();
        let total = i64::from(c.total_stock);
        let pg_issued = pg_users.len() as i64;
        let observed = state::observe(redis, &keys.coupon(&id)).await?;
        let mut drift = Vec::new();
        let retired = observed.is_none() && db::is_retired(pool, &id).await?;
        match &observed {
            None if retired => {}
            None => drift.push("no state in Redis".to_owned()),
            Some(o) => {
                let (epoch, seq) = db::fence(pool, &id).await?.unwrap_or_default();
                if o.epoch != epoch {
                    drift.push(format!(
                        "epoch: redis {} postgres {epoch} (a stale state; the worker rebuilds it \
                         before deciding)",
                        o.epoch
                    ));
                }
                if o.seq < seq {
                    drift.push(format!(
                        "decisions: redis has numbered {} of the {seq} postgres stored (restored \
                         from an older copy?)",
                        o.seq
                    ));
                }
                if o.total != total {
                    drift.push(format!("total stock: redis {} postgres {total}", o.total));
                }
                if o.remaining != total - pg_issued {
                    drift.push(format!(
                        "remaining stock: redis {} postgres {}",
                        o.remaining,
                        total - pg_issued
                    ));
                }
                let redis_users: BTreeSet<String> = o.users.iter().cloned().collect();
                let only_redis: Vec<&String> = redis_users.difference(&pg_users).collect();
                let only_pg: Vec<&String> = pg_users.difference(&redis_users).collect();
                if !only_redis.is_empty() {
                    drift.push(format!(
                        "{} user(s) hold it in Redis only: {}",
                        only_redis.len(),
                        sample(&only_redis)
                    ));
                }
                if !only_pg.is_empty() {
                    drift.push(format!(
                        "{} user(s) hold it in Postgres only: {}",
                        only_pg.len(),
                        sample(&only_pg)
                    ));
                }
            }
        }
        reports.push(Report {
            coupon_id: c.coupon_id.as_str().to_owned(),
            total_stock: total,
            pg_issued,
            redis_issued: observed.as_ref().map(|o| o.users.len() as i64),
            redis_remaining: observed.as_ref().map(|o| o.remaining),
            retired,
            drift,
        });
    }
    Ok(reports)
}

fn sample(users: &[&String]) -> String {
    let mut s = users
        .iter()
        .take(5)
        .map(|u| u.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if users.len() > 5 {
        s.push_str(", …");
    }
    s
}

/// The reports as a table for people.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<40} {:>10} {:>10} {:>12} {:>15}  {}\n",
        "coupon", "total", "pg_issued", "redis_issued", "redis_remaining", "state"
    );
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for r in reports {
        out.push_str(&format!(
            "{:<40} {:>10} {:>10} {:>12} {:>15}  {}\n",
            r.coupon_id,
            r.total_stock,
            r.pg_issued,
            opt(r.redis_issued),
            opt(r.redis_remaining),
            if r.retired {
                "retired"
            } else if r.drift.is_empty() {
                "in sync"
            } else {
                "DRIFT"
            }
        ));
        for d in &r.drift {
            out.push_str(&format!("    - {d}\n"));
        }
    }
    out
}

/// The arguments of `reconcile`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The settings every binary shares.
    #[command(flatten)]
    pub common: firstcome::config::CommonConfig,
    /// Only this coupon.
    #[arg(long)]
    pub coupon: Option<String>,
    /// JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints the comparison. Exit code 0: every coupon in sync; 1: drift; 2:
/// the check could not run.
pub async fn run(args: Args) -> std::process::ExitCode {
    super::or_exit_2(compare(args).await)
}

async fn compare(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let Args {
        common,
        coupon,
        json,
    } = args;
    super::start(&common)?;
    let only = coupon.map(CouponId::parse).transpose()?;
    let pool = common.connect_postgres().await?;
    let mut redis = common
        .connect_redis(std::time::Duration::from_secs(10))
        .await?;
    let reports = reconcile(&pool, &mut redis, &common.keys()?, only.as_ref()).await?;
    super::print(json, true, &reports, || table(&reports))?;
    Ok(match reports.iter().all(|r| r.drift.is_empty()) {
        true => std::process::ExitCode::SUCCESS,
        false => std::process::ExitCode::from(1),
    })
}
