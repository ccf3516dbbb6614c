//! The walking skeleton end to end: the hello example applied with `kubectl` runs worker pods
//! with the injected runtime, and 1,000 jobs submitted with `conveyor submit --wait` all come
//! back with their greeting.

use std::collections::BTreeSet;
use std::time::Duration;

use conveyor_crds::Worker;
use conveyor_testkit::wait_for;
use conveyor_tests::{Env, binary, repo};
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

    // The real `conveyor submit`, as a user runs it: 1,000 jobs from a JSON Lines file, waiting
    // for every outcome (one line per job: id, outcome, the handler's result).
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs.jsonl");
    let lines: Vec<String> = (0..JOBS)
        .map(|i| format!(r#"{{"id": "job-{i}", "payload": "job {i}"}}"#))
        .collect();
    std::fs::write(&jobs, lines.join("\n")).unwrap();
    let output = tokio::process::Command::new(binary("conveyor").unwrap())
        .args([
            "submit",
            "hello",
            "--wait",
            "--wait-timeout",
            "120s",
            "-n",
            NS,
        ])
        .arg("--nats-url")
        .arg(env.nats.url())
        .arg("--jsonl")
        .arg(&jobs)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "conveyor submit failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut done = BTreeSet::new();
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 3, "malformed line {line:?}");
        let i: usize = fields[0].strip_prefix("job-").unwrap().parse().unwrap();
        assert_eq!(fields[1], "completed", "{line}");
        assert_eq!(fields[2], format!("Hello, job {i}!"), "{line}");
        assert!(done.insert(i), "job-{i} answered twice");
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
