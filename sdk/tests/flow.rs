//! Jobs that wait for jobs, against a real nats-server: dependencies (either order, failure
//! policies, optional and skipped), children with continuations (fan-out, recursion, a parent
//! that holds no slot), timeouts and bad input. The releaser runs as the dispatcher runs it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::flow::{Dependency, DependencyState, JobRef, Releaser};
use conveyor::names::QueueRef;
use conveyor::protocol::Outcome as Recorded;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, JobResult, SubmitError, Worker};
use conveyor_testkit::{NatsServer, wait_for};
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

async fn queues(
    client: &Client,
    names: &[&str],
    settings: &QueueSettings,
) -> anyhow::Result<Vec<QueueRef>> {
    let mut made = Vec::new();
    for name in names {
        let queue = QueueRef::new(NS, *name);
        ensure_queue(client.jetstream(), &queue, settings).await?;
        made.push(queue);
    }
    Ok(made)
}

/// Runs a releaser for each queue until `stop`, restarting it after errors.
fn releasers(client: &Client, queues: &[QueueRef], stop: &CancellationToken) {
    for queue in queues {
        let releaser =
            Releaser::new(client.jetstream().clone()).scan_interval(Duration::from_millis(200));
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

fn options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        poll_wait: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(2),
        pod_name: "test-pod".into(),
        ..Default::default()
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
    let runner = Worker::new(client.jetstream().clone(), queue.clone())
        .options(options(concurrency))
        .handler(handler);
    let stop = stop.clone();
    tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await });
}

fn text(bytes: &Bytes) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fetch handler: payload `fail` fails for good, anything else is the result.
async fn fetch(job: ReceivedJob) -> Outcome {
    if job.payload.as_ref() == b"fail" {
        Outcome::Permanent("the token was revoked".into())
    } else {
        Outcome::Done(job.payload)
    }
}

/// The aggregate handler: the completed dependencies' results joined with `+`, then what
/// failed and was skipped.
async fn aggregate(job: ReceivedJob) -> Outcome {
    let dependencies = match job.flow.dependencies().await {
        Ok(dependencies) => dependencies,
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    let done: Vec<String> = dependencies
        .iter()
        .filter(|d| d.state == DependencyState::Completed)
        .map(|d| text(&d.result))
        .collect();
    Outcome::Done(
        format!(
            "{} failed=[{}] skipped=[{}]",
            done.join("+"),
            job.flow.failed_dependencies().join(","),
            job.flow.skipped_dependencies().join(",")
        )
        .into(),
    )
}

fn completed(result: &JobResult) -> String {
    match result {
        JobResult::Completed { result, .. } => text(result),
        other => panic!("expected a completed job, got {other:?}"),
    }
}

#[tokio::test]
async fn aggregate_waits_for_twitter_and_facebook_with_skip_and_both_failure_policies()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(
        &client,
        &["twitter", "facebook", "aggregate"],
        &QueueSettings::default(),
    )
    .await?;
    let (twitter, facebook, agg) = (&made[0], &made[1], &made[2]);
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    worker(&client, twitter, 2, &stop, fetch);
    worker(&client, facebook, 2, &stop, fetch);
    worker(&client, agg, 2, &stop, aggregate);
    let tw = |id: &str| JobRef::new(NS, "twitter", id);
    let fb = |id: &str| JobRef::new(NS, "facebook", id);

    // Both linked.
    client.submit(twitter, Job::new("t1", "tweets")).await?;
    client.submit(facebook, Job::new("f1", "posts")).await?;
    let job = Job::new("a1", "")
        .after(Dependency::on(tw("t1")).optional())
        .after(Dependency::on(fb("f1")));
    let result = client.submit_and_wait(agg, job, WAIT).await?;
    assert_eq!(completed(&result), "tweets+posts failed=[] skipped=[]");

    // Twitter not linked: its fetch is skipped, never submitted; the aggregate runs without it.
    let job = Job::new("a2", "")
        .after(Dependency::on(tw("t2")).optional())
        .after(Dependency::on(fb("f2")));
    let waiting = client.submit(agg, job).await?;
    assert!(!waiting.duplicate);
    client.submit(facebook, Job::new("f2", "posts")).await?;
    client.skip(&tw("t2")).await?;
    let result = wait_result(&client, agg, "a2").await?;
    assert_eq!(
        completed(&result),
        "posts failed=[] skipped=[test/twitter/t2]"
    );

    // The Twitter fetch dead-letters. Policy fail: the aggregate is dead-lettered too.
    client.submit(twitter, Job::new("t3", "fail")).await?;
    client.submit(facebook, Job::new("f3", "posts")).await?;
    let job = Job::new("a3", "")
        .after(Dependency::on(tw("t3")))
        .after(Dependency::on(fb("f3")));
    match client.submit_and_wait(agg, job, WAIT).await? {
        JobResult::DeadLettered { reason, error, .. } => {
            assert_eq!(reason, "dependency_failed");
            assert!(error.contains("test/twitter/t3"), "{error}");
            assert!(error.contains("the token was revoked"), "{error}");
        }
        other => panic!("expected dependency_failed, got {other:?}"),
    }
    // Policy run: the aggregate runs and is told which dependency failed.
    client.submit(twitter, Job::new("t4", "fail")).await?;
    client.submit(facebook, Job::new("f4", "posts")).await?;
    let job = Job::new("a4", "")
        .after(Dependency::on(tw("t4")).run_if_failed())
        .after(Dependency::on(fb("f4")));
    let result = client.submit_and_wait(agg, job, WAIT).await?;
    assert_eq!(
        completed(&result),
        "posts failed=[test/twitter/t4] skipped=[]"
    );
    Ok(())
}

