//! The operations ports: after a burst, the ingress's and the workers'
//! `/metrics` add up with each other and with Postgres, every metric of
//! `firstcome::metrics::names` is exposed, and the worker's probes answer.

use std::collections::HashMap;
use std::time::Duration;

use firstcome::metrics::names;
use firstcome_suite::{Scrape, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_ingress_and_worker_metrics_add_up_with_each_other_and_postgres() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let workers = [env.spawn_worker().await, env.spawn_worker().await];
    // Both in the group before the burst: a second member joining during it
    // moves partitions with batches in hand, whose records are then batched
    // twice (once given up, once decided), as on one core's worth of CPU.
    for w in &workers {
        w.wait_assignment("a share of the partitions", |a| {
            !a.is_empty() && a.len() < firstcome_suite::PARTITIONS as usize
        })
        .await;
    }
    let client = env.client(&ingress);
    let coupons = [env.coupon_id("m1"), env.coupon_id("m2")];
    for c in &coupons {
        assert_eq!(client.create_coupon(c, 5).await.0, 201);
    }

    // 20 users per coupon, every fourth asking twice, plus answers that
    // append nothing: an unknown coupon and a bad user id.
    let mut answered: HashMap<u16, usize> = HashMap::new();
    let mut sends = Vec::new();
    for c in &coupons {
        for u in 0..20 {
            let user = format!("{}-u{u}", env.tag);
            sends.push((c.clone(), user.clone()));
            if u % 4 == 0 {
                sends.push((c.clone(), user));
            }
        }
    }
    sends.push((env.coupon_id("nope"), format!("{}-x", env.tag)));
    sends.push((coupons[0].clone(), "not valid!".to_owned()));
    let results = futures::future::join_all(sends.iter().map(|(c, u)| client.issue(c, u))).await;
    for (code, _) in &results {
        *answered.entry(*code).or_default() += 1;
    }
    let accepted = answered.get(&202).copied().unwrap_or(0);
    assert_eq!(accepted, 50, "{answered:?}");
    assert_eq!(answered.get(&404), Some(&1), "{answered:?}");
    assert_eq!(answered.get(&422), Some(&1), "{answered:?}");

    // The ingress counted what it answered.
    let ingress_scrape = Scrape::of(ingress.metrics).await;
    let issue = |status: u16| {
        format!(
            r#"{}_total{{route="/v1/coupons/{{coupon_id}}/issue",method="POST",status="{status}"}}"#,
            names::INGRESS_REQUESTS
        )
    };
    assert_eq!(
        ingress_scrape.get(&issue(202)),
        50.0,
        "{}",
        ingress_scrape.text
    );
    assert_eq!(ingress_scrape.get(&issue(404)), 1.0);
    assert_eq!(ingress_scrape.get(&issue(422)), 1.0);
    let accepted_total = format!("{}_total", names::INGRESS_ACCEPTED);
    assert_eq!(ingress_scrape.get(&accepted_total), 50.0);
    assert_eq!(
        ingress_scrape.get(&format!("{}_count", names::INGRESS_PRODUCE_DURATION)),
        50.0
    );
    // The scrape goes to the operations port: nothing is in flight on the
    // public one.
    assert_eq!(ingress_scrape.get(names::INGRESS_IN_FLIGHT), 0.0);

    // The workers' decisions, summed over both, reach what was accepted and
    // match the ledger outcome by outcome.
    let coupon_refs: Vec<&str> = coupons.iter().map(String::as_str).collect();
    env.wait_decided(&coupon_refs, 50).await;
    let decisions = format!("{}_total", names::WORKER_DECISIONS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let scrapes = loop {
        let scrapes = [
            Scrape::of(workers[0].metrics).await,
            Scrape::of(workers[1].metrics).await,
        ];
        let total: f64 = scrapes.iter().map(|s| s.sum(&decisions)).sum();
        if total >= 50.0 || tokio::time::Instant::now() > deadline {
            break scrapes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ledger: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM request_ledger WHERE coupon_id = ANY($1) GROUP BY status",
    )
    .bind(&coupon_refs)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let ledger: HashMap<String, i64> = ledger.into_iter().collect();
    // Which repeated asks are `duplicate` depends on the log order; the
    // stock does not.
    assert_eq!(ledger.get("issued"), Some(&10), "{ledger:?}");
    assert_eq!(ledger.values().sum::<i64>(), 50, "{ledger:?}");
    for status in firstcome::Status::FINAL {
        let series = format!(r#"{decisions}{{outcome="{status}"}}"#);
        let counted: f64 = scrapes.iter().map(|s| s.get(&series)).sum();
        assert_eq!(
            counted,
            ledger.get(status.as_str()).copied().unwrap_or(0) as f64,
            "{series}: {}\n{}",
            scrapes[0].text,
            scrapes[1].text
        );
    }
    let total: f64 = scrapes.iter().map(|s| s.sum(&decisions)).sum();
    assert_eq!(total, 50.0, "decisions = requests accepted");
    let batched: f64 = scrapes
        .iter()
        .map(|s| s.get(&format!("{}_sum", names::WORKER_BATCH_RECORDS)))
        .sum();
    assert_eq!(batched, 50.0, "every record went through one batch");
    let dead: f64 = scrapes
        .iter()
        .map(|s| s.sum(&format!("{}_total", names::WORKER_DEAD_LETTERS)))
        .sum();
    assert_eq!(dead, 0.0);

    // Every metric of the names module is exposed by its binary (the lag
    // once librdkafka reported it, below).
    for name in names::exposed() {
        if name == names::WORKER_CONSUMER_LAG {
            continue;
        }
        let scrape = if name.starts_with("firstcome_ingress_") {
            &ingress_scrape
        } else {
            &scrapes[0]
        };
        assert!(
            scrape.names(&name),
            "{name} is not exposed:\n{}",
            scrape.text
        );
    }

    // The lag of the partitions that carried the burst is exported (the
    // others have no consumed offset, so librdkafka knows no lag for them),
    // and once everything is decided it is zero.
    let log = env.read_request_log();
    assert_eq!(log.len(), 50);
    // Each record names its request in a header, as its value does.
    for r in &log {
        let value: serde_json::Value =
            serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            r.headers
                .get(firstcome::record::REQUEST_ID_HEADER)
                .map(String::as_str),
            value["request_id"].as_str(),
            "offset {} of partition {}",
            r.offset,
            r.partition
        );
    }
    let busy: std::collections::BTreeSet<String> = log
        .iter()
        .map(|r| {
            format!(
                r#"{}{{partition="{}"}}"#,
                names::WORKER_CONSUMER_LAG,
                r.partition
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let scrapes = loop {
        let scrapes = [
            Scrape::of(workers[0].metrics).await,
            Scrape::of(workers[1].metrics).await,
        ];
        let reported: HashMap<&String, f64> = scrapes
            .iter()
            .flat_map(|s| s.samples.iter().filter(|(k, _)| busy.contains(*k)))
            .map(|(k, v)| (k, *v))
            .collect();
        if reported.len() == busy.len() && reported.values().all(|v| *v == 0.0) {
            break scrapes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag of {busy:?} not reported as 0: {reported:?}\n{}",
            scrapes[0].text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // …and the other way round: nothing is exposed that the names module
    // (which the dashboard and alert tests go by) does not list.
    let exposed = names::exposed();
    for scrape in [&ingress_scrape, &scrapes[0], &scrapes[1]] {
        for line in scrape.text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = line.split(' ').skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            let sample = match kind {
                "counter" => format!("{name}_total"),
                "histogram" => format!("{name}_bucket"),
                _ => name.to_owned(),
            };
            assert!(
                exposed.contains(&sample),
                "{name} ({kind}) is missing from names::exposed()"
            );
        }
    }

    for w in workers {
        w.stop().await;
    }
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_probes_answer_and_metrics_stay_off_the_public_port() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;

    let health = reqwest::get(format!("http://{}/healthz", worker.metrics))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("http://{}/readyz", worker.metrics))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"postgres": true, "redis": true}));

    let (code, body) = env.client(&ingress).get("/metrics").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_request_no_longer_counts_as_in_flight() {
    let env = TestEnv::new().await;
    // No worker: the request stays pending, so a long poll on it waits.
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("hangup");
    assert_eq!(client.create_coupon(&coupon, 1).await.0, 201);
    let (code, accepted) = client.issue(&coupon, "alice").await;
    assert_eq!(code, 202, "{accepted}");
    let id = accepted["request_id"].as_str().unwrap();

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!(
        "http://{}/v1/issue-requests/{id}?wait_ms=10000",
        ingress.addr.unwrap()
    );
    let during = tokio::spawn(async move { impatient.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let held = Scrape::of(ingress.metrics).await;
    assert_eq!(
        held.get(names::INGRESS_IN_FLIGHT),
        1.0,
        "the long poll is in flight"
    );
    assert!(during.await.unwrap().is_err(), "the client gave up");

    // Well before the 10 s wait would have ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let now = Scrape::of(ingress.metrics).await;
        if now.get(names::INGRESS_IN_FLIGHT) == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned request still counts as in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ingress.stop().await;
}
