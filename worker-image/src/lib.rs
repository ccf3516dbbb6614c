//! The Conveyor worker runtime: pulls jobs from a queue and hands them to user code by one of
//! the handler modes ([`handler`]), with health and metrics ([`health`]) and a graceful drain
//! on SIGTERM. `install` copies the binary into a shared volume for the init container.

pub mod handler;
pub mod health;
pub mod install;
pub mod settings;

use std::sync::Arc;

use anyhow::Context as _;
use tracing::info;

pub use settings::{Cli, Command, RunArgs};

/// Entry point of the binary.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Install { dir } => {
            let path = install::install(&dir)?;
            println!("installed {}", path.display());
            Ok(())
        }
        Command::Run(args) => {
            settings::init_logging(args.log_format);
            run(*args).await
        }
    }
}

/// Runs the worker until SIGTERM or SIGINT, then drains and returns.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let handler = handler::RuntimeHandler::new(
        args.handler_mode,
        &args.command,
        args.handler_url.as_deref(),
    )
    .await?;
    let mut connect =
        async_nats::ConnectOptions::new().name(format!("conveyor-worker {}", args.pod_name));
    if let Some(creds) = &args.nats_creds {
        connect = connect
            .credentials_file(creds)
            .await
            .with_context(|| format!("reading NATS credentials {}", creds.display()))?;
    }
    let nats = connect
        .connect(&args.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats_url))?;
    // A pull returns at least every poll_wait while a slot is free; allow a few missed ones.
    let stall_after = args.poll_wait * 3 + std::time::Duration::from_secs(10);
    let concurrency = usize::try_from(args.concurrency).unwrap_or(usize::MAX);
    let mut metrics = health::Metrics::new(concurrency, stall_after);
    if let Some(path) = &args.termination_message_path {
        metrics = metrics.running_jobs_file(path)?;
    }
    let metrics = Arc::new(metrics);
    if let Some(addr) = args.health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the health server to {addr}"))?;
        info!(%addr, "serving /healthz, /readyz and /metrics");
        tokio::spawn(health::serve(listener, metrics.clone(), nats.clone()));
    }
    let queue = conveyor::names::QueueRef::new(&args.namespace, &args.queue);
    let worker = conveyor::Worker::new(async_nats::jetstream::new(nats), queue)
        .options(args.worker_options());
    let summary = worker
        .handler(handler)
        .observer(metrics)
        .run(shutdown_signal())
        .await
        .context("running the worker")?;
    info!(?summary, "exiting");
    Ok(())
}

/// Completes on SIGTERM (what Kubernetes sends) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
