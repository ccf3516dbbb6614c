//! Workflow runs against a real nats-server: the engine serves a run queue as the operator
//! does, step workers serve their queues, the releaser runs as the dispatcher runs it. The
//! seeds' case: two fetches in parallel (Twitter skipped by `when` when not linked), an
//! aggregate of both, a notification when a step fails; plus `forEach` and the fairness rule.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::flow::Releaser;
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::workflow::Definition;
use conveyor::workflow::engine::{Engine, RunState, start};
use conveyor::{Client, JobResult, Worker};
use conveyor_testkit::{NatsServer, wait_for_some};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const NS: &str = "test";

/// Stops everything it started when dropped.
struct Stop(CancellationToken);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What step handlers saw: (step job id, priority level, payload).
type Seen = Arc<Mutex<Vec<(String, u8, Value)>>>;

struct Env {
    client: Client,
    runs: QueueRef,
    seen: Seen,
    /// The run queue's worker (the engine), as the operator's leader runs it.
    engine: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    _stop: Stop,
    _nats: NatsServer,
}

/// Serves the run queue with the engine until `stop`.
fn spawn_engine(
    client: &Client,
    runs: &QueueRef,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let engine = Arc::new(Engine::new(client.jetstream().clone()));
    let runner = Worker::new(client.jetstream().clone(), runs.clone())
        .options(options(2))
        .handler(move |job: ReceivedJob| {
            let engine = engine.clone();
            async move { engine.handle(job).await }
        });
    let halt = stop.clone();
    tokio::spawn(async move {
        let _ = runner.run(async move { halt.cancelled().await }).await;
    })
}

fn options(priorities: u8) -> WorkerOptions {
    WorkerOptions {
        concurrency: 4,
        priorities,
        poll_wait: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(2),
        pod_name: "test-pod".into(),
        ..Default::default()
    }
}

/// A step handler: records what it got, then `{"step", "n"}` where `n` is the input's figure
/// for the network the step fetches (`fail` in the input fails the step for good); the aggregate sums its
/// dependencies' `n`.
async fn step(job: ReceivedJob, seen: Seen) -> Outcome {
    let payload: Value = serde_json::from_slice(&job.payload).unwrap_or(Value::Null);
    seen.lock()
        .unwrap()
        .push((job.id.clone(), job.priority, payload.clone()));
    let step = payload["step"].as_str().unwrap_or_default().to_owned();
    if payload["input"]["fail"] == json!(step) {
        return Outcome::Permanent("the OAuth token expired".into());
    }
    match step.as_str() {
        "aggregate" => {
            let total: i64 = payload["steps"]
                .as_object()
                .map(|steps| {
                    steps
                        .values()
                        .filter_map(|s| s["result"]["n"].as_i64())
                        .sum()
                })
                .unwrap_or_default();
            Outcome::Done(json!({"total": total}).to_string().into())
        }
        "each" => Outcome::Done(
            json!(payload["item"].as_i64().unwrap_or(0) * 10)
                .to_string()
                .into(),
        ),
        "onFailure" => Outcome::Done("notified".into()),
        "sum" => {
            let below: i64 = payload["steps"]["children"]["result"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_i64).sum())
                .unwrap_or_default();
            let own = payload["input"]["value"].as_i64().unwrap_or(0);
            Outcome::Done(json!(own + below).to_string().into())
        }
        _ => {
            let network = step.trim_start_matches("fetch-");
            let n = payload["input"][network].as_i64().unwrap_or(0);
            Outcome::Done(json!({"step": step, "n": n}).to_string().into())
        }
    }
}

