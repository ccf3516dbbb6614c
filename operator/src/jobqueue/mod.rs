//! The `JobQueue` controller: keeps a queue's JetStream assets in line with its spec, reports
//! `Ready`, `Backlogged` and `JobsFailing` with the queue's figures and recent failures in the
//! status (refreshed every few seconds, written at most every [`STATUS_THROTTLE`] unless a
//! condition flips), raises Events on condition transitions only, and deletes or keeps the
//! assets when the resource goes away (finalizer [`FINALIZER`], `spec.deletionPolicy`).
//!
//! A reconcile is a pipeline, each step a function with its own error:
//! [`validate`] (pure: the spec as thresholds and assets) → [`connect`] (the queue's NATS
//! server) → [`converge`] (ensure the assets, only when the spec or the server changed since
//! they were last ensured) → [`dlq_requests::handle`] (the one side effect asked for with an
//! annotation, with its own Events) → [`observe`] (the queue's figures) → [`settle`] and
//! [`desired_status`] (pure: the outcome and the new status) → [`report`] (Events on
//! transitions, the status write). What one reconcile leaves for the next of the same queue
//! is its [`QueueState`], kept in the controller's own
//! [`States`](crate::states::States). Only a change the reconcile acts on triggers one
//! ([`trigger`]): the operator's own status writes do not.

mod dlq_requests;
mod observe;
pub mod reasons;
mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use conveyor::connect::{FailureKind, NatsOptions};
use conveyor::names::QueueRef;
use conveyor_crds::{DeadLetterRequest, DeletionPolicy, JobQueue, JobQueueStatus};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::assets::{self, AssetsError, QueueAssets};
use crate::context::{Context, FIELD_MANAGER, Shared};
use crate::guarded;
pub use observe::Tail;
pub use status::{
    Health, Observed, Outcome, STATUS_THROTTLE, Sample, Thresholds, compute_status, notices,
};

/// Finalizer that guards the JetStream assets of a queue.
pub const FINALIZER: &str = "conveyor.dev/jetstream";
const CONTROLLER: &str = "jobqueue";

/// What the controller's reconciles share: the operator's context and each queue's state.
pub type Queues = Shared<JobQueue, QueueState>;

/// What the JobQueue controller remembers of one queue from one reconcile to the next.
#[derive(Debug, Default)]
pub struct QueueState {
    /// The latest sample of the work stream's counters, for rates.
    sample: Option<Sample>,
    /// The dead letters last read.
    tail: Option<Tail>,
    /// The dead-letter requests carried out.
    handled: dlq_requests::Handled,
    /// What the assets were last ensured for.
    ensured: Option<Ensured>,
}

/// What the assets of a queue were last ensured for: the spec's generation on that server
/// with those credentials. Another generation or server ensures them again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ensured {
    generation: Option<i64>,
    url: Option<String>,
    identity: Option<String>,
}

/// What a JobQueue's reconcile acts on in the queue itself: its spec (the generation), its
/// deletion and finalizers, and the dead-letter requests annotated. The operator's own status
/// writes change none of them, so they trigger no reconcile; the figures refresh on the
/// reconcile's own requeue. A malformed queue triggers on any change.
fn trigger(stored: &Stored) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match &stored.0 {
        Ok(jq) => {
            jq.meta().generation.hash(&mut hasher);
            jq.meta().deletion_timestamp.is_some().hash(&mut hasher);
            jq.finalizers().hash(&mut hasher);
            for annotation in [
                dlq_requests::REQUEUE_ANNOTATION,
                dlq_requests::PURGE_ANNOTATION,
            ] {
                jq.annotations().get(annotation).hash(&mut hasher);
            }
        }
        Err(_) => stored.resource_version().hash(&mut hasher),
    }
    Some(hasher.finish())
}

