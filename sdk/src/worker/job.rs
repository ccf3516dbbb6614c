//! One attempt of one job: decode its envelope, run the handler with heartbeats and its
//! timeout, and carry out what [`super::settle::decide`] chose (ack, nak, dead letter), telling
//! an awaiting producer.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, message::Acker};
use bytes::Bytes;
use futures::FutureExt;
use tracing::{debug, info, warn};

use super::cancels::Running;
use super::settle::{self, Plan};
use super::{Disposition, Handler, JobReport, Observer, Outcome, Progress, ReceivedJob, Shared};
use crate::flow::{self, JobRef, Recorded};
use crate::protocol::flow::{self as flow_headers, FlowHeaders};
use crate::protocol::{self, DeadLetter, JobEnvelope, Reason, record};

/// Longest a worker reads a job's ancestors before running it (cancelled with their
/// children?); past it the job runs.
const ANCESTRY_DEADLINE: Duration = Duration::from_secs(2);

/// Runs one attempt of one job and settles it.
pub(super) async fn process<H: Handler, O: Observer>(
    shared: &Shared<H, O>,
    message: jetstream::Message,
) {
    let (sequence, attempt) = match message.info() {
        Ok(info) => (
            info.stream_sequence,
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
        ),
        Err(error) => {
            warn!(%error, subject = %message.subject, "delivered message has no JetStream metadata");
            return;
        }
    };
    let (message, acker) = message.split();
    let started = Instant::now();
    let envelope = JobEnvelope::decode(message.headers.as_ref(), &shared.stream, sequence);
    let id = match &envelope {
        Ok(envelope) => envelope.id.clone(),
        Err(malformed) => malformed.id.clone(),
    };
    let finish = |disposition: Disposition| {
        let report = JobReport {
            id: id.clone(),
            sequence,
            attempt,
            disposition,
            duration: started.elapsed(),
        };
        shared.observer.finished(&report);
    };
    let mut settled = Settled {
        shared,
        message: &message,
        acker: &acker,
        id: &id,
        sequence,
        attempt,
        flow: FlowHeaders::default(),
    };
    let envelope = match envelope {
        Ok(envelope) => envelope,
        Err(malformed) => {
            warn!(job = %id, error = %malformed, "job has a malformed header; dead-lettering it");
            let letter = settled.letter(Reason::Malformed, malformed.to_string());
            finish(settled.dead_letter(letter, None).await);
            return;
        }
    };
    let home = (shared.queue.namespace.as_str(), shared.queue.name.as_str());
    let headers = message.headers.clone().unwrap_or_default();
    match FlowHeaders::parse(&headers, home) {
        Ok(mut flow) => {
            // Honoured only when it names a job of this queue (see `flow::continued_in`).
            if flow::continued_in(&flow, &shared.queue, &id).is_none() {
                flow.continues = None;
            }
            settled.flow = flow;
        }
        Err(error) => {
            warn!(job = %id, %error, "job has a malformed flow header; dead-lettering it");
            let letter = settled.letter(Reason::Malformed, error.to_string());
            finish(
                settled
                    .dead_letter(letter, envelope.reply_to.as_deref())
                    .await,
            );
            return;
        }
    }
    if let Some(refused) = &envelope.refused_reply_to {
        warn!(job = %id, error = %refused, "not answering to a reply subject outside the inbox prefix");
    }
    let reply = envelope.reply_to.as_deref();

    if let Some(parent) = &settled.flow.parent {
        let nats = shared.jetstream.client();
        // Before the heartbeats start: well within the ack wait.
        let deadline = (shared.ack_wait / 3).min(ANCESTRY_DEADLINE);
        if let Some(ancestor) = shared.ancestry.cancelled(&nats, parent, deadline).await {
            info!(job = %id, %ancestor, "an ancestor was cancelled with its children; skipping it");
            finish(settled.cancelled(reply).await);
            return;
        }
    }
    let Some(running) = Running::start(&shared.cancels, sequence, &id) else {
        info!(job = %id, "job was cancelled; skipping it");
        finish(settled.cancelled(reply).await);
        return;
    };

    let max_attempts = match (envelope.options.max_attempts, shared.max_deliver) {
        (Some(job), Some(queue)) => job.min(queue),
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) => u32::MAX,
    };
    let timeout = envelope.options.timeout.or(shared.options.job_timeout);
    // Checked: a timeout too far out for the clock means no deadline, never a panic.
    let deadline = timeout.and_then(|t| started.checked_add(t));
    shared.observer.started(&id, sequence, deadline);
    let priority = message
        .subject
        .rsplit('.')
        .next()
        .and_then(|level| level.parse().ok())
        .unwrap_or(0);
    let job = ReceivedJob {
        id: id.clone(),
        payload: message.payload.clone(),
        flow: super::JobFlow::new(
            shared.jetstream.clone(),
            JobRef::new(home.0, home.1, &id),
            settled.flow.clone(),
            &headers,
        ),
        headers,
        attempt,
        max_attempts,
        priority,
        deadline,
        cancel: running.cancel.clone(),
        progress: reply
            .map(|reply| Progress::to(shared.jetstream.client(), reply.to_owned(), id.clone()))
            .unwrap_or_default(),
    };

    let job_flow = job.flow.clone();
    // A panicking handler fails its attempt (retried or dead-lettered like any failure); it must
    // not take down the worker and the other jobs running beside it.
    let handler = std::panic::AssertUnwindSafe(async { shared.handler.handle(job).await })
        .catch_unwind()
        .map(|result| {
            result.unwrap_or_else(|panic| {
                Outcome::Failed(format!("handler panicked: {}", panic_message(&*panic)))
            })
        });
    let mut attempt_run = Box::pin(with_heartbeats(handler, &acker, shared.ack_wait, timeout));
    let outcome = tokio::select! {
        // The handler first: a job that finishes on its first poll never registers with the
        // cancellation tokens.
        biased;
        outcome = &mut attempt_run => outcome,
        () = running.cancel.cancelled() => {
            // The handler was told (`ReceivedJob::cancel`); stop it once the grace passes.
            let _ = tokio::time::timeout(shared.options.cancel_grace, &mut attempt_run).await;
            drop(attempt_run);
            info!(job = %id, "job cancelled while running; handler stopped");
            finish(settled.cancelled(reply).await);
            return;
        }
        () = shared.give_back.cancelled() => {
            shared.given_back.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = acker.ack_with(AckKind::Nak(None)).await {
                warn!(job = %id, %error, "giving back an unfinished job");
            }
            finish(Disposition::GivenBack);
            return;
        }
    };

    let plan = settle::decide(
        outcome,
        attempt,
        max_attempts,
        &shared.options.backoff,
        protocol::random_unit(),
    );
    let disposition = match plan {
        Plan::Ack(result) => {
            // Recorded before the ack: a child's record, or the outcome its dependents wait
            // for, is never lost to a crash between the two (a rerun finds it recorded).
            if let Err(error) = settled.record(&protocol::Outcome::Completed, &result).await {
                warn!(job = %id, %error, "recording the outcome failed; retrying the job");
                settled.retry_later().await
            } else if settled.ack().await {
                settled
                    .reply(reply, &protocol::Outcome::Completed, result)
                    .await;
                Disposition::Acked
            } else {
                return;
            }
        }
        Plan::Continue(continuation) => {
            match settled
                .store_continuation(*continuation, reply, &job_flow)
                .await
            {
                Err(error) => {
                    warn!(job = %id, %error, "storing the continuation failed; retrying the job");
                    settled.retry_later().await
                }
                Ok(()) if settled.ack().await => Disposition::Continued,
                Ok(()) => return,
            }
        }
        Plan::Retry(delay) => {
            debug!(job = %id, attempt, ?delay, "attempt failed; retrying later");
            retry(shared, &acker, &id, delay).await
        }
        Plan::DeadLetter { reason, error } => {
            let letter = settled.letter(reason, error);
            settled.dead_letter(letter, reply).await
        }
    };
    finish(disposition);
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-text panic payload")
}

