//! `conveyor bench`: measures Conveyor against raw JetStream on the same server, in the same
//! process and the same run, so the ratio says what Conveyor's protocol costs on this machine.
//!
//! Two measurements, each repeated `--rounds` times, raw and Conveyor alternating:
//! - throughput: `--jobs` no-op jobs of `--payload` bytes, producer and workers running at once;
//! - latency: submit-to-handler time at a fixed `--rate` for `--latency-seconds`.
//!
//! Raw is "publish with ack, pull, ack" on a work-queue stream like Conveyor's. Its throughput
//! shape is the fastest of a sweep run first (publish window, pull streams on the one durable
//! consumer, batch size: [`raw_shapes`]), so the ratio is against the best raw JetStream this
//! machine does, not against a shape chosen to match Conveyor's; the latency and breakdown
//! measurements keep one pull stream of `--concurrency`. Conveyor is `Client::submit_batch`
//! → the worker engine of the `conveyor-worker` runtime, with the runtime's observer (metrics,
//! liveness, running-jobs file) → ack, with the same concurrency. The handler is an in-process
//! no-op: what is measured is Conveyor's cost, not a handler mode's.
//! The figures are medians over the rounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use conveyor::admin::{self, QueueSettings};
use conveyor::client::{Client, Job};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, Worker, WorkerOptions};
use conveyor_worker::health::Metrics;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Notify;

use crate::args::BenchArgs;
use crate::dev::nats::LocalNats;

/// Publishes awaiting their ack at once, raw and Conveyor alike.
const PUBLISH_WINDOW: usize = 256;
/// Longest a single measurement may take before the bench gives up.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// Result of one throughput measurement.
#[derive(Debug, Clone, Copy, Serialize)]
struct Throughput {
    jobs_per_second: f64,
    seconds: f64,
}

/// Result of one latency measurement, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    samples: usize,
}

/// Medians of all rounds, and Conveyor relative to raw JetStream.
#[derive(Debug, Serialize)]
struct Report {
    nats_server: String,
    jobs: usize,
    payload_bytes: usize,
    concurrency: usize,
    /// Priority levels of Conveyor's queue.
    priorities: u8,
    /// Whether Conveyor's workers stored each outcome (the default; `--no-store-results`).
    store_results: bool,
    rate_per_second: u32,
    rounds: usize,
    raw_throughput: f64,
    conveyor_throughput: f64,
    throughput_ratio: f64,
    raw_p50_ms: f64,
    raw_p99_ms: f64,
    conveyor_p50_ms: f64,
    conveyor_p99_ms: f64,
    p99_ratio: f64,
    /// Medians of the breakdown (`--breakdown`), jobs per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    breakdown: Option<BreakdownMedians>,
    /// The raw side's shape in the throughput rounds: the sweep's fastest.
    raw_shape: RawShape,
    /// Every raw shape tried, fastest first.
    raw_sweep: Vec<SweptShape>,
    all_rounds: Vec<Round>,
}

/// Medians of [`Breakdown`] over the rounds, jobs per second.
#[derive(Debug, Serialize)]
struct BreakdownMedians {
    raw_publish: f64,
    conveyor_submit: f64,
    submit_ratio: f64,
    raw_consume: f64,
    conveyor_consume: f64,
    consume_ratio: f64,
}

