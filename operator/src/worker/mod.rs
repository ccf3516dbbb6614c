//! The `Worker` controller: server-side applies the Worker's Deployment (built by
//! [`deployment::build`]) and mirrors its state into the Worker's status with an `Available`
//! condition, and judges its pods into a `Degraded` condition (with a `WorkerCrashed` Event
//! when that changes). Pool size comes from `spec.replicas`, or from the scaler when `scaling`
//! is set.
//!
//! A reconcile is a pipeline, each step a function with its own error: [`fetch`] (the queue
//! and the pods) → [`recycle::plan`] (pure: which old pods to mark or release) → [`recycle`]
//! (the one side effect on pods, announced with a `Recycled` Event) → [`identity::ensure`]
//! (the Worker's own NATS identity when the operator has a signing key, signed again at
//! half-life, announced with `NatsIdentitySigned` or `NatsIdentityFailed`) → [`desired`] (pure: the
//! Deployment, or why there is none) → [`apply_deployment`] → [`compute_status`] and
//! [`pods::health`] (pure) → [`report`] (Events on transitions, the status write). The
//! controller's per-Worker state (its backoff) lives in its own
//! [`States`](crate::states::States).
//! Only a change of the Worker that the reconcile acts on triggers one ([`trigger`]):
//! its own status writes do not.

pub mod deployment;
pub mod identity;
pub mod idle;
pub mod pods;
pub mod reasons;
pub mod recycle;
mod status;

use std::sync::Arc;
use std::time::Instant;

use conveyor_crds::{JobQueue, Worker, WorkerStatus};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::conditions::{self, Status};
use crate::context::{Context, FIELD_MANAGER, Shared};
use crate::guarded;
pub use status::{Problem, QueueFigures, compute_status};

const CONTROLLER: &str = "worker";

/// What the controller's reconciles share: the operator's context and each Worker's state
/// (nothing beyond its backoff so far).
pub type Workers = Shared<Worker, ()>;

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
    /// The Worker's NATS identity cannot be signed or stored.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::GetQueue { .. } => "get_queue",
            Self::Apply(_) => "apply_deployment",
            Self::ListPods(_) => "list_pods",
            Self::Status(_) => "kube",
            Self::Identity(_) => "identity",
        }
    }
}

/// A `Worker` as stored: one whose JSON does not fit [`Worker`] is an `Err` with its metadata
/// (see [`guarded`]).
pub type Stored = DeserializeGuard<Worker>;

/// The Worker controller, wired to its Deployments, its pods and the JobQueues its Workers
/// name, and a cache of the well-formed Workers for the scaler, the metrics and the dashboard.
pub fn controller(ctx: &Context) -> (Controller<Stored>, Store<Worker>) {
    let (workers, deployments, queues, pods) = match &ctx.config.namespace {
        Some(ns) => (
            Api::<Stored>::namespaced(ctx.client.clone(), ns),
            Api::<Deployment>::namespaced(ctx.client.clone(), ns),
            Api::<crate::jobqueue::Stored>::namespaced(ctx.client.clone(), ns),
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
    let (controller, well_formed) = guarded::controller(workers, trigger);
    let store = well_formed.clone();
    let controller = controller
        .owns(deployments, ours.clone())
        .watches(queues, watcher::Config::default(), move |queue| {
            // A malformed queue (reported by the JobQueue controller) triggers nothing.
            queue
                .0
                .map(|queue| workers_of(&store, &queue))
                .unwrap_or_default()
        })
        .watches(pods, ours, |pod| worker_of(&pod));
    (controller, well_formed)
}

/// What a Worker's reconcile acts on in the Worker itself: its spec (the generation) and the
/// fields of its status the scaler writes (the size it asks for and why). The controller's own
/// status writes change neither, so they trigger no reconcile; its Deployment and pods still
/// do, through their own watches, and so does the resync. A malformed Worker triggers on any
/// change.
fn trigger(stored: &Stored) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match &stored.0 {
        Ok(worker) => {
            worker.meta().generation.hash(&mut hasher);
            let status = worker.status.as_ref();
            status.and_then(|s| s.desired_replicas).hash(&mut hasher);
            status
                .and_then(|s| s.scale_basis)
                .map(|b| format!("{b:?}"))
                .hash(&mut hasher);
            status
                .and_then(|s| s.last_scale_reason.as_deref())
                .hash(&mut hasher);
        }
        Err(_) => stored.resource_version().hash(&mut hasher),
    }
    Some(hasher.finish())
}

/// The Worker a pod belongs to (by its label), so pod crashes update `Degraded` at once.
fn worker_of(pod: &Pod) -> Option<ObjectRef<Stored>> {
    let name = pod.labels().get(deployment::WORKER_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// Workers that consume `queue`, so they are reconciled when it appears or changes.
fn workers_of(store: &Store<Worker>, queue: &JobQueue) -> Vec<ObjectRef<Stored>> {
    let ns = queue.namespace();
    store
        .state()
        .iter()
        .filter(|w| w.namespace() == ns && w.spec.queue == queue.name_any())
        .map(|w| guarded::typed(&ObjectRef::from_obj(&**w)))
        .collect()
}

/// Runs `controller` until `shutdown` resolves, with states of its own.
pub async fn run(
    controller: Controller<Stored>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let workers = Arc::new(Workers::new(ctx));
    let store = controller.store();
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, workers.clone())
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(%err, "worker reconcile ended with an error");
            }
            // Workers have no finalizer: the state of a deleted one goes once the cache
            // forgets it.
            workers
                .states
                .prune(|key| store.get(&guarded::typed(key)).is_some());
            std::future::ready(())
        })
        .await;
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

