//! Dead-letter tools over a queue's dead-letter stream: list, show, requeue and purge.
//!
//! Every dead letter is read by sequence with the non-direct `$JS.API.STREAM.MSG.GET` and its
//! header block decoded by the protocol's rules, never by the NATS client (a message published
//! straight into the dead-letter subject may carry headers the client cannot read); a listing
//! reads one message per request, payload included, up to its limit. Requeuing republishes the job to its
//! original priority level with fresh attempts and deletes the dead letter only after the work
//! stream acknowledged the job: an interrupted requeue loses nothing (at worst, outside the
//! deduplication window, a job runs twice). The rules are in `docs/protocol.md`, "Dead-letter
//! tools".

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;

use crate::names::QueueRef;
use crate::protocol::{self, dead_letter};
use crate::stored::{self, StoredJob};

/// `Conveyor-Reason` of a job the dispatcher dead-lettered because it reached the consumer's
/// `max_deliver` without any handler report (its worker crashed or hung on every attempt).
pub const REASON_MAX_DELIVERIES: &str = protocol::Reason::MaxDeliveries.as_str();
/// `Conveyor-Reason` of a job that breaks the protocol (see `protocol::envelope`).
pub const REASON_MALFORMED: &str = protocol::Reason::Malformed.as_str();

/// Longest wait for the next header while scanning; the scan ends early rather than hang.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Dead-letter headers that describe the failure; a requeued job drops them (a malformed job's
/// raw header copy too: it is for people to read, not to send again).
const FAILURE_HEADERS: [&str; 10] = [
    protocol::record::ORIGINAL_HEADERS,
    protocol::record::ORIGINAL_HEADERS_TRUNCATED,
    dead_letter::JOB_ID,
    dead_letter::ERROR,
    dead_letter::ATTEMPTS,
    dead_letter::POD,
    dead_letter::FAILED_AT,
    dead_letter::SUBJECT,
    dead_letter::SEQUENCE,
    dead_letter::REASON,
];

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The dead letters of one job id.
    One(String),
    /// Dead letters whose error or reason contains this text (case-insensitive).
    ErrorMatch(String),
    /// Every dead letter of the queue.
    All,
}

impl Selector {
    /// Whether `entry` is selected.
    pub fn matches(&self, entry: &DeadLetter) -> bool {
        match self {
            Selector::One(id) => entry.job_id == *id,
            Selector::ErrorMatch(text) => {
                let text = text.to_lowercase();
                entry.error.to_lowercase().contains(&text)
                    || entry.reason.to_lowercase().contains(&text)
            }
            Selector::All => true,
        }
    }
}

/// One dead letter as listed: its headers, not its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Sequence in the dead-letter stream (unique per dead letter).
    pub sequence: u64,
    /// The job's id.
    pub job_id: String,
    /// `permanent`, `exhausted`, `malformed` or [`REASON_MAX_DELIVERIES`].
    pub reason: String,
    /// The last error (one line, at most 1024 characters).
    pub error: String,
    /// Attempts made, when known.
    pub attempts: Option<u32>,
    /// Pod that ran the last attempt (`unknown` when no handler reported).
    pub pod: String,
    /// When the job was dead-lettered (RFC 3339, as written by whoever dead-lettered it).
    pub failed_at: String,
    /// The job subject it was submitted to (gives the priority level).
    pub subject: String,
    /// Payload size in bytes, when the scan could tell.
    pub size: Option<u64>,
}

impl DeadLetterJob {
    /// A stored dead letter, its header block decoded (once) by the protocol's rules.
    fn read(job: StoredJob) -> Self {
        let headers = job.block().header_map();
        let mut entry = DeadLetter::from_headers(job.sequence, &headers);
        entry.size = u64::try_from(job.payload.len()).ok();
        Self {
            entry,
            headers,
            payload: job.payload,
        }
    }
}

