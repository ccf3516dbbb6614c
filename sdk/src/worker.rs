//! The Rust worker SDK and the engine of the `conveyor-worker` runtime: pull jobs on demand
//! (never more than free slots, higher priority levels first), run a handler, then ack, nak
//! with backoff, or dead-letter; heartbeat while a handler runs; drain on shutdown. Jobs run as
//! futures on the worker's task (see [`Handler`]).
//!
//! ```no_run
//! # async fn demo(js: async_nats::jetstream::Context) -> Result<(), conveyor::worker::WorkerError> {
//! use conveyor::{names::QueueRef, worker::{Outcome, Worker}};
//! let queue = QueueRef::new("default", "emails");
//! Worker::new(js, queue)
//!     .concurrency(8)
//!     .handler(|job: conveyor::worker::ReceivedJob| async move {
//!         if job.payload.is_empty() {
//!             return Outcome::Permanent("empty payload".into());
//!         }
//!         Outcome::Done(job.payload)
//!     })
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, AckKind, consumer::PullConsumer, consumer::push, message::Acker,
};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::names::QueueRef;
use crate::protocol::{self, Backoff, JobOptions, dead_letter};
use crate::pull::{Pulled, Puller};

/// Every this many fetch rounds, levels are tried from the lowest up, so a flood of urgent jobs
/// cannot starve the lower levels completely.
const STARVATION_GUARD_ROUNDS: u64 = 10;

/// A one-level worker with requests outstanding asks for more once a `1/TOP_UP_FRACTION` of its
/// slots are free.
const TOP_UP_FRACTION: usize = 8;

/// How a handler finished one attempt of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Success: the job is acked (and gone). The bytes are the job's result.
    Done(Bytes),
    /// Try again later: after `after`, or the backoff delay. Counts as an attempt.
    Retry {
        /// Delay before the retry; `None` uses the backoff.
        after: Option<Duration>,
    },
    /// This attempt failed; retried with backoff until attempts run out, then dead-lettered.
    Failed(String),
    /// The job can never succeed: dead-lettered at once.
    Permanent(String),
}

/// A job delivered to a handler.
#[derive(Debug, Clone)]
pub struct ReceivedJob {
    /// Job id (`Nats-Msg-Id`, or `<stream>:<sequence>` when the producer set none).
    pub id: String,
    /// The payload as submitted.
    pub payload: Bytes,
    /// All headers as submitted.
    pub headers: HeaderMap,
    /// This attempt's number, 1 for the first delivery.
    pub attempt: u32,
    /// Attempts allowed in total (queue's `maxAttempts`, or lower per job).
    pub max_attempts: u32,
    /// Priority level the job was published at.
    pub priority: u8,
    /// Deadline of this attempt, if any; the handler is cancelled when it passes.
    pub deadline: Option<Instant>,
    /// Cancelled when the job is cancelled (`Client::cancel`) while it runs. The handler may
    /// wind down; its future is dropped after the worker's `cancel_grace` either way, and the
    /// job is acked as cancelled whatever it returns.
    pub cancel: CancellationToken,
    /// Reports progress to a producer awaiting the job ([`Progress::report`]).
    pub progress: Progress,
}

/// Where a running job reports progress: the awaiting producer's inbox, if there is one.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    target: Option<(async_nats::Client, String, String)>,
}

impl Progress {
    /// Progress of job `id` goes to `reply` (the job's `Conveyor-Reply-To`).
    fn to(nats: async_nats::Client, reply: String, id: String) -> Self {
        Self {
            target: Some((nats, reply, id)),
        }
    }

    /// Whether anyone awaits the job (reports are dropped otherwise).
    pub fn is_awaited(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `update` (opaque bytes, e.g. `{"done": 40, "of": 100}`) to the producer awaiting
    /// the job, if any. Best effort: a failure is logged, never fails the job.
    pub async fn report(&self, update: impl Into<Bytes>) {
        let Some((nats, reply, id)) = &self.target else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(protocol::result::JOB_ID, id.as_str());
        headers.insert(protocol::result::STATUS, protocol::result::PROGRESS);
        if let Err(error) = nats
            .publish_with_headers(reply.clone(), headers, update.into())
            .await
        {
            warn!(job = %id, %error, "publishing a progress update");
        }
    }
}

/// User code that handles jobs. Implemented for `Fn(ReceivedJob) -> impl Future<Output = Outcome>`.
///
/// The worker's jobs run as futures on the worker's own task (the one awaiting
/// [`Runner::run`]), not a task each, so a handler must not block the thread: await I/O, and
/// put heavy computation in `tokio::task::spawn_blocking` (or a `tokio::spawn` of its own) and
/// await that. A handler that panics fails its attempt (`Outcome::Failed`, retried with
/// backoff) without harming the other jobs.
pub trait Handler: Send + Sync + 'static {
    /// Handles one attempt of one job. The future is dropped (cancelled) when the attempt's
    /// deadline passes or the drain deadline after shutdown passes.
    fn handle(&self, job: ReceivedJob) -> impl Future<Output = Outcome> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(ReceivedJob) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(&self, job: ReceivedJob) -> impl Future<Output = Outcome> + Send {
        self(job)
    }
}

