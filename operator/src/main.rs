//! `conveyor-operator`: parses the configuration, installs logging and runs the operator until
//! SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser;
use conveyor_operator::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,async_nats=warn".into()),
        )
        .init();
    let config = Config::parse();
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
