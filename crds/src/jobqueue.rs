//! `JobQueue`: a durable queue backed by a JetStream work stream, one durable pull consumer per
//! priority level, and a dead-letter stream. The operator keeps the JetStream assets in line with
//! the spec and reports their state in the status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::bounds;
use crate::duration::{self, DurationError};

/// A durable job queue on NATS JetStream.
// Each `printcolumn(...)` repeats `type_ = ...`, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "conveyor.dev",
    version = "v1alpha1",
    kind = "JobQueue",
    plural = "jobqueues",
    singular = "jobqueue",
    namespaced,
    doc = "A durable job queue backed by a NATS JetStream stream.",
    status = "JobQueueStatus",
    derive = "PartialEq",
    shortname = "jq",
    category = "conveyor",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#,
        description = "Whether the JetStream assets exist and match the spec"
    ),
    printcolumn(
        name = "Backlogged",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Backlogged")].status"#,
        description = "Whether the backlog is over the spec.alerts thresholds"
    ),
    printcolumn(
        name = "Failing",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="JobsFailing")].status"#,
        description = "Whether jobs were dead-lettered within spec.alerts.failureWindow"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pending",
        description = "Jobs waiting for a worker"
    ),
    printcolumn(
        name = "In-Flight",
        type_ = "integer",
        json_path = ".status.inFlight",
        description = "Jobs handed to a worker and not yet acknowledged"
    ),
    printcolumn(
        name = "Dead",
        type_ = "integer",
        json_path = ".status.deadLettered",
        description = "Jobs in the dead-letter stream"
    ),
    printcolumn(
        name = "Delayed",
        type_ = "integer",
        priority = 1,
        json_path = ".status.delayed",
        description = "Jobs scheduled for later, not yet due"
    ),
    printcolumn(
        name = "Waiting",
        type_ = "integer",
        priority = 1,
        json_path = ".status.waiting",
        description = "Jobs waiting for their dependencies or children"
    ),
    printcolumn(
        name = "Done/s",
        type_ = "string",
        priority = 1,
        json_path = ".status.finishedPerSecond",
        description = "Jobs finished (completed or dead-lettered) per second"
    ),
    printcolumn(
        name = "Oldest",
        type_ = "string",
        priority = 1,
        json_path = ".status.oldestPendingAge",
        description = "Age of the oldest job waiting for a worker"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
        description = "Why the queue is or is not ready"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct JobQueueSpec {
    /// NATS connection override for this queue. When absent, the operator's default
    /// (`--nats-url`, set by the Helm chart) is used for the queue and its workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsConnection>,

    /// Limits and placement of the JetStream stream that stores the jobs.
    #[serde(default)]
    pub stream: StreamSpec,

    /// Number of priority levels, 1 to 10. Level 0 is the lowest; a free worker takes a job
    /// of the highest non-empty level first. Each level has its own subject and consumer.
    #[serde(default = "default_priorities")]
    #[schemars(range(min = 1, max = bounds::MAX_PRIORITIES))]
    pub priorities: u8,

    /// What happens to a job whose handler fails.
    #[serde(default)]
    pub retry: RetrySpec,

    /// How long a worker may hold a job without a sign of life (ack, nak or in-progress
    /// heartbeat) before JetStream hands it to another worker: 1s to 24h. Format: `30s`, `5m`,
    /// `1h30m`.
    #[serde(default = "default_timeout")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::TIMEOUT.rule("timeout"))]
    pub timeout: String,

    /// Most jobs running at once across every worker of this queue, e.g. to protect a
    /// downstream service; unlimited when absent. JetStream enforces it: each priority level's
    /// consumer hands out at most this many jobs not yet acknowledged (`max_ack_pending`), so
    /// with one level the cap is exact. With several levels each level's consumer alone would
    /// allow the whole cap; the Worker's pods keep the total within it: each runs at most
    /// min(`concurrency`, `concurrencyLimit`) jobs, and the scaler keeps autoscaled pools within
    /// `concurrencyLimit / concurrency` pods (at least one). A pool with fixed `replicas`
    /// above that, or workers the operator does not run, may exceed it by level. 1 to 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_CONCURRENCY_LIMIT))]
    pub concurrency_limit: Option<i32>,

    /// Most jobs started per second across every worker of this queue (e.g. an API's quota);
    /// unlimited when absent. The operator issues tokens at this rate into a per-queue stream
    /// and each worker takes one per job it starts, so the limit holds however many pods run;
    /// up to one second's worth of tokens saved while the queue was idle may be used at once.
    /// 1 to 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_RATE_LIMIT))]
    pub rate_limit: Option<i32>,

    /// How long a job id is remembered after a submission: a second submission with the same
    /// id within this window is a duplicate and is not queued again (`conveyor submit` says
    /// "already submitted"), e.g. `24h` for jobs unique for a day. 1s to 3650d; at most
    /// `stream.maxAge` when that is set (JetStream refuses a longer window). JetStream keeps
    /// every id of the window in memory. Default `2m`. Format: `90s`, `24h`, `7d`.
    #[serde(default = "default_deduplication_window")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::DEDUPLICATION_WINDOW.rule("deduplicationWindow"))]
    pub deduplication_window: String,

    /// Longest time a job may wait for its dependencies (or a continuation for its children)
    /// before it is dead-lettered with reason `dependency_timeout`. A job's
    /// `Conveyor-Wait-Timeout` header may shorten it. 1s to 30d; default `7d`. Format: `90s`,
    /// `24h`, `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::WAIT_TIMEOUT.rule("waitTimeout"))]
    pub wait_timeout: Option<String>,

    /// Keeping finished jobs' outcomes, so a producer can fetch one later (`conveyor result`,
    /// `Client::result`) instead of having to wait for it. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<ResultsSpec>,

    /// Thresholds that flip the `Backlogged` and `JobsFailing` conditions and raise Events.
    #[serde(default)]
    pub alerts: AlertsSpec,

    /// What happens to the JetStream streams when this resource is deleted: `Delete` removes
    /// the work and dead-letter streams with every job in them, `Retain` keeps them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Stored outcomes of finished jobs.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultsSpec {
    /// How long each finished job's outcome (result, dead-lettered or cancelled) is kept,
    /// one per job id (a later outcome of the same id replaces it): 1s to 3650d. Format:
    /// `30s`, `1h`, `7d`.
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::RESULT_RETENTION.rule("results.retention"))]
    pub retention: String,
}

