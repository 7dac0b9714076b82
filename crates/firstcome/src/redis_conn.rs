//! One Redis connection type for both deployments: a single primary (with
//! its replicas or Sentinel in front, `REDIS_URL` one address) or Redis
//! Cluster (`FIRSTCOME_REDIS_CLUSTER=true`, `REDIS_URL` one or more seed
//! nodes, comma-separated).
//!
//! Both reconnect by themselves. On Redis Cluster the client follows
//! `MOVED` and `ASK` redirections and refreshes its slot map; every key of a
//! coupon shares the coupon's hash tag ([`crate::state`]), so each Lua call
//! and each pipeline of one coupon goes to one node. The two writes that
//! span coupons or requests (the pending status with its counter, a batch
//! of final statuses) are split by [`Connection::clustered`].

use std::time::Duration;

use anyhow::Context;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection whose callers may need to know whether keys of different
/// hash slots live on different nodes.
pub trait Connection: ConnectionLike + Clone + Send + Sync {
    /// Whether a pipeline must keep to one hash slot (Redis Cluster).
    fn clustered(&self) -> bool {
        false
    }
}

impl Connection for MultiplexedConnection {}
impl Connection for ConnectionManager {}

/// A connection to a single Redis, or to a Redis Cluster. Cheap to clone;
/// clones share the connection.
#[derive(Clone)]
pub enum RedisConn {
    /// One primary.
    Single(ConnectionManager),
    /// Redis Cluster.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to `urls` (one URL, or on a cluster any number of seed
    /// nodes); a command with no answer within `response_timeout` fails
    /// instead of hanging.
    pub async fn connect(
        urls: &[&str],
        cluster: bool,
        response_timeout: Duration,
    ) -> anyhow::Result<Self> {
        if cluster {
            let client = ClusterClient::builder(urls.iter().copied())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(response_timeout)
                .build()
                .context("parsing REDIS_URL (cluster seed nodes)")?;
            let conn = client
                .get_async_connection()
                .await
                .context("connecting to Redis Cluster (REDIS_URL)")?;
            return Ok(Self::Cluster(conn));
        }
        let [url] = urls else {
            anyhow::bail!(
                "REDIS_URL: one address for a single Redis (several are seed nodes of a cluster: set FIRSTCOME_REDIS_CLUSTER=true)"
            );
        };
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        let conn = redis::Client::open(*url)
            .context("parsing REDIS_URL")?
            .get_connection_manager_with_config(cfg)
            .await
            .context("connecting to Redis (REDIS_URL)")?;
        Ok(Self::Single(conn))
    }
}

impl Connection for RedisConn {
    fn clustered(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