async fn wait_result(client: &Client, queue: &QueueRef, id: &str) -> anyhow::Result<JobResult> {
    conveyor_testkit::wait_for_some(WAIT, &format!("the outcome of {id}"), || async {
        client.result(queue, id).await.ok().flatten()
    })
    .await
}

#[tokio::test]
async fn a_dependent_runs_whether_submitted_before_between_or_after_its_dependencies()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["steps"], &QueueSettings::default()).await?;
    let q = &made[0];
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let runs = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen = runs.clone();
    worker(&client, q, 4, &stop, move |job: ReceivedJob| {
        let seen = seen.clone();
        async move {
            *seen.lock().unwrap().entry(job.id.clone()).or_default() += 1;
            Outcome::Done(Bytes::from(job.id))
        }
    });
    let on = |id: &str| Dependency::on(JobRef::new(NS, "steps", id));
    // Before: the dependent first, then both dependencies.
    client
        .submit(q, Job::new("before", "").after(on("b1")).after(on("b2")))
        .await?;
    assert_eq!(
        client.waiting(q).await?,
        1,
        "the dependent is waiting, not queued"
    );
    let status = client
        .job_status(&JobRef::new(NS, "steps", "before"))
        .await?;
    match status.state {
        conveyor::flow::JobState::Waiting { after, .. } => {
            assert_eq!(after.len(), 2);
            assert!(
                after
                    .iter()
                    .all(|(_, state)| *state == DependencyState::Missing)
            );
        }
        other => panic!("expected waiting, got {other:?}"),
    }
    client.submit(q, Job::new("b1", "")).await?;
    client.submit(q, Job::new("b2", "")).await?;
    // Between: one dependency done, then the dependent, then the other.
    client.submit(q, Job::new("m1", "")).await?;
    wait_result(&client, q, "m1").await?;
    client
        .submit(q, Job::new("between", "").after(on("m1")).after(on("m2")))
        .await?;
    client.submit(q, Job::new("m2", "")).await?;
    // After: both done before the dependent is submitted.
    client.submit(q, Job::new("a1", "")).await?;
    client.submit(q, Job::new("a2", "")).await?;
    wait_result(&client, q, "a1").await?;
    wait_result(&client, q, "a2").await?;
    client
        .submit(q, Job::new("after", "").after(on("a1")).after(on("a2")))
        .await?;
    for id in ["before", "between", "after"] {
        assert_eq!(completed(&wait_result(&client, q, id).await?), id);
    }
    wait_for(WAIT, "the waiting figure back at 0", || async {
        client.waiting(q).await.ok() == Some(0)
    })
    .await?;
    let runs = runs.lock().unwrap();
    for id in ["before", "between", "after"] {
        assert_eq!(runs.get(id), Some(&1), "{id} ran exactly once");
    }
    Ok(())
}

/// A parent that spawns `children` children in `kids` and continues with a job that pages
/// through their results; the continuation's result is `<children seen>:<sum of results>`.
async fn parent_with_children(job: ReceivedJob, kids: QueueRef, children: u64) -> Outcome {
    if job.flow.children_expected().is_some() {
        // The continuation.
        let (mut seen, mut sum, mut after) = (0u64, 0u64, 0u64);
        loop {
            let page = match job.flow.children_page(after, 500).await {
                Ok(page) => page,
                Err(error) => return Outcome::Failed(error.to_string()),
            };
            let Some(last) = page.last() else { break };
            after = last.sequence;
            for child in &page {
                assert_eq!(child.outcome, Recorded::Completed);
                seen += 1;
                sum += text(&child.result).parse::<u64>().unwrap_or(0);
            }
        }
        return Outcome::Done(format!("{seen}:{sum}").into());
    }
    let jobs = (0..children).map(|i| Job::new(format!("{}.c{i}", job.id), i.to_string()));
    for result in job.flow.spawn_batch(&kids, jobs).await {
        if let Err(error) = result {
            return Outcome::Failed(error.to_string());
        }
    }
    Outcome::Continue(Box::new(Job::new(format!("{}.k", job.id), "")))
}

