//! What a run writes: `results.json` for machines, `results.md` (a table
//! with the targets) for people, and `latency.svg`, latency against offered
//! load for the ingress and the bare HTTP handler.

use std::fmt::Write as _;

use serde::Serialize;

use crate::scenarios::{Drain, FlashSale, HttpCurve, Rate, Seed};
use crate::svg::{Frame, Line};

/// The machine a run ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel.
    pub kernel: String,
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} × {}, {} GiB, Linux {}",
            self.cpus, self.cpu, self.memory_gib, self.kernel
        )
    }
}

impl Machine {
    /// Reads `/proc`.
    pub fn probe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        }
    }
}

/// Everything one run measured; a scenario not run is `None`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Results {
    /// Where it ran.
    pub machine: Option<Machine>,
    /// `full` or `smoke`.
    pub size: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// `raw-http`.
    pub raw_http: Option<HttpCurve>,
    /// `ingress`.
    pub ingress: Option<HttpCurve>,
    /// `raw-produce`, records/s.
    pub raw_produce: Option<Rate>,
    /// `raw-consume`, records/s, a backlog spread over every partition.
    pub raw_consume: Option<Rate>,
    /// `raw-consume`, records/s, a backlog in one partition (a hot coupon).
    pub raw_consume_one_partition: Option<Rate>,
    /// `raw-redis`, decisions/s.
    pub raw_redis: Option<Rate>,
    /// `raw-pg`, rows/s.
    pub raw_pg: Option<Rate>,
    /// `drain`.
    pub drain: Option<Drain>,
    /// `drain-stream`: the drain with the decision stream on.
    pub drain_stream: Option<Drain>,
    /// `flash-sale`.
    pub flash_sale: Option<FlashSale>,
    /// `huge-sale`.
    pub huge_sale: Option<FlashSale>,
    /// `seed-baseline`.
    pub seed_baseline: Option<Seed>,
    /// `lifecycle`.
    pub lifecycle: Option<crate::lifecycle::Lifecycle>,
    /// `hostile`.
    pub hostile: Option<crate::hostile::Hostile>,
    /// `spread`.
    pub spread: Option<crate::spread::Spread>,
    /// `topology`.
    pub topology: Option<crate::topology::Topology>,
    /// The sizing model, when the scenarios it needs ran.
    pub sizing: Option<crate::sizing::Sizing>,
    /// The issue's targets, judged.
    pub targets: Vec<Target>,
}

/// One target of issue 4.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is asked.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Whether it is met; `None` when a scenario it needs did not run.
    pub met: Option<bool>,
}

fn target(goal: &str, measured: Option<(String, bool)>) -> Target {
    match measured {
        Some((measured, met)) => Target {
            goal: goal.to_owned(),
            measured,
            met: Some(met),
        },
        None => Target {
            goal: goal.to_owned(),
            measured: "not run".to_owned(),
            met: None,
        },
    }
}

impl Results {
    /// Every sale that ran, by name.
    pub fn sales(&self) -> Vec<(&'static str, &FlashSale)> {
        let topology = self.topology.as_ref();
        [
            ("flash-sale", self.flash_sale.as_ref()),
            ("huge-sale", self.huge_sale.as_ref()),
            ("topology: single node", topology.map(|t| &t.single)),
            (
                "topology: 3 brokers, Redis Cluster, 2 ingresses, 2 workers",
                topology.map(|t| &t.production),
            ),
        ]
        .into_iter()
        .filter_map(|(name, f)| Some((name, f?)))
        .collect()
    }

