//! Running the binaries: in this process (`spawn_ingress`, `spawn_worker`),
//! configured from their own parsers plus the test's overrides, or as
//! child processes from freshly built binaries.

use super::*;

impl TestEnv {
    /// The ingress settings for this test, on a free port.
    pub fn ingress_config(&self) -> IngressConfig {
        let mut cfg: IngressConfig = parsed(
            "firstcome-ingress",
            &self.common,
            // Tests name their users in the body; tests/identity.rs checks
            // the verified modes.
            &["--admin-token", &self.admin_token, "--identity", "body"],
        );
        cfg.common = self.common.clone();
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
        // Tests open more connections at once than one replica's default
        // allows in production (tests/bounds.rs checks the bound itself).
        cfg.max_connections = 4_096;
        // A test that stops an ingress waits at most this for it.
        cfg.shutdown_timeout = Duration::from_millis(5_000);
        // Off: most tests check what the log decides for requests past the
        // stock; `api.rs` tests the short-circuit.
        cfg.sold_out_check = Duration::from_millis(0);
        // The tests' keys leave the shared Redis within the hour.
        cfg.idempotency_ttl = Duration::from_secs(3_600);
        cfg
    }

    /// The worker settings for this test: the binary's defaults, with a
    /// short session so joins are quick, small batches so a test's few
    /// records still make several, and quick retries.
    pub fn worker_config(&self) -> WorkerConfig {
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            cfg: WorkerConfig,
        }
        let Run { mut cfg } = parsed("firstcome-worker", &self.common, &[]);
        cfg.common = self.common.clone();
        cfg.group_id = self.group_id.clone();
        cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
        cfg.stats_interval = Duration::from_millis(1_000);
        cfg.session_timeout = Duration::from_millis(6_000);
        cfg.commit_interval = Duration::from_millis(500);
        cfg.max_batch = 200;
        cfg.partition_buffer = 2_000;
        cfg.retry_initial = Duration::from_millis(50);
        cfg.retry_max = Duration::from_millis(1_000);
        cfg.shutdown_timeout = Duration::from_millis(10_000);
        // Off: a sweep retires the ended coupons of the whole database,
        // other tests' too; tests/bounds.rs turns it on, on a Postgres of
        // its own.
        cfg.retire_interval = Duration::from_millis(0);
        cfg
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
        cfg.produce_timeout = Duration::from_millis(produce_timeout_ms);
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

    /// What a worker's partition tasks share, for driving
    /// `firstcome_worker::pipeline::process` by hand: the test's services,
    /// and offsets that are stored nowhere (no consumer group).
    pub async fn pipeline_shared(&self) -> std::sync::Arc<firstcome_worker::services::Shared> {
        struct Nowhere;
        impl firstcome_worker::offsets::Offsets for Nowhere {
            fn store(&self, _: i32, _: i64) -> anyhow::Result<()> {
                Ok(())
            }
            fn high_watermark(&self, _: i32) -> anyhow::Result<i64> {
                Ok(0)
            }
            fn log_start(&self, _: i32) -> anyhow::Result<i64> {
                Ok(0)
            }
            fn committed(&self, _: i32) -> anyhow::Result<i64> {
                Ok(0)
            }
        }
        let cfg = self.worker_config();
        let redis = cfg
            .common
            .connect_redis(Duration::from_secs(5))
            .await
            .unwrap();
        let keys = cfg.common.keys().unwrap();
        let dlq = firstcome::kafka::HealingProducer::new(
            firstcome::kafka::producer_config(&cfg.common, Duration::from_secs(10), Duration::ZERO)
                .unwrap(),
        )
        .unwrap();
        std::sync::Arc::new(firstcome_worker::services::Shared {
            states: firstcome::state::CouponState::new(redis.clone(), keys.clone()),
            statuses: firstcome::status::StatusCache::new(redis, keys, cfg.common.status_ttl()),
            pool: self.pool.clone(),
            dlq,
            offsets: std::sync::Arc::new(Nowhere),
            stream: None,
            metrics: firstcome_worker::metrics::WorkerMetrics::new(),
            liveness: firstcome::ops::Liveness::default(),
            cfg,
        })
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
            .env("FIRSTCOME_DECISION_TOPIC", &self.common.decision_topic)
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
            .env("FIRSTCOME_RETIRE_INTERVAL", "0ms");
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
            .env("FIRSTCOME_IDENTITY", "body")
            .env("FIRSTCOME_SOLD_OUT_CHECK", "0ms");
        cmd
    }

    /// Starts the worker binary as a child process, so a test can kill it
    /// for real.
    pub fn spawn_worker_process(&self, max_batch: usize) -> tokio::process::Child {
        self.worker_command()
            .arg("run")
            .env("FIRSTCOME_SESSION_TIMEOUT", "6000ms")
            .env("FIRSTCOME_COMMIT_INTERVAL", "200ms")
            .env("FIRSTCOME_MAX_BATCH", max_batch.to_string())
            .env("FIRSTCOME_PARTITION_BUFFER", (max_batch * 4).to_string())
            .spawn()
            .expect("the worker binary starts")
    }
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