impl DeadLetter {
    /// Reads the dead-letter headers of the message at `sequence`.
    fn from_headers(sequence: u64, headers: &HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        Self {
            sequence,
            job_id: Some(get(dead_letter::JOB_ID))
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| get(protocol::MSG_ID)),
            reason: get(dead_letter::REASON),
            error: get(dead_letter::ERROR),
            attempts: get(dead_letter::ATTEMPTS).trim().parse().ok(),
            pod: get(dead_letter::POD),
            failed_at: get(dead_letter::FAILED_AT),
            subject: get(dead_letter::SUBJECT),
            size: None,
        }
    }
}

/// A dead letter with its payload and every header the NATS client can carry.
#[derive(Debug, Clone)]
pub struct DeadLetterJob {
    /// What the listing shows.
    pub entry: DeadLetter,
    /// All headers: the job's own and the dead-letter headers.
    pub headers: HeaderMap,
    /// The job's payload as submitted.
    pub payload: Bytes,
}

/// What a requeue or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    /// Job ids requeued or purged, in dead-letter order.
    pub jobs: Vec<String>,
}

/// A dead-letter operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The queue's dead-letter stream is missing or unreachable.
    #[error("looking up stream {stream}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// Reading the dead-letter stream's headers failed.
    #[error("reading the dead letters of stream {stream}: {reason}")]
    Scan {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
    /// No dead letter has this job id.
    #[error("no dead letter with job id {0:?}")]
    NotFound(String),
    /// Republishing a job to the work stream failed; its dead letter is kept.
    #[error("republishing job {job} to {subject}")]
    Publish {
        /// Job id.
        job: String,
        /// Job subject.
        subject: String,
        /// Cause.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// Deleting a dead letter failed.
    #[error(transparent)]
    Delete(stored::StoredError),
    /// Purging the dead-letter stream failed.
    #[error("purging stream {stream}")]
    Purge {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::stream::PurgeError,
    },
}

/// A JetStream `MAX_DELIVERIES` advisory (`io.nats.jetstream.advisory.v1.max_deliver`): a job
/// of `stream` at `stream_seq` reached its consumer's `max_deliver` after `deliveries`
/// deliveries without any handler report. The queue's events stream keeps each one until the
/// dispatcher has dead-lettered its job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Advisory {
    /// The work stream.
    pub stream: String,
    /// The job's sequence in it.
    pub stream_seq: u64,
    /// Deliveries made.
    pub deliveries: u64,
}

/// Jobs that exhausted their deliveries without a handler report and are not in the
/// dead-letter stream yet: the dispatcher has not reached them, or their dead letter cannot be
/// written (they stay in the work stream, counted here, until someone acts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exhausted {
    /// Advisories waiting in the queue's events stream (each names one job).
    pub count: u64,
    /// The oldest of them, oldest first (at most the `limit` asked for).
    pub oldest: Vec<ExhaustedJob>,
}

/// One job waiting to be dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExhaustedJob {
    /// Its id (by the protocol's one rule; `<stream>:<sequence>` when it has none).
    pub job_id: String,
    /// Its sequence in the work stream.
    pub sequence: u64,
    /// Deliveries made.
    pub deliveries: u64,
    /// When its advisory was stored (RFC 3339, as the server wrote it): since when it waits.
    pub since: String,
}

/// The jobs of `queue` waiting to be dead-lettered ([`Exhausted`]), naming at most `limit` of
/// the oldest: one stream lookup, and when any wait, two message reads per job named.
pub async fn exhausted(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    limit: usize,
) -> Result<Exhausted, DlqError> {
    let name = queue.events_stream();
    let events = jetstream
        .get_stream(&name)
        .await
        .map_err(|source| DlqError::Stream {
            stream: name.clone(),
            source,
        })?;
    let state = &events.cached_info().state;
    let mut found = Exhausted {
        count: state.messages,
        oldest: Vec::new(),
    };
    let client = jetstream.client();
    let failed = |stream: &str, reason: String| DlqError::Scan {
        stream: stream.to_owned(),
        reason,
    };
    let mut from = state.first_sequence;
    while state.messages > 0 && found.oldest.len() < limit && from <= state.last_sequence {
        let Some(message) = stored::next(&client, &name, ">", from)
            .await
            .map_err(|e| failed(&name, e.to_string()))?
        else {
            break;
        };
        from = message.sequence.saturating_add(1);
        let Ok(advisory) = serde_json::from_slice::<Advisory>(&message.payload) else {
            continue;
        };
        let work = queue.stream();
        if advisory.stream != work {
            continue;
        }
        // Gone from the work stream: dead-lettered or finished, its advisory about to go.
        let Some(job) = stored::get(&client, &work, advisory.stream_seq)
            .await
            .map_err(|e| failed(&work, e.to_string()))?
        else {
            continue;
        };
        found.oldest.push(ExhaustedJob {
            job_id: job.read(&work).id,
            sequence: advisory.stream_seq,
            deliveries: advisory.deliveries,
            since: message.time,
        });
    }
    Ok(found)
}

