//! A handler that blows its pod's memory limit: the kubelet OOM-kills the pod, and the Worker's
//! `Degraded` condition names the pod, the reason and the job, with one `WorkerCrashed` Event.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::JobQueue;
use conveyor_testkit::fixtures::Test as _;
use worker_env::{Env, NS, oom_worker};

fn queue() -> String {
    JobQueue::test("heavy")
        .timeout("30s")
        .max_attempts(2)
        .yaml()
}

// The handler writes 300 MiB (touched, so resident) under a 64 MiB limit.
fn worker() -> String {
    oom_worker("heavy", 300, "64Mi").replicas(1).yaml()
}

#[tokio::test]
async fn an_oom_killed_pod_makes_the_worker_degraded() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "heavy");
    env.wait_stream(&queue.stream()).await;
    env.wait_worker("heavy", Duration::from_secs(30), "a ready pod", |w| {
        w.status
            .as_ref()
            .filter(|s| s.ready_replicas == 1)
            .map(|_| ())
    })
    .await;
    let healthy = env
        .wait_worker("heavy", Duration::from_secs(10), "Degraded=False", |w| {
            degraded(w).filter(|c| c.status == "False")
        })
        .await;
    assert_eq!(healthy.reason, "PodsHealthy");

    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    client
        .submit(&queue, conveyor::Job::new("resize-huge-image", "boom"))
        .await
        .unwrap();

    let condition = env
        .wait_worker(
            "heavy",
            Duration::from_secs(30),
            "Degraded=True/OOMKilled",
            |w| degraded(w).filter(|c| c.status == "True" && c.reason == "OOMKilled"),
        )
        .await;
    assert!(
        condition.message.starts_with("pod heavy-") && condition.message.contains("OOMKilled"),
        "{}",
        condition.message
    );
    // The runtime kept the job's id in the termination message file; the kubelet reported it.
    assert!(
        condition
            .message
            .contains("exceeded its memory limit while running job resize-huge-image"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("retry.maxAttempts"),
        "{}",
        condition.message
    );
    let described = env.kubectl(&["describe", "worker", "heavy"]).await;
    assert!(described.contains("WorkerCrashed"), "{described}");
    env.shutdown().await;
}

fn degraded(
    w: &conveyor_crds::Worker,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    w.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .cloned()
}