/// What happened to a job after one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Handler succeeded; acked.
    Acked,
    /// Nak'd for another attempt after `delay`.
    Retried {
        /// Delay asked of the server.
        delay: Duration,
    },
    /// Moved to the dead-letter stream and terminated.
    DeadLettered {
        /// `permanent`, `exhausted` or `malformed`.
        reason: &'static str,
    },
    /// Not finished before the drain deadline; given back for immediate redelivery.
    GivenBack,
    /// Cancelled (before it ran, or while running); acked without a retry.
    Cancelled,
}

/// Report of one finished attempt, for metrics and logs.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Job id.
    pub id: String,
    /// Stream sequence (unique per job in the queue).
    pub sequence: u64,
    /// Attempt number.
    pub attempt: u32,
    /// What happened.
    pub disposition: Disposition,
    /// Time the handler ran.
    pub duration: Duration,
}

/// Hooks the runtime uses for metrics and liveness. Both methods default to doing nothing.
pub trait Observer: Send + Sync + 'static {
    /// A handler starts on job `id`, stream sequence `sequence`.
    fn started(&self, _id: &str, _sequence: u64, _deadline: Option<Instant>) {}
    /// An attempt finished.
    fn finished(&self, _report: &JobReport) {}
    /// The worker found its consumers and starts pulling, a job was delivered, or a pull request
    /// for free slots ended (filled, expired or failed): it is consuming. Happens at least every
    /// `poll_wait` while a slot is free.
    fn pulled(&self) {}
}

/// The observer used when none is set.
#[derive(Debug, Default)]
pub struct NoObserver;
impl Observer for NoObserver {}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs handled at once; also the most jobs held at any time.
    pub concurrency: usize,
    /// Priority levels of the queue (one consumer each).
    pub priorities: u8,
    /// Delay rule for failed attempts.
    pub backoff: Backoff,
    /// Timeout of one attempt when the job sets none (`None`: no timeout).
    pub job_timeout: Option<Duration>,
    /// After shutdown is requested, how long in-flight jobs may take before they are given back.
    pub drain_timeout: Duration,
    /// Longest single wait for new jobs (pull request expiry), also the re-check interval for
    /// redelivered jobs on multi-level queues.
    pub poll_wait: Duration,
    /// Name put into dead letters (`Conveyor-Pod`).
    pub pod_name: String,
    /// Stop (drain and return) after taking this many jobs, so a leaky process is replaced.
    pub max_jobs: Option<u64>,
    /// How long a handler may take to wind down after its job was cancelled before it is
    /// stopped (its future dropped, its process killed).
    pub cancel_grace: Duration,
    /// Store each finished job's outcome in the queue's results stream (for queues with
    /// `results.retention`), so producers can fetch it later (`Client::result`).
    pub store_results: bool,
    /// Take a token from the queue's rate-limit tokens stream for every job started (queues
    /// with a `rateLimit`; see [`crate::rate`]).
    pub rate_limited: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 1,
            priorities: 1,
            backoff: Backoff::default(),
            job_timeout: None,
            drain_timeout: Duration::from_secs(30),
            poll_wait: Duration::from_secs(5),
            pod_name: std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into()),
            max_jobs: None,
            cancel_grace: Duration::from_secs(5),
            store_results: false,
            rate_limited: false,
        }
    }
}

/// Failures that stop a worker before it runs.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The queue's stream is missing or unreachable.
    #[error("looking up stream {stream} of the queue")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// A priority level's consumer is missing or unreachable.
    #[error("looking up consumer {consumer} of stream {stream}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// Cause.
        #[source]
        source: async_nats::Error,
    },
    /// Reading a consumer's settings failed.
    #[error("reading consumer info")]
    ConsumerInfo(#[source] jetstream::context::ConsumerInfoError),
    /// Invalid options.
    #[error("invalid worker options: {0}")]
    Invalid(String),
    /// The NATS server is too old.
    #[error(transparent)]
    UnsupportedServer(#[from] protocol::UnsupportedServer),
}

/// Counts of a finished run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs acked.
    pub acked: u64,
    /// Attempts nak'd for retry.
    pub retried: u64,
    /// Jobs dead-lettered.
    pub dead_lettered: u64,
    /// Jobs given back at the drain deadline.
    pub given_back: u64,
    /// Jobs skipped or stopped because they were cancelled.
    pub cancelled: u64,
}

/// A worker for one queue, before its handler is set.
#[derive(Debug, Clone)]
pub struct Worker {
    jetstream: jetstream::Context,
    queue: QueueRef,
    options: WorkerOptions,
}

impl Worker {
    /// A worker for `queue` with default options.
    pub fn new(jetstream: jetstream::Context, queue: QueueRef) -> Self {
        Self {
            jetstream,
            queue,
            options: WorkerOptions::default(),
        }
    }

    /// Replaces all options.
    pub fn options(mut self, options: WorkerOptions) -> Self {
        self.options = options;
        self
    }

    /// Jobs handled at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.options.concurrency = concurrency;
        self
    }

    /// Priority levels of the queue.
    pub fn priorities(mut self, priorities: u8) -> Self {
        self.options.priorities = priorities;
        self
    }

    /// Sets the handler; `run` the result.
    pub fn handler<H: Handler>(self, handler: H) -> Runner<H, NoObserver> {
        Runner {
            worker: self,
            handler: Arc::new(handler),
            observer: Arc::new(NoObserver),
        }
    }
}