/// Reconciles one `Worker`; a malformed one is reported on the object and left alone until it
/// changes.
#[instrument(skip(stored, workers), fields(namespace = stored.namespace(), name = stored.name_any()))]
pub async fn reconcile(stored: Arc<Stored>, workers: Arc<Workers>) -> Result<Action, Error> {
    let Some(worker) = guarded::report(&stored, CONTROLLER, &workers.ctx).await else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let result = apply(&worker, &workers.ctx).await;
    workers
        .ctx
        .metrics
        .reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        workers.states.succeeded(&worker);
    }
    result
}

/// Retries with per-object exponential backoff (capped at the resync period).
pub fn error_policy(stored: Arc<Stored>, err: &Error, workers: Arc<Workers>) -> Action {
    workers.ctx.metrics.failed(CONTROLLER, err.label());
    let delay = match &stored.0 {
        Ok(worker) => workers.states.backoff(worker, workers.ctx.config.resync),
        Err(_) => workers.ctx.config.resync,
    };
    tracing::warn!(%err, ?delay, name = stored.name_any(), "worker reconcile failed, retrying");
    Action::requeue(delay)
}

/// What a reconcile reads: the Worker's queue (`None` when it does not exist) and its pods.
struct Fetched {
    queue: Option<JobQueue>,
    pods: Vec<Pod>,
}

/// Step 1: reads the Worker's queue and its pods.
async fn fetch(worker: &Worker, ctx: &Context) -> Result<Fetched, Error> {
    let ns = worker.namespace().unwrap_or_default();
    let queues: Api<JobQueue> = Api::namespaced(ctx.client.clone(), &ns);
    let queue_name = &worker.spec.queue;
    let queue = queues
        .get_opt(queue_name)
        .await
        .map_err(|source| Error::GetQueue {
            name: queue_name.clone(),
            source,
        })?;
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = ListParams::default().labels(&deployment::selector_string(&worker.name_any()));
    let pods = pod_api
        .list(&selector)
        .await
        .map_err(Error::ListPods)?
        .items;
    Ok(Fetched { queue, pods })
}

/// Why a Worker has no Deployment ([`desired`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Unbuildable {
    /// The queue it names does not exist (looked for again every resync).
    #[error("JobQueue {queue} does not exist in namespace {namespace}")]
    QueueNotFound {
        /// The queue's name.
        queue: String,
        /// The Worker's namespace.
        namespace: String,
    },
    /// The spec cannot be rendered (waits for a change).
    #[error(transparent)]
    Invalid(#[from] deployment::BuildError),
}

impl Unbuildable {
    fn problem(&self) -> Problem {
        match self {
            Self::QueueNotFound { .. } => Problem::queue_not_found(self.to_string()),
            Self::Invalid(_) => Problem::invalid(self.to_string()),
        }
    }

