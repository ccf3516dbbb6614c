//! The web dashboard: a JSON API and a page (hand-written HTML, CSS and JS compiled into the
//! binary) served on its own port when `--dashboard-addr` is set. It shows queues and workers
//! from the status the controllers keep in their reflector stores (no NATS request), and reads
//! NATS only for one page of dead letters, pending or delayed jobs, one dead letter, or one
//! job's lookup, each bounded. Writes (requeue or purge one dead letter, or a page of the
//! matching ones) need `--dashboard-token` as a bearer token and a same-origin request; without
//! a token the dashboard is read-only. See `docs/dashboard.md`.

mod api;
mod history;
mod peek;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::FromRef;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use conveyor_crds::{JobQueue, Worker};
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// The controllers' caches the dashboard reads; present while this replica runs the
/// controllers (a standby waiting for the Lease has none).
#[derive(Clone)]
pub struct Stores {
    /// JobQueues with their status.
    pub queues: Store<JobQueue>,
    /// Workers with their status.
    pub workers: Store<Worker>,
}

/// Where the controllers put their stores for the dashboard, and take them back when they stop.
pub type StoreSlot = Arc<RwLock<Option<Stores>>>;

/// What the handlers read.
#[derive(Clone)]
pub struct DashboardState {
    /// NATS connections and settings.
    pub ctx: Arc<Context>,
    /// The controllers' stores, once running.
    pub stores: StoreSlot,
    /// The bearer token writes need; `None` keeps the dashboard read-only.
    pub token: Option<String>,
}

/// What the routes are served from: the handlers' state and the figures' last hour.
#[derive(Clone)]
struct Served {
    state: DashboardState,
    history: history::History,
}

impl FromRef<Served> for DashboardState {
    fn from_ref(served: &Served) -> Self {
        served.state.clone()
    }
}

impl FromRef<Served> for history::History {
    fn from_ref(served: &Served) -> Self {
        served.history.clone()
    }
}

impl DashboardState {
    fn stores(&self) -> Option<Stores> {
        self.stores
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The routes, for serving and for tests.
fn router(state: DashboardState, history: history::History) -> Router {
    // One page; its script shows the view the URL's fragment names (`#/queues`, …).
    let page = || get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) });
    Router::new()
        .route("/", page())
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        // Browsers ask for it; no icon, and no 404 in their console.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/info", get(api::info))
        .route("/api/queues", get(api::queues))
        .route("/api/workers", get(api::workers))
        .route("/api/queues/{namespace}/{name}", get(api::queue))
        .route(
            "/api/queues/{namespace}/{name}/dead-letters",
            get(api::dead_letters),
        )
        .route(
            "/api/queues/{namespace}/{name}/dead-letters/{sequence}",
            get(api::dead_letter),
        )
        .route(
            "/api/queues/{namespace}/{name}/dead-letters/{sequence}/{action}",
            post(api::dead_letter_action),
        )
        .route(
            "/api/queues/{namespace}/{name}/dead-letters/all/{action}",
            post(peek::bulk),
        )
        .route("/api/queues/{namespace}/{name}/jobs/{id}", get(api::job))
        .route("/api/queues/{namespace}/{name}/pending", get(peek::pending))
        .route("/api/queues/{namespace}/{name}/delayed", get(peek::delayed))
        .route(
            "/api/queues/{namespace}/{name}/history",
            get(history::history),
        )
        .layer(axum::middleware::from_fn(addressed_by_ip))
        .with_state(Served { state, history })
}

/// Answers only requests whose `Host` is an IP address or `localhost`: a page of another site
/// whose name was made to resolve to the dashboard's address (DNS rebinding) sends its own
/// name, and is refused before it can read anything.
async fn addressed_by_ip(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if host_is_ip_or_localhost(host) {
        next.run(request).await
    } else {
        (
            StatusCode::FORBIDDEN,
            format!("the dashboard answers requests to an IP address or localhost, not {host:?}"),
        )
            .into_response()
    }
}