/// A worker with its handler, ready to run.
pub struct Runner<H, O> {
    worker: Worker,
    handler: Arc<H>,
    observer: Arc<O>,
}

impl<H, O> std::fmt::Debug for Runner<H, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// State shared by the fetch loop and the job tasks.
struct Shared<H, O> {
    handler: Arc<H>,
    observer: Arc<O>,
    jetstream: jetstream::Context,
    queue: QueueRef,
    options: WorkerOptions,
    /// Consumer `ack_wait`: heartbeats go out every third of it.
    ack_wait: Duration,
    /// Consumer `max_deliver` (`None` when unlimited).
    max_deliver: Option<u32>,
    /// Cancelled when the drain deadline passes: unfinished jobs are given back.
    give_back: CancellationToken,
    /// Cancelled job ids and the jobs running here.
    cancels: Arc<Mutex<Cancels>>,
    /// Jobs handed to the handler so far (for `max_jobs`).
    started: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    given_back: AtomicU64,
    cancelled: AtomicU64,
}

impl<H: Handler, O: Observer> Runner<H, O> {
    /// Sets hooks for metrics and liveness.
    pub fn observer<O2: Observer>(self, observer: Arc<O2>) -> Runner<H, O2> {
        Runner {
            worker: self.worker,
            handler: self.handler,
            observer,
        }
    }