#[tokio::test]
async fn a_fan_out_of_2000_children_continues_exactly_once_with_every_result() -> anyhow::Result<()>
{
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["parents", "kids"], &QueueSettings::default()).await?;
    let (parents, kids) = (made[0].clone(), made[1].clone());
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let continuations = Arc::new(AtomicU64::new(0));
    let counted = continuations.clone();
    let kids_queue = kids.clone();
    worker(&client, &parents, 2, &stop, move |job: ReceivedJob| {
        let (kids, counted) = (kids_queue.clone(), counted.clone());
        async move {
            if job.flow.children_expected().is_some() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            parent_with_children(job, kids, 2000).await
        }
    });
    worker(&client, &kids, 16, &stop, |job: ReceivedJob| async move {
        Outcome::Done(job.payload)
    });
    let result = client
        .submit_and_wait(&parents, Job::new("fan", ""), Duration::from_secs(120))
        .await?;
    assert_eq!(
        completed(&result),
        format!("2000:{}", (0..2000u64).sum::<u64>())
    );
    assert_eq!(
        continuations.load(Ordering::SeqCst),
        1,
        "the continuation ran exactly once"
    );
    let summary = client
        .flow_summary(&JobRef::new(NS, "parents", "fan"), 3, 10_000)
        .await?;
    assert_eq!(
        (summary.read, summary.completed, summary.first.len()),
        (2000, 2000, 3)
    );
    assert!(!summary.truncated);
    // The parent's stored outcome is its continuation's.
    assert_eq!(
        completed(&wait_result(&client, &parents, "fan").await?),
        completed(&result)
    );
    Ok(())
}

#[tokio::test]
async fn a_parent_never_holds_a_slot() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["one"], &QueueSettings::default()).await?;
    let queue = made[0].clone();
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let own = queue.clone();
    // One worker, one slot, parent and children in the same queue: the parent's children can
    // only run once the parent gave its slot up.
    worker(&client, &queue, 1, &stop, move |job: ReceivedJob| {
        let own = own.clone();
        async move {
            if job.id.contains(".c") {
                return Outcome::Done(Bytes::from_static(b"1"));
            }
            parent_with_children(job, own, 100).await
        }
    });
    let result = client
        .submit_and_wait(&queue, Job::new("p", ""), Duration::from_secs(60))
        .await?;
    assert_eq!(completed(&result), "100:100");
    Ok(())
}

/// A node of a tree: at depth below `depth` it spawns `fan` children of its own kind and
/// continues with the sum of their results plus one; a leaf is 1. The root's result is the
/// number of nodes, and each continuation checks it saw exactly its own children.
async fn tree_node(job: ReceivedJob, queue: QueueRef, depth: u32, fan: u32) -> Outcome {
    if let Some(expected) = job.flow.children_expected() {
        let mut sum = 1u64;
        let mut seen = 0;
        let mut after = 0;
        loop {
            let page = match job.flow.children_page(after, 100).await {
                Ok(page) => page,
                Err(error) => return Outcome::Failed(error.to_string()),
            };
            let Some(last) = page.last() else { break };
            after = last.sequence;
            for child in page {
                let parent = job.id.trim_end_matches(".k");
                if !child.job.id.starts_with(&format!("{parent}.")) {
                    return Outcome::Permanent(format!("{} is not a child of {parent}", child.job));
                }
                seen += 1;
                sum += text(&child.result).parse::<u64>().unwrap_or(0);
            }
        }
        if seen != expected {
            return Outcome::Permanent(format!("saw {seen} children, expected {expected}"));
        }
        return Outcome::Done(sum.to_string().into());
    }
    let level = job.id.matches('.').count() as u32;
    if level >= depth {
        return Outcome::Done(Bytes::from_static(b"1"));
    }
    let children = (0..fan).map(|i| Job::new(format!("{}.{i}", job.id), ""));
    for result in job.flow.spawn_batch(&queue, children).await {
        if let Err(error) = result {
            return Outcome::Failed(error.to_string());
        }
    }
    Outcome::Continue(Box::new(Job::new(format!("{}.k", job.id), "")))
}

