//! A worker that stops heart-beating in the middle of a job (its runtime frozen with SIGSTOP,
//! as a wedged process would be): its liveness probe fails, the kubelet replaces the container,
//! and the job — no longer kept alive by in-progress acks — is delivered again after the queue's
//! timeout and completed by the fresh runtime. The dead container's termination message names
//! the job it held.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor::{Client, Job, JobResult};
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use kube::api::ListParams;
use worker_env::{Env, NS};

fn queue() -> String {
    JobQueue::test("stuck").timeout("3s").max_attempts(3).yaml()
}

// The first attempt sleeps far past the timeout; later ones answer at once.
fn worker() -> String {
    Worker::test("stuck")
        .replicas(1)
        .exec(&[
            "sh",
            "-c",
            "if [ \"$CONVEYOR_JOB_ATTEMPT\" = 1 ]; then sleep 60; fi; echo attempt $CONVEYOR_JOB_ATTEMPT",
        ])
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(2)
        .liveness_on(9090, 2)
        .yaml()
}

/// The status of the pod's container.
fn container(pod: &Pod) -> &ContainerStatus {
    &pod.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
}

async fn the_pod(env: &Env) -> Pod {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let list = pods
        .list(&ListParams::default().labels("conveyor.dev/worker=stuck"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "one pod");
    list.items.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_worker_that_stops_heart_beating_is_replaced_and_its_job_runs_again() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "stuck");
    env.wait_stream(&queue.stream()).await;
    env.wait_worker("stuck", Duration::from_secs(30), "a ready pod", |w| {
        w.status
            .as_ref()
            .filter(|s| s.ready_replicas == 1)
            .map(|_| ())
    })
    .await;

    let client = Client::connect(&env.nats.url()).await.unwrap();
    let waiting = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(async move {
            client
                .submit_and_wait(&queue, Job::new("wedged-1", "x"), Duration::from_secs(60))
                .await
        })
    };
    // Once the job is delivered, freeze the runtime (not its handler).
    let js = env.jetstream().await;
    conveyor_testkit::wait_for(Duration::from_secs(20), "the job delivered", || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("workers-p0", &queue.stream())
            .await
            .unwrap();
        consumer.info().await.is_ok_and(|i| i.num_ack_pending == 1)
    })
    .await
    .unwrap();
    let pod = the_pod(&env).await;
    let status = container(&pod);
    let pid = status
        .container_id
        .as_deref()
        .and_then(|id| id.strip_prefix("devcluster://"))
        .expect("a running container");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", pid])
        .status()
        .unwrap();
    assert!(stopped.success());

    let result = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the job finishes")
        .unwrap()
        .unwrap();
    match result {
        JobResult::Completed { id, result } => {
            assert_eq!(id, "wedged-1");
            assert_eq!(String::from_utf8_lossy(&result).trim(), "attempt 2");
        }
        other => panic!("expected the job to complete on its second attempt: {other:?}"),
    }
    let pod = the_pod(&env).await;
    let status = container(&pod);
    assert!(status.restart_count >= 1, "the container was replaced");
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("the frozen container's end is recorded");
    assert_eq!(
        last.message.as_deref(),
        Some(r#"{"runningJobs":["wedged-1"]}"#),
        "it held the job when it was killed"
    );
    let events = env.kubectl(&["get", "events"]).await;
    assert!(
        events.contains("Liveness probe failed") && events.contains("will be restarted"),
        "{events}"
    );
    env.shutdown().await;
}
