//! The `JobSchedule` controller: turns a schedule into a NATS message schedule in its queue's
//! delayed stream (`conveyor::schedule`), so the NATS server submits the runs, also while the
//! operator is down; removes it while `suspend` is set and when the resource is deleted
//! (finalizer [`FINALIZER`]); and reports `Ready`, the last run the server wrote and the next
//! one in the status. Under `concurrencyPolicy: Allow` the operator never submits a run
//! itself; under `Forbid` and `Replace` the server writes each slot where only the operator
//! reads it, and the operator submits the run (or skips it, or cancels the previous one) once
//! per slot (`status.lastHandled`), with the job id `<name>@<slot>` as `Nats-Msg-Id`, so a
//! restart of the operator cannot double a run.

mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::names::QueueRef;
use conveyor::schedule::{self, Pattern, ScheduleMessage, Template};
use conveyor_crds::{ConcurrencyPolicy, JobQueue, JobSchedule, JobScheduleStatus};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::context::{Context, FIELD_MANAGER};
use crate::jobqueue::Outcome as QueueOutcome;
pub use status::{Found, Problem, compute_status, reason};

/// Finalizer that guards the schedule message in the queue's delayed stream.
pub const FINALIZER: &str = "conveyor.dev/schedule";
const CONTROLLER: &str = "jobschedule";

/// Why a `JobSchedule` reconcile failed; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the schedule's JobQueue failed.
    #[error("cannot read JobQueue {name}: {source}")]
    GetQueue {
        /// Queue name.
        name: String,
        /// Kubernetes error.
        source: kube::Error,
    },
    /// The queue's NATS server cannot be reached.
    #[error("NATS at {url} is unreachable")]
    NatsUnavailable {
        /// The server URL.
        url: String,
    },
    /// Reading or changing the schedule in JetStream failed.
    #[error(transparent)]
    Store(#[from] schedule::StoreError),
    /// Writing the status failed.
    #[error("cannot write status: {0}")]
    Status(#[source] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::GetQueue { .. } => "get_queue",
            Self::NatsUnavailable { .. } => "nats_unavailable",
            Self::Store(schedule::StoreError::Unavailable(_)) => "nats_unavailable",
            Self::Store(schedule::StoreError::Refused(_)) => "jetstream",
            Self::Status(_) => "kube",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

fn api(ctx: &Context) -> Api<JobSchedule> {
    match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
}

/// Runs the JobSchedule controller until `shutdown` resolves, once the API server serves
/// JobSchedules: a cluster with only the JobQueue and Worker CRDs installed (an older chart)
/// keeps the other controllers running, without a watch that fails every few seconds.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let served = async {
        let probe = kube::api::ListParams::default().limit(1);
        let mut said = false;
        loop {
            match api(&ctx).list_metadata(&probe).await {
                Ok(_) => return,
                Err(err) => {
                    if !said {
                        tracing::info!(%err, "JobSchedules are not served (CRD not installed?); checking again every {:?}", ctx.config.resync.max(CRD_PROBE));
                        said = true;
                    }
                }
            }
            tokio::time::sleep(ctx.config.resync.max(CRD_PROBE)).await;
        }
    };
    let mut shutdown = Box::pin(shutdown);
    tokio::select! {
        () = served => {}
        () = &mut shutdown => return,
    }
    Controller::new(api(&ctx), watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "jobschedule reconcile ended with an error");
            }
        })
        .await;
}

/// Shortest wait between two checks for the JobSchedule CRD.
const CRD_PROBE: Duration = Duration::from_secs(10);

fn key(s: &JobSchedule) -> String {
    format!(
        "jobschedule/{}/{}",
        s.namespace().unwrap_or_default(),
        s.name_any()
    )
}