#[tokio::test]
async fn a_recursive_tree_aggregates_to_the_root() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["tree"], &QueueSettings::default()).await?;
    let queue = made[0].clone();
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let own = queue.clone();
    worker(&client, &queue, 8, &stop, move |job: ReceivedJob| {
        let own = own.clone();
        async move { tree_node(job, own, 5, 4).await }
    });
    // Depth 5 below the root, 4 children a node: 1 + 4 + 16 + 64 + 256 + 1024 nodes, 341 of
    // them continuing.
    let result = client
        .submit_and_wait(&queue, Job::new("r", ""), Duration::from_secs(240))
        .await?;
    assert_eq!(completed(&result), "1365");
    Ok(())
}

#[tokio::test]
async fn bad_dependencies_are_refused_and_a_cycle_times_out() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let settings = QueueSettings {
        wait_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let made = queues(&client, &["bad"], &settings).await?;
    let q = &made[0];
    let on = |text: &str| JobRef::parse(text, (NS, "bad")).map(Dependency::on);
    assert!(on("a;b").is_err(), "',' and ';' separate dependencies");
    assert!(on("Q/a").is_err(), "no Kubernetes name");
    assert!(on("ns//a").is_err());
    let mut many = Job::new("many", "");
    for i in 0..65 {
        many = many.after(on(&format!("d{i}"))?);
    }
    let err = client.submit(q, many).await.unwrap_err();
    assert!(
        matches!(err, SubmitError::BadDependencies { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("at most 64"), "{err}");
    let err = client
        .submit(q, Job::new("me", "").after(on("me")?))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot depend on itself"), "{err}");
    let err = client
        .submit(q, Job::new("x", "").after(on("nowhere/a")?))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::NoSuchDependencyQueue { .. }),
        "{err:?}"
    );
    let refused = [
        (
            Job::new("later", "")
                .after(on("a")?)
                .delay(Duration::from_secs(60)),
            "cannot both be delayed",
        ),
        (
            Job::new("twice", "").after(on("a")?).after(on("a")?),
            "named twice",
        ),
        (Job::new("x,y", "").after(on("a")?), "contains ','"),
        (
            Job::new("forged", "")
                .after(on("a")?)
                .header("Conveyor-Decided", "release"),
            "is the releaser's",
        ),
    ];
    for (job, problem) in refused {
        let err = client.submit(q, job).await.unwrap_err();
        assert!(
            matches!(err, SubmitError::BadDependencies { .. }) && err.to_string().contains(problem),
            "{err:?}"
        );
    }
    assert_eq!(client.waiting(q).await?, 0, "nothing refused was stored");

    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    // A level the queue does not have: found at release, dead-lettered as malformed.
    client
        .submit(
            q,
            Job::new("high", "")
                .priority(5)
                .after(on("lvl")?.optional()),
        )
        .await?;
    client.skip(&JobRef::new(NS, "bad", "lvl")).await?;
    match wait_result(&client, q, "high").await? {
        JobResult::DeadLettered { reason, error, .. } => {
            assert_eq!(reason, "malformed");
            assert!(error.contains("no priority level 5"), "{error}");
        }
        other => panic!("expected malformed, got {other:?}"),
    }
    // A cycle: A after B, B after A. Neither can run: the older one expires into the DLQ
    // (dependency_timeout) and the other fails for it (dependency_failed naming it).
    client.submit(q, Job::new("A", "").after(on("B")?)).await?;
    client.submit(q, Job::new("B", "").after(on("A")?)).await?;
    assert_eq!(client.waiting(q).await?, 2);
    match wait_result(&client, q, "A").await? {
        JobResult::DeadLettered { reason, .. } => assert_eq!(reason, "dependency_timeout"),
        other => panic!("expected dependency_timeout, got {other:?}"),
    }
    match wait_result(&client, q, "B").await? {
        JobResult::DeadLettered { reason, error, .. } => {
            assert!(
                reason == "dependency_failed" && error.contains("test/bad/A")
                    || reason == "dependency_timeout",
                "{reason}: {error}"
            );
        }
        other => panic!("expected B dead-lettered, got {other:?}"),
    }
    wait_for(WAIT, "nothing waiting any more", || async {
        client.waiting(q).await.ok() == Some(0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn cancelling_a_waiting_job_removes_it_and_answers_its_dependents() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["cq"], &QueueSettings::default()).await?;
    let q = &made[0];
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let on = |id: &str| Dependency::on(JobRef::new(NS, "cq", id));
    client
        .submit(q, Job::new("w", "").after(on("never")))
        .await?;
    client
        .submit(q, Job::new("after-w", "").after(on("w")))
        .await?;
    assert_eq!(client.waiting(q).await?, 2);
    let ack = client.cancel(q, "w").await?;
    assert!(ack.waiting_removed);
    assert_eq!(
        wait_result(&client, q, "w").await?,
        JobResult::Cancelled { id: "w".into() }
    );
    // Its dependent fails for it (a cancelled non-optional dependency is a failure).
    match wait_result(&client, q, "after-w").await? {
        JobResult::DeadLettered { reason, error, .. } => {
            assert_eq!(reason, "dependency_failed");
            assert!(error.contains("cancelled"), "{error}");
        }
        other => panic!("expected dependency_failed, got {other:?}"),
    }
    wait_for(WAIT, "nothing waiting any more", || async {
        client.waiting(q).await.ok() == Some(0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_fixed_dependency_is_requeued_with_the_dependents_that_failed_for_it()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["src", "dst"], &QueueSettings::default()).await?;
    let (src, dst) = (made[0].clone(), made[1].clone());
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let broken = fixed.clone();
    worker(&client, &src, 2, &stop, move |job: ReceivedJob| {
        let fixed = broken.load(Ordering::SeqCst);
        async move {
            if fixed {
                Outcome::Done(job.payload)
            } else {
                Outcome::Permanent("upstream is down".into())
            }
        }
    });
    worker(&client, &dst, 2, &stop, aggregate);
    client.submit(&src, Job::new("x", "data")).await?;
    let after = Dependency::on(JobRef::new(NS, "src", "x"));
    client.submit(&dst, Job::new("y", "").after(after)).await?;
    match wait_result(&client, &dst, "y").await? {
        JobResult::DeadLettered { reason, .. } => assert_eq!(reason, "dependency_failed"),
        other => panic!("expected dependency_failed, got {other:?}"),
    }
    fixed.store(true, Ordering::SeqCst);
    let moved = conveyor::dlq::requeue_with_dependents(
        client.jetstream(),
        &src,
        &conveyor::dlq::Selector::One("x".into()),
    )
    .await?;
    assert_eq!(moved.jobs, ["x", "test/dst/y"]);
    let result =
        conveyor_testkit::wait_for_some(WAIT, "y to complete after the requeue", || async {
            match client.result(&dst, "y").await.ok().flatten() {
                Some(JobResult::Completed { result, .. }) => Some(text(&result)),
                _ => None,
            }
        })
        .await?;
    assert_eq!(result, "data failed=[] skipped=[]");
    Ok(())
}

/// Submits `job` and dead-letters it from the work stream as the dispatcher does with a job
/// whose worker died on every delivery (`stored::dead_letter`, reason `max_deliveries`).
async fn dead_letter_unreported(client: &Client, queue: &QueueRef, job: Job) -> anyhow::Result<()> {
    let ack = client.submit(queue, job).await?;
    let nc = client.jetstream().client();
    let stored = conveyor::stored::get(&nc, &queue.stream(), ack.sequence)
        .await?
        .expect("the job is stored");
    let reading = stored.read(&queue.stream());
    conveyor::stored::dead_letter(
        client.jetstream(),
        queue,
        &stored,
        &reading,
        (
            conveyor::protocol::Reason::MaxDeliveries,
            "no report".into(),
        ),
        3,
        "unknown",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_child_dead_lettered_without_a_handler_report_still_reaches_its_parent()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["kin"], &QueueSettings::default()).await?;
    let q = &made[0];
    // A child whose worker died on every delivery: the dispatcher dead-letters it from the
    // work stream (`stored::dead_letter`), and its parent's record must say so.
    let child = Job::new("orphan", "").header(conveyor::protocol::flow::PARENT, "test/kin/p");
    dead_letter_unreported(&client, q, child).await?;
    let nc = client.jetstream().client();
    let page = conveyor::flow::children_page(&nc, &JobRef::new(NS, "kin", "p"), 0, 10).await?;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].job, JobRef::new(NS, "kin", "orphan"));
    assert!(
        matches!(&page[0].outcome, Recorded::DeadLettered { reason, .. } if reason == "max_deliveries"),
        "{:?}",
        page[0].outcome
    );
    Ok(())
}

/// Sets the largest message `queue`'s flow stream takes (so child records can be refused);
/// returns the setting it replaced.
async fn flow_stream_max_message_size(
    client: &Client,
    queue: &QueueRef,
    size: i32,
) -> anyhow::Result<i32> {
    let mut stream = client.jetstream().get_stream(queue.flow_stream()).await?;
    let mut config = stream.info().await?.config.clone();
    let was = config.max_message_size;
    config.max_message_size = size;
    client.jetstream().update_stream(config).await?;
    Ok(was)
}

/// A one-slot [`fetch`] worker whose retries come back within 200 ms; counts its runs.
fn counting_fetch_worker(
    client: &Client,
    queue: &QueueRef,
    stop: &CancellationToken,
) -> Arc<AtomicU64> {
    let runs = Arc::new(AtomicU64::new(0));
    let counted = runs.clone();
    let mut opts = options(1);
    opts.backoff = conveyor::protocol::Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(200),
        ..Default::default()
    };
    let runner = Worker::new(client.jetstream().clone(), queue.clone())
        .options(opts)
        .handler(move |job: ReceivedJob| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                fetch(job).await
            }
        });
    let halt = stop.clone();
    tokio::spawn(async move { runner.run(async move { halt.cancelled().await }).await });
    runs
}