    /// Runs until `shutdown` completes (or `max_jobs` jobs were taken), then stops fetching, lets in-flight jobs finish within
    /// the drain timeout, gives the rest back for immediate redelivery, and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Summary, WorkerError> {
        let Worker {
            jetstream,
            queue,
            options,
        } = self.worker;
        if options.concurrency == 0 {
            return Err(WorkerError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        if options.priorities == 0 {
            return Err(WorkerError::Invalid("priorities must be at least 1".into()));
        }
        protocol::check_server_version(&jetstream.client().server_info().version)?;
        let stop = CancellationToken::new();
        let stop_on_shutdown = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_on_shutdown.cancel();
        });
        // The queue may not exist yet (the worker started before its JobQueue was applied):
        // wait for it rather than crash-looping.
        let mut delay = Duration::from_millis(200);
        let (consumers, config) = loop {
            match lookup(&jetstream, &queue, options.priorities).await {
                Ok(found) => break found,
                Err(error) => {
                    warn!(error = %DisplayChain(&error), retry_in = ?delay, "waiting for the queue");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return Ok(Summary::default()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let following = CancellationToken::new();
        let cancels = follow_cancels(&jetstream, &queue, following.clone()).await;
        let shared = Arc::new(Shared {
            handler: self.handler,
            observer: self.observer,
            jetstream: jetstream.clone(),
            queue: queue.clone(),
            ack_wait: config.ack_wait,
            max_deliver: u32::try_from(config.max_deliver).ok().filter(|n| *n > 0),
            options,
            give_back: CancellationToken::new(),
            cancels,
            started: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            given_back: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        });
        info!(stream = %queue.stream(), concurrency = shared.options.concurrency,
              priorities = shared.options.priorities, "worker started");

        // Consumers found: the worker counts as consuming from here on.
        shared.observer.pulled();
        let mut in_flight = InFlight::new();
        fetch_loop(&shared, &consumers, &mut in_flight, &stop).await;
        in_flight.drain(&shared).await;
        // Acks and naks are plain publishes: make sure they left before returning.
        if let Err(error) = jetstream.client().flush().await {
            warn!(%error, "flushing acks at shutdown");
        }
        let summary = Summary {
            acked: shared.acked.load(Ordering::Relaxed),
            retried: shared.retried.load(Ordering::Relaxed),
            dead_lettered: shared.dead_lettered.load(Ordering::Relaxed),
            given_back: shared.given_back.load(Ordering::Relaxed),
            cancelled: shared.cancelled.load(Ordering::Relaxed),
        };
        following.cancel();
        info!(?summary, "worker stopped");
        Ok(summary)
    }
}

/// The consumers of every level and the settings of level 0's consumer.
async fn lookup(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    priorities: u8,
) -> Result<(Vec<PullConsumer>, jetstream::consumer::Config), WorkerError> {
    let stream = jetstream
        .get_stream(queue.stream())
        .await
        .map_err(|source| WorkerError::Stream {
            stream: queue.stream(),
            source,
        })?;
    let mut consumers: Vec<PullConsumer> = Vec::new();
    for level in 0..priorities {
        let consumer = stream
            .get_consumer(&queue.consumer(level))
            .await
            .map_err(|source| WorkerError::Consumer {
                stream: queue.stream(),
                consumer: queue.consumer(level),
                source,
            })?;
        consumers.push(consumer);
    }
    let config = consumers[0]
        .get_info()
        .await
        .map_err(WorkerError::ConsumerInfo)?
        .config;
    Ok((consumers, config))
}

/// Formats an error with its sources, for logs.
struct DisplayChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Waits for at least one free slot, then takes every other free one too.
async fn free_slots(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        permit = slots.clone().acquire_owned() => permit.ok()?,
        () = stop.cancelled() => return None,
    };
    let mut permits = vec![first];
    permits.extend(take_free(slots));
    Some(permits)
}

/// Takes every free slot without waiting.
fn take_free(slots: &Arc<Semaphore>) -> Vec<OwnedSemaphorePermit> {
    std::iter::from_fn(|| slots.clone().try_acquire_owned().ok()).collect()
}

/// One level: pipelined pull requests for the free slots ([`crate::pull`]); jobs start as they
/// arrive, and freed slots are asked for again while earlier requests are still being served.
async fn pull_loop<'a, H: Handler, O: Observer>(
    shared: &'a Arc<Shared<H, O>>,
    consumer: &PullConsumer,
    jobs: &mut InFlight<'a>,
    stop: &CancellationToken,
    slots: &Arc<Semaphore>,
    tokens: Option<&crate::rate::Tokens>,
) {
    let mut error_delay = Duration::from_millis(100);
    let poll_wait = shared.options.poll_wait;
    let mut puller = loop {
        match Puller::new(consumer.clone(), shared.jetstream.clone(), poll_wait).await {
            Ok(puller) => break puller,
            Err(error) => {
                jobs.alongside(pause_after_error(error, &mut error_delay, stop))
                    .await
            }
        }
        if stop.is_cancelled() {
            return;
        }
    };
    // With requests outstanding, ask again once this many slots are free: fewer, larger requests.
    // A rate-limited worker asks only when nothing is outstanding (tokens are taken per request).
    let top_up = (shared.options.concurrency / TOP_UP_FRACTION).max(1);
    loop {
        let idle = puller.outstanding() == 0;
        if idle || (tokens.is_none() && slots.available_permits() >= top_up) {
            let permits = if idle {
                match jobs.alongside(free_slots(slots, stop)).await {
                    Some(permits) => permits,
                    None => return,
                }
            } else {
                take_free(slots)
            };
            let permits = match ration(
                shared,
                jobs,
                permits,
                puller.outstanding(),
                tokens,
                stop,
                &mut error_delay,
            )
            .await
            {
                Ration::Ask(permits) => permits,
                Ration::Stop => return,
                Ration::Retry => continue,
            };
            if let Err(error) = jobs.alongside(puller.request(permits)).await {
                shared.observer.pulled();
                jobs.alongside(pause_after_error(error, &mut error_delay, stop))
                    .await;
                continue;
            }
            if puller.outstanding() == 0 {
                // Nothing could be asked for: no tokens came.
                shared.observer.pulled();
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
        }
        let pulled = jobs.alongside(async {
            tokio::select! {
                // The puller first: while jobs are waiting, the stop token is not registered with.
                biased;
                pulled = puller.next() => Some(pulled),
                () = stop.cancelled() => None,
            }
        });
        let Some(pulled) = pulled.await else {
            // Requests still open may deliver jobs until they expire: hand those back in
            // the background. Detached, so it does not delay the exit; once the connection
            // closes, the server drops the requests with it.
            let drainer = shared.clone();
            tokio::spawn(async move {
                while puller.outstanding() > 0 {
                    match puller.next().await {
                        Pulled::Job(message, _) | Pulled::Unrequested(message) => {
                            give_back(&drainer, message).await;
                        }
                        Pulled::Released => {}
                        Pulled::Failed(_) => break,
                    }
                }
            });
            return;
        };
        match pulled {
            Pulled::Job(message, permit) => {
                // Under steady load the requests are topped up before they run dry, so no pull
                // "returns": every job delivered counts as consuming.
                shared.observer.pulled();
                error_delay = Duration::from_millis(100);
                jobs.start(shared, message, permit);
            }
            Pulled::Unrequested(message) => jobs.alongside(give_back(shared, message)).await,
            Pulled::Released => shared.observer.pulled(),
            Pulled::Failed(error) => {
                shared.observer.pulled();
                jobs.alongside(pause_after_error(error, &mut error_delay, stop))
                    .await;
            }
        }
    }
}

/// Pulls jobs while there are free slots, until `stop` is cancelled.
async fn fetch_loop<'a, H: Handler, O: Observer>(
    shared: &'a Arc<Shared<H, O>>,
    consumers: &[PullConsumer],
    jobs: &mut InFlight<'a>,
    stop: &CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(shared.options.concurrency));
    let nats = shared.jetstream.client();
    let mut wake: Option<async_nats::Subscriber> = None;
    let mut round: u64 = 0;
    let mut error_delay = Duration::from_millis(100);
    let tokens = if shared.options.rate_limited {
        loop {
            match crate::rate::Tokens::bind(&shared.jetstream, &shared.queue).await {
                Ok(tokens) => break Some(tokens),
                Err(error) => {
                    jobs.alongside(pause_after_error(error, &mut error_delay, stop))
                        .await
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    } else {
        None
    };
    if let [consumer] = consumers {
        pull_loop(shared, consumer, jobs, stop, &slots, tokens.as_ref()).await;
        return;
    }
    while let Some(free) = jobs.alongside(free_slots(&slots, stop)).await {
        let mut permits = match ration(
            shared,
            jobs,
            free,
            0,
            tokens.as_ref(),
            stop,
            &mut error_delay,
        )
        .await
        {
            Ration::Ask(permits) => permits,
            Ration::Stop => return,
            Ration::Retry => continue,
        };
        if permits.is_empty() {
            // No tokens came.
            shared.observer.pulled();
            continue;
        }
        // Several levels: sweep them without waiting, most urgent first (every tenth round
        // least urgent first), taking at most the free slots in total.
        round += 1;
        let mut levels: Vec<usize> = (0..consumers.len()).rev().collect();
        if round.is_multiple_of(STARVATION_GUARD_ROUNDS) {
            levels.reverse();
        }
        let mut found = 0;
        for level in levels {
            if permits.is_empty() {
                break;
            }
            let batch = jobs
                .alongside(
                    consumers[level]
                        .fetch()
                        .max_messages(permits.len())
                        .messages(),
                )
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    jobs.alongside(pause_after_error(error.to_string(), &mut error_delay, stop))
                        .await;
                    continue;
                }
            };
            while let Some(message) = jobs.alongside(batch.next()).await {
                match message {
                    Ok(message) if stop.is_cancelled() => {
                        jobs.alongside(give_back(shared, message)).await;
                    }
                    Ok(message) => {
                        found += 1;
                        let permit = permits
                            .pop()
                            .expect("a fetch never returns more than asked");
                        jobs.start(shared, message, permit);
                    }
                    Err(error) => warn!(%error, "fetch ended with an error"),
                }
            }
        }
        shared.observer.pulled();
        if found > 0 {
            wake = None;
            continue;
        }
        drop(permits);
        // Nothing ready. Listen for new jobs before sweeping again, so none is missed; jobs that
        // come back after a nak delay or ack wait publish nothing, so re-check every poll_wait.
        match &mut wake {
            None => match jobs
                .alongside(nats.subscribe(shared.queue.jobs_wildcard()))
                .await
            {
                Ok(subscriber) => {
                    if let Err(error) = jobs.alongside(nats.flush()).await {
                        debug!(%error, "flushing wake-up subscription");
                    }
                    wake = Some(subscriber);
                }
                Err(error) => {
                    jobs.alongside(pause_after_error(error.to_string(), &mut error_delay, stop))
                        .await
                }
            },
            Some(subscriber) => {
                jobs.alongside(async {
                    tokio::select! {
                        _ = subscriber.next() => {}
                        () = tokio::time::sleep(shared.options.poll_wait) => {}
                        () = stop.cancelled() => {}
                    }
                })
                .await;
            }
        }
    }
}

/// What a worker may ask for with its free slots.
enum Ration {
    /// These slots (possibly none: no tokens came).
    Ask(Vec<OwnedSemaphorePermit>),
    /// Nothing more: stop requested, or `max_jobs` taken.
    Stop,
    /// Taking tokens failed (after a pause): start over.
    Retry,
}

/// Cuts the free `permits` down to what `max_jobs` leaves (counting `asked`, jobs asked for
/// and not yet delivered) and to the rate-limit tokens it gets, one per job.
async fn ration<'a, H: Handler, O: Observer>(
    shared: &Shared<H, O>,
    jobs: &mut InFlight<'a>,
    mut permits: Vec<OwnedSemaphorePermit>,
    asked: usize,
    tokens: Option<&crate::rate::Tokens>,
    stop: &CancellationToken,
    error_delay: &mut Duration,
) -> Ration {
    if let Some(max_jobs) = shared.options.max_jobs {
        let taken = shared.started.load(Ordering::Relaxed) + asked as u64;
        let remaining = max_jobs.saturating_sub(taken);
        if remaining == 0 && asked == 0 {
            info!(max_jobs, "took max_jobs jobs; stopping to be replaced");
            return Ration::Stop;
        }
        permits.truncate(usize::try_from(remaining).unwrap_or(usize::MAX));
    }
    if let Some(tokens) = tokens {
        let taken = jobs
            .alongside(async {
                tokio::select! {
                    taken = tokens.take(permits.len(), shared.options.poll_wait) => Some(taken),
                    () = stop.cancelled() => None,
                }
            })
            .await;
        match taken {
            None => return Ration::Stop,
            Some(Ok(granted)) => permits.truncate(granted),
            Some(Err(error)) => {
                jobs.alongside(pause_after_error(error, error_delay, stop))
                    .await;
                return Ration::Retry;
            }
        }
    }
    Ration::Ask(permits)
}

