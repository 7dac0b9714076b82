//! Harness of the end-to-end tests: reads the local stack's settings, gives
//! every test its own topics, consumer group, Redis key prefix and coupon ids,
//! and runs the ingress and the worker in-process on those.
//!
//! Tests never skip: when the stack is not up they fail and say how to start it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use firstcome::config::CommonConfig;
use firstcome_ingress::{Application, IngressConfig};
use firstcome_worker::{Worker, WorkerConfig};
use rdkafka::message::Message;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod services;

/// Partitions of every test's request topic.
pub const PARTITIONS: i32 = 4;

/// The settings `scripts/stack up` wrote to `.state/stack.env`.
pub fn stack_env() -> HashMap<String, String> {
    let path = std::env::var_os("FIRSTCOME_ENV_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".state/stack.env"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): the local stack is not set up. Run `scripts/stack up` \
             (or `scripts/test`, which does it) first.",
            path.display()
        )
    });
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Logs of the components under test, when `RUST_LOG` asks for them.
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A short random tag that keeps one test's names apart from every other's.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// One test's private slice of the stack.
pub struct TestEnv {
    /// Shared settings pointing at this test's topics and key prefix.
    pub common: CommonConfig,
    /// This test's consumer group.
    pub group_id: String,
    /// The admin token of the stack.
    pub admin_token: String,
    /// A pool on the stack's database.
    pub pool: PgPool,
    /// The random tag of this test; coupon ids start with it.
    pub tag: String,
}

