//! R3 queues on a real 3-node JetStream cluster (`conveyor_testkit::NatsCluster`): the assets a
//! `JobQueue` with `stream.replicas: 3` asks for, figures that are the stream and consumer
//! leaders' (never a follower's stale view, kedacore/keda#3860) from whichever node a client is
//! attached to, and 50,000 jobs worked by SDK worker loops while the stream leader's server is
//! SIGKILLed and restarted twice: none lost, duplicates counted.
//!
//! The failover run is SDK-level (the operator's figures code and the SDK's `Worker` and
//! `Client`, no Kubernetes test double): the worker pods of an operator-level run would add
//! nothing to what rides through the failover but minutes of process start-up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, Summary, WorkerError, WorkerOptions};
use conveyor::{Client, Job, Worker};
use conveyor_crds::JobQueueSpec;
use conveyor_operator::assets::{self, Figures, QueueAssets};
use conveyor_testkit::cluster::NODES;
use conveyor_testkit::{NatsCluster, wait_for};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Jobs of the failover run.
const JOBS: usize = 50_000;

/// Deadline of each of the failover run's waits on a busy 2-core machine, debug build (a
/// quiet run takes 40 s in all), cut to what is left of [`RUN_BUDGET`].
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// The whole failover run's time, under the runner's 300 s kill (which prints nothing): a
/// stalled wait fails with what it saw however late in the run it stalls.
const RUN_BUDGET: Duration = Duration::from_secs(270);

/// The deadline of the next wait of a run that started at `start`.
fn next_deadline(start: Instant) -> Duration {
    RUN_DEADLINE.min(RUN_BUDGET.saturating_sub(start.elapsed()))
}

/// Deadline of shorter waits (a leader election, figures settling).
const DEADLINE: Duration = Duration::from_secs(30);

fn spec(yaml: &str) -> JobQueueSpec {
    serde_yaml::from_str(yaml).expect("a JobQueue spec")
}

/// The JetStream assets of an R3 queue, created on `cluster`.
async fn r3_queue(js: &jetstream::Context, name: &str, yaml: &str) -> QueueAssets {
    let queue = QueueRef::new("team", name);
    let desired = assets::desired(&queue, &spec(yaml)).expect("valid assets");
    // A cluster that just formed may still count a peer as offline for a moment ("no suitable
    // peers for placement"): the operator retries the same way on its next reconcile.
    let last = Mutex::new(None);
    let ensured = wait_for(DEADLINE, "the R3 assets created", || async {
        match assets::ensure(js, &desired).await {
            Ok(_) => true,
            Err(e) => {
                *last.lock().unwrap() = Some(format!("{e:?}"));
                false
            }
        }
    })
    .await;
    ensured.unwrap_or_else(|e| panic!("{e}: last error {:?}", last.lock().unwrap()));
    desired
}

/// A JetStream context on a client attached to node `i` only.
async fn on_node(cluster: &NatsCluster, i: usize) -> jetstream::Context {
    jetstream::new(
        async_nats::connect(cluster.node_url(i))
            .await
            .expect("connect to one node"),
    )
}