/// Where the queue's NATS server is, when it is not the operator's default.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NatsConnection {
    /// NATS server URL(s), comma-separated, e.g. `nats://nats.messaging:4222`. Used by the
    /// operator and injected into the queue's worker pods. At most 4096 characters.
    /// Credentials do not go into the URL (it is shown in status and injected into worker
    /// pods): a URL with `user:password@` or `token@` is refused; name a
    /// `credentialsSecret` instead. `tls://` URLs require TLS.
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("nats.url must not be empty"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|,) *([^,]*://)?[^,/@]*@')").message("nats.url must not carry credentials (user:password@ or token@): name a credentialsSecret instead"))]
    pub url: String,

    /// Name of a Secret in the queue's namespace with the credentials the operator and the
    /// queue's workers connect with, by key: `user` and `password`; or `token`; or `nkey` (an
    /// nkey seed, `SU…`); or `creds` (a `.creds` file: user JWT and nkey seed). The first of
    /// `creds`, `nkey`, `token`, `user` found is used. Worker pods mount it as a volume; the
    /// operator reads it through the API. Updating the Secret rotates the credentials: the
    /// operator reconnects at its next resync; running worker pods keep their connection and
    /// use the new credentials once restarted (`kubectl rollout restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,

    /// Name of a Secret in the queue's namespace with TLS material, by key: `ca.crt` (CA
    /// bundle the server's certificate is verified against; the system roots when absent),
    /// `tls.crt` and `tls.key` (client certificate and key, for servers that verify clients;
    /// a `kubernetes.io/tls` Secret fits). Naming it makes TLS required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret: Option<String>,
}

