//! The dispatcher: moves jobs that exhausted `max_deliver` without any handler report (their
//! worker crashed or hung on every attempt) into the queue's dead-letter stream.
//!
//! JetStream announces such a job only with a fire-and-forget `MAX_DELIVERIES` advisory, so each
//! queue has an events stream (`conveyor::admin::events_stream_config`) that captures those
//! advisories while no dispatcher runs. For every queue it finds on the server, the dispatcher
//! makes sure the events stream exists and reads it through a durable consumer. Per advisory:
//! fetch the job from the work stream by sequence, publish it to the dead-letter subject with the
//! dead-letter headers and the `Nats-Msg-Id` `<job id>:<work sequence>` (the id a worker would
//! use, so neither a replayed advisory nor a worker racing the dispatcher stores it twice),
//! delete it from the work stream, answer an awaiting producer, and only then ack the advisory.
//! A job that is already gone (a worker dead-lettered it) only gets its advisory acked. Every
//! step is repeatable, so a dispatcher killed at any point resumes where the durable consumer
//! stands, and a NATS restart only delays it. The hot path (publish, pull, ack) never waits on
//! it. [`run`] keeps one dispatcher per NATS server the operator uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use conveyor::admin::{self, QueueSettings, Storage};
use conveyor::names::{DISPATCHER_CONSUMER, QueueRef};
use conveyor::protocol::Reason;
use conveyor::stored::{self, StoredError};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::context::Context;

/// How often the dispatcher looks for new and removed queues by default.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait of one pull for advisories.
const POLL_WAIT: Duration = Duration::from_secs(5);
/// An advisory taken but not acked (dispatcher killed mid-way) comes back after this long.
const ADVISORY_ACK_WAIT: Duration = Duration::from_secs(10);
/// Advisories taken per pull.
const BATCH: usize = 16;
/// Longest pause after an error before the dispatcher tries again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Prefix of the subjects of a queue's events stream.
const ADVISORY_PREFIX: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.";

/// Runs a dispatcher on every NATS server the operator uses until `stop` is cancelled: the
/// default server from the start, and each server a queue's `spec.nats` names as soon as the
/// JobQueue controller connected to it (with that queue's credentials and TLS). A server whose
/// options change (a rotated Secret) gets a new dispatcher on the new client.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    if let Err(error) = ctx.nats.client(None).await {
        warn!(%error, "no client for the default NATS server yet");
    }
    let tasks = TaskTracker::new();
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
            if let Some((_, old)) = serving.insert(server, (generation, token.clone())) {
                old.cancel();
            }
            tasks.spawn(Dispatcher::new(client).run(token));
        }
        tokio::select! {
            () = tokio::time::sleep(DISCOVERY_INTERVAL) => {}
            () = stop.cancelled() => break,
        }
    }
    tasks.close();
    tasks.wait().await;
}

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

/// The fields of a `io.nats.jetstream.advisory.v1.max_deliver` advisory that matter here.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    stream_seq: u64,
    deliveries: u64,
}

/// What became of one advisory's job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handled {
    /// Copied to the dead-letter stream (now or before) and removed from the work stream.
    DeadLettered,
    /// Not in the work stream any more: a worker dead-lettered or finished it.
    AlreadyGone,
}

/// Finds the queues on one NATS server and dead-letters their exhausted jobs.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    jetstream: jetstream::Context,
    interval: Duration,
}

