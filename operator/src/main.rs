//! `conveyor-operator`: parses the configuration, installs logging and runs the operator until
//! SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser;
use conveyor_logging::LogArgs;
use conveyor_operator::Config;

/// What is logged when `RUST_LOG` is unset.
const DEFAULT_LOG_FILTER: &str = "info,kube=warn,async_nats=warn";

/// The operator's settings and the logging flag every Conveyor binary shares.
#[derive(Debug, Parser)]
#[command(
    name = "conveyor-operator",
    version,
    about = "Kubernetes operator for Conveyor job queues"
)]
struct Args {
    #[command(flatten)]
    config: Config,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { config, log } = Args::parse();
    conveyor_logging::init(log.log_format, DEFAULT_LOG_FILTER);
    conveyor_operator::run(config, shutdown_signal())
        .await
        .context("conveyor-operator failed")
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
