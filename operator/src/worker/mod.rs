//! The `Worker` controller: server-side applies the Worker's Deployment (built by
//! [`deployment::build`]) and mirrors its state into the Worker's status with an `Available`
//! condition, and judges its pods into a `Degraded` condition (with a `WorkerCrashed` Event
//! when that changes). Pool size comes from `spec.replicas`, or from the scaler when `scaling`
//! is set.

pub mod deployment;
pub mod idle;
pub mod pods;
pub mod recycle;
mod status;

use std::sync::Arc;
use std::time::Instant;

use conveyor_crds::{JobQueue, Worker, WorkerStatus};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::conditions;
use crate::context::{Context, FIELD_MANAGER};
pub use status::{Problem, QueueFigures, compute_status};

const CONTROLLER: &str = "worker";

/// Why a `Worker` reconcile failed; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the Worker's JobQueue failed.
    #[error("cannot read JobQueue {name}: {source}")]
    GetQueue {
        /// Queue name.
        name: String,
        /// Kubernetes error.
        source: kube::Error,
    },
    /// Applying the Deployment failed.
    #[error("cannot apply Deployment: {0}")]
    Apply(#[source] kube::Error),
    /// Listing the Worker's pods failed.
    #[error("cannot list pods: {0}")]
    ListPods(#[source] kube::Error),
    /// Writing the status failed.
    #[error("cannot write status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::GetQueue { .. } => "get_queue",
            Self::Apply(_) => "apply_deployment",
            Self::ListPods(_) => "list_pods",
            Self::Status(_) => "kube",
        }
    }
}

/// The Worker controller, wired to its Deployments and to the JobQueues its Workers name.
pub fn controller(ctx: &Context) -> Controller<Worker> {
    let (workers, deployments, queues, pods) = match &ctx.config.namespace {
        Some(ns) => (
            Api::<Worker>::namespaced(ctx.client.clone(), ns),
            Api::<Deployment>::namespaced(ctx.client.clone(), ns),
            Api::<JobQueue>::namespaced(ctx.client.clone(), ns),
            Api::<Pod>::namespaced(ctx.client.clone(), ns),
        ),
        None => (
            Api::all(ctx.client.clone()),
            Api::all(ctx.client.clone()),
            Api::all(ctx.client.clone()),
            Api::all(ctx.client.clone()),
        ),
    };
    let ours = watcher::Config::default().labels(&format!(
        "{}={}",
        deployment::NAME_LABEL.0,
        deployment::NAME_LABEL.1
    ));
    let controller = Controller::new(workers, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(deployments, ours.clone())
        .watches(queues, watcher::Config::default(), move |queue| {
            workers_of(&store, &queue)
        })
        .watches(pods, ours, |pod| worker_of(&pod))
}

/// The Worker a pod belongs to (by its label), so pod crashes update `Degraded` at once.
fn worker_of(pod: &Pod) -> Option<ObjectRef<Worker>> {
    let name = pod.labels().get(deployment::WORKER_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// Workers that consume `queue`, so they are reconciled when it appears or changes.
fn workers_of(store: &Store<Worker>, queue: &JobQueue) -> Vec<ObjectRef<Worker>> {
    let ns = queue.namespace();
    store
        .state()
        .iter()
        .filter(|w| w.namespace() == ns && w.spec.queue == queue.name_any())
        .map(|w| ObjectRef::from_obj(&**w))
        .collect()
}

/// Runs `controller` until `shutdown` resolves.
pub async fn run(
    controller: Controller<Worker>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "worker reconcile ended with an error");
            }
        })
        .await;
}

fn key(worker: &Worker) -> String {
    format!(
        "worker/{}/{}",
        worker.namespace().unwrap_or_default(),
        worker.name_any()
    )
}

/// The number of pods the Deployment should have.
pub fn desired_replicas(worker: &Worker) -> i32 {
    match &worker.spec.scaling {
        Some(scaling) => {
            let max = scaling.max_replicas.max(0);
            worker
                .status
                .as_ref()
                .and_then(|s| s.desired_replicas)
                .unwrap_or(scaling.min_replicas)
                .clamp(scaling.min_replicas.clamp(0, max), max)
        }
        None => worker.spec.replicas.unwrap_or(1).max(0),
    }
}

/// Reconciles one `Worker`.
#[instrument(skip(worker, ctx), fields(namespace = worker.namespace(), name = worker.name_any()))]
pub async fn reconcile(worker: Arc<Worker>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = apply(&worker, &ctx).await;
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key(&worker));
    }
    result
}

/// Retries with per-object exponential backoff (capped at the resync period).
pub fn error_policy(worker: Arc<Worker>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(CONTROLLER, err.label());
    let delay = ctx.backoff(key(&worker));
    tracing::warn!(%err, ?delay, name = worker.name_any(), "worker reconcile failed, retrying");
    Action::requeue(delay)
}

