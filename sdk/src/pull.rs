//! Pipelined pull requests on one long-lived inbox, never asking for more jobs than the worker
//! has free slots.
//!
//! Every job asked for is backed by a reserved slot (a semaphore permit) from the moment the
//! pull request is sent until the job arrives (the permit goes to the job) or the server says it
//! will not come (the permit is freed). So a worker never holds more jobs than its concurrency,
//! yet it can ask for freed slots while earlier requests are still being served, and jobs flow
//! without a round trip per batch.
//!
//! The server ends a request by filling it (silently), or by a `408` status carrying the count it
//! did not fill (`Nats-Pending-Messages`). A request lost with its server (a restart) ends with
//! nothing: every request is forgotten `expires + LOST_REQUEST_GRACE` after it was sent, and the
//! reserved slots are cut down to what the requests still alive could deliver.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull::BatchConfig};
use async_nats::{StatusCode, Subject, Subscriber};
use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// How long after its expiry a request without an answer counts as lost.
const LOST_REQUEST_GRACE: Duration = Duration::from_secs(5);

/// Header of a `408`/`409` status: jobs the ended request did not deliver.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

/// What [`Puller::next`] found.
pub(crate) enum Pulled {
    /// A job, with the slot reserved for it.
    Job(jetstream::Message, OwnedSemaphorePermit),
    /// A job nobody asked for any more (its request was taken for lost): hand it back.
    Unrequested(jetstream::Message),
    /// Requests ended without filling every slot; those slots are free again.
    Released,
    /// The server refused or dropped the requests (consumer deleted, leadership change, no
    /// responders); every reserved slot is free again.
    Failed(String),
}

/// One consumer's pull requests and the slots reserved for them.
pub(crate) struct Puller {
    consumer: PullConsumer,
    jetstream: jetstream::Context,
    inbox: Subject,
    subscriber: Subscriber,
    /// Slots reserved for jobs asked for and not yet delivered.
    reserved: Vec<OwnedSemaphorePermit>,
    /// Requests sent (size, time they count as lost), oldest first.
    requests: VecDeque<(usize, Instant)>,
    expires: Duration,
}

impl Puller {
    /// Subscribes the inbox the consumer's jobs will be delivered to.
    pub(crate) async fn new(
        consumer: PullConsumer,
        jetstream: jetstream::Context,
        expires: Duration,
    ) -> Result<Self, String> {
        let client = jetstream.client();
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| format!("subscribing the pull inbox: {e}"))?;
        Ok(Self {
            consumer,
            jetstream,
            inbox,
            subscriber,
            reserved: Vec::new(),
            requests: VecDeque::new(),
            expires,
        })
    }

    /// Jobs asked for and not yet delivered.
    pub(crate) fn outstanding(&self) -> usize {
        self.reserved.len()
    }

    /// Asks for one job per permit; the permits stay reserved until their jobs arrive.
    pub(crate) async fn request(
        &mut self,
        permits: Vec<OwnedSemaphorePermit>,
    ) -> Result<(), String> {
        if permits.is_empty() {
            return Ok(());
        }
        let batch = BatchConfig {
            batch: permits.len(),
            expires: Some(self.expires),
            ..Default::default()
        };
        self.consumer
            .request_batch(batch, self.inbox.clone())
            .await
            .map_err(|e| format!("sending a pull request: {e}"))?;
        let lost_at = Instant::now() + self.expires + LOST_REQUEST_GRACE;
        self.requests.push_back((permits.len(), lost_at));
        self.reserved.extend(permits);
        Ok(())
    }

    /// Waits for the next job or the end of a request. Cancel-safe: nothing is lost when the
    /// future is dropped before it completes.
    pub(crate) async fn next(&mut self) -> Pulled {
        loop {
            let lost_at = self.requests.front().map(|(_, at)| *at);
            let message = tokio::select! {
                // Messages first: while jobs are waiting, the timer is never armed.
                biased;
                message = self.subscriber.next() => message,
                () = sleep_until(lost_at) => {
                    self.forget_oldest_request();
                    return Pulled::Released;
                }
            };
            let Some(message) = message else {
                self.release_all();
                return Pulled::Failed("the pull inbox subscription closed".into());
            };
            match message.status {
                None => {
                    let job = jetstream::Message {
                        message,
                        context: self.jetstream.clone(),
                    };
                    return match self.reserved.pop() {
                        Some(permit) => Pulled::Job(job, permit),
                        None => Pulled::Unrequested(job),
                    };
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                    let unfilled = pending_messages(&message).unwrap_or(self.reserved.len());
                    self.release(unfilled);
                    return Pulled::Released;
                }
                Some(status) => {
                    let reason = message
                        .description
                        .clone()
                        .unwrap_or_else(|| status.to_string());
                    match pending_messages(&message) {
                        // One request refused (e.g. too many waiting): only its slots.
                        Some(unfilled) => self.release(unfilled),
                        None => self.release_all(),
                    }
                    return Pulled::Failed(format!("pull request ended: {status} {reason}"));
                }
            }
        }
    }

    /// Frees `count` reserved slots.
    fn release(&mut self, count: usize) {
        let keep = self.reserved.len().saturating_sub(count);
        self.reserved.truncate(keep);
    }

    fn release_all(&mut self) {
        self.reserved.clear();
        self.requests.clear();
    }

    /// The oldest request is past its lost time: whatever it still waited for will not come.
    /// The reserved slots can be at most what the requests still alive asked for.
    fn forget_oldest_request(&mut self) {
        self.requests.pop_front();
        let alive: usize = self.requests.iter().map(|(size, _)| size).sum();
        self.reserved.truncate(alive);
    }
}

fn pending_messages(message: &async_nats::Message) -> Option<usize> {
    message
        .headers
        .as_ref()?
        .get(PENDING_MESSAGES)?
        .as_str()
        .parse()
        .ok()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
