//! `raw-http` and `ingress`: an HTTP endpoint driven up a ladder of rates
//! until it no longer keeps up.

use super::*;

/// An HTTP endpoint driven up to saturation.
#[derive(Debug, Clone, Serialize)]
pub struct HttpCurve {
    /// Every step, in order of rate.
    pub steps: Vec<Step>,
    /// The highest accepted rate of a step that kept up (≥ 95 % of the
    /// offered rate answered as wanted, p99 under a second).
    pub sustained_per_s: f64,
    /// A step at 80 % of the sustained rate.
    pub at_80_percent: Option<Step>,
    /// Peak RSS of a fresh server process through warm-up and the step at
    /// 80 %, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Peak RSS up to and through the overload step, MiB.
    pub overload_peak_rss_mib: Option<f64>,
    /// CPU time of the server process per answered request in the step at
    /// 80 %, microseconds: what one request costs, whatever else shares the
    /// machine.
    pub cpu_us_per_request: Option<f64>,
    /// The Kafka broker over the step at 80 %.
    pub broker: Option<procs::BrokerUsage>,
}

fn kept_up(s: &Step) -> bool {
    s.ok as f64 >= 0.95 * s.sent as f64 && s.latency.p99_ms < 1_000.0
}

/// Warm-up load, not reported: connections, the producer's metadata, caches.
async fn warm_up(http: &reqwest::Client, base: &str, coupon: &str, size: Size) {
    let (h, b, c) = (http.clone(), base.to_owned(), coupon.to_owned());
    let warm = load::open(size.rates[0].min(500.0), size.step, move |i| {
        issue(&h, &b, &c, format!("w{i}"))
    })
    .await;
    tracing::info!(p99_ms = warm.latency.p99_ms, "warm-up");
}

/// Steps up to saturation on the server `start` gives, then the step at
/// 80 % of the sustained rate on a fresh one (an overloaded process keeps
/// its queues and memory for a while, which is not what 80 % looks like).
async fn curve<F, Fut>(coupon: &str, size: Size, start: F) -> anyhow::Result<HttpCurve>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<procs::Proc>>,
{
    let http = http();
    let server = start().await?;
    let base = format!("http://{}", server.addr.expect("it listens"));
    warm_up(&http, &base, coupon, size).await;
    let mut steps = Vec::new();
    let mut sustained: f64 = 0.0;
    let mut offset = 0u64;
    let mut step_at = async |rate: f64, steps: &mut Vec<Step>| {
        let (h, b, c, off) = (http.clone(), base.clone(), coupon.to_owned(), offset);
        let step = load::open(rate, size.step, move |i| {
            issue(&h, &b, &c, format!("u{}", off + i))
        })
        .await;
        offset += step.sent;
        tracing::info!(
            rate,
            ok_per_s = step.ok_per_s,
            p99_ms = step.latency.p99_ms,
            "step"
        );
        let ok = kept_up(&step);
        let ok_per_s = step.ok_per_s;
        steps.push(step);
        ok.then_some(ok_per_s)
    };
    // Up the ladder until a step fails, then halve the gap between the last
    // step that kept up and the one that did not, `size.refine` times: the
    // ladder's steps are 4,000/s apart near the top, too coarse for a ratio.
    let (mut kept, mut failed) = (0.0, None);
    for &rate in size.rates {
        match step_at(rate, &mut steps).await {
            Some(ok_per_s) => {
                sustained = sustained.max(ok_per_s);
                kept = rate;
            }
            None => {
                failed = Some(rate);
                break;
            }
        }
    }
    if let Some(mut failed) = failed.filter(|_| kept > 0.0) {
        for _ in 0..size.refine {
            let rate = ((kept + failed) / 2.0 / 100.0).round() * 100.0;
            match step_at(rate, &mut steps).await {
                Some(ok_per_s) => {
                    sustained = sustained.max(ok_per_s);
                    kept = rate;
                }
                None => failed = rate,
            }
        }
    }
    steps.sort_by(|a, b| a.offered_per_s.total_cmp(&b.offered_per_s));
    let overload_peak_rss_mib = server.peak_rss_mib();
    server.stop().await;
    if sustained == 0.0 {
        return Ok(HttpCurve {
            steps,
            sustained_per_s: 0.0,
            at_80_percent: None,
            peak_rss_mib: None,
            overload_peak_rss_mib,
            cpu_us_per_request: None,
            broker: None,
        });
    }
    let server = start().await?;
    let base = format!("http://{}", server.addr.expect("it listens"));
    warm_up(&http, &base, coupon, size).await;
    let (h, b, c, off) = (http.clone(), base.clone(), coupon.to_owned(), offset);
    let cpu_before = server.cpu_seconds();
    let broker = procs::BrokerMeter::start();
    let at_80 = load::open(0.8 * sustained, size.step, move |i| {
        issue(&h, &b, &c, format!("v{}", off + i))
    })
    .await;
    let broker = broker.and_then(|m| m.finish(at_80.ok));
    let cpu_us_per_request = match (cpu_before, server.cpu_seconds()) {
        (Some(a), Some(b)) if at_80.ok > 0 => Some((b - a) * 1e6 / at_80.ok as f64),
        _ => None,
    };
    let peak_rss_mib = server.peak_rss_mib();
    server.stop().await;
    Ok(HttpCurve {
        steps,
        sustained_per_s: sustained,
        at_80_percent: Some(at_80),
        peak_rss_mib,
        overload_peak_rss_mib,
        cpu_us_per_request,
        broker,
    })
}

/// `raw-http`: the bare handler.
pub async fn raw_http(size: Size) -> anyhow::Result<HttpCurve> {
    let env = BenchEnv::new("rawhttp").await?;
    curve("c", size, || procs::own_server(&env, "serve-raw-http")).await
}

/// `ingress`: the real ingress, to the broker.
pub async fn ingress(size: Size) -> anyhow::Result<HttpCurve> {
    let env = BenchEnv::new("ingress").await?;
    let coupon = env.coupon("hot");
    let pool = env.common().connect_postgres().await?;
    bench_coupon(&pool, &coupon, 1_000_000).await?;
    curve(&coupon, size, || procs::ingress(&env)).await
}
