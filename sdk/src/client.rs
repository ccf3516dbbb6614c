//! The producer side: submit jobs to a queue, one at a time or as a pipelined batch, with
//! clear errors for duplicates, oversized jobs, full queues and unknown queues or priorities.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, ErrorCode, context::PublishErrorKind};
use bytes::Bytes;
use futures::StreamExt;

use crate::connect::NatsOptions;
use crate::flow::{self, Dependency, JobRef};
use crate::names::QueueRef;
use crate::protocol::flow::{self as flow_headers, BadAfter};
use crate::protocol::{self, InvalidId, JobOptions};
use crate::stored;

/// Publishes awaiting their ack at once in [`Client::submit_batch`].
const BATCH_WINDOW: usize = 256;

/// A job to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Job id, unique per queue; a resubmission with the same id inside the deduplication
    /// window is reported as a duplicate and not queued again.
    pub id: String,
    /// Opaque payload handed to the handler.
    pub payload: Bytes,
    /// Priority level, `0` (default, lowest) to `priorities - 1`.
    pub priority: u8,
    /// Per-job overrides of the queue's retry and timeout settings.
    pub options: JobOptions,
    /// Further headers passed through to the handler untouched.
    pub headers: HeaderMap,
    /// Not before this time: a delayed job, kept in the queue's delayed stream until due.
    pub not_before: Option<SystemTime>,
    /// The jobs this one waits for: it waits in the queue's waiting stream until each has an
    /// outcome (see [`crate::flow`]).
    pub after: Vec<Dependency>,
}

impl Job {
    /// A job with the given id and payload, default priority and the queue's settings.
    pub fn new(id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: id.into(),
            payload: payload.into(),
            priority: 0,
            options: JobOptions::default(),
            headers: HeaderMap::new(),
            not_before: None,
            after: Vec::new(),
        }
    }

    /// A job with a fresh random (UUID v7, time-ordered) id.
    pub fn with_random_id(payload: impl Into<Bytes>) -> Self {
        Self::new(uuid::Uuid::now_v7().to_string(), payload)
    }

    /// Sets the priority level.
    pub fn priority(mut self, level: u8) -> Self {
        self.priority = level;
        self
    }

    /// Caps the attempts of this job (at most the queue's `maxAttempts` apply).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.options.max_attempts = Some(attempts);
        self
    }

    /// Sets the timeout of one attempt of this job.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Runs the job no earlier than `at` (to the second, never early). A time in the past
    /// queues it at once.
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }

    /// Runs the job no earlier than `delay` from now.
    pub fn delay(self, delay: Duration) -> Self {
        // A delay past what the clock can hold becomes a time `submit` refuses, never a panic.
        let at = SystemTime::now().checked_add(delay).unwrap_or_else(|| {
            let past_latest = protocol::schedule::LATEST.unsigned_abs() + 1;
            SystemTime::UNIX_EPOCH + Duration::from_secs(past_latest)
        });
        self.run_at(at)
    }

    /// Waits for `dependency` before running (any number of calls, up to
    /// [`flow_headers::MAX_DEPENDENCIES`]).
    pub fn after(mut self, dependency: Dependency) -> Self {
        self.after.push(dependency);
        self
    }

    /// Waits at most `timeout` for its dependencies (or, for a continuation, its children),
    /// when that is shorter than the queue's `waitTimeout` (whole seconds, 1 s to
    /// [`crate::admin::MAX_WAIT_TIMEOUT`], the longest a queue allows: a longer one is that).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        let seconds = timeout.min(crate::admin::MAX_WAIT_TIMEOUT).as_secs().max(1);
        let value = format!("{seconds}s");
        self.headers
            .insert(flow_headers::WAIT_TIMEOUT, value.as_str());
        self
    }

    /// Adds a header passed through to the handler.
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The NATS headers this job travels with.
    pub fn wire_headers(&self) -> HeaderMap {
        let mut headers = self.headers.clone();
        headers.insert(protocol::MSG_ID, self.id.as_str());
        // Informational only (the subject decides the level): left out for the default level,
        // so the common job carries one header less.
        if self.priority > 0 {
            headers.insert(protocol::PRIORITY, self.priority.to_string().as_str());
        }
        self.options.write(&mut headers);
        headers
    }
}

