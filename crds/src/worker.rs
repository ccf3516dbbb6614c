//! `Worker`: a pool of pods that run the user's handler for one `JobQueue`. The operator renders
//! it as an owned Deployment with the Conveyor worker runtime injected, and sizes it from the
//! queue's backlog when `scaling` is set.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::bounds;
use crate::duration::{self, DurationError};

/// A pool of worker pods for one queue.
// Each `printcolumn(...)` repeats `type_ = ...`, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "conveyor.dev",
    version = "v1alpha1",
    kind = "Worker",
    plural = "workers",
    singular = "worker",
    namespaced,
    doc = "A pool of worker pods that run a handler for one JobQueue.",
    status = "WorkerStatus",
    derive = "PartialEq",
    shortname = "cw",
    category = "conveyor",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Queue",
        type_ = "string",
        json_path = ".spec.queue",
        description = "The JobQueue the workers consume"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Replicas the operator asks for"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Pods ready to take jobs"
    ),
    printcolumn(
        name = "Busy",
        type_ = "integer",
        json_path = ".status.busy",
        description = "Jobs the queue's workers hold now (running, or waiting out a retry backoff)"
    ),
    printcolumn(
        name = "Slots",
        type_ = "integer",
        json_path = ".status.slots",
        description = "Jobs the ready pods can run at once (ready pods x concurrency)"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Available")].status"#,
        description = "Whether pods are ready to run the queue's jobs (False while jobs wait and no pod is ready)"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.lastScaleReason",
        description = "Why the pool has its current size"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.template.spec) && size(self.template.spec.containers) > 0")
    .message("template.spec.containers must contain the container that runs the handler"))]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Name of the `JobQueue` (in the same namespace) whose jobs these workers run (an object
    /// name: at most 253 characters).
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("queue must name a JobQueue"))]
    pub queue: String,

    /// Number of pods when `scaling` is absent (default 1); `kubectl scale` sets it. Ignored
    /// when `scaling` is set: the operator then sizes the pool from the backlog. 0 to 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = bounds::MAX_PODS))]
    pub replicas: Option<i32>,

    /// Jobs one pod runs at the same time, 1 to 1000. A pod never holds more jobs than this.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = bounds::MAX_CONCURRENCY))]
    pub concurrency: i32,

    /// How the worker runtime hands a job to the user's code.
    pub handler: HandlerSpec,

    /// Pod template of the workers: the user's image, resources, env and so on. The first
    /// container runs the handler; the operator injects the worker runtime into it. The
    /// schema keeps the structure of a PodTemplateSpec without its descriptions (see
    /// `kubectl explain pod.spec`), so the CRD stays small enough for `kubectl apply`.
    #[schemars(transform = crate::schema::without_nested_descriptions)]
    pub template: PodTemplateSpec,

    /// Backlog-driven autoscaling. When absent, the pool has `replicas` pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingSpec>,

    /// Replaces worker pods before they rot (leaks, fragmentation). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle: Option<RecycleSpec>,
}

/// When and how fast worker pods are replaced.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecycleSpec {
    /// Pods older than this (plus up to 10 % jitter, so pods born together are not replaced
    /// together) are replaced: a new pod is started first and the old one is deleted gracefully
    /// (its runtime drains) once the new one is Ready; 1s to 365d. Format: `30m`, `12h`, `7d`.
    /// Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::RECYCLE_MAX_AGE.rule("recycle.maxAge"))]
    pub max_age: Option<String>,

    /// After taking this many jobs (and finishing them) the runtime starts over as a fresh
    /// process in place of itself (`CONVEYOR_MAX_JOBS`): same container, no restart, no
    /// back-off; a jsonl handler process is restarted with it. 1 to 10^9. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_RECYCLE_JOBS))]
    pub max_jobs: Option<i64>,

    /// Most old pods replaced at a time (default 1), each by one extra pod that must be Ready
    /// before the old one goes; pods already not ready or terminating count against it. 1 to
    /// 1000.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = bounds::MAX_PODS))]
    pub max_unavailable: i32,
}

impl RecycleSpec {
    /// `maxAge` as a duration, `None` when absent.
    pub fn max_age(&self) -> Result<Option<Duration>, DurationError> {
        self.max_age
            .as_deref()
            .map(|v| duration::parse("spec.recycle.maxAge", v, bounds::RECYCLE_MAX_AGE))
            .transpose()
    }
}

/// How jobs reach user code.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("!(self.mode in ['exec', 'jsonl']) || (has(self.command) && size(self.command) > 0)")
    .message("handler.command is required for the exec and jsonl modes"))]
#[x_kube(validation = Rule::new("self.mode != 'http' || has(self.url)")
    .message("handler.url is required for the http mode"))]
#[x_kube(validation = Rule::new("self.mode != 'http' || !has(self.command)")
    .message("handler.command is not used in the http mode: the container's own command starts the server"))]
