//! The fairness rule under a flood (docs/workflows.md, "The fairness rule"), against a real
//! nats-server. Runs of `first → middle → last` where `first` and `last` share one fixed pool
//! are started at twice that pool's capacity. With the rule (the pool's queue has two levels,
//! so `last`, wave 2, goes a level up) a started run finishes soon after its first step,
//! however long the flood; without it (one level: FIFO) the last steps wait behind the new
//! runs' first steps and the time from a run's first step to its end grows with the flood. The
//! test runs both and compares them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::flow::Releaser;
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::workflow::Definition;
use conveyor::workflow::engine::{Engine, RunState, start};
use conveyor::{Client, Worker};
use conveyor_testkit::{NatsServer, wait_for};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NS: &str = "test";
/// Runs started in one flood.
const RUNS: usize = 60;
/// Jobs the shared pool runs at once, and how long each takes: capacity 5 jobs/s. Kept well
/// below what the engine and the releaser move in a debug build on a busy machine (about 10
/// three-step runs/s measured), so that the pool is the bottleneck the rule is about.
const POOL: usize = 1;
const WORK: Duration = Duration::from_millis(200);
/// Each run needs two jobs of the shared pool: starting 5 runs/s asks for 10 jobs/s, twice
/// its capacity.
const START_EVERY: Duration = Duration::from_millis(200);

struct Stop(CancellationToken);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// When each run's first step finished and its last step finished.
type Times = Arc<Mutex<HashMap<String, (Option<Instant>, Option<Instant>)>>>;

fn options(concurrency: usize, priorities: u8) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        priorities,
        poll_wait: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(2),
        pod_name: "test-pod".into(),
        ..Default::default()
    }
}

/// A step: works for [`WORK`] (the simulated job), notes when `first` or `last` ended.
async fn step(job: ReceivedJob, times: Times) -> Outcome {
    tokio::time::sleep(WORK).await;
    let payload: Value = serde_json::from_slice(&job.payload).unwrap_or(Value::Null);
    let run = payload["run"].as_str().unwrap_or_default().to_owned();
    let now = Instant::now();
    let mut times = times.lock().unwrap();
    let entry = times.entry(run).or_default();
    match payload["step"].as_str() {
        Some("first") => entry.0 = Some(now),
        Some("last") => entry.1 = Some(now),
        _ => {}
    }
    Outcome::Done("{}".into())
}

/// What one flood showed: for each run in start order, the time from its first step's end to
/// its last step's end; and how many of the first tenth of the runs had ended when the last run
/// was started.
struct Flood {
    started_to_end: Vec<Duration>,
    early_done_in_flood: usize,
}

/// One flood with the shared pool's queue at `levels`.
async fn flood(levels: u8) -> anyhow::Result<Flood> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    let times: Times = Arc::default();
    let runs = QueueRef::new(NS, "runs");
    let queues = [
        (runs.clone(), 2),
        (QueueRef::new(NS, "shared"), levels),
        (QueueRef::new(NS, "middle"), 1),
    ];
    for (queue, levels) in &queues {
        let settings = QueueSettings {
            priorities: *levels,
            max_jobs: None,
            ..QueueSettings::default()
        };
        ensure_queue(client.jetstream(), queue, &settings).await?;
        let releaser =
            Releaser::new(client.jetstream().clone()).scan_interval(Duration::from_millis(200));
        let (queue, halt) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            while !halt.is_cancelled() {
                if releaser.serve(&queue, &halt).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    let engine = Arc::new(Engine::new(client.jetstream().clone()));
    let runner = Worker::new(client.jetstream().clone(), runs.clone())
        .options(options(32, 2))
        .handler(move |job: ReceivedJob| {
            let engine = engine.clone();
            async move { engine.handle(job).await }
        });
    let halt = stop.clone();
    tokio::spawn(async move { runner.run(async move { halt.cancelled().await }).await });
    for (queue, levels, concurrency) in [(&queues[1].0, levels, POOL), (&queues[2].0, 1, 64)] {
        let own = times.clone();
        let runner = Worker::new(client.jetstream().clone(), queue.clone())
            .options(options(concurrency, levels))
            .handler(move |job| step(job, own.clone()));
        let halt = stop.clone();
        tokio::spawn(async move { runner.run(async move { halt.cancelled().await }).await });
    }
    let definition: Definition = serde_json::from_value(json!({"steps": [
        {"name": "first", "queue": "shared"},
        {"name": "middle", "queue": "middle", "dependsOn": ["first"]},
        {"name": "last", "queue": "shared", "dependsOn": ["middle"]}
    ]}))?;
    let mut pace = tokio::time::interval(START_EVERY);
    let mut ids = Vec::new();
    for i in 0..RUNS {
        pace.tick().await;
        let state = RunState::new(
            NS,
            "flood",
            &format!("r{i:04}"),
            definition.clone(),
            json!({}),
        );
        start(&client, &runs, &state).await?;
        ids.push(state.run);
    }
    let flood_ended = Instant::now();
    wait_for(
        Duration::from_secs(120),
        "every run's last step",
        || async {
            times
                .lock()
                .unwrap()
                .values()
                .filter(|t| t.1.is_some())
                .count()
                == RUNS
        },
    )
    .await?;
    let times = times.lock().unwrap();
    let ended = |id: &String| match times.get(id) {
        Some((Some(first), Some(last))) => (*first, *last),
        other => panic!("run {id}: {other:?}"),
    };
    Ok(Flood {
        started_to_end: ids
            .iter()
            .map(|id| {
                let (first, last) = ended(id);
                last.saturating_duration_since(first)
            })
            .collect(),
        early_done_in_flood: ids[..RUNS / 10]
            .iter()
            .filter(|id| ended(id).1 < flood_ended)
            .count(),
    })
}

fn percentile(values: &[Duration], p: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_runs_finish_ahead_of_a_flood_of_new_ones() -> anyhow::Result<()> {
    let Flood {
        started_to_end: fair,
        early_done_in_flood,
    } = flood(2).await?;
    let fifo = flood(1).await?.started_to_end;
    let (fair_p90, fifo_p90) = (percentile(&fair, 0.9), percentile(&fifo, 0.9));
    eprintln!(
        "first step to end of run, {RUNS} runs at twice the pool's capacity: with the rule p50 {:?} p90 {:?} max {:?}; FIFO p50 {:?} p90 {:?} max {:?}",
        percentile(&fair, 0.5),
        fair_p90,
        percentile(&fair, 1.0),
        percentile(&fifo, 0.5),
        fifo_p90,
        percentile(&fifo, 1.0)
    );
    assert_eq!(
        early_done_in_flood,
        RUNS / 10,
        "with the rule the first runs all end before the flood does"
    );
    assert!(
        fair_p90 * 3 < fifo_p90,
        "the rule should keep started runs well ahead of FIFO: p90 {fair_p90:?} vs {fifo_p90:?}"
    );
    Ok(())
}
