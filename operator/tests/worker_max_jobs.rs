//! Recycling by `recycle.maxJobs` (issue #15): on a real kubelet a container that exits 0 after
//! its jobs is restarted in place with a growing back-off (CrashLoopBackOff) and used to raise a
//! false `WorkerCrashed`. The runtime now starts over as a fresh process in place instead:
//! through the test double's kubelet, 30 jobs through one pod with `maxJobs: 4` all complete,
//! the container never restarts, no `WorkerCrashed` Event appears and the Worker stays
//! `Available`.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use worker_env::{Env, NS};

fn queue() -> String {
    JobQueue::test("fresh").timeout("10s").yaml()
}

fn worker() -> String {
    Worker::test("fresh")
        .replicas(1)
        .concurrency(2)
        .recycle_after_jobs(4)
        .exec(&["sh", "-c", "cat >/dev/null"])
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(5)
        .yaml()
}

const JOBS: usize = 30;

#[tokio::test]
async fn recycling_by_max_jobs_never_restarts_the_container_nor_looks_like_a_crash() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "fresh");
    env.wait_stream(&queue.stream()).await;
    env.wait_worker("fresh", Duration::from_secs(60), "a ready pod", |w| {
        w.status
            .as_ref()
            .filter(|s| s.ready_replicas == 1)
            .map(|_| ())
    })
    .await;

    let client = Client::connect(&env.nats.url()).await.unwrap();
    let jobs: Vec<Job> = (0..JOBS).map(|i| Job::new(format!("j{i}"), "x")).collect();
    for result in client.submit_batch(&queue, jobs).await {
        result.unwrap();
    }
    wait_for(Duration::from_secs(120), "every job done", || async {
        env.stream_messages(&queue.stream()).await == 0
    })
    .await
    .unwrap();

    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let list = pods
        .list(&ListParams::default().labels("conveyor.dev/worker=fresh"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "one pod did it all");
    let restarts: i32 = list
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .map(|c| c.restart_count)
        .sum();
    assert_eq!(restarts, 0, "recycled in place, never restarted");
    assert_eq!(env.stream_messages(&queue.dead_letter_stream()).await, 0);
    let events = env.kubectl(&["get", "events", "-n", NS]).await;
    assert!(!events.contains("WorkerCrashed"), "{events}");
    assert!(!events.contains("BackOff"), "{events}");
    let described = env.kubectl(&["describe", "worker", "fresh"]).await;
    assert!(!described.contains("CrashLoopBackOff"), "{described}");
    env.wait_worker("fresh", Duration::from_secs(30), "Available", |w| {
        w.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Available" && c.status == "True")
            .map(|_| ())
    })
    .await;
    env.shutdown().await;
}
