//! Jobs that wait for jobs: the release logic of dependencies and continuations, all state in
//! JetStream (see `docs/protocol.md`, "Dependencies and children").
//!
//! - A job with dependencies waits in its queue's waiting stream (`<prefix>.waiting.<hex id>`);
//!   the producer first writes one edge per dependency (`<dep prefix>.edge.<hex dep id>`, payload
//!   the dependent's reference) into the dependency queue's flow stream, then the job.
//! - A job's outcome is recorded in its queue's results stream; a child's outcome is also
//!   recorded, create-only, in its parent queue's flow stream (`child.<hex parent>.<hex child>`).
//! - A parent that continues stores its continuation in the waiting stream
//!   (`<prefix>.cont.<hex parent id>`) with the number of children it spawned.
//!
//! The [`Releaser`] moves waiting jobs to the work stream exactly once, or dead-letters them
//! (`dependency_failed`, `dependency_timeout`). It is triggered by arrivals (a durable consumer
//! on the waiting stream), completions (a durable consumer on the results stream, which reads
//! the completed job's edges), child records (an ordered consumer on the flow stream, applied
//! in stream order to one count per parent written with compare-and-set) and a periodic scan
//! for timeouts. The operator's dispatcher runs it for every queue it serves.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, ErrorCode, consumer};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::admin::{DEFAULT_WAIT_TIMEOUT, FLOW_RETENTION_MARGIN};
use crate::names::{QueueRef, RELEASER_CONSUMER, unhex};
use crate::protocol::flow::{self as headers, FlowHeaders};
use crate::protocol::{self, DeadLetter, Outcome, Reason, record};
use crate::stored::{self, StoredError, StoredJob};

pub use crate::protocol::flow::{Dependency, IfFailed, JobRef};

/// A failed step of the flow logic; it is tried again.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// Reading or deleting a stored message failed.
    #[error(transparent)]
    Stored(#[from] StoredError),
    /// Publishing failed.
    #[error("publishing {what}")]
    Publish {
        /// What was published.
        what: String,
        /// Cause.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// A stream could not be looked up.
    #[error("looking up stream {stream}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// A consumer could not be made or read.
    #[error("consumer on stream {stream}: {reason}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
    /// The queue has no work-stream subject for the job's priority level.
    #[error("queue {queue} has no priority level {level}")]
    NoLevel {
        /// Stream of the queue.
        queue: String,
        /// The level the job asked for.
        level: u8,
    },
    /// Another releaser updated a child count at the same time; the batch is applied again.
    #[error("child count of job {0} changed meanwhile")]
    Conflict(String),
    /// A released continuation's count could not be marked `released`: it kept changing
    /// under the releaser (compare-and-set conflicts every time). The trigger is retried.
    #[error("count {subject} could not be marked released: it changed under each of {tries} tries")]
    NotMarked {
        /// The count's subject.
        subject: String,
        /// Compare-and-set tries made.
        tries: u32,
    },
}

/// Most compare-and-set tries to mark a released continuation's count `released`.
const MARK_TRIES: u32 = 16;

/// What a dependency's stored outcome says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyState {
    /// No outcome recorded (yet).
    Missing,
    /// Completed.
    Completed,
    /// Dead-lettered: reason and error.
    Failed(String),
    /// Cancelled or skipped.
    Cancelled,
}

/// What to do with a waiting job, given its dependencies' states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some dependency has no outcome yet.
    Wait,
    /// Release it; these `if-failed=run` dependencies failed, these optional ones were skipped.
    Release {
        /// Failed dependencies the job runs in spite of.
        failed: Vec<JobRef>,
        /// Skipped optional dependencies.
        skipped: Vec<JobRef>,
    },
    /// Dead-letter it (`dependency_failed`).
    Fail {
        /// The dependency that failed.
        dependency: JobRef,
        /// Its error.
        error: String,
    },
}

/// The rule: a failed (or cancelled, when not optional) dependency with `if-failed=fail`
/// fails the dependent at once; otherwise the dependent waits until every dependency has an
/// outcome and is then released.
pub fn decide(dependencies: &[Dependency], states: &[DependencyState]) -> Verdict {
    let mut waiting = false;
    let (mut failed, mut skipped) = (Vec::new(), Vec::new());
    for (dependency, state) in dependencies.iter().zip(states) {
        let failure = match state {
            DependencyState::Missing => {
                waiting = true;
                continue;
            }
            DependencyState::Completed => continue,
            DependencyState::Cancelled if dependency.optional => {
                skipped.push(dependency.job.clone());
                continue;
            }
            DependencyState::Cancelled => "it was cancelled".to_owned(),
            DependencyState::Failed(error) => error.clone(),
        };
        match dependency.if_failed {
            IfFailed::Fail => {
                return Verdict::Fail {
                    dependency: dependency.job.clone(),
                    error: failure,
                };
            }
            IfFailed::Run => failed.push(dependency.job.clone()),
        }
    }
    if waiting || states.len() < dependencies.len() {
        Verdict::Wait
    } else {
        Verdict::Release { failed, skipped }
    }
}

/// The stored outcome of `job`: its state and, when completed, its result bytes.
pub async fn state_of(
    client: &async_nats::Client,
    job: &JobRef,
) -> Result<(DependencyState, Bytes), FlowError> {
    let queue = job.queue_ref();
    let stored = stored::last_if_stream(
        client,
        &queue.results_stream(),
        &queue.result_subject(&job.id),
    )
    .await?;
    let Some(stored) = stored else {
        return Ok((DependencyState::Missing, Bytes::new()));
    };
    let headers = stored.block().header_map();
    Ok(match Outcome::decode(Some(&headers)) {
        Ok((_, Outcome::Completed)) => (DependencyState::Completed, stored.payload),
        Ok((_, Outcome::Cancelled)) => (DependencyState::Cancelled, Bytes::new()),
        Ok((_, Outcome::DeadLettered { reason, error, .. })) => (
            DependencyState::Failed(format!("{reason}: {error}")),
            Bytes::new(),
        ),
        Ok((_, Outcome::Progress)) => (DependencyState::Missing, Bytes::new()),
        Err(error) => (
            DependencyState::Failed(format!("its stored outcome is malformed: {error}")),
            Bytes::new(),
        ),
    })
}

/// One dependency's outcome as a released job's handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyResult {
    /// The dependency.
    pub job: JobRef,
    /// Its state (never `Missing` for a released job, unless its record expired).
    pub state: DependencyState,
    /// Its result when completed, up to [`headers::MAX_INLINE_RESULT`] bytes.
    pub result: Bytes,
    /// Where the whole result is kept when it is larger: its results stream and subject.
    pub result_ref: Option<(String, String)>,
}