/// Every figure of one round.
#[derive(Debug, Serialize)]
struct Round {
    raw_throughput: Throughput,
    conveyor_throughput: Throughput,
    raw_latency: Latency,
    conveyor_latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    breakdown: Option<Breakdown>,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Keep the server (if we started one) alive for the whole run.
    let (url, _server, _dir) = match &args.nats_url {
        Some(url) => (url.clone(), None, None),
        None => {
            let dir = tempfile::tempdir().context("creating a temp dir for nats-server")?;
            let server = LocalNats::start(&args.nats_server, dir.path()).await?;
            (server.url().to_owned(), Some(server), Some(dir))
        }
    };
    let nats_server = server_version(&url).await?;
    eprintln!(
        "bench: {} jobs of {} B, concurrency {}, latency at {}/s for {} s, {} rounds, against {url} ({nats_server})",
        args.jobs, args.payload, args.concurrency, args.rate, args.latency_seconds, args.rounds
    );
    let sweep = sweep_raw(&url, &args).await?;
    let best = sweep.first().context("the sweep measured no shape")?.shape;
    eprintln!(
        "raw baseline: window {}, {} pull streams, batches of {}",
        best.window, best.consumers, best.batch
    );
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let tag = format!("round_{round}");
        let raw_throughput = raw_throughput(&url, args.payload, args.jobs, best, &tag).await?;
        eprintln!(
            "round {round}: raw      {:>9.0} jobs/s",
            raw_throughput.jobs_per_second
        );
        let conveyor_throughput = conveyor_throughput(&url, &args, round).await?;
        eprintln!(
            "round {round}: conveyor {:>9.0} jobs/s",
            conveyor_throughput.jobs_per_second
        );
        let raw_latency = raw_latency(&url, &args, round).await?;
        eprintln!(
            "round {round}: raw      p50 {:.2} ms p99 {:.2} ms",
            raw_latency.p50_ms, raw_latency.p99_ms
        );
        let conveyor_latency = conveyor_latency(&url, &args, round).await?;
        eprintln!(
            "round {round}: conveyor p50 {:.2} ms p99 {:.2} ms",
            conveyor_latency.p50_ms, conveyor_latency.p99_ms
        );
        let breakdown = if args.breakdown {
            let parts = breakdown(&url, &args, round).await?;
            eprintln!(
                "round {round}: publish alone raw {:.0} / conveyor {:.0} jobs/s; consume alone raw {:.0} / conveyor {:.0} jobs/s",
                parts.raw_publish.jobs_per_second,
                parts.conveyor_submit.jobs_per_second,
                parts.raw_consume.jobs_per_second,
                parts.conveyor_consume.jobs_per_second
            );
            Some(parts)
        } else {
            None
        };
        rounds.push(Round {
            raw_throughput,
            conveyor_throughput,
            raw_latency,
            conveyor_latency,
            breakdown,
        });
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let raw_tp = med(&|r| r.raw_throughput.jobs_per_second);
    let conv_tp = med(&|r| r.conveyor_throughput.jobs_per_second);
    let raw_p99 = med(&|r| r.raw_latency.p99_ms);
    let conv_p99 = med(&|r| r.conveyor_latency.p99_ms);
    let breakdown = args.breakdown.then(|| {
        let part = |f: &dyn Fn(&Breakdown) -> Throughput| {
            med(&|r| r.breakdown.map_or(f64::NAN, |b| f(&b).jobs_per_second))
        };
        let raw_publish = part(&|b| b.raw_publish);
        let conveyor_submit = part(&|b| b.conveyor_submit);
        let raw_consume = part(&|b| b.raw_consume);
        let conveyor_consume = part(&|b| b.conveyor_consume);
        BreakdownMedians {
            raw_publish,
            conveyor_submit,
            submit_ratio: conveyor_submit / raw_publish,
            raw_consume,
            conveyor_consume,
            consume_ratio: conveyor_consume / raw_consume,
        }
    });
    let report = Report {
        nats_server,
        jobs: args.jobs,
        payload_bytes: args.payload,
        concurrency: args.concurrency,
        priorities: args.priorities,
        store_results: !args.no_store_results,
        rate_per_second: args.rate,
        rounds: args.rounds,
        raw_throughput: raw_tp,
        conveyor_throughput: conv_tp,
        throughput_ratio: conv_tp / raw_tp,
        raw_p50_ms: med(&|r| r.raw_latency.p50_ms),
        raw_p99_ms: raw_p99,
        conveyor_p50_ms: med(&|r| r.conveyor_latency.p50_ms),
        conveyor_p99_ms: conv_p99,
        p99_ratio: conv_p99 / raw_p99,
        breakdown,
        raw_shape: best,
        raw_sweep: sweep,
        all_rounds: rounds,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(r: &Report) {
    println!(
        "Conveyor vs raw JetStream ({}, medians of {} rounds)",
        r.nats_server, r.rounds
    );
    println!(
        "  throughput, {} jobs x {} B, concurrency {}, {} priority level(s) on Conveyor, outcomes \
         {}:",
        r.jobs,
        r.payload_bytes,
        r.concurrency,
        r.priorities,
        if r.store_results {
            "stored"
        } else {
            "not stored"
        }
    );
    println!(
        "    raw JetStream  {:>9.0} jobs/s  (best of {} shapes swept: window {}, {} pull \
         streams, batches of {})",
        r.raw_throughput,
        r.raw_sweep.len(),
        r.raw_shape.window,
        r.raw_shape.consumers,
        r.raw_shape.batch
    );
    println!("    Conveyor       {:>9.0} jobs/s", r.conveyor_throughput);
    println!("    ratio          {:>9.2}", r.throughput_ratio);
    println!(
        "  submit-to-handler latency at {} jobs/s:",
        r.rate_per_second
    );
    println!(
        "    raw JetStream  p50 {:>6.2} ms  p99 {:>6.2} ms",
        r.raw_p50_ms, r.raw_p99_ms
    );
    println!(
        "    Conveyor       p50 {:>6.2} ms  p99 {:>6.2} ms",
        r.conveyor_p50_ms, r.conveyor_p99_ms
    );
    println!("    p99 ratio      {:>9.2}", r.p99_ratio);
    if let Some(b) = &r.breakdown {
        println!("  each side apart, {} jobs:", r.jobs);
        println!(
            "    publish alone  raw {:>9.0}  Conveyor {:>9.0} jobs/s  ratio {:.2}",
            b.raw_publish, b.conveyor_submit, b.submit_ratio
        );
        println!(
            "    consume alone  raw {:>9.0}  Conveyor {:>9.0} jobs/s  ratio {:.2}",
            b.raw_consume, b.conveyor_consume, b.consume_ratio
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

async fn server_version(url: &str) -> anyhow::Result<String> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(format!("nats-server {}", client.server_info().version))
}

async fn jetstream_at(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(jetstream::new(client))
}

/// A fresh stream + durable pull consumer for a raw run; the stream is deleted afterwards.
async fn raw_setup(
    url: &str,
    name: &str,
) -> anyhow::Result<(jetstream::Context, consumer::PullConsumer, String)> {
    let js = jetstream_at(url).await?;
    let subject = format!("bench.{name}");
    let stream = js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            // Like Conveyor's work stream: an acked message is removed.
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .context("creating the raw consumer")?;
    // The consumer gets its own connection, as Conveyor's worker does.
    let consumer = jetstream_at(url)
        .await?
        .get_consumer_from_stream(consumer.cached_info().name.clone(), name)
        .await
        .map_err(|e| anyhow::anyhow!("binding the raw consumer: {e}"))?;
    Ok((js, consumer, subject))
}

/// A fresh Conveyor queue (its stream and consumer made the way the operator makes them).
async fn conveyor_setup(
    url: &str,
    name: &str,
    args: &BenchArgs,
) -> anyhow::Result<(Client, Worker, QueueRef)> {
    let priorities = args.priorities;
    let queue = QueueRef::new("bench", name);
    let client = Client::connect(url).await?;
    let settings = QueueSettings {
        priorities,
        ..QueueSettings::default()
    };
    admin::ensure_queue(client.jetstream(), &queue, &settings)
        .await
        .context("creating the bench queue")?;
    // The workers get their own connection, as a worker pod would.
    let options = WorkerOptions {
        store_results: !args.no_store_results,
        ..WorkerOptions::default()
    };
    let worker = Worker::new(jetstream_at(url).await?, queue.clone())
        .options(options)
        .priorities(priorities);
    Ok((client, worker, queue))
}

/// The `i`th bench job: levels taken in turn.
fn bench_job(id: String, payload: Bytes, i: u64, priorities: u8) -> Job {
    Job::new(id, payload).priority(u8::try_from(i % u64::from(priorities)).unwrap_or(0))
}

async fn raw_teardown(js: &jetstream::Context, name: &str) {
    let _ = js.delete_stream(name).await;
}

async fn conveyor_teardown(client: &Client, queue: &QueueRef) {
    if let Err(error) = conveyor_operator::assets::delete(client.jetstream(), queue).await {
        tracing::warn!(%error, "deleting the bench queue");
    }
}

/// Waits until `count` reaches `target`, with the run deadline.
async fn wait_count(
    count: &AtomicU64,
    done: &Notify,
    target: u64,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + RUN_DEADLINE;
    while count.load(Ordering::Acquire) < target {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{what}: only {} of {target} jobs after {RUN_DEADLINE:?}",
                count.load(Ordering::Acquire)
            );
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), done.notified()).await;
    }
    Ok(())
}

/// How the raw side publishes and consumes: the knobs a raw JetStream user tunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct RawShape {
    /// Publishes awaiting their ack at once.
    window: usize,
    /// Tasks pulling from the one durable consumer, each with a pull stream of its own.
    consumers: usize,
    /// Messages asked for per pull request.
    batch: usize,
}

