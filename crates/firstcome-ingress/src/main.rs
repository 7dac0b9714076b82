//! `firstcome-ingress`: parse the configuration, set up logging, serve.

use clap::Parser;
use firstcome_ingress::{Application, IngressConfig};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: a sixth of the instructions per
/// request (docs/benchmarks.md, "What the counts cut").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = IngressConfig::parse();
    let _telemetry = firstcome::telemetry::init_service(cfg.common.log_json, "firstcome-ingress");
    tracing::info!(config = ?cfg, "starting");
    let shutdown = CancellationToken::new();
    firstcome::shutdown::cancel_on_signal(shutdown.clone());
    let app = Application::build(cfg).await?;
    app.run_until_stopped(shutdown).await
}