/// Logs a NATS error and waits a growing delay (up to 5 s) or until stop.
async fn pause_after_error(error: String, delay: &mut Duration, stop: &CancellationToken) {
    warn!(%error, retry_in = ?*delay, "pulling jobs failed");
    tokio::select! {
        () = tokio::time::sleep(*delay) => {}
        () = stop.cancelled() => {}
    }
    *delay = (*delay * 2).min(Duration::from_secs(5));
}

/// A job delivered after shutdown began: give it back at once, unprocessed.
async fn give_back<H, O>(shared: &Shared<H, O>, message: jetstream::Message) {
    shared.given_back.fetch_add(1, Ordering::Relaxed);
    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
        warn!(%error, "giving back a job at shutdown");
    }
}

/// A job running on this worker, as a future.
type JobFuture<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The jobs running on this worker: futures that the fetch loop drives itself, at each of its
/// waits, rather than a task per job. A task per job costs an allocation, a scheduler hand-off
/// and often a wake-up of another runtime thread; at tens of thousands of jobs a second that was
/// most of the worker's cost (`conveyor bench --breakdown`). Jobs share the worker's task, so a
/// handler must not block it: heavy computation belongs in `tokio::task::spawn_blocking` (or a
/// `tokio::spawn` of its own).
struct InFlight<'a> {
    jobs: futures::stream::FuturesUnordered<JobFuture<'a>>,
}