/// Drives the handler, sending an in-progress heartbeat every third of `ack_wait`, and
/// fails the attempt when `timeout` passes (dropping the handler's future).
async fn with_heartbeats(
    handler: impl Future<Output = Outcome>,
    acker: &Acker,
    ack_wait: Duration,
    timeout: Option<Duration>,
) -> Outcome {
    tokio::pin!(handler);
    // A job done on its first poll needs no timers.
    if let std::task::Poll::Ready(outcome) = futures::poll!(handler.as_mut()) {
        return outcome;
    }
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let expiry = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            biased;
            outcome = &mut handler => return outcome,
            _ = heartbeat.tick() => {
                if let Err(error) = acker.ack_with(AckKind::Progress).await {
                    warn!(%error, "sending in-progress heartbeat");
                }
            }
            () = &mut expiry => {
                let timeout = timeout.unwrap_or_default();
                return Outcome::Failed(format!("handler timed out after {timeout:?}"));
            }
        }
    }
}

/// Naks a job for another attempt after `delay`.
async fn retry<H, O>(
    shared: &Shared<H, O>,
    acker: &Acker,
    id: &str,
    delay: Duration,
) -> Disposition {
    if let Err(error) = acker.ack_with(AckKind::Nak(Some(delay))).await {
        warn!(job = %id, %error, "nak failed; the job comes back after the ack wait");
    }
    shared.retried.fetch_add(1, Ordering::Relaxed);
    shared.due_at(std::time::Instant::now() + delay);
    Disposition::Retried { delay }
}