impl Dispatcher {
    /// A dispatcher over the queues of the server `client` is connected to. The client
    /// should reconnect by itself (the operator's clients do); the dispatcher retries meanwhile.
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            jetstream: jetstream::new(client),
            interval: DISCOVERY_INTERVAL,
        }
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
            match self.discover().await {
                Ok(queues) => {
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
                        tasks.spawn(async move { this.serve(queue, token).await });
                    }
                }
                Err(error) => warn!(%error, "dispatcher cannot list the queues"),
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

    /// The queues on the server (found by their work streams), after making sure each has its
    /// events stream; events streams whose work stream is gone are deleted.
    async fn discover(&self) -> Result<Vec<QueueRef>, jetstream::context::StreamsError> {
        let infos: Vec<stream::Info> = self.jetstream.streams().try_collect().await?;
        let mut queues = Vec::new();
        let mut events = Vec::new();
        for info in &infos {
            if let Some(queue) = queue_of(&info.config) {
                let settings = QueueSettings {
                    storage: match info.config.storage {
                        stream::StorageType::Memory => Storage::Memory,
                        stream::StorageType::File => Storage::File,
                    },
                    replicas: info.config.num_replicas.max(1),
                    ..QueueSettings::default()
                };
                let config = admin::events_stream_config(&queue, &settings);
                if !infos.iter().any(|i| i.config.name == config.name) {
                    match self.jetstream.get_or_create_stream(config).await {
                        Ok(_) => info!(queue = %queue.stream(), "created the events stream"),
                        Err(error) => {
                            warn!(queue = %queue.stream(), %error, "cannot create the events stream");
                            continue;
                        }
                    }
                }
                queues.push(queue);
            } else if info
                .config
                .subjects
                .iter()
                .any(|s| s.starts_with(ADVISORY_PREFIX))
                && info.config.name.starts_with("conveyor_")
            {
                events.push(info.config.name.clone());
            }
        }
        for name in events {
            if !queues.iter().any(|q| q.events_stream() == name) {
                match self.jetstream.delete_stream(&name).await {
                    Ok(_) => info!(stream = %name, "deleted the events stream of a removed queue"),
                    Err(error) => warn!(stream = %name, %error, "cannot delete an events stream"),
                }
            }
        }
        Ok(queues)
    }

    /// Reads one queue's advisories until `stop`, starting over after errors (NATS restarts).
    async fn serve(&self, queue: QueueRef, stop: CancellationToken) {
        debug!(queue = %queue.stream(), "dispatching");
        let mut delay = Duration::from_millis(100);
        loop {
            match self.consume(&queue, &stop).await {
                Ok(()) => return,
                Err(error) => {
                    warn!(queue = %queue.stream(), error = %chain(&error), retry_in = ?delay,
                          "dispatcher paused");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return,
                    }
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
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
        let advisory: MaxDeliveries = match serde_json::from_slice(&message.payload) {
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
                warn!(queue = %queue.stream(), sequence = advisory.stream_seq, error = %chain(&error),
                      attempt = delivered, retry_in = ?delay, "cannot dead-letter a job yet");
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
        advisory: &MaxDeliveries,
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

/// Acks, naks or terms an advisory; a lost ack only means the advisory comes back, and
/// handling it again is harmless.
async fn settle(message: &jetstream::Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        debug!(%error, "settling an advisory");
    }
}

/// The queue a stream is the work stream of: a work-queue stream whose subjects are
/// `conveyor.<namespace>.<queue>.jobs.<level>` and whose name matches them.
fn queue_of(config: &stream::Config) -> Option<QueueRef> {
    if config.retention != stream::RetentionPolicy::WorkQueue {
        return None;
    }
    let subject = config.subjects.first()?;
    let tokens: Vec<&str> = subject.split('.').collect();
    let [prefix, namespace, name, jobs, _level] = tokens.as_slice() else {
        return None;
    };
    if *prefix != "conveyor" || *jobs != "jobs" {
        return None;
    }
    let queue = QueueRef::new(*namespace, name.replace('_', "."));
    (queue.stream() == config.name).then_some(queue)
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
    fn work_streams_name_their_queue() {
        let queue = QueueRef::new("team-a", "mail.out");
        let settings = QueueSettings {
            priorities: 2,
            ..Default::default()
        };
        let work = admin::stream_config(&queue, &settings);
        assert_eq!(queue_of(&work), Some(queue.clone()));
        assert_eq!(
            queue_of(&admin::dead_letter_stream_config(&queue, &settings)),
            None
        );
        assert_eq!(
            queue_of(&admin::events_stream_config(&queue, &settings)),
            None
        );
        let mut other = work.clone();
        other.name = "something_else".into();
        assert_eq!(queue_of(&other), None);
    }

    #[test]
    fn advisories_parse() {
        let json = r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2026-01-01T00:00:00Z","stream":"conveyor_ns_q","consumer":"workers-p0","stream_seq":42,"deliveries":3}"#;
        let advisory: MaxDeliveries = serde_json::from_str(json).unwrap();
        assert_eq!(advisory.stream, "conveyor_ns_q");
        assert_eq!(advisory.stream_seq, 42);
        assert_eq!(advisory.deliveries, 3);
    }
}