impl<'a> InFlight<'a> {
    fn new() -> Self {
        Self {
            jobs: futures::stream::FuturesUnordered::new(),
        }
    }

    /// Starts a job; it holds its slot until it is settled.
    fn start<H: Handler, O: Observer>(
        &mut self,
        shared: &'a Shared<H, O>,
        message: jetstream::Message,
        permit: OwnedSemaphorePermit,
    ) {
        shared.started.fetch_add(1, Ordering::Relaxed);
        self.jobs.push(Box::pin(async move {
            process(shared, message).await;
            drop(permit);
        }));
    }

    /// Waits for `future`, running the jobs meanwhile.
    async fn alongside<T>(&mut self, future: impl Future<Output = T>) -> T {
        tokio::pin!(future);
        loop {
            tokio::select! {
                // Jobs first: a finished job frees its slot for the next pull request.
                biased;
                Some(()) = self.jobs.next(), if !self.jobs.is_empty() => {}
                output = &mut future => return output,
            }
        }
    }

    /// Lets the jobs finish within the drain timeout, then gives the rest back.
    async fn drain<H, O>(mut self, shared: &Shared<H, O>) {
        info!(
            in_flight = self.jobs.len(),
            "stopped fetching; draining in-flight jobs"
        );
        let finish = async { while self.jobs.next().await.is_some() {} };
        if tokio::time::timeout(shared.options.drain_timeout, finish)
            .await
            .is_err()
        {
            warn!(
                in_flight = self.jobs.len(),
                "drain deadline passed; giving unfinished jobs back"
            );
            shared.give_back.cancel();
            while self.jobs.next().await.is_some() {}
        }
    }
}

