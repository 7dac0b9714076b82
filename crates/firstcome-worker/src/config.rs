//! Settings of the worker: the shared connection settings plus the consumer
//! group, batching and retry schedule.

use std::time::Duration;

use firstcome::cli::{duration, renamed_default};
use firstcome::config::{CommonConfig, ConfigError, ensure};

/// Everything `firstcome-worker run` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Services, topics and keys shared with the ingress.
    #[command(flatten)]
    pub common: CommonConfig,

    /// Kafka consumer group; every worker of one deployment shares it.
    #[arg(long, env = "FIRSTCOME_GROUP_ID", default_value = "firstcome-worker")]
    pub group_id: String,

    /// Static group membership (`group.instance.id`): a stable name per
    /// replica (the pod name) lets a restarted worker take its partitions
    /// back within the session timeout without a rebalance. Empty: dynamic
    /// membership. Two live workers must never share one.
    #[arg(long, env = "FIRSTCOME_GROUP_INSTANCE_ID", default_value = "")]
    pub group_instance_id: String,

    /// Address of the operations port: `/metrics` for Prometheus,
    /// `/healthz` (the poll loop is alive) and `/readyz` (Postgres and
    /// Redis answer). Keep it off the public network.
    #[arg(
        long,
        env = "FIRSTCOME_METRICS_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    pub metrics_listen: std::net::SocketAddr,

    /// How often librdkafka reports statistics, from which the consumer
    /// lag per partition is exported.
    #[arg(
        long,
        env = "FIRSTCOME_STATS_INTERVAL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_STATS_INTERVAL_MS", "ms", "FIRSTCOME_STATS_INTERVAL", "5s")
    )]
    pub stats_interval: Duration,

    /// Consumer session timeout. A worker that stops heartbeating for this
    /// long loses its partitions to the others.
    #[arg(
        long,
        env = "FIRSTCOME_SESSION_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_SESSION_TIMEOUT_MS", "ms", "FIRSTCOME_SESSION_TIMEOUT", "45s")
    )]
    pub session_timeout: Duration,

    /// Longest the consumer may go without polling before it leaves the
    /// group. The poll loop never waits on a slow partition (it pauses it),
    /// so this only fires if the process itself is stuck.
    #[arg(
        long,
        env = "FIRSTCOME_MAX_POLL_INTERVAL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_MAX_POLL_INTERVAL_MS", "ms", "FIRSTCOME_MAX_POLL_INTERVAL", "5m")
    )]
    pub max_poll_interval: Duration,

    /// How often stored offsets are committed (and always synchronously on
    /// revoke and shutdown).
    #[arg(
        long,
        env = "FIRSTCOME_COMMIT_INTERVAL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_COMMIT_INTERVAL_MS", "ms", "FIRSTCOME_COMMIT_INTERVAL", "1s")
    )]
    pub commit_interval: Duration,

    /// Most records one partition decides in one Lua call and persists in
    /// one Postgres statement. Measured (docs/benchmarks.md): a hot coupon
    /// drains about 2.5 times faster at 2,000 than at 500.
    #[arg(long, env = "FIRSTCOME_MAX_BATCH", default_value_t = 2_000)]
    pub max_batch: usize,

    /// Records buffered per partition between the poll loop and the
    /// partition's task. A small buffer pauses and resumes a hot partition
    /// at the broker all the time, which costs more than the memory
    /// (about 10 MiB per busy partition at 20,000).
    #[arg(long, env = "FIRSTCOME_PARTITION_BUFFER", default_value_t = 20_000)]
    pub partition_buffer: usize,

    /// First retry delay after a transient failure (Postgres, Redis, broker).
    #[arg(
        long,
        env = "FIRSTCOME_RETRY_INITIAL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_RETRY_INITIAL_MS", "ms", "FIRSTCOME_RETRY_INITIAL", "100ms")
    )]
    pub retry_initial: Duration,

    /// Longest retry delay; delays double up to it, with jitter.
    #[arg(
        long,
        env = "FIRSTCOME_RETRY_MAX",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_RETRY_MAX_MS", "ms", "FIRSTCOME_RETRY_MAX", "10s")
    )]
    pub retry_max: Duration,

    /// Attempts at storing a record that Postgres refuses for good (a data or
    /// constraint error) before it is given up: dead-lettered, its Redis
    /// decision undone, its status `failed`.
    #[arg(long, env = "FIRSTCOME_PERMANENT_ATTEMPTS", default_value_t = 3)]
    pub permanent_attempts: u32,

    /// How long after a coupon's window ended (or it was closed) its Redis
    /// state may leave Redis, once every record of it is stored. Longer
    /// than an ingress may still accept for it (its coupon cache, 1 s, and
    /// a produce timeout), so the log holds no more records of it.
    #[arg(
        long,
        env = "FIRSTCOME_RETIRE_AFTER",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_RETIRE_AFTER_SECS", "s", "FIRSTCOME_RETIRE_AFTER", "10m")
    )]
    pub retire_after: Duration,

    /// How often the worker looks for coupon states to retire; 0 never.
    #[arg(
        long,
        env = "FIRSTCOME_RETIRE_INTERVAL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_RETIRE_INTERVAL_MS", "ms", "FIRSTCOME_RETIRE_INTERVAL", "1m")
    )]
    pub retire_interval: Duration,

    /// Publish every stored decision to `FIRSTCOME_DECISION_TOPIC`, exactly
    /// once for a `read_committed` consumer: the decisions of the batches
    /// stored since the last commit and the group's offsets past them
    /// commit in one Kafka transaction (docs/decision-stream.md).
    #[arg(long, env = "FIRSTCOME_DECISION_STREAM", default_value_t = false, action = clap::ArgAction::Set)]
    pub decision_stream: bool,

    /// The decision stream's `transactional.id`. Empty: the group id and
    /// `FIRSTCOME_GROUP_INSTANCE_ID` when that is set (a restarted member
    /// then aborts what its previous life left open at once), else the
    /// group id and a random suffix (left open, it holds `read_committed`
    /// consumers for at most `FIRSTCOME_TRANSACTION_TIMEOUT`).
    #[arg(long, env = "FIRSTCOME_TRANSACTIONAL_ID", default_value = "")]
    pub transactional_id: String,

    /// `transaction.timeout.ms` of the decision stream: how long the broker
    /// keeps a dead worker's transaction open before it aborts it.
    #[arg(
        long,
        env = "FIRSTCOME_TRANSACTION_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_TRANSACTION_TIMEOUT_MS", "ms", "FIRSTCOME_TRANSACTION_TIMEOUT", "10s")
    )]
    pub transaction_timeout: Duration,

    /// Longest a graceful shutdown waits for the batches in hand.
    #[arg(
        long,
        env = "FIRSTCOME_SHUTDOWN_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_SHUTDOWN_TIMEOUT_MS", "ms", "FIRSTCOME_SHUTDOWN_TIMEOUT", "20s")
    )]
    pub shutdown_timeout: Duration,
}