/// Reconciles one `JobSchedule` (through the finalizer, so deletion runs [`cleanup`]).
#[instrument(skip(s, ctx), fields(namespace = s.namespace(), name = s.name_any()))]
pub async fn reconcile(s: Arc<JobSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = s.namespace().unwrap_or_default();
    let api: Api<JobSchedule> = Api::namespaced(ctx.client.clone(), &ns);
    if s.meta().deletion_timestamp.is_none() && !s.finalizers().iter().any(|f| f == FINALIZER) {
        let result = add_finalizer(&api, &s).await;
        ctx.metrics.reconciled(CONTROLLER, started.elapsed());
        return result.map(|()| Action::await_change());
    }
    let result = finalizer::finalizer(&api, FINALIZER, s.clone(), |event| async {
        match event {
            Finalizer::Apply(s) => apply(&s, &api, &ctx).await,
            Finalizer::Cleanup(s) => cleanup(&s, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key(&s));
    }
    result
}

/// Adds [`FINALIZER`] with a merge patch guarded by the `resourceVersion` that was read (the
/// same way, and for the same reason, as the JobQueue controller).
async fn add_finalizer(api: &Api<JobSchedule>, s: &JobSchedule) -> Result<(), Error> {
    let mut finalizers = s.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": s.resource_version()}
    });
    api.patch(
        &s.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|err| Error::Finalizer(Box::new(finalizer::Error::AddFinalizer(err))))
}

/// Retries transient errors with per-object exponential backoff (capped at the resync period).
pub fn error_policy(s: Arc<JobSchedule>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(CONTROLLER, err.label());
    let delay = ctx.backoff(key(&s));
    tracing::warn!(%err, ?delay, name = s.name_any(), "jobschedule reconcile failed, retrying");
    Action::requeue(delay)
}

/// The queue the runs go to, its NATS connection, or the problem that stops the schedule
/// there (`Err(Ok(problem))`) or a transient error (`Err(Err(error))`).
async fn connect(
    s: &JobSchedule,
    ctx: &Context,
) -> Result<(JobQueue, async_nats::jetstream::Context), Result<Problem, Error>> {
    let ns = s.namespace().unwrap_or_default();
    let queues: Api<JobQueue> = Api::namespaced(ctx.client.clone(), &ns);
    let name = &s.spec.job.queue;
    let queue = match queues.get_opt(name).await {
        Ok(Some(queue)) => queue,
        Ok(None) => {
            return Err(Ok(Problem::new(
                reason::QUEUE_NOT_FOUND,
                format!("JobQueue {name} does not exist in namespace {ns}"),
            )));
        }
        Err(source) => {
            return Err(Err(Error::GetQueue {
                name: name.clone(),
                source,
            }));
        }
    };
    let url = queue.spec.nats.as_ref().map(|n| n.url.as_str());
    let shown = ctx.nats.shown_url(url);
    let unavailable = |message: String| Err(Ok(Problem::new(reason::NATS_UNAVAILABLE, message)));
    let options = match crate::jobqueue::nats_options(&queue, ctx).await {
        Ok(options) => options,
        Err(QueueOutcome::AuthFailed(m) | QueueOutcome::TlsFailed(m)) => return unavailable(m),
        Err(_) => return unavailable(format!("cannot connect to NATS at {shown}")),
    };
    match ctx
        .nats
        .connected_with(
            url,
            options.as_ref().map(|(id, o)| (id.as_str(), o.clone())),
        )
        .await
    {
        Ok(Some(js)) => Ok((queue, js)),
        Ok(None) => unavailable(format!("cannot reach NATS at {shown}; retrying")),
        Err(err) => unavailable(err.to_string()),
    }
}

async fn apply(s: &JobSchedule, api: &Api<JobSchedule>, ctx: &Context) -> Result<Action, Error> {
    let name = s.name_any();
    let now = now();
    let (found, result) = match status::desired(&name, &s.spec) {
        Err(problem) => (Err(problem), Ok(Action::await_change())),
        Ok((pattern, template)) => match connect(s, ctx).await {
            Err(Err(err)) => return Err(err),
            Err(Ok(problem)) => {
                // Polled at the resync period: a reconcile that ends well resets the backoff.
                let retry = Action::requeue(ctx.config.resync);
                (Err(problem), Ok(retry))
            }
            Ok((queue, js)) => run_on(s, &name, &queue, &js, &pattern, &template, ctx, now).await,
        },
    };
    // The freshly read status when there is one (a skipped slot keeps the last run it saw).
    let old = match &found {
        Ok(f) => f.fresh.as_ref().or(s.status.as_ref()),
        Err(_) => s.status.as_ref(),
    };
    let new = compute_status(old, s.meta().generation, &found, now);
    if old != Some(&new) {
        write_status(api, s, &new).await.map_err(Error::Status)?;
    }
    result
}

