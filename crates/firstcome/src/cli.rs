//! The command line of both binaries, the one place the domain meets clap
//! (the `cli` feature): [`CommonArgs`] is what `firstcome-ingress` and
//! `firstcome-worker` flatten into their own arguments, read into the plain
//! [`CommonConfig`] the rest of the code takes; [`duration`] and
//! [`renamed_default`] read the duration settings of all three.

use std::time::Duration;

use clap::{ArgMatches, Args, Command, FromArgMatches};

use crate::config::CommonConfig;

/// The flags and environment variables of [`CommonConfig`], flattened into
/// both binaries' command lines.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Postgres URL, e.g. `postgres://user:pass@127.0.0.1:55432/firstcome`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Redis URL, e.g. `redis://127.0.0.1:56379`; on Redis Cluster one or
    /// more seed nodes, comma-separated.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,

    /// Whether `REDIS_URL` is a Redis Cluster (cluster-aware client: every
    /// key of a coupon in one hash slot, `MOVED`/`ASK` followed).
    #[arg(long, env = "FIRSTCOME_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,

    /// Prefix of every Redis key, so several deployments (or tests) can share
    /// one Redis. Must not contain braces.
    #[arg(long, env = "FIRSTCOME_REDIS_PREFIX", default_value = "fc:")]
    pub redis_prefix: String,

    /// Kafka bootstrap servers, comma-separated `host:port`.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Extra librdkafka properties for every client, as `key=value`,
    /// comma-separated (e.g. `security.protocol=SASL_SSL`).
    #[arg(long, env = "FIRSTCOME_KAFKA_OPTIONS", value_delimiter = ',')]
    pub kafka_options: Vec<String>,

    /// Topic the ingress appends issue requests to, keyed by coupon id.
    #[arg(
        long,
        env = "FIRSTCOME_REQUEST_TOPIC",
        default_value = "firstcome.issue-requests"
    )]
    pub request_topic: String,

    /// Topic for records the worker cannot process.
    #[arg(
        long,
        env = "FIRSTCOME_DLQ_TOPIC",
        default_value = "firstcome.issue-requests.dlq"
    )]
    pub dlq_topic: String,

    /// Topic the worker publishes every stored decision to, keyed by coupon
    /// id, when `FIRSTCOME_DECISION_STREAM` is on (docs/decision-stream.md).
    #[arg(
        long,
        env = "FIRSTCOME_DECISION_TOPIC",
        default_value = "firstcome.decisions"
    )]
    pub decision_topic: String,

    /// How long request status entries stay in Redis; lookups fall back to
    /// the Postgres ledger after that.
    #[arg(
        long,
        env = "FIRSTCOME_STATUS_TTL",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_STATUS_TTL_SECS", "s", "FIRSTCOME_STATUS_TTL", "24h")
    )]
    pub status_ttl: Duration,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "FIRSTCOME_PG_MAX_CONNECTIONS", default_value_t = 8)]
    pub pg_max_connections: u32,

    /// Longest a Postgres call waits for a pool connection, opening one
    /// included (the password exchange, SCRAM, is the slow part); past it the
    /// call fails (an API answer is `503`). Raise it only where the process
    /// runs many times slower than usual (the instruction count runs the
    /// binaries under callgrind, some 50 times slower).
    #[arg(
        long,
        env = "FIRSTCOME_PG_ACQUIRE_TIMEOUT",
        value_parser = duration,
        default_value = renamed_default("FIRSTCOME_PG_ACQUIRE_TIMEOUT_MS", "ms", "FIRSTCOME_PG_ACQUIRE_TIMEOUT", "3s")
    )]
    pub pg_acquire_timeout: Duration,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "FIRSTCOME_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

impl From<CommonArgs> for CommonConfig {
    fn from(a: CommonArgs) -> Self {
        CommonConfig {
            database_url: a.database_url,
            redis_url: a.redis_url,
            redis_cluster: a.redis_cluster,
            redis_prefix: a.redis_prefix,
            kafka_brokers: a.kafka_brokers,
            kafka_options: a.kafka_options,
            request_topic: a.request_topic,
            dlq_topic: a.dlq_topic,
            decision_topic: a.decision_topic,
            status_ttl: a.status_ttl,
            pg_max_connections: a.pg_max_connections,
            pg_acquire_timeout: a.pg_acquire_timeout,
            log_json: a.log_json,
        }
    }
}

// A binary writes `#[command(flatten)] common: CommonConfig`: the flags are
// [`CommonArgs`]'s, the value the plain struct.
impl FromArgMatches for CommonConfig {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        CommonArgs::from_arg_matches(m).map(Self::from)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        // Every setting has a value (a default or the environment's), so
        // an update reads them all.
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for CommonConfig {
    fn augment_args(cmd: Command) -> Command {
        CommonArgs::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        CommonArgs::augment_args_for_update(cmd)
    }
}

/// Parses a duration setting, as every one is written: humantime's syntax
/// (`250ms`, `10s`, `2m`, `1h 30m`, `24h`).
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write a duration such as 250ms, 10s or 2m)"))
}

/// The default of a duration setting that had an integer name before
/// (`FIRSTCOME_COMMIT_INTERVAL=1000`): that variable, when set, still
/// gives the value for this release, in its old unit (`ms` or `s`), with a
/// deprecation warning ([`deprecations`]); otherwise
/// `default`. The new name (flag or variable) wins over it.
pub fn renamed_default(
    old: &'static str,
    unit: &'static str,
    new: &'static str,
    default: &'static str,
) -> &'static str {
    match std::env::var(old) {
        Ok(v) => {
            deprecated(format!(
                "{old} is deprecated and will be ignored in the next release: write {new}={}{unit}",
                v.trim()
            ));
            // Leaked once per setting and process: clap keeps defaults as
            // `&'static str`.
            Box::leak(format!("{}{unit}", v.trim()).into_boxed_str())
        }
        Err(_) => default,
    }
}

/// Records the warning for a setting read under its old name (once).
fn deprecated(warning: String) {
    let mut warned = DEPRECATED.lock().unwrap_or_else(|e| e.into_inner());
    if !warned.contains(&warning) {
        warned.push(warning);
    }
}

static DEPRECATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The deprecation warnings of old setting names read so far (to log once
/// logging is up).
pub fn deprecations() -> Vec<String> {
    DEPRECATED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonConfig,
    }

    #[test]
    fn the_flags_and_their_defaults_fill_the_plain_config() {
        let c = Cli::try_parse_from([
            "x",
            "--database-url",
            "postgres://h/db",
            "--kafka-brokers",
            "k:9092",
            "--redis-url",
            "redis://a:1",
            "--kafka-options",
            "a=1,b=2",
            "--status-ttl",
            "90s",
        ])
        .unwrap()
        .common;
        assert_eq!(c.database_url, "postgres://h/db");
        assert_eq!(c.redis_url, "redis://a:1");
        assert_eq!(c.kafka_options, ["a=1", "b=2"]);
        assert_eq!(c.status_ttl, Duration::from_secs(90));
        assert_eq!(c.redis_prefix, "fc:");
        assert_eq!(c.request_topic, "firstcome.issue-requests");
        assert_eq!(c.pg_max_connections, 8);
        assert!(!c.redis_cluster);
        assert!(Cli::try_parse_from(["x", "--database-url", "p"]).is_err());
    }
}
