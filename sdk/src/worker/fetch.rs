//! The fetch loops: pull jobs for free slots only (one level: pipelined requests; several:
//! most urgent level first with the anti-starvation sweep), ration them by `max_jobs` and
//! rate-limit tokens, and drive the running jobs alongside.

/// Every this many fetch rounds, levels are tried from the lowest up, so a flood of urgent jobs
/// cannot starve the lower levels completely.
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Handler, Observer, Shared, job::process};
use crate::names::WAKE_GROUP;
use crate::pull::{Pulled, Puller};

const STARVATION_GUARD_ROUNDS: u64 = 10;

/// A one-level worker with requests outstanding asks for more once a `1/TOP_UP_FRACTION` of its
/// slots are free.
const TOP_UP_FRACTION: usize = 8;

/// Waits for at least one free slot, then takes every other free one too.
async fn free_slots(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    // Stop first: after a stop, a free slot must not start another round of pulling.
    let first = tokio::select! {
        biased;
        () = stop.cancelled() => return None,
        permit = slots.clone().acquire_owned() => permit.ok()?,
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
        if stop.is_cancelled() {
            // A failed request after the stop (the connection died) must not spin.
            return;
        }
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
                // A failed request is no sign of consuming: a worker whose requests keep
                // failing while connected fails its liveness probe.
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
                jobs.alongside(pause_after_error(error, &mut error_delay, stop))
                    .await;
            }
        }
    }
}

/// Pulls jobs while there are free slots, until `stop` is cancelled.
pub(super) async fn fetch_loop<'a, H: Handler, O: Observer>(
    shared: &'a Arc<Shared<H, O>>,
    consumers: &[PullConsumer],
    jobs: &mut InFlight<'a>,
    stop: &CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(shared.options.concurrency));
    let nats = shared.jetstream.client();
    let mut wake: Option<Wake> = None;
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
        let mut answered = false;
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
                Ok(batch) => {
                    answered = true;
                    batch
                }
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
        if answered {
            shared.observer.pulled();
        }
        if found > 0 {
            wake = None;
            continue;
        }
        drop(permits);
        // Nothing ready. Listen for new jobs before sweeping again, so none is missed; jobs that
        // come back after a nak delay or ack wait publish nothing, so re-check every poll_wait.
        match &mut wake {
            None => match jobs.alongside(Wake::subscribe(&nats, &shared.queue)).await {
                Ok(subscribed) => {
                    if let Err(error) = jobs.alongside(nats.flush()).await {
                        debug!(%error, "flushing wake-up subscriptions");
                    }
                    wake = Some(subscribed);
                }
                Err(error) => {
                    jobs.alongside(pause_after_error(error.to_string(), &mut error_delay, stop))
                        .await
                }
            },
            Some(subscribed) => {
                let until = shared.next_due(shared.options.poll_wait);
                jobs.alongside(async {
                    tokio::select! {
                        () = subscribed.next(shared) => {}
                        () = tokio::time::sleep(until) => {}
                        () = stop.cancelled() => {}
                    }
                })
                .await;
            }
        }
    }
}

/// What wakes an idle multi-level worker before its `poll_wait`: a job published on one of
/// the queue's job subjects, and the due time of a job that becomes ready without a publish
/// (the server's scheduler writes a delayed job's due copy without one): a delayed job seen
/// submitted on `delayed.*`, or a job this worker retried with a backoff
/// ([`Shared::next_due`]). In the queue group [`WAKE_GROUP`], so one idle worker hears of each
/// job.
struct Wake {
    jobs: async_nats::Subscriber,
    delayed: async_nats::Subscriber,
}

impl Wake {
    async fn subscribe(
        nats: &async_nats::Client,
        queue: &crate::names::QueueRef,
    ) -> Result<Self, async_nats::SubscribeError> {
        let group = || WAKE_GROUP.to_owned();
        Ok(Self {
            jobs: nats.queue_subscribe(queue.jobs_wildcard(), group()).await?,
            delayed: nats
                .queue_subscribe(queue.delayed_wildcard(), group())
                .await?,
        })
    }

    /// Until a job is published, or a delayed one (whose due time is then remembered).
    async fn next<H, O>(&mut self, shared: &Shared<H, O>) {
        tokio::select! {
            _ = self.jobs.next() => {}
            Some(message) = self.delayed.next() => {
                if let Some(at) = due_time(&message) {
                    shared.due_at(at);
                }
            }
        }
    }
}

/// When a delayed job's schedule (`Nats-Schedule: @at <RFC 3339>`) makes it due, as an
/// instant of this process; `None` for anything else.
fn due_time(message: &async_nats::Message) -> Option<std::time::Instant> {
    let value = message
        .headers
        .as_ref()?
        .get(crate::protocol::schedule::SCHEDULE)?;
    let at: jiff::Timestamp = value.as_str().strip_prefix("@at ")?.trim().parse().ok()?;
    let now = jiff::Timestamp::now();
    let wait = now.duration_until(at);
    let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
    std::time::Instant::now().checked_add(wait)
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
pub(super) struct InFlight<'a> {
    jobs: futures::stream::FuturesUnordered<JobFuture<'a>>,
}

impl<'a> InFlight<'a> {
    pub(super) fn new() -> Self {
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
    pub(super) async fn drain<H, O>(mut self, shared: &Shared<H, O>) {
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
