//! The job that used to wedge a whole pool (issue #18): a header value with a bare CR panics
//! async-nats 0.51's connection task in whichever worker it reaches. Through the test double,
//! with two worker pods running the real runtime: the job is dead-lettered as `malformed`
//! with its original header block kept, every good job submitted beside it completes, and the
//! pods stay Ready — the runtime replaced its dead client instead of pulling into it forever.

mod worker_env;

use std::time::Duration;

use base64::Engine as _;
use conveyor::names::QueueRef;
use conveyor::protocol::{self, record};
use conveyor::{Client, Job};
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::raw::RawPublisher;
use conveyor_testkit::wait_for;
use futures::StreamExt;
use worker_env::{Env, NS};

fn queue() -> String {
    JobQueue::test("poison")
        .timeout("3s")
        .max_attempts(5)
        .yaml()
}

fn worker() -> String {
    Worker::test("poison")
        .replicas(2)
        .concurrency(4)
        .exec(&["sh", "-c", "cat >/dev/null"])
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(2)
        .yaml()
}

#[tokio::test]
async fn a_job_that_panics_the_nats_client_is_dead_lettered_and_the_pool_keeps_working() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "poison");
    env.wait_stream(&queue.stream()).await;
    env.wait_worker("poison", Duration::from_secs(60), "two ready pods", |w| {
        w.status
            .as_ref()
            .filter(|s| s.ready_replicas == 2)
            .map(|_| ())
    })
    .await;

    let client = Client::connect(&env.nats.url()).await.unwrap();
    let good = |range: std::ops::Range<u32>| {
        range
            .map(|i| Job::new(format!("good-{i}"), "x"))
            .collect::<Vec<_>>()
    };
    for result in client.submit_batch(&queue, good(0..40)).await {
        result.unwrap();
    }
    let mut raw = RawPublisher::connect(env.nats.port()).await.unwrap();
    let block = b"NATS/1.0\r\nNats-Msg-Id: poison-1\r\nX-Note: line1\rline2\r\n\r\n";
    let answer = raw
        .publish(&queue.job_subject(0), Some(block), b"poison")
        .await
        .unwrap();
    let sequence = answer.sequence().expect("the server stores it");
    for result in client.submit_batch(&queue, good(40..80)).await {
        result.unwrap();
    }

    wait_for(
        Duration::from_secs(120),
        "every good job done and the poison dead-lettered",
        || async {
            env.stream_messages(&queue.stream()).await == 0
                && env.stream_messages(&queue.dead_letter_stream()).await == 1
        },
    )
    .await
    .unwrap();

    let js = env.jetstream().await;
    let dlq = js.get_stream(queue.dead_letter_stream()).await.unwrap();
    let letter = dlq
        .get_last_raw_message_by_subject(&queue.dead_letter_subject())
        .await;
    let letter = letter.unwrap();
    let get = |name: &str| {
        letter
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(get(protocol::dead_letter::REASON), "malformed");
    assert_eq!(get(protocol::dead_letter::JOB_ID), "poison-1");
    assert_eq!(
        get(protocol::dead_letter::SEQUENCE),
        sequence.to_string(),
        "the dead letter names the job's sequence"
    );
    assert!(
        get(protocol::dead_letter::ERROR).contains("X-Note: value contains a CR"),
        "{}",
        get(protocol::dead_letter::ERROR)
    );
    let kept = base64::engine::general_purpose::STANDARD
        .decode(get(record::ORIGINAL_HEADERS))
        .unwrap();
    assert_eq!(
        kept, block,
        "the original header block is kept byte for byte"
    );
    assert_eq!(letter.payload.as_ref(), b"poison");

    // Nothing of the good jobs went to the dead-letter stream (it holds the poison only), and
    // the pool is still Ready.
    env.wait_worker("poison", Duration::from_secs(30), "two ready pods", |w| {
        w.status
            .as_ref()
            .filter(|s| s.ready_replicas == 2)
            .map(|_| ())
    })
    .await;
    let mut later = client
        .jetstream()
        .client()
        .subscribe("_INBOX.poison.after")
        .await
        .unwrap();
    let job = Job::new("after", "x").header(protocol::REPLY_TO, "_INBOX.poison.after");
    client.submit(&queue, job).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), later.next())
        .await
        .expect("a job submitted afterwards completes")
        .unwrap();
    let (_, outcome) = protocol::Outcome::decode(answer.headers.as_ref()).unwrap();
    assert_eq!(outcome, protocol::Outcome::Completed);
    env.shutdown().await;
}