#[tokio::test]
async fn a_dead_lettered_child_whose_record_cannot_be_written_is_retried_until_it_is()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["kin"], &QueueSettings::default()).await?;
    let q = made[0].clone();
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    let runs = counting_fetch_worker(&client, &q, &stop);
    // The parent's flow stream refuses every record for a while.
    let was = flow_stream_max_message_size(&client, &q, 1).await?;
    let child = Job::new("doomed", "fail").header(conveyor::protocol::flow::PARENT, "test/kin/p");
    client.submit(&q, child).await?;
    wait_for(WAIT, "the child to run twice", || async {
        runs.load(Ordering::SeqCst) >= 2
    })
    .await?;
    flow_stream_max_message_size(&client, &q, was).await?;
    let nc = client.jetstream().client();
    let parent = JobRef::new(NS, "kin", "p");
    let page = conveyor_testkit::wait_for_some(WAIT, "the child's record", || async {
        let page = conveyor::flow::children_page(&nc, &parent, 0, 10)
            .await
            .ok()?;
        (!page.is_empty()).then_some(page)
    })
    .await?;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].job, JobRef::new(NS, "kin", "doomed"));
    assert!(
        matches!(&page[0].outcome, Recorded::DeadLettered { reason, .. } if reason == "permanent"),
        "{:?}",
        page[0].outcome
    );
    Ok(())
}