async fn apply(worker: &Worker, ctx: &Context) -> Result<Action, Error> {
    let ns = worker.namespace().unwrap_or_default();
    let name = worker.name_any();
    let queues: Api<JobQueue> = Api::namespaced(ctx.client.clone(), &ns);
    let queue_name = &worker.spec.queue;
    let queue = queues
        .get_opt(queue_name)
        .await
        .map_err(|source| Error::GetQueue {
            name: queue_name.clone(),
            source,
        })?;
    let replicas = desired_replicas(worker);
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = ListParams::default().labels(&deployment::selector_string(&name));
    let listed = pod_api
        .list(&selector)
        .await
        .map_err(Error::ListPods)?
        .items;
    let recycling = recycle_old_pods(worker, &listed, replicas, &pod_api, ctx).await;
    let figures = QueueFigures::of(
        queue_name,
        queue.as_ref().and_then(|q| q.status.as_ref()),
        worker.spec.concurrency,
        queue.as_ref().and_then(|q| q.spec.concurrency_limit),
    );
    let (deployment, problem, action) = match queue {
        None => {
            let message = format!("JobQueue {queue_name} does not exist in namespace {ns}");
            (
                None,
                Some(Problem::queue_not_found(message)),
                Action::requeue(ctx.config.resync),
            )
        }
        Some(queue) => {
            let inputs = deployment::Inputs {
                queue: &queue,
                worker_image: &ctx.config.worker_image,
                default_nats_url: ctx.nats.default_url(),
                replicas: replicas.saturating_add(recycling.surge),
            };
            match deployment::build(worker, inputs) {
                Err(err) => (
                    None,
                    Some(Problem::invalid(err.to_string())),
                    Action::await_change(),
                ),
                Ok(desired) => {
                    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
                    let params = PatchParams::apply(FIELD_MANAGER).force();
                    let applied = api
                        .patch(&name, &params, &Patch::Apply(&desired))
                        .await
                        .map_err(Error::Apply)?;
                    (Some(applied), None, Action::requeue(ctx.config.resync))
                }
            }
        }
    };
    let scaled = worker.spec.scaling.is_some();
    let old = worker.status.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut new = compute_status(
        &old,
        worker.meta().generation,
        &name,
        deployment.as_ref(),
        replicas,
        recycling.surge,
        scaled,
        problem.as_ref(),
        &figures,
        now,
    );
    let mut crash_note = None;
    let mut listed_pods = None;
    if deployment.is_some() {
        let health = pods::health(&listed, now);
        new.recycled_pods += recycling.recycled;
        conditions::set(
            &mut new.conditions,
            pods::DEGRADED,
            health.status,
            health.reason,
            health.message,
            worker.meta().generation,
            now,
        );
        crash_note = Some(health.note);
        listed_pods = Some(listed);
    }
    ctx.metrics
        .observe_worker(&ns, &name, queue_name, &new, listed_pods.as_deref(), now);
    announce(worker, &old, &new, ctx).await;
    announce_crashes(worker, &old, &new, crash_note, ctx).await;
    if new != old {
        write_status(worker, &new, scaled, ctx)
            .await
            .map_err(Error::Status)?;
    }
    Ok(action)
}

/// Publishes an Event when `Available` changes status or reason.
async fn announce(worker: &Worker, old: &WorkerStatus, new: &WorkerStatus, ctx: &Context) {
    let before = conditions::find(&old.conditions, conditions::AVAILABLE);
    let Some(now) = conditions::find(&new.conditions, conditions::AVAILABLE) else {
        return;
    };
    if before.is_some_and(|b| b.status == now.status && b.reason == now.reason) {
        return;
    }
    let type_ = if now.status == "True" {
        EventType::Normal
    } else {
        EventType::Warning
    };
    ctx.event(worker, type_, &now.reason, now.message.clone())
        .await;
}

/// What recycling asks of this reconcile.
#[derive(Debug, Clone, Copy, Default)]
struct Recycling {
    /// Pods to run beyond the desired size while old ones wait for their replacements.
    surge: i32,
    /// Old pods that went (or are going) this time.
    recycled: i64,
}