/// Runs one attempt of one job and settles it.
async fn process<H: Handler, O: Observer>(shared: &Shared<H, O>, message: jetstream::Message) {
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
    let headers = message.headers.clone().unwrap_or_default();
    // A requeued dead letter keeps its job id in `Conveyor-Job-Id` (its `Nats-Msg-Id` is new).
    let id = headers
        .get(dead_letter::JOB_ID)
        .or_else(|| headers.get(protocol::MSG_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| format!("{}:{sequence}", shared.queue.stream()));
    let priority = message
        .subject
        .rsplit('.')
        .next()
        .and_then(|level| level.parse().ok())
        .unwrap_or(0);
    let started = Instant::now();
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

    let Some(running) = Running::start(&shared.cancels, sequence, &id) else {
        info!(job = %id, "job was cancelled; skipping it");
        finish(settle_cancelled(shared, &message, &acker, &id).await);
        return;
    };

    let options = match JobOptions::parse(message.headers.as_ref()) {
        Ok(options) => options,
        Err(error) => {
            warn!(job = %id, %error, "job has a malformed header; dead-lettering it");
            let failure = Failure {
                reason: "malformed",
                error: error.to_string(),
                attempt,
                sequence,
            };
            finish(dead_letter(shared, &message, &acker, &id, failure).await);
            return;
        }
    };
    let max_attempts = match (options.max_attempts, shared.max_deliver) {
        (Some(job), Some(queue)) => job.min(queue),
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) => u32::MAX,
    };
    let timeout = options.timeout.or(shared.options.job_timeout);
    let deadline = timeout.map(|t| started + t);
    shared.observer.started(&id, sequence, deadline);
    let job = ReceivedJob {
        id: id.clone(),
        payload: message.payload.clone(),
        headers,
        attempt,
        max_attempts,
        priority,
        deadline,
        cancel: running.cancel.clone(),
        progress: reply_to(&message)
            .map(|reply| Progress::to(shared.jetstream.client(), reply, id.clone()))
            .unwrap_or_default(),
    };

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
            finish(settle_cancelled(shared, &message, &acker, &id).await);
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

    let last_attempt = attempt >= max_attempts;
    let disposition = match outcome {
        Outcome::Done(result) => match acker.ack().await {
            Ok(()) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
                if outcome_wanted(shared, &message) {
                    let mut headers = HeaderMap::new();
                    headers.insert(protocol::result::JOB_ID, id.as_str());
                    headers.insert(protocol::result::STATUS, protocol::result::COMPLETED);
                    publish_result(shared, &message, &id, headers, result).await;
                }
                Disposition::Acked
            }
            Err(error) => {
                warn!(job = %id, %error, "ack failed; the job will be redelivered");
                return;
            }
        },
        Outcome::Permanent(error) => {
            let failure = Failure {
                reason: "permanent",
                error,
                attempt,
                sequence,
            };
            dead_letter(shared, &message, &acker, &id, failure).await
        }
        Outcome::Failed(error) if last_attempt => {
            let failure = Failure {
                reason: "exhausted",
                error,
                attempt,
                sequence,
            };
            dead_letter(shared, &message, &acker, &id, failure).await
        }
        Outcome::Retry { .. } if last_attempt => {
            let error = "handler asked for a retry on the last attempt".to_owned();
            let failure = Failure {
                reason: "exhausted",
                error,
                attempt,
                sequence,
            };
            dead_letter(shared, &message, &acker, &id, failure).await
        }
        Outcome::Failed(error) => {
            let delay = shared.options.backoff.delay(attempt);
            debug!(job = %id, attempt, %error, ?delay, "attempt failed; retrying later");
            retry(shared, &acker, &id, delay).await
        }
        Outcome::Retry { after } => {
            let delay = after.unwrap_or_else(|| shared.options.backoff.delay(attempt));
            retry(shared, &acker, &id, delay).await
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

/// Acks a cancelled job (no retry, no dead letter) and tells an awaiting producer.
async fn settle_cancelled<H, O>(
    shared: &Shared<H, O>,
    message: &async_nats::Message,
    acker: &Acker,
    id: &str,
) -> Disposition {
    if let Err(error) = acker.ack().await {
        warn!(job = %id, %error, "acking a cancelled job; it comes back and is skipped again");
    }
    shared.cancelled.fetch_add(1, Ordering::Relaxed);
    if outcome_wanted(shared, message) {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::result::JOB_ID, id);
        headers.insert(protocol::result::STATUS, protocol::result::CANCELLED);
        publish_result(shared, message, id, headers, Bytes::new()).await;
    }
    Disposition::Cancelled
}

/// Cancelled job ids (from the queue's cancellations stream) and the jobs running here.
struct Cancels {
    /// Cancelled ids and when this worker learnt of them.
    ids: HashMap<String, Instant>,
    /// Running jobs by stream sequence: their id and the token that tells their handler.
    running: HashMap<u64, (String, CancellationToken)>,
    /// How long the stream remembers a cancellation; older ids are forgotten here too.
    retention: Duration,
    /// Size of `ids` at which old ids are forgotten next.
    prune_at: usize,
}

impl Cancels {
    fn new(retention: Duration) -> Self {
        Self {
            ids: HashMap::new(),
            running: HashMap::new(),
            retention,
            prune_at: 1024,
        }
    }

    /// Records a cancellation and tells the handler if the job runs here.
    fn cancel(&mut self, id: String) {
        for (running_id, token) in self.running.values() {
            if *running_id == id {
                token.cancel();
            }
        }
        self.ids.insert(id, Instant::now());
        if self.ids.len() >= self.prune_at {
            let retention = self.retention;
            self.ids.retain(|_, seen| seen.elapsed() < retention);
            self.prune_at = (self.ids.len() * 2).max(1024);
        }
    }
}

/// A job registered as running, so a cancellation reaches it; unregistered on drop.
struct Running<'a> {
    cancels: &'a Mutex<Cancels>,
    sequence: u64,
    cancel: CancellationToken,
}

impl<'a> Running<'a> {
    /// Registers the job, or `None` when it is already cancelled. One lock for the check and
    /// the registration, so a cancellation arriving meanwhile is never missed.
    fn start(cancels: &'a Mutex<Cancels>, sequence: u64, id: &str) -> Option<Self> {
        let mut state = cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.ids.contains_key(id) {
            return None;
        }
        let cancel = CancellationToken::new();
        state
            .running
            .insert(sequence, (id.to_owned(), cancel.clone()));
        Some(Self {
            cancels,
            sequence,
            cancel,
        })
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut state = self
            .cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.running.remove(&self.sequence);
    }
}

/// Reads the queue's cancellations from the start (before the worker takes jobs), then
/// follows new ones in the background until `done`. Without a cancellations stream (a queue
/// created by an older Conveyor) cancellation is off, with a warning.
async fn follow_cancels(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    done: CancellationToken,
) -> Arc<Mutex<Cancels>> {
    let mut stream = match jetstream.get_stream(queue.cancel_stream()).await {
        Ok(stream) => stream,
        Err(error) => {
            warn!(stream = %queue.cancel_stream(), %error, "no cancellations stream; jobs cannot be cancelled");
            return Arc::new(Mutex::new(Cancels::new(Duration::ZERO)));
        }
    };
    let retention = match stream.info().await {
        Ok(info) if !info.config.max_age.is_zero() => info.config.max_age,
        _ => crate::admin::CANCEL_RETENTION,
    };
    let cancels = Arc::new(Mutex::new(Cancels::new(retention)));
    let config = push::OrderedConfig {
        deliver_subject: jetstream.client().new_inbox(),
        filter_subject: queue.cancels_wildcard(),
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = match stream.create_consumer(config).await {
        Ok(consumer) => consumer,
        Err(error) => {
            warn!(%error, "following cancellations failed; jobs cannot be cancelled");
            return cancels;
        }
    };
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = match consumer.messages().await {
        Ok(messages) => messages,
        Err(error) => {
            warn!(%error, "following cancellations failed; jobs cannot be cancelled");
            return cancels;
        }
    };
    let record = |cancels: &Mutex<Cancels>, message: &jetstream::Message| {
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(protocol::JOB_ID));
        if let Some(id) = id {
            let mut state = cancels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.cancel(id.as_str().to_owned());
        }
    };
    // Catch up with the cancellations made so far before taking any job.
    while pending > 0 {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(message))) => {
                record(&cancels, &message);
                pending = message.info().map(|info| info.pending).unwrap_or(0);
            }
            Ok(Some(Err(error))) => warn!(%error, "reading cancellations"),
            Ok(None) | Err(_) => break,
        }
    }
    let following = cancels.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(message)) => record(&following, &message),
                    Some(Err(error)) => warn!(%error, "reading cancellations"),
                    None => break,
                },
                () = done.cancelled() => break,
            }
        }
    });
    cancels
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
    Disposition::Retried { delay }
}

