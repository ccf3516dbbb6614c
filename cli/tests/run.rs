//! `conveyor run WORKFLOW --input … --wait` and `conveyor run show` against the Kubernetes test
//! double (the Workflow applied with the real `kubectl`) and a real `nats-server`. The run
//! queue is served here by the SDK's engine, as the operator's leader serves it, so the CLI is
//! tested on its own.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::flow::Releaser;
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::workflow::engine::{Engine, RUN_QUEUE};
use conveyor::{Client, Worker};
use conveyor_crds::Workflow;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::NatsServer;
use kube::Api;
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const NS: &str = "team";

async fn run(cluster: &DevCluster, program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env_remove("CONVEYOR_NATS_URL")
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("CONVEYOR_KUBE_CONTEXT")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        tokio::io::AsyncWriteExt::write_all(&mut pipe, text.as_bytes())
            .await
            .unwrap();
    }
    drop(pipe);
    child.wait_with_output().await.expect("ends")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn conveyor(cluster: &DevCluster, args: &[&str]) -> Output {
    run(cluster, env!("CARGO_BIN_EXE_conveyor"), args, None).await
}

/// Stops the workers and releasers when dropped.
struct Stop(CancellationToken);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A fetch answers `{"n": <its network's figure>}` or fails when the input names it in
/// `fail`; the aggregate sums its dependencies' `n`.
async fn step(job: ReceivedJob) -> Outcome {
    let payload: Value = serde_json::from_slice(&job.payload).unwrap_or(Value::Null);
    let step = payload["step"].as_str().unwrap_or_default();
    if payload["input"]["fail"] == json!(step) {
        return Outcome::Permanent("the OAuth token expired".into());
    }
    let result = match step {
        "aggregate" => {
            let steps = payload["steps"].as_object().cloned().unwrap_or_default();
            json!({"total": steps.values().filter_map(|s| s["result"]["n"].as_i64()).sum::<i64>()})
        }
        "onFailure" => json!("told"),
        fetch => json!({"n": payload["input"][fetch.trim_start_matches("fetch-")]}),
    };
    Outcome::Done(result.to_string().into())
}

