//! Counting, not timing: the instructions the ingress executes per accepted
//! request and the worker per decided record, under callgrind, broken down
//! by layer.
//!
//! Wall-clock figures on a shared two-core machine move by ±30 % from one
//! run to the next; the instructions a fixed workload executes move by a
//! few per mille. The binary under test runs under `valgrind
//! --tool=callgrind` (some 50 × slower, so the workload is small and
//! closed-loop); after a warm-up the counters are zeroed (`callgrind_control
//! --zero`), the measured workload runs, and a dump (`callgrind_control
//! --dump`) holds exactly its cost. Callgrind sees the process's own code in
//! every thread (librdkafka's included) but not the kernel (system calls,
//! TCP) nor the other processes (broker, Redis, Postgres): those are in the
//! benchmark's CPU time per request, not here.
//!
//! # Layout
//! - [`Profile`]: a callgrind dump, read into self and call costs per function
//! - [`Layer`]: a named set of functions; its cost is the instructions
//!   executed while one of them is on the stack
//! - [`ingress`], [`raw_http`], [`worker`]: the workloads and their layers

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::process::Command;

use crate::env::BenchEnv;
use crate::load;
use crate::procs::{self, Proc};
use crate::scenarios;

mod profile;

pub use profile::{Layer, Profile};
use profile::{layer, step};

/// One layer's share of the work.
#[derive(Debug, Clone, Serialize)]
pub struct LayerCost {
    /// The layer.
    pub layer: String,
    /// Its instructions per unit (request or record).
    pub per_unit: f64,
    /// Its share of every instruction of the process.
    pub share: f64,
}

/// A counted workload.
#[derive(Debug, Clone, Serialize)]
pub struct Count {
    /// Which binary and workload.
    pub target: String,
    /// What one unit is ("accepted request", "decided record").
    pub unit: String,
    /// Units in the measured window.
    pub units: u64,
    /// Every instruction of the process per unit.
    pub per_unit: f64,
    /// The layers, in the order of their definition; layers may nest (a
    /// handler's layer holds its parts'), which their names say.
    pub layers: Vec<LayerCost>,
    /// The functions with the most own instructions per unit.
    pub top: Vec<(String, f64)>,
}

impl Count {
    fn of(target: &str, unit: &str, units: u64, profile: &Profile, layers: &[Layer]) -> Self {
        let total = profile.total() as f64;
        let n = units.max(1) as f64;
        Count {
            target: target.to_owned(),
            unit: unit.to_owned(),
            units,
            per_unit: total / n,
            layers: layers
                .iter()
                .map(|l| {
                    let c = profile.cost(l) as f64;
                    LayerCost {
                        layer: l.name.to_owned(),
                        per_unit: c / n,
                        share: c / total.max(1.0),
                    }
                })
                .collect(),
            top: profile
                .top_own(25)
                .into_iter()
                .map(|(name, c)| (name.to_owned(), c as f64 / n))
                .collect(),
        }
    }

    /// The Markdown table of the layers.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}: {:.0} instructions per {} ({} {}s counted)\n\n| layer | instructions per {} | share |\n|---|---|---|\n",
            self.target, self.per_unit, self.unit, self.units, self.unit, self.unit
        );
        for l in &self.layers {
            s += &format!(
                "| {} | {:.0} | {:.1} % |\n",
                l.layer,
                l.per_unit,
                l.share * 100.0
            );
        }
        s += "\nMost own instructions:\n\n| function | per unit |\n|---|---|\n";
        for (f, c) in &self.top {
            s += &format!("| `{}` | {:.0} |\n", f.replace('|', "\\|"), c);
        }
        s
    }
}

/// A process running under callgrind, whose counters can be zeroed and
/// dumped while it runs.
struct Counted {
    proc: Proc,
    pid: u32,
    out: PathBuf,
}

