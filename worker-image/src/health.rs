//! Health and metrics over HTTP: `/healthz` (liveness: fails when a handler is past its
//! deadline, i.e. could not be stopped, when the worker stopped pulling although it has free
//! slots, or while its NATS client is dead for good), `/readyz` (consuming, and connected to
//! NATS) and `/metrics`
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

/// Most bytes of the running-jobs file (Kubernetes keeps 4096 of a termination message).
const RUNNING_FILE_LIMIT: usize = 4000;

/// The running-jobs file is rewritten at most this often: a job's start or end costs a flag,
/// not a rewrite (which took ~14 µs, as much as the rest of a no-op job).
const RUNNING_FILE_INTERVAL: Duration = Duration::from_millis(20);

/// Running jobs by stream sequence: id and deadline.
type RunningJobs = HashMap<u64, (String, Option<Instant>)>;

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
    running: Arc<Mutex<RunningJobs>>,
    /// Where the running jobs' ids are kept, if anywhere.
    running_file: Option<RunningFile>,
    concurrency: usize,
    stall_after: Duration,
    last_pull: Mutex<Instant>,
    /// Set by the first pull: the queue was found and the worker consumes.
    consuming: std::sync::atomic::AtomicBool,
    /// The NATS client in use (replaced when the runtime reconnects).
    nats: Mutex<Option<async_nats::Client>>,
    /// Set while the client's connection task is gone for good, until a new client runs.
    lost: std::sync::atomic::AtomicBool,
    /// Times the runtime replaced a dead client.
    reconnects: Counter,
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
        let reconnects = Counter::default();
        registry.register(
            "nats_client_replaced",
            "Times the runtime replaced a NATS client whose connection task was gone for good",
            reconnects.clone(),
        );
        Self {
            registry,
            jobs,
            in_flight,
            duration,
            running: Arc::default(),
            running_file: None,
            concurrency,
            stall_after,
            last_pull: Mutex::new(Instant::now()),
            consuming: std::sync::atomic::AtomicBool::new(false),
            nats: Mutex::new(None),
            lost: std::sync::atomic::AtomicBool::new(false),
            reconnects,
        }
    }

    /// The runtime runs on `client` from now on.
    pub fn connected(&self, client: async_nats::Client) {
        *self
            .nats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(client);
        self.lost.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The client's connection task is gone for good; liveness and readiness fail until
    /// [`Metrics::connected`] is called with a new one.
    pub fn connection_lost(&self) {
        self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
        self.reconnects.inc();
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps the ids of the running jobs in `path` as JSON (`{"runningJobs":["a","b"]}`),
    /// rewritten within [`RUNNING_FILE_INTERVAL`] of a job starting or finishing, at most
    /// [`RUNNING_FILE_LIMIT`] bytes.
    pub fn running_jobs_file(mut self, path: &std::path::Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        self.running_file = Some(RunningFile::start(file, Arc::downgrade(&self.running)));
        Ok(self)
    }

    fn running_changed(&self) {
        if let Some(file) = &self.running_file {
            file.changed();
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

    /// `Err` with the reason when a handler is past its deadline by more than the grace, when
    /// the worker has free slots but stopped pulling while connected (a pull that fails is not
    /// a pull), or while its NATS client is dead for good.
    pub fn liveness(&self) -> Result<(), String> {
        if self.lost() {
            return Err("the NATS client's connection is gone; reconnecting".into());
        }
        let now = Instant::now();
        let running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let since_pull = self
            .last_pull
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed();
        // Disconnected, not pulling is NATS's outage (readiness says so); a restart would not
        // help. Connected and still not pulling is this worker's fault.
        let connected = self
            .nats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_none_or(|c| c.connection_state() == async_nats::connection::State::Connected);
        if connected && running.len() < self.concurrency && since_pull > self.stall_after {
            return Err(format!(
                "no pull for {since_pull:?} although {} of {} slots are free",
                self.concurrency - running.len(),
                self.concurrency
            ));
        }
        for (sequence, (id, deadline)) in running.iter() {
            if let Some(deadline) = deadline
                && now > *deadline + DEADLINE_GRACE
            {
                return Err(format!(
                    "handler of job {id} (sequence {sequence}) is {:?} past its deadline",
                    now - *deadline
                ));
            }
        }
        Ok(())
    }
}

/// The running-jobs file and the thread that rewrites it when jobs start or finish.
#[derive(Debug)]
struct RunningFile {
    /// Set when the running jobs changed since the last write.
    dirty: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the writer when `dirty` is set.
    wake: Arc<(Mutex<()>, std::sync::Condvar)>,
}

impl RunningFile {
    /// Starts the writer thread; it ends once the running jobs are dropped.
    fn start(file: std::fs::File, running: std::sync::Weak<Mutex<RunningJobs>>) -> Self {
        let this = Self {
            dirty: Arc::default(),
            wake: Arc::default(),
        };
        let (dirty, wake) = (this.dirty.clone(), this.wake.clone());
        std::thread::Builder::new()
            .name("running-jobs-file".into())
            .spawn(move || write_running_jobs(&file, &running, &dirty, &wake))
            .expect("spawning the running-jobs file writer");
        this
    }

    /// Marks the running jobs as changed; wakes the writer if it sleeps.
    fn changed(&self) {
        use std::sync::atomic::Ordering;
        if !self.dirty.swap(true, Ordering::AcqRel) {
            // Under the lock, so the writer is either before its check or waiting.
            let _guard = self
                .wake
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.wake.1.notify_one();
        }
    }
}

/// The writer thread: waits for a change, writes the running jobs' ids, then lets changes
/// gather for [`RUNNING_FILE_INTERVAL`].
fn write_running_jobs(
    file: &std::fs::File,
    running: &std::sync::Weak<Mutex<RunningJobs>>,
    dirty: &std::sync::atomic::AtomicBool,
    wake: &(Mutex<()>, std::sync::Condvar),
) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;
    loop {
        {
            let mut guard = wake
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while !dirty.load(Ordering::Acquire) {
                if running.strong_count() == 0 {
                    return;
                }
                guard = wake
                    .1
                    .wait_timeout(guard, Duration::from_secs(1))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
        // Cleared before the snapshot: a change after it is written next time.
        dirty.store(false, Ordering::Release);
        let Some(running) = running.upgrade() else {
            return;
        };
        let text = running_jobs_text(
            &running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        drop(running);
        if let Err(error) = file
            .set_len(0)
            .and_then(|()| file.write_all_at(text.as_bytes(), 0))
        {
            warn!(%error, "cannot record the running jobs");
        }
        std::thread::sleep(RUNNING_FILE_INTERVAL);
    }
}

/// `{"runningJobs":[…]}` with the ids in start order, at most [`RUNNING_FILE_LIMIT`] bytes.
fn running_jobs_text(running: &RunningJobs) -> String {
    let mut sequences: Vec<&u64> = running.keys().collect();
    sequences.sort_unstable();
    let mut ids: Vec<&str> = Vec::new();
    let mut size = 20;
    for sequence in sequences {
        let id = running[sequence].0.as_str();
        size += id.len() + 3;
        if size > RUNNING_FILE_LIMIT {
            break;
        }
        ids.push(id);
    }
    serde_json::json!({ "runningJobs": ids }).to_string()
}

impl Observer for Metrics {
    fn started(&self, id: &str, sequence: u64, deadline: Option<Instant>) {
        self.in_flight.inc();
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.insert(sequence, (id.to_owned(), deadline));
        drop(running);
        self.running_changed();
    }

    fn finished(&self, report: &JobReport) {
        let started = {
            let mut running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            running.remove(&report.sequence).is_some()
        };
        if started {
            self.running_changed();
            self.in_flight.dec();
            self.duration.observe(report.duration.as_secs_f64());
        }
        let outcome = match report.disposition {
            Disposition::Acked => "acked",
            Disposition::Retried { .. } => "retried",
            Disposition::DeadLettered { .. } => "dead_lettered",
            Disposition::GivenBack => "given_back",
            Disposition::Cancelled => "cancelled",
            Disposition::Continued => "continued",
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
}

/// Serves the health and metrics endpoints on `listener` until the process exits.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics });
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
    if let Err(reason) = state.metrics.liveness() {
        // Not alive is not ready either: no job should be routed to a stuck worker.
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"));
    }
    let connection = state
        .metrics
        .nats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map(async_nats::Client::connection_state);
    match connection {
        Some(async_nats::connection::State::Connected) => (StatusCode::OK, "ok\n".into()),
        Some(other) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("NATS connection is {other}\n"),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected yet\n".into(),
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
        metrics.started("a", 1, None);
        assert!(
            metrics.liveness().is_ok(),
            "all slots busy: not pulling is fine"
        );
        metrics.started(
            "hung",
            2,
            Some(Instant::now() - DEADLINE_GRACE - Duration::from_secs(1)),
        );
        let err = metrics.liveness().unwrap_err();
        assert!(
            err.contains("handler of job hung (sequence 2) is")
                && err.contains("past its deadline"),
            "{err}"
        );
    }

    #[test]
    fn metrics_count_outcomes() {
        let metrics = Metrics::new(4, Duration::from_secs(60));
        metrics.started("a", 7, None);
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

    #[test]
    fn the_running_jobs_file_names_the_jobs_running_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("termination-log");
        let metrics = Metrics::new(4, Duration::from_secs(60))
            .running_jobs_file(&path)
            .unwrap();
        let read = || std::fs::read_to_string(&path).unwrap();
        // Written by a thread of its own shortly after each change.
        let shows = |expected: &str| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while read() != expected {
                assert!(
                    Instant::now() < deadline,
                    "{:?} never became {expected:?}",
                    read()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        assert_eq!(read(), "");
        metrics.started("resize-1", 1, None);
        metrics.started("resize-2", 2, None);
        shows(r#"{"runningJobs":["resize-1","resize-2"]}"#);
        metrics.finished(&JobReport {
            id: "resize-1".into(),
            sequence: 1,
            attempt: 1,
            disposition: Disposition::Acked,
            duration: Duration::from_millis(3),
        });
        shows(r#"{"runningJobs":["resize-2"]}"#);
        let long = "x".repeat(1000);
        for sequence in 10..20 {
            metrics.started(&long, sequence, None);
        }
        // resize-2 and three of the long ids fit.
        let three = vec![long.as_str(); 3];
        let mut ids = vec!["resize-2"];
        ids.extend(three);
        shows(&serde_json::json!({ "runningJobs": ids }).to_string());
        assert!(read().len() <= RUNNING_FILE_LIMIT, "{}", read().len());
    }
}