#[serde(rename_all = "camelCase")]
pub struct HandlerSpec {
    /// `exec`: one process per job (payload on stdin, result on stdout, exit code decides:
    /// 0 done, 75 retry later, 65 permanent failure, anything else a failed attempt); `jsonl`:
    /// one long-lived process speaking JSON lines on stdin/stdout; `http`: one `POST` per job
    /// to `url`, a web server in the pod (the first container, started by its own command; the
    /// runtime then runs in a container of its own beside it).
    pub mode: HandlerMode,

    /// The program (and its arguments) the runtime starts, from the user's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,

    /// Where the runtime posts each job in the `http` mode (`CONVEYOR_HANDLER_URL`), e.g.
    /// `http://127.0.0.1:8000/jobs`: an `http://` or `https://` URL of at most 2048 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("handler.url must start with http:// or https://"))]
    pub url: Option<String>,
}

/// What a scaling decision rested on (`status.scaleBasis`).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleBasis {
    /// The queue's backlog, read from NATS.
    Backlog,
    /// Nothing: NATS was unreachable, so the pool kept its size.
    Held,
}

/// Handler protocol between the worker runtime and user code.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HandlerMode {
    /// One process per job.
    Exec,
    /// A long-lived child process speaking JSON lines.
    Jsonl,
    /// A web server in the pod, one `POST` per job.
    Http,
}

impl HandlerMode {
    /// The value of `CONVEYOR_HANDLER_MODE` for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Jsonl => "jsonl",
            Self::Http => "http",
        }
    }
}

/// Backlog-driven autoscaling of a worker pool.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("scaling.minReplicas must be less than or equal to scaling.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Fewest pods, also when the queue is empty, 0 to 1000; 0 lets the pool scale to zero.
    #[serde(default)]
    #[schemars(range(min = 0, max = bounds::MAX_PODS))]
    pub min_replicas: i32,

    /// Most pods, however long the backlog, 0 to 1000.
    #[schemars(range(min = 0, max = bounds::MAX_PODS))]
    pub max_replicas: i32,

    /// Backlog (pending + in-flight jobs) one pod is expected to handle; the pool gets
    /// ceil(backlog / targetBacklogPerReplica) pods, within the bounds above. 1 to 1000000.
    #[serde(default = "default_target_backlog")]
    #[schemars(range(min = 1, max = bounds::MAX_TARGET_BACKLOG))]
    pub target_backlog_per_replica: i32,

    /// How long the backlog must stay low before the pool shrinks, 0s to 24h; growing is
    /// immediate. Format: `30s`, `5m`.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(pattern(crate::duration::PATTERN), length(min = crate::duration::MIN_LENGTH, max = crate::duration::MAX_LENGTH))]
    #[x_kube(validation = bounds::SCALE_DOWN_DELAY.rule("scaling.scaleDownDelay"))]
    pub scale_down_delay: String,
}

impl ScalingSpec {
    /// The scale-down delay as a duration.
    pub fn scale_down_delay(&self) -> Result<Duration, DurationError> {
        duration::parse(
            "spec.scaling.scaleDownDelay",
            &self.scale_down_delay,
            bounds::SCALE_DOWN_DELAY,
        )
    }
}

/// Observed state of a `Worker`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Pods of the Deployment (mirrors its status).
    #[serde(default)]
    pub replicas: i32,

    /// Pods that are ready to take jobs.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Jobs the queue's workers hold now: delivered and not yet finished (running, or waiting
    /// out a retry backoff), from the JobQueue's `status.inFlight`. Counts every worker of the
    /// queue, so Workers sharing a queue show the same figure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<u64>,

    /// Jobs the ready pods can run at once: ready pods times the jobs one pod runs
    /// (`concurrency`, at most the queue's `concurrencyLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<i64>,

    /// Pods the operator currently asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// When the operator last changed the number of pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,

    /// Why the pool has its current size, e.g. `backlog 37, target 10 per replica`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,

    /// What the scaler's last decision rested on: `Backlog` (it read the queue's figures) or
    /// `Held` (NATS was unreachable, so it kept the size it had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_basis: Option<ScaleBasis>,

    /// Pods replaced because they reached `recycle.maxAge`, since the Worker was created.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recycled_pods: i64,

    /// Current state of the pool. `Available` is `True` when a pod is ready, or when the pool
    /// is scaled to zero and no job waits; its reason says why not (`QueueNotFound`,
    /// `InvalidSpec`, `NoReadyPods` while jobs wait and no pod is ready, whatever size was
    /// asked for, `MinimumReplicasUnavailable` when pods are asked for and none is ready). `Scaling` is `True` while the pool changes size
    /// (`ScalingUp`, `ScalingDown`) and `False` at the size asked for (`AtDesiredSize`, or
    /// `BacklogUnknown` while the scaler cannot read NATS and holds the size); its message
    /// gives the scaler's reason. `Degraded` is `True` when pods were OOM-killed recently,
    /// crash-loop, cannot pull their image, cannot be configured or cannot be scheduled; its
    /// message names the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

fn default_concurrency() -> i32 {
    1
}
fn default_max_unavailable() -> i32 {
    1
}
fn is_zero(n: &i64) -> bool {
    *n == 0
}
fn default_target_backlog() -> i32 {
    10
}
fn default_scale_down_delay() -> String {
    "30s".into()
}
