//! Prometheus metrics of the operator: its own (`conveyor_operator_`: reconciles, errors,
//! scalings, leadership), and per queue (`conveyor_queue_`) and per Worker (`conveyor_worker_`)
//! the figures its reconciles already read, so one scrape covers every queue. Labels are static
//! strings or the name of a Kubernetes object (`namespace`, `queue`, `worker`, a priority
//! `level` 0-9, a reason from a fixed set), never a job id or an error text, so their number is
//! bounded by the objects in the cluster, not by the jobs. The series of a deleted queue or
//! Worker go with it ([`prune`]). docs/operations.md lists every metric.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker, WorkerStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::figures::Health;

/// Labels of the per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `jobqueue` or `worker`.
    pub controller: &'static str,
}

/// Labels of the reconcile error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `jobqueue` or `worker`.
    pub controller: &'static str,
    /// Static error kind, e.g. `nats_unavailable`, `kube`.
    pub error: &'static str,
}

/// Labels of the scaling counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    /// `up` or `down`.
    pub direction: &'static str,
}

/// Labels of a queue's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct QueueLabels {
    /// The JobQueue's namespace.
    pub namespace: String,
    /// The JobQueue's name.
    pub queue: String,
}

/// Labels of a queue's per-priority metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabels {
    /// The JobQueue's namespace.
    pub namespace: String,
    /// The JobQueue's name.
    pub queue: String,
    /// Priority level, `0` (highest) to `9`.
    pub level: String,
}

/// Labels of a Worker's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The Worker's namespace.
    pub namespace: String,
    /// The Worker's name.
    pub worker: String,
    /// The JobQueue it consumes (one per Worker), so alerts can join queues and workers.
    pub queue: String,
}

/// Labels of a Worker's per-reason metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The Worker's namespace.
    pub namespace: String,
    /// The Worker's name.
    pub worker: String,
    /// The JobQueue it consumes.
    pub queue: String,
    /// One of [`CRASH_REASONS`] or [`TROUBLE_REASONS`].
    pub reason: &'static str,
}

/// Reasons of `conveyor_worker_crashes_total`: how a restarted container last ended
/// (`lastState.terminated.reason`), anything else as `Other`.
pub const CRASH_REASONS: [&str; 5] = ["OOMKilled", "Error", "Completed", "StartError", "Other"];

/// What a Worker's listed pods say: the pods (for their container restarts) and, for every
/// trouble the Worker's `Degraded` condition knows, how many pods have it (zeros included, so
/// each series exists from the start).
#[derive(Debug, Clone, Copy)]
pub struct PodsSeen<'a> {
    /// The Worker's pods.
    pub pods: &'a [Pod],
    /// Pods in trouble per reason, every reason listed.
    pub troubled: &'a [(&'static str, i64)],
}

/// How often the series of deleted queues and Workers are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

type SecondsGauge = Gauge<f64, AtomicU64>;

/// Per-queue metrics.
#[derive(Debug, Default)]
struct QueueFamilies {
    pending: Family<LevelLabels, Gauge>,
    in_flight: Family<LevelLabels, Gauge>,
    delayed: Family<QueueLabels, Gauge>,
    waiting: Family<QueueLabels, Gauge>,
    dead_letters: Family<QueueLabels, Gauge>,
    oldest_age: Family<QueueLabels, SecondsGauge>,
    submitted: Family<QueueLabels, Counter>,
    completed: Family<QueueLabels, Counter>,
    retried: Family<QueueLabels, Counter>,
    failed: Family<QueueLabels, Counter>,
    dead_lettered: Family<QueueLabels, Counter>,
}

/// Per-Worker metrics.
#[derive(Debug, Default)]
struct WorkerFamilies {
    desired: Family<WorkerLabels, Gauge>,
    ready: Family<WorkerLabels, Gauge>,
    busy: Family<WorkerLabels, Gauge>,
    free: Family<WorkerLabels, Gauge>,
    recycled: Family<WorkerLabels, Counter>,
    crashes: Family<ReasonLabels, Counter>,
    troubled: Family<ReasonLabels, Gauge>,
}

/// Container restarts last seen per container (`<pod uid>/<container>`), per Worker: the base
/// of the crash counter.
type Restarts = HashMap<String, u32>;

/// What the metrics remember of a Worker: its labels, its containers' restart counts, and the
/// trouble reasons it has series of (to drop them with it).
#[derive(Debug)]
struct KnownWorker {
    labels: WorkerLabels,
    restarts: Restarts,
    troubles: Vec<&'static str>,
}