    /// Judges the targets from what ran.
    pub fn judge(&mut self) {
        self.sizing = crate::sizing::Sizing::of(
            self.ingress.as_ref(),
            self.flash_sale.as_ref(),
            self.spread.as_ref(),
            self.drain.as_ref(),
        );
        let ingress = self
            .ingress
            .as_ref()
            .zip(self.raw_http.as_ref())
            .map(|(i, r)| {
                let ratio = i.sustained_per_s / r.sustained_per_s;
                (
                    format!(
                        "{:.0}/s vs raw-http {:.0}/s = {ratio:.2}×",
                        i.sustained_per_s, r.sustained_per_s
                    ),
                    ratio >= 0.6,
                )
            });
        let p99 = self
            .ingress
            .as_ref()
            .and_then(|i| i.at_80_percent.as_ref())
            .map(|s| {
                (
                    format!("{:.1} ms at {:.0}/s", s.latency.p99_ms, s.offered_per_s),
                    s.latency.p99_ms <= 20.0,
                )
            });
        let drain = self
            .drain
            .as_ref()
            .zip(self.raw_pg.as_ref())
            .map(|(d, pg)| {
                let ratio = d.hot.per_s / pg.per_s;
                let fetch = self
                    .raw_consume_one_partition
                    .as_ref()
                    .map_or(String::new(), |c| {
                        format!(
                            " (the broker reads one partition at {:.0}/s: {:.2}× of that)",
                            c.per_s,
                            d.hot.per_s / c.per_s
                        )
                    });
                (
                    format!(
                        "hot coupon {:.0}/s vs raw-pg {:.0} rows/s = {ratio:.2}×{fetch}",
                        d.hot.per_s, pg.per_s
                    ),
                    ratio >= 0.5,
                )
            });
        let sale = self
            .flash_sale
            .as_ref()
            .zip(self.seed_baseline.as_ref())
            .map(|(f, s)| {
                let ratio = f.end_to_end_per_s / s.per_s;
                (
                    format!(
                        "{:.0}/s end to end vs seed {:.0}/s = {ratio:.2}×; violations ours {} / seed {}",
                        f.end_to_end_per_s, s.per_s, f.violations, s.first_come_violations
                    ),
                    ratio >= 10.0 && f.violations == 0,
                )
            });
        let memory = self.flash_sale.as_ref().map(|f| {
            // Under load: the flash sale, and the ingress curve at 80 %.
            let i = f.ingress_peak_rss_mib.unwrap_or(f64::NAN).max(
                self.ingress
                    .as_ref()
                    .and_then(|c| c.peak_rss_mib)
                    .unwrap_or(0.0),
            );
            let w = self
                .drain
                .as_ref()
                .and_then(|d| d.worker_peak_rss_mib)
                .unwrap_or(0.0)
                .max(f.worker_peak_rss_mib.unwrap_or(f64::NAN));
            (
                format!("ingress {i:.0} MiB, worker {w:.0} MiB"),
                i <= 64.0 && w <= 128.0,
            )
        });
        self.targets = vec![
            target("ingress sustained ≥ 0.6 × raw-http", ingress),
            target("ingress p99 ≤ 20 ms at 80 % of sustained", p99),
            target("drain of a hot coupon ≥ 0.5 × raw-pg", drain),
            target("flash sale ≥ 10 × seed-baseline, 0 violations ours", sale),
            target("RSS: ingress ≤ 64 MiB, worker ≤ 128 MiB", memory),
        ];
    }

