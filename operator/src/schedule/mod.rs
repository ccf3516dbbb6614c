//! The `JobSchedule` controller: turns a schedule into a NATS message schedule in its queue's
//! delayed stream (`conveyor::schedule`), so the NATS server submits the runs, also while the
//! operator is down; removes it while `suspend` is set and when the resource is deleted
//! (finalizer [`FINALIZER`]); and reports `Ready`, the last run the server wrote and the next
//! one in the status, with Events for `Ready` transitions and runs. Under `concurrencyPolicy:
//! Allow` without a `startingDeadline` the operator never submits a run itself; otherwise the
//! server writes each slot where only the operator reads it, and the operator submits the run
//! (or skips it, or cancels the previous one) once per slot (`status.lastHandled`), with the
//! job id `<name>@<slot>` as `Nats-Msg-Id`, so a restart of the operator cannot double a run;
//! slots that went by while it was down are counted in `status.missedRuns`, and the newest
//! runs only if it is within `startingDeadline`.

mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::names::QueueRef;
use conveyor::schedule::{self, ScheduleMessage};
use conveyor_crds::{ConcurrencyPolicy, JobQueue, JobSchedule, JobScheduleStatus};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::predicates;
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::context::{Context, FIELD_MANAGER, Shared};
use crate::guarded;
use crate::jobqueue::Outcome as QueueOutcome;
pub use status::{Desired, Found, Notice, Problem, compute_status, event, reason};

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
    /// Reading the status afresh failed.
    #[error("cannot read the JobSchedule's status: {0}")]
    ReadStatus(#[source] kube::Error),
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
            Self::Status(_) | Self::ReadStatus(_) => "kube",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

/// The JobSchedules (`K` is [`JobSchedule`] or [`Stored`]) the operator watches.
fn api<K>(ctx: &Context) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
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
            match api::<JobSchedule>(&ctx).list_metadata(&probe).await {
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
    let shared = Arc::new(Shared::new(ctx.clone()));
    // Every change triggers a reconcile, as a plain watch would.
    let trigger = predicates::resource_version;
    let (controller, _) = guarded::controller(api::<Stored>(&ctx), trigger);
    let store = controller.store();
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, shared.clone())
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(%err, "jobschedule reconcile ended with an error");
            }
            // Schedules deleted without a cleanup seen here (a finalizer removed by hand).
            shared
                .states
                .prune(|key| store.get(&guarded::typed(key)).is_some());
            std::future::ready(())
        })
        .await;
}

/// Shortest wait between two checks for the JobSchedule CRD.
const CRD_PROBE: Duration = Duration::from_secs(10);

/// A JobSchedule as stored: one that does not fit the type is an `Err`, so that it cannot stall
/// the watch of the others ([`guarded`]).
pub type Stored = DeserializeGuard<JobSchedule>;

/// What the schedule controller's reconciles share: the operator's context and each
/// schedule's own state (its consecutive failures, for the backoff).
pub type Schedules = Shared<JobSchedule, ()>;