impl WorkerConfig {
    /// The decision stream's `transactional.id` (see `transactional_id`).
    pub fn transactional_id(&self) -> String {
        if !self.transactional_id.is_empty() {
            self.transactional_id.clone()
        } else if !self.group_instance_id.is_empty() {
            format!("{}.{}", self.group_id, self.group_instance_id)
        } else {
            format!("{}.{}", self.group_id, uuid::Uuid::new_v4().simple())
        }
    }

    /// Checks everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        ensure(
            !self.group_id.is_empty(),
            "FIRSTCOME_GROUP_ID",
            "must not be empty",
        )?;
        ensure(
            !self.decision_stream || self.transaction_timeout >= Duration::from_secs(1),
            "FIRSTCOME_TRANSACTION_TIMEOUT",
            "must be at least 1s",
        )?;
        ensure(
            (1..=10_000).contains(&self.max_batch),
            "FIRSTCOME_MAX_BATCH",
            "must be 1 to 10000",
        )?;
        ensure(
            self.partition_buffer >= self.max_batch,
            "FIRSTCOME_PARTITION_BUFFER",
            "must be at least FIRSTCOME_MAX_BATCH",
        )?;
        ensure(
            !self.retry_initial.is_zero() && self.retry_max >= self.retry_initial,
            "FIRSTCOME_RETRY_MAX",
            "must be at least FIRSTCOME_RETRY_INITIAL, which must be positive",
        )?;
        ensure(
            self.permanent_attempts > 0,
            "FIRSTCOME_PERMANENT_ATTEMPTS",
            "must be at least 1",
        )?;
        ensure(
            self.session_timeout >= Duration::from_secs(3),
            "FIRSTCOME_SESSION_TIMEOUT",
            "must be at least 3s",
        )?;
        ensure(
            (Duration::from_millis(100)..=Duration::from_secs(3_600))
                .contains(&self.stats_interval),
            "FIRSTCOME_STATS_INTERVAL",
            "must be 100ms to 1h",
        )?;
        ensure(
            self.max_poll_interval >= self.session_timeout,
            "FIRSTCOME_MAX_POLL_INTERVAL",
            "must be at least FIRSTCOME_SESSION_TIMEOUT",
        )
    }

    /// The retry schedule.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_initial,
            max: self.retry_max,
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Cap of the delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based): a random point in
    /// `[d/2, d]` with `d = min(max, initial * 2^(attempt-1))`, so workers
    /// that failed together do not retry together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_stays_under_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for attempt in 1..40 {
            let d = b.delay(attempt);
            let full = (Duration::from_millis(100) * 2u32.pow((attempt - 1).min(20)))
                .min(Duration::from_secs(1));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}

#[cfg(test)]
pub(crate) mod validation {
    use clap::Parser;

    use super::WorkerConfig;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: WorkerConfig,
    }

    /// The worker's settings from these flags and the required ones.
    pub(crate) fn parse(extra: &[&str]) -> WorkerConfig {
        let mut args = vec![
            "firstcome-worker",
            "--database-url",
            "postgres://u:p@127.0.0.1:1/db",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--kafka-brokers",
            "127.0.0.1:1",
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).expect("arguments parse").cfg
    }

    #[test]
    fn a_valid_configuration_passes_and_bad_values_name_their_key() {
        assert!(parse(&[]).validate().is_ok());
        let cases: [(&[&str], &str); 5] = [
            (&["--max-batch", "0"], "FIRSTCOME_MAX_BATCH"),
            (
                &["--max-batch", "100", "--partition-buffer", "10"],
                "FIRSTCOME_PARTITION_BUFFER",
            ),
            (
                &["--retry-initial", "500ms", "--retry-max", "100ms"],
                "FIRSTCOME_RETRY_MAX",
            ),
            (
                &["--max-poll-interval", "5s"],
                "FIRSTCOME_MAX_POLL_INTERVAL",
            ),
            (
                &["--permanent-attempts", "0"],
                "FIRSTCOME_PERMANENT_ATTEMPTS",
            ),
        ];
        for (args, key) in cases {
            let err = parse(args).validate().expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
