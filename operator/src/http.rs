//! The operator's HTTP server: `/healthz` (the process is alive), `/readyz` (it is either
//! running its controllers or standing by for the Lease) and `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the operator has started its controllers or its leader election.
    pub ready: Arc<AtomicBool>,
}

/// The routes, for serving and for tests.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Binds `addr`; returns the bound address (useful with port 0) and the serving future, which
/// ends when `stop` is cancelled.
pub async fn bind(
    addr: SocketAddr,
    state: HttpState,
    stop: CancellationToken,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let serve = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    Ok((bound, async move { serve.await }))
}