/// Why a job is being dead-lettered.
struct Failure {
    reason: &'static str,
    error: String,
    attempt: u32,
    sequence: u64,
}

/// Copies the job into the dead-letter stream with the failure headers, then terminates it.
/// If the copy fails the job is nak'd instead, so it is never lost.
async fn dead_letter<H, O>(
    shared: &Shared<H, O>,
    message: &async_nats::Message,
    acker: &Acker,
    id: &str,
    failure: Failure,
) -> Disposition {
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(
        protocol::MSG_ID,
        format!("{id}:{}", failure.sequence).as_str(),
    );
    headers.insert(dead_letter::JOB_ID, id);
    headers.insert(dead_letter::ERROR, header_safe(&failure.error).as_str());
    headers.insert(dead_letter::REASON, failure.reason);
    headers.insert(dead_letter::ATTEMPTS, failure.attempt.to_string().as_str());
    headers.insert(dead_letter::POD, shared.options.pod_name.as_str());
    headers.insert(dead_letter::FAILED_AT, protocol::now_rfc3339().as_str());
    headers.insert(dead_letter::SUBJECT, message.subject.as_str());
    headers.insert(dead_letter::SEQUENCE, failure.sequence.to_string().as_str());
    let subject = shared.queue.dead_letter_subject();
    let published = match shared
        .jetstream
        .publish_with_headers(subject, headers, message.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()),
        Err(error) => Err(error),
    };
    match published {
        Ok(()) => {
            warn!(job = %id, reason = failure.reason, attempts = failure.attempt,
                  error = %failure.error, "job dead-lettered");
            if let Err(error) = acker.ack_with(AckKind::Term).await {
                warn!(job = %id, %error, "terminating a dead-lettered job");
            }
            if outcome_wanted(shared, message) {
                let mut headers = HeaderMap::new();
                headers.insert(protocol::result::JOB_ID, id);
                headers.insert(protocol::result::STATUS, protocol::result::DEAD_LETTERED);
                headers.insert(dead_letter::REASON, failure.reason);
                headers.insert(dead_letter::ERROR, header_safe(&failure.error).as_str());
                headers.insert(dead_letter::ATTEMPTS, failure.attempt.to_string().as_str());
                publish_result(shared, message, id, headers, Bytes::new()).await;
            }
            shared.dead_lettered.fetch_add(1, Ordering::Relaxed);
            Disposition::DeadLettered {
                reason: failure.reason,
            }
        }
        Err(error) => {
            warn!(job = %id, %error, "dead-lettering failed; retrying the job instead");
            retry(
                shared,
                acker,
                id,
                shared.options.backoff.delay(failure.attempt),
            )
            .await
        }
    }
}

/// The subject a producer awaits the job's outcome on, if any.
fn reply_to(message: &async_nats::Message) -> Option<String> {
    let reply = message
        .headers
        .as_ref()?
        .get(protocol::REPLY_TO)?
        .as_str()
        .trim();
    (!reply.is_empty()).then(|| reply.to_owned())
}

/// Whether anyone wants the job's outcome: a producer awaiting it, or the results stream.
fn outcome_wanted<H, O>(shared: &Shared<H, O>, message: &async_nats::Message) -> bool {
    shared.options.store_results || reply_to(message).is_some()
}

/// Sends a job's final outcome to the awaiting producer (plain publish: only a live waiter
/// receives it) and, with `store_results`, keeps it in the queue's results stream (JetStream
/// publish, acknowledged; one per job id).
async fn publish_result<H, O>(
    shared: &Shared<H, O>,
    message: &async_nats::Message,
    id: &str,
    headers: HeaderMap,
    payload: Bytes,
) {
    if shared.options.store_results {
        let subject = shared.queue.result_subject(id);
        let stored = match shared
            .jetstream
            .publish_with_headers(subject, headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()),
            Err(error) => Err(error),
        };
        if let Err(error) = stored {
            warn!(job = %id, %error, "storing a job result");
        }
    }
    if let Some(reply) = reply_to(message) {
        let nats = shared.jetstream.client();
        if let Err(error) = nats.publish_with_headers(reply, headers, payload).await {
            warn!(%error, "publishing a job result");
        }
    }
}

/// Header values are one line of printable text; keep the error readable and bounded.
fn header_safe(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    if line.trim().is_empty() {
        line = "unknown error".into();
    }
    line
}