/// One shape the sweep tried, and what it reached.
#[derive(Debug, Clone, Copy, Serialize)]
struct SweptShape {
    shape: RawShape,
    throughput: Throughput,
}

/// Jobs per shape of the sweep (at most `--jobs`).
const SWEEP_JOBS: usize = 100_000;

/// The shapes the sweep tries: Conveyor's own (window [`PUBLISH_WINDOW`], one pull stream,
/// batches of `--concurrency`) and wider ones, in windows, pull streams and batch sizes.
fn raw_shapes(concurrency: usize) -> Vec<RawShape> {
    let mut shapes = vec![RawShape {
        window: PUBLISH_WINDOW,
        consumers: 1,
        batch: concurrency,
    }];
    for window in [PUBLISH_WINDOW, 1024, 4096] {
        for consumers in [1, 4, 16] {
            for batch in [concurrency, 500] {
                let shape = RawShape {
                    window,
                    consumers,
                    batch,
                };
                if !shapes.contains(&shape) {
                    shapes.push(shape);
                }
            }
        }
    }
    shapes
}

/// Measures every shape of [`raw_shapes`] once with [`SWEEP_JOBS`] jobs (or `--jobs`, when
/// fewer), fastest first: the raw baseline is the best raw JetStream this machine does.
async fn sweep_raw(url: &str, args: &BenchArgs) -> anyhow::Result<Vec<SweptShape>> {
    let jobs = args.jobs.min(SWEEP_JOBS);
    let mut swept = Vec::new();
    for (i, shape) in raw_shapes(args.concurrency).into_iter().enumerate() {
        let throughput =
            raw_throughput(url, args.payload, jobs, shape, &format!("sweep_{i}")).await?;
        eprintln!(
            "sweep: window {:>5}, {:>2} pull streams, batches of {:>4}: {:>9.0} jobs/s",
            shape.window, shape.consumers, shape.batch, throughput.jobs_per_second
        );
        swept.push(SweptShape { shape, throughput });
    }
    swept.sort_by(|a, b| {
        b.throughput
            .jobs_per_second
            .total_cmp(&a.throughput.jobs_per_second)
    });
    Ok(swept)
}