/// The outcomes of `dependencies`, read from their results streams.
pub async fn dependency_results(
    client: &async_nats::Client,
    dependencies: &[Dependency],
) -> Result<Vec<DependencyResult>, FlowError> {
    let mut results = Vec::with_capacity(dependencies.len());
    for dependency in dependencies {
        let (state, result) = state_of(client, &dependency.job).await?;
        let queue = dependency.job.queue_ref();
        let (result, result_ref) = if result.len() > headers::MAX_INLINE_RESULT {
            (
                Bytes::new(),
                Some((
                    queue.results_stream(),
                    queue.result_subject(&dependency.job.id),
                )),
            )
        } else {
            (result, None)
        };
        results.push(DependencyResult {
            job: dependency.job.clone(),
            state,
            result,
            result_ref,
        });
    }
    Ok(results)
}

/// Dependency results as handler processes get them, results up to `inline` bytes inline
/// (larger by reference).
pub fn for_handler(
    results: &[DependencyResult],
    inline: usize,
) -> Vec<protocol::HandlerDependency> {
    use base64::Engine as _;
    results
        .iter()
        .map(|d| {
            let queue = d.job.queue_ref();
            let (status, error) = match &d.state {
                DependencyState::Completed => ("completed", None),
                DependencyState::Failed(error) => ("failed", Some(error.clone())),
                DependencyState::Cancelled => ("cancelled", None),
                DependencyState::Missing => ("missing", None),
            };
            let completed = d.state == DependencyState::Completed;
            let small = completed && d.result_ref.is_none() && d.result.len() <= inline;
            let by_ref = completed && !small;
            protocol::HandlerDependency {
                job: d.job.to_string(),
                status: status.into(),
                error,
                result_b64: small
                    .then(|| base64::engine::general_purpose::STANDARD.encode(&d.result)),
                result: small
                    .then(|| std::str::from_utf8(&d.result).ok().map(str::to_owned))
                    .flatten(),
                result_ref: by_ref.then(|| {
                    format!(
                        "{} {}",
                        queue.results_stream(),
                        queue.result_subject(&d.job.id)
                    )
                }),
            }
        })
        .collect()
}

/// One finished child of a parent, from its record in the parent queue's flow stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildResult {
    /// The child.
    pub job: JobRef,
    /// How it ended.
    pub outcome: Outcome,
    /// Its result, when completed and at most [`headers::MAX_INLINE_RESULT`] bytes.
    pub result: Bytes,
    /// Its results subject when the result was larger (read it with [`stored::last`]).
    pub result_ref: Option<String>,
    /// Sequence of the record in the flow stream (page on after it).
    pub sequence: u64,
}

/// Up to `limit` records of the finished children of `parent`, after flow-stream sequence
/// `after` (0 for the first page), in the order they finished. An empty page is the end.
pub async fn children_page(
    client: &async_nats::Client,
    parent: &JobRef,
    after: u64,
    limit: usize,
) -> Result<Vec<ChildResult>, FlowError> {
    let queue = parent.queue_ref();
    let stream = queue.flow_stream();
    let subject = queue.children_wildcard(&parent.id);
    let mut page = Vec::new();
    let mut from = after.saturating_add(1);
    while page.len() < limit {
        let want = limit - page.len();
        let records = stored::scan(client, &stream, &subject, from, want).await?;
        let Some(last) = records.last() else { break };
        from = last.sequence.saturating_add(1);
        let ended = records.len() < want;
        page.extend(
            records
                .into_iter()
                .filter_map(|record| child_result(parent, &stream, record)),
        );
        if ended {
            break;
        }
    }
    Ok(page)
}

/// A child record as the parent reads it; `None` (logged) for one without a valid
/// `Conveyor-Child`.
fn child_result(parent: &JobRef, stream: &str, record: StoredJob) -> Option<ChildResult> {
    let headers = record.block().header_map();
    let home = (parent.namespace.as_str(), parent.queue.as_str());
    let Some(job) = headers
        .get(headers::CHILD)
        .and_then(|v| JobRef::parse(v.as_str(), home).ok())
    else {
        warn!(stream = %stream, sequence = record.sequence, "skipping a child record without a valid Conveyor-Child");
        return None;
    };
    let outcome = Outcome::decode(Some(&headers))
        .map(|(_, outcome)| outcome)
        .unwrap_or_else(|error| Outcome::DeadLettered {
            reason: "malformed".into(),
            error: error.to_string(),
            attempts: 0,
        });
    Some(ChildResult {
        job,
        outcome,
        result: record.payload,
        result_ref: headers
            .get(headers::RESULT_REF)
            .map(|v| v.as_str().to_owned()),
        sequence: record.sequence,
    })
}

/// Where a job stands, as far as the flow and results streams tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in its queue's waiting stream for these dependencies (with their states).
    Waiting {
        /// When it was stored (RFC 3339).
        since: String,
        /// Each dependency and its state.
        after: Vec<(Dependency, DependencyState)>,
    },
    /// It returned a continuation, which waits for its children.
    Continued {
        /// The continuation's id.
        continuation: String,
        /// Children spawned.
        expected: u64,
    },
    /// Finished for good (its stored outcome).
    Finished(Outcome),
    /// No waiting message and no stored outcome: queued, running, released and not finished
    /// yet, finished longer ago than the results retention, or never submitted.
    Unknown,
}

/// What `conveyor job show` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// The job.
    pub job: JobRef,
    /// Where it stands.
    pub state: JobState,
    /// Its children's count, when it has children.
    pub children: Option<ChildCount>,
}

