//! The `JobQueue` controller: keeps a queue's JetStream assets in line with its spec, reports
//! `Ready`, `Backlogged` and `JobsFailing` with the queue's figures and recent failures in the
//! status (refreshed every few seconds, written at most every [`STATUS_THROTTLE`] unless a
//! condition flips), raises Events on condition transitions only, and deletes or keeps the
//! assets when the resource goes away (finalizer [`FINALIZER`], `spec.deletionPolicy`).

mod dlq_requests;
mod observe;
mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use conveyor::connect::{FailureKind, NatsOptions};
use k8s_openapi::api::core::v1::Secret;

use conveyor::names::QueueRef;
use conveyor_crds::{DeletionPolicy, JobQueue, JobQueueStatus};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::assets::{self, AssetsError};
use crate::conditions::reason;
use crate::context::{Context, FIELD_MANAGER};
pub use observe::Tail;
pub use status::{
    Health, Observed, Outcome, STATUS_THROTTLE, Sample, Thresholds, compute_status, notices,
};

/// Finalizer that guards the JetStream assets of a queue.
pub const FINALIZER: &str = "conveyor.dev/jetstream";
const CONTROLLER: &str = "jobqueue";

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

/// The JobQueue controller (its cache also feeds the scaler).
pub fn controller(ctx: &Context) -> Controller<JobQueue> {
    let api: Api<JobQueue> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(api, watcher::Config::default())
}

/// Runs `controller` until `shutdown` resolves.
pub async fn run(
    controller: Controller<JobQueue>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "jobqueue reconcile ended with an error");
            }
        })
        .await;
}

fn key(jq: &JobQueue) -> String {
    format!(
        "jobqueue/{}/{}",
        jq.namespace().unwrap_or_default(),
        jq.name_any()
    )
}

