//! The operator against the Kubernetes test double (`conveyor-devcluster`, API server only) and
//! a real `nats-server`, driven with the real `kubectl` like a user would. Each test has its own
//! cluster, NATS server and operator (in-process, `--resync 1s`), so tests run in parallel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_crds::{JobQueue, Worker};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::{Kubectl, Run};
use conveyor_testkit::{NatsServer, wait_for, wait_for_some};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const NS: &str = "team";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> Run {
    Kubectl::new(cluster.kubeconfig_path())
        .run(args, stdin)
        .await
}

async fn kubectl_ok(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> String {
    Kubectl::new(cluster.kubeconfig_path())
        .ok(args, stdin)
        .await
}

/// A cluster with the CRDs and the namespace `team`, a NATS server, and (once started) the
/// operator.
struct Env {
    cluster: DevCluster,
    nats: NatsServer,
    stop: CancellationToken,
    operator: Option<tokio::task::JoinHandle<Result<(), conveyor_operator::Error>>>,
}

impl Env {
    async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let cluster = DevCluster::start(Options::api_only()).await.unwrap();
        let crds = [repo("crds/jobqueues.yaml"), repo("crds/workers.yaml")];
        for crd in &crds {
            kubectl_ok(&cluster, &["apply", "-f", crd.to_str().unwrap()], None).await;
        }
        kubectl_ok(&cluster, &["create", "namespace", NS], None).await;
        let nats = NatsServer::start().await.unwrap();
        Self {
            cluster,
            nats,
            stop: CancellationToken::new(),
            operator: None,
        }
    }

    fn start_operator(&mut self) {
        let mut config = Config::with_nats_url(self.nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.resync = Duration::from_secs(1);
        config.scaler_interval = Duration::from_millis(200);
        config.worker_image = "ghcr.io/conveyor-dev/conveyor-worker:test".into();
        let stop = self.stop.clone();
        let client = self.cluster.client();
        self.operator = Some(tokio::spawn(conveyor_operator::run_with_client(
            config,
            client,
            async move {
                stop.cancelled().await;
            },
        )));
    }

    fn queues(&self) -> Api<JobQueue> {
        Api::namespaced(self.cluster.client(), NS)
    }

    async fn apply(&self, yaml: &str) {
        kubectl_ok(&self.cluster, &["apply", "-n", NS, "-f", "-"], Some(yaml)).await;
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.nats.url()).await.unwrap())
    }

    /// Waits until the queue's `Ready` condition has `status` (and `reason`, when given).
    async fn wait_ready(&self, name: &str, status: &str, reason: Option<&str>) -> String {
        let api = self.queues();
        let ready = |q: Option<JobQueue>| {
            q.and_then(|q| q.status)
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
                .filter(|c| c.status == status && reason.is_none_or(|r| r == c.reason))
        };
        let what = format!("JobQueue {name} Ready={status} {reason:?}");
        wait_for_some(DEADLINE, &what, || async {
            ready(api.get_opt(name).await.ok().flatten())
        })
        .await
        .unwrap()
        .message
    }

    async fn stream_exists(&self, name: &str) -> bool {
        self.jetstream().await.get_stream(name).await.is_ok()
    }

    async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(operator) = self.operator.take() {
            let result = tokio::time::timeout(DEADLINE, operator)
                .await
                .expect("operator stops");
            result.unwrap().expect("operator exits cleanly");
        }
        self.cluster.shutdown().await;
    }
}

fn queue_yaml(name: &str, policy: &str) -> String {
    JobQueue::test(name).deletion_policy(policy).yaml()
}

