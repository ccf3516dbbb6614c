//! Reads what the status shows beyond the consumer figures, with a bounded number of JetStream
//! requests whatever the queue's size: the work stream's info, per priority level its
//! consumer's info and one read of the first job that consumer has not delivered yet (the oldest
//! pending job), the delayed stream's info with its per-subject counts of the `due.<level>`
//! subjects only (at most 10), the dead-letter stream's info, and at most [`TAIL`] of the
//! dead-letter stream's newest messages, read once each ([`Tail`]).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use conveyor::names::QueueRef;
use conveyor::protocol::{self, dead_letter};
use conveyor_crds::RecentFailure;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::status::{Counters, Health, excerpt};
use crate::assets::{Figures, QueueAssets};
use crate::figures::Level;

/// Most dead letters read per reconcile (newest first); also bounds the count shown in
/// `JobsFailing` ("at least N" beyond it).
pub const TAIL: u64 = 100;
/// Most jobs waiting to be dead-lettered named per reconcile (the oldest).
const EXHAUSTED_NAMED: usize = 3;
/// Longest wait for the next dead-letter header; the read ends early rather than hang.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A read of the queue's streams that failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// A stream's info could not be read.
    #[error("cannot look up stream {stream}: {source}")]
    Stream {
        /// Stream name.
        stream: String,
        /// The JetStream error.
        source: jetstream::context::GetStreamError,
    },
    /// A consumer's info could not be read.
    #[error("cannot look up consumer {consumer}: {reason}")]
    Consumer {
        /// Consumer name.
        consumer: String,
        /// What went wrong.
        reason: String,
    },
    /// Counting the due copies in the delayed stream failed.
    #[error("cannot count the due jobs of stream {stream}: {reason}")]
    Delayed {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
    /// Reading the dead letters' headers failed.
    #[error("cannot read the dead letters of stream {stream}: {reason}")]
    Tail {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
}

/// The figures of a queue whose assets were ensured before, read without changing anything
/// (one info request per stream and per consumer, where ensuring them would be one update
/// each): `Ok(None)` when a stream or consumer of `assets` is missing (deleted behind the
/// operator's back, or a server that lost its store), so the caller ensures them again.
pub async fn existing_figures(
    js: &jetstream::Context,
    assets: &QueueAssets,
) -> Result<Option<Figures>, ObserveError> {
    let stream_missing = |err: &jetstream::context::GetStreamError| {
        matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
    };
    for config in assets.companions.iter().chain([&assets.stream]) {
        match js.get_stream(&config.name).await {
            Ok(_) => {}
            Err(err) if stream_missing(&err) => return Ok(None),
            Err(source) => {
                return Err(ObserveError::Stream {
                    stream: config.name.clone(),
                    source,
                });
            }
        }
    }
    let mut figures = Figures::default();
    for config in &assets.consumers {
        let name = config.durable_name.clone().unwrap_or_default();
        let found: Result<jetstream::consumer::PullConsumer, _> = js
            .get_consumer_from_stream(&name, &assets.stream.name)
            .await;
        match found {
            Ok(consumer) => {
                let info = consumer.cached_info();
                figures.pending = figures.pending.saturating_add(info.num_pending);
                figures.in_flight = figures
                    .in_flight
                    .saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX));
            }
            Err(err)
                if matches!(err.kind(), jetstream::stream::ConsumerErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                        || e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                return Ok(None);
            }
            Err(err) => {
                return Err(ObserveError::Consumer {
                    consumer: name,
                    reason: err.to_string(),
                });
            }
        }
    }
    Ok(Some(figures))
}