/// Serves `queues` (name, levels) as the operator (run queue) and the step pools would.
async fn serve(client: &Client, queues: &[(&str, u8)], stop: &CancellationToken) {
    for (name, levels) in queues {
        let queue = QueueRef::new(NS, *name);
        let settings = QueueSettings {
            priorities: *levels,
            ..QueueSettings::default()
        };
        ensure_queue(client.jetstream(), &queue, &settings)
            .await
            .unwrap();
        let releaser =
            Releaser::new(client.jetstream().clone()).scan_interval(Duration::from_millis(200));
        let (released, halt) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            while !halt.is_cancelled() {
                if releaser.serve(&released, &halt).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let options = WorkerOptions {
            concurrency: 4,
            priorities: *levels,
            poll_wait: Duration::from_millis(300),
            drain_timeout: Duration::from_secs(2),
            pod_name: "test-pod".into(),
            ..Default::default()
        };
        let worker = Worker::new(client.jetstream().clone(), queue).options(options);
        let halt = stop.clone();
        if *name == RUN_QUEUE {
            let engine = Arc::new(Engine::new(client.jetstream().clone()));
            let worker = worker.handler(move |job: ReceivedJob| {
                let engine = engine.clone();
                async move { engine.handle(job).await }
            });
            tokio::spawn(async move { worker.run(async move { halt.cancelled().await }).await });
        } else {
            let worker = worker.handler(step);
            tokio::spawn(async move { worker.run(async move { halt.cancelled().await }).await });
        }
    }
}

#[tokio::test]
async fn a_run_is_started_awaited_shown_and_started_again_as_the_same_run() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let kubectl = "/usr/bin/kubectl";
    for crd in ["jobqueues.yaml", "workflows.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crds")
            .join(crd);
        ok(&run(
            &cluster,
            kubectl,
            &["apply", "-f", path.to_str().unwrap()],
            None,
        )
        .await);
    }
    ok(&run(&cluster, kubectl, &["create", "namespace", NS], None).await);
    let nats = NatsServer::start().await.unwrap();
    let client = Client::connect(&nats.url()).await.unwrap();
    let stop = CancellationToken::new();
    let _stop = Stop(stop.clone());
    let queues = [
        (RUN_QUEUE, 2),
        ("twitter", 1),
        ("facebook", 1),
        ("aggregate", 2),
        ("notify", 1),
    ];
    serve(&client, &queues, &stop).await;
    let mut manifests = String::new();
    for (name, levels) in queues {
        manifests.push_str(&format!(
            "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: {name}}}\nspec: {{priorities: {levels}, nats: {{url: \"{}\"}}}}\n---\n",
            nats.url()
        ));
    }
    manifests.push_str(
        "apiVersion: conveyor.dev/v1alpha1\nkind: Workflow\nmetadata: {name: social}\nspec:\n  steps:\n\
         \x20   - {name: fetch-twitter, queue: twitter, when: 'has(input.twitter)'}\n\
         \x20   - {name: fetch-facebook, queue: facebook}\n\
         \x20   - {name: aggregate, queue: aggregate, dependsOn: [fetch-twitter, fetch-facebook]}\n\
         \x20 onFailure: {queue: notify}\n",
    );
    ok(&run(
        &cluster,
        kubectl,
        &["apply", "-n", NS, "-f", "-"],
        Some(&manifests),
    )
    .await);

    // Not checked by an operator yet: refused.
    let early = conveyor(&cluster, &["run", "social", "-n", NS, "--input", "{}"]).await;
    assert!(!early.status.success());
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(
        said.contains("has not been checked by the operator yet"),
        "{said}"
    );

    // Ready, as the operator would write it.
    let api: Api<Workflow> = Api::namespaced(cluster.client(), NS);
    let status = json!({"status": {"observedGeneration": 1, "conditions": [{
        "type": "Ready", "status": "True", "reason": "Valid", "message": "runs can be started",
        "lastTransitionTime": "2026-12-01T00:00:00Z"}]}});
    api.patch_status(
        "social",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .unwrap();

    let started = [
        "run",
        "social",
        "-n",
        NS,
        "--input",
        r#"{"facebook": 5}"#,
        "--id",
        "bob",
        "--wait",
    ];
    let out = ok(&conveyor(&cluster, &started).await);
    assert_eq!(out, "bob\n{\"total\":5}\n");
    let again = ok(&conveyor(&cluster, &started).await);
    assert_eq!(again, "bob (already started)\n{\"total\":5}\n");

    let shown = ok(&conveyor(&cluster, &["run", "show", "social", "bob", "-n", NS]).await);
    assert!(
        shown.starts_with("run bob of social: completed: {\"total\":5}\n"),
        "{shown}"
    );
    let rows: Vec<Vec<&str>> = shown
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{shown}");
    assert_eq!(
        &rows[0][..3],
        ["0", "fetch-facebook", "completed"],
        "{shown}"
    );
    assert_eq!(&rows[1][..3], ["1", "aggregate", "completed"], "{shown}");

    // A failing step: the run fails naming it, and exits 1.
    let failing = [
        "run",
        "social",
        "-n",
        NS,
        "--input",
        r#"{"facebook": 1, "fail": "fetch-facebook"}"#,
        "--id",
        "cy",
        "--wait",
    ];
    let out = conveyor(&cluster, &failing).await;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(
            "run cy failed: step fetch-facebook failed: permanent: the OAuth token expired"
        ),
        "{said}"
    );
    let shown = ok(&conveyor(&cluster, &["run", "show", "social", "cy", "-n", NS]).await);
    let rows: Vec<Vec<&str>> = shown
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert!(
        rows.contains(&vec!["0", "fetch-facebook", "failed"]),
        "{shown}"
    );
    assert!(
        rows.contains(&vec!["1", "onFailure", "completed"]),
        "{shown}"
    );
}
