//! Dead letters as a worker writes them (`docs/protocol.md`, "Dead letters"), and the whole
//! dead-letter stream of a queue read back, for tests of what the operator, the CLI and the
//! dashboard make of them.
//!
//! ```no_run
//! # async fn demo(js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
//! use conveyor::names::QueueRef;
//! use conveyor_testkit::dead_letters::{self, Letter};
//! let queue = QueueRef::new("team", "thumbs");
//! dead_letters::publish(js, (1..=3).map(|i| Letter::of(&queue, &format!("job-{i}")).error("boom"))).await?;
//! assert_eq!(dead_letters::read_all(js, &queue).await?.len(), 3);
//! # Ok(()) }
//! ```

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use conveyor::names::QueueRef;
use conveyor::protocol::{self, dead_letter};
use futures::StreamExt as _;

/// How long reading one dead letter back may take.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// One dead letter of one queue: the headers a worker writes when a job runs out of attempts.
#[derive(Debug, Clone)]
pub struct Letter {
    subject: String,
    job_id: String,
    sequence: u64,
    reason: String,
    error: String,
    attempts: u32,
    pod: String,
    failed_at: String,
    original_subject: String,
    payload: Bytes,
}

impl Letter {
    /// The dead letter of job `id` of `queue`: reason `exhausted` after 3 attempts, failed now
    /// in pod `worker-abc`, first published at work-stream sequence 1 on priority level 0, with
    /// an empty JSON object as payload.
    pub fn of(queue: &QueueRef, id: &str) -> Self {
        Letter {
            subject: queue.dead_letter_subject(),
            job_id: id.to_owned(),
            sequence: 1,
            reason: "exhausted".to_owned(),
            error: "exit status 1".to_owned(),
            attempts: 3,
            pod: "worker-abc".to_owned(),
            failed_at: jiff::Timestamp::now().to_string(),
            original_subject: queue.job_subject(0),
            payload: Bytes::from_static(b"{}"),
        }
    }

    /// The error the last attempt ended with.
    pub fn error(mut self, error: &str) -> Self {
        self.error = error.to_owned();
        self
    }

    /// Why the job was dead-lettered (`exhausted`, `permanent`, …).
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = reason.to_owned();
        self
    }

    /// The attempts the job had.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// The worker pod that ran the last attempt.
    pub fn pod(mut self, pod: &str) -> Self {
        self.pod = pod.to_owned();
        self
    }

    /// When the last attempt failed (RFC 3339).
    pub fn failed_at(mut self, at: &str) -> Self {
        self.failed_at = at.to_owned();
        self
    }

    /// The job's sequence in the work stream (the dead letter's deduplication id is
    /// `<job id>:<sequence>`).
    pub fn sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    /// The job's payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    fn headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        let msg_id = format!("{}:{}", self.job_id, self.sequence);
        headers.insert(protocol::MSG_ID, msg_id.as_str());
        headers.insert(dead_letter::JOB_ID, self.job_id.as_str());
        headers.insert(dead_letter::REASON, self.reason.as_str());
        headers.insert(dead_letter::ERROR, self.error.as_str());
        headers.insert(dead_letter::ATTEMPTS, self.attempts.to_string().as_str());
        headers.insert(dead_letter::POD, self.pod.as_str());
        headers.insert(dead_letter::FAILED_AT, self.failed_at.as_str());
        headers.insert(dead_letter::SUBJECT, self.original_subject.as_str());
        headers
    }
}

/// Publishes the dead letters into their queues' dead-letter streams and waits until the
/// server has stored every one.
pub async fn publish(
    js: &jetstream::Context,
    letters: impl IntoIterator<Item = Letter>,
) -> anyhow::Result<()> {
    let mut acks = Vec::new();
    for letter in letters {
        let headers = letter.headers();
        let ack = js
            .publish_with_headers(letter.subject, headers, letter.payload)
            .await
            .context("publishing a dead letter")?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.context("storing a dead letter")?;
    }
    Ok(())
}

/// Messages in the queue's dead-letter stream now (0 while the stream does not exist).
pub async fn count(js: &jetstream::Context, queue: &QueueRef) -> u64 {
    crate::stream_messages(js, &queue.dead_letter_stream()).await
}

/// Every message of the queue's dead-letter stream, oldest first, read with an ordered
/// consumer (which acks nothing and leaves the stream as it was).
pub async fn read_all(
    js: &jetstream::Context,
    queue: &QueueRef,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let name = queue.dead_letter_stream();
    let mut stream = js
        .get_stream(&name)
        .await
        .with_context(|| format!("looking up {name}"))?;
    let total = stream.info().await.context("stream info")?.state.messages;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .context("creating an ordered consumer")?;
    let mut messages = consumer.messages().await.context("reading the stream")?;
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let next = tokio::time::timeout(READ_DEADLINE, messages.next())
            .await
            .with_context(|| {
                format!(
                    "dead letter {} of {total} within {READ_DEADLINE:?}",
                    out.len() + 1
                )
            })?
            .with_context(|| format!("{name} ended after {} of {total} messages", out.len()))?;
        out.push(
            next.map_err(|e| anyhow::anyhow!(e))
                .context("reading a dead letter")?,
        );
    }
    Ok(out)
}

/// The value of header `name` of a message (empty when it has none).
pub fn header(message: &jetstream::Message, name: &str) -> String {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str().to_owned())
        .unwrap_or_default()
}
