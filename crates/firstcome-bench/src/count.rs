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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::process::Command;

use crate::env::BenchEnv;
use crate::load;
use crate::procs::{self, Proc};
use crate::scenarios;

/// A callgrind profile: every function's own instructions (`Ir`) and the
/// inclusive cost of every call edge.
#[derive(Debug, Default)]
pub struct Profile {
    names: Vec<String>,
    own: Vec<u64>,
    /// (caller, callee, instructions of the call, callee's included).
    calls: Vec<(usize, usize, u64)>,
}

impl Profile {
    /// Reads a callgrind output file (any compression of names; the first
    /// event column, which is `Ir` by default).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut p = Profile::default();
        // Compressed names: `(id) name` defines, `(id)` refers. Files
        // (`fl`, `fi`, `fe`, `cfi`, `cfl`) share one space, functions
        // (`fn`, `cfn`) another.
        let (mut files, mut fns) = (Names::default(), Names::default());
        let mut nodes: HashMap<String, usize> = HashMap::new();
        // The function's file, the file of the lines now (differs inside
        // inlined code: `fi=`/`fe=`), the function.
        let (mut fl, mut file, mut function) = (String::new(), String::new(), None::<String>);
        let mut callee: Option<(Option<String>, String)> = None;
        let mut call_line_next = false;
        // Columns before the costs: one per `positions:` name (`line` when
        // absent).
        let mut positions = 1;
        for line in text.lines() {
            let Some((key, value)) = line
                .split_once('=')
                .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase()))
            else {
                if let Some(names) = line.strip_prefix("positions:") {
                    positions = names.split_whitespace().count();
                    continue;
                }
                let Some(first) = line.chars().next() else {
                    continue;
                };
                if !(first.is_ascii_digit() || matches!(first, '+' | '-' | '*')) {
                    continue;
                }
                let cost: u64 = line
                    .split_whitespace()
                    .nth(positions)
                    .map_or(Ok(0), str::parse)
                    .with_context(|| format!("a cost line: {line}"))?;
                let f = function.as_deref().context("a cost before any fn=")?;
                let from = p.node(&mut nodes, &file, f);
                if std::mem::take(&mut call_line_next) {
                    let (cfile, cfn) = callee.take().context("calls= without cfn=")?;
                    let to = p.node(&mut nodes, cfile.as_deref().unwrap_or(&file), &cfn);
                    p.calls.push((from, to, cost));
                } else {
                    p.own[from] += cost;
                }
                continue;
            };
            match key {
                "fl" => {
                    fl = files.resolve(value);
                    file = fl.clone();
                }
                "fi" | "fe" => file = files.resolve(value),
                "fn" => {
                    function = Some(fns.resolve(value));
                    file = fl.clone();
                }
                "cfi" | "cfl" => {
                    let f = files.resolve(value);
                    match &mut callee {
                        Some((cfile, _)) => *cfile = Some(f),
                        None => callee = Some((Some(f), String::new())),
                    }
                }
                "cfn" => {
                    let name = fns.resolve(value);
                    match &mut callee {
                        Some((_, cfn)) if cfn.is_empty() => *cfn = name,
                        _ => callee = Some((None, name)),
                    }
                }
                "calls" => call_line_next = true,
                _ => {}
            }
        }
        anyhow::ensure!(!p.names.is_empty(), "no functions in the profile");
        Ok(p)
    }

    /// The index of function `name` in `file`, shown as `file:name` (as
    /// `callgrind_annotate` does), so a layer can name either.
    fn node(&mut self, nodes: &mut HashMap<String, usize>, file: &str, name: &str) -> usize {
        let key = format!("{file}:{name}");
        if let Some(&i) = nodes.get(&key) {
            return i;
        }
        self.names.push(key.clone());
        self.own.push(0);
        nodes.insert(key, self.names.len() - 1);
        self.names.len() - 1
    }

    /// Every instruction of the profile.
    pub fn total(&self) -> u64 {
        self.own.iter().sum()
    }

    /// What `layer` costs: see [`Kind`].
    pub fn cost(&self, layer: &Layer) -> u64 {
        let inside: Vec<bool> = self.names.iter().map(|n| layer.matches(n)).collect();
        match layer.kind {
            Kind::Set => {
                let own: u64 = (0..self.names.len())
                    .filter(|&f| inside[f])
                    .map(|f| self.own[f])
                    .sum();
                let out: u64 = self
                    .calls
                    .iter()
                    .filter(|&&(from, to, _)| inside[from] && !inside[to])
                    .map(|&(_, _, c)| c)
                    .sum();
                own + out
            }
            Kind::Under => {
                // Inclusive cost of the matching slices of each function,
                // summed per function; the outermost function has the most.
                let mut per_function: HashMap<&str, u64> = HashMap::new();
                for (f, name) in self.names.iter().enumerate() {
                    if inside[f] {
                        let function = name.split_once(':').map_or(name.as_str(), |(_, n)| n);
                        *per_function.entry(function).or_default() += self.own[f];
                    }
                }
                for &(from, _, c) in &self.calls {
                    if inside[from] {
                        let name = &self.names[from];
                        let function = name.split_once(':').map_or(name.as_str(), |(_, n)| n);
                        *per_function.entry(function).or_default() += c;
                    }
                }
                per_function.into_values().max().unwrap_or(0)
            }
        }
    }

    /// The `n` functions with the most own instructions, for finding what a
    /// layer should name.
    pub fn top_own(&self, n: usize) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self
            .names
            .iter()
            .map(String::as_str)
            .zip(self.own.iter().copied())
            .collect();
        all.sort_by_key(|a| std::cmp::Reverse(a.1));
        all.truncate(n);
        all
    }
}

