//! `firstcome-worker migrate`: the database migrations, safe to run
//! repeatedly and concurrently.

use std::process::ExitCode;

/// The arguments of `migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Postgres URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

/// Applies the migrations.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    firstcome::telemetry::init(false);
    let pool = sqlx::PgPool::connect(&args.database_url).await?;
    firstcome::db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(ExitCode::SUCCESS)
}
