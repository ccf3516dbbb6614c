//! The Conveyor worker runtime: pulls jobs from a queue and hands them to user code by one of
//! the handler modes ([`handler`]), with health and metrics ([`health`]) and a graceful drain
//! on SIGTERM. `install` copies the binary into a shared volume for the init container.

pub mod handler;
pub mod health;
pub mod install;
pub mod joblog;
pub mod settings;

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
            conveyor_logging::init(args.log.log_format, "info");
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
    // A pull returns at least every poll_wait while a slot is free; allow a few missed ones.
    let stall_after = args
        .poll_wait
        .saturating_mul(3)
        .saturating_add(std::time::Duration::from_secs(10));
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
        tokio::spawn(health::serve(listener, metrics.clone()));
    }
    let shutdown = CancellationToken::new();
    let signalled = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signalled.cancel();
    });
    let handler = Arc::new(handler);
    let queue = conveyor::names::QueueRef::new(&args.namespace, &args.queue);
    let sweeper = Sweeper::start(&args, queue.clone());
    let mut replaced = false;
    loop {
        let nats = if replaced {
            // Still lost (liveness fails) until a new client is connected: a runtime that cannot
            // get one is restarted by its probe.
            match reconnect(&args, &sweeper.disconnected, &shutdown).await {
                Some(nats) => nats,
                None => return Ok(()),
            }
        } else {
            connect(&args, &sweeper.disconnected).await?
        };
        metrics.connected(nats.clone());
        sweeper.client.send_replace(Some(nats.clone()));
        if replaced {
            // The job that killed the last client is among the last delivered: move it out of
            // the way before taking jobs again.
            sweeper.disconnected.notify_one();
        }
        replaced = true;
        let result = conveyor::Worker::new(async_nats::jetstream::new(nats), queue.clone())
            .options(args.worker_options())
            .shared_handler(handler.clone())
            .observer(joblog::JobLog::new(metrics.clone()))
            .run(shutdown.clone().cancelled_owned())
            .await;
        match result {
            // The client died (its connection task is gone): jobs running on it were stopped
            // and come back after the ack wait; carry on with a new client.
            Err(conveyor::worker::WorkerError::ConnectionLost) if !shutdown.is_cancelled() => {
                metrics.connection_lost();
                warn!("the NATS client is gone for good; connecting a new one");
            }
            result => {
                let summary = result.context("running the worker")?;
                if shutdown.is_cancelled() || args.max_jobs.is_none() {
                    info!(?summary, "exiting");
                    return Ok(());
                }
                // max_jobs taken and every job finished: start over as a fresh process in place
                // of this one. The container never exits, so the kubelet neither restarts it
                // (no restart count, no CrashLoopBackOff back-off) nor reports a crash.
                let recycled = std::env::var(RECYCLED)
                    .ok()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
                    .saturating_add(1);
                info!(
                    ?summary,
                    recycled, "took max_jobs jobs; recycling into a fresh process"
                );
                drop(handler);
                return Err(reexec(recycled));
            }
        }
    }
}

/// Dead-letters the jobs that no NATS client can read ([`conveyor::stored::sweep_unreadable`])
/// after each disconnect: such a job drops the connection of every worker it is delivered to
/// (async-nats 0.51 panics on a bare CR in a header and drops the connection on non-UTF-8), and
/// the jobs delivered beside it are lost with the connection, on each of its deliveries.
struct Sweeper {
    /// Notified on every disconnect of the client in use (and after a client was replaced).
    disconnected: Arc<tokio::sync::Notify>,
    /// The client in use.
    client: tokio::sync::watch::Sender<Option<async_nats::Client>>,
}

impl Sweeper {
    fn start(args: &RunArgs, queue: conveyor::names::QueueRef) -> Self {
        let disconnected = Arc::new(tokio::sync::Notify::new());
        let (client, mut current) = tokio::sync::watch::channel(None::<async_nats::Client>);
        let notified = disconnected.clone();
        let priorities = args.worker_options().priorities;
        let pod = args.pod_name.clone();
        tokio::spawn(async move {
            loop {
                notified.notified().await;
                // Sweep once a client is connected again (the one in use may be replaced).
                let nats = loop {
                    let nats = current.borrow_and_update().clone();
                    if let Some(nats) = nats
                        && nats.connection_state() == async_nats::connection::State::Connected
                    {
                        break nats;
                    }
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(200),
                        current.changed(),
                    )
                    .await;
                };
                let jetstream = async_nats::jetstream::new(nats);
                match conveyor::stored::sweep_unreadable(&jetstream, &queue, priorities, &pod).await
                {
                    Ok(ids) if ids.is_empty() => {}
                    Ok(ids) => warn!(jobs = ?ids, "dead-lettered jobs no NATS client can read"),
                    Err(error) => warn!(%error, "looking for jobs no NATS client can read"),
                }
            }
        });
        Self {
            disconnected,
            client,
        }
    }
}

/// A NATS client with the runtime's name and credentials; `disconnected` is notified each time
/// it loses its connection.
async fn connect(
    args: &RunArgs,
    disconnected: &Arc<tokio::sync::Notify>,
) -> anyhow::Result<async_nats::Client> {
    let options = args.nats_options().context("NATS connection settings")?;
    let notify = disconnected.clone();
    let connect = options
        .connect_options()
        .context("NATS connection settings")?
        .event_callback(move |event| {
            let notify = notify.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    notify.notify_one();
                }
            }
        });
    // The error names the redacted URL and the server's reason (authorization, TLS …).
    Ok(options.connect_with(connect).await?)
}

/// Times this runtime has recycled itself in place (set for the fresh process).
pub const RECYCLED: &str = "CONVEYOR_RECYCLED";

/// Replaces this process with a fresh run of the same binary, arguments and environment (plus
/// [`RECYCLED`]); the PID, and so the container, stays. Returns only if that failed.
fn reexec(recycled: u64) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => return anyhow::Error::new(error).context("finding the runtime's binary"),
    };
    let error = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(RECYCLED, recycled.to_string())
        .exec();
    anyhow::Error::new(error).context(format!("recycling: exec {}", exe.display()))
}

/// Pause between two attempts to replace a client whose connection task is gone.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Connects a new client after the last one's connection task died, trying again every
/// [`RECONNECT_PAUSE`] until it works; `None` when shut down first.
async fn reconnect(
    args: &RunArgs,
    disconnected: &Arc<tokio::sync::Notify>,
    shutdown: &CancellationToken,
) -> Option<async_nats::Client> {
    let mut failures = 0u32;
    loop {
        match connect(args, disconnected).await {
            Ok(nats) => return Some(nats),
            Err(error) => {
                // The first failure and then one in 30, not one line a second.
                if failures.is_multiple_of(30) {
                    warn!(error = %format!("{error:#}"), failures, "cannot connect a new NATS client yet; /healthz fails until one connects");
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RECONNECT_PAUSE) => {}
            () = shutdown.cancelled() => return None,
        }
    }
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
