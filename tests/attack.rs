//! A real flash sale while hostile clients do everything at once: idle and
//! slow-header connections past the bound, fat half-sent headers, floods of
//! unknown coupons and request ids that hang up early, fresh
//! Idempotency-Keys on a coupon that refuses them, `/readyz` and
//! `/openapi.json` floods, forwarded addresses rotating (IPv4 and IPv6)
//! with the rate limit on, forged and expired tokens. The honest clients'
//! promise holds in full, the ingress's memory, Redis's keys and the
//! Postgres pool stay bounded, and once the attack stops the service answers
//! as before.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use firstcome_suite::hostile::{half_sent, hang_up_flood};
use firstcome_suite::services::free_port;
use firstcome_suite::tokens::{self, AUDIENCE, ISSUER, TestKey, claims_for};
use firstcome_suite::{TestEnv, split, wait_listening};
use futures::StreamExt;
use serde_json::json;

/// What the ingress process may hold under the attack (its pod's limit is
/// 512 MiB; the bound on connections and what each may buffer keeps it far
/// below).
const RSS_BOUND_KIB: u64 = 256 * 1024;

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_every_attack_at_once_the_honest_sale_keeps_its_promise_and_the_ingress_its_bounds() {
    let env = TestEnv::new().await;
    let key = TestKey::load("a");
    let jwks = tokens::jwks_path(&env.tag);
    tokens::write_jwks(&jwks, &[&key]);
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut ingress = env
        .ingress_command(addr)
        .env("FIRSTCOME_IDENTITY", "jwt")
        .env("FIRSTCOME_JWKS_FILE", &jwks)
        .env("FIRSTCOME_JWT_ISSUER", ISSUER)
        .env("FIRSTCOME_JWT_AUDIENCE", AUDIENCE)
        .env("FIRSTCOME_MAX_CONNECTIONS", "256")
        .env("FIRSTCOME_HEADER_READ_TIMEOUT", "1000ms")
        .env("FIRSTCOME_RATE_LIMIT_PER_SEC", "200")
        .env("FIRSTCOME_RATE_LIMIT_BURST", "50")
        .env("FIRSTCOME_CLIENT_IP_HEADER", "x-forwarded-for")
        .env("FIRSTCOME_TRUSTED_PROXIES", "127.0.0.1")
        .env("FIRSTCOME_PG_MAX_CONNECTIONS", "4")
        .env("FIRSTCOME_METRICS_LISTEN", "127.0.0.1:0")
        .kill_on_drop(true)
        .spawn()
        .expect("the ingress binary starts");
    wait_listening(addr).await;
    let pid = ingress.id().unwrap();
    let client = env.client_at(addr);
    let sale = env.coupon_id("sale");
    let stock = 40;
    assert_eq!(client.create_coupon(&sale, stock).await.0, 201);
    let later = env.coupon_id("later");
    let (code, body) = client
        .create_coupon_with(
            json!({ "coupon_id": later, "name": "later", "total_stock": 5,
            "starts_at": chrono::Utc::now() + chrono::Duration::hours(1) }),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let worker = env.spawn_worker().await;

    let attacking = Arc::new(AtomicBool::new(true));
    let mut attacks = Vec::new();
    // Idle and slow-header connections past the bound, over and over.
    {
        let attacking = attacking.clone();
        attacks.push(tokio::spawn(async move {
            while attacking.load(Ordering::Relaxed) {
                let mut held = Vec::new();
                for i in 0..300 {
                    let head: &[u8] = match i % 3 {
                        0 => b"",
                        1 => b"POST /v1/coupons/x/issue HTTP/1.1\r\nx-slow: a",
                        _ => b"GET /readyz HT",
                    };
                    if let Some(s) = half_sent(addr, head).await {
                        held.push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1_500)).await;
            }
        }));
    }
    // Fat half-sent headers.
    {
        let attacking = attacking.clone();
        attacks.push(tokio::spawn(async move {
            let fat = format!("GET /healthz HTTP/1.1\r\nx-fat: {}", "a".repeat(60 * 1024));
            while attacking.load(Ordering::Relaxed) {
                let mut held = Vec::new();
                for _ in 0..40 {
                    if let Some(s) = half_sent(addr, fat.as_bytes()).await {
                        held.push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    // Unknown coupons and request ids, hung up on early.
    {
        let (attacking, tag) = (attacking.clone(), env.tag.clone());
        attacks.push(tokio::spawn(async move {
            let mut round = 0;
            while attacking.load(Ordering::Relaxed) {
                round += 1;
                hang_up_flood(addr, 300, Duration::from_millis(10), |i| {
                    if i % 2 == 0 {
                        format!("/v1/coupons/{tag}-nx{round}-{i}")
                    } else {
                        format!("/v1/issue-requests/{}?wait_ms=5000", uuid::Uuid::new_v4())
                    }
                })
                .await;
            }
        }));
    }
    // Fresh Idempotency-Keys on a coupon that refuses (a real account).
    {
        let (attacking, http, later) = (attacking.clone(), reqwest::Client::new(), later.clone());
        let token = key.token_for("mallory");
        attacks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while attacking.load(Ordering::Relaxed) {
                i += 1;
                let _ = http
                    .post(format!("http://{addr}/v1/coupons/{later}/issue"))
                    .bearer_auth(&token)
                    .header("idempotency-key", format!("fresh-{i}"))
                    .header("x-forwarded-for", format!("2001:db8:6::{:x}", i % 65_536))
                    .json(&json!({}))
                    .send()
                    .await;
            }
        }));
    }
    // Probe and document floods, from rotating addresses.
    {
        let (attacking, http) = (attacking.clone(), reqwest::Client::new());
        attacks.push(tokio::spawn(async move {
            let mut i = 0u32;
            while attacking.load(Ordering::Relaxed) {
                i += 1;
                let path = if i.is_multiple_of(2) {
                    "/readyz"
                } else {
                    "/openapi.json"
                };
                let _ = http
                    .get(format!("http://{addr}{path}"))
                    .header("x-forwarded-for", std::net::Ipv4Addr::from(i).to_string())
                    .send()
                    .await;
            }
        }));
    }
    // Forged, expired and foreign tokens; each must be 401.
    let forged_ok = Arc::new(AtomicBool::new(true));
    {
        let (attacking, http, forged_ok) =
            (attacking.clone(), reqwest::Client::new(), forged_ok.clone());
        let stranger = TestKey::load("b");
        let tokens = [
            stranger.token_for("ann"),
            key.sign(&claims_for("ann", -600)),
            key.sign(&json!({ "sub": "ann", "iss": ISSUER, "aud": "elsewhere",
                              "exp": chrono::Utc::now().timestamp() + 600 })),
        ];
        let sale = sale.clone();
        attacks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while attacking.load(Ordering::Relaxed) {
                i += 1;
                let r = http
                    .post(format!("http://{addr}/v1/coupons/{sale}/issue"))
                    .bearer_auth(&tokens[i % tokens.len()])
                    .header("x-forwarded-for", format!("198.51.100.{}", i % 250))
                    .json(&json!({}))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() != 401
                    && r.status() != 429
                {
                    forged_ok.store(false, Ordering::Relaxed);
                }
            }
        }));
    }

    // The honest sale: 150 users, three requests each, each with a token of
    // its own and an address of its own.
    let honest = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let outcomes: Vec<(u16, serde_json::Value)> = futures::stream::iter(0..450u32)
        .map(|i| {
            let (honest, sale) = (honest.clone(), sale.clone());
            let user = format!("h{}", i % 150);
            let token = key.token_for(&user);
            async move {
                // An honest client retries a 503 or 429 after its Retry-After.
                for _ in 0..60 {
                    let r = honest
                        .post(format!("http://{addr}/v1/coupons/{sale}/issue"))
                        .bearer_auth(&token)
                        .header("x-forwarded-for", format!("203.0.113.{}", i % 150))
                        .json(&json!({}))
                        .send()
                        .await;
                    let Ok(r) = r else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let (code, body) = split(r).await;
                    if code == 503 && body.get("request_id").is_some() {
                        // Maybe in the log: its status tells.
                        return (code, body);
                    }
                    if code == 503 || code == 429 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    return (code, body);
                }
                panic!("an honest request was never answered");
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let peak = rss_kib(pid);
    attacking.store(false, Ordering::Relaxed);
    for a in attacks {
        let _ = tokio::time::timeout(Duration::from_secs(30), a).await;
    }

    let mut accepted = HashSet::new();
    let mut unconfirmed = HashSet::new();
    for (code, body) in &outcomes {
        match code {
            202 => {
                accepted.insert(body["request_id"].as_str().unwrap().to_owned());
            }
            503 => {
                unconfirmed.insert(body["request_id"].as_str().unwrap().to_owned());
            }
            _ => panic!("an honest request was answered {code}: {body}"),
        }
    }
    assert!(
        accepted.len() > stock as usize,
        "the sale got through: {}",
        accepted.len()
    );
    assert!(
        forged_ok.load(Ordering::Relaxed),
        "a forged token was not refused"
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "the ingress held {peak} KiB under the attack, past {RSS_BOUND_KIB}"
    );

    // The honest clients' promise, in full.
    firstcome_suite::check_promise_with(
        &env,
        &client,
        &[(sale.clone(), stock)],
        &accepted,
        &unconfirmed,
        Duration::from_secs(180),
    )
    .await;

    // Redis kept no refusal for long, and the pool is whole: an uncached
    // coupon, a status that misses Redis and the probes answer as before.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let keys = env
        .keys_matching(&format!("{}idem:{{{later}}}:*", env.common.redis_prefix))
        .await;
    assert!(keys.len() < 100, "{} refusals still held", keys.len());
    let fresh = env.coupon_id("after");
    assert_eq!(client.create_coupon(&fresh, 1).await.0, 201);
    let (code, body) = client.get(&format!("/v1/coupons/{fresh}")).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = client.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = split(
        honest
            .post(format!("http://{addr}/v1/coupons/{fresh}/issue"))
            .bearer_auth(key.token_for("late"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 202, "{body}");

    worker.stop().await;
    ingress.kill().await.unwrap();
}