/// Puts the schedule on the queue's server (or removes it while suspended) and reads its last
/// run. Problems of the spec against the queue come back as `Err` in the first element.
#[allow(clippy::too_many_arguments)]
async fn run_on(
    s: &JobSchedule,
    name: &str,
    queue: &JobQueue,
    js: &async_nats::jetstream::Context,
    pattern: &Pattern,
    template: &Template,
    ctx: &Context,
    now: k8s_openapi::jiff::Timestamp,
) -> (Result<Found, Problem>, Result<Action, Error>) {
    let queue_ref = QueueRef::new(s.namespace().unwrap_or_default(), queue.name_any());
    let held = s.spec.concurrency_policy != ConcurrencyPolicy::Allow;
    let message = ScheduleMessage::new(&queue_ref, name, pattern, template, held);
    if let Err(problem) = status::fits(&queue.spec, template, &message) {
        return (Err(problem), Ok(Action::await_change()));
    }
    let version = js.client().server_info().version;
    if let Err(err) = schedule::check_server_version(&version) {
        let problem = Problem::new(reason::UNSUPPORTED_SERVER, err.to_string());
        return (Err(problem), Ok(Action::requeue(ctx.config.resync)));
    }
    let stored = if s.spec.suspend {
        schedule::remove(js, &queue_ref, name).await.map(|_| None)
    } else {
        schedule::ensure(js, &queue_ref, &message).await.map(Some)
    };
    let since = match stored {
        Ok(since) => since,
        Err(schedule::StoreError::Refused(m)) => {
            let problem = Problem::new(reason::SCHEDULE_ERROR, m);
            return (Err(problem), Ok(Action::requeue(ctx.config.resync)));
        }
        Err(err) => {
            return (
                Err(Problem::new(reason::SCHEDULE_ERROR, err.to_string())),
                Err(err.into()),
            );
        }
    };
    let level = template.priority;
    let tick = match schedule::last_tick(js, &queue_ref, level, name, held).await {
        Ok(tick) => tick,
        Err(err) => {
            tracing::warn!(%err, "cannot read the schedule's last run");
            None
        }
    };
    let next = since
        .and_then(|since| status::next_run(pattern, tick.as_ref().map(|t| &t.run), since, now));
    let mut found = Found {
        subject: message.subject.clone(),
        suspended: s.spec.suspend,
        next,
        last: None,
        skipped: false,
        handled: None,
        outcome: None,
        fresh: None,
    };
    match tick {
        Some(tick) if held && !s.spec.suspend => {
            if let Err(err) = handle(s, ctx, js, &queue_ref, level, tick, &mut found).await {
                let problem = Problem::new(reason::SCHEDULE_ERROR, err.to_string());
                return (Err(problem), Err(err.into()));
            }
        }
        Some(tick) if !held => found.last = Some((tick.run, None)),
        _ => {}
    }
    let run = match &found.last {
        Some((run, sequence)) => Some((run.job_id.clone(), *sequence)),
        None => found
            .fresh
            .as_ref()
            .or(s.status.as_ref())
            .and_then(|st| st.last_run.as_ref())
            .map(|run| (run.job_id.clone(), run.sequence)),
    };
    if let Some((id, sequence)) = run {
        let results = queue.spec.results.is_some();
        found.outcome = outcome(js, &queue_ref, &id, sequence, results).await;
    }
    // Come back around the next run, to report it.
    let wait = found
        .next
        .and_then(|next| Duration::try_from(next.duration_since(now)).ok())
        .map_or(ctx.config.resync, |d| {
            (d + Duration::from_millis(500)).min(ctx.config.resync.max(Duration::from_secs(1)))
        });
    (Ok(found), Ok(Action::requeue(wait)))
}