/// Recycles the pods `recycle.maxAge` says are due without dipping capacity: each is marked
/// ([`recycle::MARK`], the lowest deletion cost) and the Deployment runs one more pod per
/// marked one; once as many unmarked pods are Ready as the pool wants, the Deployment goes back
/// to its size and the ReplicaSet removes the marked pods first, each deleted gracefully so
/// its runtime drains. The operator never deletes a pod itself. Each recycle is announced with
/// a `Recycled` Event. Failures are logged and retried next time.
async fn recycle_old_pods(
    worker: &Worker,
    listed: &[Pod],
    desired: i32,
    api: &Api<Pod>,
    ctx: &Context,
) -> Recycling {
    let Some(spec) = &worker.spec.recycle else {
        return Recycling::default();
    };
    let Ok(Some(max_age)) = spec.max_age() else {
        return Recycling::default();
    };
    let max_age_text = spec.max_age.as_deref().unwrap_or_default();
    let live: Vec<&Pod> = listed
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let waiting: Vec<String> = live
        .iter()
        .filter(|p| recycle::marked(p) == Some(recycle::WAITING))
        .map(|p| p.name_any())
        .collect();
    if !waiting.is_empty() {
        let fresh_ready = live
            .iter()
            .filter(|p| recycle::marked(p).is_none() && recycle::ready(p))
            .count();
        if fresh_ready < usize::try_from(desired).unwrap_or(0) {
            return Recycling {
                surge: i32::try_from(waiting.len()).unwrap_or(i32::MAX),
                recycled: 0,
            };
        }
        // The replacements are Ready: release the old pods to the ReplicaSet's scale-down.
        for name in &waiting {
            set_mark(api, name, recycle::RELEASED).await;
        }
        let note = format!(
            "replaced {} older than maxAge {max_age_text} once the replacements were ready: {}",
            if waiting.len() == 1 { "a pod" } else { "pods" },
            crate::events::names(&waiting, crate::events::NOTE_LIMIT - 120)
        );
        ctx.event(worker, EventType::Normal, recycle::RECYCLED, note)
            .await;
        return Recycling {
            surge: 0,
            recycled: i64::try_from(waiting.len()).unwrap_or(i64::MAX),
        };
    }
    let ages: Vec<_> = live
        .iter()
        .filter(|p| recycle::marked(p).is_none())
        .filter_map(|p| recycle::PodAge::of(p))
        .collect();
    let terminating = listed.len() - live.len();
    let now = k8s_openapi::jiff::Timestamp::now();
    let due = recycle::due(
        &ages,
        max_age,
        spec.max_unavailable,
        desired,
        terminating,
        now,
    );
    let mut surge = 0i32;
    for name in due {
        if set_mark(api, &name, recycle::WAITING).await {
            surge = surge.saturating_add(1);
        }
    }
    Recycling { surge, recycled: 0 }
}

/// Marks a pod for recycling (`state`), with the lowest deletion cost so a scale-down of its
/// ReplicaSet takes it first; false when the patch failed (logged).
async fn set_mark(api: &Api<Pod>, name: &str, state: &str) -> bool {
    let patch = serde_json::json!({
        "metadata": {"annotations": {
            recycle::MARK: state,
            idle::DELETION_COST: i32::MIN.to_string(),
        }}
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => true,
        Err(err) => {
            tracing::warn!(%err, pod = name, "cannot mark a pod for recycling");
            false
        }
    }
}

/// Publishes a `WorkerCrashed` Warning when `Degraded` becomes true or names other pods or
/// troubles, with `note` (the troubles summarised to fit an Event); the message leaves out
/// restart counts, so a crash loop is one aggregated Event.
async fn announce_crashes(
    worker: &Worker,
    old: &WorkerStatus,
    new: &WorkerStatus,
    note: Option<String>,
    ctx: &Context,
) {
    let Some(now) = conditions::find(&new.conditions, pods::DEGRADED) else {
        return;
    };
    if now.status != "True" {
        return;
    }
    let before = conditions::find(&old.conditions, pods::DEGRADED);
    if before.is_some_and(|b| b.status == now.status && b.message == now.message) {
        return;
    }
    ctx.event(
        worker,
        EventType::Warning,
        pods::reason::WORKER_CRASHED,
        note.unwrap_or_else(|| now.message.clone()),
    )
    .await;
}

/// Applies the fields this controller owns; the scaler owns the scaling fields of autoscaled
/// pools, so they are left out of the patch.
async fn write_status(
    worker: &Worker,
    status: &WorkerStatus,
    scaled: bool,
    ctx: &Context,
) -> Result<(), kube::Error> {
    let mut body = serde_json::to_value(status).unwrap_or_default();
    if scaled && let Some(fields) = body.as_object_mut() {
        for owned_by_scaler in ["desiredReplicas", "lastScaleTime", "lastScaleReason"] {
            fields.remove(owned_by_scaler);
        }
    }
    let patch = serde_json::json!({
        "apiVersion": Worker::api_version(&()),
        "kind": Worker::kind(&()),
        "status": body,
    });
    let api: Api<Worker> =
        Api::namespaced(ctx.client.clone(), &worker.namespace().unwrap_or_default());
    api.patch_status(
        &worker.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}
