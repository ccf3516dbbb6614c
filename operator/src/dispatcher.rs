//! The dispatcher: moves jobs that exhausted `max_deliver` without any handler report (their
//! worker crashed or hung on every attempt) into the queue's dead-letter stream.
//!
//! JetStream announces such a job only with a fire-and-forget `MAX_DELIVERIES` advisory, so each
//! queue has an events stream (`conveyor::admin::events_stream_config`) that captures those
//! advisories while no dispatcher runs. For every queue of the JobQueue store, the dispatcher of
//! the queue's server reads its events stream through a durable consumer. Per advisory:
//! fetch the job from the work stream by sequence, publish it to the dead-letter subject with the
//! dead-letter headers and the `Nats-Msg-Id` `<job id>:<work sequence>` (the id a worker would
//! use, so neither a replayed advisory nor a worker racing the dispatcher stores it twice),
//! delete it from the work stream, answer an awaiting producer, and only then ack the advisory.
//! A job that is already gone (a worker dead-lettered it) only gets its advisory acked. Every
//! step is repeatable, so a dispatcher killed at any point resumes where the durable consumer
//! stands, and a NATS restart only delays it. The hot path (publish, pull, ack) never waits on
//! it. [`run`] keeps one dispatcher per NATS server the operator uses.
//!
//! The dispatcher also runs, for every queue it serves, the releaser of jobs that wait for
//! jobs ([`conveyor::flow::Releaser`]): it moves a waiting job to the work stream once its
//! dependencies (or a continuation's children) are done, exactly once, or dead-letters it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use conveyor::dlq::Advisory;
use conveyor::flow::Releaser;
use conveyor::names::{DISPATCHER_CONSUMER, QueueRef};
use conveyor::protocol::Reason;
use conveyor::stored::{self, StoredError};
use conveyor_crds::JobQueue;
use futures::StreamExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::conditions::reason;
use crate::context::Context;

/// How often the dispatcher asks for new and removed queues by default.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait of one pull for advisories.
const POLL_WAIT: Duration = Duration::from_secs(5);
/// An advisory taken but not acked (dispatcher killed mid-way) comes back after this long.
const ADVISORY_ACK_WAIT: Duration = Duration::from_secs(10);
/// Advisories taken per pull.
const BATCH: usize = 16;
/// Longest pause after an error before the dispatcher tries again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Runs a dispatcher on every NATS server the operator uses until `stop` is cancelled: the
/// default server from the start, and each server a queue's `spec.nats` names as soon as the
/// JobQueue controller connected to it (with that queue's credentials and TLS). Each serves the
/// JobQueues of the store that the controller connected through its client
/// ([`crate::nats::NatsPool::assigned`]). A server whose options change (a rotated Secret) gets a
/// new dispatcher on the new client. A job whose dead letter keeps failing to be written gets a
/// `DeadLetterFailed` Warning Event on its JobQueue, with the error.
pub async fn run(ctx: Arc<Context>, store: Store<JobQueue>, stop: CancellationToken) {
    if let Err(error) = ctx.nats.client(None).await {
        warn!(%error, "no client for the default NATS server yet");
    }
    let tasks = TaskTracker::new();
    let (failures, mut failed) = mpsc::channel::<Failure>(64);
    {
        let (ctx, store) = (ctx.clone(), store.clone());
        tasks.spawn(async move {
            while let Some(failure) = failed.recv().await {
                let key = ObjectRef::new(&failure.queue.name).within(&failure.queue.namespace);
                if let Some(jq) = store.get(&key) {
                    ctx.event(
                        &*jq,
                        EventType::Warning,
                        reason::DEAD_LETTER_FAILED,
                        failure.note(),
                    )
                    .await;
                }
            }
        });
    }
    let mut serving: HashMap<String, (u64, CancellationToken)> = HashMap::new();
    loop {
        // A client made anew (dead one replaced, rotated Secret) gets a new dispatcher.
        let _ = ctx.nats.client(None).await;
        for (server, generation, client) in ctx.nats.clients().await {
            if serving
                .get(&server)
                .is_some_and(|(served, _)| *served == generation)
            {
                continue;
            }
            let token = stop.child_token();
            if let Some((_, old)) = serving.insert(server.clone(), (generation, token.clone())) {
                old.cancel();
            }
            let (ctx, store) = (ctx.clone(), store.clone());
            let queues: Queues = Arc::new(move || {
                ctx.nats
                    .assigned(&server)
                    .into_iter()
                    .filter(|queue| {
                        let key = ObjectRef::new(&queue.name).within(&queue.namespace);
                        store
                            .get(&key)
                            .is_some_and(|jq| jq.metadata.deletion_timestamp.is_none())
                    })
                    .collect()
            });
            let dispatcher = Dispatcher::new(client, queues).report(failures.clone());
            tasks.spawn(dispatcher.run(token));
        }
        tokio::select! {
            () = tokio::time::sleep(DISCOVERY_INTERVAL) => {}
            () = stop.cancelled() => break,
        }
    }
    drop(failures);
    tasks.close();
    tasks.wait().await;
}

