//! Graceful deletion of a busy worker pod drains it end to end: the kubelet sends SIGTERM to the
//! container's main process (the runtime) only, as a container runtime does, the runtime stops
//! taking jobs and lets the running one finish within `CONVEYOR_DRAIN_TIMEOUT`, so the job
//! completes in its first attempt instead of being killed with the pod.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use worker_env::{Env, NS};

fn queue() -> String {
    JobQueue::test("patient").timeout("60s").yaml()
}

fn worker(dir: &std::path::Path) -> String {
    let script = format!(
        "touch {dir}/started-$CONVEYOR_JOB_ATTEMPT; sleep 3; printf 'attempt %s' $CONVEYOR_JOB_ATTEMPT",
        dir = dir.display()
    );
    Worker::test("patient")
        .replicas(1)
        .exec(&["sh", "-c", &script])
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(30)
        .yaml()
}

#[tokio::test]
async fn deleting_a_busy_pod_drains_its_running_job() {
    let env = Env::start().await;
    let dir = tempfile_dir();
    env.apply(&queue()).await;
    env.apply(&worker(&dir)).await;
    let queue = QueueRef::new(NS, "patient");
    env.wait_stream(&queue.stream()).await;
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let selector = ListParams::default().labels("conveyor.dev/worker=patient");
    let running = || async {
        pods.list(&selector)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    };
    wait_for(Duration::from_secs(30), "a running worker pod", || async {
        !running().await.is_empty()
    })
    .await
    .unwrap();

    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    let submitted = {
        let client = client.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            client
                .submit_and_wait(
                    &queue,
                    conveyor::Job::new("long", "x"),
                    Duration::from_secs(60),
                )
                .await
        })
    };
    wait_for(Duration::from_secs(30), "the job started", || async {
        dir.join("started-1").exists()
    })
    .await
    .unwrap();
    for pod in running().await {
        pods.delete(&pod, &DeleteParams::default()).await.unwrap();
    }
    let result = submitted.await.unwrap().unwrap();
    match result {
        conveyor::JobResult::Completed { result, .. } => {
            assert_eq!(&result[..], b"attempt 1", "finished by the draining pod");
        }
        other => panic!("the job did not complete: {other:?}"),
    }
    assert!(!dir.join("started-2").exists(), "no second attempt");
    let _ = std::fs::remove_dir_all(&dir);
    env.shutdown().await;
}

/// A directory for the handler's marker files (the kubelet runs it as a host process).
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conveyor-drain-test-{}-{}",
        std::process::id(),
        conveyor_testkit::free_port().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