#[tokio::test]
async fn hello_example_yields_a_deployment_with_the_runtime_injected() {
    let mut env = Env::new().await;
    env.start_operator();
    let dir = repo("examples/hello");
    for file in ["queue.yaml", "worker.yaml"] {
        let path = dir.join(file);
        kubectl_ok(
            &env.cluster,
            &["apply", "-n", NS, "-f", path.to_str().unwrap()],
            None,
        )
        .await;
    }

    env.wait_ready("hello", "True", Some("StreamReady")).await;
    assert!(env.stream_exists("conveyor_team_hello").await);
    assert!(env.stream_exists("conveyor_team_hello_dlq").await);

    let deployments: Api<Deployment> = Api::namespaced(env.cluster.client(), NS);
    wait_for(DEADLINE, "the hello Deployment", || async {
        deployments.get_opt("hello").await.ok().flatten().is_some()
    })
    .await
    .unwrap();
    let deployment = deployments.get("hello").await.unwrap();
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Worker", "hello")
    );
    let spec = deployment.spec.unwrap();
    assert_eq!(
        spec.replicas,
        Some(1),
        "minReplicas while the queue is empty"
    );
    let pod = spec.template.spec.unwrap();
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(init.name, "install-conveyor-runtime");
    assert_eq!(
        init.image.as_deref(),
        Some("ghcr.io/conveyor-dev/conveyor-worker:test")
    );
    let main = &pod.containers[0];
    assert_eq!(
        main.command.as_deref().unwrap(),
        ["/conveyor/bin/conveyor-worker", "run", "--", "/handler.sh"]
    );
    let env_names: Vec<_> = main
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    for name in [
        "CONVEYOR_NATS_URL",
        "CONVEYOR_QUEUE",
        "CONVEYOR_POD_NAME",
        "CONVEYOR_HEALTH_ADDR",
    ] {
        assert!(
            env_names.contains(&name),
            "{name} missing from {env_names:?}"
        );
    }

    let workers: Api<Worker> = Api::namespaced(env.cluster.client(), NS);
    wait_for(
        DEADLINE,
        "the Worker status to name its selector and desired size",
        || async {
            workers
                .get("hello")
                .await
                .ok()
                .and_then(|w| w.status)
                .is_some_and(|s| {
                    s.selector.as_deref()
                        == Some("app.kubernetes.io/name=conveyor-worker,conveyor.dev/worker=hello")
                        && s.desired_replicas == Some(1)
                })
        },
    )
    .await
    .unwrap();

    let table = kubectl_ok(&env.cluster, &["get", "-n", NS, "jobqueues,workers"], None).await;
    for column in [
        "READY",
        "PENDING",
        "IN-FLIGHT",
        "QUEUE",
        "DESIRED",
        "AVAILABLE",
        "AGE",
    ] {
        assert!(table.contains(column), "{column} missing from:\n{table}");
    }
    assert!(table.contains("hello"), "{table}");
    env.shutdown().await;
}

#[tokio::test]
async fn deleting_a_queue_deletes_or_retains_its_streams() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(&queue_yaml("dropped", "Delete")).await;
    env.apply(&queue_yaml("kept", "Retain")).await;
    env.wait_ready("dropped", "True", None).await;
    env.wait_ready("kept", "True", None).await;
    assert!(env.stream_exists("conveyor_team_dropped").await);

    kubectl_ok(
        &env.cluster,
        &[
            "delete",
            "-n",
            NS,
            "jobqueue",
            "dropped",
            "kept",
            "--wait=true",
        ],
        None,
    )
    .await;
    let api = env.queues();
    wait_for(DEADLINE, "both JobQueues to be gone", || async {
        api.get_opt("dropped").await.unwrap().is_none()
            && api.get_opt("kept").await.unwrap().is_none()
    })
    .await
    .unwrap();
    for suffix in ["", "_dlq", "_delayed", "_cancel", "_events"] {
        let (dropped, kept) = (
            format!("conveyor_team_dropped{suffix}"),
            format!("conveyor_team_kept{suffix}"),
        );
        assert!(!env.stream_exists(&dropped).await, "{dropped} is deleted");
        assert!(env.stream_exists(&kept).await, "{kept} is retained");
    }
    env.shutdown().await;
}