impl TestEnv {
    /// Creates this test's topics and checks every service answers.
    pub async fn new() -> Self {
        init_logs();
        let env = stack_env();
        let get = |k: &str| {
            env.get(k).cloned().unwrap_or_else(|| {
                panic!("{k} missing from the stack env file; rerun `scripts/stack up`")
            })
        };
        let tag = unique("t");
        let common = CommonConfig {
            database_url: get("DATABASE_URL"),
            redis_url: get("REDIS_URL"),
            redis_cluster: false,
            redis_prefix: format!("{tag}:"),
            kafka_brokers: get("KAFKA_BROKERS"),
            // e.g. `debug=cgrp` to see the consumer group protocol.
            kafka_options: std::env::var("FIRSTCOME_TEST_KAFKA_OPTIONS")
                .map(|o| o.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            request_topic: format!("{tag}.requests"),
            dlq_topic: format!("{tag}.dlq"),
            status_ttl_secs: 3_600,
            pg_max_connections: 4,
            log_json: false,
        };
        let hint = "is the local stack up? Run `scripts/stack up`";
        let pool = PgPool::connect(&common.database_url)
            .await
            .unwrap_or_else(|e| panic!("Postgres at DATABASE_URL: {e}; {hint}"));
        firstcome::db::migrate(&pool)
            .await
            .expect("migrations apply");
        let mut redis = redis::Client::open(common.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("Redis at REDIS_URL: {e}; {hint}"));
        let _: String = redis::cmd("PING").query_async(&mut redis).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            firstcome::kafka::ensure_topics(
                &common,
                &[(&common.request_topic, PARTITIONS), (&common.dlq_topic, 1)],
                1,
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("Kafka at KAFKA_BROKERS did not answer; {hint}"))
        .unwrap_or_else(|e| panic!("creating test topics: {e:#}; {hint}"));
        Self {
            common,
            group_id: format!("{tag}-workers"),
            admin_token: get("FIRSTCOME_ADMIN_TOKEN"),
            pool,
            tag,
        }
    }

    /// Moves this test onto the stack's Redis Cluster (three masters, see
    /// `scripts/stack`).
    pub fn use_redis_cluster(&mut self) {
        let url = stack_env()
            .get("REDIS_CLUSTER_URL")
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "REDIS_CLUSTER_URL missing from the stack env file; rerun `scripts/stack up`"
                )
            });
        self.common.redis_url = url;
        self.common.redis_cluster = true;
    }

    /// Moves this test onto a Redis of its own (see [`services`]).
    pub fn use_redis(&mut self, url: String) {
        self.common.redis_url = url;
    }

    /// Moves this test onto a Postgres of its own, with the migrations applied.
    pub async fn use_postgres(&mut self, url: String) {
        self.pool = PgPool::connect(&url).await.expect("the private Postgres");
        firstcome::db::migrate(&self.pool)
            .await
            .expect("migrations apply");
        self.common.database_url = url;
    }

    /// Moves this test onto a broker of its own, with this test's topics.
    pub async fn use_broker(&mut self, kafka: &services::PrivateKafka) {
        self.common.kafka_brokers = kafka.brokers();
        let topics = [
            (self.common.request_topic.as_str(), PARTITIONS),
            (self.common.dlq_topic.as_str(), 1),
        ];
        tokio::time::timeout(
            Duration::from_secs(30),
            firstcome::kafka::ensure_topics(&self.common, &topics, kafka.replication()),
        )
        .await
        .expect("the private broker answers")
        .expect("topics on the private broker");
    }

    /// Moves this test onto a request topic of one partition, so every
    /// coupon's records share one log order.
    pub async fn use_single_partition(&mut self) {
        self.common.request_topic = format!("{}.requests1", self.tag);
        firstcome::kafka::ensure_topics(&self.common, &[(&self.common.request_topic, 1)], 1)
            .await
            .expect("a one-partition request topic");
    }

    /// Makes every rebuild of `coupon`'s Redis state wait `secs` in
    /// Postgres, while it takes its new epoch (a trigger with `pg_sleep`).
    pub async fn slow_rebuilds(&self, coupon: &str, secs: f64) {
        self.test_trigger(
            "firstcome_test_slow",
            "coupon_id text PRIMARY KEY, secs float8 NOT NULL",
            "BEFORE UPDATE OF redis_epoch ON coupon",
            "DECLARE s float8;
             BEGIN
                 SELECT secs INTO s FROM firstcome_test_slow WHERE coupon_id = NEW.coupon_id;
                 IF s IS NOT NULL AND NEW.redis_epoch <> OLD.redis_epoch THEN
                     PERFORM pg_sleep(s);
                 END IF;
                 RETURN NEW;
             END",
        )
        .await;
        sqlx::query("INSERT INTO firstcome_test_slow VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(coupon)
            .bind(secs)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Makes every ledger row of `coupon` take `secs` to write (a trigger
    /// with `pg_sleep`): its batches stay in hand that long.
    pub async fn slow_ledger_writes(&self, coupon: &str, secs: f64) {
        self.test_trigger(
            "firstcome_test_slow_ledger",
            "coupon_id text PRIMARY KEY, secs float8 NOT NULL",
            "BEFORE INSERT ON request_ledger",
            "DECLARE s float8;
             BEGIN
                 SELECT secs INTO s FROM firstcome_test_slow_ledger WHERE coupon_id = NEW.coupon_id;
                 IF s IS NOT NULL THEN
                     PERFORM pg_sleep(s);
                 END IF;
                 RETURN NEW;
             END",
        )
        .await;
        sqlx::query(
            "INSERT INTO firstcome_test_slow_ledger VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(coupon)
        .bind(secs)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Installs, once for all tests, a trigger `name` running a PL/pgSQL
    /// `body` `when`, configured by rows of the table `name` (`columns`).
    async fn test_trigger(&self, name: &str, columns: &str, when: &str, body: &str) {
        let mut tx = self.pool.begin().await.unwrap();
        // Tests set this up concurrently; DDL on one function must not race.
        sqlx::query("SELECT pg_advisory_xact_lock(4242)")
            .execute(&mut *tx)
            .await
            .unwrap();
        for ddl in [
            format!("CREATE TABLE IF NOT EXISTS {name} ({columns})"),
            format!(
                "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ {body} $$"
            ),
            format!(
                "DO $$ BEGIN
                     IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{name}') THEN
                         CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {name}();
                     END IF;
                 END $$"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(ddl))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

    /// Makes Postgres refuse, for good, to store that `user` holds `coupon`:
    /// a trigger raises a constraint violation (SQLSTATE 23514), as a real
    /// data problem would. [`Self::stop_refusing`] fixes the cause.
    pub async fn refuse(&self, coupon: &str, user: &str) {
        self.test_trigger(
            "firstcome_test_refused",
            "coupon_id text NOT NULL, user_id text NOT NULL, PRIMARY KEY (coupon_id, user_id)",
            "BEFORE INSERT ON user_coupon",
            "BEGIN
                 IF EXISTS (SELECT 1 FROM firstcome_test_refused
                            WHERE coupon_id = NEW.coupon_id AND user_id = NEW.user_id) THEN
                     RAISE EXCEPTION 'refused by the test trigger' USING ERRCODE = 'check_violation';
                 END IF;
                 RETURN NEW;
             END",
        )
        .await;
        sqlx::query("INSERT INTO firstcome_test_refused VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(coupon)
            .bind(user)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Makes Postgres refuse, for good, the `failed` ledger rows of
    /// `coupon` too: a request given up there cannot even be recorded as
    /// failed in the ledger.
    pub async fn refuse_failures(&self, coupon: &str) {
        self.test_trigger(
            "firstcome_test_refused_failure",
            "coupon_id text PRIMARY KEY",
            "BEFORE INSERT OR UPDATE ON request_ledger",
            "BEGIN
                 IF NEW.status = 'failed' AND EXISTS (
                     SELECT 1 FROM firstcome_test_refused_failure WHERE coupon_id = NEW.coupon_id)
                 THEN
                     RAISE EXCEPTION 'failure refused by the test trigger'
                         USING ERRCODE = 'check_violation';
                 END IF;
                 RETURN NEW;
             END",
        )
        .await;
        sqlx::query(
            "INSERT INTO firstcome_test_refused_failure VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind(coupon)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Undoes every [`Self::refuse`] of `coupon`.
    pub async fn stop_refusing(&self, coupon: &str) {
        sqlx::query("DELETE FROM firstcome_test_refused WHERE coupon_id = $1")
            .bind(coupon)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// A coupon id private to this test.
    pub fn coupon_id(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// A Redis connection.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.common.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The ingress settings for this test, on a free port.
    pub fn ingress_config(&self) -> IngressConfig {
        IngressConfig {
            common: self.common.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: self.admin_token.clone(),
            admin_tokens: Vec::new(),
            produce_timeout_ms: 5_000,
            linger_ms: 2,
            request_timeout_ms: 15_000,
            shutdown_timeout_ms: 5_000,
            max_in_flight: 4_096,
            max_connections: 4_096,
            max_body_bytes: 16 * 1024,
            // Off: most tests check what the log decides for requests past
            // the stock; `api.rs` tests the short-circuit.
            sold_out_check_ms: 0,
            idempotency_ttl_secs: 3_600,
            max_wait_ms: 10_000,
            rate_limit_per_sec: 0,
            rate_limit_burst: 20,
            rate_limit_clients: 100_000,
            client_ip_header: None,
            trusted_proxies: Vec::new(),
        }
    }

    /// The worker settings for this test; a short session so joins are quick.
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            common: self.common.clone(),
            group_id: self.group_id.clone(),
            group_instance_id: String::new(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            stats_interval_ms: 1_000,
            session_timeout_ms: 6_000,
            max_poll_interval_ms: 300_000,
            permanent_attempts: 3,
            commit_interval_ms: 500,
            max_batch: 200,
            partition_buffer: 2_000,
            retry_initial_ms: 50,
            retry_max_ms: 1_000,
            shutdown_timeout_ms: 10_000,
            // Off: a sweep retires the ended coupons of the whole database,
            // other tests' too; tests/bounds.rs turns it on, on a Postgres
            // of its own.
            retire_after_secs: 600,
            retire_interval_ms: 0,
        }
    }

    /// Starts an ingress in this process.
    pub async fn spawn_ingress(&self) -> Running {
        self.spawn_ingress_with(self.ingress_config()).await
    }

    /// Starts an ingress with the given settings.
    pub async fn spawn_ingress_with(&self, cfg: IngressConfig) -> Running {
        let app = Application::build(cfg).await.expect("ingress starts");
        let addr = app.local_addr();
        let metrics = app.metrics_addr();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(stop.clone()));
        Running {
            addr: Some(addr),
            metrics,
            assignment: None,
            stop,
            handle,
        }
    }

    /// Starts an ingress whose broker address has nothing listening: no
    /// request is ever acknowledged, each holds its slot for
    /// `produce_timeout_ms` and is answered 503.
    pub async fn spawn_ingress_without_broker(
        &self,
        produce_timeout_ms: u64,
        max_in_flight: usize,
    ) -> Running {
        let mut cfg = self.ingress_config();
        cfg.common.kafka_brokers = "127.0.0.1:1".into();
        cfg.produce_timeout_ms = produce_timeout_ms;
        cfg.max_in_flight = max_in_flight;
        self.spawn_ingress_with(cfg).await
    }

    /// Starts a worker in this process.
    pub async fn spawn_worker(&self) -> Running {
        self.spawn_worker_with(self.worker_config()).await
    }

    /// Starts a worker with the given settings.
    pub async fn spawn_worker_with(&self, cfg: WorkerConfig) -> Running {
        let worker = Worker::build(cfg).await.expect("worker starts");
        let assignment = Some(worker.assignment());
        let metrics = worker.metrics_addr();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(stop.clone()));
        Running {
            addr: None,
            metrics,
            assignment,
            stop,
            handle,
        }
    }

    /// A binary of ours, configured for this test's services, topics and
    /// key prefix.
    fn command(&self, binary: PathBuf) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("DATABASE_URL", &self.common.database_url)
            .env("REDIS_URL", &self.common.redis_url)
            .env(
                "FIRSTCOME_REDIS_CLUSTER",
                self.common.redis_cluster.to_string(),
            )
            .env("KAFKA_BROKERS", &self.common.kafka_brokers)
            .env("FIRSTCOME_REDIS_PREFIX", &self.common.redis_prefix)
            .env("FIRSTCOME_REQUEST_TOPIC", &self.common.request_topic)
            .env("FIRSTCOME_DLQ_TOPIC", &self.common.dlq_topic)
            .env("FIRSTCOME_METRICS_LISTEN", "127.0.0.1:0")
            .kill_on_drop(true);
        cmd
    }

    /// The real worker binary, configured for this test's topics, group and
    /// key prefix; add the subcommand and its arguments.
    pub fn worker_command(&self) -> tokio::process::Command {
        let mut cmd = self.command(worker_binary());
        cmd.env("FIRSTCOME_GROUP_ID", &self.group_id)
            // As in `worker_config`: a sweep reaches every test's coupons.
            .env("FIRSTCOME_RETIRE_INTERVAL_MS", "0");
        cmd
    }

    /// The real ingress binary, configured for this test, listening on `listen`.
    pub fn ingress_command(&self, listen: SocketAddr) -> tokio::process::Command {
        self.ingress_command_of(ingress_binary(), listen)
    }

    /// An ingress binary (see [`otel_ingress_binary`]), configured for this
    /// test, listening on `listen`.
    pub fn ingress_command_of(
        &self,
        binary: PathBuf,
        listen: SocketAddr,
    ) -> tokio::process::Command {
        let mut cmd = self.command(binary);
        cmd.env("FIRSTCOME_LISTEN", listen.to_string())
            .env("FIRSTCOME_ADMIN_TOKEN", &self.admin_token)
            // As in `ingress_config`.
            .env("FIRSTCOME_SOLD_OUT_CHECK_MS", "0");
        cmd
    }

    /// Starts the worker binary as a child process, so a test can kill it
    /// for real.
    pub fn spawn_worker_process(&self, max_batch: usize) -> tokio::process::Child {
        self.worker_command()
            .arg("run")
            .env("FIRSTCOME_SESSION_TIMEOUT_MS", "6000")
            .env("FIRSTCOME_COMMIT_INTERVAL_MS", "200")
            .env("FIRSTCOME_MAX_BATCH", max_batch.to_string())
            .env("FIRSTCOME_PARTITION_BUFFER", (max_batch * 4).to_string())
            .spawn()
            .expect("the worker binary starts")
    }

    /// Writes records straight to this test's request topic, keyed as given,
    /// as another writer than the ingress would; waits for each
    /// acknowledgement.
    pub async fn produce_raw(&self, records: &[(&str, &str)]) {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = firstcome::kafka::producer_config(
            &self.common,
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .unwrap()
        .create()
        .unwrap();
        for (key, value) in records {
            let record = FutureRecord::to(&self.common.request_topic)
                .key(*key)
                .payload(*value);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap_or_else(|(e, _)| panic!("producing a raw record: {e}"));
        }
    }

    /// How many requests of `coupons` the ledger holds.
    pub async fn decided_count(&self, coupons: &[&str]) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM request_ledger WHERE coupon_id = ANY($1)")
            .bind(coupons)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until at least `n` requests of `coupons` are in the ledger.
    pub async fn wait_decided(&self, coupons: &[&str], n: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while self.decided_count(coupons).await < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {n} requests decided after 90 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `firstcome-worker reconcile` of these coupons: the worst exit code
    /// and the tables.
    pub async fn reconcile(&self, coupons: &[&str]) -> (i32, String) {
        let (mut worst, mut text) = (0, String::new());
        for c in coupons {
            let out = self
                .worker_command()
                .args(["reconcile", "--coupon", c])
                .output()
                .await
                .unwrap();
            worst = worst.max(out.status.code().unwrap());
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        (worst, text)
    }

    /// The Redis epoch Postgres holds for a coupon (see `firstcome::state`).
    pub async fn epoch(&self, coupon: &str) -> i64 {
        sqlx::query_scalar("SELECT redis_epoch FROM coupon WHERE coupon_id = $1")
            .bind(coupon)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// An HTTP client for `ingress`.
    pub fn client(&self, ingress: &Running) -> Client {
        self.client_at(ingress.addr.expect("an ingress has an address"))
    }

    /// An HTTP client of the ingress at `addr`.
    pub fn client_at(&self, addr: SocketAddr) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            admin_token: self.admin_token.clone(),
        }
    }

    /// Every record of the request topic, in (partition, offset) order.
    pub fn read_request_log(&self) -> Vec<LogRecord> {
        read_topic(&self.common, &self.common.request_topic)
    }

    /// Every record of the dead-letter topic.
    pub fn read_dead_letters(&self) -> Vec<LogRecord> {
        read_topic(&self.common, &self.common.dlq_topic)
    }
}

/// A well-formed issue request value for `coupon` and `user` (as the
/// ingress would write it): its request id and its JSON.
pub fn request_value(coupon: &str, user: &str) -> (String, String) {
    let id = uuid::Uuid::now_v7().to_string();
    let value = serde_json::json!({
        "request_id": id, "coupon_id": coupon, "user_id": user,
        "accepted_at": "2026-11-24T00:00:00Z",
    });
    (id, value.to_string())
}

/// The `firstcome-worker` binary, built now if it is missing or stale.
pub fn worker_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary("firstcome-worker"))
        .clone()
}

/// The ingress binary, built once per test process.
pub fn ingress_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary("firstcome-ingress"))
        .clone()
}

/// The benchmark tool, built once per test process.
pub fn bench_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary("firstcome-bench"))
        .clone()
}

fn build_binary(name: &str) -> PathBuf {
    build_binary_with(name, None)
}

/// Waits until an ingress started as a process answers on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("http://{addr}/healthz"))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ingress never listened on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ingress binary built with the `otel` feature, in a target directory
/// of its own (`target/otel`) so it never replaces the usual one.
pub fn otel_ingress_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary_with("firstcome-ingress", Some("otel")))
        .clone()
}

fn build_binary_with(name: &str, feature: Option<&str>) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet"]).current_dir(&root);
    match feature {
        // Apart, so it never replaces the usual binary.
        Some(feature) => {
            target = target.join(feature);
            cmd.args(["-p", name, "--bin", name, "--features", feature])
                .arg("--target-dir")
                .arg(&target);
        }
        // The whole workspace with its tests, as `cargo nextest run
        // --workspace` and `scripts/stack` build it: cargo unifies features
        // per invocation, so any other selection would build every
        // dependency again. Under `scripts/test` it is already done.
        None => {
            cmd.args(["--workspace", "--all-targets"]);
        }
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building {name} failed");
    target.join("debug").join(name)
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
    /// Its headers, as text.
    pub headers: HashMap<String, String>,
}

/// Reads a whole topic from the beginning to the high watermark of each partition.
pub fn read_topic(common: &CommonConfig, topic: &str) -> Vec<LogRecord> {
    use rdkafka::message::Headers;
    firstcome::kafka::read_topic(common, topic, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("reading {topic}: {e:#}"))
        .into_iter()
        .map(|m| LogRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                            (h.key.to_owned(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// A component running in this process.
pub struct Running {
    /// The HTTP address, for an ingress.
    pub addr: Option<SocketAddr>,
    /// The operations port (`/metrics`).
    pub metrics: SocketAddr,
    /// The partitions a worker owns.
    pub assignment: Option<tokio::sync::watch::Receiver<BTreeSet<i32>>>,
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until this worker owns partitions and `ok` holds for them.
    pub async fn wait_assignment(&self, what: &str, ok: impl Fn(&BTreeSet<i32>) -> bool) {
        let mut rx = self
            .assignment
            .clone()
            .expect("only a worker has an assignment");
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|a| ok(a)))
            .await
            .unwrap_or_else(|_| panic!("worker assignment never became {what}"))
            .expect("worker alive");
    }

    /// Stops it gracefully and waits until it is done.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("stops within 30 s")
            .expect("task did not panic")
            .expect("ran without error");
    }
}

/// A thin HTTP client of the public API.
#[derive(Clone)]
pub struct Client {
    /// The client.
    pub http: reqwest::Client,
    /// `http://host:port`.
    pub base: String,
    admin_token: String,
}

impl Client {
    /// Creates a coupon with the admin token; returns the status and body.
    pub async fn create_coupon(&self, id: &str, stock: i64) -> (u16, Value) {
        self.create_coupon_with(json!({
            "coupon_id": id, "name": format!("coupon {id}"), "total_stock": stock,
            "starts_at": null, "ends_at": null,
        }))
        .await
    }

    /// Creates a coupon from a raw body with the admin token.
    pub async fn create_coupon_with(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/coupons", self.base))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// `POST /v1/coupons/{id}/issue`.
    pub async fn issue(&self, coupon: &str, user: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/coupons/{coupon}/issue", self.base))
            .json(&json!({ "user_id": user }))
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// `GET` a path of the API.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// Polls a request until its status is final; panics after `limit`.
    pub async fn wait_final(&self, request_id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (code, body) = self.get(&format!("/v1/issue-requests/{request_id}")).await;
            assert_eq!(code, 200, "status lookup of {request_id}: {body}");
            if body["status"] != "pending" {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {request_id} still pending after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Status code and JSON body (or `null` for an empty body).
pub async fn split(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON: {text}"))
    };
    (code, body)
}

/// A TCP proxy in front of a real service, to cut the connection for real:
/// while cut, open connections are dropped and new ones closed at once.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = tokio::sync::watch::channel(true);
        let state = open.clone();
        let target = target.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = state.subscribe();
                if !*cut.borrow() {
                    continue; // dropped: the client sees its connection closed
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open, accept }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// `url` with its `host:port` replaced by this proxy's address.
    pub fn rewrite(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let host_start = auth.rfind('@').map_or(0, |i| i + 1);
        format!("{scheme}://{}{}{path}", &auth[..host_start], self.addr)
    }

    /// The `host:port` of a URL.
    pub fn target_of(url: &str) -> String {
        let rest = url.split_once("://").expect("a URL with a scheme").1;
        let auth = &rest[..rest.find('/').unwrap_or(rest.len())];
        auth[auth.rfind('@').map_or(0, |i| i + 1)..].to_owned()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Waits until every accepted request of `coupons` (id, stock) is decided,
/// then checks the promise against the request log: each coupon sits in one
/// partition; its issued users are exactly the first `stock` distinct users
/// in log order; every request got the decision its place in the log
/// implies, once; nobody holds a coupon twice; the counters add up; the
/// ledger knows where each request sat. Demand must exceed every stock.
pub async fn check_promise(
    env: &TestEnv,
    client: &Client,
    coupons: &[(String, i64)],
    accepted: &std::collections::HashSet<String>,
    limit: Duration,
) {
    check_promise_with(env, client, coupons, accepted, &Default::default(), limit).await;
}

/// The decisions the request log implies: the oracle's replay
/// ([`firstcome::oracle`]).
pub type LogModel = firstcome::oracle::Replay;
/// An admin change as the oracle applies it (see `coupon_change`).
pub type RuleChange = firstcome::oracle::Change;
/// What decides a coupon's requests (see [`firstcome::oracle::Rules`]).
pub type CouponRules = firstcome::oracle::Rules;

/// Reads a coupon's changes from `coupon_change`, onto its creation stock
/// (its window is not read: tests that change windows pass their own).
pub async fn coupon_rules(env: &TestEnv, coupon: &str, stock: i64) -> CouponRules {
    let rows: Vec<(String, Value, Option<i64>)> = sqlx::query_as(
        "SELECT kind, detail, after_offset FROM coupon_change
         WHERE coupon_id = $1 ORDER BY applied_at, change_id",
    )
    .bind(coupon)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let time = |v: &Value| -> Option<chrono::DateTime<chrono::Utc>> {
        v.as_str().map(|t| t.parse().unwrap())
    };
    let changes = rows
        .into_iter()
        .map(|(kind, detail, after)| {
            let change = match kind.as_str() {
                "add_stock" => RuleChange::AddStock(detail["add"].as_i64().unwrap()),
                "close" => RuleChange::Close(time(&detail["at"]).unwrap()),
                "reopen" => RuleChange::Reopen(time(&detail["ends_at"])),
                other => panic!("unknown change {other}"),
            };
            (after, change)
        })
        .collect();
    CouponRules {
        changes,
        ..CouponRules::stock(stock)
    }
}

/// Replays the request log against the dead letters with the oracle; each
/// coupon has its stock and no window.
pub fn model(env: &TestEnv, coupons: &[(String, i64)]) -> LogModel {
    let rules: HashMap<String, CouponRules> = coupons
        .iter()
        .map(|(c, s)| (c.clone(), CouponRules::stock(*s)))
        .collect();
    model_with(env, &rules)
}

/// [`model`] with windows and admin changes.
pub fn model_with(env: &TestEnv, rules: &HashMap<String, CouponRules>) -> LogModel {
    use firstcome_worker::deadletter::Header;
    let topic = &env.common.request_topic;
    let dead: HashMap<(i32, i64), String> = env
        .read_dead_letters()
        .into_iter()
        .filter(|d| d.headers.get(Header::OriginalTopic.as_str()) == Some(topic))
        .map(|d| {
            let at = (
                d.headers[Header::OriginalPartition.as_str()]
                    .parse()
                    .unwrap(),
                d.headers[Header::OriginalOffset.as_str()].parse().unwrap(),
            );
            (at, d.headers[Header::ErrorKind.as_str()].clone())
        })
        .collect();
    let log = env
        .read_request_log()
        .into_iter()
        .map(|rec| firstcome::oracle::Logged {
            partition: rec.partition,
            offset: rec.offset,
            key: rec.key,
            payload: rec.payload,
        });
    firstcome::oracle::replay(log, &dead, rules)
}

/// Checks that the holders of `coupon` in `user_coupon` are exactly
/// `winners` (the model's issued users), nobody twice; returns how many.
pub async fn assert_holders(env: &TestEnv, coupon: &str, winners: &[String]) -> usize {
    use std::collections::HashSet;
    let issued: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = $1")
            .bind(coupon)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let issued_set: HashSet<&String> = issued.iter().collect();
    assert_eq!(
        issued.len(),
        issued_set.len(),
        "nobody holds {coupon} twice"
    );
    assert_eq!(
        issued_set,
        winners.iter().collect(),
        "the holders of {coupon} are its winners in log order"
    );
    issued.len()
}

/// [`check_promise`] after faults: `unconfirmed` requests (a 503 naming the
/// request, or records written around the ingress) may or may not be in the
/// log; those that are are decided like any other, those that are not are
/// unknown to the status endpoint. Dead-lettered records must all be
/// explained, and they decide nothing. Returns the model it checked against.
pub async fn check_promise_with(
    env: &TestEnv,
    client: &Client,
    coupons: &[(String, i64)],
    accepted: &std::collections::HashSet<String>,
    unconfirmed: &std::collections::HashSet<String>,
    limit: Duration,
) -> LogModel {
    use std::collections::HashSet;
    let ids: Vec<&str> = coupons.iter().map(|(c, _)| c.as_str()).collect();
    // Wait until the ledger holds what the log implies.
    let deadline = tokio::time::Instant::now() + limit;
    let m = loop {
        let m = model(env, coupons);
        let decided = env.decided_count(&ids).await;
        if decided as usize == m.expected.len() && m.unexplained.is_empty() {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{decided} of {} decided; undecided positions without a dead letter: {:?}",
            m.expected.len(),
            &m.unexplained[..m.unexplained.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let lost: Vec<&String> = accepted.difference(&m.logged).take(5).collect();
    assert!(lost.is_empty(), "accepted but not in the log: {lost:?}");
    let strangers: Vec<&String> = m
        .logged
        .iter()
        .filter(|id| !accepted.contains(*id) && !unconfirmed.contains(*id))
        .take(5)
        .collect();
    assert!(
        strangers.is_empty(),
        "in the log, never sent: {strangers:?}"
    );
    let undecided: Vec<&String> = m
        .logged
        .iter()
        .filter(|id| !m.expected.contains_key(*id) && !m.dead_ids.contains(*id))
        .take(5)
        .collect();
    assert!(
        undecided.is_empty(),
        "in the log, but neither decided nor failed: {undecided:?}"
    );

    // Every request got exactly the decision its place in the log implies,
    // once, and the ledger says where that place was.
    let ledger: Vec<(uuid::Uuid, String, i32, i64)> = sqlx::query_as(
        "SELECT request_id, status, kafka_partition, kafka_offset
         FROM request_ledger WHERE coupon_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let got: HashMap<String, (String, i32, i64)> = ledger
        .into_iter()
        .map(|(id, status, p, o)| (id.to_string(), (status, p, o)))
        .collect();
    let mismatches: Vec<_> = m
        .expected
        .iter()
        .filter(|(id, (want, p, o))| got.get(*id) != Some(&((*want).to_owned(), *p, *o)))
        .take(5)
        .map(|(id, want)| (id, want, got.get(id)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "decisions differ from log order (id, expected, ledger): {mismatches:?}"
    );
    assert_eq!(
        got.len(),
        m.expected.len(),
        "no ledger row without a log record"
    );

    for (coupon, stock) in coupons {
        assert_eq!(
            m.partitions.get(coupon).map(HashSet::len),
            Some(1),
            "all of {coupon} sits in one partition"
        );
        let winners = m.winners.get(coupon).cloned().unwrap_or_default();
        assert_eq!(
            winners.len() as i64,
            *stock,
            "demand exceeds the stock of {coupon}"
        );
        // The issued users in Postgres are exactly the first `stock` distinct users.
        assert_holders(env, coupon, &winners).await;
        let (code, view) = client.get(&format!("/v1/coupons/{coupon}")).await;
        assert_eq!(code, 200);
        let (remaining, count) = (
            view["remaining_stock"].as_i64().unwrap(),
            view["issued_count"].as_i64().unwrap(),
        );
        assert_eq!((remaining, count), (0, *stock), "{view}");
        assert_eq!(remaining + count, view["total_stock"].as_i64().unwrap());
    }

    let mut statuses: std::collections::BTreeMap<&str, usize> = Default::default();
    for (status, _, _) in m.expected.values() {
        *statuses.entry(status).or_default() += 1;
    }
    eprintln!(
        "promise held: {} log records, {} requests accepted (202), {} unconfirmed (503), \
         statuses {statuses:?}, dead letters {:?}",
        m.records,
        accepted.len(),
        unconfirmed.len(),
        m.dead
    );

    // Through the API: a sample of the accepted, and the unconfirmed.
    for id in accepted.iter().take(20) {
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        assert_eq!(code, 200);
        assert_eq!(status["status"], got[id].0.as_str());
    }
    for id in unconfirmed.iter().take(50) {
        let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
        match got.get(id) {
            Some((want, _, _)) => assert_eq!((code, &status["status"]), (200, &json!(want))),
            None => assert_eq!(code, 404, "never written, so unknown: {status}"),
        }
    }
    m
}

/// Sends `total` issue requests from 8 concurrent clients in the background,
/// request `i` to coupon `i % coupons.len()` for user `user(i)`, pausing
/// `pace` between a client's requests. Every request must be accepted; the
/// handle resolves to the ids of all of them.
pub fn spawn_load(
    client: &Client,
    coupons: &[(String, i64)],
    total: usize,
    pace: Duration,
    user: fn(usize) -> String,
) -> JoinHandle<std::collections::HashSet<String>> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<JoinHandle<Vec<String>>> = (0..8)
        .map(|_| {
            let (client, next, coupons) = (client.clone(), next.clone(), coupons.to_vec());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return accepted;
                    }
                    let coupon = &coupons[i % coupons.len()].0;
                    let (code, body) = client.issue(coupon, &user(i)).await;
                    assert_eq!(code, 202, "request {i}: {body}");
                    accepted.push(body["request_id"].as_str().unwrap().to_owned());
                    tokio::time::sleep(pace).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut all = std::collections::HashSet::new();
        for s in senders {
            all.extend(s.await.expect("a load client panicked"));
        }
        assert_eq!(
            all.len(),
            total,
            "every request accepted once, with its own id"
        );
        all
    })
}

/// What [`spawn_open_load`] saw.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Request ids answered 202.
    pub accepted: std::collections::HashSet<String>,
    /// Request ids answered 503 (not confirmed; maybe written).
    pub unconfirmed: std::collections::HashSet<String>,
    /// The longest a 503 took to arrive.
    pub slowest_refusal: Duration,
    /// When the last 503 was answered.
    pub last_refusal: Option<tokio::time::Instant>,
    /// When each 202 was answered.
    pub accepted_at: Vec<tokio::time::Instant>,
}

/// Eight clients issuing requests over `coupons` round robin until `stop`
/// fires; a 503 must name its request (it may have been written), anything
/// but 202 or 503 fails the test.
pub fn spawn_open_load(
    client: &Client,
    coupons: &[(String, i64)],
    pace: Duration,
    user: fn(usize) -> String,
    stop: CancellationToken,
) -> JoinHandle<LoadOutcome> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<JoinHandle<LoadOutcome>> = (0..8)
        .map(|_| {
            let (client, next, coupons) = (client.clone(), next.clone(), coupons.to_vec());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = LoadOutcome::default();
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let coupon = &coupons[i % coupons.len()].0;
                    let started = tokio::time::Instant::now();
                    let (code, body) = client.issue(coupon, &user(i)).await;
                    let id = body["request_id"].as_str().map(str::to_owned);
                    match code {
                        202 => {
                            seen.accepted.insert(id.expect("a 202 names its request"));
                            seen.accepted_at.push(tokio::time::Instant::now());
                        }
                        503 => {
                            seen.unconfirmed.insert(
                                id.unwrap_or_else(|| panic!("a 503 names its request: {body}")),
                            );
                            seen.slowest_refusal = seen.slowest_refusal.max(started.elapsed());
                            seen.last_refusal = Some(tokio::time::Instant::now());
                        }
                        _ => panic!("request {i}: {code} {body}"),
                    }
                    tokio::time::sleep(pace).await;
                }
                seen
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut all = LoadOutcome::default();
        for s in senders {
            let seen = s.await.expect("a load client panicked");
            all.accepted.extend(seen.accepted);
            all.unconfirmed.extend(seen.unconfirmed);
            all.slowest_refusal = all.slowest_refusal.max(seen.slowest_refusal);
            all.last_refusal = all.last_refusal.max(seen.last_refusal);
            all.accepted_at.extend(seen.accepted_at);
        }
        all
    })
}

/// An ingress and a worker (batches of `max_batch`, every partition
/// assigned) over freshly created coupons: how every fault scenario starts.
pub struct Sale {
    /// The ingress.
    pub ingress: Running,
    /// The worker.
    pub worker: Running,
    /// A client of the ingress.
    pub client: Client,
    /// Coupon ids and stocks.
    pub coupons: Vec<(String, i64)>,
}

impl Sale {
    /// The coupon ids.
    pub fn ids(&self) -> Vec<&str> {
        self.coupons.iter().map(|(c, _)| c.as_str()).collect()
    }

    /// Stops the worker, then the ingress.
    pub async fn close(self) {
        self.worker.stop().await;
        self.ingress.stop().await;
    }
}

impl TestEnv {
    /// Opens a sale of the coupons `stocks` (name, stock); see [`Sale`].
    pub async fn open_sale(&self, stocks: &[(&str, i64)], max_batch: usize) -> Sale {
        let ingress = self.spawn_ingress().await;
        let client = self.client(&ingress);
        let coupons: Vec<(String, i64)> = stocks
            .iter()
            .map(|(name, stock)| (self.coupon_id(name), *stock))
            .collect();
        for (id, stock) in &coupons {
            assert_eq!(client.create_coupon(id, *stock).await.0, 201);
        }
        let mut cfg = self.worker_config();
        cfg.max_batch = max_batch;
        let worker = self.spawn_worker_with(cfg).await;
        worker
            .wait_assignment("every partition", |a| a.len() == PARTITIONS as usize)
            .await;
        Sale {
            ingress,
            worker,
            client,
            coupons,
        }
    }
}

/// One scrape: every sample line as `name{labels}` → value, and the raw text.
pub struct Scrape {
    /// Every sample: `name{labels}` → value.
    pub samples: HashMap<String, f64>,
    /// The exposition as served.
    pub text: String,
}

impl Scrape {
    /// Scrapes the `/metrics` of the operations port at `addr`.
    pub async fn of(addr: SocketAddr) -> Self {
        let answer = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("the metrics port answers");
        assert_eq!(answer.status(), 200);
        let content_type = answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let text = answer.text().await.unwrap();
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample is `series value`");
                (series.to_owned(), value.parse().expect("a numeric value"))
            })
            .collect();
        Self { samples, text }
    }

    /// The value of one series, 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// The sum over every series of `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether the exposition names the metric (a sample, or its
    /// `# TYPE` line for a family with no label set yet).
    pub fn names(&self, exposed: &str) -> bool {
        self.samples
            .keys()
            .any(|s| s.split('{').next() == Some(exposed))
            || self.text.lines().any(|l| {
                l.starts_with("# TYPE ") && exposed.starts_with(l.split(' ').nth(2).unwrap())
            })
    }
}
