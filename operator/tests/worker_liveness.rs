//! A worker whose NATS client died and that cannot connect a new one is restarted by its
//! liveness probe (issue #18). Through the test double with the real runtime: the worker pod
//! reaches NATS through a relay; the relay stops taking new connections, then a job with a bare
//! CR in a header panics async-nats 0.51's connection task in the runtime. The runtime tries
//! to replace its client, cannot, and fails `/healthz` until the kubelet replaces the
//! container; once the relay lets connections through again, the fresh runtime dead-letters
//! the poison as `malformed` and every good job completes.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::proxy::Relay;
use conveyor_testkit::raw::RawPublisher;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use worker_env::{Env, NS};

fn queue_yaml(url: &str) -> String {
    JobQueue::test("lonely")
        .nats_url(url)
        .timeout("3s")
        .max_attempts(5)
        .yaml()
}

fn worker() -> String {
    Worker::test("lonely")
        .replicas(1)
        .concurrency(4)
        .exec(&["sh", "-c", "cat >/dev/null"])
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(2)
        .yaml()
}

async fn restarts(env: &Env) -> i32 {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let list = pods
        .list(&ListParams::default().labels("conveyor.dev/worker=lonely"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .map(|c| c.restart_count)
        .sum()
}

#[tokio::test]
async fn a_worker_that_cannot_replace_its_dead_client_is_restarted_by_its_probe() {
    let env = Env::start().await;
    let relay = Relay::start(env.nats.port()).await.unwrap();
    env.apply(&queue_yaml(&relay.url())).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "lonely");
    env.wait_stream(&queue.stream()).await;
    env.wait_worker("lonely", Duration::from_secs(60), "a ready pod", |w| {
        w.status
            .as_ref()
            .filter(|s| s.ready_replicas == 1)
            .map(|_| ())
    })
    .await;
    assert_eq!(restarts(&env).await, 0);

    // Connections made so far keep working; no new one gets through.
    relay.set_open(false);
    let mut raw = RawPublisher::connect(env.nats.port()).await.unwrap();
    let block = b"NATS/1.0\r\nNats-Msg-Id: poison-1\r\nX-Note: line1\rline2\r\n\r\n";
    raw.publish(&queue.job_subject(0), Some(block), b"poison")
        .await
        .unwrap()
        .sequence()
        .expect("the server stores it");

    // Liveness: 3 failures 10 s apart, then the kubelet replaces the container.
    wait_for(
        Duration::from_secs(120),
        "the container restarted by its liveness probe",
        || async { restarts(&env).await >= 1 },
    )
    .await
    .unwrap();
    let killing = env
        .kubectl(&[
            "get",
            "events",
            "-n",
            NS,
            "-o",
            "custom-columns=R:.reason,M:.message",
        ])
        .await;
    assert!(
        killing.contains("failed liveness probe"),
        "the probe restarted it: {killing}"
    );

    relay.set_open(true);
    let client = Client::connect(&env.nats.url()).await.unwrap();
    let good: Vec<Job> = (0..20)
        .map(|i| Job::new(format!("good-{i}"), "x"))
        .collect();
    for result in client.submit_batch(&queue, good).await {
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
    let letters = conveyor::dlq::list(
        &env.jetstream().await,
        &queue,
        &conveyor::dlq::Selector::All,
        10,
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].job_id, "poison-1");
    assert_eq!(letters[0].reason, "malformed");
    env.shutdown().await;
}