    /// A Markdown report.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(m) = &self.machine {
            let _ = writeln!(
                out,
                "Machine: {m}. Size: {}. Started {}.\n",
                self.size, self.started_at
            );
        }
        let _ = writeln!(out, "| scenario | result |\n|---|---|");
        let mut row = |name: &str, text: String| {
            let _ = writeln!(out, "| {name} | {text} |");
        };
        for (name, c) in [("raw-http", &self.raw_http), ("ingress", &self.ingress)] {
            if let Some(c) = c {
                let at80 = c.at_80_percent.as_ref().map_or(String::new(), |s| {
                    format!(
                        "; at {:.0}/s p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms",
                        s.offered_per_s, s.latency.p50_ms, s.latency.p99_ms, s.latency.p999_ms
                    )
                });
                let broker = if name == "ingress" {
                    broker_text(c.broker.as_ref(), "request")
                } else {
                    String::new()
                };
                row(
                    name,
                    format!(
                        "sustained {:.0} accepted/s{at80}; {:.0} µs CPU per request at 80 %; RSS {:.0} MiB at 80 %, {:.0} MiB through overload{broker}",
                        c.sustained_per_s,
                        c.cpu_us_per_request.unwrap_or(f64::NAN),
                        c.peak_rss_mib.unwrap_or(f64::NAN),
                        c.overload_peak_rss_mib.unwrap_or(f64::NAN)
                    ),
                );
            }
        }
        for (name, r, unit) in [
            ("raw-produce", &self.raw_produce, "records/s"),
            ("raw-consume", &self.raw_consume, "records/s"),
            (
                "raw-consume, one partition",
                &self.raw_consume_one_partition,
                "records/s",
            ),
            ("raw-redis", &self.raw_redis, "decisions/s"),
            ("raw-pg", &self.raw_pg, "rows/s"),
        ] {
            if let Some(r) = r {
                row(
                    name,
                    format!("{:.0} {unit} ({} in {:.2} s)", r.per_s, r.count, r.seconds),
                );
            }
        }
        for (name, d) in [
            ("drain", &self.drain),
            ("drain, decision stream on", &self.drain_stream),
        ] {
            let Some(d) = d else { continue };
            row(
                name,
                format!(
                    "{:.0} records/s overall, hot coupon {:.0}/s ({} records); wall {:.1} s with the group join; accept→decide p50 {:.0} / p99 {:.0} ms; worker RSS {:.0} MiB{}",
                    d.all.per_s,
                    d.hot.per_s,
                    d.hot.count,
                    d.wall_seconds,
                    d.accept_to_decide.p50_ms,
                    d.accept_to_decide.p99_ms,
                    d.worker_peak_rss_mib.unwrap_or(f64::NAN),
                    broker_text(d.broker.as_ref(), "record")
                ),
            );
        }
        if let Some(h) = &self.hostile {
            row(
                "hostile",
                format!(
                    "honest {} requests: calm {:.0}/s (p99 {:.1} ms, {} errors); under attack {:.0}/s (p99 {:.1} ms, {} errors) with {} attack requests and connections; ingress RSS peak {:.0} MiB",
                    h.calm.sent,
                    h.calm.ok_per_s,
                    h.calm.latency.p99_ms,
                    h.calm.errors,
                    h.attacked.ok_per_s,
                    h.attacked.latency.p99_ms,
                    h.attacked.errors,
                    h.attack_sent,
                    h.ingress_peak_rss_mib,
                ),
            );
        }
        if let Some(s) = &self.spread {
            for p in &s.points {
                row(
                    &format!(
                        "spread over {} coupon{}",
                        p.coupons,
                        if p.coupons == 1 { "" } else { "s" }
                    ),
                    format!(
                        "{} records: {:.0} records/s; final {:.1} s after the worker's start; CPU per record: worker {:.0}, Postgres {:.0}, Redis {:.0} µs; worker RSS {:.0} MiB; Redis +{:.1} MiB ({:.0} B/record){}",
                        s.records,
                        p.drain.per_s,
                        p.final_after_s,
                        p.worker_cpu_us_per_record,
                        p.pg_cpu_us_per_record,
                        p.redis_cpu_us_per_record,
                        p.worker_peak_rss_mib.unwrap_or(f64::NAN),
                        p.redis_added_mib,
                        p.redis_bytes_per_record,
                        broker_text(p.broker.as_ref(), "record")
                    ),
                );
            }
        }
        for (name, f) in self.sales() {
            row(
                name,
                format!(
                    "{} requests: answered (202 or 409) at {:.0}/s (p50 {:.1} / p99 {:.1} ms), {} of them 409 sold_out by the short-circuit; sold out after {:.2} s; every request final after {:.2} s = {:.0}/s end to end; violations {}; statuses {:?}; RSS ingress {:.0} / worker {:.0} MiB; CPU ingress {:.0} µs/request, worker {:.0} µs/record, Postgres {:.0} and Redis {:.0} µs/request; Redis +{:.1} MiB",
                    f.burst.sent,
                    f.burst.ok_per_s,
                    f.burst.latency.p50_ms,
                    f.burst.latency.p99_ms,
                    f.short_circuited,
                    f.sold_out_after_s,
                    f.all_final_after_s,
                    f.end_to_end_per_s,
                    f.violations,
                    sorted(&f.statuses),
                    f.ingress_peak_rss_mib.unwrap_or(f64::NAN),
                    f.worker_peak_rss_mib.unwrap_or(f64::NAN),
                    f.ingress_cpu_us_per_request.unwrap_or(f64::NAN),
                    f.worker_cpu_us_per_record.unwrap_or(f64::NAN),
                    f.pg_cpu_us_per_request,
                    f.redis_cpu_us_per_request,
                    f.redis_added_mib,
                ) + &broker_text(f.broker.as_ref(), "request"),
            );
        }
        if let Some(s) = &self.seed_baseline {
            row(
                "seed-baseline",
                format!(
                    "{} requests answered at {:.0}/s (p50 {:.1} / p99 {:.1} ms, {} errors); first-come violations {}; rows stored {} of {}; statuses {:?}",
                    s.burst.sent,
                    s.per_s,
                    s.burst.latency.p50_ms,
                    s.burst.latency.p99_ms,
                    s.burst.errors,
                    s.first_come_violations,
                    s.rows_stored,
                    s.burst.ok,
                    sorted(&s.statuses)
                ),
            );
        }
        let _ = writeln!(out, "\n| target | measured | met |\n|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(out, "| {} | {} | {met} |", t.goal, t.measured);
        }
        if let Some(sizing) = &self.sizing {
            let _ = writeln!(out, "\nSizing (crates/firstcome-bench/src/sizing.rs):\n");
            out.push_str(&sizing.table());
        }
        out
    }

    /// Latency (p50, p99; log scale) against offered load, as SVG.
    pub fn svg(&self) -> String {
        let f = Frame {
            w: 760.0,
            h: 420.0,
            left: 70.0,
            bottom: 50.0,
            top: 30.0,
            right: 170.0,
        };
        let curves: Vec<(&str, &HttpCurve, &str)> = [
            ("raw-http", &self.raw_http, "#888888"),
            ("ingress", &self.ingress, "#1f77b4"),
        ]
        .into_iter()
        .filter_map(|(n, c, col)| c.as_ref().map(|c| (n, c, col)))
        .collect();
        let max_rate = curves
            .iter()
            .flat_map(|(_, c, _)| c.steps.iter().map(|s| s.offered_per_s))
            .fold(1.0, f64::max);
        let (lo, hi) = (0.1f64.log10(), 10_000f64.log10());
        let x = |r: f64| f.left + (f.w - f.left - f.right) * r / max_rate;
        let y = |ms: f64| {
            let v = ms.clamp(0.1, 10_000.0).log10();
            f.h - f.bottom - (f.h - f.bottom - f.top) * (v - lo) / (hi - lo)
        };
        let mut s = f.open("Latency against offered load (open model)");
        for ms in [0.1, 1.0, 10.0, 100.0, 1_000.0, 10_000.0] {
            f.grid(&mut s, y(ms), &format!("{ms} ms"));
        }
        let ticks = 5;
        for i in 0..=ticks {
            let r = max_rate * i as f64 / ticks as f64;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{:.0}</text>"#,
                x(r),
                f.h - f.bottom + 18.0,
                r
            );
        }
        f.caption(&mut s, f.h - 12.0, "offered requests/s");
        let mut legend = f.top + 10.0;
        for (name, c, color) in &curves {
            for (q, dash) in [("p50", ""), ("p99", "6,3")] {
                let points: Vec<(f64, f64)> = c
                    .steps
                    .iter()
                    .map(|st| {
                        let v = if q == "p50" {
                            st.latency.p50_ms
                        } else {
                            st.latency.p99_ms
                        };
                        (x(st.offered_per_s), y(v))
                    })
                    .collect();
                let line = Line {
                    name: &format!("{name} {q}"),
                    color,
                    width: 2.0,
                    dash,
                };
                f.series(&mut s, &line, &points, legend);
                legend += 18.0;
            }
        }
        Frame::close(&mut s);
        s
    }
}

/// "; broker: 31 % of the CPU, 12 µs per request, RSS 700 MiB", or nothing.
fn broker_text(b: Option<&crate::procs::BrokerUsage>, per: &str) -> String {
    b.map_or(String::new(), |b| {
        format!(
            "; broker: {:.0} % of the CPU, {:.0} µs per {per}, RSS {:.0} MiB",
            b.cpu_share * 100.0,
            b.cpu_us_per_item,
            b.peak_rss_mib.unwrap_or(f64::NAN)
        )
    })
}

fn sorted(m: &std::collections::HashMap<String, u64>) -> Vec<(&String, &u64)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort();
    v
}