/// The queue's answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitAck {
    /// The job id.
    pub id: String,
    /// Sequence of the job in the work stream (of the original when `duplicate`).
    pub sequence: u64,
    /// True when a job with this id was already submitted inside the deduplication window;
    /// the job was not queued again.
    pub duplicate: bool,
}

/// Why a submission was refused. Nothing is queued when an error is returned, except for
/// [`SubmitError::TimedOut`] and [`SubmitError::Publish`], after which the job may or may not
/// be queued: resubmit with the same id, deduplication makes that safe.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The job id cannot be used.
    #[error("job refused: {0}")]
    InvalidId(#[from] InvalidId),
    /// The dependency list cannot be used (malformed, too long, on itself, or combined with
    /// a delay).
    #[error("job {id} refused: {problem}")]
    BadDependencies {
        /// Job id.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// A dependency's queue does not exist on this server (no flow stream takes its edge).
    #[error("job {id} refused: dependency {dependency} is in a queue that does not exist")]
    NoSuchDependencyQueue {
        /// Job id.
        id: String,
        /// The dependency.
        dependency: String,
    },
    /// The job (payload plus headers) is larger than the queue or the server accepts.
    #[error(
        "job {id} refused: {size} bytes of payload is larger than the queue accepts ({detail})"
    )]
    TooLarge {
        /// Job id.
        id: String,
        /// Payload size in bytes.
        size: usize,
        /// The limit that refused it.
        detail: String,
    },
    /// The queue holds as many jobs or bytes as it may; retry later (back-pressure).
    #[error("job {id} refused: queue {queue} is full ({detail}); retry later")]
    QueueFull {
        /// Job id.
        id: String,
        /// Stream of the queue.
        queue: String,
        /// The server's reason.
        detail: String,
    },
    /// No stream takes the job's subject: the queue does not exist, or has fewer priority levels.
    #[error("job {id} refused: queue {queue} does not exist or has no priority level {priority}")]
    NoSuchQueue {
        /// Job id.
        id: String,
        /// Stream of the queue.
        queue: String,
        /// Requested priority level.
        priority: u8,
    },
    /// The queue's stream exists but could not take the job now: it has no leader (a NATS
    /// server of its cluster went down and a new leader is being elected) or could not be
    /// asked. Nothing was stored; retry.
    #[error("job {id}: queue {queue} is unavailable ({detail}); retry later")]
    Unavailable {
        /// Job id.
        id: String,
        /// Stream of the queue.
        queue: String,
        /// What was seen.
        detail: String,
    },
    /// The job carries a message schedule the server refuses: a malformed `Nats-Schedule`
    /// (only `@at <RFC 3339 time>` is a delayed job), or one sent to the work stream itself.
    #[error("job {id} refused: invalid schedule ({detail})")]
    InvalidSchedule {
        /// Job id.
        id: String,
        /// The server's reason.
        detail: String,
    },
    /// No answer from JetStream in time; the job may have been queued.
    #[error("job {id}: no acknowledgement from JetStream in time; it may or may not be queued")]
    TimedOut {
        /// Job id.
        id: String,
    },
    /// Any other publish failure.
    #[error("job {id}: publish failed")]
    Publish {
        /// Job id.
        id: String,
        /// Cause.
        #[source]
        source: jetstream::context::PublishError,
    },
}

impl SubmitError {
    /// True when submitting the same job again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::QueueFull { .. }
                | Self::Unavailable { .. }
                | Self::TimedOut { .. }
                | Self::Publish { .. }
        )
    }
}