async fn env(step_queues: &[(&str, u8)]) -> anyhow::Result<Env> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let stop = CancellationToken::new();
    let seen: Seen = Arc::default();
    let runs = QueueRef::new(NS, "conveyor-runs");
    let mut all = vec![(runs.clone(), 2)];
    all.extend(step_queues.iter().map(|(q, l)| (QueueRef::new(NS, *q), *l)));
    for (queue, levels) in &all {
        let mut settings = QueueSettings {
            priorities: *levels,
            ..QueueSettings::default()
        };
        if queue == &runs {
            // A wave whose engine died comes back after this (the kill test).
            settings.timeout = Duration::from_secs(2);
        }
        ensure_queue(client.jetstream(), queue, &settings).await?;
        let releaser =
            Releaser::new(client.jetstream().clone()).scan_interval(Duration::from_millis(200));
        let (queue, halt) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            while !halt.is_cancelled() {
                if let Err(error) = releaser.serve(&queue, &halt).await {
                    eprintln!("releaser of {}: {error}", queue.stream());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    let engine = spawn_engine(&client, &runs, &stop);
    for (queue, levels) in &all[1..] {
        let own = seen.clone();
        let runner = Worker::new(client.jetstream().clone(), queue.clone())
            .options(options(*levels))
            .handler(move |job| step(job, own.clone()));
        let halt = stop.clone();
        tokio::spawn(async move { runner.run(async move { halt.cancelled().await }).await });
    }
    Ok(Env {
        client,
        runs,
        seen,
        engine,
        stop: stop.clone(),
        _stop: Stop(stop),
        _nats: nats,
    })
}

/// The seeds' workflow, as a `Workflow`'s spec.
/// The step queues of [`seeds`]: `aggregate` has two levels, so its wave rule applies.
async fn seeds_env() -> anyhow::Result<Env> {
    env(&[
        ("twitter", 1),
        ("facebook", 1),
        ("aggregate", 2),
        ("notify", 1),
    ])
    .await
}

fn seeds() -> Definition {
    serde_json::from_value(json!({
        "steps": [
            {"name": "fetch-twitter", "queue": "twitter", "when": "has(input.twitter)"},
            {"name": "fetch-facebook", "queue": "facebook"},
            {"name": "aggregate", "queue": "aggregate",
             "dependsOn": ["fetch-twitter", "fetch-facebook"]}
        ],
        "onFailure": {"queue": "notify"}
    }))
    .expect("the seeds' spec")
}

async fn run(
    env: &Env,
    id: &str,
    definition: Definition,
    input: Value,
) -> anyhow::Result<JobResult> {
    let state = RunState::new(NS, "social", id, definition, input);
    let ack = start(&env.client, &env.runs, &state).await?;
    assert!(!ack.duplicate, "a new run");
    let run = state.run.clone();
    let result = wait_for_some(WAIT, &format!("the outcome of run {run}"), || async {
        env.client.result(&env.runs, &run).await.ok().flatten()
    })
    .await?;
    Ok(result)
}

fn completed(result: &JobResult) -> Value {
    match result {
        JobResult::Completed { result, .. } => serde_json::from_slice(result).expect("JSON"),
        other => panic!("expected a completed run, got {other:?}"),
    }
}

fn ran(seen: &Seen, run: &str) -> Vec<String> {
    let mut ids: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _, _)| id.starts_with(&format!("social.{run}.")))
        .map(|(id, _, _)| id.clone())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn the_seeds_workflow_fetches_in_parallel_skips_unlinked_aggregates_and_notifies()
-> anyhow::Result<()> {
    let env = seeds_env().await?;

    // Both networks linked: both fetched, aggregated.
    let result = run(&env, "r1", seeds(), json!({"twitter": 3, "facebook": 4})).await?;
    assert_eq!(completed(&result), json!({"total": 7}));
    assert_eq!(
        ran(&env.seen, "r1"),
        [
            "social.r1.aggregate",
            "social.r1.fetch-facebook",
            "social.r1.fetch-twitter"
        ]
    );
    // The fairness rule: the aggregate (wave 1) went a level up on its two-level queue.
    let levels: Vec<(String, u8)> = env
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _, _)| id.starts_with("social.r1."))
        .map(|(id, level, _)| (id.clone(), *level))
        .collect();
    assert!(
        levels.contains(&("social.r1.aggregate".into(), 1)),
        "{levels:?}"
    );
    assert!(
        levels.contains(&("social.r1.fetch-facebook".into(), 0)),
        "{levels:?}"
    );

    // Twitter not linked: skipped by `when`, never submitted; the aggregate runs without it
    // and sees it as skipped.
    let result = run(&env, "r2", seeds(), json!({"facebook": 5})).await?;
    assert_eq!(completed(&result), json!({"total": 5}));
    assert_eq!(
        ran(&env.seen, "r2"),
        ["social.r2.aggregate", "social.r2.fetch-facebook"]
    );
    let aggregate = env
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _, _)| id == "social.r2.aggregate")
        .map(|(_, _, payload)| payload.clone())
        .expect("the aggregate ran");
    assert_eq!(aggregate["steps"]["fetch-twitter"]["outcome"], "skipped");
    assert_eq!(
        aggregate["steps"]["fetch-facebook"]["result"],
        json!({"step": "fetch-facebook", "n": 5})
    );

    // Starting the same run again is the same run.
    let again = RunState::new(NS, "social", "r2", seeds(), json!({"facebook": 5}));
    assert!(start(&env.client, &env.runs, &again).await?.duplicate);

    // The Facebook token expired: the step dead-letters, onFailure runs with its name and
    // error, the aggregate never runs, the run ends failed naming the step.
    let result = run(
        &env,
        "r3",
        seeds(),
        json!({"twitter": 1, "facebook": 1, "fail": "fetch-facebook"}),
    )
    .await?;
    match &result {
        JobResult::DeadLettered { reason, error, .. } => {
            assert_eq!(reason, "permanent");
            assert_eq!(
                error,
                "step fetch-facebook failed: permanent: the OAuth token expired"
            );
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    assert_eq!(
        ran(&env.seen, "r3"),
        [
            "social.r3.fetch-facebook",
            "social.r3.fetch-twitter",
            "social.r3.onFailure"
        ]
    );
    let notified = env
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _, _)| id == "social.r3.onFailure")
        .map(|(_, _, payload)| payload.clone())
        .expect("onFailure ran");
    assert_eq!(notified["failed"]["step"], "fetch-facebook");
    assert_eq!(
        notified["failed"]["error"],
        "permanent: the OAuth token expired"
    );
    Ok(())
}