/// Lists up to `limit` dead letters chosen by `filter`, oldest first, without their payloads.
pub async fn list(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    filter: &Selector,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    scan(jetstream, &stream, 0, filter, limit, |job| job.entry).await
}

/// One page of a listing: up to `limit` dead letters from sequence `from` on (the next page
/// starts after the last sequence returned), oldest first, without their payloads: each
/// payload is dropped as soon as its message is read, so a page of large jobs holds at most
/// one of them at a time. Reads at most `limit` messages.
pub async fn entries(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    from: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    scan(jetstream, &stream, from, &Selector::All, limit, |job| {
        job.entry
    })
    .await
}

/// One page of a browse: up to `limit` dead letters from sequence `from` on (the next page
/// starts after the last sequence returned), oldest first, with payloads and headers. Reads at
/// most `limit` messages (deleted sequences are skipped by the server), however long the stream.
pub async fn page(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    from: u64,
    limit: usize,
) -> Result<Vec<DeadLetterJob>, DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    scan(jetstream, &stream, from, &Selector::All, limit, |job| job).await
}

/// The newest dead letter of job `id`, with its payload and headers.
pub async fn show(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    id: &str,
) -> Result<DeadLetterJob, DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    let selector = Selector::One(id.to_owned());
    scan(jetstream, &stream, 0, &selector, usize::MAX, |job| job)
        .await?
        .pop()
        .ok_or_else(|| DlqError::NotFound(id.to_owned()))
}

/// Requeues the selected dead letters: each is republished to the subject it was submitted to
/// (so its priority level is kept) with fresh attempts, its original job id in
/// `Conveyor-Job-Id` and the new `Nats-Msg-Id` `<job id>:requeue:<dead-letter sequence>`,
/// then deleted from the dead-letter stream once the work stream acknowledged it. Dead letters
/// that arrive while this runs are left alone.
pub async fn requeue(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    selector: &Selector,
) -> Result<Moved, DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    let mut moved = Moved::default();
    // In batches, so payloads are held for one batch at a time however many are chosen; every
    // batch stops at the last sequence the stream had when the requeue started.
    let mut from = 0;
    loop {
        let batch = scan(jetstream, &stream, from, selector, REQUEUE_BATCH, |job| job).await?;
        let Some(last) = batch.last() else { break };
        from = last.entry.sequence.saturating_add(1);
        for job in batch {
            republish(jetstream, &stream, queue, &job).await?;
            moved.jobs.push(job.entry.job_id);
        }
    }
    if let Selector::One(id) = selector
        && moved.jobs.is_empty()
    {
        return Err(DlqError::NotFound(id.clone()));
    }
    Ok(moved)
}

/// Requeues one dead letter (as [`page`] or [`show`] returned it) the way [`requeue`] does:
/// republished, then deleted once the work stream acknowledged it.
pub async fn requeue_one(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    job: &DeadLetterJob,
) -> Result<(), DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    republish(jetstream, &stream, queue, job).await
}

/// Most dependents [`requeue_with_dependents`] requeues in one call.
pub const MAX_DEPENDENTS_REQUEUED: usize = 10_000;