/// Wraps `cmd`'s program in `valgrind --tool=callgrind`, writing to
/// `DIR/WHAT.callgrind` (returned) with no dump of an earlier run there.
fn under_callgrind(cmd: &Command, dir: &Path, what: &str) -> (Command, PathBuf) {
    let out = dir.join(format!("{what}.callgrind"));
    let _ = std::fs::remove_file(format!("{}.1", out.display()));
    let std = cmd.as_std();
    let mut c = Command::new("valgrind");
    c.args([
        "--tool=callgrind",
        "--quiet",
        // Costs per function, not per instruction: a small dump.
        "--dump-instr=no",
        "--dump-line=no",
    ])
    .arg(format!("--callgrind-out-file={}", out.display()))
    .arg(std.get_program())
    .args(std.get_args())
    .env_clear();
    for (k, v) in std.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    // Some 50 times slower, so every wall-clock limit is raised (they
    // change what happens, not what a request costs): a new Postgres
    // connection's password exchange alone passed the usual 3 s on a busy
    // machine and the binary gave up at start (what made the suite's count
    // test hang, waiting for it); on one core's worth of CPU the broker's
    // acknowledgement passed the 5 s produce timeout, and a kept-alive
    // connection idle through `callgrind_control` passed the 10 s
    // header-read timeout and was closed under the client.
    for (setting, ms) in [
        ("FIRSTCOME_PG_ACQUIRE_TIMEOUT", "60s"),
        ("FIRSTCOME_PRODUCE_TIMEOUT", "60s"),
        ("FIRSTCOME_REQUEST_TIMEOUT", "120s"),
        ("FIRSTCOME_HEADER_READ_TIMEOUT", "120s"),
    ] {
        c.env(setting, ms);
    }
    (c, out)
}

impl Counted {
    /// Zeroes the counters: what follows is measured.
    async fn zero(&self) -> anyhow::Result<()> {
        control(self.pid, "--zero").await
    }

    /// Dumps the counters since the last zero and reads them.
    async fn dump(&self) -> anyhow::Result<Profile> {
        control(self.pid, "--dump").await?;
        // callgrind names the first dump of `out` `out.1`.
        let file = PathBuf::from(format!("{}.1", self.out.display()));
        Profile::read(&file)
    }
}

async fn control(pid: u32, what: &str) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("running callgrind_control (Debian package valgrind)")?;
    anyhow::ensure!(status.success(), "callgrind_control {what} {pid}: {status}");
    Ok(())
}

/// Sends `SIGSTOP` or `SIGCONT` (`sig`) to `pid`.
async fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid}: {status}");
    Ok(())
}

/// How much work a count does.
#[derive(Debug, Clone, Copy)]
pub struct CountSize {
    /// Requests (or records) before the counters are zeroed.
    pub warm: u64,
    /// Requests (or records) counted.
    pub measured: u64,
    /// Concurrent HTTP clients.
    pub clients: usize,
}

impl CountSize {
    /// A count worth publishing: a few minutes under callgrind.
    pub const FULL: CountSize = CountSize {
        warm: 1_000,
        measured: 5_000,
        clients: 16,
    };
    /// Seconds, to check the tool works.
    pub const SMOKE: CountSize = CountSize {
        warm: 50,
        measured: 200,
        clients: 4,
    };
}

/// Starts the HTTP server `cmd(addr)` under callgrind and waits until it
/// serves (slowly: callgrind runs a program some 50 × slower).
async fn serve_counted(
    cmd: impl FnOnce(std::net::SocketAddr) -> anyhow::Result<Command>,
    dir: &Path,
    what: &str,
) -> anyhow::Result<Counted> {
    let addr = procs::free_addr();
    let (cmd, out) = under_callgrind(&cmd(addr)?, dir, what);
    let proc = procs::serve_within(cmd, addr, what, Duration::from_secs(300)).await?;
    let pid = proc.child.id().context("the server exited")?;
    Ok(Counted { proc, pid, out })
}

/// Closed-loop issue requests from new users; fails unless all are 202.
async fn issue_burst(
    base: &str,
    coupon: &str,
    prefix: &str,
    n: u64,
    clients: usize,
) -> anyhow::Result<()> {
    let http = scenarios::http();
    let (b, c, p) = (base.to_owned(), coupon.to_owned(), prefix.to_owned());
    let step = load::closed(clients, n, move |i| {
        scenarios::issue(&http, &b, &c, format!("{p}{i}"))
    })
    .await;
    anyhow::ensure!(
        step.ok == n,
        "{} of {n} requests were not accepted",
        step.errors
    );
    Ok(())
}

/// Counts an HTTP server taking `size.measured` new users' issue requests
/// for one coupon.
async fn count_http(
    target: &str,
    server: Counted,
    coupon: &str,
    size: CountSize,
    layers: &[Layer],
) -> anyhow::Result<Count> {
    let base = format!("http://{}", server.proc.addr.expect("it serves"));
    issue_burst(&base, coupon, "w", size.warm, size.clients).await?;
    server.zero().await?;
    issue_burst(&base, coupon, "m", size.measured, size.clients).await?;
    let profile = server.dump().await?;
    server.proc.stop().await;
    Ok(Count::of(
        target,
        "accepted request",
        size.measured,
        &profile,
        layers,
    ))
}

