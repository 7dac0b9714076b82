//! Every duration setting is written one way, humantime's (`250ms`, `10s`,
//! `2m`), under a name without a unit; the old integer names (`*_MS`,
//! `*_SECS`) are still read for this release, with a deprecation warning,
//! and the new name wins over the old (docs/running.md, "Configuration").

use std::process::Stdio;
use std::time::Duration;

use firstcome_suite::TestEnv;
use firstcome_suite::services::free_port;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Starts the ingress binary with `vars` and returns what it logged up to
/// its `starting` line (its settings), then stops it.
async fn started_with(env: &TestEnv, vars: &[(&str, &str)]) -> String {
    let addr = ([127, 0, 0, 1], free_port()).into();
    let mut cmd = env.ingress_command(addr);
    cmd.env("RUST_LOG", "info")
        .env(
            "FIRSTCOME_METRICS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the ingress binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("starting") {
                return;
            }
        }
        panic!("the ingress ended before it started: {seen}");
    })
    .await
    .unwrap_or_else(|_| panic!("no `starting` line within a minute: {seen}"));
    child.kill().await.unwrap();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_are_humantime_and_the_old_names_still_work_with_a_warning() {
    let env = TestEnv::new().await;

    let new = started_with(&env, &[("FIRSTCOME_MAX_WAIT", "4s")]).await;
    assert!(new.contains("max_wait: 4s"), "{new}");
    assert!(!new.contains("deprecated"), "{new}");

    let old = started_with(&env, &[("FIRSTCOME_MAX_WAIT_MS", "3000")]).await;
    assert!(old.contains("max_wait: 3s"), "{old}");
    assert!(
        old.contains("FIRSTCOME_MAX_WAIT_MS is deprecated")
            && old.contains("FIRSTCOME_MAX_WAIT=3000ms"),
        "{old}"
    );

    let both = started_with(
        &env,
        &[
            ("FIRSTCOME_MAX_WAIT_MS", "3000"),
            ("FIRSTCOME_MAX_WAIT", "5s"),
        ],
    )
    .await;
    assert!(both.contains("max_wait: 5s"), "the new name wins: {both}");

    // A value without a unit, or not a duration at all, is refused at
    // start and the error says how to write one.
    for bad in ["5000", "ten"] {
        let out = env
            .ingress_command(([127, 0, 0, 1], free_port()).into())
            .env("FIRSTCOME_MAX_WAIT", bad)
            .output()
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(
            said.contains("--max-wait") && said.contains("250ms, 10s or 2m"),
            "{said}"
        );
    }
}