/// The oldest pending job's age, the delayed and dead-letter counts and the newest dead letters
/// (with the [`Tail`] read, to pass back as `previous` next time).
pub async fn health(
    js: &jetstream::Context,
    queue: &QueueRef,
    now: Timestamp,
    previous: Option<Tail>,
) -> Result<(Health, Tail), ObserveError> {
    let stream_error = |stream: String| move |source| ObserveError::Stream { stream, source };
    let work = js
        .get_stream(queue.stream())
        .await
        .map_err(stream_error(queue.stream()))?;
    let state = &work.cached_info().state;
    let counters = Counters {
        submitted: state.last_sequence,
        stored: state.messages,
    };
    let levels = u8::try_from(work.cached_info().config.subjects.len())
        .unwrap_or(u8::MAX)
        .clamp(1, conveyor::admin::MAX_PRIORITIES);
    let (oldest, level_figures) = oldest_pending(&work, queue, levels).await;
    let oldest_age = oldest.map(|seconds| age(now, seconds));
    let dlq_name = queue.dead_letter_stream();
    let dlq = js
        .get_stream(&dlq_name)
        .await
        .map_err(stream_error(dlq_name.clone()))?;
    let state = dlq.cached_info().state.clone();
    let tail = read_tail(&js.client(), &dlq_name, &state, previous)
        .await
        .map_err(|reason| ObserveError::Tail {
            stream: dlq_name.clone(),
            reason,
        })?;
    let exhausted = conveyor::dlq::exhausted(js, queue, EXHAUSTED_NAMED)
        .await
        .map_err(|e| ObserveError::Tail {
            stream: queue.events_stream(),
            reason: e.to_string(),
        })?;
    let delayed_name = queue.delayed_stream();
    let delayed = delayed_jobs(js, queue, &delayed_name).await?;
    // One STREAM.INFO: its message count is the figure.
    let waiting_name = queue.waiting_stream();
    let waiting = js
        .get_stream(&waiting_name)
        .await
        .map_err(stream_error(waiting_name.clone()))?
        .cached_info()
        .state
        .messages;
    Ok((
        Health {
            delayed,
            waiting,
            counters,
            rates: None,
            dead_lettered: state.messages,
            oldest_age,
            tail_complete: state.messages <= tail.entries.len() as u64,
            tail: tail.newest_first(),
            exhausted,
            levels: level_figures,
            dead_letters_ever: state.last_sequence,
        },
        tail,
    ))
}

/// The newest dead letters as last read, and the stream state they were read at, so the next
/// reconcile reads only what was added since (none when nothing changed).
#[derive(Debug, Clone, Default)]
pub struct Tail {
    last: u64,
    messages: u64,
    /// Oldest first, with their sequences.
    entries: Vec<(u64, RecentFailure)>,
}

impl Tail {
    fn newest_first(&self) -> Vec<RecentFailure> {
        self.entries.iter().rev().map(|(_, f)| f.clone()).collect()
    }
}

/// Reads the newest [`TAIL`] dead letters, one non-direct `$JS.API.STREAM.MSG.GET` each (their
/// header blocks decoded by the protocol's rules, never by the NATS client: anyone who may
/// publish on the dead-letter subject could have put headers there that the client cannot
/// read). What `previous` read is kept while the stream only grew (or lost its oldest
/// messages with no gap left), so a quiet queue costs no request at all.
async fn read_tail(
    client: &async_nats::Client,
    stream: &str,
    state: &jetstream::stream::State,
    previous: Option<Tail>,
) -> Result<Tail, String> {
    let mut tail = Tail {
        last: state.last_sequence,
        messages: state.messages,
        entries: Vec::new(),
    };
    if state.messages == 0 {
        return Ok(tail);
    }
    let start = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(TAIL - 1));
    let mut from = start;
    if let Some(previous) = previous.filter(|p| p.last <= state.last_sequence) {
        let appended = state.last_sequence - previous.last;
        let only_appended = state.messages == previous.messages.saturating_add(appended);
        let no_gaps = state.last_sequence - state.first_sequence + 1 == state.messages;
        if only_appended || no_gaps {
            from = from.max(previous.last + 1);
            tail.entries = previous
                .entries
                .into_iter()
                .filter(|(sequence, _)| *sequence >= start)
                .collect();
        }
    }
    while from <= state.last_sequence {
        let read = conveyor::stored::next(client, stream, ">", from);
        let job = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Err(_) => return Err(format!("no answer for sequence {from} in {READ_TIMEOUT:?}")),
            Ok(Err(error)) => return Err(error.to_string()),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(job))) => job,
        };
        if job.sequence > state.last_sequence {
            break;
        }
        from = job.sequence.saturating_add(1);
        let stored = job.time.parse::<Timestamp>().ok();
        let failure = recent_failure(&job.block().header_map(), stored);
        tail.entries.push((job.sequence, failure));
    }
    let excess = tail.entries.len().saturating_sub(TAIL as usize);
    tail.entries.drain(..excess);
    Ok(tail)
}

