//! Where a scenario runs: the local stack's services, and names of its own
//! (topics, consumer group, Redis prefix), so scenarios and runs never see
//! each other's data.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use firstcome::config::CommonConfig;

/// Partitions of a scenario's request topic (as in the local stack).
pub const PARTITIONS: i32 = 12;

/// Where a scenario's services are: the stack's single nodes (and the
/// bench's broker), or a cluster of brokers and Redis Cluster.
#[derive(Debug, Clone)]
pub struct Services {
    /// Bootstrap servers.
    pub kafka_brokers: String,
    /// Replication factor of the scenario's topics.
    pub replication: i32,
    /// Redis: one address, or the seed nodes of a cluster.
    pub redis_url: String,
    /// Whether `redis_url` is a Redis Cluster.
    pub redis_cluster: bool,
}

impl Services {
    /// The single nodes `scripts/bench` points at (`KAFKA_BROKERS`,
    /// `REDIS_URL`).
    pub fn single() -> anyhow::Result<Self> {
        Ok(Self {
            kafka_brokers: var("KAFKA_BROKERS")?,
            replication: 1,
            redis_url: var("REDIS_URL")?,
            redis_cluster: false,
        })
    }
}

/// One scenario's slice of the stack.
#[derive(Debug, Clone)]
pub struct BenchEnv {
    /// Postgres.
    pub database_url: String,
    /// Redis.
    pub redis_url: String,
    /// Whether `redis_url` is a Redis Cluster.
    pub redis_cluster: bool,
    /// Bootstrap servers.
    pub kafka_brokers: String,
    /// Redis key prefix of this scenario.
    pub prefix: String,
    /// Request topic of this scenario.
    pub request_topic: String,
    /// Dead-letter topic of this scenario.
    pub dlq_topic: String,
    /// Consumer group of this scenario's workers.
    pub group_id: String,
    /// Admin token of this scenario's ingress.
    pub admin_token: String,
    /// Session timeout for the workers (`FIRSTCOME_SESSION_TIMEOUT`,
    /// else 10 s): a scenario's worker stops before the next one starts, so
    /// nothing waits on it.
    pub session_timeout: String,
    /// Short random tag; coupon ids start with it.
    pub tag: String,
}

fn var(key: &str) -> anyhow::Result<String> {
    std::env::var(key).with_context(|| {
        format!(
            "{key} is not set: run through `scripts/bench`, which reads the local stack's settings"
        )
    })
}

impl BenchEnv {
    /// Fresh names on the stack given by `DATABASE_URL`, `REDIS_URL` and
    /// `KAFKA_BROKERS`, with the topics created.
    pub async fn new(scenario: &str) -> anyhow::Result<Self> {
        Self::on(scenario, Services::single()?).await
    }

