//! Private instances of the real servers, for the tests that kill, pause,
//! stop or wipe one: each test gets its own process on its own port and data
//! directory, so the fault hits nobody else. They use the binaries
//! `scripts/stack up` installed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free TCP port on 127.0.0.1, claimed for this process: no other test
/// process gets it while this one lives.
///
/// Taken below Linux's ephemeral range (32768-60999 by default): a port the
/// kernel hands out for `bind(0)` is also what it gives the next outgoing
/// connection of any test, which could take it between this check and the
/// server binding it (a private Postgres once failed to start so).
///
/// Free when asked is not enough: the server binds it only later (a private
/// Postgres after `initdb`, seconds on a busy machine), and another test
/// process could be handed the same port meanwhile (run i: "could not bind
/// … Address already in use" for a Postgres). So each port is also claimed
/// with an exclusive `flock` on a file of its own, held until this process
/// ends (the kernel lets go of it then, however the process ends).
pub fn free_port() -> u16 {
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static CLAIMED: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("firstcome-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    let start = uuid::Uuid::new_v4().as_u128() as u16 % SPAN;
    (0..SPAN)
        .map(|i| LOW + (start + i) % SPAN)
        .find(|p| {
            let Ok(file) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(p.to_string()))
            else {
                return false;
            };
            if file.try_lock().is_err() || TcpListener::bind(("127.0.0.1", *p)).is_err() {
                return false;
            }
            CLAIMED.lock().unwrap().push(file);
            true
        })
        .expect("a free port in 20000-31999")
}

/// A fresh directory for one instance's data, removed on drop.
fn scratch_dir(kind: &str) -> PathBuf {
    // Under /var/tmp, which the `postgres` user can reach when we run as root.
    let dir = PathBuf::from("/var/tmp").join(crate::unique(&format!("firstcome-test-{kind}-")));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Sends `signal` (e.g. `STOP`, `CONT`, `TERM`) to a process.
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Whether the Redis on `port` answers `PING` with `PONG` (not `LOADING`).
fn answers_ping(port: u16) -> bool {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .ok()
        .and_then(|c| {
            c.get_connection_with_timeout(Duration::from_millis(500))
                .ok()
        })
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok())
        .is_some_and(|p| p == "PONG")
}