/// Waits until the figures read through `js` are `expected`; the last reading otherwise.
async fn figures_become(
    js: &jetstream::Context,
    assets: &QueueAssets,
    expected: Figures,
) -> Result<(), Option<Figures>> {
    let start = Instant::now();
    loop {
        let last = assets::figures(js, assets).await.ok();
        if last == Some(expected) {
            return Ok(());
        }
        if start.elapsed() > DEADLINE {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn r3_figures_are_the_leaders_from_every_node_and_after_a_leader_change() {
    let mut cluster = NatsCluster::start().await.expect("a 3-node cluster");
    let js = jetstream::new(cluster.client().await.unwrap());
    let assets = r3_queue(&js, "figures", "stream: {replicas: 3}").await;
    let queue = assets.queue.clone();

    let mut stream = js.get_stream(queue.stream()).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);
    let placement = info.cluster.expect("a clustered stream has placement");
    assert_eq!(
        placement.replicas.len(),
        NODES - 1,
        "the leader and two followers"
    );
    let consumer_name = queue.consumer(0);
    let consumer_info = stream.consumer_info(&consumer_name).await.unwrap();
    let consumer_placement = consumer_info.cluster.expect("a clustered consumer");
    assert_eq!(
        consumer_placement.replicas.len(),
        NODES - 1,
        "the consumer is replicated like its stream"
    );

    // 300 jobs; 100 taken and acked (each ack confirmed by the consumer leader), 20 taken and
    // held: 180 pending, 20 in flight.
    let client = Client::new(cluster.client().await.unwrap());
    for i in 0..300 {
        client
            .submit(&queue, Job::new(format!("job-{i}"), "x"))
            .await
            .expect("submit");
    }
    let consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&consumer_name).await.unwrap();
    let mut taken = Vec::new();
    let start = Instant::now();
    while taken.len() < 120 {
        assert!(
            start.elapsed() < DEADLINE,
            "120 jobs delivered, got {}",
            taken.len()
        );
        let mut batch = consumer
            .batch()
            .max_messages(120 - taken.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            taken.push(message.expect("a job"));
        }
    }
    for message in taken.drain(..100) {
        message.double_ack().await.expect("ack confirmed");
    }
    let expected = Figures {
        pending: 180,
        in_flight: 20,
    };

    // A client on a follower reads the leader's figures at once: JetStream API requests are
    // answered by the leaders, whichever node the client is attached to.
    for i in 0..NODES {
        let figures = assets::figures(&on_node(&cluster, i).await, &assets)
            .await
            .unwrap();
        assert_eq!(
            figures,
            expected,
            "figures read through node {}",
            cluster.server_name(i)
        );
    }

    // The consumer leader's server crashes: a new leader takes over with the same state.
    let old_leader = cluster
        .consumer_leader(&js, &queue.stream(), &consumer_name)
        .await
        .unwrap();
    cluster.kill(old_leader).unwrap();
    // Only a running node can be named: a consumer leader is elected among the survivors.
    cluster
        .consumer_leader(&js, &queue.stream(), &consumer_name)
        .await
        .unwrap();
    for i in (0..NODES).filter(|&i| i != old_leader) {
        let node = on_node(&cluster, i).await;
        if let Err(last) = figures_become(&node, &assets, expected).await {
            panic!(
                "figures through node {} after the leader change: {last:?}, expected \
                 {expected:?}",
                cluster.server_name(i)
            );
        }
    }

    // The crashed node comes back as a follower, behind on nothing once healthy: a client
    // attached to it reads the leader's figures, not its own.
    cluster.restart(old_leader).await.unwrap();
    let figures = assets::figures(&on_node(&cluster, old_leader).await, &assets)
        .await
        .unwrap();
    assert_eq!(figures, expected, "figures through the restarted node");
}

/// Times each job was handled, by id, and the total.
#[derive(Default)]
struct Handled {
    by_id: Mutex<HashMap<String, u32>>,
    total: AtomicU64,
}

impl Handled {
    fn record(&self, id: &str) {
        *self.by_id.lock().unwrap().entry(id.to_owned()).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn unique(&self) -> usize {
        self.by_id.lock().unwrap().len()
    }

    fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// An SDK worker loop on its own connection to the cluster.
async fn spawn_worker(
    cluster: &NatsCluster,
    queue: &QueueRef,
    handled: &Arc<Handled>,
    pod: &str,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<Result<Summary, WorkerError>> {
    let js = jetstream::new(cluster.client().await.expect("worker connects"));
    let handled = handled.clone();
    let worker = Worker::new(js, queue.clone())
        .options(WorkerOptions {
            concurrency: 64,
            poll_wait: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(5),
            pod_name: pod.into(),
            ..Default::default()
        })
        .handler(move |job: ReceivedJob| {
            handled.record(&job.id);
            async { Outcome::Done(Default::default()) }
        });
    let stop = stop.clone();
    tokio::spawn(async move { worker.run(async move { stop.cancelled().await }).await })
}

/// Jobs the producer may submit before each kill, then after the second: the next part is
/// let go at each kill, so jobs are submitted while the leader is gone and there is work to flow
/// after it however fast the workers drained what came before.
const RELEASED: [usize; 3] = [17_000, 34_000, JOBS];

/// Handled jobs (unique) at which each kill happens: half of what the producer may submit by
/// then, so the queue holds work when its leader dies.
const KILL_AT: [usize; 2] = [8_000, 25_000];

/// Submits job-0 … job-{JOBS-1} in batches, each once `released` lets it go, resubmitting (same
/// id, so deduplicated) every job whose submission failed with a retryable error, counting
/// accepted ones in `accepted`; returns how many submissions failed.
async fn produce(
    client: Client,
    queue: QueueRef,
    accepted: Arc<AtomicUsize>,
    mut released: tokio::sync::watch::Receiver<usize>,
) -> usize {
    let mut failed = 0;
    let mut waiting: Vec<usize> = (0..JOBS).collect();
    // Counted from the last part let go: before that, waiting for it is not a stall.
    let mut since = Instant::now();
    while !waiting.is_empty() {
        assert!(
            since.elapsed() < RUN_DEADLINE,
            "{} jobs still not accepted {RUN_DEADLINE:?} after the last part was let go",
            waiting.len()
        );
        let mut retry = Vec::new();
        for chunk in waiting.chunks(1000) {
            let last = chunk.iter().max().copied().unwrap_or_default();
            if *released.borrow() <= last {
                released
                    .wait_for(|&released| last < released)
                    .await
                    .expect("the test lets every job go before it ends");
                since = Instant::now();
            }
            let jobs: Vec<Job> = chunk
                .iter()
                .map(|i| Job::new(format!("job-{i}"), "x"))
                .collect();
            for (i, result) in chunk.iter().zip(client.submit_batch(&queue, jobs).await) {
                match result {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) if error.is_retryable() => {
                        failed += 1;
                        retry.push(*i);
                    }
                    Err(error) => panic!("job-{i} refused for good: {error}"),
                }
            }
        }
        waiting = retry;
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_jobs_survive_two_stream_leader_kills() {
    let run_start = Instant::now();
    let mut cluster = NatsCluster::start().await.expect("a 3-node cluster");
    let js = jetstream::new(cluster.client().await.unwrap());
    // A short timeout, so a job whose ack died with a server comes back soon; attempts to
    // spare, so no job is dead-lettered by the failovers.
    let assets = r3_queue(
        &js,
        "failover",
        "stream: {replicas: 3}\ntimeout: 5s\nretry: {maxAttempts: 20}",
    )
    .await;
    let queue = assets.queue.clone();

    let handled = Arc::new(Handled::default());
    let stop = CancellationToken::new();
    let workers = [
        spawn_worker(&cluster, &queue, &handled, "worker-a", &stop).await,
        spawn_worker(&cluster, &queue, &handled, "worker-b", &stop).await,
    ];
    let accepted = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(RELEASED[0]);
    let producer = tokio::spawn(produce(
        Client::new(cluster.client().await.unwrap()),
        queue.clone(),
        accepted.clone(),
        released,
    ));
    // What a stalled wait reports: who stopped, the producer or the workers, and what the
    // stream and its consumer hold.
    let stalled = |what: String| {
        let (js, queue, handled, accepted) = (&js, &queue, &handled, &accepted);
        async move {
            let state = match js.get_stream(queue.stream()).await {
                Ok(mut stream) => {
                    let stream_state = stream.info().await.map(|i| {
                        (
                            i.state.messages,
                            i.cluster.as_ref().and_then(|c| c.leader.clone()),
                        )
                    });
                    let consumer = stream.consumer_info(queue.consumer(0)).await.map(|c| {
                        (
                            c.num_pending,
                            c.num_ack_pending,
                            c.num_waiting,
                            c.num_redelivered,
                        )
                    });
                    format!(
                        "stream (messages, leader) {stream_state:?}; consumer (pending, \
                         ack pending, waiting requests, redelivered) {consumer:?}"
                    )
                }
                Err(error) => format!("stream unreadable: {error}"),
            };
            panic!(
                "{what}: {} jobs handled ({} unique), {} accepted by the stream; {state}",
                handled.total(),
                handled.unique(),
                accepted.load(Ordering::Relaxed)
            )
        }
    };

    for (round, mark) in (1..=2).zip(KILL_AT) {
        if let Err(error) = wait_for(
            next_deadline(run_start),
            &format!("{mark} jobs handled before kill {round}"),
            || async { handled.unique() >= mark },
        )
        .await
        {
            stalled(error.to_string()).await;
        }
        let leader = cluster.stream_leader(&js, &queue.stream()).await.unwrap();
        let before = handled.unique();
        cluster.kill(leader).unwrap();
        let killed = Instant::now();
        release.send_replace(RELEASED[round]);
        if let Err(error) = wait_for(
            next_deadline(run_start),
            &format!("work to flow again after kill {round}"),
            || async { handled.unique() >= before + 1000 },
        )
        .await
        {
            stalled(error.to_string()).await;
        }
        let flowing = killed.elapsed();
        // A survivor leads the stream (only running nodes can be named).
        let new_leader = cluster.stream_leader(&js, &queue.stream()).await.unwrap();
        cluster.restart(leader).await.unwrap();
        println!(
            "kill {round}: stream leader {} SIGKILLed at {before} jobs handled; 1,000 more \
             handled {flowing:.2?} later (new leader {}); back and healthy {:.2?} after the kill",
            cluster.server_name(leader),
            cluster.server_name(new_leader),
            killed.elapsed()
        );
    }

    let failed_submissions = match tokio::time::timeout(next_deadline(run_start), producer).await {
        Ok(finished) => finished.expect("the producer finished"),
        Err(_) => stalled("the producer still submitting".into()).await,
    };
    if let Err(error) = wait_for(next_deadline(run_start), "every job handled", || async {
        handled.unique() >= JOBS
    })
    .await
    {
        stalled(error.to_string()).await;
    }
    if let Err(last) = figures_become(&js, &assets, Figures::default()).await {
        panic!("figures after the run: {last:?}, expected an empty queue");
    }
    stop.cancel();
    for worker in workers {
        worker
            .await
            .expect("worker task")
            .expect("worker stops cleanly");
    }

    let by_id = handled.by_id.lock().unwrap().clone();
    let lost: Vec<String> = (0..JOBS)
        .map(|i| format!("job-{i}"))
        .filter(|id| !by_id.contains_key(id))
        .collect();
    let duplicates = handled.total() - by_id.len() as u64;
    println!(
        "{JOBS} jobs: {} handled once or more, {duplicates} duplicate deliveries handled, {} \
         jobs handled more than once, {failed_submissions} submissions failed and were resubmitted",
        by_id.len(),
        by_id.values().filter(|&&n| n > 1).count()
    );
    assert!(
        lost.is_empty(),
        "{} jobs lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(by_id.len(), JOBS, "only submitted jobs were handled");
    let mut dead_letters = js.get_stream(queue.dead_letter_stream()).await.unwrap();
    assert_eq!(
        dead_letters.info().await.unwrap().state.messages,
        0,
        "no job was dead-lettered by the failovers"
    );
}
