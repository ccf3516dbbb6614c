//! The dispatcher against a real `nats-server`: jobs whose worker dies on every delivery (a
//! puller that never acks) end in the dead-letter queue exactly once — with the dispatcher
//! running, started only after they exhausted, killed and restarted mid-run, and across a
//! NATS restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use conveyor::admin::{self, QueueSettings};
use conveyor::dlq::{self, REASON_MAX_DELIVERIES, Selector};
use conveyor::names::{DISPATCHER_CONSUMER, QueueRef};
use conveyor::protocol;
use conveyor_operator::dispatcher::{Dispatcher, Failure};
use conveyor_testkit::{NatsServer, stream_messages, wait_for};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

async fn connect(server: &NatsServer) -> async_nats::Client {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(server.url())
        .await
        .unwrap();
    wait_for(DEADLINE, "the client to connect", || async {
        client.connection_state() == async_nats::connection::State::Connected
    })
    .await
    .unwrap();
    client
}

/// A queue whose jobs are given up after 2 deliveries of 1 s each.
async fn queue(js: &jetstream::Context, name: &str) -> QueueRef {
    let queue = QueueRef::new("test", name);
    let settings = QueueSettings {
        max_attempts: 2,
        timeout: Duration::from_secs(1),
        ..Default::default()
    };
    admin::ensure_queue(js, &queue, &settings).await.unwrap();
    queue
}

