//! Jobs as stored in a queue's work stream, read without the NATS client's header parser, and
//! dead-lettered from there.
//!
//! async-nats 0.51 panics in its connection task on a header value with a bare CR and drops
//! the connection on a non-UTF-8 header block, so such a job can never be delivered to a
//! worker. Whoever must deal with one reads it with the non-direct `$JS.API.STREAM.MSG.GET`
//! (its JSON answer carries the header block base64-encoded) and decodes the block with
//! [`crate::protocol::block`]:
//! - the dispatcher, for every job that reached `max_deliver` without a handler report;
//! - a worker runtime whose connection just died ([`sweep_unreadable`]): the job that killed it
//!   is among the ones delivered to its consumers last, so it is dead-lettered at once instead
//!   of taking down every worker it reaches, and the jobs delivered beside it, on each of its
//!   deliveries.

use async_nats::HeaderMap;
use async_nats::jetstream;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::names::QueueRef;
use crate::protocol::block::{BadHeader, HeaderBlock};
use crate::protocol::{self, DeadLetter, JobEnvelope, Outcome, Reason, envelope, record};

/// JetStream's error code for a sequence that holds no message.
const NO_MESSAGE_FOUND: u64 = 10037;
/// JetStream's error code for a stream that does not exist.
const STREAM_NOT_FOUND: u64 = 10059;