/// Whether `host` (a `Host` header: a name or address, maybe with a port) is an IP address or
/// `localhost`.
fn host_is_ip_or_localhost(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// Why a write is refused, or `None` when it may go ahead: the dashboard must have a token,
/// the request must carry it (`Authorization: Bearer …`, compared in constant time) and must
/// not come from another site (`Sec-Fetch-Site`, else `Origin` against `Host`).
pub fn refuse_write(token: Option<&str>, headers: &HeaderMap) -> Option<(StatusCode, String)> {
    let Some(token) = token else {
        return Some((
            StatusCode::FORBIDDEN,
            "the dashboard is read-only: the operator has no --dashboard-token".into(),
        ));
    };
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site"))
        && site != "same-origin"
        && site != "none"
    {
        return Some((
            StatusCode::FORBIDDEN,
            format!("cross-site write refused (Sec-Fetch-Site: {site})"),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or_default();
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if origin_host != Some(host) {
            return Some((
                StatusCode::FORBIDDEN,
                format!("cross-site write refused (Origin {origin:?} is not this dashboard)"),
            ));
        }
    }
    let given = text(header::AUTHORIZATION)
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return Some((
            StatusCode::FORBIDDEN,
            "write refused: no valid token (Authorization: Bearer <dashboard token>)".into(),
        ));
    }
    None
}

/// Whether `a` equals `b`, taking the same time whatever bytes differ (the length of the
/// token is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds `addr`; returns the bound address and the serving future, which ends when `stop` is
/// cancelled.
pub async fn bind(
    addr: SocketAddr,
    state: DashboardState,
    stop: CancellationToken,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let history = history::History::default();
    let sampling = stop.child_token();
    let sampler = history.clone().sample(state.clone(), sampling.clone());
    let serve = axum::serve(listener, router(state, history))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    Ok((bound, async move {
        let sampler = tokio::spawn(sampler);
        let served = serve.await;
        // The samples are only for the pages: they stop with the server, however it ended.
        sampling.cancel();
        let _ = sampler.await;
        served
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn writes_need_a_configured_token_the_same_token_and_the_same_origin() {
        let good = [
            ("host", "127.0.0.1:8090"),
            ("authorization", "Bearer s3cret"),
        ];
        assert!(refuse_write(Some("s3cret"), &headers(&good)).is_none());
        let (status, message) = refuse_write(None, &headers(&good)).unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(message.contains("read-only"), "{message}");
        let wrong = [("host", "h"), ("authorization", "Bearer s3creT")];
        assert!(refuse_write(Some("s3cret"), &headers(&wrong)).is_some());
        assert!(refuse_write(Some("s3cret"), &headers(&[("host", "h")])).is_some());
        let same = [
            ("host", "127.0.0.1:8090"),
            ("origin", "http://127.0.0.1:8090"),
            ("sec-fetch-site", "same-origin"),
            ("authorization", "Bearer s3cret"),
        ];
        assert!(refuse_write(Some("s3cret"), &headers(&same)).is_none());
        let other_origin = [
            ("host", "127.0.0.1:8090"),
            ("origin", "http://evil.example"),
            ("authorization", "Bearer s3cret"),
        ];
        let (_, message) = refuse_write(Some("s3cret"), &headers(&other_origin)).unwrap();
        assert!(message.contains("cross-site"), "{message}");
        let cross_site = [
            ("host", "127.0.0.1:8090"),
            ("sec-fetch-site", "cross-site"),
            ("authorization", "Bearer s3cret"),
        ];
        assert!(refuse_write(Some("s3cret"), &headers(&cross_site)).is_some());
    }

    #[test]
    fn only_hosts_that_are_addresses_or_localhost_are_answered() {
        for host in [
            "127.0.0.1:8090",
            "10.0.0.7",
            "localhost:8090",
            "LOCALHOST",
            "[::1]:8090",
        ] {
            assert!(host_is_ip_or_localhost(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8090",
            "127.0.0.1.nip.io:80",
            "[evil]:1",
            "",
        ] {
            assert!(!host_is_ip_or_localhost(host), "{host}");
        }
    }

    #[test]
    fn constant_time_comparison_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