/// Under `Forbid` or `Replace`: acts once on the newest held tick, if it is a slot not handled
/// yet. The previous run counts as active while the work stream still holds it.
async fn handle(
    s: &JobSchedule,
    ctx: &Context,
    js: &async_nats::jetstream::Context,
    queue: &QueueRef,
    level: u8,
    tick: schedule::Tick,
    found: &mut Found,
) -> Result<(), schedule::StoreError> {
    // Read afresh: the cached object may predate this operator's last status write, and a
    // stale last run would let a run overlap the one just submitted.
    let api: Api<JobSchedule> =
        Api::namespaced(ctx.client.clone(), &s.namespace().unwrap_or_default());
    let status = match api.get(&s.name_any()).await {
        Ok(fresh) => fresh.status.unwrap_or_default(),
        Err(err) => {
            return Err(schedule::StoreError::Unavailable(format!(
                "cannot read the JobSchedule's status: {err}"
            )));
        }
    };
    found.fresh = Some(status.clone());
    if status.last_handled.as_deref() == Some(tick.run.job_id.as_str()) {
        return Ok(());
    }
    let previous = status
        .last_run
        .as_ref()
        .and_then(|run| run.sequence.map(|seq| (run.job_id.clone(), seq)));
    let active = match &previous {
        Some((_, seq)) => schedule::still_queued(js, queue, *seq).await?,
        None => false,
    };
    found.handled = Some(tick.run.job_id.clone());
    if active {
        let (previous_id, _) = previous.unwrap_or_default();
        match s.spec.concurrency_policy {
            ConcurrencyPolicy::Forbid => {
                tracing::info!(run = %tick.run.job_id, previous = %previous_id, "skipped: the previous run is still queued or running");
                found.skipped = true;
                return Ok(());
            }
            _ => {
                let client = conveyor::Client::new(js.client());
                if let Err(err) = client.cancel(queue, &previous_id).await {
                    return Err(schedule::StoreError::Refused(format!(
                        "cannot cancel the previous run {previous_id}: {err}"
                    )));
                }
                tracing::info!(run = %tick.run.job_id, previous = %previous_id, "cancelled the previous run to replace it");
            }
        }
    }
    let sequence = schedule::submit_tick(js, queue, level, &tick).await?;
    found.last = Some((tick.run, Some(sequence)));
    Ok(())
}

/// What became of the run `id`: `Pending` while the work stream holds it (known by its
/// `sequence`), else its stored outcome (queues with `results.retention`), else `Finished`
/// when it is known to have left the work stream. Unknown (`None`) when NATS cannot tell.
async fn outcome(
    js: &async_nats::jetstream::Context,
    queue: &QueueRef,
    id: &str,
    sequence: Option<u64>,
    results: bool,
) -> Option<String> {
    if let Some(seq) = sequence
        && schedule::still_queued(js, queue, seq).await.ok()?
    {
        return Some("Pending".into());
    }
    if results {
        let client = conveyor::Client::new(js.client());
        if let Ok(Some(result)) = client.result(queue, id).await {
            let outcome = match result {
                conveyor::JobResult::Completed { .. } => "Completed",
                conveyor::JobResult::DeadLettered { .. } => "DeadLettered",
                conveyor::JobResult::Cancelled { .. } => "Cancelled",
            };
            return Some(outcome.into());
        }
    }
    sequence.map(|_| "Finished".into())
}

async fn write_status(
    api: &Api<JobSchedule>,
    s: &JobSchedule,
    status: &JobScheduleStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "apiVersion": JobSchedule::api_version(&()),
        "kind": JobSchedule::kind(&()),
        "status": status,
    });
    api.patch_status(
        &s.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// Removes the schedule from the queue's server. A queue that is gone took its streams (and
/// the schedule) with it, as did a URL that never worked.
async fn cleanup(s: &JobSchedule, ctx: &Context) -> Result<Action, Error> {
    match connect(s, ctx).await {
        Ok((queue, js)) => {
            let queue_ref = QueueRef::new(s.namespace().unwrap_or_default(), queue.name_any());
            schedule::remove(&js, &queue_ref, &s.name_any()).await?;
            Ok(Action::await_change())
        }
        Err(Ok(problem)) if problem.reason == reason::QUEUE_NOT_FOUND => Ok(Action::await_change()),
        Err(Ok(problem)) => Err(Error::NatsUnavailable {
            url: problem.message,
        }),
        Err(Err(err)) => Err(err),
    }
}

fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