/// A failed step of reading or dead-lettering a stored job; it can be tried again.
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    /// Reading the job failed.
    #[error("reading job {sequence} of stream {stream}: {reason}")]
    Get {
        /// Stream name.
        stream: String,
        /// Sequence of the job.
        sequence: u64,
        /// What went wrong.
        reason: String,
        /// The JetStream error code, when the server answered with one.
        code: Option<u64>,
    },
    /// Publishing the dead letter failed.
    #[error("publishing the dead letter of job {job}")]
    Publish {
        /// Job id.
        job: String,
        /// Cause.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// Deleting the job from the work stream failed.
    #[error("deleting job {sequence} from stream {stream}: {reason}")]
    Delete {
        /// Stream name.
        stream: String,
        /// Sequence of the job.
        sequence: u64,
        /// What went wrong.
        reason: String,
    },
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct StoredJob {
    /// The subject it was published to.
    pub subject: String,
    /// Its sequence in the stream.
    pub sequence: u64,
    /// Its header block as stored, if it has one.
    pub raw_headers: Option<Vec<u8>>,
    /// Its payload.
    pub payload: Bytes,
    /// When the server stored it (RFC 3339, as the server wrote it).
    pub time: String,
}

/// The answer of `$JS.API.STREAM.MSG.GET`.
#[derive(Debug, Deserialize)]
struct MsgGetAnswer {
    message: Option<MsgGetMessage>,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct MsgGetMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    time: String,
    hdrs: Option<String>,
    data: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// The job at `sequence` of `stream`, or `None` when the sequence holds none (acked, deleted).
pub async fn get(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
) -> Result<Option<StoredJob>, StoredError> {
    message_get(
        client,
        stream,
        sequence,
        serde_json::json!({ "seq": sequence }),
    )
    .await
}

/// The first message of `stream` on `subject` (wildcards allowed) at or after sequence `from`,
/// or `None` when there is none: one request per message, however many were deleted between.
pub async fn next(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
) -> Result<Option<StoredJob>, StoredError> {
    let request = serde_json::json!({ "seq": from, "next_by_subj": subject });
    message_get(client, stream, from, request).await
}

/// Requests one [`scan`] keeps in flight. A continuation reading 100,000 child records (the
/// flow bench, release build): 19 s one request after another, 8.5 s with 16 lanes, 6 s with
/// 64, where the server's answers become the limit.
const SCAN_LANES: u64 = 64;

/// Up to `limit` messages of `stream` on `subject` (wildcards allowed) from sequence `from` on,
/// oldest first, the same as `limit` [`next`] requests one after another but up to
/// [`SCAN_LANES`] at a time: the `limit` sequences ahead are cut into as many windows (at most
/// `limit`), each read on its own, and
/// the next round starts after them (or, when every window was empty, at the first message any
/// window saw beyond itself). Each message is still read with the non-direct `MSG.GET` (no
/// header block through the client's parser); a round holds at most `limit` (rounded up to a
/// multiple of the lanes) messages, so what is read beyond `limit` is at most that many. Fewer
/// than `limit` means the stream has no more. A stream where the subject is sparse costs up to
/// one request per lane per round beyond what sequential reads would.
pub async fn scan(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<StoredJob>, StoredError> {
    let mut found: Vec<StoredJob> = Vec::new();
    let mut start = from;
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    // No more lanes than messages wanted: a page of one is one request, not 64.
    let lanes = SCAN_LANES.min(limit_u64).max(1);
    let width = limit_u64.div_ceil(lanes).max(1);
    // The windows of a round cover exactly `span` sequences, the next round starts after them.
    let span = width.saturating_mul(lanes);
    while found.len() < limit {
        let windows = (0..lanes).map(|lane| {
            let first = start.saturating_add(lane.saturating_mul(width));
            read_window(client, stream, subject, first, first.saturating_add(width))
        });
        let windows = futures::future::try_join_all(windows).await?;
        let mut beyond = None::<u64>;
        for window in windows {
            found.extend(window.messages);
            match window.end {
                WindowEnd::StreamEnd => return Ok(truncated(found, limit)),
                WindowEnd::Beyond(sequence) => {
                    beyond = Some(beyond.map_or(sequence, |b| b.min(sequence)))
                }
                WindowEnd::Covered => {}
            }
        }
        let after_round = start.saturating_add(span);
        if after_round == u64::MAX {
            break;
        }
        // Every message a window saw beyond itself is at or after `after_round` unless it was
        // inside a later window of this round, which read it: start at the nearest one.
        start = beyond.map_or(after_round, |b| b.max(after_round));
    }
    Ok(truncated(found, limit))
}

fn truncated(mut found: Vec<StoredJob>, limit: usize) -> Vec<StoredJob> {
    found.truncate(limit);
    found
}

/// How reading one window of a [`scan`] ended.
enum WindowEnd {
    /// Every message in it was read; none told what lies beyond.
    Covered,
    /// The first message after it is at this sequence.
    Beyond(u64),
    /// Nothing at or after the last sequence read: the stream's end.
    StreamEnd,
}

struct Window {
    messages: Vec<StoredJob>,
    end: WindowEnd,
}

/// The messages on `subject` in sequences `from..end`, one `next` request each.
async fn read_window(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
    end: u64,
) -> Result<Window, StoredError> {
    let mut messages = Vec::new();
    let mut at = from;
    while at < end {
        match next(client, stream, subject, at).await? {
            None => {
                return Ok(Window {
                    messages,
                    end: WindowEnd::StreamEnd,
                });
            }
            Some(message) if message.sequence >= end => {
                return Ok(Window {
                    messages,
                    end: WindowEnd::Beyond(message.sequence),
                });
            }
            Some(message) => {
                at = message.sequence.saturating_add(1);
                messages.push(message);
            }
        }
    }
    Ok(Window {
        messages,
        end: WindowEnd::Covered,
    })
}

/// Payload bytes one [`page`] holds at most (a page ends early when its payloads reach this,
/// keeping at least one message): pages are read with their payloads, which may be up to the
/// queue's `maxJobSize` each.
pub const PAGE_BYTES: usize = 4 * 1024 * 1024;

/// One page of `stream` on `subject` (wildcards allowed): up to `limit` messages from sequence
/// `from` on, oldest first, and the sequence the next page starts at (`None` after the last).
/// Reads at most `limit + 1` messages, one request each, whatever lies between them, and holds
/// at most [`PAGE_BYTES`] of payloads (plus one message): a page cut by that budget names the
/// sequence after its last message as the next, which may turn out empty.
pub async fn page(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
    limit: usize,
) -> Result<(Vec<StoredJob>, Option<u64>), StoredError> {
    let mut found: Vec<StoredJob> = Vec::with_capacity(limit.saturating_add(1).min(1024));
    let mut bytes = 0usize;
    let mut at = from.max(1);
    while found.len() <= limit {
        if bytes >= PAGE_BYTES && !found.is_empty() {
            return Ok((found, Some(at)));
        }
        let Some(job) = next(client, stream, subject, at).await? else {
            break;
        };
        at = job.sequence.saturating_add(1);
        bytes = bytes.saturating_add(job.payload.len());
        found.push(job);
    }
    let next = (found.len() > limit).then(|| found[limit].sequence);
    found.truncate(limit);
    Ok((found, next))
}

/// The newest message of `stream` on `subject`, or `None` when there is none.
pub async fn last(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
) -> Result<Option<StoredJob>, StoredError> {
    let request = serde_json::json!({ "last_by_subj": subject });
    message_get(client, stream, 0, request).await
}

/// [`last`], with a stream that does not exist read as empty (a job of a queue that was never
/// made, or was deleted, has no stored outcome).
pub async fn last_if_stream(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
) -> Result<Option<StoredJob>, StoredError> {
    match last(client, stream, subject).await {
        Err(StoredError::Get { code, .. }) if code == Some(STREAM_NOT_FOUND) => Ok(None),
        other => other,
    }
}

/// One `$JS.API.STREAM.MSG.GET` request; `sequence` names the message in errors.
async fn message_get(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
    request: serde_json::Value,
) -> Result<Option<StoredJob>, StoredError> {
    let failed = |reason: String| StoredError::Get {
        stream: stream.to_owned(),
        sequence,
        reason,
        code: None,
    };
    let answer = client
        .request(
            format!("$JS.API.STREAM.MSG.GET.{stream}"),
            request.to_string().into(),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
    let answer: MsgGetAnswer =
        serde_json::from_slice(&answer.payload).map_err(|e| failed(e.to_string()))?;
    if let Some(error) = answer.error {
        return if error.err_code == NO_MESSAGE_FOUND {
            Ok(None)
        } else {
            Err(StoredError::Get {
                stream: stream.to_owned(),
                sequence,
                reason: format!("{} (error {})", error.description, error.err_code),
                code: Some(error.err_code),
            })
        };
    }
    let message = answer
        .message
        .ok_or_else(|| failed("the answer has neither message nor error".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw_headers = match message.hdrs {
        Some(hdrs) => Some(b64.decode(hdrs).map_err(|e| failed(e.to_string()))?),
        None => None,
    };
    let payload = match message.data {
        Some(data) => b64.decode(data).map_err(|e| failed(e.to_string()))?,
        None => Vec::new(),
    };
    Ok(Some(StoredJob {
        subject: message.subject,
        sequence: message.seq,
        raw_headers,
        payload: payload.into(),
        time: message.time,
    }))
}

/// Deletes the message at `sequence` of `stream` (one API request, no stream lookup); a
/// sequence that holds none any more counts as deleted.
pub async fn delete(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
) -> Result<(), StoredError> {
    let failed = |reason: String| StoredError::Delete {
        stream: stream.to_owned(),
        sequence,
        reason,
    };
    let request = serde_json::json!({ "seq": sequence, "no_erase": true }).to_string();
    let answer = client
        .request(
            format!("$JS.API.STREAM.MSG.DELETE.{stream}"),
            request.into(),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
    let answer: MsgDeleteAnswer =
        serde_json::from_slice(&answer.payload).map_err(|e| failed(e.to_string()))?;
    match answer.error {
        None if answer.success => Ok(()),
        None => Err(failed("the server did not confirm the delete".into())),
        Some(error) if error.err_code == NO_MESSAGE_FOUND => Ok(()),
        Some(error) => Err(failed(format!(
            "{} (error {})",
            error.description, error.err_code
        ))),
    }
}

/// The answer of `$JS.API.STREAM.MSG.DELETE`.
#[derive(Debug, Deserialize)]
struct MsgDeleteAnswer {
    #[serde(default)]
    success: bool,
    error: Option<ApiError>,
}

/// What a stored job's bytes say, decoded by the protocol's rules.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Its id (`<stream>:<sequence>` when none is readable).
    pub id: String,
    /// Its well-formed headers.
    pub headers: HeaderMap,
    /// Header lines the NATS client cannot carry (a worker can never receive the job).
    pub unreadable: Vec<BadHeader>,
    /// The first protocol rule it breaks, if any (unreadable lines included).
    pub malformed: Option<String>,
    /// A valid inbox to answer, if it named one.
    pub reply_to: Option<String>,
}

impl StoredJob {
    /// Its header block decoded by the protocol's rules (total over any bytes): the lines the
    /// NATS client can carry, and the ones it cannot.
    pub fn block(&self) -> HeaderBlock {
        let block = match self.raw_headers.as_deref() {
            None => Ok(HeaderBlock {
                headers: Vec::new(),
                bad: Vec::new(),
            }),
            Some(raw) => HeaderBlock::decode(raw),
        };
        block.unwrap_or_else(|_| HeaderBlock {
            headers: Vec::new(),
            bad: vec![BadHeader {
                name: String::new(),
                problem: "the block does not start with NATS/1.0",
            }],
        })
    }

    /// Decodes the job's header block and envelope; total over any bytes.
    pub fn read(&self, stream: &str) -> Reading {
        let block = self.block();
        let headers = block.header_map();
        let unreadable_text = block.bad.first().map(|bad| match block.bad.len() - 1 {
            0 => format!("unreadable header block: {bad}"),
            more => format!("unreadable header block: {bad} (and {more} more)"),
        });
        let reply_to = headers
            .get(protocol::REPLY_TO)
            .and_then(|v| envelope::reply_subject(v.as_str()).ok())
            .map(str::to_owned);
        let (id, malformed) = match JobEnvelope::decode(Some(&headers), stream, self.sequence) {
            Ok(envelope) => (envelope.id, unreadable_text),
            Err(malformed) => (
                malformed.id,
                unreadable_text.or_else(|| Some(malformed.error.to_string())),
            ),
        };
        Reading {
            id,
            headers,
            unreadable: block.bad,
            malformed,
            reply_to,
        }
    }
}

/// Moves a stored job into the queue's dead-letter stream: publishes the copy (its original
/// header block kept when the client could not read it, see [`record::Original`]), stores the
/// outcome (and a child's record for its parent), deletes the job from the work stream and
/// answers an awaiting producer. Every
/// step can be repeated: the copy's `Nats-Msg-Id` is the same whoever writes it.
pub async fn dead_letter(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    job: &StoredJob,
    reading: &Reading,
    failure: (Reason, String),
    attempts: u64,
    pod: &str,
) -> Result<DeadLetter, StoredError> {
    let (reason, error) = failure;
    let letter = DeadLetter {
        job_id: reading.id.clone(),
        reason,
        error,
        attempts,
        pod: pod.to_owned(),
        original_subject: job.subject.clone(),
        original_sequence: job.sequence,
    };
    let original = match &job.raw_headers {
        Some(raw) if !reading.unreadable.is_empty() => record::Original::Block {
            raw,
            decoded: &reading.headers,
        },
        _ => record::Original::Headers(Some(&reading.headers)),
    };
    let headers = letter.encode(original, &protocol::now_rfc3339());
    let published = match jetstream
        .publish_with_headers(queue.dead_letter_subject(), headers, job.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()),
        Err(error) => Err(error),
    };
    published.map_err(|source| StoredError::Publish {
        job: letter.job_id.clone(),
        source,
    })?;
    let outcome = Outcome::dead_lettered(&letter);
    let result = outcome.encode(&letter.job_id);
    // Kept in the results stream too (every queue has one; it expires by its retention),
    // since no worker reported on this job; and, for a child or a continuation, in its
    // parent's records, so the parent's continuation is not left waiting for it. Both before
    // the job leaves the work stream: a failed record fails the step (it is repeated), since
    // dependents and a parent's continuation would otherwise wait until their wait timeout.
    let home = (queue.namespace.as_str(), queue.name.as_str());
    let flow =
        crate::protocol::flow::FlowHeaders::parse(&reading.headers, home).unwrap_or_default();
    match crate::flow::record_outcome(
        jetstream,
        queue,
        &letter.job_id,
        &flow,
        &outcome,
        &Bytes::new(),
        true,
    )
    .await
    {
        Ok(_) => {}
        Err(crate::flow::FlowError::Publish { source, .. }) => {
            return Err(StoredError::Publish {
                job: letter.job_id.clone(),
                source,
            });
        }
        Err(error) => {
            tracing::warn!(job = %letter.job_id, %error, "storing the dead-lettered outcome");
        }
    }
    delete(&jetstream.client(), &queue.stream(), job.sequence).await?;
    if let Some(reply) = &reading.reply_to {
        let nats = jetstream.client();
        if let Err(error) = nats
            .publish_with_headers(reply.clone(), result, Bytes::new())
            .await
        {
            tracing::warn!(job = %letter.job_id, %error, "answering the awaiting producer");
        }
    }
    Ok(letter)
}

/// Most stored jobs one sweep reads.
pub const SWEEP_LIMIT: u64 = 1024;
/// Most cancellations one sweep reads (a worker reads them all from the start, so an
/// unreadable one anywhere would take down every new client).
pub const CANCEL_SWEEP_LIMIT: u64 = 4096;

/// After a worker's connection died: reads the jobs its queue's consumers delivered last and
/// not yet acked (from each level's last delivered sequence down to its ack floor, at most
/// [`SWEEP_LIMIT`] in all) and dead-letters, as `malformed`, every one whose header block the
/// NATS client cannot read. Returns the ids dead-lettered.
pub async fn sweep_unreadable(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    priorities: u8,
    pod: &str,
) -> Result<Vec<String>, StoredError> {
    let stream = queue.stream();
    let mut swept = Vec::new();
    let mut budget = SWEEP_LIMIT;
    for level in 0..priorities {
        let info = match jetstream
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                queue.consumer(level),
                &stream,
            )
            .await
        {
            Ok(mut consumer) => match consumer.info().await {
                Ok(info) => info.clone(),
                Err(_) => continue,
            },
            Err(_) => continue,
        };
        let top = info.delivered.stream_sequence;
        let floor = info.ack_floor.stream_sequence;
        let mut sequence = top;
        while sequence > floor && budget > 0 {
            budget -= 1;
            if let Some(job) = get(&jetstream.client(), &stream, sequence).await?
                && let reading = job.read(&stream)
                && !reading.unreadable.is_empty()
            {
                let error = reading
                    .malformed
                    .clone()
                    .unwrap_or_else(|| "unreadable header block".into());
                let letter = dead_letter(
                    jetstream,
                    queue,
                    &job,
                    &reading,
                    (Reason::Malformed, error),
                    1,
                    pod,
                )
                .await?;
                swept.push(letter.job_id);
            }
            sequence -= 1;
        }
    }
    swept.extend(sweep_unreadable_cancels(jetstream, queue).await?);
    Ok(swept)
}

/// Deletes the cancellations no NATS client can read (oldest first, at most
/// [`CANCEL_SWEEP_LIMIT`]); a worker follows every cancellation from the start, so one such
/// message would take down each new client at once. Returns what their subjects name (the
/// hex of a job id, or the subject).
async fn sweep_unreadable_cancels(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
) -> Result<Vec<String>, StoredError> {
    let name = queue.cancel_stream();
    let Ok(mut stream) = jetstream.get_stream(&name).await else {
        return Ok(Vec::new());
    };
    let Ok(info) = stream.info().await else {
        return Ok(Vec::new());
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut deleted = Vec::new();
    let client = jetstream.client();
    for sequence in first..=last.min(first.saturating_add(CANCEL_SWEEP_LIMIT)) {
        let Some(message) = get(&client, &name, sequence).await? else {
            continue;
        };
        let unreadable = match message.raw_headers.as_deref() {
            Some(raw) => HeaderBlock::decode(raw).map_or(true, |block| !block.bad.is_empty()),
            None => false,
        };
        if unreadable {
            delete(&client, &name, sequence).await?;
            tracing::warn!(stream = %name, sequence, subject = %message.subject,
                           "deleted a cancellation no NATS client can read");
            deleted.push(message.subject);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(raw: Option<&[u8]>) -> StoredJob {
        StoredJob {
            subject: "conveyor.ns.q.jobs.0".into(),
            sequence: 5,
            raw_headers: raw.map(<[u8]>::to_vec),
            payload: Bytes::new(),
            time: String::new(),
        }
    }

    #[test]
    fn readings_follow_the_protocol() {
        let plain = stored(Some(b"NATS/1.0\r\nNats-Msg-Id: a\r\n\r\n")).read("s");
        assert_eq!((plain.id.as_str(), plain.malformed), ("a", None));
        let cr = stored(Some(b"NATS/1.0\r\nNats-Msg-Id: a\r\nX-Note: 1\r2\r\n\r\n")).read("s");
        assert_eq!(cr.id, "a");
        assert_eq!(cr.unreadable.len(), 1);
        let error = cr.malformed.unwrap();
        assert!(error.contains("X-Note: value contains a CR"), "{error}");
        let bad_option = stored(Some(b"NATS/1.0\r\nConveyor-Timeout: soon\r\n\r\n")).read("s");
        assert_eq!(bad_option.id, "s:5");
        assert!(bad_option.unreadable.is_empty());
        assert!(bad_option.malformed.is_some());
        let none = stored(None).read("s");
        assert_eq!((none.id.as_str(), none.malformed), ("s:5", None));
        let garbage = stored(Some(b"HTTP/1.1 200\r\n\r\n")).read("s");
        assert!(!garbage.unreadable.is_empty());
        let hostile = stored(Some(
            b"NATS/1.0\r\nConveyor-Reply-To: $JS.API.STREAM.PURGE.x\r\n\r\n",
        ))
        .read("s");
        assert_eq!(hostile.reply_to, None);
    }
}