/// The final outcome of a job, as [`Client::submit_and_wait`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// The handler succeeded; `result` is what it returned.
    Completed {
        /// Job id.
        id: String,
        /// The handler's result bytes.
        result: Bytes,
    },
    /// The job was moved to the dead-letter stream.
    DeadLettered {
        /// Job id.
        id: String,
        /// `permanent`, `exhausted` or `malformed`.
        reason: String,
        /// The last error.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The job was cancelled ([`Client::cancel`]) before it finished.
    Cancelled {
        /// Job id.
        id: String,
    },
}

/// What [`Client::cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelAck {
    /// The job id.
    pub id: String,
    /// True when the job was still a delayed job: its schedule was removed, so it never runs.
    pub schedule_removed: bool,
    /// True when the job (or, for a parent, its continuation) was waiting: it was removed
    /// from the waiting stream and recorded as cancelled.
    pub waiting_removed: bool,
}

/// Why a cancellation was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// The job id cannot be used.
    #[error("cancel refused: {0}")]
    InvalidId(#[from] InvalidId),
    /// The queue has no cancellations stream (it does not exist, or predates cancellation).
    #[error("cancelling job {id}: queue {queue} does not exist or does not support cancellation")]
    NoSuchQueue {
        /// Job id.
        id: String,
        /// Stream of the queue.
        queue: String,
    },
    /// Publishing the cancellation failed; it may or may not be recorded: cancel again.
    #[error("cancelling job {id}: publish failed")]
    Publish {
        /// Job id.
        id: String,
        /// Cause.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// The cancellation is recorded, but removing the delayed job's schedule failed; the job
    /// is still skipped when it comes due within the cancellation retention.
    #[error("cancelling job {id}: removing its schedule from {stream} failed: {detail}")]
    Schedule {
        /// Job id.
        id: String,
        /// The delayed stream.
        stream: String,
        /// What failed.
        detail: String,
    },
}

/// Why [`Client::submit_and_wait`] has no result.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The submission was refused.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// Subscribing to the reply inbox failed.
    #[error("subscribing to the result inbox")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// A job with this id was already queued; its result goes to whoever submitted it first.
    #[error(
        "job {id} was already submitted (duplicate id); its result goes to the first submitter"
    )]
    Duplicate {
        /// Job id.
        id: String,
    },
    /// No outcome within the given time; the job is still queued or running.
    #[error("no result for job {id} within {waited:?}; it is still queued or running")]
    TimedOut {
        /// Job id.
        id: String,
        /// How long the client waited.
        waited: Duration,
    },
    /// The result message does not follow the protocol.
    #[error("malformed result for job {id}: {problem}")]
    Malformed {
        /// Job id.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// The queue's results stream could not be read.
    #[error("reading stored results from stream {stream}: {problem}")]
    Results {
        /// Stream name.
        stream: String,
        /// What went wrong.
        problem: String,
    },
}

pub use crate::connect::ConnectError;

/// A producer connected to NATS.
#[derive(Debug, Clone)]
pub struct Client {
    jetstream: jetstream::Context,
}

