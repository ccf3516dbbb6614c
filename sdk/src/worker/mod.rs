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

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::names::QueueRef;
use crate::protocol::{self, Backoff};

mod ancestry;
mod cancels;
mod fetch;
mod flow;
mod job;
mod settle;

pub use flow::JobFlow;

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
    /// The job goes on as job `K` once every child it spawned ([`JobFlow::spawn`]) has
    /// finished: `K` is stored in the queue's waiting stream and this job is acked at once (its
    /// slot freed). `K` reads its children's results ([`JobFlow::children_page`]); its
    /// outcome is this job's outcome for whoever awaits or depends on it.
    Continue(Box<crate::client::Job>),
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
    /// Dependencies, children and continuations of the job ([`JobFlow`]).
    pub flow: JobFlow,
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
        let headers = protocol::Outcome::Progress.encode(id);
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
    /// Handed on to a continuation waiting for the job's children; acked.
    Continued,
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
    /// for free slots was answered (filled or expired; a failed request does not count): it is
    /// consuming. Happens at least every `poll_wait` while a slot is free and NATS answers.
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
    /// Store each finished job's outcome in the queue's results stream, so producers can fetch
    /// it later (`Client::result`) and jobs can depend on it (on by default: a job of a queue
    /// whose workers turn it off can only be depended on by its children's parent). Children
    /// and continuations are recorded whatever this says.
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
            store_results: true,
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
    /// The NATS client died: its connection task is gone (async-nats 0.51 panics in it on a
    /// header value with a bare CR) and it will never reconnect. The worker stopped at once,
    /// giving its jobs back; run a new worker on a new client.
    #[error("the NATS client's connection is gone for good; reconnect with a new client")]
    ConnectionLost,
}

/// How long a worker trusts what it read of a job's ancestors (were they cancelled with their
/// children, `Client::cancel_with_children`?): such a cancellation reaches every job that
/// starts this long after it, and a fan-out of thousands of children costs its workers one
/// read of their parent per period instead of one per child.
pub const ANCESTORS_REMEMBERED: Duration = Duration::from_secs(1);

/// How often a running worker checks that its NATS client is still alive.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// Completes when `client`'s connection task is gone for good (a flush can no longer even be
/// handed to it). A connection that is only reconnecting is not gone: its flush waits.
pub async fn connection_gone(client: async_nats::Client) {
    loop {
        tokio::time::sleep(CONNECTION_CHECK).await;
        let flushed = tokio::time::timeout(CONNECTION_CHECK * 2, client.flush()).await;
        if let Ok(Err(error)) = flushed
            && error.kind() == async_nats::client::FlushErrorKind::SendError
        {
            return;
        }
    }
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
        self.shared_handler(Arc::new(handler))
    }

    /// Sets a handler shared with other runs (a runtime that replaces a dead client runs the
    /// same handler on a new worker).
    pub fn shared_handler<H: Handler>(self, handler: Arc<H>) -> Runner<H, NoObserver> {
        Runner {
            worker: self,
            handler,
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
    /// The queue's work stream name (kept: it names jobs without an id).
    stream: String,
    options: WorkerOptions,
    /// Consumer `ack_wait`: heartbeats go out every third of it.
    ack_wait: Duration,
    /// Consumer `max_deliver` (`None` when unlimited).
    max_deliver: Option<u32>,
    /// Cancelled when the drain deadline passes: unfinished jobs are given back.
    give_back: CancellationToken,
    /// Cancelled job ids and the jobs running here.
    cancels: Arc<Mutex<cancels::Cancels>>,
    /// What this worker read lately of its jobs' ancestors (cancelled with their children?).
    ancestry: ancestry::Ancestry,
    /// When jobs that publish nothing on becoming ready (those this worker retried with a
    /// backoff, delayed jobs it saw submitted) are due, earliest first: an idle multi-level
    /// worker wakes then instead of after its `poll_wait`. At most [`DUE_TIMES_REMEMBERED`].
    due_times: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<std::time::Instant>>>,
    /// Jobs handed to the handler so far (for `max_jobs`).
    started: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    given_back: AtomicU64,
    cancelled: AtomicU64,
}

impl<H, O> Shared<H, O> {
    /// Remembers that a job becomes ready at `at` without any publish announcing it: an idle
    /// worker pulls a little after `at` and, in case the server made it deliverable later
    /// than that (its scheduler fires on whole seconds, then the work stream sources the
    /// copy), a few more times within the next seconds ([`DUE_FOLLOW_UPS`]).
    fn due_at(&self, at: std::time::Instant) {
        let mut due = self
            .due_times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for after in DUE_FOLLOW_UPS {
            if due.len() < DUE_TIMES_REMEMBERED {
                due.push(std::cmp::Reverse(at + after));
            }
        }
    }

    /// How long an idle worker may wait, at most `longest`: until the earliest remembered pull
    /// time ([`Shared::due_at`]). Times that have passed are forgotten (the pull after them
    /// found the job, or another worker took it).
    fn next_due(&self, longest: Duration) -> Duration {
        let mut due = self
            .due_times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        while let Some(std::cmp::Reverse(first)) = due.peek() {
            if *first > now {
                return first.saturating_duration_since(now).min(longest);
            }
            due.pop();
        }
        longest
    }
}

/// Most due times a worker remembers (beyond, those jobs wait for `poll_wait`).
const DUE_TIMES_REMEMBERED: usize = 4096;

/// When an idle worker pulls after a remembered job is due.
const DUE_FOLLOW_UPS: [Duration; 4] = [
    Duration::from_millis(20),
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

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
        let lost = CancellationToken::new();
        let watch = (jetstream.client(), lost.clone(), stop.clone());
        tokio::spawn(async move {
            let (client, lost, stop) = watch;
            tokio::select! {
                () = connection_gone(client) => {
                    warn!("the NATS connection task is gone; stopping to reconnect");
                    lost.cancel();
                    stop.cancel();
                }
                () = stop.cancelled() => {}
            }
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
                        () = stop.cancelled() => {
                            return if lost.is_cancelled() {
                                Err(WorkerError::ConnectionLost)
                            } else {
                                Ok(Summary::default())
                            };
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let following = CancellationToken::new();
        let cancels = cancels::follow_cancels(&jetstream, &queue, following.clone()).await;
        let shared = Arc::new(Shared {
            handler: self.handler,
            observer: self.observer,
            jetstream: jetstream.clone(),
            queue: queue.clone(),
            stream: queue.stream(),
            ack_wait: config.ack_wait,
            max_deliver: u32::try_from(config.max_deliver).ok().filter(|n| *n > 0),
            options,
            give_back: CancellationToken::new(),
            cancels,
            ancestry: ancestry::Ancestry::default(),
            due_times: Mutex::default(),
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
        let mut in_flight = fetch::InFlight::new();
        fetch::fetch_loop(&shared, &consumers, &mut in_flight, &stop).await;
        if lost.is_cancelled() {
            // No ack can leave any more: stop the handlers now; their jobs come back after the
            // ack wait.
            shared.give_back.cancel();
        }
        in_flight.drain(&shared).await;
        if lost.is_cancelled() {
            following.cancel();
            return Err(WorkerError::ConnectionLost);
        }
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
