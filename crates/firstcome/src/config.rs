//! Settings both binaries share: where the services are and what the topics
//! and keys are called. Each field reads a command-line flag or an environment
//! variable (the local stack writes them all to `.state/stack.env`).

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::keys::{BadPrefix, Keys};
use crate::redis_conn::RedisConn;

/// How long a pooled Postgres connection may sit idle and still be handed
/// out without a ping (see [`CommonConfig::connect_postgres`]).
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Connection settings and names shared by the ingress and the worker.
#[derive(Clone, clap::Args)]
pub struct CommonConfig {
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

impl std::fmt::Debug for CommonConfig {
    // Hand-written so the database password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonConfig")
            .field("redis_cluster", &self.redis_cluster)
            .field("redis_prefix", &self.redis_prefix)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("request_topic", &self.request_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("decision_topic", &self.decision_topic)
            .finish_non_exhaustive()
    }
}

/// A setting that cannot work, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The Redis key prefix contains braces.
    #[error("FIRSTCOME_REDIS_PREFIX: {0}")]
    Prefix(#[from] BadPrefix),
    /// A `FIRSTCOME_KAFKA_OPTIONS` entry is not `key=value`.
    #[error("FIRSTCOME_KAFKA_OPTIONS: {0:?} is not key=value")]
    KafkaOption(String),
    /// Any other bad value.
    #[error("{key}: {message}")]
    Invalid {
        /// The environment variable.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl CommonConfig {
    /// The Redis key layout under the configured prefix.
    pub fn keys(&self) -> Result<Keys, ConfigError> {
        Ok(Keys::new(self.redis_prefix.clone())?)
    }

    /// The status TTL.
    pub fn status_ttl(&self) -> Duration {
        self.status_ttl
    }

    /// The extra librdkafka properties as pairs.
    pub fn kafka_options(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.kafka_options
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|o| match o.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => Err(ConfigError::KafkaOption(o.clone())),
            })
            .collect()
    }

    /// A pool of at most `FIRSTCOME_PG_MAX_CONNECTIONS` connections; waiting
    /// for a free one is bounded, so an overloaded pool fails fast.
    ///
    /// A connection idle for less than [`PING_AFTER_IDLE`] is handed out
    /// without a ping first: by default sqlx pings every connection it hands
    /// out, a round trip before every statement run on the pool (sqlx's own
    /// documented variant of `test_before_acquire`; HikariCP skips the check
    /// for 500 ms the same way). A connection that died meanwhile fails its
    /// statement, which every caller already retries or answers as a 503.
    pub async fn connect_postgres(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(self.pg_max_connections)
            .acquire_timeout(self.pg_acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_AFTER_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect(&self.database_url)
            .await
            .context("connecting to Postgres (DATABASE_URL)")
    }

    /// The addresses in `REDIS_URL`.
    pub fn redis_urls(&self) -> Vec<&str> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// A Redis connection that reconnects by itself (cluster-aware with
    /// `FIRSTCOME_REDIS_CLUSTER`); a command that gets no answer within
    /// `response_timeout` fails instead of hanging.
    pub async fn connect_redis(&self, response_timeout: Duration) -> anyhow::Result<RedisConn> {
        RedisConn::connect(&self.redis_urls(), self.redis_cluster, response_timeout).await
    }

    /// Checks everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.keys()?;
        self.kafka_options()?;
        let urls = self.redis_urls();
        if urls.is_empty() || (urls.len() > 1 && !self.redis_cluster) {
            return Err(ConfigError::Invalid {
                key: "REDIS_URL",
                message: "one address, or several seed nodes with FIRSTCOME_REDIS_CLUSTER=true"
                    .into(),
            });
        }
        for (key, topic) in [
            ("FIRSTCOME_REQUEST_TOPIC", &self.request_topic),
            ("FIRSTCOME_DLQ_TOPIC", &self.dlq_topic),
            ("FIRSTCOME_DECISION_TOPIC", &self.decision_topic),
        ] {
            if topic.is_empty() {
                return Err(ConfigError::Invalid {
                    key,
                    message: "must not be empty".into(),
                });
            }
        }
        if self.request_topic == self.dlq_topic {
            return Err(ConfigError::Invalid {
                key: "FIRSTCOME_DLQ_TOPIC",
                message: "must differ from FIRSTCOME_REQUEST_TOPIC".into(),
            });
        }
        if self.decision_topic == self.request_topic || self.decision_topic == self.dlq_topic {
            return Err(ConfigError::Invalid {
                key: "FIRSTCOME_DECISION_TOPIC",
                message: "must differ from FIRSTCOME_REQUEST_TOPIC and FIRSTCOME_DLQ_TOPIC".into(),
            });
        }
        if self.status_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "FIRSTCOME_STATUS_TTL",
                message: "must be at least 1".into(),
            });
        }
        if self.pg_max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "FIRSTCOME_PG_MAX_CONNECTIONS",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
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
/// deprecation warning ([`deprecations`]); otherwise `default`. The new
/// name (flag or variable) wins over it.
pub fn renamed_default(
    old: &'static str,
    unit: &'static str,
    new: &'static str,
    default: &'static str,
) -> &'static str {
    match std::env::var(old) {
        Ok(v) => {
            let mut warned = DEPRECATED.lock().unwrap_or_else(|e| e.into_inner());
            let warning = format!(
                "{old} is deprecated and will be ignored in the next release: write {new}={}{unit}",
                v.trim()
            );
            if !warned.contains(&warning) {
                warned.push(warning);
            }
            // Leaked once per setting and process: clap keeps defaults as
            // `&'static str`.
            Box::leak(format!("{}{unit}", v.trim()).into_boxed_str())
        }
        Err(_) => default,
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

    fn parse(redis: &str, cluster: bool) -> CommonConfig {
        let mut args = vec![
            "x",
            "--database-url",
            "postgres://h/db",
            "--kafka-brokers",
            "k:9092",
            "--redis-url",
            redis,
        ];
        if cluster {
            args.push("--redis-cluster");
        }
        Cli::parse_from(args).common
    }

    #[test]
    fn several_redis_addresses_need_the_cluster_flag() {
        let two = "redis://a:1, redis://b:2";
        let err = parse(two, false).validate().unwrap_err().to_string();
        assert!(err.starts_with("REDIS_URL:"), "{err}");
        let cluster = parse(two, true);
        cluster.validate().unwrap();
        assert_eq!(cluster.redis_urls(), ["redis://a:1", "redis://b:2"]);
        parse("redis://a:1", false).validate().unwrap();
        assert!(parse(" , ", true).validate().is_err());
    }
}
