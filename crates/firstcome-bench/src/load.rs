//! Load generators and what they measure.
//!
//! The open model sends at a fixed arrival rate whatever the answers do, and
//! times each request from the moment it *should* have been sent, so a slow
//! server cannot hide its queueing (no coordinated omission). It keeps at
//! most [`CONNECTIONS`] requests on the wire, as `wrk -c` does: a request
//! that finds them all busy waits its turn in the client, and the wait
//! counts in its latency. (Unbounded, the client opened a connection per
//! waiting request past the server's ceiling: thousands of connects beyond
//! the server's accept queue, whose SYNs the kernel dropped and the client
//! resent after 1, 3, 7 and 15 s, so a 5 s step took 35 s and the answers
//! fell to a tenth of the ceiling; wrk with 3,000 connections saw no such
//! fall. docs/benchmarks.md, "Overload".) The closed
//! model keeps a fixed number of clients busy, for bursts ("everyone presses
//! the button at once").

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

/// Requests in flight (on the wire or waiting for it) beyond which the open
/// model counts a send as dropped rather than piling up without bound.
const MAX_IN_FLIGHT: usize = 20_000;

/// Requests the open model keeps on the wire at once, hence connections at
/// most: ten times what the fastest server here needs at its ceiling
/// (raw-http, 50,000/s at about a millisecond).
pub const CONNECTIONS: usize = 512;

/// What a request ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer the scenario wanted (e.g. 202).
    Ok,
    /// Anything else.
    Error,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of a histogram recorded in microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
        Self {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1_000.0,
        }
    }
}

/// One load step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Arrival rate asked for (open model), or 0 for a closed burst.
    pub offered_per_s: f64,
    /// Requests that got the wanted answer, per second of the step.
    pub ok_per_s: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests with the wanted answer.
    pub ok: u64,
    /// Requests with another answer, a transport error, or dropped.
    pub errors: u64,
    /// Latency of the wanted answers.
    pub latency: Latency,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// Sends `request(i)` at `rate` per second for `duration`, then waits for
/// the answers (at most 30 s more).
pub async fn open<F, Fut>(rate: f64, duration: Duration, request: F) -> Step
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let hist = Arc::new(Mutex::new(histogram()));
    let (ok, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let wire = Arc::new(Semaphore::new(CONNECTIONS));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended.into()).await;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let fut = request(i);
        let (hist, ok, errors, in_flight, wire) = (
            hist.clone(),
            ok.clone(),
            errors.clone(),
            in_flight.clone(),
            wire.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let outcome = {
                let _turn = wire.acquire().await.expect("never closed");
                fut.await
            };
            let took = intended.elapsed();
            in_flight.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Outcome::Ok => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    let _ = hist.lock().await.record(took.as_micros().max(1) as u64);
                }
                Outcome::Error => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await;
    let seconds = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed) as u64;
    let latency = Latency::of(&*hist.lock().await);
    Step {
        offered_per_s: rate,
        ok_per_s: ok as f64 / seconds,
        sent: total,
        ok,
        errors: total - ok,
        latency,
        seconds,
    }
}

/// `clients` concurrent clients send `request(i)` for i in `0..total`, each
/// as soon as its previous answer is in.
pub async fn closed<F, Fut>(clients: usize, total: u64, request: F) -> Step
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let request = Arc::new(request);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (request, next) = (request.clone(), next.clone());
            tokio::spawn(async move {
                let (mut h, mut ok, mut errors) = (histogram(), 0u64, 0u64);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return (h, ok, errors);
                    }
                    let sent = Instant::now();
                    match request(i).await {
                        Outcome::Ok => {
                            ok += 1;
                            let _ = h.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                        Outcome::Error => errors += 1,
                    }
                }
            })
        })
        .collect();
    let (mut h, mut ok, mut errors) = (histogram(), 0, 0);
    for w in workers {
        let (wh, wok, werr) = w.await.expect("a load client panicked");
        h.add(&wh).expect("same histogram bounds");
        ok += wok;
        errors += werr;
    }
    let seconds = start.elapsed().as_secs_f64();
    Step {
        offered_per_s: 0.0,
        ok_per_s: ok as f64 / seconds,
        sent: total,
        ok,
        errors,
        latency: Latency::of(&h),
        seconds,
    }
}
