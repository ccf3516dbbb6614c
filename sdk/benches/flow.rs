//! Jobs that wait for jobs (issue #11), in one run against one real nats-server: what a parent
//! with `FLOW_JOBS` children and a continuation costs next to the same number of plain jobs, the
//! per-step release latency of a chain of `FLOW_CHAIN` dependent jobs, and the memory of NATS and
//! of this process (which hosts the releasers, as the operator's dispatcher does) meanwhile.
//!
//! Everything runs in-process as in `sdk/tests/flow.rs`: queues made by `admin::ensure_queue`,
//! one `flow::Releaser` per queue (default settings, as the dispatcher runs it), SDK workers with
//! a no-op handler and default options (outcomes stored) on their own connections.
//!
//! 1. chain: `FLOW_CHAIN` jobs, each waiting for the one before, all submitted up front (the
//!    first last, so every other one is already waiting); per-step latency is the time from a
//!    job's handler returning to the next one's handler starting (ack, outcome stored, release
//!    by the releaser, delivery). First, on a server that is not busy yet.
//! 2. plain: `FLOW_JOBS` no-op jobs submitted with `Client::submit_batch` (256 publishes in
//!    flight, like `conveyor bench`) while the workers run; time to the last handler's return.
//! 3. fan-out: one parent whose handler spawns `FLOW_JOBS` children (`spawn_batch`, batches of
//!    `FLOW_BATCH`) and returns a continuation; time from the parent's submit to the
//!    continuation's return; the continuation pages through every child's record and must see
//!    all of them, and must run once. Also printed, from the parent's submit: the parent's
//!    handler done spawning, the last child's handler done, the continuation started.
//! 4. memory: peak RSS of nats-server and of this process, sampled every 50 ms during 2 and 3.
//!
//! `cargo bench -p conveyor --bench flow` (`make bench`). Scale with `FLOW_JOBS` (100000),
//! `FLOW_CHAIN` (1000), `FLOW_CONCURRENCY` (64), `FLOW_BATCH` (1000).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::flow::{Dependency, JobRef, Releaser};
use conveyor::names::QueueRef;
use conveyor::protocol::Outcome as Recorded;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, Worker};
use conveyor_testkit::NatsServer;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const NS: &str = "bench";
/// Longest one measurement may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(1800);
/// How often memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("a tokio runtime")?;
    runtime.block_on(run())
}

/// Stops everything it started when dropped.
struct Stop(CancellationToken);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Counts finished handlers and wakes the bench when the last expected one returned.
struct Done {
    count: AtomicU64,
    expected: u64,
    at: Mutex<Option<Instant>>,
    notify: Notify,
}

impl Done {
    fn new(expected: u64) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicU64::new(0),
            expected,
            at: Mutex::new(None),
            notify: Notify::new(),
        })
    }

    fn one(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
            *self.at.lock().expect("lock") = Some(Instant::now());
            self.notify.notify_one();
        }
    }

    async fn finished(&self, what: &str) -> anyhow::Result<Instant> {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                if let Some(at) = *self.at.lock().expect("lock") {
                    return at;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(DEADLINE, wait).await {
            Ok(at) => Ok(at),
            Err(_) => bail!(
                "{what}: {} of {} done after {DEADLINE:?}",
                self.count.load(Ordering::SeqCst),
                self.expected
            ),
        }
    }
}

fn worker<F, Fut>(
    client: &Client,
    queue: &QueueRef,
    concurrency: usize,
    stop: &CancellationToken,
    handler: F,
) where
    F: Fn(ReceivedJob) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let options = WorkerOptions {
        concurrency,
        poll_wait: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(2),
        pod_name: "bench".into(),
        ..Default::default()
    };
    let runner = Worker::new(client.jetstream().clone(), queue.clone())
        .options(options)
        .handler(handler);
    let stop = stop.clone();
    tokio::spawn(async move {
        if let Err(error) = runner.run(async move { stop.cancelled().await }).await {
            eprintln!("worker: {error}");
        }
    });
}

