//! `hostile`: honest clients' throughput and p99 with and without an attack
//! running beside them, side by side. The honest load is a closed burst of
//! new users on one coupon with stock for all of them (every answer a
//! `202`); the attack holds idle and half-sent connections, hangs up on
//! lookups of unknown coupons and request ids, floods `/readyz` and
//! `/openapi.json`, and sends fresh Idempotency-Keys to a coupon that is not
//! open, from rotating forwarded addresses. (Forged tokens are in
//! `tests/attack.rs`; the bench's ingress names users in the body.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::env::BenchEnv;
use crate::load::{self, Outcome, Step};
use crate::procs;
use crate::scenarios::{self, Size};

/// `hostile`: the same honest burst, calm and under attack.
#[derive(Debug, Clone, Serialize)]
pub struct Hostile {
    /// Without the attack.
    pub calm: Step,
    /// With the attack running.
    pub attacked: Step,
    /// Attack requests and connections sent meanwhile.
    pub attack_sent: u64,
    /// The ingress's peak resident memory over both, MiB.
    pub ingress_peak_rss_mib: f64,
}

/// Runs the scenario.
pub async fn hostile(size: Size) -> anyhow::Result<Hostile> {
    let env = BenchEnv::new("hostile").await?;
    let ingress = procs::ingress(&env).await?;
    let worker = procs::worker(&env)?;
    let addr = ingress.addr.expect("it listens");
    let base = format!("http://{addr}");
    let http = scenarios::http();
    let honest_coupon = env.coupon("honest");
    scenarios::create_coupon(&http, &base, &env, &honest_coupon, 1_000_000_000).await?;
    let later = env.coupon("later");
    let r = http
        .post(format!("{base}/v1/coupons"))
        .bearer_auth(&env.admin_token)
        .json(
            &json!({ "coupon_id": later, "name": later, "total_stock": 5,
                       "starts_at": chrono::Utc::now() + chrono::Duration::hours(1) }),
        )
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "creating coupon {later}: {}", r.status());

    let burst = |tag: &'static str| {
        let (h, b, c) = (http.clone(), base.clone(), honest_coupon.clone());
        load::closed(size.sale_clients, size.sale_requests, move |i| {
            let request = h
                .post(format!("{b}/v1/coupons/{c}/issue"))
                .json(&json!({ "user_id": format!("{tag}{i}") }));
            async move {
                match request.send().await.map(|r| r.status().as_u16()) {
                    Ok(202) => Outcome::Ok,
                    _ => Outcome::Error,
                }
            }
        })
    };
    let calm = burst("c").await;

    let attacking = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let mut attacks = Vec::new();
    // Idle and half-sent connections, renewed as the ingress closes them.
    {
        let (attacking, sent) = (attacking.clone(), sent.clone());
        attacks.push(tokio::spawn(async move {
            while attacking.load(Ordering::Relaxed) {
                let mut held = Vec::new();
                for i in 0..512 {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                        let head: &[u8] = if i % 2 == 0 {
                            b""
                        } else {
                            b"GET /v1/coupons/x HT"
                        };
                        let _ = s.write_all(head).await;
                        held.push(s);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }));
    }
    // Unknown ids, probes and documents, fresh keys on a closed coupon.
    for kind in 0..3u64 {
        let (attacking, sent, h) = (attacking.clone(), sent.clone(), scenarios::http());
        let (base, later, tag) = (base.clone(), later.clone(), env.coupon("nx"));
        attacks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while attacking.load(Ordering::Relaxed) {
                i += 1;
                let from = std::net::Ipv4Addr::from(u32::try_from(i).unwrap_or(0)).to_string();
                let request = match (kind, i % 2) {
                    (0, 0) => h.get(format!("{base}/v1/coupons/{tag}-{i}")),
                    (0, _) => h.get(format!("{base}/v1/issue-requests/{}", uuid::Uuid::new_v4())),
                    (1, 0) => h.get(format!("{base}/readyz")),
                    (1, _) => h.get(format!("{base}/openapi.json")),
                    _ => h
                        .post(format!("{base}/v1/coupons/{later}/issue"))
                        .header("idempotency-key", format!("fresh-{i}"))
                        .json(&json!({ "user_id": format!("m{i}") })),
                };
                // Hung up on after 20 ms, whether answered or not.
                let _ = tokio::time::timeout(
                    Duration::from_millis(20),
                    request.header("x-forwarded-for", from).send(),
                )
                .await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attacked = burst("a").await;
    attacking.store(false, Ordering::Relaxed);
    for a in attacks {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    let ingress_peak_rss_mib = ingress.peak_rss_mib().unwrap_or(f64::NAN);
    worker.stop().await;
    ingress.stop().await;
    anyhow::ensure!(
        calm.errors == 0,
        "{} calm honest requests failed",
        calm.errors
    );
    Ok(Hostile {
        calm,
        attacked,
        attack_sent: sent.load(Ordering::Relaxed),
        ingress_peak_rss_mib,
    })
}
