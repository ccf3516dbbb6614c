//! `Workflow`: a declared graph of steps, each an ordinary job on a JobQueue. The definition
//! lives in Kubernetes; the runs live in JetStream as chains of continuations (see
//! `docs/workflows.md`). The schema and its CEL rules refuse what a single object can show to
//! be wrong (names, sizes, unknown step names); the operator checks the rest (cycles, CEL that
//! does not compile, queues that do not exist) and reports it in `Ready`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::bounds;

/// Most steps of a workflow (`conveyor::workflow::MAX_STEPS`).
pub const MAX_STEPS: u32 = 64;
/// Most `dependsOn` entries of a step.
pub const MAX_DEPENDENCIES: u32 = 32;
/// Longest `when` or `forEach` expression (`conveyor::workflow::MAX_EXPRESSION`).
pub const MAX_EXPRESSION: u32 = 1024;

/// A DNS label: a step's name.
pub const STEP_NAME: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A queue in the workflow's namespace (`q`) or another (`ns/q`).
pub const QUEUE: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// A step timeout: `500ms`, `30s`, `5m`, `2h`.
pub const TIMEOUT: &str = "^[0-9]{1,9}(ms|s|m|h)$";

/// CEL rule of `spec`: every `dependsOn` entry names a step of the workflow.
pub const KNOWN_DEPENDENCIES: &str =
    "self.steps.all(s, !has(s.dependsOn) || s.dependsOn.all(d, self.steps.exists(t, t.name == d)))";
/// CEL rule of `spec`: no step depends on itself.
pub const NO_SELF_DEPENDENCY: &str =
    "self.steps.all(s, !has(s.dependsOn) || s.dependsOn.all(d, d != s.name))";
/// CEL rule of `spec`: `output` names a step.
pub const KNOWN_OUTPUT: &str = "!has(self.output) || self.steps.exists(t, t.name == self.output)";

/// A workflow: named steps on JobQueues, with dependencies, conditions, fan-out and a failure
/// handler. Runs are started with `conveyor run` or `Client::start_workflow`.
// Each `printcolumn(...)` repeats `type_ = ...`, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "conveyor.dev",
    version = "v1alpha1",
    kind = "Workflow",
    plural = "workflows",
    singular = "workflow",
    namespaced,
    doc = "A declared multi-step job: named steps on JobQueues, run as chains of continuations in JetStream.",
    status = "WorkflowStatus",
    derive = "PartialEq",
    shortname = "wf",
    category = "conveyor",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#,
        description = "Whether runs can be started"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
        description = "Why the workflow is or is not ready"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        priority = 1,
        json_path = r#".status.conditions[?(@.type=="Ready")].message"#,
        description = "What is wrong, when not ready"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(KNOWN_DEPENDENCIES).message("every dependsOn entry must name a step of this workflow"))]
#[x_kube(validation = Rule::new(NO_SELF_DEPENDENCY).message("a step must not depend on itself"))]
#[x_kube(validation = Rule::new(KNOWN_OUTPUT).message("output must name a step of this workflow"))]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSpec {
    /// The steps, 1 to 64, names unique. A step starts once every step it depends on has
    /// finished (completed or skipped); steps that do not depend on each other run in
    /// parallel. Cycles are refused by the operator (`Ready=False`, `InvalidWorkflow`).
    #[schemars(length(min = 1, max = MAX_STEPS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub steps: Vec<WorkflowStep>,

    /// A job run once when a step fails for good (its job dead-lettered or cancelled, or its
    /// `when`/`forEach` could not be evaluated), told which step failed and its error; the
    /// run then ends failed. Nothing runs on failure when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<FailureHandler>,

    /// The step whose result is the run's result; the last step listed when absent. A
    /// skipped output step gives the result `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(STEP_NAME))]
    pub output: Option<String>,
}

/// One step of a workflow: a job (or one job per `forEach` element) on a JobQueue, or a
/// sub-run of a Workflow.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.queue) != has(self.workflow)").message("a step needs exactly one of queue and workflow"))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStep {
    /// The step's name, unique in the workflow: a DNS label (lowercase letters, digits, `-`,
    /// at most 63). Its jobs' ids are `<workflow>.<run>.<name>` (`.<index>` per `forEach`
    /// element), and CEL reads its outcome as `steps.<name>` (`steps['<name>']` when the name
    /// has a `-`).
    #[schemars(length(min = 1, max = 63), pattern(STEP_NAME))]
    pub name: String,

    /// The JobQueue that runs it: `q` in the workflow's namespace, or `ns/q`. A queue that
    /// does not exist makes `Ready` `False` with reason `QueueNotFound`. Exactly one of
    /// `queue` and `workflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317), pattern(QUEUE))]
    pub queue: Option<String>,

    /// Instead of `queue`: the step is a sub-run of a Workflow, started with the step's input
    /// (the `forEach` element, else the run's input) and waited for; its result is the
    /// sub-run's result, its failure the step's. Only the workflow's own name is supported
    /// (recursion over hierarchical data); sub-runs nest at most 8 deep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub workflow: Option<String>,

    /// Names of the steps that must finish (complete or be skipped) before this one starts,
    /// at most 32, each once. A failed dependency ends the run instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_DEPENDENCIES))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub depends_on: Vec<String>,

    /// A CEL expression over `input` (the run's input) and `steps` (each finished step's
    /// `outcome` — `completed` or `skipped` — and `result`), e.g. `has(input.twitter)`. The
    /// step runs only when it is `true`; when `false` it is skipped (recorded, never
    /// submitted) and steps after it go on. Reference only steps this one depends on, directly
    /// or not: others may not have finished. At most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_EXPRESSION))]
    pub when: Option<String>,

    /// A CEL expression over `input` and `steps` yielding a list, e.g. `input.users` or
    /// `steps.list.result.ids`: one job per element (at most 1000; the element is the job's
    /// `item`, its position `index`). The step's result is the list of the jobs' results in
    /// element order; an empty list completes it at once with `[]`. Anything but a list fails
    /// the run. At most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_EXPRESSION))]
    pub for_each: Option<String>,

    /// Most deliveries of the step's job(s), 1 to 1000; at most the queue's
    /// `retry.maxAttempts` counts. The queue's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_ATTEMPTS))]
    pub max_attempts: Option<i32>,

    /// Processing timeout of one attempt of the step's job(s), instead of the queue's
    /// `timeout`. Format: `500ms`, `30s`, `5m`, `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 16), pattern(TIMEOUT))]
    pub timeout: Option<String>,
}

/// `spec.onFailure`: where the failure job goes.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FailureHandler {
    /// The JobQueue that runs it: `q` in the workflow's namespace, or `ns/q`. Its job's id is
    /// `<workflow>.<run>.onFailure`; its payload carries `failed.step` and `failed.error`.
    #[schemars(length(min = 1, max = 317), pattern(QUEUE))]
    pub queue: String,

    /// Most deliveries of its job, 1 to 1000. The queue's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_ATTEMPTS))]
    pub max_attempts: Option<i32>,

    /// Processing timeout of one attempt of its job. Format: `500ms`, `30s`, `5m`, `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 16), pattern(TIMEOUT))]
    pub timeout: Option<String>,
}

/// Observed state of a `Workflow`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` is `True` (reason `Valid`) when runs can be started: the graph has no cycle,
    /// every CEL expression compiles and every queue exists. Otherwise its reason
    /// (`InvalidWorkflow`, `QueueNotFound`) and message say what is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
