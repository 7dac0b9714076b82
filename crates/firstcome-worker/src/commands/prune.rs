//! `firstcome-worker prune`: the retention of the request ledger, the
//! failure records and the admin audit.
//!
//! `user_coupon` (who holds what) and `coupon_change` are the record and
//! stay. A ledger row is what keeps a request from being decided twice when
//! its record comes back (a redelivery, a replayed dead letter), so a row may
//! go only once no record of its request can come back: after the request
//! topic's and the dead-letter topic's retention together (a record can sit
//! in the dead-letter topic for its retention, then be replayed onto the
//! request topic and sit there for its retention). The command reads both
//! retentions from the broker and refuses a shorter `--older-than`. Rows go
//! in batches, each its own short transaction, so the tables stay writable
//! while it runs; it can be stopped and run again at any time.
//!
//! Once its row is gone, a request's status answers `404` (the status API
//! answers for the retention period).

use std::time::Duration;

use chrono::Utc;
use firstcome::config::CommonConfig;
use firstcome::db::{self, Prunable};
use serde::Serialize;

/// What to prune.
#[derive(clap::Args, Debug, Clone)]
pub struct PruneOptions {
    /// Ledger rows and failure records decided longer ago than this go
    /// (e.g. `30d`); at least the request topic's and the dead-letter
    /// topic's retention together.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Duration,
    /// Audit rows older than this go too (e.g. `400d`); kept when absent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub audit_older_than: Option<Duration>,
    /// Rows per statement.
    #[arg(long, default_value_t = 5_000)]
    pub batch: i64,
}

/// What one run removed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Pruned {
    /// Ledger rows deleted.
    pub ledger_rows: u64,
    /// Failure records deleted.
    pub failure_rows: u64,
    /// Audit rows deleted.
    pub audit_rows: u64,
}

/// Why `--older-than` is too short, if it is: a record of a request decided
/// that long ago could still be delivered.
pub fn too_short(older_than: Duration, retentions: &[(&str, Option<Duration>)]) -> Option<String> {
    let mut needed = Duration::ZERO;
    for (topic, retention) in retentions {
        match retention {
            None => {
                return Some(format!(
                    "topic {topic} keeps its records forever (retention.ms -1), so any of \
                     them can come back; give it a retention first"
                ));
            }
            Some(r) => needed += *r,
        }
    }
    (older_than < needed).then(|| {
        format!(
            "--older-than {} is shorter than the retention of the topics together ({}): a \
             record of a request decided that long ago could still be delivered, and without \
             its ledger row it would be decided again",
            humantime::format_duration(older_than),
            humantime::format_duration(needed)
        )
    })
}

/// Checks the topics' retention, then prunes.
pub async fn prune(common: &CommonConfig, opts: &PruneOptions) -> anyhow::Result<Pruned> {
    anyhow::ensure!(opts.batch > 0, "--batch must be at least 1");
    let topics = [common.request_topic.as_str(), common.dlq_topic.as_str()];
    let retentions = firstcome::kafka::retention(common, &topics).await?;
    let named: Vec<(&str, Option<Duration>)> = topics.into_iter().zip(retentions).collect();
    if let Some(why) = too_short(opts.older_than, &named) {
        anyhow::bail!("{why}");
    }
    let pool = common.connect_postgres().await?;
    let cutoff = |age: Duration| -> anyhow::Result<chrono::DateTime<Utc>> {
        Ok(Utc::now() - chrono::Duration::from_std(age)?)
    };
    let before = cutoff(opts.older_than)?;
    let mut pruned = Pruned {
        ledger_rows: db::prune(&pool, Prunable::Ledger, before, opts.batch).await?,
        failure_rows: db::prune(&pool, Prunable::Failures, before, opts.batch).await?,
        audit_rows: 0,
    };
    if let Some(age) = opts.audit_older_than {
        pruned.audit_rows = db::prune(&pool, Prunable::Audit, cutoff(age)?, opts.batch).await?;
    }
    tracing::info!(?pruned, %before, "pruned");
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_cutoff_must_outlast_both_topics() {
        let week = Some(7 * DAY);
        let topics = [("requests", week), ("dlq", week)];
        assert_eq!(too_short(14 * DAY, &topics), None);
        assert_eq!(too_short(30 * DAY, &topics), None);
        let why = too_short(10 * DAY, &topics).expect("10 days < 14");
        assert!(why.contains("14days"), "{why}");
        let forever = [("requests", week), ("dlq", None)];
        let why = too_short(3650 * DAY, &forever).expect("forever");
        assert!(why.contains("topic dlq keeps its records forever"), "{why}");
    }
}

/// The arguments of `prune`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The settings every binary shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// What to prune.
    #[command(flatten)]
    pub opts: PruneOptions,
    /// JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// Prunes and says how much went.
pub async fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    super::start(&args.common)?;
    let pruned = prune(&args.common, &args.opts).await?;
    super::print(args.json, false, &pruned, || {
        format!(
            "pruned {} ledger rows, {} failure records, {} audit rows\n",
            pruned.ledger_rows, pruned.failure_rows, pruned.audit_rows
        )
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}
