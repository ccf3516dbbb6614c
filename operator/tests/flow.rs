//! Jobs that wait for jobs with the operator's dispatcher running the releaser, against a real
//! `nats-server`: a fan-out whose continuation runs exactly once and sees every child although
//! the dispatcher is stopped and started again and nats-server restarts mid-run (1,000
//! children, and 10,000 with a children's worker killed mid-run too), and a dependency released
//! by the dispatcher.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conveyor::admin::{self, QueueSettings};
use conveyor::flow::{self, Dependency, JobRef};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, JobResult, Worker};
use conveyor_operator::dispatcher::Dispatcher;
use conveyor_testkit::{NatsServer, wait_for, wait_for_some};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(90);
const CHILDREN: u64 = 1000;

async fn connect(server: &NatsServer) -> anyhow::Result<async_nats::Client> {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(server.url())
        .await?;
    wait_for(DEADLINE, "the client to connect", || async {
        client.connection_state() == async_nats::connection::State::Connected
    })
    .await?;
    Ok(client)
}

fn dispatcher(client: async_nats::Client, queues: Vec<QueueRef>) -> CancellationToken {
    let stop = CancellationToken::new();
    let run = Dispatcher::new(client, Arc::new(move || queues.clone()))
        .interval(Duration::from_millis(200))
        .run(stop.clone());
    tokio::spawn(run);
    stop
}

fn worker<F, Fut>(client: &Client, queue: &QueueRef, stop: &CancellationToken, handler: F)
where
    F: Fn(ReceivedJob) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let runner = Worker::new(client.jetstream().clone(), queue.clone())
        .options(WorkerOptions {
            concurrency: 8,
            poll_wait: Duration::from_millis(300),
            drain_timeout: Duration::from_secs(2),
            pod_name: "test-pod".into(),
            ..Default::default()
        })
        .handler(handler);
    let stop = stop.clone();
    tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await });
}

/// A parent that spawns `fan` children into `kids` and continues; its continuation (counted
/// in `seen`) pages through the children's records, `page_size` at a time, and returns how many
/// there were.
async fn fan_out_parent(
    job: ReceivedJob,
    kids: QueueRef,
    fan: u64,
    page_size: usize,
    seen: Arc<AtomicU64>,
) -> Outcome {
    if job.flow.children_expected().is_some() {
        seen.fetch_add(1, Ordering::SeqCst);
        let (mut count, mut after) = (0u64, 0u64);
        loop {
            let page = match job.flow.children_page(after, page_size).await {
                Ok(page) => page,
                Err(error) => return Outcome::Failed(error.to_string()),
            };
            let Some(last) = page.last() else { break };
            after = last.sequence;
            count += page.len() as u64;
        }
        return Outcome::Done(count.to_string().into());
    }
    let children = (0..fan).map(|i| Job::new(format!("{}.{i}", job.id), ""));
    for result in job.flow.spawn_batch(&kids, children).await {
        if let Err(error) = result {
            return Outcome::Failed(error.to_string());
        }
    }
    Outcome::Continue(Box::new(Job::new(format!("{}.k", job.id), "")))
}

#[tokio::test]
async fn a_fan_out_survives_a_dispatcher_restart_and_a_nats_restart() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let nc = connect(&nats).await?;
    let client = Client::new(nc.clone());
    let (parents, kids) = (
        QueueRef::new("test", "parents"),
        QueueRef::new("test", "kids"),
    );
    for queue in [&parents, &kids] {
        admin::ensure_queue(client.jetstream(), queue, &QueueSettings::default()).await?;
    }
    let served = vec![parents.clone(), kids.clone()];
    let first = dispatcher(nc.clone(), served.clone());
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let continuations = Arc::new(AtomicU64::new(0));
    let seen = continuations.clone();
    let kids_queue = kids.clone();
    worker(&client, &parents, &stop, move |job: ReceivedJob| {
        fan_out_parent(job, kids_queue.clone(), CHILDREN, 500, seen.clone())
    });
    worker(&client, &kids, &stop, |job: ReceivedJob| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Outcome::Done(job.payload)
    });
    client.submit(&parents, Job::new("fan", "")).await?;
    let counted = |client: Client| async move {
        flow::child_count(
            &client.jetstream().client(),
            &QueueRef::new("test", "parents"),
            "fan",
        )
        .await
        .map(|(count, _)| count.count)
        .unwrap_or(0)
    };
    wait_for(DEADLINE, "some children counted", || {
        let client = client.clone();
        async move { counted(client).await > 0 }
    })
    .await?;
    // The dispatcher stops mid-fan-out; children keep finishing meanwhile.
    first.cancel();
    nats.restart().await?;
    let second = dispatcher(nc.clone(), served);
    let _second = second.drop_guard();
    let result = wait_for_some(DEADLINE, "the parent's outcome", || async {
        client.result(&parents, "fan").await.ok().flatten()
    })
    .await?;
    assert_eq!(
        result,
        JobResult::Completed {
            id: "fan".into(),
            result: CHILDREN.to_string().into()
        }
    );
    assert_eq!(
        continuations.load(Ordering::SeqCst),
        1,
        "the continuation ran once"
    );
    assert_eq!(
        counted(client.clone()).await,
        CHILDREN,
        "every child counted once"
    );
    Ok(())
}

