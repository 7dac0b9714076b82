//! The binaries under test, run as child processes like in production: the
//! ingress and worker of this build, and this tool's own raw-HTTP and seed
//! servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
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

/// A running child and where it listens.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its HTTP address, if it serves.
    pub addr: Option<SocketAddr>,
}

impl Proc {
    /// Peak resident memory so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()?)).ok()?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces: utime and stime are the 12th and 13th of them.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: f64 = fields.next()?.parse().ok()?;
        let stime: f64 = fields.next()?.parse().ok()?;
        // Clock ticks of 1/100 s (USER_HZ on Linux).
        Some((utime + stime) / 100.0)
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
pub async fn serve(mut cmd: Command, addr: SocketAddr, what: &str) -> anyhow::Result<Proc> {
    let child = cmd
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("http://{addr}/healthz"))
        .await
        .is_err()
    {
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
const PASSED_ON: [&str; 8] = [
    "FIRSTCOME_SOLD_OUT_CHECK_MS",
    "FIRSTCOME_MAX_IN_FLIGHT",
    "FIRSTCOME_MAX_BATCH",
    "FIRSTCOME_PARTITION_BUFFER",
    "FIRSTCOME_COMMIT_INTERVAL_MS",
    "FIRSTCOME_PRODUCE_LINGER_MS",
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
        .env("KAFKA_BROKERS", &env.kafka_brokers)
        .env("FIRSTCOME_REDIS_PREFIX", &env.prefix)
        .env("FIRSTCOME_REQUEST_TOPIC", &env.request_topic)
        .env("FIRSTCOME_DLQ_TOPIC", &env.dlq_topic)
        .env("FIRSTCOME_ADMIN_TOKEN", &env.admin_token)
        .env("FIRSTCOME_GROUP_ID", &env.group_id)
        .env("FIRSTCOME_METRICS_LISTEN", "127.0.0.1:0")
        .env(
            "FIRSTCOME_SESSION_TIMEOUT_MS",
            env.session_timeout_ms.to_string(),
        );
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
    let child = command(env, "firstcome-worker")?
        .arg("run")
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker")?;
    Ok(Proc { child, addr: None })
}

/// Starts one of this tool's own servers (`serve-raw-http`, `serve-seed`).
pub async fn own_server(env: &BenchEnv, subcommand: &str) -> anyhow::Result<Proc> {
    let addr = free_addr();
    let mut cmd = command(env, "firstcome-bench")?;
    cmd.arg(subcommand).args(["--listen", &addr.to_string()]);
    serve(cmd, addr, subcommand).await
}
