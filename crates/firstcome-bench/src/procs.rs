//! The binaries under test, run as child processes like in production: the
//! ingress and worker of this build, and this tool's own raw-HTTP and seed
//! servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::env::BenchEnv;

/// A binary built next to this one (same profile).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`)",
        path.display()
    );
    Ok(path)
}

/// A free port on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
}

/// A memory figure of process `pid` from `/proc/PID/status` (`VmHWM:`,
/// `VmRSS:`), in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Peak resident memory of process `pid` so far (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// Resident memory of process `pid` now (`VmRSS`), in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// CPU time process `pid` used so far (user + system), seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // Clock ticks of 1/100 s (USER_HZ on Linux).
    Some((utime + stime) / 100.0)
}

/// What the Kafka broker used over part of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerUsage {
    /// Its CPU time over the window as a share of the whole machine (all
    /// cores): 0.45 is 45 % of two cores.
    pub cpu_share: f64,
    /// Its CPU time per request or record of the window, microseconds.
    pub cpu_us_per_item: f64,
    /// Its peak resident memory since it started, MiB (the JVM's heap is
    /// fixed, so this is mostly heap, code and page tables); of a cluster,
    /// its largest node's.
    pub peak_rss_mib: Option<f64>,
}

/// Measures the broker `scripts/bench` started (`FIRSTCOME_BENCH_BROKER_PID`)
/// from [`BrokerMeter::start`] to [`BrokerMeter::finish`].
pub struct BrokerMeter {
    pids: Vec<u32>,
    cpu: f64,
    since: std::time::Instant,
}

impl BrokerMeter {
    /// Starts a window; `None` when the broker's pid is not known.
    pub fn start() -> Option<Self> {
        let pid: u32 = std::env::var("FIRSTCOME_BENCH_BROKER_PID")
            .ok()?
            .parse()
            .ok()?;
        Self::of(vec![pid])
    }

    /// Starts a window over the brokers `pids` together.
    pub fn of(pids: Vec<u32>) -> Option<Self> {
        let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<Option<f64>>()?;
        Some(Self {
            pids,
            cpu,
            since: std::time::Instant::now(),
        })
    }

    /// Ends the window, over which `items` requests or records went through.
    pub fn finish(self, items: u64) -> Option<BrokerUsage> {
        let now = self
            .pids
            .iter()
            .map(|p| cpu_seconds(*p))
            .sum::<Option<f64>>()?;
        let cpu = now - self.cpu;
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        Some(BrokerUsage {
            cpu_share: cpu / (self.since.elapsed().as_secs_f64() * cores),
            cpu_us_per_item: cpu * 1e6 / items.max(1) as f64,
            peak_rss_mib: self
                .pids
                .iter()
                .filter_map(|p| peak_rss_mib(*p))
                .reduce(f64::max),
        })
    }
}

/// CPU time of a set of processes over a window: Postgres (every process
/// named `postgres`: the postmaster, its backends and writers) or Redis
/// (the `redis-server` processes of given pids). A process that started
/// within the window counts whole; one that ended within it is lost (the
/// pools keep their backends for the whole of a scenario).
pub struct CpuMeter {
    pick: Box<dyn Fn() -> Vec<u32> + Send + Sync>,
    start: std::collections::HashMap<u32, f64>,
}

impl CpuMeter {
    /// Every process named `postgres`.
    pub fn postgres() -> Self {
        Self::of(Box::new(|| named("postgres")))
    }

    /// The processes `pids`.
    pub fn pids(pids: Vec<u32>) -> Self {
        Self::of(Box::new(move || pids.clone()))
    }

    fn of(pick: Box<dyn Fn() -> Vec<u32> + Send + Sync>) -> Self {
        let start = pick()
            .into_iter()
            .filter_map(|p| Some((p, cpu_seconds(p)?)))
            .collect();
        Self { pick, start }
    }

    /// CPU microseconds per item since the start, over `items` items.
    pub fn us_per(&self, items: u64) -> f64 {
        let used: f64 = (self.pick)()
            .into_iter()
            .filter_map(|p| Some(cpu_seconds(p)? - self.start.get(&p).copied().unwrap_or(0.0)))
            .sum();
        used * 1e6 / items.max(1) as f64
    }
}

/// The pids of the processes whose command is `name`.
fn named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// A running child and where it listens.
pub struct Proc {
    /// Killed when dropped (`kill_on_drop`), so a failed scenario leaves
    /// no process behind.
    pub child: Child,
    /// Its HTTP address, if it serves.
    pub addr: Option<SocketAddr>,
}

