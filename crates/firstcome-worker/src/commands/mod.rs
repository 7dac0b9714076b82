//! The operator's one-shot commands, beside the consumer's runtime: each
//! owns its arguments (`Args`) and a `run` that prints what it did (a table
//! for people, `--json` for scripts) and says how it ended as an exit code.
//! They import from the runtime, never the other way.

pub mod dlq;
pub mod migrate;
pub mod prune;
pub mod rebuild;
pub mod reconcile;
pub mod topics;

use std::process::ExitCode;

use firstcome::config::CommonConfig;
use serde::Serialize;

/// What every command does first: its logs, then the settings it shares
/// with the binaries checked without connecting.
fn start(common: &CommonConfig) -> anyhow::Result<()> {
    firstcome::telemetry::init(common.log_json);
    common.validate()?;
    Ok(())
}

/// Prints `value` as JSON for scripts (`pretty` or on one line, as each
/// command always has), or `table` for people.
fn print<T: Serialize + ?Sized>(
    json: bool,
    pretty: bool,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match (json, pretty) {
        (true, true) => println!("{}", serde_json::to_string_pretty(value)?),
        (true, false) => println!("{}", serde_json::to_string(value)?),
        (false, _) => print!("{}", table()),
    }
    Ok(())
}

/// A command whose failure says "run it again": its error on stderr and
/// exit code 2 (`reconcile` and `redis rebuild`, whose 1 means something
/// else or nothing).
fn or_exit_2(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