    fn next(&self, resync: std::time::Duration) -> Action {
        match self {
            Self::QueueNotFound { .. } => Action::requeue(resync),
            Self::Invalid(_) => Action::await_change(),
        }
    }
}

/// Step 3 (pure): the Deployment the Worker wants with `replicas` pods (the runtime image and
/// the default NATS URL from the operator's settings), or why it cannot have one.
fn desired(
    worker: &Worker,
    queue: Option<&JobQueue>,
    replicas: i32,
    worker_image: &str,
    default_nats_url: &str,
    identity: Option<&identity::Identity>,
) -> Result<Deployment, Unbuildable> {
    let queue = queue.ok_or_else(|| Unbuildable::QueueNotFound {
        queue: worker.spec.queue.clone(),
        namespace: worker.namespace().unwrap_or_default(),
    })?;
    let inputs = deployment::Inputs {
        queue,
        worker_image,
        default_nats_url,
        replicas,
        identity,
    };
    Ok(deployment::build(worker, inputs)?)
}

/// Step 4: server-side applies the Deployment.
async fn apply_deployment(
    worker: &Worker,
    desired: &Deployment,
    ctx: &Context,
) -> Result<Deployment, Error> {
    let api: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &worker.namespace().unwrap_or_default());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&worker.name_any(), &params, &Patch::Apply(desired))
        .await
        .map_err(Error::Apply)
}

async fn apply(worker: &Worker, ctx: &Context) -> Result<Action, Error> {
    let ns = worker.namespace().unwrap_or_default();
    let name = worker.name_any();
    let now = k8s_openapi::jiff::Timestamp::now();
    let Fetched { queue, pods } = fetch(worker, ctx).await?;
    let replicas = desired_replicas(worker);
    let recycling = match worker.spec.recycle.as_ref() {
        Some(spec) => match spec.max_age() {
            Ok(Some(max_age)) => {
                let plan = recycle::plan(&pods, max_age, spec.max_unavailable, replicas, now);
                recycle(worker, plan, ctx).await
            }
            _ => Recycling::default(),
        },
        None => Recycling::default(),
    };
    let figures = QueueFigures::of(
        &worker.spec.queue,
        queue.as_ref().and_then(|q| q.status.as_ref()),
        worker.spec.concurrency,
        queue.as_ref().and_then(|q| q.spec.concurrency_limit),
    );
    let identity = match queue.as_ref() {
        Some(queue) => sign_identity(worker, queue, ctx, now.as_second()).await?,
        None => None,
    };
    let surged = replicas.saturating_add(recycling.surge);
    let wanted = desired(
        worker,
        queue.as_ref(),
        surged,
        &ctx.config.worker_image,
        ctx.nats.default_url(),
        identity.as_ref(),
    );
    let (deployment, problem, action) = match wanted {
        Err(unbuildable) => (
            None,
            Some(unbuildable.problem()),
            unbuildable.next(ctx.config.resync),
        ),
        Ok(desired) => {
            let applied = apply_deployment(worker, &desired, ctx).await?;
            // Back before the identity is due, whatever the resync period.
            let next = identity.as_ref().map_or(ctx.config.resync, |identity| {
                ctx.config
                    .resync
                    .min(identity::until_renewal(identity, now.as_second()))
            });
            (Some(applied), None, Action::requeue(next))
        }
    };
    let scaled = worker.spec.scaling.is_some();
    let old = worker.status.clone().unwrap_or_default();
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
        let health = pods::health(&pods, now);
        new.recycled_pods = new.recycled_pods.saturating_add(recycling.recycled);
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
        listed_pods = Some(pods);
    }
    let troubled = listed_pods.as_deref().map(|pods| pods::troubled(pods, now));
    let seen = listed_pods
        .as_deref()
        .zip(troubled.as_ref())
        .map(|(pods, troubled)| crate::metrics::PodsSeen { pods, troubled });
    ctx.metrics
        .observe_worker(&ns, &name, &worker.spec.queue, &new, seen);
    report(worker, &old, &new, crash_note, ctx).await?;
    Ok(action)
}