/// Limits of the work stream. When a limit is reached, new submissions are rejected with an
/// error (back-pressure); stored jobs are never dropped to make room.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    /// Number of copies JetStream keeps of each job (1 for a single server, 3 for a
    /// fault-tolerant cluster), 1 to 5. Cannot exceed the number of NATS servers.
    #[serde(default = "default_stream_replicas")]
    #[schemars(range(min = 1, max = bounds::MAX_STREAM_REPLICAS))]
    pub replicas: u8,

    /// Where JetStream stores jobs: `file` (survives a NATS restart) or `memory` (faster, lost
    /// on restart).
    #[serde(default)]
    pub storage: StorageType,

    /// Maximum number of jobs the stream holds, 1 to 10^12; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_JOBS))]
    pub max_jobs: Option<i64>,

    /// Maximum total size in bytes of the jobs the stream holds, 1 to 2^50 (1 PiB); unlimited
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_BYTES))]
    pub max_bytes: Option<i64>,

    /// Maximum size in bytes of one job (payload plus headers); larger submissions are
    /// rejected. 1 to 67108864 (64 MiB, the most a NATS server's `max_payload` can be); the
    /// server's own `max_payload` applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_JOB_SIZE))]
    pub max_job_size: Option<i32>,

    /// How long a job may wait in the stream before JetStream discards it, 2m to 3650d (at
    /// least the stream's 2-minute deduplication window); forever when absent. Format: `30m`,
    /// `24h`, `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::STREAM_MAX_AGE.rule("stream.maxAge"))]
    pub max_age: Option<String>,
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            replicas: default_stream_replicas(),
            storage: StorageType::default(),
            max_jobs: None,
            max_bytes: None,
            max_job_size: None,
            max_age: None,
        }
    }
}

/// JetStream storage backend.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// Jobs are written to disk and survive a NATS restart.
    #[default]
    File,
    /// Jobs are kept in memory only.
    Memory,
}

/// Retry settings of the queue.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// How many times a job is delivered at most (first attempt included) before it is
    /// given up and goes to the dead-letter queue, 1 to 1000.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = bounds::MAX_ATTEMPTS))]
    pub max_attempts: i32,

    /// Delay before a failed job is retried: `initial` after the first failure, multiplied by
    /// `multiplier` after each further one, at most `max`, spread by `jitter`. The job goes to
    /// the back of the queue meanwhile, so a failing job does not hold up good ones.
    #[serde(default)]
    pub backoff: BackoffSpec,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: BackoffSpec::default(),
        }
    }
}

/// Exponential backoff between attempts, applied by the worker runtime.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackoffSpec {
    /// Delay after the first failed attempt, 1ms to 24h. Format: `500ms`, `1s`, `1m`.
    #[serde(default = "default_backoff_initial")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::BACKOFF.rule("retry.backoff.initial"))]
    pub initial: String,

    /// Longest delay between two attempts, 1ms to 24h. Format: `30s`, `5m`.
    #[serde(default = "default_backoff_max")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::BACKOFF.rule("retry.backoff.max"))]
    pub max: String,

    /// Factor the delay grows by per failed attempt (1 = constant delay).
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub multiplier: f64,

    /// Random spread of each delay, as a fraction of it (0 = none, 0.2 = plus or minus 20 %),
    /// so jobs that failed together are not retried together.
    #[serde(default = "default_backoff_jitter")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
            jitter: default_backoff_jitter(),
        }
    }
}

/// When the queue counts as unhealthy. `Backlogged` turns `True` when a backlog threshold is
/// exceeded; `JobsFailing` turns `True` when more than `maxFailures` jobs were dead-lettered
/// within `failureWindow`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AlertsSpec {
    /// Most jobs that may wait for a worker before the queue is `Backlogged`, 0 to 10^12; no
    /// limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = bounds::MAX_JOBS))]
    pub max_pending: Option<i64>,

    /// Longest a job may wait for a worker (`status.oldestPendingAge`) before the queue is
    /// `Backlogged`, 1s to 3650d; no limit when absent. Format: `30s`, `5m`, `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::MAX_OLDEST_PENDING_AGE.rule("alerts.maxOldestPendingAge"))]
    pub max_oldest_pending_age: Option<String>,

    /// Most dead-lettered jobs within `failureWindow` that still count as healthy, 0 to 10^9;
    /// 0 (the default) makes any dead letter flip `JobsFailing`.
    #[serde(default)]
    #[schemars(range(min = 0, max = bounds::MAX_FAILURES))]
    pub max_failures: i64,

    /// How far back dead letters count for `JobsFailing`, 1s to 30d. Format: `5m`, `1h`.
    #[serde(default = "default_failure_window")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::FAILURE_WINDOW.rule("alerts.failureWindow"))]
    pub failure_window: String,
}