/// The ingress's layers. The first ones are parts of the request's path,
/// each with all it calls (so the handler's count holds admission's);
/// after them come libraries, wherever they are called from.
const INGRESS_STEPS: &[Layer] = &[
    step(
        "HTTP connection (hyper: parsing, writing; axum: routing), all below",
        // The ingress's own accept loop and connection tasks.
        &[":firstcome_ingress::connections::serve"],
    ),
    step(
        "middleware (the edge: rate limit, in-flight bound, headers, metrics, access line), all below",
        &[
            ":firstcome_ingress::http::middleware::edge",
            "firstcome-ingress/src/http/middleware/mod.rs:<axum::middleware::from_fn::FromFn",
            // The edge is the ingress's only `from_fn` layer, and inlined
            // into it (all of its slices: the edge's code is spread over
            // the files it inlines).
            ":<axum::middleware::from_fn::FromFn<",
        ],
    ),
    step(
        "issue handler (extractors, idempotency, answer), all below",
        &[
            ":firstcome_ingress::http::issue::issue",
            "firstcome-ingress/src/http/issue.rs:<F as axum::handler::Handler",
        ],
    ),
    step(
        "admission: coupon cache and sold-out check",
        &[
            ":firstcome_ingress::issue::Issue::admit",
            ":firstcome_ingress::issue::admission::CouponCache::get",
            ":firstcome_ingress::issue::admission::SoldOutCheck",
        ],
    ),
    step(
        "append: the record, the produce call, the ack, handing over the pending status",
        &[":firstcome_ingress::issue::Issue::append"],
    ),
    step(
        "pending status writes: the writer task and its Redis pipeline (not under append)",
        &[
            ":firstcome_ingress::issue::pending::write",
            "firstcome-ingress/src/issue/pending.rs:",
            "firstcome/src/status.rs:",
        ],
    ),
    step(
        "coupon lookups: a coupon's refresh from Postgres, on a task of its own (not under admission)",
        &[":firstcome_ingress::issue::admission::CouponCache::lookup::{{closure}}"],
    ),
    layer(
        "librdkafka: its threads (batches, produce requests, acks) and calls",
        &[":rd_kafka_"],
    ),
];

/// Libraries both binaries run, wherever called.
const LIBRARIES: &[Layer] = &[
    layer(
        "redis-rs: the multiplexed connection's task",
        &["redis::aio::multiplexed_connection"],
    ),
    layer(
        "tracing: spans and logs (`RUST_LOG=warn`)",
        &[":tracing_subscriber::", ":tracing_core::", ":tracing::"],
    ),
    layer("metrics (prometheus-client)", &[":prometheus_client::"]),
];

/// What every Rust HTTP or JSON program spends on, wherever called.
const BASICS: &[Layer] = &[
    layer("JSON (serde_json)", &[":serde_json::"]),
    layer(
        "text formatting (core::fmt: format!, to_string)",
        &[":core::fmt::write", ":alloc::fmt::format"],
    ),
    layer(
        "allocator (mimalloc, and glibc's malloc in librdkafka)",
        &["malloc/malloc.c:", "/c_src/mimalloc/", "/mimalloc-0."],
    ),
];

/// Counts the ingress.
pub async fn ingress(size: CountSize, dir: &Path) -> anyhow::Result<Count> {
    let env = BenchEnv::new("count-ingress").await?;
    let coupon = env.coupon("hot");
    let pool = env.common().connect_postgres().await?;
    scenarios::bench_coupon(&pool, &coupon, 1_000_000).await?;
    let server = serve_counted(
        |addr| {
            let mut cmd = procs::command(&env, "firstcome-ingress")?;
            cmd.env("FIRSTCOME_LISTEN", addr.to_string());
            Ok(cmd)
        },
        dir,
        "ingress",
    )
    .await?;
    count_http(
        "ingress",
        server,
        &coupon,
        size,
        &[INGRESS_STEPS, LIBRARIES, BASICS].concat(),
    )
    .await
}

/// The bare HTTP handler's layers.
const RAW_HTTP_STEPS: &[Layer] = &[
    step(
        "HTTP connection (hyper: parsing, writing; axum: routing), all below",
        &[":axum::serve::handle_connection"],
    ),
    step(
        "the handler, all below",
        &[
            ":firstcome_bench::servers::raw_http::issue",
            "firstcome-bench/src/servers.rs:<F as axum::handler::Handler",
        ],
    ),
];