    /// Fresh names on `services`, with the topics created.
    pub async fn on(scenario: &str, services: Services) -> anyhow::Result<Self> {
        let tag = format!(
            "b{}{}",
            &scenario[..scenario.len().min(4)],
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let env = Self {
            database_url: var("DATABASE_URL")?,
            redis_url: services.redis_url,
            redis_cluster: services.redis_cluster,
            kafka_brokers: services.kafka_brokers,
            prefix: format!("{tag}:"),
            request_topic: format!("{tag}.requests"),
            dlq_topic: format!("{tag}.dlq"),
            group_id: format!("{tag}-workers"),
            admin_token: format!("bench-token-{tag}"),
            session_timeout: std::env::var("FIRSTCOME_SESSION_TIMEOUT")
                .unwrap_or_else(|_| "10s".to_owned()),
            tag,
        };
        USED.lock().expect("lock").push(env.clone());
        let common = env.common();
        tokio::time::timeout(
            Duration::from_secs(60),
            firstcome::kafka::ensure_topics(
                &common,
                &[
                    (&common.request_topic, PARTITIONS),
                    (&common.dlq_topic, 1),
                    (&common.decision_topic, PARTITIONS),
                ],
                services.replication,
            ),
        )
        .await
        .context("the broker did not answer in 60 s; is the stack up (`scripts/stack up`)?")??;
        Ok(env)
    }

    /// The shared settings the library functions take.
    pub fn common(&self) -> CommonConfig {
        CommonConfig {
            database_url: self.database_url.clone(),
            redis_url: self.redis_url.clone(),
            redis_cluster: self.redis_cluster,
            redis_prefix: self.prefix.clone(),
            kafka_brokers: self.kafka_brokers.clone(),
            kafka_options: Vec::new(),
            request_topic: self.request_topic.clone(),
            dlq_topic: self.dlq_topic.clone(),
            decision_topic: format!("{}.decisions", self.tag),
            status_ttl: std::time::Duration::from_secs(3_600),
            pg_max_connections: 8,
            pg_acquire_timeout: std::time::Duration::from_secs(3),
            log_json: false,
        }
    }

    /// A coupon id of this scenario.
    pub fn coupon(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }
}

/// The scenarios run so far in this process, for [`clean_up`].
static USED: Mutex<Vec<BenchEnv>> = Mutex::new(Vec::new());

/// Deletes what the scenarios of this run left in Redis, Postgres and
/// Kafka (their keys, coupons and topics), so the local stack does not grow
/// run after run (a Redis of millions of keys takes its time to load; a
/// broker keeps files of every partition open, and the suite's bench runs
/// on the stack's). Topics on the brokers a scenario started of its own
/// (`topology`'s) went with them.
pub async fn clean_up() -> anyhow::Result<()> {
    let used = std::mem::take(&mut *USED.lock().expect("lock"));
    if used.is_empty() {
        return Ok(());
    }
    let brokers = var("KAFKA_BROKERS")?;
    let on_the_stack: Vec<&BenchEnv> = used.iter().filter(|e| e.kafka_brokers == brokers).collect();
    if let Some(first) = on_the_stack.first() {
        let prefixes: Vec<String> = on_the_stack.iter().map(|e| format!("{}.", e.tag)).collect();
        let topics =
            firstcome::kafka::delete_topics_starting_with(&first.common(), &prefixes).await?;
        tracing::info!(topics, "deleted the run's topics");
    }
    let tags: Vec<String> = used.into_iter().map(|e| e.tag).collect();
    // The single Redis, and each node of the stack's Redis Cluster (the
    // `topology` scenario's).
    let mut nodes = vec![var("REDIS_URL")?];
    if let Ok(cluster) = std::env::var("REDIS_CLUSTER_URL") {
        nodes.extend(cluster.split(',').map(str::to_owned));
    }
    let mut deleted = 0usize;
    for node in &nodes {
        deleted += unlink_tagged(node, &tags).await?;
    }
    let pool = sqlx::PgPool::connect(&var("DATABASE_URL")?).await?;
    let mut rows = 0u64;
    for sql in [
        "DELETE FROM request_ledger x USING unnest($1::text[]) t \
         WHERE left(x.coupon_id, length(t) + 1) = t || '-'",
        "DELETE FROM user_coupon x USING unnest($1::text[]) t \
         WHERE left(x.coupon_id, length(t) + 1) = t || '-'",
        "DELETE FROM coupon_change x USING unnest($1::text[]) t \
         WHERE left(x.coupon_id, length(t) + 1) = t || '-'",
        "DELETE FROM admin_audit x USING unnest($1::text[]) t \
         WHERE left(x.coupon_id, length(t) + 1) = t || '-'",
        "DELETE FROM coupon x USING unnest($1::text[]) t \
         WHERE left(x.coupon_id, length(t) + 1) = t || '-'",
    ] {
        rows += sqlx::query(sql)
            .bind(&tags)
            .execute(&pool)
            .await?
            .rows_affected();
    }
    if sqlx::query_scalar::<_, bool>("SELECT to_regclass('bench_seed_issue') IS NOT NULL")
        .fetch_one(&pool)
        .await?
    {
        sqlx::query(
            "DELETE FROM bench_seed_issue x USING unnest($1::text[]) t \
             WHERE left(x.coupon_id, length(t) + 1) = t || '-'",
        )
        .bind(&tags)
        .execute(&pool)
        .await?;
    }
    tracing::info!(
        deleted,
        rows,
        "cleaned up the run's Redis keys and Postgres rows"
    );
    Ok(())
}

/// Deletes the keys of `tags` on the Redis node at `url`, one `UNLINK` a key
/// (a cluster node refuses several keys of different slots in one).
async fn unlink_tagged(url: &str, tags: &[String]) -> anyhow::Result<usize> {
    let redis = redis::Client::open(url)?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let mut deleted = 0usize;
    for tag in tags {
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<String> =
                redis::AsyncCommands::scan_match(&mut conn, format!("{tag}:*")).await?;
            let mut keys = Vec::new();
            while let Some(k) = futures::StreamExt::next(&mut iter).await {
                keys.push(k?);
            }
            keys
        };
        for chunk in keys.chunks(1_000) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("UNLINK").arg(k);
            }
            let counts: Vec<usize> = pipe.query_async(&mut conn).await?;
            deleted += counts.iter().sum::<usize>();
        }
    }
    Ok(deleted)
}