impl Proc {
    /// Peak resident memory so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        peak_rss_mib(self.child.id()?)
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.child.id()?)
    }

    /// SIGTERM, then waits (SIGKILL after 15 s).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Starts `cmd` and waits until `GET /healthz` on `addr` answers.
pub async fn serve(cmd: Command, addr: SocketAddr, what: &str) -> anyhow::Result<Proc> {
    serve_within(cmd, addr, what, Duration::from_secs(60)).await
}

/// [`serve`], waiting at most `limit`.
pub async fn serve_within(
    mut cmd: Command,
    addr: SocketAddr,
    what: &str,
    limit: Duration,
) -> anyhow::Result<Proc> {
    let child = cmd
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut child = child;
    let deadline = tokio::time::Instant::now() + limit;
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    while probe
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .is_err()
    {
        // A process that exited never listens: say so at once rather than
        // wait out the limit (the instruction count once waited 300 s on an
        // ingress that had given up connecting to Postgres under callgrind).
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{what} exited ({status}) before it listened on {addr}; its log is above"
            );
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Proc {
        child,
        addr: Some(addr),
    })
}

/// Settings of the binaries that the bench's own environment may override.
const PASSED_ON: [&str; 9] = [
    "FIRSTCOME_SOLD_OUT_CHECK",
    "FIRSTCOME_MAX_IN_FLIGHT",
    "FIRSTCOME_MAX_CONNECTIONS",
    "FIRSTCOME_MAX_BATCH",
    "FIRSTCOME_PARTITION_BUFFER",
    "FIRSTCOME_COMMIT_INTERVAL",
    "FIRSTCOME_PRODUCE_LINGER",
    "FIRSTCOME_PG_MAX_CONNECTIONS",
    "FIRSTCOME_KAFKA_OPTIONS",
];

/// A command for one of our binaries with the bench's settings.
pub fn command(env: &BenchEnv, binary: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(sibling(binary)?);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", &env.redis_url)
        .env("FIRSTCOME_REDIS_CLUSTER", env.redis_cluster.to_string())
        .env("KAFKA_BROKERS", &env.kafka_brokers)
        .env("FIRSTCOME_REDIS_PREFIX", &env.prefix)
        .env("FIRSTCOME_REQUEST_TOPIC", &env.request_topic)
        .env("FIRSTCOME_DLQ_TOPIC", &env.dlq_topic)
        .env("FIRSTCOME_DECISION_TOPIC", env.common().decision_topic)
        .env("FIRSTCOME_ADMIN_TOKEN", &env.admin_token)
        // The bench's clients name their users in the body (a trusted
        // network); the hostile scenario runs the ingress with tokens.
        .env("FIRSTCOME_IDENTITY", "body")
        .env("FIRSTCOME_GROUP_ID", &env.group_id)
        .env("FIRSTCOME_METRICS_LISTEN", "127.0.0.1:0")
        .env("FIRSTCOME_SESSION_TIMEOUT", &env.session_timeout);
    // Tuning knobs given to the bench reach the binaries (e.g.
    // `FIRSTCOME_MAX_BATCH=1000 scripts/bench --scenario drain`).
    for (k, v) in std::env::vars() {
        if PASSED_ON.contains(&k.as_str()) {
            cmd.env(k, v);
        }
    }
    Ok(cmd)
}

/// Starts the ingress.
pub async fn ingress(env: &BenchEnv) -> anyhow::Result<Proc> {
    let addr = free_addr();
    let mut cmd = command(env, "firstcome-ingress")?;
    cmd.env("FIRSTCOME_LISTEN", addr.to_string());
    serve(cmd, addr, "the ingress").await
}

/// Starts a worker.
pub fn worker(env: &BenchEnv) -> anyhow::Result<Proc> {
    worker_with(env, &[])
}

/// Starts the worker with extra settings (`FIRSTCOME_…` and their values).
pub fn worker_with(env: &BenchEnv, settings: &[(&str, &str)]) -> anyhow::Result<Proc> {
    let mut cmd = command(env, "firstcome-worker")?;
    cmd.arg("run").kill_on_drop(true);
    for (k, v) in settings {
        cmd.env(k, v);
    }
    let child = cmd.spawn().context("starting the worker")?;
    Ok(Proc { child, addr: None })
}

/// Starts one of this tool's own servers (`serve-raw-http`, `serve-seed`).
pub async fn own_server(env: &BenchEnv, subcommand: &str) -> anyhow::Result<Proc> {
    let addr = free_addr();
    let mut cmd = command(env, "firstcome-bench")?;
    cmd.arg(subcommand).args(["--listen", &addr.to_string()]);
    serve(cmd, addr, subcommand).await
}