/// Raw JetStream publishing and consuming `jobs` at once, in `shape`.
async fn raw_throughput(
    url: &str,
    payload: usize,
    jobs: usize,
    shape: RawShape,
    tag: &str,
) -> anyhow::Result<Throughput> {
    let name = format!("bench_raw_tp_{tag}_{}", std::process::id());
    let (js, consumer, subject) = raw_setup(url, &name).await?;
    let payload = Bytes::from(vec![b'x'; payload]);
    let n = jobs as u64;
    let start = Instant::now();
    let producer = tokio::spawn(publish_all(js.clone(), subject, payload, n, shape.window));
    consume_raw_parallel(&consumer, shape, n).await?;
    let result = throughput(n, start);
    producer.await??;
    raw_teardown(&js, &name).await;
    Ok(result)
}

/// Pulls and acks `n` messages with `shape.consumers` pull streams of batches of `shape.batch`.
async fn consume_raw_parallel(
    consumer: &consumer::PullConsumer,
    shape: RawShape,
    n: u64,
) -> anyhow::Result<()> {
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..shape.consumers {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(shape.batch)
            .messages()
            .await
            .context("starting a raw pull")?;
        let (acked, done) = (acked.clone(), done.clone());
        tasks.spawn(async move {
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("raw pull: {e}"))?;
                message
                    .ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("raw ack: {e}"))?;
                if acked.fetch_add(1, Ordering::AcqRel) + 1 >= n {
                    done.notify_one();
                }
            }
            anyhow::Ok(())
        });
    }
    let waited = wait_count(&acked, &done, n, "raw consume").await;
    // The pull streams still open would wait for more: end them.
    tasks.abort_all();
    while let Some(ended) = tasks.join_next().await {
        if let Ok(Err(error)) = ended {
            return Err(error);
        }
    }
    waited
}