/// Step 2b: the Worker's own NATS identity ([`identity::ensure`]), `None` without a signing
/// key. A new one is announced with `NatsIdentitySigned`, a failure with a
/// `NatsIdentityFailed` Warning. When the recorded identity has not expired the pods keep it
/// and the rest of the reconcile (Deployment, scaling, status) goes on; only when no valid
/// identity remains does the reconcile fail (retried with backoff; the Deployment keeps the
/// identity it had).
async fn sign_identity(
    worker: &Worker,
    queue: &JobQueue,
    ctx: &Context,
    now: i64,
) -> Result<Option<identity::Identity>, Error> {
    match identity::ensure(worker, queue, ctx, now).await {
        Ok(None) => Ok(None),
        Ok(Some(identity::Outcome::Kept(identity, error))) => {
            let note = format!(
                "{error}; the pods keep the identity in Secret {}, valid until {}, and signing is tried again",
                identity.secret,
                at(identity.expires_at)
            );
            ctx.event(
                worker,
                EventType::Warning,
                reasons::NATS_IDENTITY_FAILED,
                note,
            )
            .await;
            Ok(Some(identity))
        }
        Ok(Some(identity::Outcome::Current(identity, signed))) => {
            if let Some(why) = signed {
                let note = format!(
                    "signed a NATS identity for this Worker's pods into Secret {} ({why}), valid until {}",
                    identity.secret,
                    at(identity.expires_at)
                );
                ctx.event(
                    worker,
                    EventType::Normal,
                    reasons::NATS_IDENTITY_SIGNED,
                    note,
                )
                .await;
            }
            Ok(Some(identity))
        }
        Err(error) => {
            ctx.event(
                worker,
                EventType::Warning,
                reasons::NATS_IDENTITY_FAILED,
                error.to_string(),
            )
            .await;
            Err(error.into())
        }
    }
}

/// A Unix time for an Event's message.
fn at(seconds: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .map_or_else(|_| seconds.to_string(), |t| t.to_string())
}

/// Step 6: the Events the status change deserves, then the status write (when it changed).
async fn report(
    worker: &Worker,
    old: &WorkerStatus,
    new: &WorkerStatus,
    crash_note: Option<String>,
    ctx: &Context,
) -> Result<(), Error> {
    announce(worker, old, new, ctx).await;
    announce_crashes(worker, old, new, crash_note, ctx).await;
    if new != old {
        write_status(worker, new, worker.spec.scaling.is_some(), ctx)
            .await
            .map_err(Error::Status)?;
    }
    Ok(())
}