/// [`requeue`], then, for each job requeued, the jobs that were dead-lettered because of it
/// (reason `dependency_failed`, found through its dependency edges), and theirs, at most
/// [`MAX_DEPENDENTS_REQUEUED`]. Each requeued job's stored outcome is removed first, so its
/// requeued dependents wait for its new run instead of failing again at once.
pub async fn requeue_with_dependents(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    selector: &Selector,
) -> Result<Moved, DlqError> {
    let client = jetstream.client();
    let scan_failed = |stream: String, reason: String| DlqError::Scan { stream, reason };
    // The stored outcomes of the selected jobs go first: a dependent requeued before them
    // would read the old failure.
    let stream = dead_letter_stream(jetstream, queue).await?;
    let selected = scan(jetstream, &stream, 0, selector, usize::MAX, |job| {
        job.entry.job_id
    })
    .await?;
    for id in &selected {
        forget_outcome(&client, queue, id).await?;
    }
    let mut moved = requeue(jetstream, queue, selector).await?;
    let mut todo: std::collections::VecDeque<(QueueRef, String)> = moved
        .jobs
        .iter()
        .map(|id| (queue.clone(), id.clone()))
        .collect();
    let mut seen: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    let mut dependents_requeued = 0;
    while let Some((home, id)) = todo.pop_front() {
        let flow = home.flow_stream();
        let subject = home.edge_subject(&id);
        let mut from = 1;
        loop {
            let edge = stored::next(&client, &flow, &subject, from)
                .await
                .map_err(|e| scan_failed(flow.clone(), e.to_string()))?;
            let Some(edge) = edge else { break };
            from = edge.sequence.saturating_add(1);
            let text = String::from_utf8_lossy(&edge.payload);
            let Ok(dependent) = crate::flow::JobRef::parse(&text, (&home.namespace, &home.name))
            else {
                continue;
            };
            if !seen.insert((dependent.queue_ref().stream(), dependent.id.clone())) {
                continue;
            }
            let dq = dependent.queue_ref();
            let letter = match show(jetstream, &dq, &dependent.id).await {
                Ok(letter) => letter,
                Err(DlqError::NotFound(_) | DlqError::Stream { .. }) => continue,
                Err(error) => return Err(error),
            };
            if letter.entry.reason != crate::protocol::Reason::DependencyFailed.as_str() {
                continue;
            }
            forget_outcome(&client, &dq, &dependent.id).await?;
            requeue_one(jetstream, &dq, &letter).await?;
            dependents_requeued += 1;
            moved.jobs.push(dependent.to_string());
            if dependents_requeued >= MAX_DEPENDENTS_REQUEUED {
                // Nothing more is requeued: the edges left need not be read.
                return Ok(moved);
            }
            todo.push_back((dq, dependent.id));
        }
    }
    Ok(moved)
}

/// Deletes the stored outcome of job `id` (it runs again).
async fn forget_outcome(
    client: &async_nats::Client,
    queue: &QueueRef,
    id: &str,
) -> Result<(), DlqError> {
    let stream = queue.results_stream();
    if let Some(outcome) = stored::last_if_stream(client, &stream, &queue.result_subject(id))
        .await
        .map_err(DlqError::Delete)?
    {
        stored::delete(client, &stream, outcome.sequence)
            .await
            .map_err(DlqError::Delete)?;
    }
    Ok(())
}

/// Republishes a dead letter to its level with fresh attempts, then deletes it.
async fn republish(
    jetstream: &jetstream::Context,
    stream: &Stream,
    queue: &QueueRef,
    job: &DeadLetterJob,
) -> Result<(), DlqError> {
    let subject = requeue_subject(queue, &job.entry.subject);
    let headers = requeue_headers(job);
    crate::flow::publish_acked(jetstream, subject.clone(), headers, job.payload.clone())
        .await
        .map_err(|source| DlqError::Publish {
            job: job.entry.job_id.clone(),
            subject,
            source,
        })?;
    delete(jetstream, stream, job.entry.sequence).await
}

/// Deletes the dead letter at `sequence` for good (one that is already gone counts).
pub async fn purge_one(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    sequence: u64,
) -> Result<(), DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    delete(jetstream, &stream, sequence).await
}