/// Where job `job` stands: a few `MSG.GET`s (its waiting and continuation subjects, its
/// stored outcome, its child count, one per dependency).
pub async fn job_status(client: &async_nats::Client, job: &JobRef) -> Result<JobStatus, FlowError> {
    let queue = job.queue_ref();
    let waiting_stream = queue.waiting_stream();
    let home = (job.namespace.as_str(), job.queue.as_str());
    let (count, count_sequence) = child_count(client, &queue, &job.id).await?;
    let children = (count_sequence > 0).then_some(count);
    let state = if let Some(waiting) =
        stored::last_if_stream(client, &waiting_stream, &queue.waiting_subject(&job.id)).await?
    {
        let reading = waiting.read(&waiting_stream);
        let flow = FlowHeaders::parse(&reading.headers, home).unwrap_or_default();
        let mut after = Vec::with_capacity(flow.after.len());
        for dependency in flow.after {
            let state = state_of(client, &dependency.job).await?.0;
            after.push((dependency, state));
        }
        JobState::Waiting {
            since: waiting.time,
            after,
        }
    } else if let Some(cont) = stored::last_if_stream(
        client,
        &waiting_stream,
        &queue.continuation_subject(&job.id),
    )
    .await?
    {
        let reading = cont.read(&waiting_stream);
        let flow = FlowHeaders::parse(&reading.headers, home).unwrap_or_default();
        JobState::Continued {
            continuation: reading.id,
            expected: flow.children.map_or(0, |c| c.1),
        }
    } else {
        let stored = stored::last_if_stream(
            client,
            &queue.results_stream(),
            &queue.result_subject(&job.id),
        )
        .await?;
        match stored.map(|m| Outcome::decode(Some(&m.block().header_map()))) {
            Some(Ok((_, outcome))) if outcome != Outcome::Progress => JobState::Finished(outcome),
            _ => JobState::Unknown,
        }
    };
    Ok(JobStatus {
        job: job.clone(),
        state,
        children,
    })
}

/// A parent's finished children by outcome, and the first few of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowSummary {
    /// Children records read.
    pub read: u64,
    /// Completed among them.
    pub completed: u64,
    /// Dead-lettered among them.
    pub dead_lettered: u64,
    /// Cancelled among them.
    pub cancelled: u64,
    /// The first records, in the order the children finished.
    pub first: Vec<ChildResult>,
    /// True when there are more records than were read.
    pub truncated: bool,
}

/// Reads at most `limit` child records of `parent` and counts them by outcome, keeping the
/// first `shown`; bounded output however many children there are.
pub async fn flow_summary(
    client: &async_nats::Client,
    parent: &JobRef,
    shown: usize,
    limit: u64,
) -> Result<FlowSummary, FlowError> {
    let mut summary = FlowSummary::default();
    let mut after = 0;
    while summary.read < limit {
        let room = usize::try_from(limit - summary.read)
            .unwrap_or(usize::MAX)
            .min(500);
        let page = children_page(client, parent, after, room).await?;
        let Some(last) = page.last() else {
            return Ok(summary);
        };
        after = last.sequence;
        for child in page {
            summary.read += 1;
            match child.outcome {
                Outcome::Completed => summary.completed += 1,
                Outcome::DeadLettered { .. } => summary.dead_lettered += 1,
                _ => summary.cancelled += 1,
            }
            if summary.first.len() < shown {
                summary.first.push(child);
            }
        }
    }
    summary.truncated = !children_page(client, parent, after, 1).await?.is_empty();
    Ok(summary)
}

/// A parent's child count, the one message kept on `<prefix>.count.<hex parent id>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildCount {
    /// Distinct children finished.
    pub count: u64,
    /// Flow-stream sequence of the last child record counted (records at or below it are
    /// already in `count`).
    pub applied: u64,
    /// The continuation was released.
    #[serde(default)]
    pub released: bool,
}

/// The child count of job `parent_id` of `queue` and the sequence of its message (0: none).
pub async fn child_count(
    client: &async_nats::Client,
    queue: &QueueRef,
    parent_id: &str,
) -> Result<(ChildCount, u64), FlowError> {
    let stored = stored::last(
        client,
        &queue.flow_stream(),
        &queue.count_subject(parent_id),
    )
    .await?;
    Ok(match stored {
        None => (ChildCount::default(), 0),
        Some(message) => (
            serde_json::from_slice(&message.payload).unwrap_or_default(),
            message.sequence,
        ),
    })
}

/// Writes a count (or cursor) message: rolled up (only the last is kept) and compare-and-set
/// on the sequence of the one it replaces. Returns the sequence it was stored at (what the
/// next write of the subject compares against).
async fn write_rolled_up(
    jetstream: &jetstream::Context,
    subject: String,
    expected: u64,
    payload: Vec<u8>,
) -> Result<u64, FlowError> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected.to_string().as_str(),
    );
    match publish_acked(jetstream, subject.clone(), headers, payload.into()).await {
        Ok(ack) => Ok(ack.sequence),
        Err(error) if is_wrong_last_sequence(&error) => Err(FlowError::Conflict(subject)),
        Err(source) => Err(FlowError::Publish {
            what: subject,
            source,
        }),
    }
}

fn is_wrong_last_sequence(error: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<jetstream::Error>())
        .is_some_and(|js| js.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE)
}

/// Publishes to a stream and waits for its acknowledgement.
pub(crate) async fn publish_acked(
    jetstream: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    jetstream
        .publish_with_headers(subject, headers, payload)
        .await?
        .await
}

async fn publish(
    jetstream: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<(), FlowError> {
    publish_acked(jetstream, subject.clone(), headers, payload)
        .await
        .map(|_| ())
        .map_err(|source| FlowError::Publish {
            what: subject,
            source,
        })
}

/// How recording a child's outcome went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now.
    New,
    /// Already recorded by an earlier completion (a redelivered child): not counted again.
    Duplicate,
    /// The job is nobody's child.
    NotAChild,
    /// The job names a parent whose queue does not exist (no stream takes its flow subject):
    /// it is treated as nobody's child.
    NoSuchParent,
}

