//! The Conveyor operator: a `JobQueue` controller that keeps each queue's JetStream assets in
//! line with its spec, a `Worker` controller that renders worker Deployments with the runtime
//! injected, a backlog-driven scaler, leader election on a Lease, an HTTP server for
//! health and metrics, and an optional web dashboard on a port of its own. The
//! `conveyor-operator` binary is a thin `main` over [`run`].

pub mod assets;
pub mod conditions;
pub mod config;
pub mod context;
pub mod dashboard;
pub mod dispatcher;
pub mod events;
pub mod figures;
pub mod guarded;
pub mod http;
pub mod jobqueue;
pub mod leader;
pub mod metrics;
pub mod nats;
pub mod ratelimit;
pub mod scaler;
pub mod schedule;
pub mod states;
pub mod worker;
pub mod workflow;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use context::Context;
use metrics::Metrics;

/// Why the operator stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Kubernetes client could be configured (no kubeconfig, no in-cluster config).
    #[error("cannot configure the Kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    /// Another replica took the Lease over; this one must restart to stand by again.
    #[error("lost the leader lease {0}")]
    LostLeadership(String),
}

/// Runs the operator with the default Kubernetes client (kubeconfig or in-cluster) until
/// `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    run_with_client(config, client, shutdown).await
}

/// Runs the operator with `client` until `shutdown` resolves.
pub async fn run_with_client(
    config: Config,
    client: kube::Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let state = http::HttpState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let addr = config.http_addr;
    let (bound, serve) = http::bind(addr, state, stop.clone())
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    tracing::info!(%bound, "serving /healthz, /readyz and /metrics");
    let server = tokio::spawn(serve);

    let on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });

    let ctx = Arc::new(Context::new(
        client.clone(),
        config.clone(),
        metrics.clone(),
    ));
    let stores = dashboard::StoreSlot::default();
    let dashboard = match config.dashboard_addr {
        None => None,
        Some(addr) => {
            let state = dashboard::DashboardState {
                ctx: ctx.clone(),
                stores: stores.clone(),
                token: config.dashboard_token.clone().map(|t| t.0),
            };
            let (bound, serve) = match dashboard::bind(addr, state, stop.clone()).await {
                Ok(bound) => bound,
                Err(source) => {
                    // The HTTP server is already running: stop it too.
                    stop.cancel();
                    return Err(Error::Listen { addr, source });
                }
            };
            tracing::info!(url = %format!("http://{bound}/"), writable = config.dashboard_token.is_some(), "serving the dashboard");
            Some(tokio::spawn(serve))
        }
    };
    let result = if config.leader_election {
        lead_then_run(&config, client, ctx, &stores, &ready, &stop).await
    } else {
        ready.store(true, Ordering::Relaxed);
        controllers(ctx, stores, stop.clone()).await;
        Ok(())
    };
    stop.cancel();
    for task in std::iter::once(server).chain(dashboard) {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(Error::Http(err)),
            Err(err) => tracing::warn!(%err, "HTTP server task failed"),
        }
    }
    result
}

/// Waits for the Lease, then runs the controllers until shutdown or until the Lease is lost.
async fn lead_then_run(
    config: &Config,
    client: kube::Client,
    ctx: Arc<Context>,
    stores: &dashboard::StoreSlot,
    ready: &AtomicBool,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let elector = leader::Elector::new(
        client,
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        config.lease_duration,
    );
    let (tx, mut leading) = watch::channel(false);
    let election_stop = CancellationToken::new();
    let election = tokio::spawn(elector.run(tx, election_stop.clone()));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, lease = %config.lease_name, "waiting for the leader lease");
    let became_leader = tokio::select! {
        () = stop.cancelled() => false,
        changed = leading.wait_for(|l| *l) => changed.is_ok(),
    };
    let mut result = Ok(());
    if became_leader {
        tracing::info!(%identity, "leading");
        ctx.metrics.set_leader(true);
        let controllers_stop = stop.child_token();
        let running = tokio::spawn(controllers(
            ctx.clone(),
            stores.clone(),
            controllers_stop.clone(),
        ));
        tokio::select! {
            () = stop.cancelled() => {}
            _ = leading.wait_for(|l| !*l) => {
                result = Err(Error::LostLeadership(config.lease_name.clone()));
            }
        }
        controllers_stop.cancel();
        let _ = running.await;
        ctx.metrics.set_leader(false);
    }
    election_stop.cancel();
    let _ = election.await;
    result
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "conveyor-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Runs both controllers and the scaler until `stop` is cancelled; their stores are in
/// `stores` for the dashboard meanwhile.
async fn controllers(ctx: Arc<Context>, stores: dashboard::StoreSlot, stop: CancellationToken) {
    let (queues, queue_store) = jobqueue::controller(&ctx);
    let limited_queues = queue_store.clone();
    let dispatched_queues = queue_store.clone();
    let run_queues = queue_store.clone();
    let (workers, worker_store) = worker::controller(&ctx);
    let pruned = (queue_store.clone(), worker_store.clone());
    let shown = dashboard::Stores {
        queues: queue_store.clone(),
        workers: worker_store.clone(),
    };
    *stores
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shown);
    let on = |token: &CancellationToken| {
        let token = token.clone();
        async move { token.cancelled().await }
    };
    let all = async {
        tokio::join!(
            jobqueue::run(queues, ctx.clone(), on(&stop)),
            worker::run(workers, ctx.clone(), on(&stop)),
            schedule::run(ctx.clone(), on(&stop)),
            workflow::run(ctx.clone(), on(&stop)),
            workflow::engine::run(ctx.clone(), run_queues, stop.clone()),
            scaler::run(ctx.clone(), worker_store, queue_store, stop.clone()),
            dispatcher::run(ctx.clone(), dispatched_queues, stop.clone()),
            ratelimit::run(ctx.clone(), limited_queues, stop.clone()),
            metrics::prune(ctx.metrics.clone(), pruned.0, pruned.1, stop.clone()),
        )
    };
    // A controller's graceful shutdown waits for its running reconciles, and for a store that
    // never became ready (e.g. its CRD is not installed): bound the wait.
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = all => {}
        () = grace => tracing::warn!(?SHUTDOWN_GRACE, "controllers did not stop in time; leaving them"),
    }
    *stores
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
}

/// How long the controllers get to finish their reconciles after a shutdown request.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