/// Dead letters a requeue holds (with their payloads) at a time.
const REQUEUE_BATCH: usize = 100;

/// Deletes the selected dead letters for good.
pub async fn purge(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    selector: &Selector,
) -> Result<Moved, DlqError> {
    let stream = dead_letter_stream(jetstream, queue).await?;
    let entries = scan(jetstream, &stream, 0, selector, usize::MAX, |job| job.entry).await?;
    if let Selector::One(id) = selector
        && entries.is_empty()
    {
        return Err(DlqError::NotFound(id.clone()));
    }
    let mut moved = Moved::default();
    if *selector == Selector::All {
        // One request instead of one per message; only what the scan saw is reported, and
        // what arrived after it is purged too (the caller asked for all).
        stream.purge().await.map_err(|source| DlqError::Purge {
            stream: queue.dead_letter_stream(),
            source,
        })?;
        moved.jobs = entries.into_iter().map(|e| e.job_id).collect();
        return Ok(moved);
    }
    for entry in entries {
        delete(jetstream, &stream, entry.sequence).await?;
        moved.jobs.push(entry.job_id);
    }
    Ok(moved)
}

async fn dead_letter_stream(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
) -> Result<Stream, DlqError> {
    jetstream
        .get_stream(queue.dead_letter_stream())
        .await
        .map_err(|source| DlqError::Stream {
            stream: queue.dead_letter_stream(),
            source,
        })
}

/// Reads the dead letters present when the stream was looked up, oldest first from sequence
/// `start`, and keeps `keep(dead letter)` of up to `limit` that `selector` chooses (a listing
/// keeps the entries only, so payloads are not held). Each is read with the non-direct
/// `$JS.API.STREAM.MSG.GET` (one request per dead letter, deleted sequences skipped by the
/// server) and its header block decoded by [`crate::protocol::block`], never by the NATS
/// client: a message published straight into the dead-letter subject with headers the client
/// cannot read (a bare CR, non-UTF-8) is listed like any other instead of taking the connection
/// down.
async fn scan<T>(
    jetstream: &jetstream::Context,
    stream: &Stream,
    start: u64,
    selector: &Selector,
    limit: usize,
    keep: impl Fn(DeadLetterJob) -> T,
) -> Result<Vec<T>, DlqError> {
    let info = stream.cached_info();
    let name = info.config.name.clone();
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut found = Vec::new();
    if info.state.messages == 0 || limit == 0 {
        return Ok(found);
    }
    let client = jetstream.client();
    let mut from = first.max(start);
    while from <= last {
        let read = stored::next(&client, &name, ">", from);
        let job = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Err(_) => {
                return Err(DlqError::Scan {
                    stream: name,
                    reason: format!("no answer for sequence {from} in {READ_TIMEOUT:?}"),
                });
            }
            Ok(Err(error)) => {
                return Err(DlqError::Scan {
                    stream: name,
                    reason: error.to_string(),
                });
            }
            // Everything up to `last` was deleted meanwhile.
            Ok(Ok(None)) => break,
            Ok(Ok(Some(job))) => job,
        };
        if job.sequence > last {
            break;
        }
        from = job.sequence.saturating_add(1);
        let job = DeadLetterJob::read(job);
        if selector.matches(&job.entry) {
            found.push(keep(job));
            if found.len() >= limit {
                break;
            }
        }
    }
    Ok(found)
}

/// Deletes one dead letter; one that is already gone counts as deleted.
async fn delete(
    jetstream: &jetstream::Context,
    stream: &Stream,
    sequence: u64,
) -> Result<(), DlqError> {
    let name = &stream.cached_info().config.name;
    stored::delete(&jetstream.client(), name, sequence)
        .await
        .map_err(DlqError::Delete)
}