/// Compressed names of one kind.
#[derive(Default)]
struct Names(HashMap<String, String>);

impl Names {
    /// The name a `(id) name`, `(id)` or `name` spec stands for.
    fn resolve(&mut self, spec: &str) -> String {
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) if rest.trim().is_empty() => {
                self.0.get(id).cloned().unwrap_or_default()
            }
            Some((id, rest)) => {
                let name = rest.trim().to_owned();
                self.0.insert(id.to_owned(), name.clone());
                name
            }
            None => spec.trim().to_owned(),
        }
    }
}

/// A layer of a binary: the functions whose `file:name` (as
/// `callgrind_annotate` shows them; the file is where the code was
/// written, so code inlined into a caller still counts for its own layer)
/// contains one of `contains`.
#[derive(Debug, Clone, Copy)]
pub struct Layer {
    /// What the report calls it.
    pub name: &'static str,
    /// Substrings of the `file:name` of the functions that belong to it.
    pub contains: &'static [&'static str],
    /// How its cost is counted.
    pub kind: Kind,
}

/// How a layer's cost is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A step of the request's path, with all it calls: the inclusive cost
    /// of the outermost matching function (the one with the most), that is
    /// of the part of it the patterns match when they name a file (code
    /// inlined from that file). Nested steps hold each other's cost.
    Under,
    /// A library, wherever it is called from: every instruction executed
    /// while one of its functions is on the stack, counted once per entry
    /// from outside it.
    Set,
}

impl Layer {
    /// Whether `name` is one of the layer's functions. A recursive call
    /// (callgrind names it `f'2`, `f'3`, …: `f` is on the stack already,
    /// often below an outside wrapper such as a middleware's `Next`) is
    /// not: its cost is inside the outer call's already.
    fn matches(&self, name: &str) -> bool {
        let recursive = name
            .rsplit_once('\'')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        !recursive && self.contains.iter().any(|c| name.contains(c))
    }
}

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

/// A step of the path, with all it calls ([`Kind::Under`]).
const fn step(name: &'static str, contains: &'static [&'static str]) -> Layer {
    Layer {
        name,
        contains,
        kind: Kind::Under,
    }
}

/// A library, wherever called ([`Kind::Set`]).
const fn layer(name: &'static str, contains: &'static [&'static str]) -> Layer {
    Layer {
        name,
        contains,
        kind: Kind::Set,
    }
}

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
    scenarios::produce(&producer, &env.request_topic, records("m", measured)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
version: 1
creator: callgrind-3.19.0
events: Ir
positions: line

fl=(1) main.rs
fn=(1) main
5 10
cfl=(2) work.rs
cfn=(2) work
calls=2 0
0 100
cfn=(3) other
calls=1 0
0 30

fl=(2)
fn=(2)
0 50
fi=(3) inlined.rs
0 20
cfl=(1)
cfn=(3)
calls=1 0
0 30

fl=(1)
fn=(3)
0 60

totals: 140
";

    #[test]
    fn own_costs_and_call_edges_come_out_of_compressed_names() {
        let p = Profile::parse(SAMPLE).unwrap();
        assert_eq!(p.total(), 140);
        assert_eq!(p.cost(&layer("l", &[":main"])), 140);
        // work's own 70 (20 of them inlined from another file) and its call
        // of other (30).
        assert_eq!(p.cost(&layer("l", &[":work"])), 100);
        // work and other together: work's calls of other are inside already,
        // main's call of other is another entry.
        assert_eq!(p.cost(&layer("l", &[":work", ":other"])), 130);
        // The inlined lines, with the call made from them.
        assert_eq!(p.cost(&layer("l", &["inlined.rs:"])), 50);
        assert_eq!(p.top_own(1), vec![("main.rs:other", 60)]);
    }

    #[test]
    fn a_step_is_its_outermost_function_with_all_it_calls() {
        let p = Profile::parse(SAMPLE).unwrap();
        // main holds work, which holds other: the step is main's 140,
        // not 140 + 100 + 30.
        assert_eq!(p.cost(&step("s", &[":main", ":work", ":other"])), 140);
        // work's own slice and the one inlined from inlined.rs are one
        // function: 50 + 20 own, 30 called.
        assert_eq!(p.cost(&step("s", &[":work"])), 100);
        // A file names only the slice written there.
        assert_eq!(p.cost(&step("s", &["inlined.rs:"])), 50);
    }

    #[test]
    fn a_recursive_call_is_counted_once_in_its_outer_call() {
        // f calls a wrapper, which calls f again (f'2): f's cost is its
        // call of the wrapper, not that plus f'2's again.
        let p = Profile::parse(
            "fl=(1) a.rs\nfn=(1) f\n0 1\ncfn=(2) wrap\ncalls=1 0\n0 10\n\
             fn=(2)\n0 1\ncfn=(3) f'2\ncalls=1 0\n0 9\n\
             fn=(3)\n0 9\n",
        )
        .unwrap();
        assert_eq!(p.total(), 11);
        assert_eq!(p.cost(&layer("l", &[":f"])), 11);
    }

    #[test]
    fn a_profile_without_functions_is_an_error() {
        assert!(Profile::parse("events: Ir\n").is_err());
    }
}