/// Reconciles one `JobQueue` (through the finalizer, so deletion runs [`cleanup`]).
#[instrument(skip(jq, ctx), fields(namespace = jq.namespace(), name = jq.name_any()))]
pub async fn reconcile(jq: Arc<JobQueue>, ctx: Arc<Context>) -> Result<Action, Error> {
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
            Finalizer::Apply(jq) => apply(&jq, &api, &ctx).await,
            Finalizer::Cleanup(jq) => cleanup(&jq, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key(&jq));
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
pub fn error_policy(jq: Arc<JobQueue>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(CONTROLLER, err.label());
    let delay = ctx.backoff(key(&jq));
    tracing::warn!(%err, ?delay, name = jq.name_any(), "jobqueue reconcile failed, retrying");
    Action::requeue(delay)
}

fn queue_ref(jq: &JobQueue) -> QueueRef {
    QueueRef::new(jq.namespace().unwrap_or_default(), jq.name_any())
}

/// How often a ready queue's figures are refreshed at most (the resync when shorter).
const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

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

async fn apply(jq: &JobQueue, api: &Api<JobQueue>, ctx: &Context) -> Result<Action, Error> {
    let queue = queue_ref(jq);
    let url = jq.spec.nats.as_ref().map(|n| n.url.as_str());
    let shown_url = ctx.nats.shown_url(url);
    let limits = thresholds(jq);
    let desired = limits
        .as_ref()
        .map_err(ToString::to_string)
        .and_then(|_| assets::desired(&queue, &jq.spec).map_err(|e| e.to_string()));
    let mut request = None;
    let retry = || {
        Err(Error::NatsUnavailable {
            url: shown_url.clone(),
        })
    };
    let options = nats_options(jq, ctx).await;
    let identity = options
        .as_ref()
        .ok()
        .and_then(|o| o.as_ref().map(|(id, _)| id.clone()));
    let (outcome, result) = match (desired, options) {
        (Err(err), _) => (Outcome::Invalid(err), Ok(Action::await_change())),
        (Ok(_), Err(refused)) => (refused, retry()),
        (Ok(desired), Ok(options)) => match ctx
            .nats
            .connected_with(
                url,
                options.as_ref().map(|(id, o)| (id.as_str(), o.clone())),
            )
            .await
        {
            Err(err) => (
                Outcome::Invalid(err.to_string()),
                Ok(Action::await_change()),
            ),
            Ok(None) => match ctx.nats.failure(url, identity.as_deref()).await {
                (FailureKind::Auth, message) => (Outcome::AuthFailed(message), retry()),
                (FailureKind::Tls, message) => (Outcome::TlsFailed(message), retry()),
                (FailureKind::Unreachable, _) => (
                    Outcome::Unavailable(format!("cannot reach NATS at {shown_url}; retrying")),
                    retry(),
                ),
            },
            Ok(Some(js)) => match assets::ensure(&js, &desired).await {
                Ok(figures) => {
                    ctx.nats.assign(&queue, url, identity.as_deref());
                    request = dlq_requests::handle(jq, api, ctx, &js, &queue, now()).await;
                    let previous = ctx.take_tail(&key(jq));
                    let health = match observe::health(&js, &queue, now(), previous).await {
                        Ok((mut health, tail)) => {
                            ctx.keep_tail(key(jq), tail);
                            let sample = status::Sample {
                                at: std::time::Instant::now(),
                                counters: health.counters,
                            };
                            health.rates = ctx
                                .previous_sample(key(jq), sample)
                                .and_then(|previous| status::rates(previous, sample));
                            ctx.metrics.observe_queue(&queue, &health);
                            Some(health)
                        }
                        Err(err) => {
                            tracing::warn!(%err, "cannot read the queue's health figures");
                            None
                        }
                    };
                    (
                        Outcome::Ready(Observed { figures, health }),
                        Ok(Action::requeue(ctx.config.resync.min(STATUS_REFRESH))),
                    )
                }
                Err(err) if err.is_unavailable() => {
                    (Outcome::Unavailable(err.to_string()), Err(err.into()))
                }
                Err(err) => (Outcome::Failed(err.to_string()), Err(err.into())),
            },
        },
    };
    let levels = jq.spec.priorities;
    let now = now();
    let mut new = compute_status(
        jq.status.as_ref(),
        jq.meta().generation,
        &queue,
        levels,
        &limits.unwrap_or_default(),
        &outcome,
        now,
    );
    if request.is_some() {
        new.last_dead_letter_request = request;
    }
    new.nats_url = Some(shown_url);
    for notice in notices(jq.status.as_ref(), &new) {
        let type_ = if notice.normal {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(jq, type_, notice.reason, notice.note).await;
    }
    let fresh = matches!(outcome, Outcome::Ready(_));
    if let Some(status) = status::to_write(jq.status.as_ref(), new, fresh, now) {
        write_status(api, jq, &status)
            .await
            .map_err(Error::Status)?;
    }
    result
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

/// The queue's own connection options when `spec.nats` names Secrets (read through the API
/// each reconcile, so an updated Secret rotates the operator's client); `None` for the plain
/// URL. A missing or unusable Secret is the matching failure outcome.
pub(crate) async fn nats_options(
    jq: &JobQueue,
    ctx: &Context,
) -> Result<Option<(String, NatsOptions)>, Outcome> {
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
                    Outcome::TlsFailed(m)
                } else {
                    Outcome::AuthFailed(m)
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
                Outcome::AuthFailed(message)
            } else {
                Outcome::TlsFailed(message)
            }
        })
}

/// Deletes the JetStream assets under `deletionPolicy: Delete`; keeps them (and needs no NATS)
/// under `Retain`.
async fn cleanup(jq: &JobQueue, ctx: &Context) -> Result<Action, Error> {
    let queue = queue_ref(jq);
    ctx.forget_queue(&key(jq), &jq.uid().unwrap_or_default());
    ctx.nats.unassign(&queue_ref(jq));
    if jq.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(stream = %queue.stream(), "queue deleted, streams retained");
        return Ok(Action::await_change());
    }
    let url = jq.spec.nats.as_ref().map(|n| n.url.as_str());
    let options = nats_options(jq, ctx).await.ok().flatten();
    let own = options.as_ref().map(|(id, o)| (id.as_str(), o.clone()));
    let js = match ctx.nats.connected_with(url, own).await {
        // A URL that does not parse never had assets to delete.
        Err(_) => return Ok(Action::await_change()),
        Ok(None) => {
            let url = ctx.nats.shown_url(url);
            ctx.event(
                jq,
                EventType::Warning,
                reason::NATS_UNAVAILABLE,
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
