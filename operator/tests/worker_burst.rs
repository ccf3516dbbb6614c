//! Scaling from zero and back with real worker processes: a pool with `minReplicas: 0,
//! maxReplicas: 8` gets a burst of 5,000 jobs. The scaler asks for pods within 2 s of the first
//! job, the pool grows to 8, every job is acknowledged (the work stream ends empty, nothing
//! dead-lettered), and after `scaleDownDelay` the pool is back to zero pods. `kubectl describe
//! worker` tells that story in its conditions and Events. Prints the measured times.

mod worker_env;

use std::time::{Duration, Instant};

use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_crds::JobQueue;
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use worker_env::{Env, NS, noop_worker};

const JOBS: usize = 5_000;

fn queue() -> String {
    JobQueue::test("burst").timeout("60s").yaml()
}

#[tokio::test]
async fn a_burst_scales_from_zero_to_max_and_back_to_zero() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(
        &noop_worker("burst")
            .scaled(0..=8)
            .backlog_per_pod(100)
            .scale_down_after("3s")
            .yaml(),
    )
    .await;
    let queue = QueueRef::new(NS, "burst");
    env.wait_stream(&queue.stream()).await;
    let replicas = || env.deployment_replicas("burst");
    wait_for(Duration::from_secs(20), "the idle pool at zero", || async {
        replicas().await == Some(0)
    })
    .await
    .unwrap();

    let client = Client::connect(&env.nats.url()).await.unwrap();
    let first = Instant::now();
    let results = client
        .submit_batch(&queue, (0..JOBS).map(|i| Job::new(format!("b{i}"), "x")))
        .await;
    assert!(results.iter().all(Result::is_ok), "every job accepted");
    wait_for(
        Duration::from_secs(2),
        "pods asked for within 2 s",
        || async { replicas().await.unwrap_or(0) > 0 },
    )
    .await
    .unwrap();
    let scaled_up = first.elapsed();
    let reason = env
        .wait_worker(
            "burst",
            Duration::from_secs(10),
            "the pool at its maximum",
            |w| {
                w.status
                    .as_ref()
                    .filter(|s| s.desired_replicas == Some(8))
                    .and_then(|s| s.last_scale_reason.clone())
            },
        )
        .await;
    assert!(reason.contains("max 8"), "{reason}");

    wait_for(
        Duration::from_secs(120),
        "every job acknowledged",
        || async { env.stream_messages(&queue.stream()).await == 0 },
    )
    .await
    .unwrap();
    let drained = first.elapsed();
    assert_eq!(
        env.stream_messages(&queue.dead_letter_stream()).await,
        0,
        "nothing dead-lettered"
    );

    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    wait_for(Duration::from_secs(30), "back to zero pods", || async {
        replicas().await == Some(0)
            && pods
                .list(&ListParams::default().labels("conveyor.dev/worker=burst"))
                .await
                .is_ok_and(|l| l.items.is_empty())
    })
    .await
    .unwrap();
    let idle = first.elapsed() - drained;
    println!(
        "{JOBS} jobs: pods asked for after {scaled_up:?}, all acknowledged after {drained:?}, \
         zero pods {idle:?} later (scaleDownDelay 3s)"
    );

    let described = env.kubectl(&["describe", "worker", "burst"]).await;
    for told in [
        "ScaledUp",
        "ScaledDown",
        "scaled up from 0 to",
        "AtDesiredSize",
    ] {
        assert!(described.contains(told), "{told} in:\n{described}");
    }
    env.shutdown().await;
}