/// One delivered job being settled: what every way of ending it needs.
struct Settled<'a, H, O> {
    shared: &'a Shared<H, O>,
    message: &'a async_nats::Message,
    acker: &'a Acker,
    id: &'a str,
    sequence: u64,
    attempt: u32,
    /// The job's flow headers (default until decoded).
    flow: FlowHeaders,
}

impl<H, O> Settled<'_, H, O> {
    /// Naks the job for another attempt after its backoff delay: a step of settling it
    /// failed (the outcome, continuation or dead letter could not be written).
    async fn retry_later(&self) -> Disposition {
        let delay = self.shared.options.backoff.delay(self.attempt);
        retry(self.shared, self.acker, self.id, delay).await
    }

    /// Acks the job and counts it; false when the ack failed (logged): the job will be
    /// redelivered, and this attempt reports nothing.
    async fn ack(&self) -> bool {
        match self.acker.ack().await {
            Ok(()) => {
                self.shared.acked.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(error) => {
                warn!(job = %self.id, %error, "ack failed; the job will be redelivered");
                false
            }
        }
    }

    /// Records the job's final outcome: its results subject (with `store_results`, or when it
    /// continues a job), the job it continues, and its parent's child record.
    async fn record(
        &self,
        outcome: &protocol::Outcome,
        result: &Bytes,
    ) -> Result<(), flow::FlowError> {
        let own = self.shared.options.store_results || self.flow.continues.is_some();
        if !own && self.flow.parent.is_none() {
            return Ok(());
        }
        let recorded = flow::record_outcome(
            &self.shared.jetstream,
            &self.shared.queue,
            self.id,
            &self.flow,
            outcome,
            result,
            own,
        )
        .await?;
        if recorded == Recorded::Duplicate {
            info!(job = %self.id, "a second completion of this child; its parent counts it once");
        }
        Ok(())
    }

    /// Stores the continuation `job` of this job in the queue's waiting stream, to run once
    /// the children this attempt spawned have finished: it continues the job this one
    /// continues (or this one), as a child of this job's parent, answering this job's waiter.
    async fn store_continuation(
        &self,
        job: crate::client::Job,
        reply: Option<&str>,
        job_flow: &super::JobFlow,
    ) -> Result<(), crate::client::SubmitError> {
        let shared = self.shared;
        protocol::validate_id(&job.id)?;
        let queue = &shared.queue;
        let me = JobRef::new(&queue.namespace, &queue.name, self.id);
        let mut headers = job.wire_headers();
        headers.insert(protocol::JOB_ID, job.id.as_str());
        headers.insert(
            flow_headers::CHILDREN,
            flow_headers::encode_children(&me, job_flow.spawned()).as_str(),
        );
        let continues = self.flow.continues.clone().unwrap_or(me);
        headers.insert(flow_headers::CONTINUES, continues.to_string().as_str());
        if let Some(parent) = &self.flow.parent {
            headers.insert(flow_headers::PARENT, parent.to_string().as_str());
        }
        if let Some(reply) = reply {
            headers.insert(protocol::REPLY_TO, reply);
        }
        let subject = queue.continuation_subject(self.id);
        flow::publish_acked(&shared.jetstream, subject, headers, job.payload.clone())
            .await
            .map(|_| ())
            .map_err(|source| crate::client::SubmitError::Publish { id: job.id, source })
    }

    /// The dead-letter record of this delivery.
    fn letter(&self, reason: Reason, error: String) -> DeadLetter {
        DeadLetter {
            job_id: self.id.to_owned(),
            reason,
            error,
            attempts: u64::from(self.attempt),
            pod: self.shared.options.pod_name.clone(),
            original_subject: self.message.subject.to_string(),
            original_sequence: self.sequence,
        }
    }

    /// Copies the job into the dead-letter stream, then terminates it. If the copy fails the
    /// job is nak'd instead, so it is never lost.
    async fn dead_letter(&self, letter: DeadLetter, reply: Option<&str>) -> Disposition {
        let shared = self.shared;
        let headers = letter.encode(
            record::Original::Headers(self.message.headers.as_ref()),
            &protocol::now_rfc3339(),
        );
        let subject = shared.queue.dead_letter_subject();
        let published = match shared
            .jetstream
            .publish_with_headers(subject, headers, self.message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()),
            Err(error) => Err(error),
        };
        if let Err(error) = published {
            warn!(job = %self.id, %error, "dead-lettering failed; retrying the job instead");
            return self.retry_later().await;
        }
        // Recorded before the +TERM, as a completion is before its ack: a worker killed in
        // between, or a record that cannot be written, leaves the job to run again rather than
        // a parent's continuation (or dependents) waiting for a record that never comes.
        let outcome = protocol::Outcome::dead_lettered(&letter);
        if let Err(error) = self.record(&outcome, &Bytes::new()).await {
            warn!(job = %self.id, %error, "recording the dead-lettered outcome failed; retrying the job");
            return self.retry_later().await;
        }
        warn!(job = %self.id, reason = %letter.reason, attempts = letter.attempts,
              error = %letter.error, "job dead-lettered");
        if let Err(error) = self.acker.ack_with(AckKind::Term).await {
            warn!(job = %self.id, %error, "terminating a dead-lettered job");
        }
        self.reply(reply, &outcome, Bytes::new()).await;
        shared.dead_lettered.fetch_add(1, Ordering::Relaxed);
        Disposition::DeadLettered {
            reason: letter.reason.as_str(),
        }
    }

    /// Records a cancelled job's outcome ([`Settled::record`]), then acks it (no retry, no dead
    /// letter) and tells an awaiting producer. A record that cannot be written naks the job
    /// instead: it comes back, is skipped again and recorded then.
    async fn cancelled(&self, reply: Option<&str>) -> Disposition {
        let shared = self.shared;
        if let Err(error) = self
            .record(&protocol::Outcome::Cancelled, &Bytes::new())
            .await
        {
            warn!(job = %self.id, %error, "recording a cancelled job's outcome failed; retrying it");
            return self.retry_later().await;
        }
        if let Err(error) = self.acker.ack().await {
            warn!(job = %self.id, %error, "acking a cancelled job; it comes back and is skipped again");
        }
        shared.cancelled.fetch_add(1, Ordering::Relaxed);
        self.reply(reply, &protocol::Outcome::Cancelled, Bytes::new())
            .await;
        Disposition::Cancelled
    }

    /// Sends a job's final outcome to the awaiting producer (plain publish: only a live waiter
    /// receives it), in the name of the job it continues if it is a continuation.
    async fn reply(&self, reply: Option<&str>, outcome: &protocol::Outcome, payload: Bytes) {
        let shared = self.shared;
        let answered = self.flow.answered_id(self.id);
        let headers: HeaderMap = outcome.encode(answered);
        if let Some(reply) = reply {
            let nats = shared.jetstream.client();
            if let Err(error) = nats
                .publish_with_headers(reply.to_owned(), headers, payload)
                .await
            {
                warn!(%error, "publishing a job result");
            }
        }
    }
}