/// Pulls `n` messages (batches of `concurrency`), hands each payload to `seen`, then acks it.
async fn consume_raw(
    consumer: &consumer::PullConsumer,
    concurrency: usize,
    n: u64,
    mut seen: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await
        .context("starting the raw pull")?;
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    for _ in 0..n {
        let message = tokio::time::timeout_at(deadline, messages.next())
            .await
            .context("raw consumer timed out")?
            .context("raw pull ended")?
            .map_err(|e| anyhow::anyhow!("raw pull: {e}"))?;
        seen(&message.payload);
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("raw ack: {e}"))?;
    }
    Ok(())
}

/// Publishes `n` raw messages with acks, `window` at a time.
async fn publish_all(
    js: jetstream::Context,
    subject: String,
    payload: Bytes,
    n: u64,
    window: usize,
) -> anyhow::Result<()> {
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| {
            let js = &js;
            let subject = subject.clone();
            let payload = payload.clone();
            async move { js.publish(subject, payload).await?.await }
        })
        .buffer_unordered(window)
        .collect()
        .await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        bail!("raw publish failed: {e}");
    }
    Ok(())
}

/// The observer of the `conveyor-worker` runtime (metrics, liveness, and the running-jobs file
/// that a pod keeps for its termination message), so the bench pays the runtime's bookkeeping
/// per job, not only the engine's. The file lives as long as the returned handle.
fn runtime_observer(concurrency: usize) -> anyhow::Result<(Arc<Metrics>, tempfile::NamedTempFile)> {
    let file = tempfile::NamedTempFile::new().context("creating the running-jobs file")?;
    let metrics =
        Metrics::new(concurrency, Duration::from_secs(60)).running_jobs_file(file.path())?;
    Ok((Arc::new(metrics), file))
}

/// A worker with no-op handlers counting the jobs it handled; stopped by [`NoopWorker::stop`].
struct NoopWorker {
    handled: Arc<AtomicU64>,
    done: Arc<Notify>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<Result<conveyor::worker::Summary, conveyor::worker::WorkerError>>,
    target: u64,
    _running_jobs_file: tempfile::NamedTempFile,
}

impl NoopWorker {
    /// Starts the worker; `seen` is called with each job as its handler starts.
    fn start(
        worker: Worker,
        concurrency: usize,
        target: u64,
        seen: impl Fn(&ReceivedJob) + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let (observer, running_jobs_file) = runtime_observer(concurrency)?;
        let handled = Arc::new(AtomicU64::new(0));
        let done = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let runner = {
            let (handled, done, stop) = (handled.clone(), done.clone(), stop.clone());
            worker
                .concurrency(concurrency)
                .handler(move |job: ReceivedJob| {
                    seen(&job);
                    if handled.fetch_add(1, Ordering::AcqRel) + 1 == target {
                        done.notify_one();
                    }
                    async { Outcome::Done(Bytes::new()) }
                })
                .observer(observer)
                .run(async move { stop.notified().await })
        };
        Ok(Self {
            handled,
            done,
            stop,
            task: tokio::spawn(runner),
            target,
            _running_jobs_file: running_jobs_file,
        })
    }