impl Client {
    /// Connects to NATS at `url` (comma-separated for several servers).
    /// Userinfo in the URL is used as credentials ([`crate::connect::NatsOptions::new`]).
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let options = NatsOptions::new(url).map_err(|e| ConnectError::options(url, &e))?;
        Self::connect_with(&options).await
    }

    /// Connects with credentials and TLS settings.
    pub async fn connect_with(options: &NatsOptions) -> Result<Self, ConnectError> {
        Ok(Self::new(options.connect().await?))
    }

    /// A client over an existing NATS connection.
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            jetstream: jetstream::new(nats),
        }
    }

    /// The JetStream context, e.g. for [`crate::admin::ensure_queue`].
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Submits one job and waits for the queue to store it.
    pub async fn submit(&self, queue: &QueueRef, job: Job) -> Result<SubmitAck, SubmitError> {
        protocol::validate_id(&job.id)?;
        if !job.after.is_empty() {
            return self.submit_waiting(queue, job).await;
        }
        let mut subject = queue.job_subject(job.priority);
        let mut headers = job.wire_headers();
        if let Some(at) = job.not_before.filter(|at| *at > SystemTime::now()) {
            // A message schedule in the delayed stream; when due, the server writes the job
            // to `due.<level>` and the work stream sources it from there.
            subject = queue.delayed_subject(&job.id);
            headers.insert(protocol::JOB_ID, job.id.as_str());
            let schedule =
                protocol::schedule::at(at).map_err(|e| SubmitError::InvalidSchedule {
                    id: job.id.clone(),
                    detail: e.to_string(),
                })?;
            headers.insert(protocol::schedule::SCHEDULE, schedule.as_str());
            headers.insert(
                protocol::schedule::TARGET,
                queue.due_subject(job.priority).as_str(),
            );
            headers.insert(protocol::schedule::TTL, protocol::schedule::DUE_TTL);
        }
        let stored = async {
            self.jetstream
                .publish_with_headers(subject.clone(), headers, job.payload.clone())
                .await?
                .await
        };
        let ack = match stored.await {
            Ok(ack) => ack,
            Err(error) if error.kind() == PublishErrorKind::StreamNotFound => {
                return Err(self.no_responders(queue, &job, &subject).await);
            }
            Err(error) => return Err(classify(error, queue, &job)),
        };
        Ok(SubmitAck {
            id: job.id,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Submits a job with dependencies: first one edge per dependency into the dependency's
    /// queue, then the job into its queue's waiting stream (this order is what makes either
    /// order of completion and submission safe; see `docs/protocol.md`).
    async fn submit_waiting(&self, queue: &QueueRef, job: Job) -> Result<SubmitAck, SubmitError> {
        let bad = |problem: String| SubmitError::BadDependencies {
            id: job.id.clone(),
            problem,
        };
        let me = JobRef::new(&queue.namespace, &queue.name, &job.id);
        if job.not_before.is_some() {
            return Err(bad(
                "a job cannot both be delayed and wait for dependencies".into(),
            ));
        }
        if let Some(name) = job
            .headers
            .iter()
            .map(|(name, _)| name.as_ref())
            .find(|name: &&str| flow::is_decision(name))
        {
            return Err(bad(format!(
                "header {name} is the releaser's (it would decide the job without its dependencies)"
            )));
        }
        if job.id.contains([',', ';']) {
            return Err(bad(BadAfter::Ref(flow_headers::BadRef::Separator(
                job.id.clone(),
            ))
            .to_string()));
        }
        flow_headers::check_after(&me, &job.after).map_err(|e| bad(e.to_string()))?;
        if let Err((dependency, error)) = flow::write_edges(&self.jetstream, &me, &job.after).await
        {
            return Err(if error.kind() == PublishErrorKind::StreamNotFound {
                SubmitError::NoSuchDependencyQueue {
                    id: job.id.clone(),
                    dependency: dependency.to_string(),
                }
            } else {
                classify(error, queue, &job)
            });
        }
        let mut headers = job.wire_headers();
        headers.insert(protocol::JOB_ID, job.id.as_str());
        headers.insert(
            flow_headers::AFTER,
            flow_headers::encode_after(&job.after).as_str(),
        );
        let subject = queue.waiting_subject(&job.id);
        match flow::publish_acked(&self.jetstream, subject, headers, job.payload.clone()).await {
            Ok(ack) => Ok(SubmitAck {
                id: job.id,
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(error) if error.kind() == PublishErrorKind::StreamNotFound => {
                Err(SubmitError::NoSuchQueue {
                    id: job.id.clone(),
                    queue: queue.stream(),
                    priority: job.priority,
                })
            }
            Err(error) => Err(classify(error, queue, &job)),
        }
    }

    /// Skips job `job`: cancels it (if it was submitted at all) and records it as cancelled,
    /// so a job that waits for it as an optional dependency runs without it (a non-optional
    /// one counts it as failed).
    pub async fn skip(&self, job: &JobRef) -> Result<CancelAck, CancelError> {
        let queue = job.queue_ref();
        let ack = self.cancel(&queue, &job.id).await?;
        let headers = protocol::Outcome::Cancelled.encode(&job.id);
        flow::publish_acked(
            &self.jetstream,
            queue.result_subject(&job.id),
            headers,
            Bytes::new(),
        )
        .await
        .map_err(|source| cancel_error(source, &queue, &job.id))?;
        Ok(ack)
    }

    /// Where job `job` stands: waiting (for which dependencies, in which state), continued,
    /// finished, or unknown to the flow and results streams ([`flow::job_status`]).
    pub async fn job_status(&self, job: &JobRef) -> Result<flow::JobStatus, flow::FlowError> {
        flow::job_status(&self.jetstream.client(), job).await
    }

    /// A parent's finished children by outcome and the first `shown` of them, reading at most
    /// `limit` records ([`flow::flow_summary`]).
    pub async fn flow_summary(
        &self,
        parent: &JobRef,
        shown: usize,
        limit: u64,
    ) -> Result<flow::FlowSummary, flow::FlowError> {
        flow::flow_summary(&self.jetstream.client(), parent, shown, limit).await
    }

    /// The `waiting` figure of a queue: how many of its jobs wait for dependencies or
    /// children (the waiting stream's message count, one STREAM.INFO request).
    pub async fn waiting(
        &self,
        queue: &QueueRef,
    ) -> Result<u64, jetstream::context::GetStreamError> {
        // `get_stream` is one STREAM.INFO request; its answer holds the count.
        let stream = self.jetstream.get_stream(queue.waiting_stream()).await?;
        Ok(stream.cached_info().state.messages)
    }

    /// Why no stream answered the publish of `job` on `subject` (async-nats reports the
    /// server's "no responders" as `StreamNotFound`): no stream takes the subject, or the
    /// stream that takes it has no leader at the moment (an election in a cluster), which
    /// STREAM.INFO tells apart.
    async fn no_responders(&self, queue: &QueueRef, job: &Job, subject: &str) -> SubmitError {
        // A delayed job goes to `delayed.<id>`, which the delayed stream always takes (a
        // missing level is refused as an invalid schedule target instead).
        let delayed = subject != queue.job_subject(job.priority);
        let stream = if delayed {
            queue.delayed_stream()
        } else {
            queue.stream()
        };
        let no_such_queue = || SubmitError::NoSuchQueue {
            id: job.id.clone(),
            queue: queue.stream(),
            priority: job.priority,
        };
        let unavailable = |detail: String| SubmitError::Unavailable {
            id: job.id.clone(),
            queue: queue.stream(),
            detail,
        };
        match self.jetstream.get_stream(&stream).await {
            // The lookup's own STREAM.INFO answer: no second request.
            Ok(found) => {
                let config = &found.cached_info().config;
                if delayed || config.subjects.iter().any(|s| s == subject) {
                    unavailable(format!("stream {stream} had no leader to store the job"))
                } else {
                    no_such_queue()
                }
            }
            Err(error)
                if matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                no_such_queue()
            }
            Err(error) => unavailable(format!("stream {stream}: {error}")),
        }
    }

    /// Submits a job and waits up to `timeout` for its final outcome: the handler's result, or
    /// the news that it was dead-lettered. Results go to a private inbox (header
    /// `Conveyor-Reply-To`) and reach only a client that is still waiting.
    pub async fn submit_and_wait(
        &self,
        queue: &QueueRef,
        job: Job,
        timeout: Duration,
    ) -> Result<JobResult, WaitError> {
        self.submit_and_watch(queue, job, timeout, |_| {}).await
    }

    /// [`Client::submit_and_wait`], calling `on_progress` with each progress update the
    /// handler reports ([`crate::worker::Progress::report`]) until the final outcome; `timeout`
    /// bounds the whole wait.
    pub async fn submit_and_watch(
        &self,
        queue: &QueueRef,
        mut job: Job,
        timeout: Duration,
        mut on_progress: impl FnMut(Bytes),
    ) -> Result<JobResult, WaitError> {
        let nats = self.jetstream.client();
        let inbox = nats.new_inbox();
        let mut results = nats
            .subscribe(inbox.clone())
            .await
            .map_err(WaitError::Subscribe)?;
        job.headers.insert(protocol::REPLY_TO, inbox.as_str());
        let id = job.id.clone();
        let ack = self.submit(queue, job).await?;
        if ack.duplicate {
            return Err(WaitError::Duplicate { id });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let message = loop {
            let message = match tokio::time::timeout_at(deadline, results.next()).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => {
                    return Err(WaitError::TimedOut {
                        id,
                        waited: timeout,
                    });
                }
            };
            let status = message
                .headers
                .as_ref()
                .and_then(|h| h.get(protocol::result::STATUS));
            if status.map(|s| s.as_str()) == Some(protocol::result::PROGRESS) {
                on_progress(message.payload);
                continue;
            }
            break message;
        };
        outcome(id, message.headers.as_ref(), message.payload)
    }

    /// The stored outcome of job `id`, for a queue with `results.retention`: `None` when there
    /// is none (the job has not finished, finished longer ago than the retention, or the queue
    /// keeps no results).
    pub async fn result(&self, queue: &QueueRef, id: &str) -> Result<Option<JobResult>, WaitError> {
        let failed = |problem: String| WaitError::Results {
            stream: queue.results_stream(),
            problem,
        };
        // Read raw, its header block decoded by the protocol's rules: anything may have been
        // published on a result subject, and the NATS client's parser is not total.
        let client = self.jetstream.client();
        let stream = queue.results_stream();
        match stored::last(&client, &stream, &queue.result_subject(id)).await {
            Ok(Some(message)) => {
                let headers = message.block().header_map();
                outcome(id.to_owned(), Some(&headers), message.payload).map(Some)
            }
            Ok(None) => Ok(None),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Cancels a job by id. A queued job is skipped (acked unrun) when a worker receives it; a
    /// running one is told ([`crate::worker::ReceivedJob::cancel`]) and stopped after the
    /// worker's grace; a delayed one has its schedule removed. A client awaiting the job gets
    /// [`JobResult::Cancelled`]. Cancelling an unknown or finished id is harmless. The
    /// cancellation is remembered for the queue's `maxAge` (or a day).
    pub async fn cancel(&self, queue: &QueueRef, id: &str) -> Result<CancelAck, CancelError> {
        self.cancel_as(queue, id, false).await
    }

    /// [`Client::cancel`], and the job's children too, and theirs: a child (or grandchild)
    /// that has not started yet is skipped when a worker receives it, recorded as cancelled
    /// (so the continuation waiting for it is not left waiting), from about a second after the
    /// cancellation ([`crate::worker::ANCESTORS_REMEMBERED`]). A worker finds the cancelled
    /// ancestor through the waiting continuations between them: the children of a job in
    /// between that is still running (it has not continued yet) are not reached. A child
    /// already running is not told (its worker follows its own queue's cancellations only) and
    /// finishes as it would; a continuation a child left behind runs only if it was released
    /// before the cancellation, otherwise it is skipped like the child.
    pub async fn cancel_with_children(
        &self,
        queue: &QueueRef,
        id: &str,
    ) -> Result<CancelAck, CancelError> {
        self.cancel_as(queue, id, true).await
    }

    async fn cancel_as(
        &self,
        queue: &QueueRef,
        id: &str,
        children: bool,
    ) -> Result<CancelAck, CancelError> {
        protocol::validate_id(id)?;
        let headers = protocol::cancellation(id, children);
        self.jetstream
            .publish_with_headers(queue.cancel_subject(id), headers, Bytes::new())
            .await
            .map_err(|source| cancel_error(source, queue, id))?
            .await
            .map_err(|source| cancel_error(source, queue, id))?;
        let schedule_removed = self.remove_schedule(queue, id).await?;
        let mut waiting_removed = false;
        for subject in [queue.waiting_subject(id), queue.continuation_subject(id)] {
            waiting_removed |= self.remove_waiting(queue, id, &subject).await?;
        }
        Ok(CancelAck {
            id: id.to_owned(),
            schedule_removed,
            waiting_removed,
        })
    }

    /// Removes the job waiting on `subject` of the queue's waiting stream, if any: deletes it,
    /// records it (and the parent it continues) as cancelled and answers an awaiting producer.
    async fn remove_waiting(
        &self,
        queue: &QueueRef,
        id: &str,
        subject: &str,
    ) -> Result<bool, CancelError> {
        let failed = |detail: String| CancelError::Schedule {
            id: id.to_owned(),
            stream: queue.waiting_stream(),
            detail,
        };
        let client = self.jetstream.client();
        let stream = queue.waiting_stream();
        let waiting = match stored::last_if_stream(&client, &stream, subject).await {
            Ok(Some(waiting)) => waiting,
            Ok(None) => return Ok(false),
            Err(error) => return Err(failed(error.to_string())),
        };
        stored::delete(&client, &stream, waiting.sequence)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let reading = waiting.read(&stream);
        let home = (queue.namespace.as_str(), queue.name.as_str());
        let flow_of = flow_headers::FlowHeaders::parse(&reading.headers, home).unwrap_or_default();
        let outcome = protocol::Outcome::Cancelled;
        flow::record_outcome(
            &self.jetstream,
            queue,
            &reading.id,
            &flow_of,
            &outcome,
            &Bytes::new(),
            true,
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        if let Some(reply) = reading.reply_to {
            let answered = flow_of.answered_id(id);
            if let Err(error) = client
                .publish_with_headers(reply, outcome.encode(answered), Bytes::new())
                .await
            {
                tracing::warn!(job = %id, %error, "answering the client awaiting a cancelled waiting job");
            }
        }
        Ok(true)
    }

    /// Removes a delayed job's schedule, answering a client that awaits it. False when there
    /// was none (the job is not delayed, or already due).
    async fn remove_schedule(&self, queue: &QueueRef, id: &str) -> Result<bool, CancelError> {
        let failed = |detail: String| CancelError::Schedule {
            id: id.to_owned(),
            stream: queue.delayed_stream(),
            detail,
        };
        let subject = queue.delayed_subject(id);
        let stream_name = queue.delayed_stream();
        let stream = match self.jetstream.get_stream(queue.delayed_stream()).await {
            Ok(stream) => stream,
            Err(error)
                if matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                return Ok(false);
            }
            Err(error) => return Err(failed(error.to_string())),
        };
        let schedule = match stored::last(&self.jetstream.client(), &stream_name, &subject).await {
            Ok(Some(schedule)) => schedule.block().header_map(),
            Ok(None) => return Ok(false),
            Err(error) => return Err(failed(error.to_string())),
        };
        let purged = stream
            .purge()
            .filter(subject)
            .await
            .map_err(|error| failed(error.to_string()))?;
        if purged.purged == 0 {
            return Ok(false); // it came due meanwhile: the worker skips it
        }
        let reply = schedule
            .get(protocol::REPLY_TO)
            .and_then(|v| protocol::envelope::reply_subject(v.as_str()).ok())
            .map(str::to_owned);
        if let Some(reply) = reply {
            let headers = protocol::Outcome::Cancelled.encode(id);
            let nats = self.jetstream.client();
            if let Err(error) = nats
                .publish_with_headers(reply, headers, Bytes::new())
                .await
            {
                tracing::warn!(job = %id, %error, "answering the client awaiting a cancelled job");
            }
        }
        Ok(true)
    }

    /// Submits many jobs with up to 256 publishes awaiting their acks at once, which is much
    /// faster than one [`Client::submit`] after another. Returns one result per job, in order.
    pub async fn submit_batch(
        &self,
        queue: &QueueRef,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Vec<Result<SubmitAck, SubmitError>> {
        // Unordered, so one slow ack does not hold up the window; put back in order after.
        let mut results: Vec<(usize, Result<SubmitAck, SubmitError>)> =
            futures::stream::iter(jobs.into_iter().enumerate())
                .map(|(i, job)| async move { (i, self.submit(queue, job).await) })
                .buffer_unordered(BATCH_WINDOW)
                .collect()
                .await;
        results.sort_unstable_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, result)| result).collect()
    }
}

/// Maps a publish error to what the producer needs to know, by its kind and JetStream code
/// ("no responders" is told apart by [`Client::no_responders`] first).
fn classify(error: jetstream::context::PublishError, queue: &QueueRef, job: &Job) -> SubmitError {
    let id = job.id.clone();
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => SubmitError::TooLarge {
            id,
            size: job.payload.len(),
            detail: error.to_string(),
        },
        PublishErrorKind::TimedOut => SubmitError::TimedOut { id },
        _ => match jetstream_error(&error) {
            // A delayed job's target `due.<level>` is not in the delayed stream.
            Some(js) if js.error_code() == ErrorCode::MESSAGE_SCHEDULES_TARGET_INVALID => {
                SubmitError::NoSuchQueue {
                    id,
                    queue: queue.stream(),
                    priority: job.priority,
                }
            }
            Some(js)
                if js.error_code() == ErrorCode::MESSAGE_SCHEDULES_PATTERN_INVALID
                    || js.error_code() == ErrorCode::MESSAGE_SCHEDULES_DISABLED =>
            {
                SubmitError::InvalidSchedule {
                    id,
                    detail: js.to_string(),
                }
            }
            Some(js) if js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => {
                SubmitError::TooLarge {
                    id,
                    size: job.payload.len(),
                    detail: js.to_string(),
                }
            }
            Some(js)
                if js.error_code() == ErrorCode::STREAM_STORE_FAILED
                    || js.error_code() == ErrorCode::INSUFFICIENT_RESOURCES =>
            {
                SubmitError::QueueFull {
                    id,
                    queue: queue.stream(),
                    detail: js.to_string(),
                }
            }
            _ => SubmitError::Publish { id, source: error },
        },
    }
}

/// Maps a failed cancellation publish.
fn cancel_error(
    source: jetstream::context::PublishError,
    queue: &QueueRef,
    id: &str,
) -> CancelError {
    if source.kind() == PublishErrorKind::StreamNotFound {
        CancelError::NoSuchQueue {
            id: id.to_owned(),
            queue: queue.stream(),
        }
    } else {
        CancelError::Publish {
            id: id.to_owned(),
            source,
        }
    }
}

/// The JetStream API error inside a publish error, if the server sent one.
fn jetstream_error(error: &jetstream::context::PublishError) -> Option<&jetstream::Error> {
    std::error::Error::source(error)?.downcast_ref::<jetstream::Error>()
}

/// A job's outcome from a result message's headers and payload.
fn outcome(
    id: String,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<JobResult, WaitError> {
    match protocol::Outcome::decode(headers) {
        Ok((_, protocol::Outcome::Completed)) => Ok(JobResult::Completed {
            id,
            result: payload,
        }),
        Ok((
            _,
            protocol::Outcome::DeadLettered {
                reason,
                error,
                attempts,
            },
        )) => Ok(JobResult::DeadLettered {
            reason,
            error,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            id,
        }),
        Ok((_, protocol::Outcome::Cancelled)) => Ok(JobResult::Cancelled { id }),
        Ok((_, protocol::Outcome::Progress)) => Err(WaitError::Malformed {
            id,
            problem: "a progress report where the outcome was expected".into(),
        }),
        Err(error) => Err(WaitError::Malformed {
            id,
            problem: error.problem,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::flow::FlowHeaders;

    #[test]
    fn a_wait_timeout_is_whole_seconds_within_what_a_queue_allows() {
        let parsed = |timeout: Duration| {
            let job = Job::new("j", "").wait_timeout(timeout);
            FlowHeaders::parse(&job.headers, ("ns", "q"))
                .expect("the header is well-formed")
                .wait_timeout
        };
        assert_eq!(
            parsed(Duration::from_secs(90)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parsed(Duration::from_millis(10)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            parsed(Duration::MAX),
            Some(crate::admin::MAX_WAIT_TIMEOUT),
            "a longer one than any queue allows is not a malformed header"
        );
    }
}