async fn submit(js: &jetstream::Context, queue: &QueueRef, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(protocol::MSG_ID, id.as_str());
        js.publish_with_headers(queue.job_subject(0), headers, id.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

fn ids(prefix: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// A worker that takes every job and dies before answering: it pulls and never acks.
fn crashing_worker(js: jetstream::Context, queue: &QueueRef) -> JoinHandle<()> {
    let (stream, consumer) = (queue.stream(), queue.consumer(0));
    tokio::spawn(async move {
        let consumer: PullConsumer = loop {
            match js.get_consumer_from_stream(&consumer, &stream).await {
                Ok(consumer) => break consumer,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        loop {
            let Ok(mut batch) = consumer
                .batch()
                .max_messages(100)
                .expires(Duration::from_millis(500))
                .messages()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Some(message) = batch.next().await {
                drop(message);
            }
        }
    })
}

/// A dispatcher serving `queue` (as the operator's serves the JobQueues of its store).
fn dispatcher(client: async_nats::Client, queue: &QueueRef) -> (CancellationToken, JoinHandle<()>) {
    let (stop, run, _) = reporting_dispatcher(client, queue);
    (stop, run)
}

/// A dispatcher serving `queue`, and the failures it reports.
fn reporting_dispatcher(
    client: async_nats::Client,
    queue: &QueueRef,
) -> (CancellationToken, JoinHandle<()>, mpsc::Receiver<Failure>) {
    let stop = CancellationToken::new();
    let served = queue.clone();
    let (report, failures) = mpsc::channel(16);
    let run = Dispatcher::new(client, Arc::new(move || vec![served.clone()]))
        .interval(Duration::from_millis(200))
        .report(report)
        .run(stop.clone());
    (stop, tokio::spawn(run), failures)
}

/// Waits until `count` dead letters exist and nothing is left to move: the work stream is
/// empty and every advisory is acked. Then no later dead letter can appear.
async fn settled(js: &jetstream::Context, queue: &QueueRef, count: u64) {
    wait_for(
        DEADLINE,
        "every job dead-lettered and every advisory acked",
        || async {
            if stream_messages(js, &queue.dead_letter_stream()).await < count
                || stream_messages(js, &queue.stream()).await != 0
                || stream_messages(js, &queue.events_stream()).await != 0
            {
                return false;
            }
            let consumer: Result<PullConsumer, _> = js
                .get_consumer_from_stream(DISPATCHER_CONSUMER, queue.events_stream())
                .await;
            let Ok(consumer) = consumer else {
                return false;
            };
            let info = consumer.cached_info();
            info.num_pending == 0 && info.num_ack_pending == 0
        },
    )
    .await
    .unwrap();
}

/// Every id appears exactly once in the dead-letter queue, as a `max_deliveries` dead letter.
async fn exactly_once(js: &jetstream::Context, queue: &QueueRef, expected: &[String]) {
    let entries = dlq::list(js, queue, &Selector::All, usize::MAX)
        .await
        .unwrap();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for entry in &entries {
        assert_eq!(entry.reason, REASON_MAX_DELIVERIES, "{entry:?}");
        assert_eq!(entry.attempts, Some(2), "{entry:?}");
        assert_eq!(entry.pod, "unknown");
        *counts.entry(entry.job_id.clone()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "dead-lettered more than once: {twice:?}");
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(counts.into_keys().collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn a_job_whose_worker_dies_on_every_delivery_is_dead_lettered_once() {
    let server = NatsServer::start().await.unwrap();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let queue = queue(&js, "crash").await;
    let (stop, running) = dispatcher(client.clone(), &queue);
    let crasher = crashing_worker(js.clone(), &queue);

    let mut headers = async_nats::HeaderMap::new();
    headers.insert(protocol::MSG_ID, "poison");
    headers.insert("X-Trace", "t-1");
    js.publish_with_headers(queue.job_subject(0), headers, "payload".into())
        .await
        .unwrap()
        .await
        .unwrap();

    settled(&js, &queue, 1).await;
    exactly_once(&js, &queue, &["poison".to_owned()]).await;
    let job = dlq::show(&js, &queue, "poison").await.unwrap();
    assert_eq!(job.payload, "payload");
    assert_eq!(job.headers.get("X-Trace").unwrap().as_str(), "t-1");
    assert_eq!(
        job.headers.get(protocol::MSG_ID).unwrap().as_str(),
        format!(
            "poison:{}",
            job.headers.get(protocol::dead_letter::SEQUENCE).unwrap()
        )
    );
    assert!(
        job.entry
            .error
            .contains("no handler reported in 2 deliveries")
    );
    assert_eq!(job.entry.subject, queue.job_subject(0));
    // The outcome is stored for producers that fetch it later.
    let stored = conveyor::Client::new(client.clone())
        .result(&queue, "poison")
        .await
        .unwrap();
    match stored {
        Some(conveyor::JobResult::DeadLettered { reason, .. }) => {
            assert_eq!(reason, "max_deliveries");
        }
        other => panic!("expected a stored dead-lettered outcome: {other:?}"),
    }

    crasher.abort();
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn jobs_exhausted_while_no_dispatcher_runs_are_dead_lettered_when_it_starts() {
    let server = NatsServer::start().await.unwrap();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let queue = queue(&js, "later").await;
    let crasher = crashing_worker(js.clone(), &queue);
    let jobs = ids("late", 0..20);
    submit(&js, &queue, jobs.clone()).await;

    wait_for(
        DEADLINE,
        "20 advisories kept in the events stream",
        || async { stream_messages(&js, &queue.events_stream()).await == 20 },
    )
    .await
    .unwrap();
    crasher.abort();
    assert_eq!(stream_messages(&js, &queue.dead_letter_stream()).await, 0);

    let (stop, running) = dispatcher(connect(&server).await, &queue);
    settled(&js, &queue, 20).await;
    exactly_once(&js, &queue, &jobs).await;
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn a_dispatcher_killed_mid_run_and_restarted_dead_letters_each_job_once() {
    let server = NatsServer::start().await.unwrap();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let queue = queue(&js, "restart").await;
    let crasher = crashing_worker(js.clone(), &queue);
    let mut jobs = ids("first", 0..20);

    // A dispatcher with its own connection, killed (task aborted, connection dropped) while
    // it is moving jobs.
    let first = connect(&server).await;
    let (_stop, running) = dispatcher(first.clone(), &queue);
    submit(&js, &queue, jobs.clone()).await;
    wait_for(DEADLINE, "the first dead letters", || async {
        stream_messages(&js, &queue.dead_letter_stream()).await >= 3
    })
    .await
    .unwrap();
    running.abort();
    let _ = running.await;
    drop(first);

    // More jobs exhaust while no dispatcher runs.
    let more = ids("second", 0..20);
    submit(&js, &queue, more.clone()).await;
    jobs.extend(more);

    let (stop, running) = dispatcher(connect(&server).await, &queue);
    settled(&js, &queue, 40).await;
    exactly_once(&js, &queue, &jobs).await;
    crasher.abort();
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn the_dispatcher_keeps_working_across_a_nats_restart() {
    let mut server = NatsServer::start().await.unwrap();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let queue = queue(&js, "nats-restart").await;
    let (stop, running) = dispatcher(connect(&server).await, &queue);
    let mut jobs = ids("before", 0..10);
    submit(&js, &queue, jobs.clone()).await;
    let crasher = crashing_worker(js.clone(), &queue);
    settled(&js, &queue, 10).await;
    crasher.abort();

    server.restart().await.unwrap();
    let crasher = crashing_worker(js.clone(), &queue);
    let more = ids("after", 0..10);
    // The client reconnects on its own; submissions right after the restart may need a retry.
    wait_for(DEADLINE, "the client to reconnect", || async {
        client.connection_state() == async_nats::connection::State::Connected
    })
    .await
    .unwrap();
    submit(&js, &queue, more.clone()).await;
    jobs.extend(more);
    settled(&js, &queue, 20).await;
    exactly_once(&js, &queue, &jobs).await;
    crasher.abort();
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn jobs_the_runtime_dead_lettered_itself_are_left_alone() {
    let server = NatsServer::start().await.unwrap();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let queue = queue(&js, "reported").await;
    let (stop, running) = dispatcher(client.clone(), &queue);
    let worker_stop = CancellationToken::new();
    let worker = conveyor::Worker::new(js.clone(), queue.clone())
        .options(conveyor::worker::WorkerOptions {
            concurrency: 4,
            poll_wait: Duration::from_millis(200),
            backoff: protocol::Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(10),
                ..Default::default()
            },
            pod_name: "pod-1".into(),
            ..Default::default()
        })
        .handler(|_job: conveyor::ReceivedJob| async {
            conveyor::Outcome::Failed("handler said no".into())
        });
    let token = worker_stop.clone();
    let worker = tokio::spawn(async move { worker.run(token.cancelled_owned()).await });
    let jobs = ids("failing", 0..10);
    submit(&js, &queue, jobs.clone()).await;

    settled(&js, &queue, 10).await;
    let entries = dlq::list(&js, &queue, &Selector::All, usize::MAX)
        .await
        .unwrap();
    let mut seen: Vec<String> = entries
        .iter()
        .inspect(|e| {
            assert_eq!(e.reason, "exhausted");
            assert_eq!(e.pod, "pod-1");
        })
        .map(|e| e.job_id.clone())
        .collect();
    seen.sort();
    assert_eq!(seen, jobs);
    worker_stop.cancel();
    worker.await.unwrap().unwrap();
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn a_job_that_cannot_be_dead_lettered_never_holds_up_the_others() {
    let server = NatsServer::start().await.unwrap();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let queue = queue(&js, "stuck").await;
    // The dead-letter stream refuses anything over 1 KiB: one job's copy can never be written.
    let mut config = js
        .get_stream(queue.dead_letter_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_message_size = 1024;
    js.update_stream(config).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(protocol::MSG_ID, "too-big");
    js.publish_with_headers(queue.job_subject(0), headers, vec![b'x'; 4096].into())
        .await
        .unwrap()
        .await
        .unwrap();
    submit(&js, &queue, ids("small", 0..5)).await;
    let (stop, running, mut failures) = reporting_dispatcher(client.clone(), &queue);
    let crasher = crashing_worker(js.clone(), &queue);

    // The small ones are dead-lettered while the big one's advisory keeps failing, and the big
    // one is never lost: it stays in the work stream.
    wait_for(DEADLINE, "the small jobs dead-lettered", || async {
        stream_messages(&js, &queue.dead_letter_stream()).await == 5
    })
    .await
    .unwrap();
    exactly_once(&js, &queue, &ids("small", 0..5)).await;
    assert_eq!(
        stream_messages(&js, &queue.stream()).await,
        1,
        "the big job is kept"
    );
    // It stays counted and named (what `conveyor dlq list` and the status show) ...
    let exhausted = dlq::exhausted(&js, &queue, 10).await.unwrap();
    assert_eq!(exhausted.count, 1, "{exhausted:?}");
    assert_eq!(exhausted.oldest.len(), 1);
    assert_eq!(exhausted.oldest[0].job_id, "too-big");
    assert!(!exhausted.oldest[0].since.is_empty());
    // ... and reported with the server's reason once it failed a few times in a row (the
    // operator turns that into a DeadLetterFailed Event).
    let failure = tokio::time::timeout(DEADLINE, failures.recv())
        .await
        .expect("a report in time")
        .expect("the dispatcher is running");
    assert_eq!(failure.queue, queue);
    assert_eq!(failure.sequence, exhausted.oldest[0].sequence);
    assert!(failure.error.contains("maximum"), "{}", failure.error);
    crasher.abort();
    stop.cancel();
    running.await.unwrap();
}