/// Whether `queue`'s work stream holds no job (every job acked: work-queue retention).
async fn work_stream_empty(client: &Client, queue: &QueueRef) -> bool {
    match client.jetstream().get_stream(queue.stream()).await {
        Ok(stream) => stream.cached_info().state.messages == 0,
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_child_whose_parent_queue_does_not_exist_completes_once() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["kin", "idle"], &QueueSettings::default()).await?;
    let (q, idle) = (made[0].clone(), made[1].clone());
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    let runs = counting_fetch_worker(&client, &q, &stop);
    let child = Job::new("stray", "data").header(conveyor::protocol::flow::PARENT, "test/ghost/p");
    client.submit(&q, child).await?;
    assert_eq!(completed(&wait_result(&client, &q, "stray").await?), "data");
    // A child whose record keeps failing is retried, never acked; once acked it cannot run again.
    wait_for(WAIT, "the child acked", || work_stream_empty(&client, &q)).await?;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the child ran once");
    let info = client
        .jetstream()
        .get_stream(q.stream())
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(info.state.messages, 0, "the child was acked");
    // The dispatcher's dead-letter step does not fail on it either.
    let orphan = Job::new("lost", "").header(conveyor::protocol::flow::PARENT, "test/ghost/p");
    dead_letter_unreported(&client, &idle, orphan).await?;
    Ok(())
}

#[tokio::test]
async fn a_plain_job_cannot_overwrite_another_queues_outcome() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["kin"], &QueueSettings::default()).await?;
    let q = made[0].clone();
    let victims = QueueRef::new("other", "vq");
    ensure_queue(client.jetstream(), &victims, &QueueSettings::default()).await?;
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    counting_fetch_worker(&client, &victims, &stop);
    counting_fetch_worker(&client, &q, &stop);
    client
        .submit(&victims, Job::new("victim", "genuine"))
        .await?;
    assert_eq!(
        completed(&wait_result(&client, &victims, "victim").await?),
        "genuine"
    );
    let forged =
        Job::new("forger", "forged").header(conveyor::protocol::flow::CONTINUES, "other/vq/victim");
    client.submit(&q, forged).await?;
    assert_eq!(
        completed(&wait_result(&client, &q, "forger").await?),
        "forged"
    );
    // Its own outcome is written first, a forged second write before the ack: wait for that.
    wait_for(WAIT, "the forger acked", || work_stream_empty(&client, &q)).await?;
    assert_eq!(
        completed(&client.result(&victims, "victim").await?.expect("kept")),
        "genuine",
        "the other queue's outcome is untouched"
    );
    Ok(())
}