impl Default for AlertsSpec {
    fn default() -> Self {
        Self {
            max_pending: None,
            max_oldest_pending_age: None,
            max_failures: 0,
            failure_window: default_failure_window(),
        }
    }
}

/// What to do with the JetStream assets when the `JobQueue` is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Delete the work and dead-letter streams (and every job in them).
    #[default]
    Delete,
    /// Keep the streams; a new `JobQueue` with the same namespace and name adopts them.
    Retain,
}

/// Observed state of a `JobQueue`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct JobQueueStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current state of the queue. `Ready` is `True` when the streams and consumers exist and
    /// match the spec; otherwise its reason (`NatsUnavailable`, `InvalidSpec`,
    /// `StreamError`) and message say what is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Jobs waiting for a worker, over every priority level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,

    /// Jobs delivered to a worker and not yet acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,

    /// Jobs waiting for their dependencies or, as continuations, for their parent's children
    /// (not pending, not in flight, not counted as backlog for scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u64>,

    /// Jobs scheduled for later (`run at` / `delay`) and not yet due; a job that fell due
    /// counts as pending instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed: Option<u64>,

    /// Jobs submitted per second between the operator's last two readings, e.g. `1004` or
    /// `0.4` (delayed jobs count when they fall due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_per_second: Option<String>,

    /// Jobs finished (completed or dead-lettered) per second between the operator's last two
    /// readings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_per_second: Option<String>,

    /// Jobs in the dead-letter stream (failed for good, waiting to be inspected, requeued or
    /// purged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<u64>,

    /// Jobs that exhausted their attempts without a handler report and are not in the
    /// dead-letter stream yet. They stay in the work stream (nothing is lost) until the
    /// dispatcher writes their dead letter; a count that stays above 0 means it cannot (the
    /// `JobsFailing` condition names them with reason `DeadLetterFailed`, and the
    /// `DeadLetterFailed` Events say why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_dead_letter: Option<u64>,

    /// Age of the oldest job waiting for a worker (one of those `pending` counts), e.g.
    /// `1m30s`; absent when none waits. Jobs running or waiting out a retry backoff are
    /// `inFlight` and do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<String>,

    /// The newest dead letters (at most 10), newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_failures: Vec<RecentFailure>,

    /// When the figures above were read from JetStream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,

    /// The JetStream assets behind the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamStatus>,

    /// The NATS server URL(s) the queue lives on: `spec.nats.url`, or the operator's default.
    /// `kubectl conveyor` reads it to find the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,

    /// The last dead-letter operation requested with the `conveyor.dev/dlq-requeue` or
    /// `conveyor.dev/dlq-purge` annotation, and what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dead_letter_request: Option<DeadLetterRequest>,
}