/// The queues a dispatcher serves, asked anew every interval.
pub type Queues = Arc<dyn Fn() -> Vec<QueueRef> + Send + Sync>;

/// A job whose dead letter could not be written, several times in a row.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Its queue.
    pub queue: QueueRef,
    /// Its sequence in the work stream.
    pub sequence: u64,
    /// Why (the step that failed and its causes).
    pub error: String,
}

impl Failure {
    fn note(&self) -> String {
        format!(
            "the job at sequence {} of the work stream exhausted its attempts, but its dead letter cannot be written: {}; it stays in the work stream (counted in status.awaitingDeadLetter) and is tried again",
            self.sequence, self.error
        )
    }
}

/// Failed attempts in a row after which a job's dead-letter failure is reported (fewer are a
/// passing outage).
const REPORT_AFTER: i64 = 3;

/// A failed step of dead-lettering; the advisory stays unacked and is tried again.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A stream of the queue is missing or unreachable.
    #[error("looking up stream {stream}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// The dispatcher's consumer on the events stream could not be created or found.
    #[error("creating consumer {DISPATCHER_CONSUMER} on stream {stream}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    /// Pulling advisories failed.
    #[error("pulling advisories from stream {stream}: {reason}")]
    Pull {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
    /// Reading, copying or deleting the job failed.
    #[error(transparent)]
    Stored(#[from] StoredError),
}

/// What became of one advisory's job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handled {
    /// Copied to the dead-letter stream (now or before) and removed from the work stream.
    DeadLettered,
    /// Not in the work stream any more: a worker dead-lettered or finished it.
    AlreadyGone,
}