    async fn finished(&self, what: &str) -> anyhow::Result<()> {
        wait_count(&self.handled, &self.done, self.target, what).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.notify_one();
        self.task.await??;
        Ok(())
    }
}

/// Submits `n` jobs of `payload` with `Client::submit_batch`; fails if any submission failed.
async fn submit_all(
    client: Client,
    queue: QueueRef,
    payload: Bytes,
    n: u64,
    priorities: u8,
) -> anyhow::Result<()> {
    let jobs = (0..n).map(move |i| bench_job(format!("j{i}"), payload.clone(), i, priorities));
    let failed = client
        .submit_batch(&queue, jobs)
        .await
        .into_iter()
        .filter(Result::is_err)
        .count();
    if failed > 0 {
        bail!("{failed} submissions failed");
    }
    Ok(())
}

fn throughput(n: u64, start: Instant) -> Throughput {
    let seconds = start.elapsed().as_secs_f64();
    Throughput {
        jobs_per_second: n as f64 / seconds,
        seconds,
    }
}

async fn conveyor_throughput(
    url: &str,
    args: &BenchArgs,
    round: usize,
) -> anyhow::Result<Throughput> {
    let name = format!("tp-{round}-{}", std::process::id());
    let (client, worker, queue) = conveyor_setup(url, &name, args).await?;
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let n = args.jobs as u64;
    let start = Instant::now();
    let worker = NoopWorker::start(worker, args.concurrency, n, |_| {})?;
    let producer = tokio::spawn(submit_all(
        client.clone(),
        queue.clone(),
        payload,
        n,
        args.priorities,
    ));
    worker.finished("conveyor throughput").await?;
    let result = throughput(n, start);
    producer.await??;
    worker.stop().await?;
    conveyor_teardown(&client, &queue).await;
    Ok(result)
}

/// Producer and consumer of each side measured apart: publishing into an empty stream, and
/// consuming a stream that already holds every job.
#[derive(Debug, Clone, Copy, Serialize)]
struct Breakdown {
    raw_publish: Throughput,
    conveyor_submit: Throughput,
    raw_consume: Throughput,
    conveyor_consume: Throughput,
}

async fn breakdown(url: &str, args: &BenchArgs, round: usize) -> anyhow::Result<Breakdown> {
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let n = args.jobs as u64;

    let name = format!("bench_raw_pub_{round}_{}", std::process::id());
    let (js, consumer, subject) = raw_setup(url, &name).await?;
    let start = Instant::now();
    publish_all(js.clone(), subject, payload.clone(), n, PUBLISH_WINDOW).await?;
    let raw_publish = throughput(n, start);
    let start = Instant::now();
    consume_raw(&consumer, args.concurrency, n, |_| {}).await?;
    let raw_consume = throughput(n, start);
    raw_teardown(&js, &name).await;

    let name = format!("pub-{round}-{}", std::process::id());
    let (client, worker, queue) = conveyor_setup(url, &name, args).await?;
    let start = Instant::now();
    submit_all(client.clone(), queue.clone(), payload, n, args.priorities).await?;
    let conveyor_submit = throughput(n, start);
    let start = Instant::now();
    let worker = NoopWorker::start(worker, args.concurrency, n, |_| {})?;
    worker.finished("conveyor consume").await?;
    let conveyor_consume = throughput(n, start);
    worker.stop().await?;
    conveyor_teardown(&client, &queue).await;

    Ok(Breakdown {
        raw_publish,
        conveyor_submit,
        raw_consume,
        conveyor_consume,
    })
}