/// Records the final outcome of job `id` of `queue` wherever it is needed: its own results
/// subject (when `own` is true: what dependents read), the results subject of the job it
/// continues (`Conveyor-Continues`), and, when that job (or it) is a child, a create-only
/// record in the parent queue's flow stream. Every step can be repeated.
pub async fn record_outcome(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    id: &str,
    flow: &FlowHeaders,
    outcome: &Outcome,
    result: &Bytes,
    own: bool,
) -> Result<Recorded, FlowError> {
    if own {
        publish(
            jetstream,
            queue.result_subject(id),
            outcome.encode(id),
            result.clone(),
        )
        .await?;
    }
    let me = JobRef::new(&queue.namespace, &queue.name, id);
    let finished = match continued_in(flow, queue, id) {
        Some(continued) => {
            let continued_queue = continued.queue_ref();
            publish(
                jetstream,
                continued_queue.result_subject(&continued.id),
                outcome.encode(&continued.id),
                result.clone(),
            )
            .await?;
            continued.clone()
        }
        None => me,
    };
    let Some(parent) = &flow.parent else {
        return Ok(Recorded::NotAChild);
    };
    let parent_queue = parent.queue_ref();
    let mut record = outcome.encode(&finished.id);
    record.insert(headers::CHILD, finished.to_string().as_str());
    record.insert(headers::PARENT, parent.to_string().as_str());
    record.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let payload = if result.len() > headers::MAX_INLINE_RESULT {
        record.insert(
            headers::RESULT_REF,
            finished.queue_ref().result_subject(&finished.id).as_str(),
        );
        Bytes::new()
    } else {
        result.clone()
    };
    let subject = parent_queue.child_subject(&parent.id, &finished.to_string());
    match publish_acked(jetstream, subject.clone(), record, payload).await {
        Ok(_) => Ok(Recorded::New),
        Err(error) if is_wrong_last_sequence(&error) => {
            debug!(child = %finished, parent = %parent, "child already recorded; not counted again");
            Ok(Recorded::Duplicate)
        }
        // No stream took the parent's flow subject ("no responders"). That is also what a
        // server answers while JetStream recovers after a restart, so only a server that says
        // the parent queue's flow stream does not exist makes this nobody's child (retrying
        // would only make the job a poison job); anything else is retried.
        Err(error)
            if error.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                && stream_is_missing(jetstream, &parent_queue.flow_stream()).await =>
        {
            warn!(child = %finished, parent = %parent, "the parent's queue does not exist; recording no child record");
            Ok(Recorded::NoSuchParent)
        }
        Err(source) => Err(FlowError::Publish {
            what: subject,
            source,
        }),
    }
}

/// Whether the server says `stream` does not exist (JetStream error 10059); `false` when it
/// exists or the server could not say (unreachable, JetStream still recovering).
async fn stream_is_missing(jetstream: &jetstream::Context, stream: &str) -> bool {
    match jetstream.get_stream(stream).await {
        Ok(_) => false,
        Err(error) => matches!(
            error.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        ),
    }
}

/// The job that job `id` of `queue` continues (`Conveyor-Continues`), if it names one of
/// `queue`: a continuation always runs in its spawner's queue, so a job naming another queue's
/// job is a forgery (a producer may set any header) and must not overwrite that job's outcome.
/// Such a header is ignored, with a warning.
pub fn continued_in<'a>(flow: &'a FlowHeaders, queue: &QueueRef, id: &str) -> Option<&'a JobRef> {
    let continued = flow.continues.as_ref()?;
    if continued.namespace == queue.namespace && continued.queue == queue.name {
        Some(continued)
    } else {
        warn!(job = %id, queue = %queue.stream(), continues = %continued,
              "ignoring a Conveyor-Continues that names another queue's job");
        None
    }
}

/// Writes the edges of dependent `dependent` into each dependency's flow stream (before the
/// dependent itself is stored: see the release argument in `docs/protocol.md`).
pub async fn write_edges(
    jetstream: &jetstream::Context,
    dependent: &JobRef,
    dependencies: &[Dependency],
) -> Result<(), (JobRef, jetstream::context::PublishError)> {
    for dependency in dependencies {
        let queue = dependency.job.queue_ref();
        let edge = queue.edge_subject(&dependency.job.id);
        let published = async {
            jetstream
                .publish(edge, dependent.to_string().into())
                .await?
                .await
        };
        published
            .await
            .map_err(|error| (dependency.job.clone(), error))?;
    }
    Ok(())
}