/// Writes what a releaser stores when it decides `decision` for the job waiting on `subject`
/// (a copy with `Conveyor-Decided`, compare-and-set on the job's sequence), and stops there,
/// as a releaser killed before carrying it out would.
async fn store_decision(
    client: &Client,
    queue: &QueueRef,
    id: &str,
    after: &str,
    decision: &str,
) -> anyhow::Result<()> {
    let nc = client.jetstream().client();
    let subject = queue.waiting_subject(id);
    let waiting = conveyor::stored::last(&nc, &queue.waiting_stream(), &subject)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{id} does not wait"))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Conveyor-Job-Id", id);
    headers.insert("Conveyor-After", after);
    headers.insert("Conveyor-Decided", decision);
    headers.insert(
        "Conveyor-Decided-Error",
        "decided before the releaser stopped",
    );
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        waiting.sequence.to_string().as_str(),
    );
    client
        .jetstream()
        .publish_with_headers(subject, headers, Bytes::new())
        .await?
        .await?;
    Ok(())
}

/// The release-or-dead-letter race: a decision stored first (here the timeout scan's
/// dead letter) wins over a later one (the release its dependency's completion triggers),
/// and a stored decision is carried out by whoever reads it next. A value that names no
/// decision is no decision.
#[tokio::test]
async fn a_stored_decision_wins_over_a_later_one_and_is_carried_out() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let made = queues(&client, &["dq"], &QueueSettings::default()).await?;
    let q = &made[0];
    let on = |id: &str| Dependency::on(JobRef::new(NS, "dq", id));
    // Stored while no releaser runs: the decisions below are what a stopped one left.
    for (job, dependency) in [("timed-out", "d1"), ("released", "never"), ("odd", "d2")] {
        client
            .submit(q, Job::new(job, "").after(on(dependency)))
            .await?;
    }
    store_decision(&client, q, "timed-out", "test/dq/d1", "dependency_timeout").await?;
    store_decision(&client, q, "released", "test/dq/never", "release").await?;
    store_decision(&client, q, "odd", "test/dq/d2", "banana").await?;
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let ran = Arc::new(Mutex::new(Vec::new()));
    let log = ran.clone();
    worker(&client, q, 4, &stop, move |job: ReceivedJob| {
        log.lock().unwrap().push(job.id.clone());
        async move { Outcome::Done(job.id.into()) }
    });
    for dependency in ["d1", "d2"] {
        client.submit(q, Job::new(dependency, "")).await?;
    }
    match wait_result(&client, q, "timed-out").await? {
        JobResult::DeadLettered { reason, error, .. } => {
            assert_eq!(reason, "dependency_timeout");
            assert_eq!(error, "decided before the releaser stopped");
        }
        other => panic!("the stored dead letter should win, got {other:?}"),
    }
    assert_eq!(
        wait_result(&client, q, "released").await?,
        JobResult::Completed {
            id: "released".into(),
            result: "released".into()
        },
        "a stored release runs although its dependency never came"
    );
    assert_eq!(
        wait_result(&client, q, "odd").await?,
        JobResult::Completed {
            id: "odd".into(),
            result: "odd".into()
        },
        "an unknown decision is none: the job ran when its dependency completed"
    );
    wait_for(WAIT, "nothing waiting any more", || async {
        client.waiting(q).await.ok() == Some(0)
    })
    .await?;
    // The worker logs a job when it starts it, before its outcome is stored: both jobs whose
    // outcome was read as completed are in `ran`, once each.
    let ran = ran.lock().unwrap().clone();
    assert!(
        !ran.iter().any(|id| id == "timed-out"),
        "the dead-lettered job never ran: {ran:?}"
    );
    assert_eq!(
        ran.iter().filter(|id| *id == "released").count(),
        1,
        "{ran:?}"
    );
    Ok(())
}

/// Spawns one child per `(queue, suffix)` (id `<own id>.<suffix>`) and continues with
/// `<own id>.k`; the continuation logs its id in `ran` and completes.
async fn spawner(job: ReceivedJob, children: Vec<(QueueRef, &str)>, ran: Ran) -> Outcome {
    if job.flow.children_expected().is_some() {
        ran.lock().unwrap().push(job.id.clone());
        return Outcome::Done(Bytes::from_static(b"k"));
    }
    for (queue, suffix) in children {
        let child = Job::new(format!("{}.{suffix}", job.id), "");
        if let Err(error) = job.flow.spawn(&queue, child).await {
            return Outcome::Failed(error.to_string());
        }
    }
    Outcome::Continue(Box::new(Job::new(format!("{}.k", job.id), "")))
}

type Ran = Arc<Mutex<Vec<String>>>;