impl QueueState {
    /// Keeps `sample` of a queue's counters as the latest and returns the rates since the one
    /// it replaces. A sample younger than a second after the previous one replaces nothing
    /// (too short an interval).
    fn rates(&mut self, sample: Sample) -> Option<(String, String)> {
        let previous = match self.sample {
            Some(previous) if sample.at.duration_since(previous.at) < Duration::from_secs(1) => {
                Some(previous)
            }
            _ => self.sample.replace(sample),
        };
        previous.and_then(|previous| status::rates(previous, sample))
    }
}

/// Why a `JobQueue` reconcile failed; all of these are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue's NATS server cannot be reached.
    #[error("NATS at {url} is unreachable")]
    NatsUnavailable {
        /// The server URL.
        url: String,
    },
    /// A JetStream call failed.
    #[error(transparent)]
    Assets(#[from] AssetsError),
    /// Writing the status failed.
    #[error("cannot write status: {0}")]
    Status(#[source] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// Static label for the error metric.
    fn label(&self) -> &'static str {
        match self {
            Self::NatsUnavailable { .. } => "nats_unavailable",
            Self::Assets(e) if e.is_unavailable() => "nats_unavailable",
            Self::Assets(_) => "jetstream",
            Self::Status(_) => "kube",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

/// The spec holds a value the operator cannot use ([`validate`]); waits for a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(String);

/// Why the queue's NATS server cannot be used ([`connect`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// `spec.nats.url` cannot be used; waits for a change.
    #[error("{0}")]
    InvalidUrl(String),
    /// NATS refused the credentials, or a credentials Secret is missing.
    #[error("{0}")]
    Auth(String),
    /// The TLS handshake or setup failed, or a TLS Secret is missing.
    #[error("{0}")]
    Tls(String),
    /// The server does not answer.
    #[error("cannot reach NATS")]
    Unreachable,
}

/// Where a reconcile stopped short of a ready queue.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Assets(#[from] AssetsError),
}

/// A `JobQueue` as stored: one whose JSON does not fit [`JobQueue`] (written before a schema
/// change, or past validation) is an `Err` with its metadata, so it does not fail the whole
/// list and stall the watch for the others.
pub type Stored = DeserializeGuard<JobQueue>;

/// The JobQueue controller, and a cache of the well-formed queues for the scaler, the
/// dispatcher, the rate limiter and the dashboard. Both come from one watch
/// ([`guarded::controller`]).
pub fn controller(ctx: &Context) -> (Controller<Stored>, Store<JobQueue>) {
    let api: Api<Stored> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    guarded::controller(api, trigger)
}

/// Runs `controller` until `shutdown` resolves, with states of its own.
pub async fn run(
    controller: Controller<Stored>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let queues = Arc::new(Queues::new(ctx));
    let store = controller.store();
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, queues.clone())
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(%err, "jobqueue reconcile ended with an error");
            }
            // Queues deleted without a cleanup seen here (a finalizer removed by hand).
            queues
                .states
                .prune(|key| store.get(&guarded::typed(key)).is_some());
            std::future::ready(())
        })
        .await;
}