/// Publishes an Event when `Available` changes status or reason.
async fn announce(worker: &Worker, old: &WorkerStatus, new: &WorkerStatus, ctx: &Context) {
    let before = conditions::find(&old.conditions, conditions::AVAILABLE);
    let Some(now) = conditions::find(&new.conditions, conditions::AVAILABLE) else {
        return;
    };
    if before.is_some_and(|b| Status::of(b) == Status::of(now) && b.reason == now.reason) {
        return;
    }
    let type_ = if conditions::is_true(now) {
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

/// Step 2: carries out the recycling `plan` without dipping capacity: each pod due is marked
/// ([`recycle::MARK`], the lowest deletion cost) and the Deployment runs one more pod per
/// marked one; once as many unmarked pods are Ready as the pool wants, the marked pods are
/// released and the Deployment goes back to its size, so the ReplicaSet removes them first,
/// each deleted gracefully so its runtime drains. The operator never deletes a pod itself.
/// Each release is announced with a `Recycled` Event. Failed patches are logged and retried
/// next time.
async fn recycle(worker: &Worker, plan: recycle::Plan, ctx: &Context) -> Recycling {
    let api: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &worker.namespace().unwrap_or_default());
    match plan {
        recycle::Plan::Nothing => Recycling::default(),
        recycle::Plan::Wait { surge } => Recycling { surge, recycled: 0 },
        recycle::Plan::Release(waiting) => {
            for name in &waiting {
                set_mark(&api, name, recycle::RELEASED).await;
            }
            let max_age = worker
                .spec
                .recycle
                .as_ref()
                .and_then(|r| r.max_age.as_deref())
                .unwrap_or_default();
            let note = format!(
                "replaced {} older than maxAge {max_age} once the replacements were ready: {}",
                if waiting.len() == 1 { "a pod" } else { "pods" },
                crate::events::names(&waiting, crate::events::NOTE_LIMIT - 120)
            );
            ctx.event(worker, EventType::Normal, reasons::RECYCLED, note)
                .await;
            Recycling {
                surge: 0,
                recycled: i64::try_from(waiting.len()).unwrap_or(i64::MAX),
            }
        }
        recycle::Plan::Mark(due) => {
            let mut surge = 0i32;
            for name in due {
                if set_mark(&api, &name, recycle::WAITING).await {
                    surge = surge.saturating_add(1);
                }
            }
            Recycling { surge, recycled: 0 }
        }
    }
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
    if !conditions::is_true(now) {
        return;
    }
    let before = conditions::find(&old.conditions, pods::DEGRADED);
    if before.is_some_and(|b| Status::of(b) == Status::of(now) && b.message == now.message) {
        return;
    }
    ctx.event(
        worker,
        EventType::Warning,
        reasons::WORKER_CRASHED,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(yaml: &str) -> Worker {
        let mut w: Worker = serde_yaml::from_str(yaml).unwrap();
        w.metadata.namespace = Some("team".into());
        w
    }

    fn queue() -> JobQueue {
        let mut q: JobQueue =
            serde_yaml::from_str(include_str!("../../../examples/hello/queue.yaml")).unwrap();
        q.metadata.namespace = Some("team".into());
        q
    }

    const HELLO: &str = include_str!("../../../examples/hello/worker.yaml");

    #[test]
    fn the_desired_deployment_needs_the_queue_and_a_renderable_spec() {
        let w = worker(HELLO);
        let missing = desired(&w, None, 2, "img", "nats://n:4222", None).unwrap_err();
        assert_eq!(
            missing.problem(),
            Problem::queue_not_found(format!(
                "JobQueue {} does not exist in namespace team",
                w.spec.queue
            ))
        );
        assert_eq!(
            missing.next(std::time::Duration::from_secs(7)),
            Action::requeue(std::time::Duration::from_secs(7)),
            "a missing queue is looked for again"
        );
        let q = queue();
        let built = desired(&w, Some(&q), 3, "img", "nats://n:4222", None).unwrap();
        assert_eq!(built.spec.and_then(|s| s.replicas), Some(3));
        let mut broken = w.clone();
        broken
            .spec
            .template
            .spec
            .get_or_insert_with(Default::default)
            .containers
            .clear();
        let invalid = desired(&broken, Some(&q), 3, "img", "nats://n:4222", None).unwrap_err();
        assert_eq!(
            invalid.next(std::time::Duration::from_secs(7)),
            Action::await_change()
        );
        assert_eq!(
            invalid.problem(),
            Problem::invalid(deployment::BuildError::NoContainer.to_string())
        );
    }

    #[test]
    fn only_the_spec_and_the_scalers_fields_trigger_a_reconcile() {
        let stored = |w: &Worker| trigger(&DeserializeGuard(Ok(w.clone())));
        let mut w = worker(HELLO);
        w.metadata.generation = Some(1);
        let before = stored(&w);
        let status = w.status.get_or_insert_with(Default::default);
        status.ready_replicas = 3;
        status.replicas = 3;
        status.busy = Some(2);
        assert_eq!(stored(&w), before, "the controller's own figures");
        w.status.as_mut().unwrap().desired_replicas = Some(4);
        let scaled = stored(&w);
        assert_ne!(scaled, before, "the scaler's size");
        w.status.as_mut().unwrap().scale_basis = Some(conveyor_crds::ScaleBasis::Held);
        assert_ne!(stored(&w), scaled, "the scaler holds the size");
        let held = stored(&w);
        w.metadata.generation = Some(2);
        assert_ne!(stored(&w), held, "a spec change");
    }

    #[test]
    fn pools_without_scaling_take_their_replicas() {
        let mut w = worker(HELLO);
        w.spec.scaling = None;
        w.spec.replicas = Some(4);
        assert_eq!(desired_replicas(&w), 4);
        w.spec.replicas = Some(-1);
        assert_eq!(desired_replicas(&w), 0);
    }
}