/// A worker whose handler logs each job's id in `ran` and completes it.
fn leaf_worker(client: &Client, queue: &QueueRef, ran: &Ran, stop: &CancellationToken) {
    let ran = ran.clone();
    worker(client, queue, 4, stop, move |job: ReceivedJob| {
        let ran = ran.clone();
        async move {
            ran.lock().unwrap().push(job.id.clone());
            Outcome::Done(Bytes::from_static(b"leaf"))
        }
    });
}

#[tokio::test]
async fn cancelling_a_parent_with_children_skips_them_at_every_depth() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let names = ["parents", "kids", "leaves", "grandkids"];
    let made = queues(&client, &names, &QueueSettings::default()).await?;
    let [parents, kids, leaves, grandkids] = <[QueueRef; 4]>::try_from(made.clone()).unwrap();
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    releasers(&client, &made, &stop);
    let ran: Ran = Arc::default();

    // Two parents, each spawning a child that spawns two grandchildren (`kids`) and a child
    // that does not (`leaves`). Only the parents' and kids' workers run at first: both parents
    // and both spawning kids have continued (their continuations wait), the grandchildren and
    // leaves are queued.
    let (own_kids, own_leaves, own_ran) = (kids.clone(), leaves.clone(), ran.clone());
    worker(&client, &parents, 2, &stop, move |job: ReceivedJob| {
        let children = vec![(own_kids.clone(), "a"), (own_leaves.clone(), "b")];
        spawner(job, children, own_ran.clone())
    });
    let (own_grandkids, own_ran) = (grandkids.clone(), ran.clone());
    worker(&client, &kids, 2, &stop, move |job: ReceivedJob| {
        let children = vec![(own_grandkids.clone(), "g0"), (own_grandkids.clone(), "g1")];
        spawner(job, children, own_ran.clone())
    });
    for parent in ["p", "q"] {
        client.submit(&parents, Job::new(parent, "")).await?;
    }
    wait_for(
        WAIT,
        "both parents and both spawning kids waiting",
        || async {
            client.waiting(&parents).await.ok() == Some(2)
                && client.waiting(&kids).await.ok() == Some(2)
        },
    )
    .await?;

    // `p` is cancelled with its children, `q` alone.
    assert!(
        client
            .cancel_with_children(&parents, "p")
            .await?
            .waiting_removed
    );
    assert!(client.cancel(&parents, "q").await?.waiting_removed);
    // The kids' worker read `p` (not cancelled then) when it ran `p.a`; what a worker read of an
    // ancestor holds for `ANCESTORS_REMEMBERED`, the bound the cancellation is documented
    // with. Past it, every job that starts sees the cancellation.
    tokio::time::sleep(conveyor::worker::ANCESTORS_REMEMBERED).await;
    leaf_worker(&client, &leaves, &ran, &stop);
    leaf_worker(&client, &grandkids, &ran, &stop);

    let cancelled = |id: &str| JobResult::Cancelled { id: id.into() };
    assert_eq!(wait_result(&client, &parents, "p").await?, cancelled("p"));
    assert_eq!(
        wait_result(&client, &leaves, "p.b").await?,
        cancelled("p.b")
    );
    for grandchild in ["p.a.g0", "p.a.g1"] {
        assert_eq!(
            wait_result(&client, &grandkids, grandchild).await?,
            cancelled(grandchild),
            "a grandchild is skipped: its parent's continuation names the cancelled parent"
        );
    }
    // The grandchildren recorded, `p.a`'s continuation was released; it is skipped too, so
    // `p.a` ends cancelled.
    assert_eq!(wait_result(&client, &kids, "p.a").await?, cancelled("p.a"));
    // Cancelled alone, `q` leaves its children to run to the end.
    let done = |id: &str, result: &str| JobResult::Completed {
        id: id.into(),
        result: result.to_owned().into(),
    };
    assert_eq!(
        wait_result(&client, &leaves, "q.b").await?,
        done("q.b", "leaf")
    );
    assert_eq!(wait_result(&client, &kids, "q.a").await?, done("q.a", "k"));
    for grandchild in ["q.a.g0", "q.a.g1"] {
        assert_eq!(
            wait_result(&client, &grandkids, grandchild).await?,
            done(grandchild, "leaf")
        );
    }
    for queue in [&parents, &kids] {
        wait_for(WAIT, "nothing waiting any more", || async {
            client.waiting(queue).await.ok() == Some(0)
        })
        .await?;
    }
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    assert_eq!(
        ran,
        ["q.a.g0", "q.a.g1", "q.a.k", "q.b"],
        "no handler ran for a job below the parent cancelled with its children"
    );
    Ok(())
}
