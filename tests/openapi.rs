//! The API describes itself, and a client nobody here wrote judges it:
//! the served OpenAPI document equals `docs/openapi.json`, and schemathesis
//! (installed into `.state/venv` by `scripts/test`) finds no 5xx, no answer
//! outside the document and no schema-valid request refused, on every
//! operation, with a fixed seed (`tests/fuzz/schemathesis.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use firstcome_suite::TestEnv;
use firstcome_suite::services::PrivatePostgres;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_the_committed_one() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let served = client
        .http
        .get(format!("{}/openapi.json", client.base))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "application/json");
    let served = served.text().await.unwrap();
    let committed_path = root().join("docs/openapi.json");
    if std::env::var_os("FIRSTCOME_UPDATE_OPENAPI").is_some() {
        std::fs::write(&committed_path, &served).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        served == committed,
        "docs/openapi.json is not what the ingress serves; after an API change run \
         `FIRSTCOME_UPDATE_OPENAPI=1 scripts/test --test openapi` and commit the file"
    );
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for path in [
        "/v1/coupons",
        "/v1/coupons/{coupon_id}",
        "/v1/coupons/{coupon_id}/issue",
        "/v1/issue-requests/{request_id}",
        "/v1/users/{user_id}/coupons",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
    // Every error code the ingress can answer is in the document.
    let codes = doc["components"]["schemas"]["ErrorCode"].to_string();
    let source =
        std::fs::read_to_string(root().join("crates/firstcome-ingress/src/error.rs")).unwrap();
    for code in source
        .split("(StatusCode::")
        .skip(1)
        .filter_map(|rest| rest.split('"').nth(1))
    {
        assert!(
            codes.contains(&format!("\"{code}\"")),
            "error code {code} is documented"
        );
    }
    ingress.stop().await;
}

/// `/docs` renders the same document for people (Redoc): an HTML page
/// carrying every path of the served document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_renders_the_served_document() {
    let env = TestEnv::new().await;
    let ingress = env.spawn_ingress().await;
    let client = env.client(&ingress);
    let page = client
        .http
        .get(format!("{}/docs", client.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let page = page.text().await.unwrap();
    assert!(page.contains("<title>firstcome API</title>"), "{page}");
    assert!(page.contains("Redoc.init("), "{page}");
    let (_, doc) = client.get("/openapi.json").await;
    for path in doc["paths"].as_object().unwrap().keys() {
        assert!(page.contains(&format!("\"{path}\"")), "/docs lacks {path}");
    }
    ingress.stop().await;
}

fn schemathesis() -> PathBuf {
    let bin = root().join(".state/venv/bin/schemathesis");
    assert!(
        bin.exists(),
        "{} is missing: run the tests through `scripts/test`, which installs it",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_wrong_with_any_operation() {
    let bin = schemathesis();
    let mut env = TestEnv::new().await;
    // The fuzzer makes coupons with ids of its own choosing: a Postgres of
    // this test's own keeps them away from everybody else's rows.
    let pg = PrivatePostgres::start().await;
    env.use_postgres(pg.url()).await;
    let ingress = env.spawn_ingress().await;
    let worker = env.spawn_worker().await;
    let addr = ingress.addr.expect("it listens");
    let run = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(bin)
            .arg("--config-file")
            .arg(root().join("tests/fuzz/schemathesis.toml"))
            .args(["run", &format!("http://{addr}/openapi.json")])
            .args(["--checks", "all", "--no-color"])
            // A long poll lasts up to its wait_ms (10 s at most) by design;
            // schemathesis's default limit is 10 s. 20 s only catches a hang.
            .args(["--request-timeout", "20", "--max-response-time", "20"])
            .args(["-H", &format!("Authorization: Bearer {}", env.admin_token)])
            .output(),
    )
    .await
    .expect("schemathesis ends within 10 minutes")
    .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    // Its timings, for a run that took long (nextest shows it on success
    // with `--success-output final`).
    eprintln!("{report}");
    assert!(run.status.success(), "{report}");
    assert!(report.contains("passed"), "{report}");
    worker.stop().await;
    ingress.stop().await;
}