/// Runs the releaser of each queue until `stop`, restarting it after errors (as the dispatcher).
fn releasers(client: &Client, queues: &[QueueRef], stop: &CancellationToken) {
    for queue in queues {
        let releaser = Releaser::new(client.jetstream().clone());
        let (queue, stop) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(error) = releaser.serve(&queue, &stop).await {
                    eprintln!("releaser of {}: {error}", queue.stream());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
}

/// Resident set of process `pid` (`"self"` for this one), in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pid of the nats-server whose command line names the directory of `nats`'s store.
fn nats_pid(nats: &NatsServer) -> anyhow::Result<String> {
    let store = nats.store_dir();
    let dir = store
        .parent()
        .context("the store directory has a parent")?
        .to_string_lossy()
        .into_owned();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("nats-server") && cmdline.contains(&dir) {
            return Ok(name);
        }
    }
    bail!("no nats-server process with {dir} on its command line")
}

/// Peak RSS (KiB) of nats-server and of this process, sampled until stopped.
struct Sampler {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Sampler {
    fn start(nats_pid: String) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let task = tokio::spawn(async move {
            let (mut nats, mut me) = (0, 0);
            loop {
                nats = nats.max(rss_kib(&nats_pid).unwrap_or(0));
                me = me.max(rss_kib("self").unwrap_or(0));
                if !flag.load(Ordering::SeqCst) {
                    return (nats, me);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        });
        Self { running, task }
    }

    async fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.running.store(false, Ordering::SeqCst);
        Ok(self.task.await?)
    }
}

struct Memory {
    nats_before: u64,
    me_before: u64,
    nats_peak: u64,
    me_peak: u64,
}

async fn queues(client: &Client, names: &[&str]) -> anyhow::Result<Vec<QueueRef>> {
    let mut made = Vec::new();
    for name in names {
        let queue = QueueRef::new(NS, *name);
        ensure_queue(client.jetstream(), &queue, &QueueSettings::default()).await?;
        made.push(queue);
    }
    Ok(made)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run() -> anyhow::Result<()> {
    let jobs = env_usize("FLOW_JOBS", 100_000) as u64;
    let chain = env_usize("FLOW_CHAIN", 1000);
    let concurrency = env_usize("FLOW_CONCURRENCY", 64);
    let batch = env_usize("FLOW_BATCH", 1000).max(1) as u64;
    ensure!(jobs > 0 && chain > 1, "FLOW_JOBS > 0 and FLOW_CHAIN > 1");

    let nats = NatsServer::start().await?;
    let pid = nats_pid(&nats)?;
    // The producer, the workers and the releasers (the operator) on their own connections.
    let producer = Client::connect(&nats.url()).await?;
    let workers = Client::connect(&nats.url()).await?;
    let operator = Client::connect(&nats.url()).await?;
    let made = queues(&producer, &["plain", "parents", "kids", "chain"]).await?;
    let (plain, parents, kids, steps) = (&made[0], &made[1], &made[2], &made[3]);
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&operator, &made, &stop);
    // The releasers' consumers exist before anything is submitted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "flow bench: {jobs} jobs, chain of {chain}, concurrency {concurrency}, spawn batches of {batch}, nats-server pid {pid}"
    );

    // 1. Chain, first: on a server not yet busy with the aftermath of the fan-out's 300,000
    // writes (measured after it, the steps were a third slower and varied twice as much).
    let starts = Arc::new(Mutex::new(vec![None::<Instant>; chain]));
    let ends = Arc::new(Mutex::new(vec![None::<Instant>; chain]));
    let chained = Done::new(chain as u64);
    {
        let (starts, ends, chained) = (starts.clone(), ends.clone(), chained.clone());
        worker(
            &workers,
            steps,
            concurrency,
            &stop,
            move |job: ReceivedJob| {
                let started = Instant::now();
                let (starts, ends, chained) = (starts.clone(), ends.clone(), chained.clone());
                async move {
                    let index: Option<usize> =
                        job.id.strip_prefix('s').and_then(|i| i.parse().ok());
                    if let Some(i) = index.filter(|i| *i < starts.lock().expect("lock").len()) {
                        starts.lock().expect("lock")[i].get_or_insert(started);
                        ends.lock().expect("lock")[i].get_or_insert_with(Instant::now);
                        chained.one();
                    }
                    Outcome::Done(Bytes::new())
                }
            },
        );
    }
    let on = |i: usize| Dependency::on(JobRef::new(NS, "chain", format!("s{i}")));
    let waiting = producer
        .submit_batch(
            steps,
            (1..chain).map(|i| Job::new(format!("s{i}"), Bytes::new()).after(on(i - 1))),
        )
        .await;
    let failed = waiting.iter().filter(|r| r.is_err()).count();
    ensure!(failed == 0, "{failed} chain submissions failed");
    let chain_start = Instant::now();
    producer.submit(steps, Job::new("s0", Bytes::new())).await?;
    let chain_end = chained.finished("chain").await?;
    let (starts, ends) = (
        starts.lock().expect("lock").clone(),
        ends.lock().expect("lock").clone(),
    );
    let mut latencies: Vec<f64> = (1..chain)
        .filter_map(|i| Some(starts[i]?.saturating_duration_since(ends[i - 1]?)))
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    // 2. Plain.
    let plain_done = Done::new(jobs);
    let counted = plain_done.clone();
    worker(&workers, plain, concurrency, &stop, move |_job| {
        let counted = counted.clone();
        async move {
            counted.one();
            Outcome::Done(Bytes::new())
        }
    });
    let plain_memory = {
        let (nats_before, me_before) = (rss_kib(&pid).unwrap_or(0), rss_kib("self").unwrap_or(0));
        let sampler = Sampler::start(pid.clone());
        let start = Instant::now();
        let submitting = {
            let (producer, plain) = (producer.clone(), plain.clone());
            tokio::spawn(async move {
                let mut failed = 0usize;
                let mut next = 0u64;
                while next < jobs {
                    let end = (next + 10_000).min(jobs);
                    let batch = (next..end).map(|i| Job::new(format!("p{i}"), Bytes::new()));
                    failed += producer
                        .submit_batch(&plain, batch)
                        .await
                        .iter()
                        .filter(|r| r.is_err())
                        .count();
                    next = end;
                }
                failed
            })
        };
        let at = plain_done.finished("plain").await?;
        let failed = submitting.await?;
        ensure!(failed == 0, "{failed} plain submissions failed");
        let (nats_peak, me_peak) = sampler.stop().await?;
        (
            at - start,
            Memory {
                nats_before,
                me_before,
                nats_peak,
                me_peak,
            },
        )
    };
    let (plain_time, plain_memory) = plain_memory;
    eprintln!(
        "plain: {jobs} jobs in {:.2} s ({:.0} jobs/s)",
        plain_time.as_secs_f64(),
        jobs as f64 / plain_time.as_secs_f64()
    );

    // 3. Fan-out.
    let continued = Done::new(1);
    let continuations = Arc::new(AtomicU64::new(0));
    let seen_children = Arc::new(AtomicU64::new(0));
    // Where the fan-out's time goes: the parent's handler done spawning, the last child's
    // handler done, the continuation's handler started.
    let spawned_at = Arc::new(Mutex::new(None::<Instant>));
    let continuation_at = Arc::new(Mutex::new(None::<Instant>));
    let children_done = Done::new(jobs);
    {
        let (kids, continued, continuations, seen_children) = (
            kids.clone(),
            continued.clone(),
            continuations.clone(),
            seen_children.clone(),
        );
        let (spawned_at, continuation_at) = (spawned_at.clone(), continuation_at.clone());
        worker(&workers, parents, 4, &stop, move |job: ReceivedJob| {
            let (kids, continued, continuations, seen_children) = (
                kids.clone(),
                continued.clone(),
                continuations.clone(),
                seen_children.clone(),
            );
            let (spawned_at, continuation_at) = (spawned_at.clone(), continuation_at.clone());
            async move {
                if job.flow.children_expected().is_some() {
                    continuation_at
                        .lock()
                        .expect("lock")
                        .get_or_insert_with(Instant::now);
                    continuations.fetch_add(1, Ordering::SeqCst);
                    let (mut seen, mut after) = (0u64, 0u64);
                    loop {
                        let page = match job.flow.children_page(after, 1000).await {
                            Ok(page) => page,
                            Err(error) => return Outcome::Failed(error.to_string()),
                        };
                        let Some(last) = page.last() else { break };
                        after = last.sequence;
                        seen += page
                            .iter()
                            .filter(|c| c.outcome == Recorded::Completed)
                            .count() as u64;
                    }
                    seen_children.store(seen, Ordering::SeqCst);
                    continued.one();
                    return Outcome::Done(seen.to_string().into());
                }
                let mut next = 0u64;
                while next < jobs {
                    let end = (next + batch).min(jobs);
                    let children =
                        (next..end).map(|i| Job::new(format!("{}.c{i}", job.id), Bytes::new()));
                    for result in job.flow.spawn_batch(&kids, children).await {
                        if let Err(error) = result {
                            return Outcome::Failed(error.to_string());
                        }
                    }
                    next = end;
                }
                spawned_at
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(Instant::now);
                Outcome::Continue(Box::new(Job::new(format!("{}.k", job.id), Bytes::new())))
            }
        });
    }
    let counted = children_done.clone();
    worker(&workers, kids, concurrency, &stop, move |_job| {
        let counted = counted.clone();
        async move {
            counted.one();
            Outcome::Done(Bytes::new())
        }
    });
    let (nats_before, me_before) = (rss_kib(&pid).unwrap_or(0), rss_kib("self").unwrap_or(0));
    let sampler = Sampler::start(pid.clone());
    let start = Instant::now();
    producer
        .submit(parents, Job::new("fan", Bytes::new()))
        .await?;
    let at = continued.finished("fan-out").await?;
    let fan_time = at - start;
    let (nats_peak, me_peak) = sampler.stop().await?;
    let fan_memory = Memory {
        nats_before,
        me_before,
        nats_peak,
        me_peak,
    };
    // A second continuation would show up a little later, if at all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = continuations.load(Ordering::SeqCst);
    let seen = seen_children.load(Ordering::SeqCst);
    eprintln!(
        "fan-out: parent + {jobs} children + continuation in {:.2} s; continuation ran {runs}x, saw {seen} results",
        fan_time.as_secs_f64()
    );
    let since = |at: Option<Instant>| at.map_or(f64::NAN, |at| (at - start).as_secs_f64());
    let phases = (
        since(*spawned_at.lock().expect("lock")),
        since(*children_done.at.lock().expect("lock")),
        since(*continuation_at.lock().expect("lock")),
    );

    stop.cancel();

    // The report.
    let ratio = fan_time.as_secs_f64() / plain_time.as_secs_f64();
    println!();
    println!("| measurement | figure | target |");
    println!("|---|---|---|");
    println!(
        "| plain: {jobs} no-op jobs, submit to last done | {:.2} s ({:.0} jobs/s) | |",
        plain_time.as_secs_f64(),
        jobs as f64 / plain_time.as_secs_f64()
    );
    println!(
        "| fan-out: parent + {jobs} children + continuation, submit to continuation done | {:.2} s ({:.0} children/s) | |",
        fan_time.as_secs_f64(),
        jobs as f64 / fan_time.as_secs_f64()
    );
    println!(
        "| fan-out / plain | {ratio:.2}x | <= 1.5x {} |",
        if ratio <= 1.5 { "(met)" } else { "(missed)" }
    );
    println!(
        "| fan-out phases from the parent's submit: spawning done / last child done / continuation started / done | {:.2} / {:.2} / {:.2} / {:.2} s | |",
        phases.0,
        phases.1,
        phases.2,
        fan_time.as_secs_f64()
    );
    println!("| continuation runs, results it saw | {runs}, {seen} | 1, {jobs} |");
    println!(
        "| chain of {chain}: per-step latency p50 / p99 / max | {p50:.2} / {p99:.2} / {max:.2} ms ({} steps, {:.2} s in all) | p99 <= 5 ms {} |",
        latencies.len(),
        (chain_end - chain_start).as_secs_f64(),
        if p99 <= 5.0 { "(met)" } else { "(missed)" }
    );
    for (what, memory) in [("plain", &plain_memory), ("fan-out", &fan_memory)] {
        println!(
            "| {what}: peak RSS of nats-server (before) | {:.0} MiB ({:.0} MiB) | |",
            mib(memory.nats_peak),
            mib(memory.nats_before)
        );
        println!(
            "| {what}: peak RSS of bench process: releasers, workers, producer (before) | {:.0} MiB ({:.0} MiB) | |",
            mib(memory.me_peak),
            mib(memory.me_before)
        );
    }
    ensure!(runs == 1, "the continuation ran {runs} times");
    ensure!(
        seen == jobs,
        "the continuation saw {seen} of {jobs} children"
    );
    Ok(())
}