#[tokio::test]
async fn nats_down_at_start_is_reported_and_recovered_from() {
    let mut env = Env::new().await;
    env.nats.stop().await.unwrap();
    env.start_operator();
    env.apply(&queue_yaml("early", "Retain")).await;

    let message = env
        .wait_ready("early", "False", Some("NatsUnavailable"))
        .await;
    assert!(
        message.contains(&env.nats.url()),
        "message names the server: {message}"
    );
    assert!(
        !env.operator.as_ref().unwrap().is_finished(),
        "the operator keeps running"
    );
    let describe = kubectl_ok(
        &env.cluster,
        &["describe", "-n", NS, "jobqueue", "early"],
        None,
    )
    .await;
    assert!(describe.contains("NatsUnavailable"), "{describe}");

    env.nats.restart().await.unwrap();
    env.wait_ready("early", "True", Some("StreamReady")).await;
    assert!(env.stream_exists("conveyor_team_early").await);
    env.shutdown().await;
}

#[tokio::test]
async fn a_retained_queue_can_be_deleted_while_nats_is_down() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(&queue_yaml("kept", "Retain")).await;
    env.wait_ready("kept", "True", None).await;
    env.nats.stop().await.unwrap();
    kubectl_ok(
        &env.cluster,
        &["delete", "-n", NS, "jobqueue", "kept", "--wait=true"],
        None,
    )
    .await;
    let api = env.queues();
    wait_for(DEADLINE, "the JobQueue to be gone", || async {
        api.get_opt("kept").await.unwrap().is_none()
    })
    .await
    .unwrap();
    env.shutdown().await;
}

#[tokio::test]
async fn a_stream_deleted_behind_the_operators_back_is_recreated() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(&queue_yaml("q", "Delete")).await;
    env.wait_ready("q", "True", None).await;
    let js = env.jetstream().await;
    let created = |js: async_nats::jetstream::Context| async move {
        let mut stream = js.get_stream("conveyor_team_q").await.ok()?;
        Some(stream.info().await.ok()?.created)
    };
    let before = created(js.clone())
        .await
        .expect("the operator made the stream");
    js.delete_stream("conveyor_team_q").await.unwrap();
    // The operator may recreate it before we look again (a resync is 1 s), so a fresh stream is
    // told apart by its creation time, not by a window in which it is missing.
    wait_for(
        Duration::from_secs(10),
        "the stream to be recreated",
        || async { created(js.clone()).await.is_some_and(|now| now != before) },
    )
    .await
    .unwrap();
    let stream = js.get_stream("conveyor_team_q").await.unwrap();
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
        stream.get_consumer("workers-p0").await;
    assert!(consumer.is_ok(), "the consumer is back too");
    env.shutdown().await;
}