/// Reconciles one `JobQueue` (through the finalizer, so deletion runs [`cleanup`]); a
/// malformed one is reported on the object and left alone until it changes.
#[instrument(skip(stored, queues), fields(namespace = stored.namespace(), name = stored.name_any()))]
pub async fn reconcile(stored: Arc<Stored>, queues: Arc<Queues>) -> Result<Action, Error> {
    let ctx = &queues.ctx;
    let kept = format!(
        "its streams ({} and the others of the queue) are kept, as with deletionPolicy: Retain",
        QueueRef::new(stored.namespace().unwrap_or_default(), stored.name_any()).stream()
    );
    let released = guarded::let_go(&stored, FINALIZER, &kept, ctx).await;
    if released.map_err(|err| Error::Finalizer(Box::new(finalizer::Error::RemoveFinalizer(err))))? {
        return Ok(Action::await_change());
    }
    let Some(jq) = guarded::report(&stored, CONTROLLER, ctx).await else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let ns = jq.namespace().unwrap_or_default();
    let api: Api<JobQueue> = Api::namespaced(ctx.client.clone(), &ns);
    if jq.meta().deletion_timestamp.is_none() && !jq.finalizers().iter().any(|f| f == FINALIZER) {
        let result = add_finalizer(&api, &jq).await;
        ctx.metrics.reconciled(CONTROLLER, started.elapsed());
        // The update triggers the next reconcile.
        return result.map(|()| Action::await_change());
    }
    let result = finalizer::finalizer(&api, FINALIZER, jq.clone(), |event| async {
        match event {
            Finalizer::Apply(jq) => apply(&jq, &api, &queues).await,
            Finalizer::Cleanup(jq) => cleanup(&jq, &queues).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() && jq.meta().deletion_timestamp.is_none() {
        queues.states.succeeded(&jq);
    }
    result
}

/// Adds [`FINALIZER`] with a merge patch guarded by the `resourceVersion` that was read (a
/// concurrent change makes it fail with 409 and retry). kube-runtime's helper would do this with
/// a JSON-patch `test` of a missing `/metadata/finalizers` against `null`, which the Kubernetes
/// test double rejects; removal still goes through the helper.
async fn add_finalizer(api: &Api<JobQueue>, jq: &JobQueue) -> Result<(), Error> {
    let mut finalizers = jq.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": jq.resource_version()}
    });
    api.patch(
        &jq.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|err| Error::Finalizer(Box::new(finalizer::Error::AddFinalizer(err))))
}

/// Retries transient errors with per-object exponential backoff (capped at the resync period).
pub fn error_policy(stored: Arc<Stored>, err: &Error, queues: Arc<Queues>) -> Action {
    queues.ctx.metrics.failed(CONTROLLER, err.label());
    let delay = match &stored.0 {
        Ok(jq) => queues.states.backoff(jq, queues.ctx.config.resync),
        Err(_) => queues.ctx.config.resync,
    };
    tracing::warn!(%err, ?delay, name = stored.name_any(), "jobqueue reconcile failed, retrying");
    Action::requeue(delay)
}

fn queue_ref(jq: &JobQueue) -> QueueRef {
    QueueRef::new(jq.namespace().unwrap_or_default(), jq.name_any())
}

/// How often a ready queue's figures are refreshed at most (the resync when shorter).
const STATUS_REFRESH: Duration = Duration::from_secs(5);

/// `spec.alerts` as thresholds.
fn thresholds(jq: &JobQueue) -> Result<Thresholds, conveyor_crds::duration::DurationError> {
    let (window, max_age) = jq.spec.alert_durations()?;
    let alerts = &jq.spec.alerts;
    Ok(Thresholds {
        max_pending: alerts.max_pending.map(|n| u64::try_from(n).unwrap_or(0)),
        max_age,
        max_failures: u64::try_from(alerts.max_failures).unwrap_or(0),
        window,
    })
}

/// Step 1 (pure): the spec as the queue's JetStream assets, or why it cannot be used.
pub fn validate(jq: &JobQueue) -> Result<QueueAssets, InvalidSpec> {
    thresholds(jq).map_err(|e| InvalidSpec(e.to_string()))?;
    assets::desired(&queue_ref(jq), &jq.spec).map_err(|e| InvalidSpec(e.to_string()))
}

/// The queue's NATS server, connected with the queue's own options.
pub struct Connection {
    /// JetStream on the server.
    pub js: jetstream::Context,
    /// The identity of the queue's own credentials, if it has any.
    pub identity: Option<String>,
}

/// Step 2: connects to the queue's NATS server (its own Secrets read afresh, so a rotated one
/// is used at once).
pub async fn connect(jq: &JobQueue, ctx: &Context) -> Result<Connection, ConnectError> {
    let url = jq.spec.nats.as_ref().map(|n| n.url.as_str());
    let options = secret_options(jq, ctx).await?;
    let identity = options.as_ref().map(|(id, _)| id.clone());
    let own = options.as_ref().map(|(id, o)| (id.as_str(), o.clone()));
    match ctx.nats.connected_with(url, own).await {
        Err(err) => Err(ConnectError::InvalidUrl(err.to_string())),
        Ok(Some(js)) => Ok(Connection { js, identity }),
        Ok(None) => match ctx.nats.failure(url, identity.as_deref()).await {
            (FailureKind::Auth, message) => Err(ConnectError::Auth(message)),
            (FailureKind::Tls, message) => Err(ConnectError::Tls(message)),
            (FailureKind::Unreachable, _) => Err(ConnectError::Unreachable),
        },
    }
}

/// Step 3: the assets as `desired` says, and the queue's figures. Ensures them (creating or
/// updating every stream and consumer) only when the spec's generation or the server changed
/// since they were last ensured, or when one of them went missing; else only reads.
async fn converge(
    jq: &JobQueue,
    connection: &Connection,
    desired: &QueueAssets,
    state: &mut QueueState,
) -> Result<assets::Figures, AssetsError> {
    let wanted = Ensured {
        generation: jq.meta().generation,
        url: jq.spec.nats.as_ref().map(|n| n.url.clone()),
        identity: connection.identity.clone(),
    };
    if state.ensured.as_ref() == Some(&wanted) {
        match observe::existing_figures(&connection.js, desired).await {
            Ok(Some(figures)) => return Ok(figures),
            Ok(None) => {
                tracing::info!(stream = %desired.queue.stream(), "assets went missing; ensuring them again")
            }
            Err(err) => tracing::debug!(%err, "cannot read the assets; ensuring them"),
        }
    }
    state.ensured = None;
    let figures = assets::ensure(&connection.js, desired).await?;
    state.ensured = Some(wanted);
    Ok(figures)
}

/// Step 5: what the queue's streams say beyond the consumer figures (rates against the last
/// sample in `state`), also into the metrics; `None` when they cannot be read this time.
async fn observe(
    js: &jetstream::Context,
    queue: &QueueRef,
    state: &mut QueueState,
    ctx: &Context,
) -> Option<Health> {
    match observe::health(js, queue, now(), state.tail.take()).await {
        Ok((mut health, tail)) => {
            state.tail = Some(tail);
            health.rates = state.rates(Sample {
                at: Instant::now(),
                counters: health.counters,
            });
            ctx.metrics.observe_queue(queue, &health);
            Some(health)
        }
        Err(err) => {
            tracing::warn!(%err, "cannot read the queue's health figures");
            None
        }
    }
}

/// Step 6 (pure): what a reconcile that stopped short means for the status, and what the
/// controller does next: an unusable URL waits for a change (`Ok`), everything else is
/// retried.
fn settle(stopped: Stopped, shown_url: &str) -> (Outcome, Result<(), Error>) {
    let retry = || {
        Err(Error::NatsUnavailable {
            url: shown_url.to_owned(),
        })
    };
    match stopped {
        Stopped::Connect(ConnectError::InvalidUrl(m)) => (Outcome::Invalid(m), Ok(())),
        Stopped::Connect(ConnectError::Auth(m)) => (Outcome::AuthFailed(m), retry()),
        Stopped::Connect(ConnectError::Tls(m)) => (Outcome::TlsFailed(m), retry()),
        Stopped::Connect(ConnectError::Unreachable) => (
            Outcome::Unavailable(format!("cannot reach NATS at {shown_url}; retrying")),
            retry(),
        ),
        Stopped::Assets(err) if err.is_unavailable() => {
            (Outcome::Unavailable(err.to_string()), Err(err.into()))
        }
        Stopped::Assets(err) => (Outcome::Failed(err.to_string()), Err(err.into())),
    }
}

/// Step 6 (pure): the status for `outcome`, with the dead-letter request handled this time.
fn desired_status(
    jq: &JobQueue,
    outcome: &Outcome,
    request: Option<DeadLetterRequest>,
    shown_url: String,
    now: k8s_openapi::jiff::Timestamp,
) -> JobQueueStatus {
    let mut new = compute_status(
        jq.status.as_ref(),
        jq.meta().generation,
        &queue_ref(jq),
        jq.spec.priorities,
        &thresholds(jq).unwrap_or_default(),
        outcome,
        now,
    );
    if request.is_some() {
        new.last_dead_letter_request = request;
    }
    new.nats_url = Some(shown_url);
    new
}

async fn apply(jq: &JobQueue, api: &Api<JobQueue>, queues: &Queues) -> Result<Action, Error> {
    let ctx = &queues.ctx;
    let refresh = ctx.config.resync.min(STATUS_REFRESH);
    let mut state = queues.states.with(jq, std::mem::take);
    let result = pipeline(jq, api, ctx, &mut state).await;
    queues.states.with(jq, |s| *s = state);
    result.map(|ready| {
        if ready {
            Action::requeue(refresh)
        } else {
            Action::await_change()
        }
    })
}

/// Steps 1 to 7 of one reconcile; whether the queue is ready (`false`: waits for a change).
async fn pipeline(
    jq: &JobQueue,
    api: &Api<JobQueue>,
    ctx: &Context,
    state: &mut QueueState,
) -> Result<bool, Error> {
    let queue = queue_ref(jq);
    let url = jq.spec.nats.as_ref().map(|n| n.url.as_str());
    let shown_url = ctx.nats.shown_url(url);
    let mut request = None;
    let (outcome, ready) = match validate(jq) {
        Err(InvalidSpec(message)) => (Outcome::Invalid(message), Ok(false)),
        Ok(desired) => {
            let ready = async {
                let connection = connect(jq, ctx).await?;
                let figures = converge(jq, &connection, &desired, state).await?;
                ctx.nats.assign(&queue, url, connection.identity.as_deref());
                // Step 4: the dead-letter requests annotated, each with its own Event.
                request = dlq_requests::handle(
                    jq,
                    api,
                    ctx,
                    &connection.js,
                    &queue,
                    now(),
                    &mut state.handled,
                )
                .await;
                let health = observe(&connection.js, &queue, state, ctx).await;
                Ok::<_, Stopped>(Observed { figures, health })
            };
            match ready.await {
                Ok(observed) => (Outcome::Ready(observed), Ok(true)),
                Err(stopped) => {
                    let (outcome, next) = settle(stopped, &shown_url);
                    (outcome, next.map(|()| false))
                }
            }
        }
    };
    let now = now();
    let new = desired_status(jq, &outcome, request, shown_url, now);
    let fresh = matches!(outcome, Outcome::Ready(_));
    report(jq, api, ctx, new, fresh, now).await?;
    ready
}

/// Step 7: the Events the status change deserves, then the status write (when worth one).
async fn report(
    jq: &JobQueue,
    api: &Api<JobQueue>,
    ctx: &Context,
    new: JobQueueStatus,
    fresh: bool,
    now: k8s_openapi::jiff::Timestamp,
) -> Result<(), Error> {
    for notice in notices(jq.status.as_ref(), &new) {
        let type_ = if notice.normal {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(jq, type_, notice.reason, notice.note).await;
    }
    if let Some(status) = status::to_write(jq.status.as_ref(), new, fresh, now) {
        write_status(api, jq, &status)
            .await
            .map_err(Error::Status)?;
    }
    Ok(())
}

async fn write_status(
    api: &Api<JobQueue>,
    jq: &JobQueue,
    status: &JobQueueStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "apiVersion": JobQueue::api_version(&()),
        "kind": JobQueue::kind(&()),
        "status": status,
    });
    api.patch_status(
        &jq.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// [`secret_options`] with a refusal as the matching failure outcome (for the schedule
/// controller, which connects to its queue's server the same way).
pub(crate) async fn nats_options(
    jq: &JobQueue,
    ctx: &Context,
) -> Result<Option<(String, NatsOptions)>, Outcome> {
    secret_options(jq, ctx).await.map_err(|err| match err {
        ConnectError::Tls(m) => Outcome::TlsFailed(m),
        other => Outcome::AuthFailed(other.to_string()),
    })
}

/// The queue's own connection options when `spec.nats` names Secrets (read through the API
/// each reconcile, so an updated Secret rotates the operator's client); `None` for the plain
/// URL. A missing or unusable Secret is an [`ConnectError::Auth`] or [`ConnectError::Tls`].
async fn secret_options(
    jq: &JobQueue,
    ctx: &Context,
) -> Result<Option<(String, NatsOptions)>, ConnectError> {
    let Some(nats) = jq.spec.nats.as_ref() else {
        return Ok(None);
    };
    if nats.credentials_secret.is_none() && nats.tls_secret.is_none() {
        return Ok(None);
    }
    let ns = jq.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let read = |name: Option<String>, tls: bool| {
        let secrets = secrets.clone();
        let ns = ns.clone();
        async move {
            let Some(name) = name else {
                return Ok(None);
            };
            let refused = |m: String| {
                if tls {
                    ConnectError::Tls(m)
                } else {
                    ConnectError::Auth(m)
                }
            };
            match secrets.get_opt(&name).await {
                Ok(Some(secret)) => Ok(Some(
                    secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect::<BTreeMap<_, _>>(),
                )),
                Ok(None) => Err(refused(format!("Secret {ns}/{name} does not exist"))),
                Err(err) => Err(refused(format!("cannot read Secret {ns}/{name}: {err}"))),
            }
        }
    };
    let credentials = read(nats.credentials_secret.clone(), false).await?;
    let tls = read(nats.tls_secret.clone(), true).await?;
    let identity = format!(
        "{ns}/{}/{}",
        nats.credentials_secret.as_deref().unwrap_or_default(),
        nats.tls_secret.as_deref().unwrap_or_default()
    );
    crate::nats::queue_options(&nats.url, credentials.as_ref(), tls.as_ref())
        .map(|options| Some((identity, options)))
        .map_err(|err| {
            let message = conveyor::connect::redact_text(&err.to_string());
            if credentials.is_some() {
                ConnectError::Auth(message)
            } else {
                ConnectError::Tls(message)
            }
        })
}

/// Deletes the JetStream assets under `deletionPolicy: Delete`; keeps them (and needs no NATS)
/// under `Retain`. Forgets the queue's state first.
async fn cleanup(jq: &JobQueue, queues: &Queues) -> Result<Action, Error> {
    let ctx = &queues.ctx;
    let queue = queue_ref(jq);
    queues.states.forget(jq);
    ctx.nats.unassign(&queue);
    if jq.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(stream = %queue.stream(), "queue deleted, streams retained");
        return Ok(Action::await_change());
    }
    let url = jq.spec.nats.as_ref().map(|n| n.url.as_str());
    let options = secret_options(jq, ctx).await.ok().flatten();
    let own = options.as_ref().map(|(id, o)| (id.as_str(), o.clone()));
    let js = match ctx.nats.connected_with(url, own).await {
        // A URL that does not parse never had assets to delete.
        Err(_) => return Ok(Action::await_change()),
        Ok(None) => {
            let url = ctx.nats.shown_url(url);
            ctx.event(
                jq,
                EventType::Warning,
                reasons::NATS_UNAVAILABLE,
                format!("cannot delete streams: NATS at {url} is unreachable; retrying"),
            )
            .await;
            return Err(Error::NatsUnavailable { url });
        }
        Ok(Some(js)) => js,
    };
    assets::delete(&js, &queue).await?;
    Ok(Action::await_change())
}

fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(spec: &str) -> JobQueue {
        let mut q = JobQueue::new("hello", serde_yaml::from_str(spec).unwrap());
        q.metadata.namespace = Some("team".into());
        q.metadata.generation = Some(1);
        q
    }

    const SPEC: &str = "{priorities: 2, timeout: 30s}";

    #[test]
    fn validation_turns_the_spec_into_assets_or_says_what_is_wrong() {
        let assets = validate(&queue(SPEC)).unwrap();
        assert_eq!(assets.stream.name, QueueRef::new("team", "hello").stream());
        assert_eq!(assets.consumers.len(), 2);
        let bad_window = validate(&queue("{alerts: {failureWindow: soon}}")).unwrap_err();
        assert!(bad_window.0.contains("soon"), "{bad_window}");
        let bad_timeout = validate(&queue("{timeout: forever}")).unwrap_err();
        assert!(bad_timeout.0.contains("forever"), "{bad_timeout}");
    }

    #[test]
    fn stopping_short_maps_to_an_outcome_and_what_comes_next() {
        let url = "nats://nats:4222";
        let (outcome, next) = settle(ConnectError::InvalidUrl("bad".into()).into(), url);
        assert_eq!(outcome, Outcome::Invalid("bad".into()));
        assert!(next.is_ok(), "an unusable URL waits for a change");
        let (outcome, next) = settle(ConnectError::Auth("denied".into()).into(), url);
        assert_eq!(outcome, Outcome::AuthFailed("denied".into()));
        assert!(matches!(next, Err(Error::NatsUnavailable { .. })));
        let (outcome, _) = settle(ConnectError::Tls("handshake".into()).into(), url);
        assert_eq!(outcome, Outcome::TlsFailed("handshake".into()));
        let (outcome, next) = settle(ConnectError::Unreachable.into(), url);
        assert_eq!(
            outcome,
            Outcome::Unavailable(format!("cannot reach NATS at {url}; retrying"))
        );
        assert!(matches!(next, Err(Error::NatsUnavailable { url: u }) if u == url));
    }

    #[test]
    fn only_what_the_reconcile_acts_on_triggers_one() {
        let stored = |q: &JobQueue| trigger(&DeserializeGuard(Ok(q.clone())));
        let q = queue(SPEC);
        let before = stored(&q);
        let mut written = q.clone();
        written.status = Some(JobQueueStatus {
            pending: Some(7),
            ..Default::default()
        });
        written.metadata.resource_version = Some("42".into());
        assert_eq!(stored(&written), before, "the operator's own status write");
        let mut changed = q.clone();
        changed.metadata.generation = Some(2);
        assert_ne!(stored(&changed), before, "a spec change");
        let mut asked = q.clone();
        asked
            .annotations_mut()
            .insert(dlq_requests::REQUEUE_ANNOTATION.into(), "all".into());
        assert_ne!(stored(&asked), before, "a dead-letter request");
        let mut guarded = q.clone();
        guarded.finalizers_mut().push(FINALIZER.into());
        assert_ne!(stored(&guarded), before, "the finalizer added");
        let mut deleted = guarded.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        assert_ne!(stored(&deleted), stored(&guarded), "a deletion");
    }

    #[test]
    fn rates_need_a_second_between_samples() {
        let t0 = Instant::now();
        let sample = |ms: u64, submitted: u64| Sample {
            at: t0 + Duration::from_millis(ms),
            counters: status::Counters {
                submitted,
                stored: 0,
            },
        };
        let mut state = QueueState::default();
        assert_eq!(state.rates(sample(0, 0)), None, "nothing to compare with");
        assert_eq!(
            state.rates(sample(500, 10)),
            None,
            "half a second is too short"
        );
        assert_eq!(state.sample, Some(sample(0, 0)), "the older sample is kept");
        assert!(state.rates(sample(2_000, 40)).is_some());
        assert_eq!(state.sample, Some(sample(2_000, 40)));
    }
}
