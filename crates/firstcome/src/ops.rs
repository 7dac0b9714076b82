//! The operations port of a binary: `/metrics` for Prometheus, and the
//! worker's probes. It is a listener of its own, so metrics never reach the
//! public API (and a public load balancer never reaches them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What Prometheus is told the body is.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A rendered scrape as an HTTP answer.
pub fn metrics_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// A bound operations listener.
pub struct OpsServer {
    listener: TcpListener,
}

impl OpsServer {
    /// Binds `addr` (`FIRSTCOME_METRICS_LISTEN`).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("binding the metrics listener {addr} (FIRSTCOME_METRICS_LISTEN)")
        })?;
        Ok(Self { listener })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves `router` until `shutdown` is cancelled.
    pub fn spawn(self, router: Router, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let serve = axum::serve(self.listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the metrics listener failed");
            }
        })
    }
}

/// When a loop last reported itself alive, for a liveness probe.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    last_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    /// The loop is alive now.
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last beat.
    pub fn silent_for(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}
