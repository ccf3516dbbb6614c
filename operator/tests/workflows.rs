//! Workflows against the Kubernetes test double and a real `nats-server`, applied with the real
//! `kubectl`: bad Workflows are refused at apply (CRD rules) or reported `Ready=False` with the
//! reason (the operator's checks); the seeds' Workflow runs through the operator, whose leader
//! serves the namespace's run queue with the engine (its dispatcher releases each wave), while
//! the steps run on SDK workers here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::workflow::engine::{RunState, start};
use conveyor::{Client, JobResult, SubmitError, Worker};
use conveyor_crds::Workflow;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_operator::workflow::{RUN_QUEUE, definition};
use conveyor_testkit::{NatsServer, wait_for, wait_for_some};
use kube::Api;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const KUBECTL: &str = "/usr/bin/kubectl";
const DEADLINE: Duration = Duration::from_secs(60);
const NS: &str = "team";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

struct Output {
    ok: bool,
    stderr: String,
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    Output {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A cluster with the CRDs and namespace `team`, a NATS server and the operator; stops the
/// operator and the step workers when dropped.
struct Env {
    cluster: DevCluster,
    nats: NatsServer,
    stop: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Env {
    async fn new() -> Self {
        let cluster = DevCluster::start(Options::api_only()).await.unwrap();
        for crd in ["crds/jobqueues.yaml", "crds/workflows.yaml"] {
            let path = repo(crd);
            let out = kubectl(&cluster, &["apply", "-f", path.to_str().unwrap()], None).await;
            assert!(out.ok, "{}", out.stderr);
        }
        assert!(
            kubectl(&cluster, &["create", "namespace", NS], None)
                .await
                .ok
        );
        let nats = NatsServer::start().await.unwrap();
        let mut config = Config::with_nats_url(nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.resync = Duration::from_secs(1);
        config.worker_image = "ghcr.io/conveyor-dev/conveyor-worker:test".into();
        let stop = CancellationToken::new();
        let halt = stop.clone();
        tokio::spawn(conveyor_operator::run_with_client(
            config,
            cluster.client(),
            async move { halt.cancelled().await },
        ));
        Self {
            cluster,
            nats,
            stop,
        }
    }

    async fn apply(&self, yaml: &str) -> Output {
        kubectl(&self.cluster, &["apply", "-n", NS, "-f", "-"], Some(yaml)).await
    }

    async fn apply_ok(&self, yaml: &str) {
        let out = self.apply(yaml).await;
        assert!(out.ok, "kubectl apply failed: {}", out.stderr);
    }

    fn workflows(&self) -> Api<Workflow> {
        Api::namespaced(self.cluster.client(), NS)
    }

    /// Waits until the Workflow's `Ready` has `status` and `reason`; its message.
    async fn wait_ready(&self, name: &str, status: &str, reason: &str) -> String {
        let what = format!("Workflow {name} Ready={status} {reason}");
        wait_for_some(DEADLINE, &what, || async {
            let w = self.workflows().get_opt(name).await.ok().flatten()?;
            let ready = w
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (ready.status == status && ready.reason == reason).then_some(ready.message)
        })
        .await
        .unwrap()
    }

    /// An SDK worker for a step queue (`levels` priority levels) until the env is dropped.
    fn step_worker(&self, client: &Client, queue: &str, levels: u8) {
        let runner = Worker::new(client.jetstream().clone(), QueueRef::new(NS, queue))
            .options(WorkerOptions {
                concurrency: 2,
                priorities: levels,
                poll_wait: Duration::from_millis(300),
                drain_timeout: Duration::from_secs(2),
                pod_name: "test-pod".into(),
                ..Default::default()
            })
            .handler(step);
        let halt = self.stop.clone();
        tokio::spawn(async move { runner.run(async move { halt.cancelled().await }).await });
    }
}

fn queue_yaml(name: &str, priorities: u8) -> String {
    format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: {name}}}\nspec: {{priorities: {priorities}}}\n"
    )
}

/// The seeds' Workflow (docs/workflows.md, "A worked example").
const SOCIAL: &str = r#"apiVersion: conveyor.dev/v1alpha1
kind: Workflow
metadata: {name: social}
spec:
  steps:
    - name: fetch-twitter
      queue: twitter
      when: "has(input.twitter)"
    - name: fetch-facebook
      queue: facebook
      timeout: 30s
    - name: aggregate
      queue: aggregate
      dependsOn: [fetch-twitter, fetch-facebook]
  onFailure:
    queue: notify
"#;

/// A step: a fetch answers `{"n": <the input's figure for its network>}` (or fails when the
/// input names it in `fail`), the aggregate sums its dependencies' `n`, the notifier answers
/// which step failed.
async fn step(job: ReceivedJob) -> Outcome {
    let payload: Value = serde_json::from_slice(&job.payload).unwrap_or(Value::Null);
    let step = payload["step"].as_str().unwrap_or_default();
    if payload["input"]["fail"] == json!(step) {
        return Outcome::Permanent("the OAuth token expired".into());
    }
    let result = match step {
        "aggregate" => {
            let steps = payload["steps"].as_object().cloned().unwrap_or_default();
            let total: i64 = steps
                .values()
                .filter_map(|s| s["result"]["n"].as_i64())
                .sum();
            json!({"total": total})
        }
        "onFailure" => json!({"told": payload["failed"]["step"]}),
        fetch => json!({"n": payload["input"][fetch.trim_start_matches("fetch-")]}),
    };
    Outcome::Done(result.to_string().into())
}

/// Starts run `id` of the Workflow `social` as stored, and waits for its outcome.
async fn run(env: &Env, client: &Client, id: &str, input: Value) -> JobResult {
    let workflow = env.workflows().get("social").await.unwrap();
    let state = RunState::new(NS, "social", id, definition(&workflow), input);
    let runs = QueueRef::new(NS, RUN_QUEUE);
    // The run queue's streams come with its JobQueue's first reconcile.
    wait_for(DEADLINE, "the run queue takes the run", || async {
        !matches!(
            start(client, &runs, &state).await,
            Err(SubmitError::NoSuchQueue { .. }) | Err(SubmitError::Unavailable { .. })
        )
    })
    .await
    .unwrap();
    wait_for_some(DEADLINE, &format!("the outcome of run {id}"), || async {
        client.result(&runs, &state.run).await.ok().flatten()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn bad_workflows_are_refused_or_not_ready_and_the_seeds_workflow_runs() {
    let env = Env::new().await;

    // Refused at apply by the CRD's rules: an unknown step in dependsOn.
    let unknown = SOCIAL.replace(
        "[fetch-twitter, fetch-facebook]",
        "[fetch-twitter, fetch-myspace]",
    );
    let out = env.apply(&unknown).await;
    assert!(!out.ok, "a dependsOn naming no step was accepted");
    assert!(
        out.stderr
            .contains("every dependsOn entry must name a step of this workflow"),
        "{}",
        out.stderr
    );

    // The queues do not exist yet: QueueNotFound, naming each.
    env.apply_ok(SOCIAL).await;
    let message = env.wait_ready("social", "False", "QueueNotFound").await;
    assert!(
        message.contains("JobQueue team/workflow-runs (runs) does not exist"),
        "{message}"
    );
    assert!(
        message.contains("JobQueue team/notify (onFailure) does not exist"),
        "{message}"
    );

    // A cycle and CEL that does not compile: InvalidWorkflow, naming them.
    let cycle = r#"apiVersion: conveyor.dev/v1alpha1
kind: Workflow
metadata: {name: loop}
spec:
  steps:
    - {name: a, queue: twitter, dependsOn: [c]}
    - {name: b, queue: twitter, dependsOn: [a]}
    - {name: c, queue: twitter, dependsOn: [b], when: "input.x =="}
"#;
    env.apply_ok(cycle).await;
    let message = env.wait_ready("loop", "False", "InvalidWorkflow").await;
    assert!(
        message.contains("dependsOn has a cycle: a → c → b → a"),
        "{message}"
    );
    assert!(
        message.contains("step \"c\": when: does not compile"),
        "{message}"
    );

    // Once the queues exist the seeds' Workflow is Ready.
    for (queue, levels) in [
        (RUN_QUEUE, 2),
        ("twitter", 1),
        ("facebook", 1),
        ("aggregate", 2),
        ("notify", 1),
    ] {
        env.apply_ok(&queue_yaml(queue, levels)).await;
    }
    env.wait_ready("social", "True", "Valid").await;

    let client = Client::connect(&env.nats.url()).await.unwrap();
    for (queue, levels) in [
        ("twitter", 1),
        ("facebook", 1),
        ("aggregate", 2),
        ("notify", 1),
    ] {
        env.step_worker(&client, queue, levels);
    }
    let linked = run(&env, &client, "ann", json!({"twitter": 3, "facebook": 4})).await;
    assert_eq!(
        linked,
        JobResult::Completed {
            id: "social.ann".into(),
            result: json!({"total": 7}).to_string().into()
        }
    );
    let unlinked = run(&env, &client, "bob", json!({"facebook": 5})).await;
    assert_eq!(
        unlinked,
        JobResult::Completed {
            id: "social.bob".into(),
            result: json!({"total": 5}).to_string().into()
        }
    );
    match run(
        &env,
        &client,
        "cy",
        json!({"twitter": 1, "facebook": 1, "fail": "fetch-facebook"}),
    )
    .await
    {
        JobResult::DeadLettered { error, .. } => assert_eq!(
            error,
            "step fetch-facebook failed: permanent: the OAuth token expired"
        ),
        other => panic!("expected a failed run, got {other:?}"),
    }
    let notify = QueueRef::new(NS, "notify");
    let told = client.result(&notify, "social.cy.onFailure").await.unwrap();
    assert_eq!(
        told,
        Some(JobResult::Completed {
            id: "social.cy.onFailure".into(),
            result: json!({"told": "fetch-facebook"}).to_string().into()
        })
    );
}