/// What the releaser decided for a waiting job. It is stored on the job's own waiting subject
/// ([`headers::DECIDED`], compare-and-set on the job's sequence) before it is carried out, so
/// that two deciders racing (an arrival check and the timeout scan, an old leader and a new
/// one) cannot both act: a release and a dead letter of the same job would run it and fail
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Release it, with these headers added (`Conveyor-Failed-Dependencies`, …; a stored
    /// decision carries them already).
    Release(Vec<(&'static str, String)>),
    /// Dead-letter it for this reason, with this error.
    DeadLetter(Reason, String),
}

impl Decision {
    /// The decision a decided copy carries; a value that names none is no decision (the job
    /// is then decided again, and the stored copy drops the value).
    fn stored(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(headers::DECIDED)?.as_str();
        if value == "release" {
            return Some(Decision::Release(Vec::new()));
        }
        let reason = Reason::parse(value)?;
        let error = headers
            .get(headers::DECIDED_ERROR)
            .map_or_else(|| record::one_line(""), |v| v.as_str().to_owned());
        Some(Decision::DeadLetter(reason, error))
    }
}

/// Whether header `name` is part of a stored decision (the releaser's alone: a producer may
/// not send it).
pub(crate) fn is_decision(name: &str) -> bool {
    name.eq_ignore_ascii_case(headers::DECIDED) || name.eq_ignore_ascii_case(headers::DECIDED_ERROR)
}

/// `headers` without the names `drop` picks.
fn filtered(headers: &HeaderMap, drop: impl Fn(&str) -> bool) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (name, values) in headers.iter() {
        if drop(name.as_ref()) {
            continue;
        }
        for value in values {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// A waiting job's own headers: without a stored decision and without the expectations its
/// decided copy was written with (they must not reach the stream it moves to).
fn own_headers(headers: &HeaderMap) -> HeaderMap {
    filtered(headers, |name| {
        is_decision(name)
            || name
                .get(..14)
                .is_some_and(|head| head.eq_ignore_ascii_case("Nats-Expected-"))
    })
}

/// A continuation's parent and its child count as read (what marking it released compares
/// against).
#[derive(Debug, Clone, Copy)]
struct CountRead<'a> {
    parent: &'a str,
    count: ChildCount,
    sequence: u64,
}

/// How often the releaser scans the waiting stream for jobs past their wait timeout.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Most waiting jobs one scan reads (the next scan goes on from there).
pub const SCAN_BUDGET: usize = 10_000;
/// A trigger taken but not acked (releaser killed mid-way) comes back after this long.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Child records applied per step.
const CHILD_BATCH: usize = 512;
/// Subject of the child-records cursor of a queue: `<prefix>.count.cursor` (not hex: no job's
/// count subject can take it).
fn cursor_subject(queue: &QueueRef) -> String {
    format!("{}.count.cursor", queue.subject_prefix())
}

/// Releases waiting jobs of queues (see the module documentation).
#[derive(Debug, Clone)]
pub struct Releaser {
    jetstream: jetstream::Context,
    scan_interval: Duration,
}

impl Releaser {
    /// A releaser on the server `jetstream` is connected to.
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self {
            jetstream,
            scan_interval: SCAN_INTERVAL,
        }
    }

    /// How often to scan for timed-out waiting jobs (default [`SCAN_INTERVAL`]).
    pub fn scan_interval(mut self, interval: Duration) -> Self {
        self.scan_interval = interval;
        self
    }

    /// Serves one queue until `stop`: returns `Ok` when stopped, an error when a stream or
    /// consumer failed (call again after a pause; every step resumes where it stood).
    pub async fn serve(&self, queue: &QueueRef, stop: &CancellationToken) -> Result<(), FlowError> {
        let wait_timeout = self.wait_timeout(queue).await?;
        // Completions first, from now on; then arrivals, all of them: every arrival is checked
        // after the completion trigger exists, so no completion falls between the two.
        let results = self
            .durable(
                &queue.results_stream(),
                consumer::DeliverPolicy::New,
                "Conveyor releaser: completions",
            )
            .await?;
        let waiting = self
            .durable(
                &queue.waiting_stream(),
                consumer::DeliverPolicy::All,
                "Conveyor releaser: arrivals",
            )
            .await?;
        tokio::select! {
            result = self.on_completions(results, queue) => result,
            result = self.on_arrivals(waiting, queue) => result,
            result = self.on_children(queue) => result,
            result = self.scan_timeouts(queue, wait_timeout) => result,
            () = stop.cancelled() => Ok(()),
        }
    }

    /// The queue's wait timeout, from its flow stream's `max_age` (in the lookup's own
    /// STREAM.INFO answer: no second request).
    async fn wait_timeout(&self, queue: &QueueRef) -> Result<Duration, FlowError> {
        let stream = self.stream(&queue.flow_stream()).await?;
        let max_age = stream.cached_info().config.max_age;
        Ok(if max_age > FLOW_RETENTION_MARGIN {
            max_age - FLOW_RETENTION_MARGIN
        } else {
            DEFAULT_WAIT_TIMEOUT
        })
    }

    /// Looks up stream `name`.
    async fn stream(&self, name: &str) -> Result<jetstream::stream::Stream, FlowError> {
        self.jetstream
            .get_stream(name)
            .await
            .map_err(|source| FlowError::Stream {
                stream: name.to_owned(),
                source,
            })
    }

    async fn durable(
        &self,
        stream_name: &str,
        deliver_policy: consumer::DeliverPolicy,
        description: &str,
    ) -> Result<consumer::PullConsumer, FlowError> {
        self.stream(stream_name)
            .await?
            .get_or_create_consumer(
                RELEASER_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(RELEASER_CONSUMER.to_owned()),
                    description: Some(description.to_owned()),
                    deliver_policy,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| FlowError::Consumer {
                stream: stream_name.to_owned(),
                reason: e.to_string(),
            })
    }

    async fn on_completions(
        &self,
        consumer: consumer::PullConsumer,
        queue: &QueueRef,
    ) -> Result<(), FlowError> {
        let stream = queue.results_stream();
        let failed = |e: String| FlowError::Consumer {
            stream: stream.clone(),
            reason: e,
        };
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| failed(e.to_string()))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| failed(e.to_string()))?;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(protocol::result::JOB_ID))
                .map(|v| v.as_str().to_owned());
            let handled = match id {
                Some(id) => self.completed(queue, &id).await,
                None => Ok(()),
            };
            settle(&message, handled).await;
        }
        Err(failed("the consumer's message stream ended".into()))
    }

    /// Job `id` of `queue` has an outcome: re-checks every job that waits for it.
    async fn completed(&self, queue: &QueueRef, id: &str) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let stream = queue.flow_stream();
        let subject = queue.edge_subject(id);
        let mut from = 1;
        while let Some(edge) = stored::next(&client, &stream, &subject, from).await? {
            from = edge.sequence.saturating_add(1);
            let text = String::from_utf8_lossy(&edge.payload);
            match JobRef::parse(&text, (&queue.namespace, &queue.name)) {
                Ok(dependent) => {
                    let home = dependent.queue_ref();
                    self.check_waiting(&home, &home.waiting_subject(&dependent.id))
                        .await?;
                }
                Err(error) => {
                    warn!(stream = %stream, sequence = edge.sequence, %error, "skipping a malformed edge")
                }
            }
        }
        Ok(())
    }

    async fn on_arrivals(
        &self,
        consumer: consumer::PullConsumer,
        queue: &QueueRef,
    ) -> Result<(), FlowError> {
        let stream = queue.waiting_stream();
        let failed = |e: String| FlowError::Consumer {
            stream: stream.clone(),
            reason: e,
        };
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let continuations = format!("{}.cont.", queue.subject_prefix());
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| failed(e.to_string()))?;
            let subject = message.subject.to_string();
            let handled = match subject.strip_prefix(&continuations) {
                Some(hex) => match unhex(hex) {
                    Some(parent) => self.check_continuation(queue, &parent, None).await,
                    None => Ok(()),
                },
                None => self.check_waiting(queue, &subject).await,
            };
            settle(&message, handled).await;
        }
        Err(failed("the consumer's message stream ended".into()))
    }

    /// Checks the job waiting on `subject` of `queue`'s waiting stream against its
    /// dependencies: releases it, dead-letters it, or leaves it waiting.
    async fn check_waiting(&self, queue: &QueueRef, subject: &str) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let stream = queue.waiting_stream();
        let Some(waiting) = stored::last_if_stream(&client, &stream, subject).await? else {
            return Ok(()); // released, failed or cancelled already
        };
        let reading = waiting.read(&stream);
        if let Some(decision) = Decision::stored(&reading.headers) {
            return self
                .carry_out(queue, &waiting, &reading, decision, None)
                .await;
        }
        let home = (queue.namespace.as_str(), queue.name.as_str());
        let flow = match FlowHeaders::parse(&reading.headers, home) {
            Ok(flow) => flow,
            Err(error) => {
                return self
                    .fail(queue, &waiting, Reason::Malformed, error.to_string())
                    .await;
            }
        };
        let mut states = Vec::with_capacity(flow.after.len());
        for dependency in &flow.after {
            states.push(state_of(&client, &dependency.job).await?.0);
            // A failure that fails the job needs no further reads.
            if let Verdict::Fail { .. } = decide(&flow.after[..states.len()], &states) {
                break;
            }
        }
        let decision = match decide(&flow.after, &states) {
            Verdict::Wait => return Ok(()),
            Verdict::Release { failed, skipped } => {
                let mut extra = Vec::new();
                if !failed.is_empty() {
                    extra.push((headers::FAILED_DEPENDENCIES, join(&failed)));
                }
                if !skipped.is_empty() {
                    extra.push((headers::SKIPPED_DEPENDENCIES, join(&skipped)));
                }
                Decision::Release(extra)
            }
            Verdict::Fail { dependency, error } => Decision::DeadLetter(
                Reason::DependencyFailed,
                format!("dependency {dependency} failed: {error}"),
            ),
        };
        self.decide_once(queue, &waiting, &reading, decision, None)
            .await
    }

    /// Stores `decision` on the waiting job's subject, then carries it out — unless another
    /// decision (or a removal) came first, which is then carried out by whoever reads it (the
    /// stored copy is an arrival too). A job the client cannot read in full is never released,
    /// so it is dead-lettered without a stored decision (two dead letters of one stored message
    /// are one: their `Nats-Msg-Id` is the same).
    async fn decide_once(
        &self,
        queue: &QueueRef,
        waiting: &StoredJob,
        reading: &stored::Reading,
        decision: Decision,
        continued: Option<CountRead<'_>>,
    ) -> Result<(), FlowError> {
        if let Some(error) = &reading.malformed {
            return self
                .fail(queue, waiting, Reason::Malformed, error.clone())
                .await;
        }
        match self.claim(waiting, reading, &decision).await? {
            Some(decided) => {
                self.carry_out(queue, &decided, reading, decision, continued)
                    .await
            }
            None => {
                debug!(queue = %queue.stream(), job = %reading.id, "another decision came first");
                Ok(())
            }
        }
    }

    /// Writes a copy of the waiting job carrying `decision` on its subject, compare-and-set on
    /// the sequence read (the stream keeps one message per subject, so the copy replaces the
    /// job). Returns the job as stored under the copy's sequence, or `None` when the subject
    /// moved on (another decision, a cancel, a resubmission).
    async fn claim(
        &self,
        waiting: &StoredJob,
        reading: &stored::Reading,
        decision: &Decision,
    ) -> Result<Option<StoredJob>, FlowError> {
        // Without its `Nats-Msg-Id`: the stream's duplicate window would take the copy for
        // the job's first publish and drop it. Its id is kept as `Conveyor-Job-Id`.
        let mut copy = filtered(&reading.headers, |name| {
            is_decision(name) || name.eq_ignore_ascii_case(protocol::MSG_ID)
        });
        copy.insert(protocol::JOB_ID, reading.id.as_str());
        match decision {
            Decision::Release(extra) => {
                copy.insert(headers::DECIDED, "release");
                for (name, value) in extra {
                    copy.insert(*name, value.as_str());
                }
            }
            Decision::DeadLetter(reason, error) => {
                copy.insert(headers::DECIDED, reason.as_str());
                copy.insert(headers::DECIDED_ERROR, record::one_line(error).as_str());
            }
        }
        copy.insert(
            "Nats-Expected-Last-Subject-Sequence",
            waiting.sequence.to_string().as_str(),
        );
        let subject = waiting.subject.clone();
        match publish_acked(
            &self.jetstream,
            subject.clone(),
            copy,
            waiting.payload.clone(),
        )
        .await
        {
            Ok(ack) => Ok(Some(StoredJob {
                sequence: ack.sequence,
                ..waiting.clone()
            })),
            Err(error) if is_wrong_last_sequence(&error) => Ok(None),
            Err(source) => Err(FlowError::Publish {
                what: subject,
                source,
            }),
        }
    }

    /// Carries out a stored decision on `waiting` (read as `reading`): a release (of a
    /// continuation, whose parent's count is then marked released) or a dead letter; the
    /// waiting message goes last. Every step can be repeated.
    async fn carry_out(
        &self,
        queue: &QueueRef,
        waiting: &StoredJob,
        reading: &stored::Reading,
        decision: Decision,
        continued: Option<CountRead<'_>>,
    ) -> Result<(), FlowError> {
        match decision {
            Decision::Release(extra) => {
                match self
                    .publish_released(queue, waiting, &reading.headers, &extra)
                    .await
                {
                    Err(error @ FlowError::NoLevel { .. }) => {
                        return self
                            .fail(queue, waiting, Reason::Malformed, error.to_string())
                            .await;
                    }
                    other => other?,
                }
                if let Some(read) = continued {
                    self.mark_released(queue, read.parent, read.count, read.sequence)
                        .await?;
                }
                stored::delete(
                    &self.jetstream.client(),
                    &queue.waiting_stream(),
                    waiting.sequence,
                )
                .await?;
                Ok(())
            }
            Decision::DeadLetter(reason, error) => self.fail(queue, waiting, reason, error).await,
        }
    }

    /// Releases the continuation of `parent_id` when its children are all done. `known` is
    /// the count just written, if the caller has it.
    async fn check_continuation(
        &self,
        queue: &QueueRef,
        parent_id: &str,
        known: Option<(ChildCount, u64)>,
    ) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let stream = queue.waiting_stream();
        let subject = queue.continuation_subject(parent_id);
        let Some(waiting) = stored::last(&client, &stream, &subject).await? else {
            return Ok(());
        };
        let reading = waiting.read(&stream);
        let home = (queue.namespace.as_str(), queue.name.as_str());
        let flow = match FlowHeaders::parse(&reading.headers, home) {
            Ok(flow) => flow,
            Err(error) => {
                return self
                    .fail(queue, &waiting, Reason::Malformed, error.to_string())
                    .await;
            }
        };
        let (count, sequence) = match known {
            Some(known) => known,
            None => child_count(&client, queue, parent_id).await?,
        };
        if count.released {
            // A parent that ran again after its continuation was released stored it anew (or
            // a releaser stopped between marking the count and deleting the decided copy).
            debug!(queue = %queue.stream(), parent = %parent_id, "continuation already released; dropping the copy");
            stored::delete(&client, &stream, waiting.sequence).await?;
            return Ok(());
        }
        let continued = Some(CountRead {
            parent: parent_id,
            count,
            sequence,
        });
        if let Some(decision) = Decision::stored(&reading.headers) {
            return self
                .carry_out(queue, &waiting, &reading, decision, continued)
                .await;
        }
        if count.count < flow.children.as_ref().map_or(0, |c| c.1) {
            return Ok(());
        }
        self.decide_once(
            queue,
            &waiting,
            &reading,
            Decision::Release(Vec::new()),
            continued,
        )
        .await
    }

    /// Marks the count of `parent_id` `released` (compare-and-set on `sequence`, the count
    /// last read). A count another releaser moved on meanwhile (a child record counted on
    /// the children path while this arrival check ran) is read again and marked again, so the
    /// mark is never lost: without it, a parent that runs again would store its continuation
    /// anew and have it released a second time. Fails after [`MARK_TRIES`] conflicts in a
    /// row; the waiting message is then kept and the trigger retried.
    async fn mark_released(
        &self,
        queue: &QueueRef,
        parent_id: &str,
        mut count: ChildCount,
        mut sequence: u64,
    ) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let subject = queue.count_subject(parent_id);
        for _ in 0..MARK_TRIES {
            let released = ChildCount {
                released: true,
                ..count
            };
            let payload = serde_json::to_vec(&released).unwrap_or_default();
            match write_rolled_up(&self.jetstream, subject.clone(), sequence, payload).await {
                Ok(_) => return Ok(()),
                Err(FlowError::Conflict(_)) => {
                    (count, sequence) = child_count(&client, queue, parent_id).await?;
                    if count.released {
                        return Ok(());
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Err(FlowError::NotMarked {
            subject,
            tries: MARK_TRIES,
        })
    }

    /// Release: publish to the work stream with the job's id as `Nats-Msg-Id` (a second
    /// release within the duplicate window is absorbed).
    async fn publish_released(
        &self,
        queue: &QueueRef,
        waiting: &StoredJob,
        job_headers: &HeaderMap,
        extra: &[(&'static str, String)],
    ) -> Result<(), FlowError> {
        let reading = waiting.read(&queue.waiting_stream());
        let level = job_headers
            .get(protocol::PRIORITY)
            .and_then(|v| v.as_str().trim().parse::<u8>().ok())
            .unwrap_or(0);
        let mut headers = own_headers(job_headers);
        headers.insert(protocol::MSG_ID, reading.id.as_str());
        for (name, value) in extra {
            headers.insert(*name, value.as_str());
        }
        let subject = queue.job_subject(level);
        match publish_acked(
            &self.jetstream,
            subject.clone(),
            headers,
            waiting.payload.clone(),
        )
        .await
        {
            Ok(_) => {
                debug!(queue = %queue.stream(), job = %reading.id, "released");
                Ok(())
            }
            Err(error) if error.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                Err(FlowError::NoLevel {
                    queue: queue.stream(),
                    level,
                })
            }
            Err(source) => Err(FlowError::Publish {
                what: subject,
                source,
            }),
        }
    }

    /// Dead-letters a waiting job: its copy to the dead-letter stream (`Nats-Msg-Id` the same
    /// whoever writes it), its outcome recorded (so its own dependents and parent learn it),
    /// an awaiting producer answered, then the waiting message deleted.
    async fn fail(
        &self,
        queue: &QueueRef,
        waiting: &StoredJob,
        reason: Reason,
        error: String,
    ) -> Result<(), FlowError> {
        let stream = queue.waiting_stream();
        let reading = waiting.read(&stream);
        let own = own_headers(&reading.headers);
        let letter = DeadLetter {
            job_id: reading.id.clone(),
            reason,
            error,
            attempts: 0,
            pod: "releaser".into(),
            original_subject: waiting.subject.clone(),
            original_sequence: waiting.sequence,
        };
        let original = match &waiting.raw_headers {
            Some(raw) if !reading.unreadable.is_empty() => record::Original::Block {
                raw,
                decoded: &reading.headers,
            },
            _ => record::Original::Headers(Some(&own)),
        };
        let dead = letter.encode(original, &protocol::now_rfc3339());
        publish(
            &self.jetstream,
            queue.dead_letter_subject(),
            dead,
            waiting.payload.clone(),
        )
        .await?;
        warn!(queue = %queue.stream(), job = %letter.job_id, reason = %letter.reason,
              error = %letter.error, "waiting job dead-lettered");
        let outcome = Outcome::dead_lettered(&letter);
        let home = (queue.namespace.as_str(), queue.name.as_str());
        let flow = FlowHeaders::parse(&reading.headers, home).unwrap_or_default();
        record_outcome(
            &self.jetstream,
            queue,
            &letter.job_id,
            &flow,
            &outcome,
            &Bytes::new(),
            true,
        )
        .await?;
        if let Some(reply) = &reading.reply_to {
            let id = flow.answered_id(&letter.job_id);
            if let Err(error) = self
                .jetstream
                .client()
                .publish_with_headers(reply.clone(), outcome.encode(id), Bytes::new())
                .await
            {
                debug!(%error, "answering the producer awaiting a dead-lettered waiting job");
            }
        }
        stored::delete(&self.jetstream.client(), &stream, waiting.sequence).await?;
        Ok(())
    }

    /// Applies child records in flow-stream order from the queue's cursor: per parent, the
    /// records after its count's `applied` sequence are added with compare-and-set, then its
    /// continuation is checked; the cursor moves on after the batch.
    async fn on_children(&self, queue: &QueueRef) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let stream_name = queue.flow_stream();
        let failed = |e: String| FlowError::Consumer {
            stream: stream_name.clone(),
            reason: e,
        };
        let cursor_subject = cursor_subject(queue);
        let (mut cursor, mut cursor_sequence) =
            match stored::last(&client, &stream_name, &cursor_subject).await? {
                Some(message) => (
                    String::from_utf8_lossy(&message.payload)
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0),
                    message.sequence,
                ),
                None => (0, 0),
            };
        let stream = self.stream(&stream_name).await?;
        let deliver_policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: cursor.saturating_add(1),
        };
        let ordered = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.child.*.*", queue.subject_prefix()),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(e.to_string()))?;
        let messages = ordered
            .messages()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut chunks = messages.ready_chunks(CHILD_BATCH);
        let children = format!("{}.child.", queue.subject_prefix());
        while let Some(chunk) = chunks.next().await {
            // Per parent, the sequences of its records in this chunk, in order.
            let mut parents: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            let mut last = cursor;
            for message in chunk {
                let message = message.map_err(|e| failed(e.to_string()))?;
                let sequence = message
                    .info()
                    .map_err(|e| failed(e.to_string()))?
                    .stream_sequence;
                last = last.max(sequence);
                let parent = message
                    .subject
                    .strip_prefix(&children)
                    .and_then(|rest| rest.split('.').next())
                    .and_then(unhex);
                if let Some(parent) = parent {
                    parents.entry(parent).or_default().push(sequence);
                }
            }
            for (parent, sequences) in parents {
                self.count_children(queue, &parent, &sequences).await?;
            }
            cursor_sequence = write_rolled_up(
                &self.jetstream,
                cursor_subject.clone(),
                cursor_sequence,
                last.to_string().into_bytes(),
            )
            .await?;
            cursor = last;
        }
        Err(failed("the ordered consumer's stream ended".into()))
    }

    async fn count_children(
        &self,
        queue: &QueueRef,
        parent: &str,
        sequences: &[u64],
    ) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let (count, sequence) = child_count(&client, queue, parent).await?;
        let new: Vec<u64> = sequences
            .iter()
            .copied()
            .filter(|s| *s > count.applied)
            .collect();
        let Some(&applied) = new.iter().max() else {
            return Ok(()); // applied before (a releaser restarted behind its cursor)
        };
        let updated = ChildCount {
            count: count.count.saturating_add(new.len() as u64),
            applied,
            released: count.released,
        };
        let payload = serde_json::to_vec(&updated).unwrap_or_default();
        let written = write_rolled_up(
            &self.jetstream,
            queue.count_subject(parent),
            sequence,
            payload,
        )
        .await?;
        self.check_continuation(queue, parent, Some((updated, written)))
            .await
    }

    /// Dead-letters every waiting job older than its wait timeout, scanning from the oldest
    /// (at most [`SCAN_BUDGET`] per scan), every scan interval.
    async fn scan_timeouts(
        &self,
        queue: &QueueRef,
        wait_timeout: Duration,
    ) -> Result<(), FlowError> {
        let client = self.jetstream.client();
        let stream = queue.waiting_stream();
        let all = format!("{}.*.*", queue.subject_prefix());
        let mut from = 1;
        loop {
            let mut read = 0;
            while read < SCAN_BUDGET {
                let Some(waiting) = stored::next(&client, &stream, &all, from).await? else {
                    from = 1;
                    break;
                };
                read += 1;
                from = waiting.sequence.saturating_add(1);
                let reading = waiting.read(&stream);
                if Decision::stored(&reading.headers).is_some() {
                    continue; // decided: its arrival check carries it out
                }
                let home = (queue.namespace.as_str(), queue.name.as_str());
                let own = FlowHeaders::parse(&reading.headers, home)
                    .ok()
                    .and_then(|flow| flow.wait_timeout);
                let timeout = own.map_or(wait_timeout, |own| own.min(wait_timeout));
                let Ok(stored_at) = waiting.time.parse::<jiff::Timestamp>() else {
                    continue;
                };
                let age = jiff::Timestamp::now().duration_since(stored_at);
                let expired = age.is_positive() && age.unsigned_abs() > timeout;
                if expired {
                    let error = format!(
                        "waited longer than its wait timeout of {}s for its dependencies or children",
                        timeout.as_secs()
                    );
                    let decision = Decision::DeadLetter(Reason::DependencyTimeout, error);
                    self.decide_once(queue, &waiting, &reading, decision, None)
                        .await?;
                }
            }
            tokio::time::sleep(self.scan_interval).await;
        }
    }
}