/// When the oldest job that waits for a worker was stored (Unix seconds), over every level;
/// `None` when no level has one (or it could not be read). Each level's consumer delivers in
/// stream order, so its first undelivered job is the first one on the level's subject after the
/// last sequence it delivered; jobs delivered and not yet finished (running, or waiting out a
/// retry backoff) are in flight, not pending, and do not count, so the age agrees with
/// `pending`. Also each level's consumer figures, read on the way, for the metrics.
async fn oldest_pending(
    work: &jetstream::stream::Stream,
    queue: &QueueRef,
    levels: u8,
) -> (Option<i64>, Vec<Option<Level>>) {
    let mut oldest: Option<i64> = None;
    let mut figures = Vec::with_capacity(usize::from(levels));
    for level in 0..levels {
        let Ok(info) = work.consumer_info(queue.consumer(level)).await else {
            figures.push(None);
            continue;
        };
        figures.push(Some(Level {
            pending: info.num_pending,
            in_flight: u64::try_from(info.num_ack_pending).unwrap_or(0),
            deliveries: info.delivered.consumer_sequence,
        }));
        if info.num_pending == 0 {
            continue;
        }
        let from = info.delivered.stream_sequence.saturating_add(1);
        if let Ok(first) = work
            .get_first_raw_message_by_subject(queue.job_subject(level), from)
            .await
        {
            let stored = first.time.unix_timestamp();
            oldest = Some(oldest.map_or(stored, |o| o.min(stored)));
        }
    }
    (oldest, figures)
}

/// Jobs in the delayed stream that are not due yet: its messages minus the due copies on
/// `<prefix>.due.<level>`, which stay there (for their `Nats-Schedule-TTL`) after the work
/// stream sourced them and are no longer delayed.
async fn delayed_jobs(
    js: &jetstream::Context,
    queue: &QueueRef,
    name: &str,
) -> Result<u64, ObserveError> {
    let stream = js
        .get_stream(name)
        .await
        .map_err(|source| ObserveError::Stream {
            stream: name.to_owned(),
            source,
        })?;
    if stream.cached_info().state.messages == 0 {
        return Ok(0);
    }
    let mut due = 0u64;
    let mut subjects = stream
        .info_with_subjects(format!("{}.due.*", queue.subject_prefix()))
        .await
        .map_err(|e| ObserveError::Delayed {
            stream: name.to_owned(),
            reason: e.to_string(),
        })?;
    // Counted in the same reading as the per-subject counts.
    let messages = subjects.info.state.messages;
    while let Some(entry) = subjects.next().await {
        let (_, count) = entry.map_err(|e| ObserveError::Delayed {
            stream: name.to_owned(),
            reason: e.to_string(),
        })?;
        due += count as u64;
    }
    Ok(messages.saturating_sub(due))
}

fn age(now: Timestamp, unix_seconds: i64) -> Duration {
    let secs = now.as_second().saturating_sub(unix_seconds);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// A dead letter's headers as shown in `status.recentFailures`; `stored` (when JetStream stored
/// it) stands in for a missing or unreadable `Conveyor-Failed-At`.
fn recent_failure(headers: &HeaderMap, stored: Option<Timestamp>) -> RecentFailure {
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let job_id = Some(get(dead_letter::JOB_ID))
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| get(protocol::MSG_ID));
    let time = get(dead_letter::FAILED_AT)
        .parse::<Timestamp>()
        .ok()
        .or(stored)
        .map(Time);
    RecentFailure {
        job_id,
        attempts: get(dead_letter::ATTEMPTS).trim().parse().ok(),
        reason: get(dead_letter::REASON),
        error: excerpt(&get(dead_letter::ERROR)),
        pod: get(dead_letter::POD),
        time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_dead_letter_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(dead_letter::JOB_ID, "job-7");
        headers.insert(dead_letter::ATTEMPTS, "3");
        headers.insert(dead_letter::REASON, "exhausted");
        headers.insert(dead_letter::ERROR, "x".repeat(1000).as_str());
        headers.insert(dead_letter::POD, "work-1");
        headers.insert(dead_letter::FAILED_AT, "2026-11-23T18:00:00Z");
        let f = recent_failure(&headers, None);
        assert_eq!(f.job_id, "job-7");
        assert_eq!(f.attempts, Some(3));
        assert_eq!(f.error.chars().count(), 201);
        assert_eq!(f.time.unwrap().0.to_string(), "2026-11-23T18:00:00Z");
    }

    #[test]
    fn falls_back_to_the_message_id_and_the_stored_time() {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::MSG_ID, "job-8:12");
        let stored = Timestamp::from_second(1000).unwrap();
        let f = recent_failure(&headers, Some(stored));
        assert_eq!(f.job_id, "job-8:12");
        assert_eq!(f.attempts, None);
        assert_eq!(f.time, Some(Time(stored)));
    }

    #[test]
    fn ages_never_go_negative() {
        let now = Timestamp::from_second(100).unwrap();
        assert_eq!(age(now, 40), Duration::from_secs(60));
        assert_eq!(age(now, 140), Duration::ZERO);
    }
}