#[tokio::test]
async fn the_dispatcher_releases_a_dependent() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let nc = connect(&nats).await?;
    let client = Client::new(nc.clone());
    let queue = QueueRef::new("test", "deps");
    admin::ensure_queue(client.jetstream(), &queue, &QueueSettings::default()).await?;
    let _dispatcher = dispatcher(nc, vec![queue.clone()]).drop_guard();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    worker(&client, &queue, &stop, |job: ReceivedJob| async move {
        Outcome::Done(job.id.into())
    });
    let after = Dependency::on(JobRef::new("test", "deps", "first"));
    let waiter = client.clone();
    let dependent = tokio::spawn({
        let queue = queue.clone();
        async move {
            waiter
                .submit_and_wait(&queue, Job::new("second", "").after(after), DEADLINE)
                .await
        }
    });
    wait_for(DEADLINE, "the dependent waiting", || async {
        client.waiting(&queue).await.ok() == Some(1)
    })
    .await?;
    client.submit(&queue, Job::new("first", "")).await?;
    let result = dependent.await??;
    assert_eq!(
        result,
        JobResult::Completed {
            id: "second".into(),
            result: "second".into()
        }
    );
    Ok(())
}

/// 10,000 children while a children's worker is killed mid-run (its task aborted: nothing
/// acked, nothing recorded for its running jobs), the dispatcher is stopped and started again
/// and nats-server restarts: the continuation runs exactly once and sees 10,000 results; the
/// children that ran twice are counted once (and printed).
#[tokio::test]
async fn ten_thousand_children_through_a_killed_worker_and_restarts() -> anyhow::Result<()> {
    const FAN: u64 = 10_000;
    let mut nats = NatsServer::start().await?;
    let nc = connect(&nats).await?;
    let client = Client::new(nc.clone());
    let (parents, kids) = (
        QueueRef::new("test", "big"),
        QueueRef::new("test", "leaves"),
    );
    admin::ensure_queue(client.jetstream(), &parents, &QueueSettings::default()).await?;
    let quick = QueueSettings {
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    admin::ensure_queue(client.jetstream(), &kids, &quick).await?;
    let served = vec![parents.clone(), kids.clone()];
    let first = dispatcher(nc.clone(), served.clone());
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let continuations = Arc::new(AtomicU64::new(0));
    let (seen, kids_queue) = (continuations.clone(), kids.clone());
    worker(&client, &parents, &stop, move |job: ReceivedJob| {
        fan_out_parent(job, kids_queue.clone(), FAN, 1000, seen.clone())
    });
    let runs = Arc::new(AtomicU64::new(0));
    let leaf = |runs: Arc<AtomicU64>| {
        move |job: ReceivedJob| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Outcome::Done(job.payload)
            }
        }
    };
    // The worker that is killed: a task of its own, aborted mid-run.
    let doomed = Worker::new(client.jetstream().clone(), kids.clone())
        .options(WorkerOptions {
            concurrency: 16,
            poll_wait: Duration::from_millis(300),
            pod_name: "doomed".into(),
            ..Default::default()
        })
        .handler(leaf(runs.clone()));
    let killed = tokio::spawn(async move { doomed.run(std::future::pending()).await });
    client.submit(&parents, Job::new("big", "")).await?;
    let counted = |client: Client| async move {
        flow::child_count(
            &client.jetstream().client(),
            &QueueRef::new("test", "big"),
            "big",
        )
        .await
        .map(|(count, _)| count.count)
        .unwrap_or(0)
    };
    wait_for(DEADLINE, "a tenth of the children counted", || {
        let client = client.clone();
        async move { counted(client).await >= FAN / 10 }
    })
    .await?;
    killed.abort();
    worker(&client, &kids, &stop, leaf(runs.clone()));
    first.cancel();
    // Children go on finishing (and being recorded) while no dispatcher counts them.
    wait_for(DEADLINE, "half the children run", || {
        let runs = runs.clone();
        async move { runs.load(Ordering::SeqCst) >= FAN / 2 }
    })
    .await?;
    nats.restart().await?;
    let _second = dispatcher(nc.clone(), served).drop_guard();
    let result = wait_for_some(Duration::from_secs(240), "the parent's outcome", || async {
        client.result(&parents, "big").await.ok().flatten()
    })
    .await?;
    assert_eq!(
        result,
        JobResult::Completed {
            id: "big".into(),
            result: FAN.to_string().into()
        }
    );
    assert_eq!(
        continuations.load(Ordering::SeqCst),
        1,
        "the continuation ran once"
    );
    assert_eq!(
        counted(client.clone()).await,
        FAN,
        "every child counted once"
    );
    let runs = runs.load(Ordering::SeqCst);
    assert!(runs >= FAN, "every child ran");
    println!("children run twice (counted once): {}", runs - FAN);
    Ok(())
}
