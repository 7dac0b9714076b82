//! Settings both binaries share: where the services are and what the topics
//! and keys are called, as a plain struct; [`crate::cli`] reads it from
//! flags or environment variables (the local stack writes them all to
//! `.state/stack.env`). [`ensure`] is how every setting is checked.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::keys::{BadPrefix, Keys};
use crate::redis_conn::RedisConn;

/// How long a pooled Postgres connection may sit idle and still be handed
/// out without a ping (see [`CommonConfig::connect_postgres`]).
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Connection settings and names shared by the ingress and the worker: a
/// plain struct, read from the command line by [`crate::cli::CommonArgs`]
/// (whose help says what each setting means) or written by a test.
#[derive(Clone)]
pub struct CommonConfig {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `REDIS_URL`: one address, or cluster seed nodes comma-separated.
    pub redis_url: String,
    /// `FIRSTCOME_REDIS_CLUSTER`.
    pub redis_cluster: bool,
    /// `FIRSTCOME_REDIS_PREFIX`.
    pub redis_prefix: String,
    /// `KAFKA_BROKERS`.
    pub kafka_brokers: String,
    /// `FIRSTCOME_KAFKA_OPTIONS`, each `key=value`.
    pub kafka_options: Vec<String>,
    /// `FIRSTCOME_REQUEST_TOPIC`.
    pub request_topic: String,
    /// `FIRSTCOME_DLQ_TOPIC`.
    pub dlq_topic: String,
    /// `FIRSTCOME_DECISION_TOPIC`.
    pub decision_topic: String,
    /// `FIRSTCOME_STATUS_TTL`.
    pub status_ttl: Duration,
    /// `FIRSTCOME_PG_MAX_CONNECTIONS`.
    pub pg_max_connections: u32,
    /// `FIRSTCOME_PG_ACQUIRE_TIMEOUT`.
    pub pg_acquire_timeout: Duration,
    /// `FIRSTCOME_LOG_JSON`.
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

/// Fails with [`ConfigError::Invalid`] for `key` unless `holds`: the one
/// way every binary checks a setting.
pub fn ensure(holds: bool, key: &'static str, message: &str) -> Result<(), ConfigError> {
    if holds {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: message.to_owned(),
        })
    }
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
        ensure(
            !urls.is_empty() && (urls.len() == 1 || self.redis_cluster),
            "REDIS_URL",
            "one address, or several seed nodes with FIRSTCOME_REDIS_CLUSTER=true",
        )?;
        for (key, topic) in [
            ("FIRSTCOME_REQUEST_TOPIC", &self.request_topic),
            ("FIRSTCOME_DLQ_TOPIC", &self.dlq_topic),
            ("FIRSTCOME_DECISION_TOPIC", &self.decision_topic),
        ] {
            ensure(!topic.is_empty(), key, "must not be empty")?;
        }
        ensure(
            self.request_topic != self.dlq_topic,
            "FIRSTCOME_DLQ_TOPIC",
            "must differ from FIRSTCOME_REQUEST_TOPIC",
        )?;
        ensure(
            self.decision_topic != self.request_topic && self.decision_topic != self.dlq_topic,
            "FIRSTCOME_DECISION_TOPIC",
            "must differ from FIRSTCOME_REQUEST_TOPIC and FIRSTCOME_DLQ_TOPIC",
        )?;
        ensure(
            self.status_ttl >= Duration::from_secs(1),
            "FIRSTCOME_STATUS_TTL",
            "must be at least 1s",
        )?;
        ensure(
            self.pg_max_connections > 0,
            "FIRSTCOME_PG_MAX_CONNECTIONS",
            "must be at least 1",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_redis(redis: &str, cluster: bool) -> CommonConfig {
        CommonConfig {
            database_url: "postgres://h/db".into(),
            redis_url: redis.into(),
            redis_cluster: cluster,
            redis_prefix: "fc:".into(),
            kafka_brokers: "k:9092".into(),
            kafka_options: Vec::new(),
            request_topic: "r".into(),
            dlq_topic: "d".into(),
            decision_topic: "s".into(),
            status_ttl: Duration::from_secs(60),
            pg_max_connections: 1,
            pg_acquire_timeout: Duration::from_secs(1),
            log_json: false,
        }
    }

    #[test]
    fn several_redis_addresses_need_the_cluster_flag() {
        let two = "redis://a:1, redis://b:2";
        let err = with_redis(two, false).validate().unwrap_err().to_string();
        assert!(err.starts_with("REDIS_URL:"), "{err}");
        let cluster = with_redis(two, true);
        cluster.validate().unwrap();
        assert_eq!(cluster.redis_urls(), ["redis://a:1", "redis://b:2"]);
        with_redis("redis://a:1", false).validate().unwrap();
        assert!(with_redis(" , ", true).validate().is_err());
    }
}
