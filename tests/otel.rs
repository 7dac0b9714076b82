//! The `otel` cargo feature: the ingress built with it exports its spans
//! over OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT`, and the span of an issue
//! request carries the request's id and its coupon. The collector here is a
//! bare HTTP endpoint that keeps what it is sent; protobuf stores strings as
//! they are, so the ids can be found in the bodies without decoding them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use firstcome_suite::{TestEnv, otel_ingress_binary};

/// A stand-in OTLP/HTTP collector: every body posted to `/v1/traces`.
async fn collector() -> (SocketAddr, Arc<Mutex<Vec<Bytes>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body);
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, bodies)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_with_otel_the_ingress_exports_the_span_of_each_issue_request() {
    let env = TestEnv::new().await;
    let (collector, bodies) = collector().await;
    let binary = tokio::task::spawn_blocking(otel_ingress_binary)
        .await
        .unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut ingress = env
        .ingress_command_of(binary, listen)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info")
        .spawn()
        .expect("the otel ingress starts");
    let client = env.client_at(listen);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("http://{listen}/healthz"))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingress never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let coupon = env.coupon_id("otel");
    assert_eq!(client.create_coupon(&coupon, 1).await.0, 201);
    let (code, accepted) = client.issue(&coupon, "alice").await;
    assert_eq!(code, 202, "{accepted}");
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = bodies.lock().unwrap().iter().any(|b| {
            contains(b, &request_id) && contains(b, &coupon) && contains(b, "firstcome-ingress")
        });
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no exported span names request {request_id} ({} bodies received)",
            bodies.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ingress.kill().await.unwrap();
}