/// Reconciles one `JobSchedule` (through the finalizer, so deletion runs [`cleanup`]); a
/// malformed one is reported on the object and left alone until it changes.
#[instrument(skip(stored, shared), fields(namespace = stored.namespace(), name = stored.name_any()))]
pub async fn reconcile(stored: Arc<Stored>, shared: Arc<Schedules>) -> Result<Action, Error> {
    let ctx = &shared.ctx;
    let Some(s) = guarded::report(&stored, CONTROLLER, ctx).await else {
        return Ok(Action::await_change());
    };
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
            Finalizer::Apply(s) => apply(&s, &api, ctx).await,
            Finalizer::Cleanup(s) => {
                let done = cleanup(&s, ctx).await;
                if done.is_ok() {
                    shared.states.forget(&s);
                }
                done
            }
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        shared.states.succeeded(&s);
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
pub fn error_policy(stored: Arc<Stored>, err: &Error, shared: Arc<Schedules>) -> Action {
    shared.ctx.metrics.failed(CONTROLLER, err.label());
    let delay = match &stored.0 {
        Ok(s) => shared.states.backoff(s, shared.ctx.config.resync),
        Err(_) => shared.ctx.config.resync,
    };
    tracing::warn!(%err, ?delay, name = stored.name_any(), "jobschedule reconcile failed, retrying");
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
    let desired = status::desired(&name, &s.spec);
    // Every status this reconcile writes builds on one read afresh, never on the cached object:
    // that may predate this operator's last write, and building on it would roll back
    // `lastHandled`, `lastRun` and `missedRuns` (then a slot already submitted would count as
    // missed, and under `Forbid` a run could be submitted over one still going).
    let mut base = api.get(&name).await.map_err(Error::ReadStatus)?.status;
    let (found, result) = match &desired {
        Err(problem) => (Err(problem.clone()), Ok(Action::await_change())),
        Ok(desired) => match connect(s, ctx).await {
            Err(Err(err)) => return Err(err),
            Err(Ok(problem)) => {
                // Polled at the resync period: a reconcile that ends well resets the backoff.
                let retry = Action::requeue(ctx.config.resync);
                (Err(problem), Ok(retry))
            }
            Ok((queue, js)) => {
                let on = On {
                    api,
                    queue: &queue,
                    js: &js,
                    now,
                };
                run_on(s, &name, &on, desired, ctx, &mut base).await
            }
        },
    };
    // On every path, errors too: `base` is the fresh read, or what `handle` wrote over it.
    let old = base.as_ref();
    let new = compute_status(old, s.meta().generation, &found, now);
    if old != Some(&new) {
        write_status(api, s, &new).await.map_err(Error::Status)?;
    }
    // Published once the status that records them is written: a failed write retries the
    // reconcile, which would tell them again.
    let mut notices = status::transitions(old, &new);
    if let Ok(found) = &found {
        notices.extend(found.notices.iter().cloned());
    }
    let by_server = desired
        .as_ref()
        .is_ok_and(|d| !held(s, d) && status::runs_have_events(&d.pattern));
    let last_id = |st: Option<&JobScheduleStatus>| {
        st.and_then(|st| st.last_run.as_ref())
            .map(|run| run.job_id.clone())
    };
    if by_server
        && let Some(id) = last_id(Some(&new))
        && last_id(old) != Some(id.clone())
    {
        notices.push(Notice::normal(
            event::RUN_SUBMITTED,
            format!("the NATS server submitted run {id}"),
        ));
    }
    for notice in notices {
        let type_ = if notice.normal {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(s, type_, notice.reason, notice.note).await;
    }
    result
}

/// Whether the operator submits the runs (the server writes each slot to the hold subject):
/// under `Forbid` and `Replace`, which must see the previous run, and with a
/// `startingDeadline`, which must see how late a run is.
fn held(s: &JobSchedule, desired: &Desired) -> bool {
    s.spec.concurrency_policy != ConcurrencyPolicy::Allow || desired.deadline.is_some()
}

/// Where [`run_on`] acts: the schedule's API, its queue and the queue's JetStream, at `now`.
struct On<'a> {
    api: &'a Api<JobSchedule>,
    queue: &'a JobQueue,
    js: &'a async_nats::jetstream::Context,
    now: k8s_openapi::jiff::Timestamp,
}

/// Puts the schedule on the queue's server (or removes it while suspended) and reads its last
/// run. Problems of the spec against the queue come back as `Err` in the first element.
/// `base` is the status read afresh; [`handle`] replaces it with what it writes.
async fn run_on(
    s: &JobSchedule,
    name: &str,
    on: &On<'_>,
    desired: &Desired,
    ctx: &Context,
    base: &mut Option<JobScheduleStatus>,
) -> (Result<Found, Problem>, Result<Action, Error>) {
    let (queue, js, now) = (on.queue, on.js, on.now);
    let queue_ref = QueueRef::new(s.namespace().unwrap_or_default(), queue.name_any());
    let (pattern, template) = (&desired.pattern, &desired.template);
    let held = held(s, desired);
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
        missed: 0,
        last_missed: None,
        notices: Vec::new(),
        handled: None,
        outcome: None,
    };
    match tick {
        Some(tick) if held && !s.spec.suspend => {
            let slot = Slot {
                queue: &queue_ref,
                level,
                since,
                now,
                window: protocol_duration(&queue.spec.deduplication_window),
            };
            let result = handle(s, on.api, js, desired, &slot, tick, &mut found, base).await;
            if let Err(err) = result {
                let problem = Problem::new(reason::SCHEDULE_ERROR, err.to_string());
                return (Err(problem), Err(err.into()));
            }
        }
        Some(tick) if !held => found.last = Some((tick.run, None)),
        _ => {}
    }
    let run = match &found.last {
        Some((run, sequence)) => Some((run.job_id.clone(), *sequence)),
        None => base
            .as_ref()
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
            d.saturating_add(Duration::from_millis(500))
                .min(ctx.config.resync.max(Duration::from_secs(1)))
        });
    (Ok(found), Ok(Action::requeue(wait)))
}