/// Every metric of the operator and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabels, Histogram>,
    scalings: Family<ScaleLabels, Counter>,
    leader: Gauge,
    queues: QueueFamilies,
    workers: WorkerFamilies,
    /// The label sets in use, to remove them when their object goes.
    known_queues: Mutex<HashMap<QueueLabels, u8>>,
    known_workers: Mutex<HashMap<(String, String), KnownWorker>>,
    /// When this process started: restarts of a pod created before it are not counted as
    /// crashes on first sight (an earlier process counted them).
    started: Timestamp,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("conveyor_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            errors.clone(),
        );
        let durations = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            durations.clone(),
        );
        let scalings = Family::<ScaleLabels, Counter>::default();
        registry.register(
            "scalings",
            "Worker pool size changes made by the scaler",
            scalings.clone(),
        );
        for direction in ["up", "down"] {
            let _ = scalings.get_or_create(&ScaleLabels { direction });
        }
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let queues = QueueFamilies::default();
        let q = root.sub_registry_with_prefix("conveyor_queue");
        q.register(
            "pending_jobs",
            "Jobs waiting for a worker, per priority level",
            queues.pending.clone(),
        );
        q.register(
            "in_flight_jobs",
            "Jobs delivered to a worker and not finished (running, or waiting out a retry backoff), per priority level",
            queues.in_flight.clone(),
        );
        q.register(
            "delayed_jobs",
            "Jobs scheduled for later and not yet due",
            queues.delayed.clone(),
        );
        q.register(
            "waiting_jobs",
            "Jobs waiting for their dependencies or, as continuations, for their parent's children (not backlog)",
            queues.waiting.clone(),
        );
        q.register(
            "dead_letter_jobs",
            "Jobs kept in the dead-letter stream now",
            queues.dead_letters.clone(),
        );
        q.register(
            "oldest_pending_age_seconds",
            "Age of the oldest job waiting for a worker (0 when none waits)",
            queues.oldest_age.clone(),
        );
        q.register(
            "submitted_jobs",
            "Jobs stored in the work stream: submissions, delayed jobs that fell due, requeued dead letters (the stream's last sequence)",
            queues.submitted.clone(),
        );
        q.register(
            "completed_jobs",
            "Jobs that left the work stream other than by dead-lettering: acked, cancelled or expired",
            queues.completed.clone(),
        );
        q.register(
            "retried_jobs",
            "Redeliveries: attempts after a failed, timed-out, crashed or given-back one",
            queues.retried.clone(),
        );
        q.register(
            "failed_jobs",
            "Attempts that did not succeed: redeliveries plus dead letters",
            queues.failed.clone(),
        );
        q.register(
            "dead_lettered_jobs",
            "Jobs ever moved to the dead-letter stream (its last sequence; requeues and purges do not lower it)",
            queues.dead_lettered.clone(),
        );
        let workers = WorkerFamilies::default();
        let w = root.sub_registry_with_prefix("conveyor_worker");
        w.register(
            "desired_replicas",
            "Pods the Worker's pool is asked to have",
            workers.desired.clone(),
        );
        w.register(
            "ready_replicas",
            "Pods of the Worker ready to take jobs",
            workers.ready.clone(),
        );
        w.register(
            "busy_slots",
            "Jobs in flight in the Worker's queue",
            workers.busy.clone(),
        );
        w.register(
            "free_slots",
            "Job slots of ready pods not taken by in-flight jobs",
            workers.free.clone(),
        );
        w.register(
            "recycled_pods",
            "Pods replaced for being older than recycle.maxAge",
            workers.recycled.clone(),
        );
        w.register(
            "crashes",
            "Container restarts of the Worker's pods, by how the container last ended",
            workers.crashes.clone(),
        );
        w.register(
            "troubled_pods",
            "Pods of the Worker in trouble now, by the Degraded condition's reason",
            workers.troubled.clone(),
        );
        Self {
            registry: root,
            reconciles,
            errors,
            durations,
            scalings,
            leader,
            queues,
            workers,
            known_queues: Mutex::default(),
            known_workers: Mutex::default(),
            started: Timestamp::now(),
        }
    }
}

