//! A bounded look at the jobs a queue holds: one page of a priority level's pending jobs (each
//! marked delivered or not) or of its delayed jobs, oldest first, read by subject and sequence
//! ([`stored::page`]) — never a scan. The dashboard and `conveyor jobs list` show these.

use async_nats::HeaderMap;
use async_nats::jetstream;

use crate::names::QueueRef;
use crate::protocol::schedule::SCHEDULE;
use crate::stored::{self, StoredError, StoredJob};

/// Which jobs to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jobs {
    /// The pending jobs of one priority level.
    Pending(u8),
    /// The delayed jobs (not due yet).
    Delayed,
}

/// One job as peeked: where it is stored and what its headers say.
#[derive(Debug, Clone)]
pub struct Peeked {
    /// Its sequence in the stream.
    pub sequence: u64,
    /// Its id (`<stream>:<sequence>` when none is readable).
    pub id: String,
    /// Payload size in bytes.
    pub size: usize,
    /// When the server stored it (RFC 3339).
    pub stored_at: String,
    /// Pending jobs: delivered to a worker and not acked yet (running, or waiting for its
    /// retry); `false`: no worker has taken it yet.
    pub delivered: Option<bool>,
    /// Delayed jobs: the schedule (`@at <time>`).
    pub run_at: Option<String>,
    /// A protocol rule it breaks (a worker will dead-letter it as `malformed`).
    pub malformed: Option<String>,
    /// Its well-formed headers.
    pub headers: HeaderMap,
}

/// A peek that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    /// The queue has no consumer for the level (no such level, or no such queue).
    #[error("queue {queue} has no priority level {level} (or the queue is not there)")]
    NoLevel {
        /// The queue's stream.
        queue: String,
        /// The level asked for.
        level: u8,
    },
    /// Reading the level's consumer failed.
    #[error("reading consumer {consumer}: {reason}")]
    Consumer {
        /// The consumer's name.
        consumer: String,
        /// What went wrong.
        reason: String,
    },
    /// Reading the jobs failed.
    #[error(transparent)]
    Stored(#[from] StoredError),
}

/// One page of `jobs` of `queue` from stream sequence `from`, at most `limit` jobs (and at most
/// [`stored::PAGE_BYTES`] of payloads), and the sequence the next page starts at.
pub async fn page(
    js: &jetstream::Context,
    queue: &QueueRef,
    jobs: Jobs,
    from: u64,
    limit: usize,
) -> Result<(Vec<Peeked>, Option<u64>), PeekError> {
    let (stream, subject, delivered_up_to) = match jobs {
        Jobs::Pending(level) => (
            queue.stream(),
            queue.job_subject(level),
            Some(delivered_up_to(js, queue, level).await?),
        ),
        Jobs::Delayed => (queue.delayed_stream(), queue.delayed_wildcard(), None),
    };
    let (found, next) = stored::page(&js.client(), &stream, &subject, from, limit).await?;
    let peeked = found
        .iter()
        .map(|job| peeked(job, &stream, delivered_up_to))
        .collect();
    Ok((peeked, next))
}

/// The stream sequence of the last job the level's consumer delivered (0 before any): a job at
/// or below it was delivered, one above it was not.
async fn delivered_up_to(
    js: &jetstream::Context,
    queue: &QueueRef,
    level: u8,
) -> Result<u64, PeekError> {
    let consumer = queue.consumer(level);
    // One CONSUMER.INFO request: its answer holds the delivered sequence.
    match js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            &consumer,
            queue.stream(),
        )
        .await
    {
        Ok(found) => Ok(found.cached_info().delivered.stream_sequence),
        Err(e) => match e.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                    || api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(PeekError::NoLevel {
                    queue: queue.stream(),
                    level,
                })
            }
            _ => Err(PeekError::Consumer {
                consumer,
                reason: e.to_string(),
            }),
        },
    }
}

fn peeked(job: &StoredJob, stream: &str, delivered_up_to: Option<u64>) -> Peeked {
    let reading = job.read(stream);
    Peeked {
        sequence: job.sequence,
        size: job.payload.len(),
        stored_at: job.time.clone(),
        delivered: delivered_up_to.map(|up_to| job.sequence <= up_to),
        run_at: reading.headers.get(SCHEDULE).map(|v| v.as_str().to_owned()),
        malformed: reading.malformed,
        id: reading.id,
        headers: reading.headers,
    }
}
