//! Recycling under load: with `recycle.maxAge` of a few seconds, every original pod is deleted
//! gracefully and replaced while jobs flow, and every job is still acked; the test prints the
//! redeliveries (duplicates) it saw. Capacity never dips: whenever an old pod is going, as many
//! other pods are Ready as the pool wants (each replacement is Ready first, a surge pod).

mod worker_env;

use std::collections::BTreeSet;
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use worker_env::{Env, NS};

const JOBS: u64 = 40;

fn queue() -> String {
    JobQueue::test("steady").timeout("30s").yaml()
}

/// An exec handler that sleeps for as many seconds as its job's payload says.
const SLEEP_PAYLOAD_SECONDS: [&str; 3] = [
    "python3",
    "-c",
    "import sys, time; time.sleep(float(sys.stdin.read()))",
];

fn worker() -> String {
    Worker::test("steady")
        .replicas(2)
        .recycle_after("3s")
        .recycle_at_most(1)
        .exec(&SLEEP_PAYLOAD_SECONDS)
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(10)
        .yaml()
}

#[tokio::test]
async fn every_pod_is_recycled_and_no_job_is_lost() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "steady");
    env.wait_stream(&queue.stream()).await;
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let selector = ListParams::default().labels("conveyor.dev/worker=steady");
    wait_for(Duration::from_secs(20), "two pods", || async {
        pods.list(&selector).await.is_ok_and(|l| l.items.len() == 2)
    })
    .await
    .unwrap();
    let originals: BTreeSet<String> = pods
        .list(&selector)
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();

    wait_for(Duration::from_secs(60), "two ready pods", || async {
        pods.list(&selector)
            .await
            .is_ok_and(|l| l.items.iter().filter(|p| ready(p)).count() == 2)
    })
    .await
    .unwrap();
    // Samples, while recycling runs, the Ready pods that are not terminating whenever some pod
    // is terminating.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (pods, selector, stop) = (pods.clone(), selector.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut fewest = usize::MAX;
            while !stop.is_cancelled() {
                if let Ok(list) = pods.list(&selector).await {
                    let going = list
                        .items
                        .iter()
                        .any(|p| p.metadata.deletion_timestamp.is_some());
                    let serving = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
                        .count();
                    if going {
                        fewest = fewest.min(serving);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            fewest
        })
    };

    let js = env.jetstream().await;
    for _ in 0..JOBS {
        js.publish(queue.job_subject(0), "0.3".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    wait_for(
        Duration::from_secs(60),
        "every original pod replaced",
        || async {
            pods.list(&selector)
                .await
                .is_ok_and(|l| l.items.iter().all(|p| !originals.contains(&p.name_any())))
        },
    )
    .await
    .unwrap();
    let recycled = env
        .wait_worker(
            "steady",
            Duration::from_secs(10),
            "recycledPods >= 2",
            |w| {
                w.status
                    .as_ref()
                    .map(|s| s.recycled_pods)
                    .filter(|n| *n >= 2)
            },
        )
        .await;
    wait_for(Duration::from_secs(60), "every job acked", || async {
        consumer_info(&js, &queue)
            .await
            .is_some_and(|i| i.ack_floor.stream_sequence == JOBS && i.num_ack_pending == 0)
    })
    .await
    .unwrap();
    sampling.cancel();
    let fewest = sampler.await.unwrap();
    assert!(
        fewest >= 2,
        "while an old pod went, only {fewest} other pods were Ready (the pool wants 2)"
    );
    let info = consumer_info(&js, &queue).await.unwrap();
    println!(
        "recycled {recycled} pods; {JOBS} jobs acked, {} redelivered",
        info.num_redelivered
    );
    let described = env.kubectl(&["describe", "worker", "steady"]).await;
    assert!(described.contains("Recycled"), "{described}");
    env.shutdown().await;
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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
