//! Safe scale-down: three pods, one of them busy with a long job; when the backlog falls to
//! that one job, the scaler marks the idle pods cheapest to delete, so the ReplicaSet removes
//! them and the busy pod finishes its job without a redelivery. The pods' grace period is
//! shorter than the long job, so killing the busy pod would give its job back (redelivered).
//! The scale-down delay outlasts the first readiness probe period (5 s): the ReplicaSet
//! deletes not-ready pods before it looks at deletion costs, as in Kubernetes.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use worker_env::{Env, NS};

fn queue() -> String {
    JobQueue::test("mixed").timeout("60s").yaml()
}

/// An exec handler that sleeps for as many seconds as its job's payload says.
const SLEEP_PAYLOAD_SECONDS: [&str; 3] = [
    "python3",
    "-c",
    "import sys, time; time.sleep(float(sys.stdin.read()))",
];

// Each job's payload is how long it sleeps; one job per pod at a time.
fn worker() -> String {
    Worker::test("mixed")
        .exec(&SLEEP_PAYLOAD_SECONDS)
        .scaled(0..=3)
        .backlog_per_pod(1)
        .scale_down_after("6s")
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(8)
        .yaml()
}

#[tokio::test]
async fn scale_down_removes_idle_pods_and_keeps_the_busy_one() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "mixed");
    env.wait_stream(&queue.stream()).await;

    let js = env.jetstream().await;
    for seconds in ["20", "0.2", "0.2"] {
        js.publish(queue.job_subject(0), seconds.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    env.wait_worker("mixed", Duration::from_secs(10), "3 desired pods", |w| {
        w.status
            .as_ref()
            .filter(|s| s.desired_replicas == Some(3))
            .map(|_| ())
    })
    .await;
    env.wait_worker(
        "mixed",
        Duration::from_secs(30),
        "scale-down to the busy pod",
        |w| {
            w.status
                .as_ref()
                .filter(|s| s.desired_replicas == Some(1))
                .map(|_| ())
        },
    )
    .await;

    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let live = ListParams::default().labels("conveyor.dev/worker=mixed");
    wait_for(Duration::from_secs(20), "one pod left", || async {
        pods.list(&live).await.is_ok_and(|l| l.items.len() == 1)
    })
    .await
    .unwrap();
    let survivor = pods.list(&live).await.unwrap().items.remove(0);
    let cost = survivor
        .metadata
        .annotations
        .unwrap_or_default()
        .remove("controller.kubernetes.io/pod-deletion-cost");
    assert_eq!(cost.as_deref(), Some("100"), "the busy pod was kept");

    wait_for(Duration::from_secs(30), "every job acked", || async {
        consumer_info(&js, &queue)
            .await
            .is_some_and(|i| i.ack_floor.stream_sequence == 3 && i.num_ack_pending == 0)
    })
    .await
    .unwrap();
    let info = consumer_info(&js, &queue).await.unwrap();
    assert_eq!(info.num_redelivered, 0, "no job was given back: {info:?}");
    let described = env.kubectl(&["describe", "worker", "mixed"]).await;
    assert!(described.contains("ScaledDown"), "{described}");
    env.shutdown().await;
}

async fn consumer_info(
    js: &async_nats::jetstream::Context,
    queue: &QueueRef,
) -> Option<async_nats::jetstream::consumer::Info> {
    let consumer = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            queue.consumer(0),
            queue.stream(),
        )
        .await
        .ok()?;
    Some(consumer.cached_info().clone())
}
