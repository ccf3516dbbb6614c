//! Health and metrics over HTTP: `/healthz` (liveness: fails when a handler is past its
//! deadline, i.e. could not be stopped, or when the worker stopped pulling although it has free
//! slots), `/readyz` (consuming, and connected to NATS) and `/metrics`
//! (Prometheus text). [`Metrics`] is also the worker's observer that feeds them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use conveyor::worker::{Disposition, JobReport, Observer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;
use tracing::warn;

/// How long past its deadline a handler may linger (while being killed) before liveness fails.
const DEADLINE_GRACE: Duration = Duration::from_secs(10);

/// Label of `conveyor_worker_jobs_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The runtime's metrics and liveness state.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<OutcomeLabel, Counter>,
    in_flight: Gauge,
    duration: Histogram,
    deadlines: Mutex<HashMap<u64, Option<Instant>>>,
    concurrency: usize,
    stall_after: Duration,
    last_pull: Mutex<Instant>,
    /// Set by the first pull: the queue was found and the worker consumes.
    consuming: std::sync::atomic::AtomicBool,
}

impl Metrics {
    /// Registers the metrics under the `conveyor_worker` prefix. Liveness fails when no pull
    /// returned for `stall_after` while fewer than `concurrency` jobs run.
    pub fn new(concurrency: usize, stall_after: Duration) -> Self {
        let mut registry = Registry::with_prefix("conveyor_worker");
        let jobs = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "jobs",
            "Attempts finished, by outcome (acked, retried, dead_lettered, given_back)",
            jobs.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Jobs being handled now",
            in_flight.clone(),
        );
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 18,
        ));
        registry.register(
            "handler_duration_seconds",
            "Time a handler took per attempt",
            duration.clone(),
        );
        Self {
            registry,
            jobs,
            in_flight,
            duration,
            deadlines: Mutex::new(HashMap::new()),
            concurrency,
            stall_after,
            last_pull: Mutex::new(Instant::now()),
            consuming: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(%error, "encoding metrics");
        }
        text
    }

    /// `Err` with the reason when a handler is past its deadline by more than the grace, or
    /// when the worker has free slots but stopped pulling.
    pub fn liveness(&self) -> Result<(), String> {
        let now = Instant::now();
        let deadlines = self
            .deadlines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let since_pull = self
            .last_pull
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed();
        if deadlines.len() < self.concurrency && since_pull > self.stall_after {
            return Err(format!(
                "no pull for {since_pull:?} although {} of {} slots are free",
                self.concurrency - deadlines.len(),
                self.concurrency
            ));
        }
        for (sequence, deadline) in deadlines.iter() {
            if let Some(deadline) = deadline
                && now > *deadline + DEADLINE_GRACE
            {
                return Err(format!(
                    "handler of job sequence {sequence} is {:?} past its deadline",
                    now - *deadline
                ));
            }
        }
        Ok(())
    }
}

impl Observer for Metrics {
    fn started(&self, sequence: u64, deadline: Option<Instant>) {
        self.in_flight.inc();
        self.deadlines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sequence, deadline);
    }

    fn finished(&self, report: &JobReport) {
        let started = self
            .deadlines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&report.sequence)
            .is_some();
        if started {
            self.in_flight.dec();
            self.duration.observe(report.duration.as_secs_f64());
        }
        let outcome = match report.disposition {
            Disposition::Acked => "acked",
            Disposition::Retried { .. } => "retried",
            Disposition::DeadLettered { .. } => "dead_lettered",
            Disposition::GivenBack => "given_back",
            Disposition::Cancelled => "cancelled",
        };
        self.jobs.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    fn pulled(&self) {
        self.consuming
            .store(true, std::sync::atomic::Ordering::Relaxed);
        *self
            .last_pull
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    nats: async_nats::Client,
}

/// Serves the health and metrics endpoints on `listener` until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    nats: async_nats::Client,
) {
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, nats });
    if let Err(error) = axum::serve(listener, app).await {
        warn!(%error, "health server stopped");
    }
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.metrics.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if !state
        .metrics
        .consuming
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let reason = "not consuming yet (waiting for the queue's stream and consumers)\n";
        return (StatusCode::SERVICE_UNAVAILABLE, reason.into());
    }
    match state.nats.connection_state() {
        async_nats::connection::State::Connected => (StatusCode::OK, "ok\n".into()),
        other => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("NATS connection is {other}\n"),
        ),
    }
}

async fn metrics_text(
    State(state): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_when_pulling_stops_with_free_slots() {
        let metrics = Metrics::new(1, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(metrics.liveness().unwrap_err().contains("no pull for"));
        metrics.started(1, None);
        assert!(
            metrics.liveness().is_ok(),
            "all slots busy: not pulling is fine"
        );
        metrics.started(
            2,
            Some(Instant::now() - DEADLINE_GRACE - Duration::from_secs(1)),
        );
        assert!(
            metrics
                .liveness()
                .unwrap_err()
                .contains("past its deadline")
        );
    }

    #[test]
    fn metrics_count_outcomes() {
        let metrics = Metrics::new(4, Duration::from_secs(60));
        metrics.started(7, None);
        metrics.finished(&JobReport {
            id: "a".into(),
            sequence: 7,
            attempt: 1,
            disposition: Disposition::Retried {
                delay: Duration::from_secs(1),
            },
            duration: Duration::from_millis(3),
        });
        let text = metrics.encode();
        assert!(
            text.contains(r#"conveyor_worker_jobs_total{outcome="retried"} 1"#),
            "{text}"
        );
        assert!(text.contains("conveyor_worker_jobs_in_flight 0"), "{text}");
        assert!(
            text.contains("conveyor_worker_handler_duration_seconds_count 1"),
            "{text}"
        );
    }
}
