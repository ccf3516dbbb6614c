//! The walking skeleton end to end: the hello example applied with `kubectl` runs worker pods
//! with the injected runtime, and 1,000 submitted jobs all come back with their greeting.

use std::collections::BTreeSet;
use std::time::Duration;

use conveyor::Client;
use conveyor::client::{Job, JobResult};
use conveyor::names::QueueRef;
use conveyor_crds::Worker;
use conveyor_testkit::wait_for;
use conveyor_tests::{Env, repo};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

const NS: &str = "hello-e2e";
const JOBS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_example_processes_every_job() {
    let mut env = Env::start(NS).await.unwrap();
    env.start_operator(NS).await.unwrap();
    for file in ["queue.yaml", "worker.yaml"] {
        let path = repo("examples/hello").join(file);
        env.kubectl(&["apply", "-n", NS, "-f", path.to_str().unwrap()], None)
            .await
            .unwrap();
    }

    // Pods run the runtime: the Worker reports a ready pod (readiness probe on /readyz).
    let workers: Api<Worker> = Api::namespaced(env.cluster.client(), NS);
    wait_for(
        Duration::from_secs(60),
        "a ready hello worker pod",
        || async {
            workers
                .get("hello")
                .await
                .ok()
                .and_then(|w| w.status)
                .is_some_and(|s| s.ready_replicas >= 1)
        },
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), NS);
    let listed = pods
        .list(&ListParams::default().labels("conveyor.dev/worker=hello"))
        .await
        .unwrap();
    let pod = listed.items.first().expect("a hello pod");
    let command = pod.spec.as_ref().unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(command[..3], ["/conveyor/bin/conveyor-worker", "run", "--"]);

    let client = Client::connect(&env.nats.url()).await.unwrap();
    let queue = QueueRef::new(NS, "hello");
    let results: Vec<_> = futures::stream::iter(0..JOBS)
        .map(|i| {
            let client = client.clone();
            let queue = queue.clone();
            async move {
                let job = Job::new(format!("job-{i}"), format!("job {i}"));
                client
                    .submit_and_wait(&queue, job, Duration::from_secs(120))
                    .await
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let mut done = BTreeSet::new();
    for result in results {
        match result.expect("every job gets an answer") {
            JobResult::Completed { id, result } => {
                let i: usize = id.strip_prefix("job-").unwrap().parse().unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&result).trim(),
                    format!("Hello, job {i}!")
                );
                assert!(done.insert(i), "{id} answered twice");
            }
            other => panic!("job failed: {other:?}"),
        }
    }
    assert_eq!(done.len(), JOBS, "every job id accounted for");

    let table = env
        .kubectl(&["get", "-n", NS, "jobqueues,workers"], None)
        .await
        .unwrap();
    for column in [
        "READY",
        "PENDING",
        "IN-FLIGHT",
        "QUEUE",
        "DESIRED",
        "AVAILABLE",
    ] {
        assert!(table.contains(column), "{column} missing:\n{table}");
    }
    let (status, _) = env.operator_http("/healthz").await.unwrap();
    assert!(status.contains("200"), "{status}");
    let (status, _) = env.operator_http("/readyz").await.unwrap();
    assert!(status.contains("200"), "{status}");
    let (_, metrics) = env.operator_http("/metrics").await.unwrap();
    assert!(
        metrics.contains("conveyor_operator_reconciles_total{controller=\"jobqueue\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("conveyor_operator_leader 1"), "{metrics}");
    env.stop_operator().await.unwrap();
}