/// The subject a requeued job goes to: the one it was submitted to when that is one of this
/// queue's job subjects, or its waiting subject for a job that was waiting (it waits again
/// for its dependencies or children), else level 0.
fn requeue_subject(queue: &QueueRef, original: &str) -> String {
    for waiting in ["waiting", "cont"] {
        if original.starts_with(&format!("{}.{waiting}.", queue.subject_prefix())) {
            return original.to_owned();
        }
    }
    let prefix = format!("{}.jobs.", queue.subject_prefix());
    match original.strip_prefix(&prefix) {
        Some(level) if level.parse::<u8>().is_ok() => original.to_owned(),
        _ => queue.job_subject(0),
    }
}

/// The job's own headers, without the failure headers, with its job id kept in
/// `Conveyor-Job-Id` and a `Nats-Msg-Id` that deduplication has not seen yet (but that a
/// retried requeue of the same dead letter repeats).
fn requeue_headers(job: &DeadLetterJob) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in job.headers.iter() {
        let name: &str = name.as_ref();
        let skip = FAILURE_HEADERS
            .iter()
            .chain([&protocol::MSG_ID])
            .any(|h| h.eq_ignore_ascii_case(name))
            || name.starts_with("Nats-");
        if skip {
            continue;
        }
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    headers.insert(dead_letter::JOB_ID, job.entry.job_id.as_str());
    headers.insert(
        protocol::MSG_ID,
        format!("{}:requeue:{}", job.entry.job_id, job.entry.sequence).as_str(),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, reason: &str, error: &str) -> DeadLetter {
        let mut headers = HeaderMap::new();
        headers.insert(dead_letter::JOB_ID, id);
        headers.insert(dead_letter::REASON, reason);
        headers.insert(dead_letter::ERROR, error);
        headers.insert(dead_letter::ATTEMPTS, "3");
        DeadLetter::from_headers(7, &headers)
    }

    #[test]
    fn selectors_choose_by_id_error_or_all() {
        let e = entry("job-1", "permanent", "Connection Refused by upstream");
        assert_eq!(e.attempts, Some(3));
        assert!(Selector::One("job-1".into()).matches(&e));
        assert!(!Selector::One("job-2".into()).matches(&e));
        assert!(Selector::ErrorMatch("connection refused".into()).matches(&e));
        assert!(Selector::ErrorMatch("PERMANENT".into()).matches(&e));
        assert!(!Selector::ErrorMatch("timeout".into()).matches(&e));
        assert!(Selector::All.matches(&e));
    }

    #[test]
    fn requeue_keeps_the_level_and_the_id_with_a_fresh_msg_id() {
        let queue = QueueRef::new("ns", "q");
        assert_eq!(
            requeue_subject(&queue, "conveyor.ns.q.jobs.2"),
            "conveyor.ns.q.jobs.2"
        );
        assert_eq!(
            requeue_subject(&queue, "elsewhere.jobs.2"),
            "conveyor.ns.q.jobs.0"
        );
        assert_eq!(requeue_subject(&queue, ""), "conveyor.ns.q.jobs.0");

        let mut headers = HeaderMap::new();
        headers.insert(protocol::MSG_ID, "job-1:41");
        headers.insert(dead_letter::JOB_ID, "job-1");
        headers.insert(dead_letter::REASON, "exhausted");
        headers.insert(dead_letter::ERROR, "boom");
        headers.insert(protocol::REPLY_TO, "_INBOX.x");
        headers.insert("X-Trace", "abc");
        let job = DeadLetterJob {
            entry: DeadLetter::from_headers(9, &headers),
            headers,
            payload: Bytes::new(),
        };
        let out = requeue_headers(&job);
        assert_eq!(
            out.get(protocol::MSG_ID).unwrap().as_str(),
            "job-1:requeue:9"
        );
        assert_eq!(out.get(dead_letter::JOB_ID).unwrap().as_str(), "job-1");
        assert_eq!(out.get("X-Trace").unwrap().as_str(), "abc");
        assert_eq!(out.get(protocol::REPLY_TO).unwrap().as_str(), "_INBOX.x");
        assert!(out.get(dead_letter::REASON).is_none());
        assert!(out.get(dead_letter::ERROR).is_none());
    }
}