/// Sets a counter that mirrors a monotonic figure JetStream keeps: it only moves up, unless
/// `reset` (the stream was recreated), when it follows the figure down, which Prometheus reads
/// as a counter reset.
fn mirror(counter: &Counter, value: u64, reset: bool) {
    if reset {
        counter.inner().store(value, Ordering::Relaxed);
    } else {
        counter.inner().fetch_max(value, Ordering::Relaxed);
    }
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The bounded reason of a container restart from how it last ended.
pub fn crash_reason(terminated_reason: Option<&str>) -> &'static str {
    match terminated_reason {
        Some("OOMKilled") => "OOMKilled",
        Some("Error") => "Error",
        Some("Completed") => "Completed",
        Some("StartError" | "ContainerCannotRun") => "StartError",
        _ => "Other",
    }
}

impl Metrics {
    /// Counts one reconciliation of `controller` that took `elapsed`.
    pub fn reconciled(&self, controller: &'static str, elapsed: Duration) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one failed reconciliation.
    pub fn failed(&self, controller: &'static str, error: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }

    /// Counts one change of a worker pool's size.
    pub fn scaled(&self, up: bool) {
        let direction = if up { "up" } else { "down" };
        self.scalings
            .get_or_create(&ScaleLabels { direction })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records what one reconcile read of `queue` ([`Health`]). The counters mirror the
    /// streams' own monotonic figures, so they survive an operator restart unchanged:
    /// submitted = the work stream's last sequence; dead-lettered = the dead-letter stream's
    /// last sequence; completed = jobs that left the work stream (last sequence minus stored)
    /// minus dead-lettered; retried = the consumers' deliveries minus the jobs delivered at
    /// least once (submitted minus pending); failed = retried plus dead-lettered.
    pub fn observe_queue(&self, queue: &QueueRef, health: &Health) {
        let labels = QueueLabels {
            namespace: queue.namespace.clone(),
            queue: queue.name.clone(),
        };
        let q = &self.queues;
        let levels = u8::try_from(health.levels.len()).unwrap_or(u8::MAX);
        let known = self
            .known_queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(labels.clone(), levels);
        // Levels the queue no longer has.
        for gone in levels..known.unwrap_or(0) {
            let level = self.level(&labels, gone);
            q.pending.remove(&level);
            q.in_flight.remove(&level);
        }
        for (n, reading) in (0u8..).zip(&health.levels) {
            let Some(reading) = reading else { continue };
            let level = self.level(&labels, n);
            q.pending.get_or_create(&level).set(gauge(reading.pending));
            q.in_flight
                .get_or_create(&level)
                .set(gauge(reading.in_flight));
        }
        q.delayed.get_or_create(&labels).set(gauge(health.delayed));
        q.waiting.get_or_create(&labels).set(gauge(health.waiting));
        q.dead_letters
            .get_or_create(&labels)
            .set(gauge(health.dead_lettered));
        q.oldest_age
            .get_or_create(&labels)
            .set(health.oldest_age.unwrap_or_default().as_secs_f64());

        let submitted = health.counters.submitted;
        let reset = submitted < q.submitted.get_or_create(&labels).get();
        mirror(&q.submitted.get_or_create(&labels), submitted, reset);
        let dead_lettered = health.dead_letters_ever;
        let dl_reset = dead_lettered < q.dead_lettered.get_or_create(&labels).get();
        mirror(
            &q.dead_lettered.get_or_create(&labels),
            dead_lettered,
            dl_reset,
        );
        let left = submitted.saturating_sub(health.counters.stored);
        mirror(
            &q.completed.get_or_create(&labels),
            left.saturating_sub(dead_lettered),
            reset || dl_reset,
        );
        // Only with every level read: a missing one would count its jobs as never delivered.
        if health.levels.iter().all(Option::is_some) {
            let (deliveries, pending) = health
                .levels
                .iter()
                .flatten()
                .fold((0u64, 0u64), |(d, p), l| {
                    (d.saturating_add(l.deliveries), p.saturating_add(l.pending))
                });
            let retried = deliveries.saturating_sub(submitted.saturating_sub(pending));
            let retry_reset = retried < q.retried.get_or_create(&labels).get() && reset;
            mirror(&q.retried.get_or_create(&labels), retried, retry_reset);
            mirror(
                &q.failed.get_or_create(&labels),
                retried.saturating_add(dead_lettered),
                retry_reset || dl_reset,
            );
        }
    }

    fn level(&self, labels: &QueueLabels, level: u8) -> LevelLabels {
        LevelLabels {
            namespace: labels.namespace.clone(),
            queue: labels.queue.clone(),
            level: level.to_string(),
        }
    }

    /// Drops every series of the queue `labels`.
    fn forget_queue(&self, labels: &QueueLabels, levels: u8) {
        let q = &self.queues;
        for n in 0..levels {
            let level = self.level(labels, n);
            q.pending.remove(&level);
            q.in_flight.remove(&level);
        }
        for family in [&q.delayed, &q.waiting, &q.dead_letters] {
            family.remove(labels);
        }
        q.oldest_age.remove(labels);
        for family in [
            &q.submitted,
            &q.completed,
            &q.retried,
            &q.failed,
            &q.dead_lettered,
        ] {
            family.remove(labels);
        }
    }

    /// Records a Worker's figures from the status its reconcile computed, and, when its pods
    /// were listed, their troubles and container restarts.
    pub fn observe_worker(
        &self,
        namespace: &str,
        name: &str,
        queue: &str,
        status: &WorkerStatus,
        listed: Option<PodsSeen<'_>>,
    ) {
        let labels = WorkerLabels {
            namespace: namespace.to_owned(),
            worker: name.to_owned(),
            queue: queue.to_owned(),
        };
        let w = &self.workers;
        let mut known = self
            .known_workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = known.get(&key)
            && old.labels.queue != queue
        {
            // The Worker moved to another queue: its old series go.
            self.forget_worker(old);
            known.remove(&key);
        }
        let entry = known.entry(key).or_insert_with(|| KnownWorker {
            labels: labels.clone(),
            restarts: Restarts::new(),
            troubles: Vec::new(),
        });
        let desired = status.desired_replicas.unwrap_or(0);
        w.desired.get_or_create(&labels).set(i64::from(desired));
        w.ready
            .get_or_create(&labels)
            .set(i64::from(status.ready_replicas));
        let busy = status.busy.unwrap_or(0);
        w.busy.get_or_create(&labels).set(gauge(busy));
        let slots = status.slots.unwrap_or(0).max(0);
        w.free
            .get_or_create(&labels)
            .set(slots.saturating_sub(gauge(busy)).max(0));
        w.recycled.get_or_create(&labels).inner().store(
            u64::try_from(status.recycled_pods).unwrap_or(0),
            Ordering::Relaxed,
        );
        let Some(listed) = listed else { return };
        let reason = |reason| ReasonLabels {
            namespace: labels.namespace.clone(),
            worker: labels.worker.clone(),
            queue: labels.queue.clone(),
            reason,
        };
        // Every reason from the start, so `increase()` sees a Worker's first crash.
        for r in CRASH_REASONS {
            let _ = w.crashes.get_or_create(&reason(r));
        }
        let mut seen = Restarts::new();
        for pod in listed.pods {
            let uid = pod.uid().unwrap_or_default();
            // A pod created before this process started had its earlier restarts counted by
            // an earlier one: on first sight they are the base, not crashes.
            let older = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .is_none_or(|t| t.0 < self.started);
            let containers = pod.status.iter().flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            });
            for container in containers {
                let key = format!("{uid}/{}", container.name);
                let count = u32::try_from(container.restart_count).unwrap_or(0);
                let before = match entry.restarts.get(&key) {
                    Some(before) => *before,
                    None if older => count,
                    None => 0,
                };
                let new = count.saturating_sub(before);
                if new > 0 {
                    let last = container
                        .last_state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .and_then(|t| t.reason.as_deref());
                    w.crashes
                        .get_or_create(&reason(crash_reason(last)))
                        .inc_by(u64::from(new));
                }
                seen.insert(key, count);
            }
        }
        entry.restarts = seen;
        for &(r, pods) in listed.troubled {
            w.troubled.get_or_create(&reason(r)).set(pods);
            if !entry.troubles.contains(&r) {
                entry.troubles.push(r);
            }
        }
    }

    /// Drops every series of the Worker `known`.
    fn forget_worker(&self, known: &KnownWorker) {
        let labels = &known.labels;
        let w = &self.workers;
        for family in [&w.desired, &w.ready, &w.busy, &w.free] {
            family.remove(labels);
        }
        w.recycled.remove(labels);
        let reason = |reason| ReasonLabels {
            namespace: labels.namespace.clone(),
            worker: labels.worker.clone(),
            queue: labels.queue.clone(),
            reason,
        };
        for r in CRASH_REASONS {
            w.crashes.remove(&reason(r));
        }
        for &r in &known.troubles {
            w.troubled.remove(&reason(r));
        }
    }

    /// Keeps the series of the queues and Workers for which `queue_exists` and
    /// `worker_exists` say yes, drops the others.
    pub fn retain(
        &self,
        queue_exists: impl Fn(&str, &str) -> bool,
        worker_exists: impl Fn(&str, &str) -> bool,
    ) {
        let mut queues = self
            .known_queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queues.retain(|labels, levels| {
            let keep = queue_exists(&labels.namespace, &labels.queue);
            if !keep {
                self.forget_queue(labels, *levels);
            }
            keep
        });
        drop(queues);
        let mut workers = self
            .known_workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        workers.retain(|(ns, name), known| {
            let keep = worker_exists(ns, name);
            if !keep {
                self.forget_worker(known);
            }
            keep
        });
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Every few seconds, drops the series of queues and Workers gone from the controllers'
/// caches (a Worker has no finalizer, so no reconcile sees it go); when `stop` is cancelled
/// (shutdown, or the leader lease lost), drops all of them, as this replica no longer reads
/// those figures.
pub async fn prune(
    metrics: std::sync::Arc<Metrics>,
    queues: Store<JobQueue>,
    workers: Store<Worker>,
    stop: CancellationToken,
) {
    fn names<K>(store: &Store<K>) -> BTreeSet<(String, String)>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        store
            .state()
            .iter()
            .map(|o| (o.namespace().unwrap_or_default(), o.name_any()))
            .collect()
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        let (queues, workers) = (names(&queues), names(&workers));
        metrics.retain(
            |ns, name| queues.contains(&(ns.to_owned(), name.to_owned())),
            |ns, name| workers.contains(&(ns.to_owned(), name.to_owned())),
        );
    }
    metrics.retain(|_, _| false, |_, _| false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figures::Level;

    #[test]
    fn renders_prefixed_metrics_with_static_labels() {
        let metrics = Metrics::default();
        metrics.reconciled("jobqueue", Duration::from_millis(3));
        metrics.failed("jobqueue", "nats_unavailable");
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(
            text.contains(r#"conveyor_operator_reconciles_total{controller="jobqueue"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"conveyor_operator_reconcile_errors_total{controller="jobqueue",error="nats_unavailable"} 1"#),
            "{text}"
        );
        assert!(text.contains("conveyor_operator_leader 1"), "{text}");
    }

    fn queue_health(submitted: u64, stored: u64, pending: u64, deliveries: u64) -> Health {
        let mut health = Health {
            levels: vec![
                Some(Level {
                    pending,
                    in_flight: stored - pending,
                    deliveries,
                }),
                Some(Level::default()),
            ],
            dead_letters_ever: 3,
            dead_lettered: 2,
            waiting: 4,
            oldest_age: Some(Duration::from_millis(1500)),
            ..Default::default()
        };
        health.counters.submitted = submitted;
        health.counters.stored = stored;
        health
    }

    #[test]
    fn queue_counters_mirror_the_streams_and_go_with_the_queue() {
        let metrics = Metrics::default();
        let queue = QueueRef::new("team", "thumbs");
        // 20 stored ever, 7 still there (5 pending), 3 dead-lettered; 18 deliveries of the 15
        // jobs delivered at least once: 3 redeliveries.
        metrics.observe_queue(&queue, &queue_health(20, 7, 5, 18));
        let text = metrics.render();
        for line in [
            r#"conveyor_queue_pending_jobs{namespace="team",queue="thumbs",level="0"} 5"#,
            r#"conveyor_queue_pending_jobs{namespace="team",queue="thumbs",level="1"} 0"#,
            r#"conveyor_queue_in_flight_jobs{namespace="team",queue="thumbs",level="0"} 2"#,
            r#"conveyor_queue_dead_letter_jobs{namespace="team",queue="thumbs"} 2"#,
            r#"conveyor_queue_waiting_jobs{namespace="team",queue="thumbs"} 4"#,
            r#"conveyor_queue_oldest_pending_age_seconds{namespace="team",queue="thumbs"} 1.5"#,
            r#"conveyor_queue_submitted_jobs_total{namespace="team",queue="thumbs"} 20"#,
            r#"conveyor_queue_completed_jobs_total{namespace="team",queue="thumbs"} 10"#,
            r#"conveyor_queue_retried_jobs_total{namespace="team",queue="thumbs"} 3"#,
            r#"conveyor_queue_failed_jobs_total{namespace="team",queue="thumbs"} 6"#,
            r#"conveyor_queue_dead_lettered_jobs_total{namespace="team",queue="thumbs"} 3"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // A reading that dips (the dead letter counted before its job left) keeps the counter.
        metrics.observe_queue(&queue, &queue_health(20, 8, 5, 18));
        assert!(metrics.render().contains(
            r#"conveyor_queue_completed_jobs_total{namespace="team",queue="thumbs"} 10"#
        ));
        // The stream was recreated: the counters follow it down (a reset to Prometheus).
        metrics.observe_queue(&queue, &queue_health(4, 1, 1, 3));
        assert!(
            metrics.render().contains(
                r#"conveyor_queue_submitted_jobs_total{namespace="team",queue="thumbs"} 4"#
            )
        );
        // One level fewer: its series go.
        let mut one = queue_health(4, 1, 1, 3);
        one.levels.pop();
        metrics.observe_queue(&queue, &one);
        assert!(!metrics.render().contains(r#"level="1""#));
        metrics.retain(|_, _| true, |_, _| true);
        assert!(metrics.render().contains("thumbs"));
        metrics.retain(|_, name| name != "thumbs", |_, _| true);
        assert!(!metrics.render().contains("thumbs"), "{}", metrics.render());
    }

    fn pod(uid: &str, created: Timestamp, restarts: i32, last: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": uid, "uid": uid, "creationTimestamp": created.to_string()},
            "status": {"containerStatuses": [{
                "name": "worker", "image": "w", "imageID": "", "ready": false,
                "restartCount": restarts,
                "lastState": {"terminated": {"exitCode": 137, "reason": last}},
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn counts_new_container_restarts_by_reason_and_troubled_pods() {
        let metrics = Metrics::default();
        let status = WorkerStatus {
            ready_replicas: 1,
            desired_replicas: Some(3),
            busy: Some(5),
            slots: Some(4),
            recycled_pods: 2,
            ..Default::default()
        };
        let now = Timestamp::now();
        let before = metrics.started - k8s_openapi::jiff::SignedDuration::from_secs(60);
        let after = metrics.started + k8s_openapi::jiff::SignedDuration::from_secs(1);
        // What the Worker controller hands over: the pods and their troubles.
        let observe = |pods: &[Pod]| {
            let troubled = crate::worker::pods::troubled(pods, now);
            let seen = PodsSeen {
                pods,
                troubled: &troubled,
            };
            metrics.observe_worker("team", "thumbs", "q", &status, Some(seen));
            metrics.render()
        };
        let labels = r#"namespace="team",worker="thumbs",queue="q""#;
        // An old pod's restarts were counted by an earlier operator; a new pod's are crashes.
        let text = observe(&[
            pod("old", before, 5, "Error"),
            pod("new", after, 2, "OOMKilled"),
        ]);
        assert!(
            text.contains(&format!(
                r#"conveyor_worker_crashes_total{{{labels},reason="OOMKilled"}} 2"#
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                r#"conveyor_worker_crashes_total{{{labels},reason="Error"}} 0"#
            )),
            "{text}"
        );
        let text = observe(&[
            pod("old", before, 6, "Error"),
            pod("new", after, 3, "SIGSEGV"),
        ]);
        for line in [
            format!(r#"conveyor_worker_crashes_total{{{labels},reason="Error"}} 1"#),
            format!(r#"conveyor_worker_crashes_total{{{labels},reason="Other"}} 1"#),
            format!(r#"conveyor_worker_troubled_pods{{{labels},reason="CrashLoopBackOff"}} 2"#),
            format!(r#"conveyor_worker_desired_replicas{{{labels}}} 3"#),
            format!(r#"conveyor_worker_busy_slots{{{labels}}} 5"#),
            format!(r#"conveyor_worker_free_slots{{{labels}}} 0"#),
            format!(r#"conveyor_worker_recycled_pods_total{{{labels}}} 2"#),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        metrics.retain(|_, _| true, |_, _| false);
        assert!(!metrics.render().contains("thumbs"), "{}", metrics.render());
    }

    #[test]
    fn crash_reasons_are_a_fixed_set() {
        for (given, want) in [
            (Some("OOMKilled"), "OOMKilled"),
            (Some("ContainerCannotRun"), "StartError"),
            (Some("anything a runtime invents"), "Other"),
            (None, "Other"),
        ] {
            assert_eq!(crash_reason(given), want);
            assert!(CRASH_REASONS.contains(&want));
        }
    }
}