/// A Redis server of its own, with AOF like the local stack.
pub struct PrivateRedis {
    /// A free port found at start, on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts it.
    pub async fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
        };
        r.run().await;
        r
    }

    async fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs; `scripts/stack up` installs it");
        self.child = Some(child);
        let port = self.port;
        // Open is not ready: started on a big AOF, Redis answers LOADING to
        // everything until it has read it (after a long soak, past the
        // nemesis's next fault).
        wait_until("redis", || port_open(port) && answers_ping(port)).await;
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `kill -9`, then deletes everything it stored, then starts it again on
    /// the same port: a Redis that lost all its data.
    pub async fn restart_wiped(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).unwrap();
        std::fs::create_dir_all(&self.dir).unwrap();
        self.run().await;
    }

    /// `kill -9`, then starts it again on the same data: a Redis that lost
    /// what its AOF had not written yet (up to its last second).
    pub async fn restart_killed(&mut self) {
        self.kill();
        self.run().await;
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `kill -9`; [`PrivateRedis::start_again`] brings it back.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts it again on its data and port, after [`PrivateRedis::stop`].
    pub async fn start_again(&mut self) {
        self.run().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `log` says, past its first `from` bytes, that a Kafka node
/// finished starting. Only that part is read: a node's log grows by
/// megabytes in a test, and reading it whole ten times a second took a
/// starved machine's CPU from the node it waited for.
fn kafka_started_since(log: &Path, from: u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else {
        return false;
    };
    let mut text = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut text).is_err() {
        return false;
    }
    let marker: &[u8] = b"Kafka Server started";
    text.windows(marker.len()).any(|w| w == marker)
}

/// How long `log` is now: where a start's own lines begin.
fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// One node of a [`PrivateKafka`]: broker and controller in one JVM, started
/// by `scripts/kafka-node` (which execs the JVM, so the child is the broker).
struct KafkaNode {
    id: usize,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Apache Kafka of its own: one node, or a KRaft cluster of several (each a
/// broker and a controller) with every topic replicated to three and two in
/// sync at least, as in production. Storage lives in a scratch directory, so
/// a node keeps its log across a `kill -9`; the jars are those
/// `scripts/stack up` installed.
pub struct PrivateKafka {
    nodes: Vec<KafkaNode>,
    cluster_id: String,
    voters: String,
    replication: usize,
    /// The client [`Self::metadata`] asks through, made at its first use.
    admin: std::sync::OnceLock<rdkafka::consumer::BaseConsumer>,
}

impl PrivateKafka {
    /// Starts a single node.
    pub async fn start() -> Self {
        Self::start_cluster(1).await
    }

    /// Starts a cluster of `n` nodes (replication `min(n, 3)`), all at once:
    /// a KRaft quorum elects its leader once a majority of it runs.
    pub async fn start_cluster(n: usize) -> Self {
        // Two ports a node, all different (each is only checked free).
        let mut ports = std::collections::BTreeSet::new();
        while ports.len() < 2 * n {
            ports.insert(free_port());
        }
        let mut ports = ports.into_iter();
        let nodes: Vec<KafkaNode> = (1..=n)
            .map(|id| KafkaNode {
                id,
                port: ports.next().unwrap(),
                controller_port: ports.next().unwrap(),
                dir: scratch_dir(&format!("kafka{id}")),
                child: None,
            })
            .collect();
        let voters = nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let out = Command::new(kafka_node_script())
            .arg("cluster-id")
            .output()
            .expect("scripts/kafka-node runs");
        let mut kafka = Self {
            nodes,
            cluster_id: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            voters,
            replication: n.min(3),
            admin: std::sync::OnceLock::new(),
        };
        for i in 0..n {
            kafka.spawn(i);
        }
        for i in 0..n {
            kafka.wait_started(i, 0).await;
        }
        kafka
    }

    fn spawn(&mut self, i: usize) {
        let kafka_dist = crate::stack_env()
            .remove("KAFKA_DIST")
            .expect("KAFKA_DIST missing from the stack env file; rerun `scripts/stack up`");
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("kafka.log"))
            .unwrap();
        let child = Command::new(kafka_node_script())
            .arg("run")
            .arg(&node.dir)
            .env("KAFKA_DIST", kafka_dist)
            .env("KAFKA_PORT", node.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", node.controller_port.to_string())
            .env("KAFKA_NODE_ID", node.id.to_string())
            .env("KAFKA_VOTERS", &self.voters)
            .env("KAFKA_CLUSTER_ID", &self.cluster_id)
            .env("KAFKA_REPLICATION", self.replication.to_string())
            // Quick to start on a starved core (see `scripts/kafka-node`):
            // a restart of the three-broker test on one core took past its
            // two minutes without it (docs/design.md, "Known limits").
            .env("KAFKA_QUICK", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("scripts/kafka-node runs");
        node.child = Some(child);
    }

    /// Waits until node `i` says it started in its log past byte `from`.
    async fn wait_started(&mut self, i: usize, from: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let log = self.nodes[i].dir.join("kafka.log");
        while !kafka_started_since(&log, from) {
            let node = &mut self.nodes[i];
            if let Some(status) = node.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                // The directory goes with the node: the log's end, here.
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                let format =
                    std::fs::read_to_string(node.dir.join("format.log")).unwrap_or_default();
                panic!(
                    "kafka node {} exited at start ({status}); the end of its log:\n{}\n{format}",
                    node.id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kafka node {} did not start in 2 minutes; its log is {}",
                node.id,
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its bootstrap addresses, every node's.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The replication factor its topics need.
    pub fn replication(&self) -> i32 {
        self.replication as i32
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no nodes (never: for clippy's sake).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Metadata of every topic, from whichever node answers. One client
    /// asks every time: a new one each time (ten a second while a test
    /// waits for a leader) was threads and connections to three brokers.
    fn metadata(&self) -> Option<rdkafka::metadata::Metadata> {
        use rdkafka::consumer::Consumer;
        if self.admin.get().is_none() {
            let client: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", self.brokers())
                .set("broker.address.family", "v4")
                .create()
                .ok()?;
            let _ = self.admin.set(client);
        }
        self.admin
            .get()?
            .fetch_metadata(None, Duration::from_secs(5))
            .ok()
    }

    /// The index of the node that leads `topic`'s `partition` now, if the
    /// cluster answers and the partition has a leader.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<usize> {
        let meta = self.metadata()?;
        let leader = meta
            .topics()
            .iter()
            .find(|t| t.name() == topic)?
            .partitions()
            .iter()
            .find(|p| p.id() == partition)?
            .leader();
        self.nodes.iter().position(|n| n.id as i32 == leader)
    }

    /// Waits until every partition of every topic, Kafka's own included, has
    /// its full set of in-sync replicas: what an operator checks (no
    /// under-replicated partitions) before restarting the next broker.
    pub async fn wait_fully_replicated(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let short: Vec<String> = match self.metadata() {
                Some(meta) => meta
                    .topics()
                    .iter()
                    .flat_map(|t| {
                        t.partitions()
                            .iter()
                            .filter(|p| p.isr().len() < self.replication || p.leader() < 0)
                            .map(move |p| format!("{}/{}", t.name(), p.id()))
                    })
                    .collect(),
                None => vec!["(no metadata)".to_owned()],
            };
            if short.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still under-replicated after 2 minutes: {:?}",
                &short[..short.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A clean shutdown of node `i` (`SIGTERM`, as an operator's rolling
    /// restart does): it hands its leaderships over and closes its logs.
    pub async fn stop(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("running");
        signal(child.id(), "TERM");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "kafka node {} did not stop in 2 minutes",
                self.nodes[i].id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts node `i` again after [`Self::kill`] or [`Self::stop`], on the
    /// data it had; returns once it says it started.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "stop it first");
        let before = log_len(&self.nodes[i].dir.join("kafka.log"));
        let from = tokio::time::Instant::now();
        self.spawn(i);
        self.wait_started(i, before).await;
        eprintln!(
            "kafka node {} started again in {:?}",
            self.nodes[i].id,
            from.elapsed()
        );
    }

    /// An operator's hands on this cluster's transactions, usable from
    /// another task.
    pub fn operator(&self) -> KafkaOperator {
        KafkaOperator {
            brokers: self.brokers(),
            ids: self.nodes.iter().map(|n| n.id).collect(),
        }
    }

    /// `SIGSTOP` of node `i`: the process is frozen, its connections stay
    /// open and silent.
    pub fn freeze(&self, i: usize) {
        signal(self.nodes[i].child.as_ref().expect("running").id(), "STOP");
    }

    /// `SIGCONT` after [`Self::freeze`].
    pub fn thaw(&self, i: usize) {
        signal(self.nodes[i].child.as_ref().expect("running").id(), "CONT");
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(c) = &self.nodes[i].child {
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
            self.kill(i);
            // A failed test names a node's log in its message: kept.
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.nodes[i].dir);
            }
        }
    }
}

/// Kafka's own transaction tool (`kafka-transactions.sh`, through
/// `scripts/kafka-node transactions`) on a [`PrivateKafka`], as the
/// runbook uses it (docs/operations.md, "Decision stream hanging").
#[derive(Clone)]
pub struct KafkaOperator {
    brokers: String,
    ids: Vec<usize>,
}

/// One transaction `find-hanging` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hanging {
    /// Its topic (`__consumer_offsets` for the group's offsets).
    pub topic: String,
    /// Its partition.
    pub partition: i64,
    /// The producer that left it open.
    pub producer_id: i64,
    /// The offset it starts at.
    pub start_offset: i64,
}

impl KafkaOperator {
    /// The transactions Kafka's `find-hanging` lists on any broker (open on
    /// a partition while their coordinator does not know them as open)
    /// that wrote nothing for `quiet`.
    pub fn hanging(&self, quiet: Duration) -> Vec<Hanging> {
        self.try_hanging(quiet)
            .unwrap_or_else(|e| panic!("scripts/kafka-node transactions find-hanging: {e}"))
    }

    /// [`Self::hanging`], or what the tool said when it could not look (a
    /// broker down or starting).
    pub fn try_hanging(&self, quiet: Duration) -> Result<Vec<Hanging>, String> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let mut found = Vec::new();
        for id in &self.ids {
            let out = self.output(&[
                "find-hanging",
                "--broker-id",
                &id.to_string(),
                "--max-transaction-timeout",
                "0",
            ]);
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            let out = String::from_utf8_lossy(&out.stdout);
            for line in out.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let n = |i: usize| cols[i].parse::<i64>().expect("a number");
                if cols.len() >= 7 && now_ms - n(6) >= quiet.as_millis() as i64 {
                    found.push(Hanging {
                        topic: cols[0].to_owned(),
                        partition: n(1),
                        producer_id: n(2),
                        start_offset: n(5),
                    });
                }
            }
        }
        Ok(found)
    }

    /// Aborts one transaction [`Self::hanging`] found. One that ended
    /// meanwhile is fine: aborting one partition of a lost transaction can
    /// end it on the others too (seen: its `__consumer_offsets` entry was
    /// gone by the time its turn came).
    pub fn abort(&self, h: &Hanging) {
        if let Err(said) = self.try_abort(h) {
            panic!("scripts/kafka-node transactions abort {h:?}: {said}");
        }
    }

    /// [`Self::abort`], or what the tool said when it could not.
    pub fn try_abort(&self, h: &Hanging) -> Result<(), String> {
        let args = [
            "abort",
            "--topic",
            &h.topic,
            "--partition",
            &h.partition.to_string(),
            "--start-offset",
            &h.start_offset.to_string(),
        ];
        let out = self.output(&args);
        let said = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || said.contains("Could not find any open transactions") {
            Ok(())
        } else {
            Err(said.into_owned())
        }
    }

    fn output(&self, args: &[&str]) -> std::process::Output {
        let kafka_dist = crate::stack_env()
            .remove("KAFKA_DIST")
            .expect("KAFKA_DIST missing from the stack env file; rerun `scripts/stack up`");
        Command::new(kafka_node_script())
            .arg("transactions")
            .args(["--bootstrap-server", &self.brokers])
            .args(args)
            .env("KAFKA_DIST", kafka_dist)
            .output()
            .expect("scripts/kafka-node runs")
    }
}

/// `scripts/kafka-node`, which starts one Kafka node.
fn kafka_node_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-node")
}

/// The directory of the Postgres server binaries.
fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("pg_ctl").exists())
        .expect("Postgres is not installed: run `scripts/stack up`, which installs it")
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a Postgres tool as the `postgres` user when we are root (Postgres
/// refuses to run as root).
fn pg_tool(tool: &str) -> Command {
    let path = pg_bin().join(tool);
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A Postgres server of its own.
pub struct PrivatePostgres {
    /// A free port found at start, on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl PrivatePostgres {
    /// Creates a cluster and starts it.
    pub async fn start() -> Self {
        let pg = Self {
            port: free_port(),
            dir: scratch_dir("pg"),
        };
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the Postgres directory");
        }
        let out = pg_tool("initdb")
            .arg("-D")
            .arg(pg.dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C.UTF-8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server().await;
        pg
    }

    /// Starts the server (after [`Self::stop`]).
    pub async fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start on port {}: {}\nthe server's log:\n{}",
            self.port,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
        );
    }

    /// Stops the server (`pg_ctl stop -m immediate`: every connection is cut
    /// at once, as in a crash).
    pub fn stop(&self) {
        let _ = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Prometheus server of its own (Debian's), scraping the given targets
/// every second and evaluating `deploy/prometheus/alerts.yml` every second.
pub struct PrivatePrometheus {
    /// A free port found at start, on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl PrivatePrometheus {
    /// Starts it over `targets`: (job, `host:port` of a `/metrics`).
    pub async fn start(rules: &Path, targets: &[(&str, std::net::SocketAddr)]) -> Self {
        let dir = scratch_dir("prometheus");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\nscrape_configs:\n",
            rules.display()
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus runs; `scripts/stack up` installs Debian's prometheus package");
        let p = Self { port, dir, child };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let up = reqwest::get(&ready)
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus did not come up: {}",
                std::fs::read_to_string(p.dir.join("prometheus.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        p
    }

    /// `GET /api/v1/<path>` with `query`; the `data` of a successful answer.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let answer: serde_json::Value = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .query(query)
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "success", "{path} {query:?}: {answer}");
        answer["data"].clone()
    }

    /// An instant query's samples, asserting it is a vector.
    pub async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self.api("query", &[("query", expr)]).await;
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        data["result"].as_array().unwrap().clone()
    }

    /// The alerts pending or firing now: (name, state).
    pub async fn alerts(&self) -> Vec<(String, String)> {
        Self::alerts_at(self.port).await
    }

    /// [`Self::alerts`] of the Prometheus on `port` (for a task of its own).
    pub async fn alerts_at(port: u16) -> Vec<(String, String)> {
        let answer: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{port}/api/v1/alerts"))
                .await
                .expect("prometheus answers")
                .json()
                .await
                .unwrap();
        assert_eq!(answer["status"], "success", "alerts: {answer}");
        answer["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_owned(),
                    a["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for PrivatePrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::free_port;

    /// Before the claim, 3,000 ports drawn from the 12,000 held repeats
    /// (by the birthday bound, nearly always); a repeat is two servers of
    /// the suite on one port.
    #[test]
    fn a_claimed_port_is_never_handed_out_again_while_its_process_lives() {
        let ports: std::collections::HashSet<u16> = (0..3_000).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 3_000);
    }
}