/// Dead-letters the exhausted jobs of the queues it is given, on one NATS server.
#[derive(Clone)]
pub struct Dispatcher {
    jetstream: jetstream::Context,
    interval: Duration,
    queues: Queues,
    report: Option<mpsc::Sender<Failure>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher over `queues` (asked anew every interval; their streams, events stream
    /// included, are made by whoever made the queue: `conveyor::admin::ensure_queue`) on the
    /// server `client` is connected to. The client should reconnect by itself (the
    /// operator's clients do); the dispatcher retries meanwhile.
    pub fn new(client: async_nats::Client, queues: Queues) -> Self {
        Self {
            jetstream: jetstream::new(client),
            interval: DISCOVERY_INTERVAL,
            queues,
            report: None,
        }
    }

    /// Where to report jobs whose dead letter keeps failing (a full channel drops the report;
    /// the next failure sends it again).
    pub fn report(mut self, failures: mpsc::Sender<Failure>) -> Self {
        self.report = Some(failures);
        self
    }

    /// How often to look for new and removed queues (default 5 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Serves every queue found until `stop` is cancelled; finishes the advisory at hand first.
    pub async fn run(self, stop: CancellationToken) {
        info!("dispatcher started");
        let tasks = TaskTracker::new();
        let mut serving: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let queues = (self.queues)();
            serving.retain(|stream, token| {
                let keep = queues.iter().any(|q| q.stream() == *stream);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for queue in queues {
                if serving.contains_key(&queue.stream()) {
                    continue;
                }
                let token = stop.child_token();
                serving.insert(queue.stream(), token.clone());
                let this = self.clone();
                let (releasing, release_token) = (queue.clone(), token.clone());
                tasks.spawn(async move { this.serve(queue, token).await });
                let releaser = Releaser::new(self.jetstream.clone());
                tasks.spawn(async move { release(releaser, releasing, release_token).await });
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = stop.cancelled() => break,
            }
        }
        tasks.close();
        tasks.wait().await;
        info!("dispatcher stopped");
    }

    /// Reads one queue's advisories until `stop`, starting over after errors (NATS restarts).
    async fn serve(&self, queue: QueueRef, stop: CancellationToken) {
        debug!(queue = %queue.stream(), "dispatching");
        until_stopped(&queue, &stop, "dispatcher", || self.consume(&queue, &stop)).await;
    }

    /// Pulls and handles advisories; returns `Ok` only when stopped.
    async fn consume(
        &self,
        queue: &QueueRef,
        stop: &CancellationToken,
    ) -> Result<(), DispatchError> {
        let events_name = queue.events_stream();
        let events = self.stream(&events_name).await?;
        let consumer: consumer::PullConsumer = events
            .get_or_create_consumer(
                DISPATCHER_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(DISPATCHER_CONSUMER.to_owned()),
                    description: Some("Conveyor dispatcher: dead-letters exhausted jobs".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ADVISORY_ACK_WAIT,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| DispatchError::Consumer {
                stream: events_name.clone(),
                source,
            })?;
        let pull_failed = |reason: String| DispatchError::Pull {
            stream: events_name.clone(),
            reason,
        };
        loop {
            let mut batch = consumer
                .batch()
                .max_messages(BATCH)
                .expires(POLL_WAIT)
                .messages()
                .await
                .map_err(|e| pull_failed(e.to_string()))?;
            loop {
                let next = tokio::select! {
                    biased;
                    () = stop.cancelled() => return Ok(()),
                    next = batch.next() => next,
                };
                let Some(message) = next else { break };
                let message = message.map_err(|e| pull_failed(e.to_string()))?;
                self.handle(queue, message).await?;
            }
        }
    }

    /// Handles one advisory and acks it, or naks it when a step failed.
    async fn handle(
        &self,
        queue: &QueueRef,
        message: jetstream::Message,
    ) -> Result<(), DispatchError> {
        let advisory: Advisory = match serde_json::from_slice(&message.payload) {
            Ok(advisory) => advisory,
            Err(error) => {
                warn!(queue = %queue.stream(), %error, "dropping an advisory that does not parse");
                settle(&message, AckKind::Term).await;
                return Ok(());
            }
        };
        if advisory.stream != queue.stream() {
            warn!(queue = %queue.stream(), stream = %advisory.stream, "dropping an advisory of another stream");
            settle(&message, AckKind::Term).await;
            return Ok(());
        }
        match self.dead_letter(queue, &advisory).await {
            Ok(handled) => {
                debug!(queue = %queue.stream(), sequence = advisory.stream_seq, ?handled, "advisory handled");
                settle(&message, AckKind::Ack).await;
                Ok(())
            }
            Err(error) => {
                // One advisory that keeps failing must not hold up the others: it comes back
                // later (1 s, doubling to a minute) while the next ones are handled.
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                let exponent = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
                let delay = Duration::from_secs(2u64.saturating_pow(exponent.min(6)));
                let error = chain(&error);
                warn!(queue = %queue.stream(), sequence = advisory.stream_seq, %error,
                      attempt = delivered, retry_in = ?delay, "cannot dead-letter a job yet");
                if delivered >= REPORT_AFTER
                    && let Some(report) = &self.report
                {
                    let _ = report.try_send(Failure {
                        queue: queue.clone(),
                        sequence: advisory.stream_seq,
                        error,
                    });
                }
                settle(&message, AckKind::Nak(Some(delay))).await;
                Ok(())
            }
        }
    }

    /// Copies the job the advisory names into the dead-letter stream and removes it from the
    /// work stream ([`conveyor::stored`]); each step can be repeated without harm. The job is
    /// read without the NATS client's header parser, so a job whose headers the client cannot
    /// read (a bare CR, non-UTF-8) is still dead-lettered, as `malformed`, its original header
    /// block kept.
    async fn dead_letter(
        &self,
        queue: &QueueRef,
        advisory: &Advisory,
    ) -> Result<Handled, DispatchError> {
        let stream = queue.stream();
        let client = self.jetstream.client();
        let Some(job) = stored::get(&client, &stream, advisory.stream_seq).await? else {
            return Ok(Handled::AlreadyGone);
        };
        let reading = job.read(&stream);
        let failure = match &reading.malformed {
            Some(error) => (Reason::Malformed, error.clone()),
            None => (
                Reason::MaxDeliveries,
                format!(
                    "no handler reported in {} deliveries: the worker crashed, was killed or hung past the timeout each time",
                    advisory.deliveries
                ),
            ),
        };
        let letter = stored::dead_letter(
            &self.jetstream,
            queue,
            &job,
            &reading,
            failure,
            advisory.deliveries,
            "unknown",
        )
        .await?;
        warn!(queue = %stream, job = %letter.job_id, reason = %letter.reason,
              deliveries = advisory.deliveries, error = %letter.error,
              "job dead-lettered after its last delivery went unanswered");
        Ok(Handled::DeadLettered)
    }

    async fn stream(&self, name: &str) -> Result<stream::Stream, DispatchError> {
        self.jetstream
            .get_stream(name)
            .await
            .map_err(|source| DispatchError::Stream {
                stream: name.to_owned(),
                source,
            })
    }
}

/// Runs the releaser of jobs that wait for jobs ([`conveyor::flow::Releaser`]) for one queue
/// until `stop`, starting over after errors (its durable consumers and cursor resume where
/// they stood, so a restart or a NATS outage only delays releases).
async fn release(releaser: Releaser, queue: QueueRef, stop: CancellationToken) {
    until_stopped(&queue, &stop, "releaser", || releaser.serve(&queue, &stop)).await;
}

/// Runs `step` (which returns `Ok` only when stopped) until `stop`, starting it over after
/// an error with a pause that doubles up to [`MAX_RETRY_DELAY`]; `who` names it in the log.
async fn until_stopped<F, E>(
    queue: &QueueRef,
    stop: &CancellationToken,
    who: &str,
    mut step: impl FnMut() -> F,
) where
    F: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match step().await {
            Ok(()) => return,
            Err(error) => {
                warn!(queue = %queue.stream(), error = %chain(&error), retry_in = ?delay,
                      "{who} paused");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return,
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Acks, naks or terms an advisory; a lost ack only means the advisory comes back, and
/// handling it again is harmless.
async fn settle(message: &jetstream::Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        debug!(%error, "settling an advisory");
    }
}

/// An error with its causes, for logs.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisories_parse() {
        let json = r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2026-01-01T00:00:00Z","stream":"conveyor_ns_q","consumer":"workers-p0","stream_seq":42,"deliveries":3}"#;
        let advisory: Advisory = serde_json::from_str(json).unwrap();
        assert_eq!(advisory.stream, "conveyor_ns_q");
        assert_eq!(advisory.stream_seq, 42);
        assert_eq!(advisory.deliveries, 3);
    }
}