/// Where and when [`handle`] acts.
struct Slot<'a> {
    queue: &'a QueueRef,
    level: u8,
    /// When the stored schedule was written (`@every` slots count from then).
    since: Option<k8s_openapi::jiff::Timestamp>,
    now: k8s_openapi::jiff::Timestamp,
    /// The queue's `deduplicationWindow`.
    window: Option<Duration>,
}

fn protocol_duration(text: &str) -> Option<Duration> {
    conveyor::protocol::parse_duration(text)
}

/// Where the operator submits the runs: acts once on the newest held tick, if it is a slot not
/// handled yet. Counts the slots that went by since the last one handled (the server keeps
/// only the newest), skips the slot if it is older than `startingDeadline`, and under `Forbid`
/// or `Replace` looks at the previous run, which counts as active while the work stream still
/// holds it.
#[allow(clippy::too_many_arguments)]
async fn handle(
    s: &JobSchedule,
    api: &Api<JobSchedule>,
    js: &async_nats::jetstream::Context,
    desired: &Desired,
    at: &Slot<'_>,
    tick: schedule::Tick,
    found: &mut Found,
    base: &mut Option<JobScheduleStatus>,
) -> Result<(), schedule::StoreError> {
    // The status read afresh at the start of the reconcile: the cached object may predate this
    // operator's last status write, and a stale last run would let a run overlap the one just
    // submitted.
    let status = base.clone().unwrap_or_default();
    let id = tick.run.job_id.clone();
    if status.last_handled.as_deref() == Some(id.as_str()) {
        match status::handled_before(&status, &tick.run, at.now, at.window) {
            status::Handled::Recorded => {}
            status::Handled::Resubmit => {
                // Within the deduplication window of any earlier publish: a run that went out
                // is a duplicate (and gives its sequence), one that did not goes out now.
                let sequence = schedule::submit_tick(js, at.queue, at.level, &tick).await?;
                tracing::info!(run = %id, sequence, "recorded the run of a slot handled before");
                found.last = Some((tick.run, Some(sequence)));
            }
            status::Handled::Lost(why) => {
                tracing::info!(run = %id, %why, "not submitted again");
                found.missed = found.missed.saturating_add(1);
                found.last_missed = Some(format!("{id}: {why}"));
                found.notices.push(Notice::warning(
                    event::MISSED_RUNS,
                    format!("run {id}: {why}"),
                ));
            }
        }
        return Ok(());
    }
    found.handled = Some(id.clone());
    let name = s.name_any();
    let named = status::runs_have_events(&desired.pattern);

    let gone = at.since.map_or(0, |since| {
        status::gone_by(
            &desired.pattern,
            status.last_handled.as_deref(),
            tick.run.slot,
            since,
        )
    });
    if gone > 0 {
        let handled = status.last_handled.as_deref().unwrap_or_default();
        let at_least = if gone >= schedule::MAX_COUNTED_SLOTS {
            "at least "
        } else {
            ""
        };
        let newest = desired
            .pattern
            .slot_before(tick.run.slot)
            .map_or_else(|| id.clone(), |slot| schedule::job_id(&name, slot));
        found.missed = found.missed.saturating_add(gone);
        found.last_missed = Some(format!(
            "{newest}: {at_least}{gone} slot(s) after {handled} went by before the operator could submit them"
        ));
        // A fast schedule whose operator falls behind would say something new each second.
        let note = if named {
            format!(
                "{at_least}{gone} run(s) between {handled} and {id} were not submitted: the operator was not running (or fell behind), and the NATS server keeps only the newest slot"
            )
        } else {
            "slots went by before the operator could submit them (it was not running or fell behind); status.missedRuns counts them".to_owned()
        };
        found
            .notices
            .push(Notice::warning(event::MISSED_RUNS, note));
        tracing::info!(run = %id, gone, "slots went by before the operator could submit them");
    }

    if let Some(deadline) = desired.deadline {
        let late = at.now.duration_since(tick.run.slot);
        // One too long for a signed duration (none is: at most 3650d) is never passed, where
        // zero would skip every run.
        let deadline = k8s_openapi::jiff::SignedDuration::try_from(deadline)
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        if late > deadline {
            let why = format!(
                "{}s late, past startingDeadline {}",
                late.as_secs(),
                s.spec.starting_deadline.as_deref().unwrap_or_default()
            );
            found.missed = found.missed.saturating_add(1);
            found.last_missed = Some(format!("{id}: {why}"));
            let note = if named {
                format!("run {id} not submitted: {why}")
            } else {
                format!(
                    "a run was not submitted: past startingDeadline {}; status.lastMissed names the latest",
                    s.spec.starting_deadline.as_deref().unwrap_or_default()
                )
            };
            found
                .notices
                .push(Notice::warning(event::MISSED_RUNS, note));
            tracing::info!(run = %id, %why, "skipped: past the starting deadline");
            return Ok(());
        }
    }

    let previous = status
        .last_run
        .as_ref()
        .and_then(|run| run.sequence.map(|seq| (run.job_id.clone(), seq)));
    let active = match (&previous, s.spec.concurrency_policy) {
        (_, ConcurrencyPolicy::Allow) | (None, _) => false,
        (Some((_, seq)), _) => schedule::still_queued(js, at.queue, *seq).await?,
    };
    if active {
        let (previous_id, _) = previous.unwrap_or_default();
        match s.spec.concurrency_policy {
            ConcurrencyPolicy::Forbid => {
                tracing::info!(run = %id, previous = %previous_id, "skipped: the previous run is still queued or running");
                found.missed = found.missed.saturating_add(1);
                found.last_missed = Some(format!(
                    "{id}: the previous run {previous_id} was still queued or running"
                ));
                if named {
                    found.notices.push(Notice::normal(
                        event::RUN_SKIPPED,
                        format!(
                            "skipped run {id}: the previous run {previous_id} is still queued or running"
                        ),
                    ));
                }
                return Ok(());
            }
            _ => {
                let client = conveyor::Client::new(js.client());
                if let Err(err) = client.cancel(at.queue, &previous_id).await {
                    return Err(schedule::StoreError::Refused(format!(
                        "cannot cancel the previous run {previous_id}: {err}"
                    )));
                }
                tracing::info!(run = %id, previous = %previous_id, "cancelled the previous run to replace it");
                if named {
                    found.notices.push(Notice::normal(
                        event::RUN_REPLACED,
                        format!(
                            "cancelled run {previous_id} (still queued or running) to submit run {id}"
                        ),
                    ));
                }
            }
        }
    }
    // At most once per slot, also past the deduplication window: `lastHandled` is written
    // before the run goes out, so an operator that stops in between loses the run (the next
    // one counts it as missed) instead of submitting it again.
    let mut before = status;
    before.last_handled = Some(id.clone());
    before.missed_runs = before.missed_runs.saturating_add(found.missed);
    if found.last_missed.is_some() {
        before.last_missed = found.last_missed.take();
    }
    found.missed = 0;
    write_status(api, s, &before)
        .await
        .map_err(|err| schedule::StoreError::Unavailable(format!("cannot write status: {err}")))?;
    *base = Some(before);
    let sequence = schedule::submit_tick(js, at.queue, at.level, &tick).await?;
    if named {
        found.notices.push(Notice::normal(
            event::RUN_SUBMITTED,
            format!("submitted run {id}"),
        ));
    }
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