/// A dead-letter operation requested with an annotation, once carried out (or refused).
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRequest {
    /// The annotation, `conveyor.dev/dlq-requeue` or `conveyor.dev/dlq-purge`.
    pub annotation: String,
    /// The annotation's value: `all`, `id=<job id>` or `error=<text>`.
    pub value: String,
    /// `Done` when it was carried out; `Invalid` when the value could not be read and
    /// `NotFound` when no dead letter has the job id asked for (nothing was changed).
    pub outcome: String,
    /// Dead letters requeued or purged.
    #[serde(default)]
    pub jobs: u64,
    /// What was done, naming a few of the jobs, or why the value was refused.
    #[serde(default)]
    pub message: String,
    /// When the request was handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// One dead-lettered job, from the headers of its dead letter.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RecentFailure {
    /// The job's id.
    pub job_id: String,
    /// Attempts made, including the last, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Why it was dead-lettered: `permanent`, `exhausted`, `malformed` or `max_deliveries`.
    #[serde(default)]
    pub reason: String,
    /// The start of the last error (at most 200 characters).
    #[serde(default)]
    pub error: String,
    /// Pod that ran the last attempt.
    #[serde(default)]
    pub pod: String,
    /// When it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// Names of the JetStream assets of a queue, for `nats` CLI users.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// Name of the work stream.
    pub name: String,
    /// Name of the dead-letter stream.
    pub dead_letter: String,
    /// Subjects jobs are published to, one per priority level (index = level).
    #[serde(default)]
    pub subjects: Vec<String>,
}

fn default_priorities() -> u8 {
    1
}
fn default_timeout() -> String {
    "30s".into()
}

fn default_deduplication_window() -> String {
    "2m".into()
}
fn default_failure_window() -> String {
    "5m".into()
}
fn default_stream_replicas() -> u8 {
    1
}
fn default_max_attempts() -> i32 {
    5
}
fn default_backoff_initial() -> String {
    "1s".into()
}
fn default_backoff_max() -> String {
    "5m".into()
}
fn default_backoff_multiplier() -> f64 {
    2.0
}
fn default_backoff_jitter() -> f64 {
    0.2
}

impl JobQueueSpec {
    /// The ack wait (`timeout`) as a duration.
    pub fn timeout(&self) -> Result<Duration, DurationError> {
        duration::parse("spec.timeout", &self.timeout, bounds::TIMEOUT)
    }

    /// The retry backoff's first and longest delay.
    pub fn backoff_bounds(&self) -> Result<(Duration, Duration), DurationError> {
        let backoff = &self.retry.backoff;
        Ok((
            duration::parse(
                "spec.retry.backoff.initial",
                &backoff.initial,
                bounds::BACKOFF,
            )?,
            duration::parse("spec.retry.backoff.max", &backoff.max, bounds::BACKOFF)?,
        ))
    }

    /// The `alerts.failureWindow` and `alerts.maxOldestPendingAge` as durations.
    pub fn alert_durations(&self) -> Result<(Duration, Option<Duration>), DurationError> {
        let window = duration::parse(
            "spec.alerts.failureWindow",
            &self.alerts.failure_window,
            bounds::FAILURE_WINDOW,
        )?;
        let age = self
            .alerts
            .max_oldest_pending_age
            .as_deref()
            .map(|v| {
                duration::parse(
                    "spec.alerts.maxOldestPendingAge",
                    v,
                    bounds::MAX_OLDEST_PENDING_AGE,
                )
            })
            .transpose()?;
        Ok((window, age))
    }

    /// `results.retention`, when results are kept.
    pub fn result_retention(&self) -> Result<Option<Duration>, DurationError> {
        self.results
            .as_ref()
            .map(|r| {
                duration::parse(
                    "spec.results.retention",
                    &r.retention,
                    bounds::RESULT_RETENTION,
                )
            })
            .transpose()
    }

    /// `waitTimeout` as a duration, when set.
    pub fn wait_timeout(&self) -> Result<Option<Duration>, DurationError> {
        self.wait_timeout
            .as_deref()
            .map(|v| duration::parse("spec.waitTimeout", v, bounds::WAIT_TIMEOUT))
            .transpose()
    }

    /// The `deduplicationWindow` as a duration.
    pub fn deduplication_window(&self) -> Result<Duration, DurationError> {
        duration::parse(
            "spec.deduplicationWindow",
            &self.deduplication_window,
            bounds::DEDUPLICATION_WINDOW,
        )
    }

    /// The stream's maximum job age, if any.
    pub fn max_age(&self) -> Result<Option<Duration>, DurationError> {
        self.stream
            .max_age
            .as_deref()
            .map(|v| duration::parse("spec.stream.maxAge", v, bounds::STREAM_MAX_AGE))
            .transpose()
    }
}