/// Counts the bare HTTP handler of `raw-http`.
pub async fn raw_http(size: CountSize, dir: &Path) -> anyhow::Result<Count> {
    let env = BenchEnv::new("count-raw").await?;
    let server = serve_counted(
        |addr| {
            let mut cmd = procs::command(&env, "firstcome-bench")?;
            cmd.args(["serve-raw-http", "--listen", &addr.to_string()]);
            Ok(cmd)
        },
        dir,
        "raw-http",
    )
    .await?;
    count_http(
        "raw-http",
        server,
        &env.coupon("hot"),
        size,
        &[RAW_HTTP_STEPS, BASICS].concat(),
    )
    .await
}

/// The worker's layers: the batch's steps, each with all it calls, then
/// libraries wherever they are called from.
const WORKER_STEPS: &[Layer] = &[
    step(
        "a partition's loop (its queue, batches), all below",
        &[":firstcome_worker::consumer::partition_loop"],
    ),
    step(
        "a batch (parse, decide, store, publish), all below",
        &[":firstcome_worker::pipeline::process"],
    ),
    step(
        "decide: the Lua call (client side)",
        &[
            ":firstcome::state::CouponState::decide",
            "firstcome/src/state.rs:",
        ],
    ),
    step(
        "store: the fenced statement (client side)",
        &[":firstcome::db::persist", "firstcome/src/db.rs:"],
    ),
    step(
        "publish statuses: JSON and the Redis call",
        &[
            ":firstcome::status::put_statuses",
            "firstcome/src/status.rs:",
        ],
    ),
    layer(
        "librdkafka: its threads (fetch, commit) and calls",
        &[":rd_kafka_"],
    ),
    layer(
        "sqlx: the Postgres protocol",
        &[":sqlx_postgres::", ":sqlx_core::"],
    ),
];

/// Counts a worker deciding a hot coupon's backlog, as in `drain`: one
/// coupon, new users, stock for a twentieth of the counted records (the
/// rest sold out).
pub async fn worker(size: CountSize, dir: &Path) -> anyhow::Result<Count> {
    let warm = size.warm * 2;
    let measured = size.measured * 4;
    let env = BenchEnv::new("count-worker").await?;
    let pool = env.common().connect_postgres().await?;
    let hot = env.coupon("hot");
    scenarios::bench_coupon(&pool, &hot, (warm + measured / 20) as i32).await?;
    let hot_id = firstcome::CouponId::parse(hot.clone())?;
    let producer = scenarios::producer(&env)?;
    let records = |prefix: &str, n: u64| -> Vec<firstcome::IssueRequest> {
        (0..n)
            .map(|i| scenarios::request(&hot_id, format!("{prefix}{i}")))
            .collect()
    };
    scenarios::produce(&producer, &env.request_topic, records("w", warm)).await?;
    let (mut cmd, out) = under_callgrind(&procs::command(&env, "firstcome-worker")?, dir, "worker");
    cmd.arg("run");
    let child = cmd
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker")?;
    let pid = child.id().context("the worker exited")?;
    let mut w = Counted {
        proc: Proc { child, addr: None },
        pid,
        out,
    };
    let coupons = [hot];
    // A worker that exits never decides: said at once, not after the limit.
    tokio::select! {
        r = scenarios::wait_ledger(&pool, &coupons, warm as i64, Duration::from_secs(600)) => r?,
        status = w.proc.child.wait() => {
            anyhow::bail!("the worker exited ({}) before it decided; its log is above", status?)
        }
    }
    w.zero().await?;
    let since = Instant::now();
    // The counted records wait as one backlog, the worker frozen while they
    // are written: its batches are then full (`max_batch`) whatever the
    // machine's speed, and so is the store's cost per record, paid once a
    // batch. Fed live, a batch held what arrived during the last one.
    signal(pid, "STOP").await?;
    let produced = scenarios::produce(&producer, &env.request_topic, records("m", measured)).await;
    signal(pid, "CONT").await?;
    produced?;
    scenarios::wait_ledger(
        &pool,
        &coupons,
        (warm + measured) as i64,
        Duration::from_secs(1_800),
    )
    .await?;
    let profile = w.dump().await?;
    tracing::info!(seconds = since.elapsed().as_secs_f64(), "counted window");
    w.proc.stop().await;
    Ok(Count::of(
        "worker",
        "decided record",
        measured,
        &profile,
        &[WORKER_STEPS, LIBRARIES, BASICS].concat(),
    ))
}