/// The payload of a latency job: nanoseconds since `base` when it was sent, then padding.
fn stamped(base: Instant, size: usize) -> Bytes {
    let mut v = (base.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
    v.resize(size.max(8), b'x');
    Bytes::from(v)
}

fn latency_of(base: Instant, payload: &[u8]) -> Duration {
    let sent = u64::from_le_bytes(payload[..8].try_into().expect("payload has a stamp"));
    base.elapsed().saturating_sub(Duration::from_nanos(sent))
}

/// Sends `total` stamped payloads at `rate` per second through `send`, keeping acks in flight.
async fn paced<F, Fut>(
    rate: u32,
    total: u64,
    base: Instant,
    size: usize,
    send: F,
) -> anyhow::Result<()>
where
    F: Fn(Bytes) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut pending = futures::stream::FuturesUnordered::new();
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tokio::select! {
            _ = tick.tick() => {
                let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as u64).min(total);
                while sent < due {
                    pending.push(send(stamped(base, size)));
                    sent += 1;
                }
            }
            Some(result) = pending.next(), if !pending.is_empty() => result?,
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    Ok(())
}

fn summarize(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    Latency {
        p50_ms: percentile(&samples, 50.0),
        p99_ms: percentile(&samples, 99.0),
        samples: samples.len(),
    }
}

async fn raw_latency(url: &str, args: &BenchArgs, round: usize) -> anyhow::Result<Latency> {
    let name = format!("bench_raw_lat_{round}_{}", std::process::id());
    let (js, consumer, subject) = raw_setup(url, &name).await?;
    let total = u64::from(args.rate) * args.latency_seconds;
    let base = Instant::now();
    let producer = {
        let js = js.clone();
        let (rate, size) = (args.rate, args.payload);
        tokio::spawn(async move {
            paced(rate, total, base, size, |payload| {
                let js = js.clone();
                let subject = subject.clone();
                async move {
                    js.publish(subject, payload).await?.await?;
                    Ok(())
                }
            })
            .await
        })
    };
    let mut samples = Vec::with_capacity(total as usize);
    consume_raw(&consumer, args.concurrency, total, |payload| {
        samples.push(latency_of(base, payload));
    })
    .await?;
    producer.await??;
    raw_teardown(&js, &name).await;
    Ok(summarize(samples))
}

async fn conveyor_latency(url: &str, args: &BenchArgs, round: usize) -> anyhow::Result<Latency> {
    let name = format!("lat-{round}-{}", std::process::id());
    let (client, worker, queue) = conveyor_setup(url, &name, args).await?;
    let total = u64::from(args.rate) * args.latency_seconds;
    let base = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let worker = {
        let samples = samples.clone();
        NoopWorker::start(worker, args.concurrency, total, move |job| {
            let latency = latency_of(base, &job.payload);
            samples.lock().expect("samples lock").push(latency);
        })?
    };
    let producer = {
        let client = client.clone();
        let queue = queue.clone();
        let (rate, size, priorities) = (args.rate, args.payload, args.priorities);
        let next_id = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            paced(rate, total, base, size, |payload| {
                let client = client.clone();
                let queue = queue.clone();
                let i = next_id.fetch_add(1, Ordering::Relaxed);
                let job = bench_job(format!("l{i}"), payload, i, priorities);
                async move {
                    client.submit(&queue, job).await?;
                    Ok(())
                }
            })
            .await
        })
    };
    worker.finished("conveyor latency").await?;
    producer.await??;
    worker.stop().await?;
    conveyor_teardown(&client, &queue).await;
    let samples = std::mem::take(&mut *samples.lock().expect("samples lock"));
    Ok(summarize(samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), 50.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
        assert_eq!(percentile(&samples[..1], 99.0), 1.0);
    }

    #[test]
    fn stamps_round_trip() {
        let base = Instant::now();
        let payload = stamped(base, 256);
        assert_eq!(payload.len(), 256);
        assert!(latency_of(base, &payload) < Duration::from_secs(5));
    }
}