#[tokio::test]
async fn for_each_fans_out_and_bad_expressions_or_a_missing_queue_fail_the_run()
-> anyhow::Result<()> {
    let env = env(&[("each", 1), ("aggregate", 1), ("notify", 1)]).await?;
    let definition: Definition = serde_json::from_value(json!({
        "steps": [
            {"name": "each", "queue": "each", "forEach": "input.xs"},
        ]
    }))?;
    let result = run(&env, "e1", definition.clone(), json!({"xs": [1, 2, 3]})).await?;
    assert_eq!(completed(&result), json!([10, 20, 30]));
    assert_eq!(
        ran(&env.seen, "e1"),
        ["social.e1.each.0", "social.e1.each.1", "social.e1.each.2"]
    );

    let result = run(&env, "e2", definition, json!({"xs": "not a list"})).await?;
    match &result {
        JobResult::DeadLettered { error, .. } => {
            assert_eq!(
                error,
                "step each failed: forEach: yielded a string, not a list"
            );
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    assert!(ran(&env.seen, "e2").is_empty(), "nothing ran");

    // A queue that is gone by the time the step starts, and a `when` reading a step that does
    // not exist: the run fails naming the step.
    let gone: Definition = serde_json::from_value(json!({
        "steps": [{"name": "lost", "queue": "nope"}]
    }))?;
    match run(&env, "e3", gone, json!({})).await? {
        JobResult::DeadLettered { error, .. } => {
            assert_eq!(error, "step lost failed: queue test/nope does not exist");
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    let unknown: Definition = serde_json::from_value(json!({
        "steps": [{"name": "each", "queue": "each", "when": "steps.ghost.outcome == 'completed'"}]
    }))?;
    match run(&env, "e4", unknown, json!({})).await? {
        JobResult::DeadLettered { error, .. } => {
            assert!(error.starts_with("step each failed: when: "), "{error}");
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    // A definition the operator would refuse, started straight into the run queue: the run
    // fails at once instead of continuing wave after wave with nothing to start.
    let cycle: Definition = serde_json::from_value(json!({
        "steps": [
            {"name": "a", "queue": "each", "dependsOn": ["b"]},
            {"name": "b", "queue": "each", "dependsOn": ["a"]},
        ]
    }))?;
    match run(&env, "e5", cycle, json!({})).await? {
        JobResult::DeadLettered { error, .. } => {
            assert!(
                error.starts_with("the run's workflow is not valid: ") && error.contains("cycle"),
                "{error}"
            );
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    assert!(ran(&env.seen, "e5").is_empty(), "nothing ran");
    Ok(())
}

#[tokio::test]
async fn runs_survive_their_engine_killed_mid_wave_and_every_step_runs_once() -> anyhow::Result<()>
{
    let mut env = seeds_env().await?;
    const RUNS: usize = 40;
    let mut states = Vec::new();
    for i in 0..RUNS {
        let input = json!({"twitter": i, "facebook": 1});
        let state = RunState::new(NS, "social", &format!("k{i:02}"), seeds(), input);
        start(&env.client, &env.runs, &state).await?;
        states.push(state);
    }
    // Killed (its handlers dropped mid-wave, nothing acked) once some steps ran; its
    // unfinished waves come back to the next engine after the run queue's 2 s timeout.
    wait_for_some(WAIT, "some steps to run", || async {
        (env.seen.lock().unwrap().len() >= 10).then_some(())
    })
    .await?;
    env.engine.abort();
    let _ = (&mut env.engine).await;
    env.engine = spawn_engine(&env.client, &env.runs, &env.stop);
    for (i, state) in states.iter().enumerate() {
        let run = state.run.clone();
        let result = wait_for_some(WAIT, &format!("the outcome of run {run}"), || async {
            env.client.result(&env.runs, &run).await.ok().flatten()
        })
        .await?;
        assert_eq!(completed(&result), json!({"total": i + 1}), "run {run}");
    }
    let seen = env.seen.lock().unwrap();
    let mut runs_of: std::collections::BTreeMap<&str, usize> = Default::default();
    for (id, _, _) in seen.iter() {
        *runs_of.entry(id.as_str()).or_default() += 1;
    }
    assert_eq!(runs_of.len(), RUNS * 3, "every step of every run ran");
    let twice: Vec<_> = runs_of.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "steps that ran more than once: {twice:?}");
    Ok(())
}

/// A node of a hierarchy `levels` deep below it, `fan` children each, every value 1.
fn tree(levels: u32, fan: usize) -> Value {
    let children: Vec<Value> = if levels == 0 {
        Vec::new()
    } else {
        (0..fan).map(|_| tree(levels - 1, fan)).collect()
    };
    json!({"value": 1, "children": children})
}

async fn outcome(env: &Env, state: &RunState) -> anyhow::Result<JobResult> {
    start(&env.client, &env.runs, state).await?;
    let run = state.run.clone();
    wait_for_some(
        Duration::from_secs(120),
        &format!("the outcome of run {run}"),
        || async { env.client.result(&env.runs, &run).await.ok().flatten() },
    )
    .await
}

#[tokio::test]
async fn a_recursive_workflow_sums_a_hierarchy_and_its_depth_is_bounded() -> anyhow::Result<()> {
    let env = env(&[("sum", 1)]).await?;
    // Each node's children are sub-runs of the same workflow; the sum adds them up.
    let definition: Definition = serde_json::from_value(json!({
        "steps": [
            {"name": "children", "workflow": "tree", "forEach": "input.children"},
            {"name": "sum", "queue": "sum", "dependsOn": ["children"]}
        ]
    }))?;
    // 1 → 3 → 9 → 27: four levels, 40 nodes, 40 runs.
    let state = RunState::new(NS, "tree", "t1", definition.clone(), tree(3, 3));
    let result = outcome(&env, &state).await?;
    assert_eq!(completed(&result), json!(40));
    let sums = env
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _, _)| id.starts_with("tree.t1") && id.ends_with(".sum"))
        .count();
    assert_eq!(sums, 40, "one sum per node");

    // Without a base case a run recurses until the depth limit, and fails saying so.
    let endless: Definition = serde_json::from_value(json!({
        "steps": [{"name": "again", "workflow": "tree"}]
    }))?;
    let state = RunState::new(NS, "tree", "t2", endless, json!({}));
    match outcome(&env, &state).await? {
        JobResult::DeadLettered { error, .. } => {
            assert!(error.contains("sub-runs nest at most 8 deep"), "{error}");
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn run_ids_that_could_share_job_ids_are_refused() -> anyhow::Result<()> {
    let env = seeds_env().await?;
    // Workflow `a.b` run `c` and workflow `a` run `b.c` would both be job `a.b.c`.
    let dotted_run = RunState::new(NS, "a", "b.c", seeds(), json!({"facebook": 1}));
    let error = start(&env.client, &env.runs, &dotted_run)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("run id \"b.c\" must be"),
        "{error}"
    );
    let dotted_workflow = RunState::new(NS, "a.b", "c", seeds(), json!({"facebook": 1}));
    let error = start(&env.client, &env.runs, &dotted_workflow)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("must be a DNS label"), "{error}");

    // Straight into the run queue, past `start`: the first wave refuses it, nothing runs.
    let payload = serde_json::to_vec(&dotted_run)?;
    env.client
        .submit(
            &env.runs,
            conveyor::Job::new(dotted_run.run.clone(), payload),
        )
        .await?;
    let run = dotted_run.run.clone();
    let result = wait_for_some(WAIT, "the outcome of the dotted run", || async {
        env.client.result(&env.runs, &run).await.ok().flatten()
    })
    .await?;
    match result {
        JobResult::DeadLettered { error, .. } => {
            assert!(error.contains("is not <workflow>.<run id>"), "{error}");
        }
        other => panic!("expected a refused run, got {other:?}"),
    }
    assert!(env.seen.lock().unwrap().is_empty(), "no step ran");
    Ok(())
}