/// Acks a handled trigger; naks a failed one for another try after a pause.
async fn settle(message: &jetstream::Message, handled: Result<(), FlowError>) {
    let kind = match handled {
        Ok(()) => AckKind::Ack,
        Err(error) => {
            warn!(subject = %message.subject, error = %error, "flow step failed; trying again");
            AckKind::Nak(Some(Duration::from_secs(1)))
        }
    };
    if let Err(error) = message.ack_with(kind).await {
        debug!(%error, "settling a flow trigger");
    }
}

fn join(jobs: &[JobRef]) -> String {
    jobs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_decision_is_read_back_and_stripped_before_the_job_moves_on() {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::JOB_ID, "a");
        headers.insert(headers::DECIDED, "dependency_failed");
        headers.insert(headers::DECIDED_ERROR, "dependency test/q/b failed: boom");
        headers.insert("Nats-Expected-Last-Subject-Sequence", "7");
        headers.insert("X-Tenant", "t1");
        assert_eq!(
            Decision::stored(&headers),
            Some(Decision::DeadLetter(
                Reason::DependencyFailed,
                "dependency test/q/b failed: boom".into()
            ))
        );
        let own = own_headers(&headers);
        assert!(own.get(headers::DECIDED).is_none());
        assert!(own.get(headers::DECIDED_ERROR).is_none());
        assert!(own.get("Nats-Expected-Last-Subject-Sequence").is_none());
        assert_eq!(own.get("X-Tenant").map(|v| v.as_str()), Some("t1"));
        assert_eq!(own.get(protocol::JOB_ID).map(|v| v.as_str()), Some("a"));

        let mut released = HeaderMap::new();
        released.insert(headers::DECIDED, "release");
        assert_eq!(
            Decision::stored(&released),
            Some(Decision::Release(Vec::new()))
        );
        for unknown in ["", "banana", "Release", "dependency_failed "] {
            let mut odd = HeaderMap::new();
            odd.insert(headers::DECIDED, unknown);
            assert_eq!(Decision::stored(&odd), None, "{unknown:?}");
        }
        assert_eq!(Decision::stored(&HeaderMap::new()), None);
    }

    fn dep(id: &str) -> Dependency {
        Dependency::on(JobRef::new("ns", "q", id))
    }

    #[test]
    fn dependents_wait_until_every_dependency_has_an_outcome() {
        use DependencyState::*;
        let deps = [dep("a"), dep("b")];
        assert_eq!(decide(&deps, &[Completed, Missing]), Verdict::Wait);
        assert_eq!(
            decide(&deps, &[Completed, Completed]),
            Verdict::Release {
                failed: vec![],
                skipped: vec![]
            }
        );
        assert_eq!(
            decide(&deps, &[Completed]),
            Verdict::Wait,
            "states not all read"
        );
    }

    #[test]
    fn failures_follow_each_dependency_policy() {
        use DependencyState::*;
        let deps = [dep("a").run_if_failed(), dep("b")];
        assert_eq!(
            decide(&deps, &[Failed("x".into()), Completed]),
            Verdict::Release {
                failed: vec![JobRef::new("ns", "q", "a")],
                skipped: vec![]
            }
        );
        assert_eq!(
            decide(&deps, &[Missing, Failed("boom".into())]),
            Verdict::Fail {
                dependency: JobRef::new("ns", "q", "b"),
                error: "boom".into()
            },
            "a failure fails at once, without waiting for the rest"
        );
        let optional = [dep("t").optional(), dep("f")];
        assert_eq!(
            decide(&optional, &[Cancelled, Completed]),
            Verdict::Release {
                failed: vec![],
                skipped: vec![JobRef::new("ns", "q", "t")]
            }
        );
        assert!(matches!(
            decide(&[dep("c")], &[Cancelled]),
            Verdict::Fail { .. }
        ));
    }
}