#[tokio::test]
async fn invalid_manifests_are_rejected_by_kubectl_apply() {
    let env = Env::new().await;
    let worker = |scaling: serde_json::Value, mode: &str| {
        Worker::test("bad")
            .queue("hello")
            .handler(mode, &["/handler.sh"])
            .with(&["scaling"], scaling)
            .image("hello")
            .yaml()
    };
    let out = kubectl(
        &env.cluster,
        &["apply", "-n", NS, "-f", "-"],
        Some(&worker(json!({"minReplicas": 5, "maxReplicas": 2}), "exec")),
    )
    .await;
    assert!(!out.ok, "min > max must be rejected");
    assert!(
        out.stderr
            .contains("scaling.minReplicas must be less than or equal to scaling.maxReplicas"),
        "{}",
        out.stderr
    );

    let out = kubectl(
        &env.cluster,
        &["apply", "-n", NS, "-f", "-"],
        Some(&worker(json!({"maxReplicas": 2}), "grpc")),
    )
    .await;
    assert!(!out.ok, "an unknown handler mode must be rejected");
    assert!(
        out.stderr.contains("grpc") && out.stderr.contains("exec"),
        "{}",
        out.stderr
    );

    let out = kubectl(
        &env.cluster,
        &["apply", "-n", NS, "-f", "-"],
        Some(&worker(json!({"maxReplicas": 2}), "exec")),
    )
    .await;
    assert!(out.ok, "the fixed manifest is accepted: {}", out.stderr);
    env.shutdown().await;
}

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over() {
    let env = Env::new().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.cluster.client(), NS);
    let holder = || async {
        leases
            .get_opt("conveyor-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    let start = |identity: &str, stop: CancellationToken| {
        let mut config = Config::with_nats_url(env.nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.resync = Duration::from_secs(1);
        config.leader_election = true;
        config.lease_namespace = NS.into();
        config.lease_duration = Duration::from_secs(3);
        config.identity = Some(identity.into());
        tokio::spawn(conveyor_operator::run_with_client(
            config,
            env.cluster.client(),
            async move {
                stop.cancelled().await;
            },
        ))
    };
    let stop_a = CancellationToken::new();
    let a = start("a", stop_a.clone());
    wait_for(DEADLINE, "a to hold the lease", || async {
        holder().await.as_deref() == Some("a")
    })
    .await
    .unwrap();
    let stop_b = CancellationToken::new();
    let b = start("b", stop_b.clone());
    env.apply(&queue_yaml("q", "Delete")).await;
    env.wait_ready("q", "True", None).await;
    assert_eq!(
        holder().await.as_deref(),
        Some("a"),
        "b stands by while a renews"
    );

    stop_a.cancel();
    a.await.unwrap().expect("a exits cleanly");
    wait_for(DEADLINE, "b to take the lease over", || async {
        holder().await.as_deref() == Some("b")
    })
    .await
    .unwrap();
    // b now runs the controllers: it recreates a stream deleted behind its back.
    env.jetstream()
        .await
        .delete_stream("conveyor_team_q")
        .await
        .unwrap();
    wait_for(DEADLINE, "b to recreate the stream", || async {
        env.stream_exists("conveyor_team_q").await
    })
    .await
    .unwrap();
    stop_b.cancel();
    b.await.unwrap().expect("b exits cleanly");
    env.shutdown().await;
}

#[tokio::test]
async fn the_scaler_follows_the_backlog() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(&queue_yaml("work", "Delete")).await;
    env.apply(
        &Worker::test("work")
            .scaled(0..=4)
            .backlog_per_pod(10)
            .scale_down_after("1s")
            .yaml(),
    )
    .await;
    env.wait_ready("work", "True", None).await;
    let deployments: Api<Deployment> = Api::namespaced(env.cluster.client(), NS);
    let replicas = |want: i32| {
        let deployments = deployments.clone();
        async move {
            deployments
                .get_opt("work")
                .await
                .ok()
                .flatten()
                .and_then(|d| d.spec)
                .and_then(|s| s.replicas)
                == Some(want)
        }
    };
    wait_for(DEADLINE, "an idle pool at zero", || replicas(0))
        .await
        .unwrap();

    // No pod runs (API server only), so the 25 jobs stay pending: ceil(25 / 10) = 3 pods.
    let js = env.jetstream().await;
    for i in 0..25 {
        js.publish("conveyor.team.work.jobs.0", format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for(DEADLINE, "the pool to grow to 3", || replicas(3))
        .await
        .unwrap();
    let worker = Api::<Worker>::namespaced(env.cluster.client(), NS)
        .get("work")
        .await
        .unwrap();
    let status = worker.status.unwrap();
    assert_eq!(status.desired_replicas, Some(3));
    assert!(status.last_scale_reason.unwrap().contains("backlog 25"));
    let describe = kubectl_ok(
        &env.cluster,
        &["describe", "-n", NS, "worker", "work"],
        None,
    )
    .await;
    assert!(describe.contains("ScaledUp"), "{describe}");

    js.get_stream("conveyor_team_work")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    wait_for(
        DEADLINE,
        "the pool to shrink back to zero after the delay",
        || replicas(0),
    )
    .await
    .unwrap();
    env.shutdown().await;
}

#[tokio::test]
async fn kubectl_scale_sizes_a_pool_without_scaling() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(&queue_yaml("fixed", "Delete")).await;
    env.apply(&Worker::test("fixed").jsonl(&["/bin/handler"]).yaml())
        .await;
    let deployments: Api<Deployment> = Api::namespaced(env.cluster.client(), NS);
    let replicas = |want: i32| {
        let deployments = deployments.clone();
        async move {
            deployments
                .get_opt("fixed")
                .await
                .ok()
                .flatten()
                .and_then(|d| d.spec)
                .and_then(|s| s.replicas)
                == Some(want)
        }
    };
    wait_for(DEADLINE, "the default single pod", || replicas(1))
        .await
        .unwrap();
    kubectl_ok(
        &env.cluster,
        &["scale", "-n", NS, "worker", "fixed", "--replicas=3"],
        None,
    )
    .await;
    wait_for(DEADLINE, "the Deployment to follow kubectl scale", || {
        replicas(3)
    })
    .await
    .unwrap();
    let workers: Api<Worker> = Api::namespaced(env.cluster.client(), NS);
    wait_for(DEADLINE, "status.desiredReplicas to follow", || async {
        workers
            .get("fixed")
            .await
            .ok()
            .and_then(|w| w.status)
            .and_then(|s| s.desired_replicas)
            == Some(3)
    })
    .await
    .unwrap();
    env.shutdown().await;
}

#[tokio::test]
async fn a_queue_can_live_on_another_nats_server() {
    let mut env = Env::new().await;
    env.start_operator();
    let other = NatsServer::start().await.unwrap();
    env.apply(&JobQueue::test("elsewhere").nats_url(&other.url()).yaml())
        .await;
    env.wait_ready("elsewhere", "True", None).await;
    let js = async_nats::jetstream::new(async_nats::connect(other.url()).await.unwrap());
    assert!(
        js.get_stream("conveyor_team_elsewhere").await.is_ok(),
        "created on the override"
    );
    assert!(
        !env.stream_exists("conveyor_team_elsewhere").await,
        "not on the default server"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn an_unusable_nats_url_is_reported_as_invalid_spec() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(
        &JobQueue::test("odd")
            .nats_url("nats://bad host:4222")
            .yaml(),
    )
    .await;
    let message = env.wait_ready("odd", "False", Some("InvalidSpec")).await;
    assert!(message.contains("bad host"), "{message}");
    // Other queues are not held up by the bad one.
    env.apply(&queue_yaml("fine", "Delete")).await;
    env.wait_ready("fine", "True", None).await;
    env.shutdown().await;
}

#[tokio::test]
async fn observed_generation_follows_spec_changes_and_transition_times_hold() {
    let mut env = Env::new().await;
    env.start_operator();
    env.apply(&queue_yaml("gen", "Delete")).await;
    env.wait_ready("gen", "True", None).await;
    let api = env.queues();
    // Every condition and the status itself describe generation `g`.
    let observed = |g: i64| {
        let api = api.clone();
        async move {
            wait_for(DEADLINE, "the status to observe the generation", || async {
                let q = api.get("gen").await.unwrap();
                let status = q.status.unwrap_or_default();
                status.observed_generation == Some(g)
                    && !status.conditions.is_empty()
                    && status
                        .conditions
                        .iter()
                        .all(|c| c.observed_generation == Some(g))
            })
            .await
            .unwrap();
            api.get("gen").await.unwrap()
        }
    };
    let first = api.get("gen").await.unwrap().metadata.generation.unwrap();
    let before = observed(first).await;
    // Where the queue lives, for `kubectl conveyor` to find it.
    let nats_url = before.status.as_ref().and_then(|s| s.nats_url.clone());
    assert_eq!(nats_url, Some(env.nats.url()));
    let ready_since = |q: &JobQueue| {
        let status = q.status.as_ref().unwrap();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        ready.unwrap().last_transition_time.clone()
    };

    // Metadata is not spec: the generation stays.
    kubectl_ok(
        &env.cluster,
        &["annotate", "-n", NS, "jobqueue", "gen", "team=thumbnails"],
        None,
    )
    .await;
    let annotated = api.get("gen").await.unwrap();
    assert_eq!(annotated.metadata.generation, Some(first));

    // A spec change bumps it; the operator catches up and Ready keeps its transition time.
    env.apply(
        &JobQueue::test("gen")
            .deletion_policy("Delete")
            .alert_when_pending_over(5)
            .yaml(),
    )
    .await;
    let second = api.get("gen").await.unwrap().metadata.generation.unwrap();
    assert_eq!(second, first + 1);
    let after = observed(second).await;
    assert_eq!(ready_since(&after), ready_since(&before));
    env.shutdown().await;
}
