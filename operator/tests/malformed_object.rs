//! A stored `JobQueue`, `Worker` or `JobSchedule` whose JSON does not fit its type (written
//! before a schema change, or past validation) must not stall the operator's watch for the
//! others: it is reported on the object, and the well-formed objects next to it, those there
//! before the operator started and those made after, are reconciled as usual. The broken objects go into
//! the Kubernetes test double past its schema validation (`DevCluster::store_unchecked`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, JobSchedule, Worker};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_operator::jobqueue::FINALIZER;
use conveyor_testkit::{NatsServer, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use tokio_util::sync::CancellationToken;

const KUBECTL: &str = "/usr/bin/kubectl";
const DEADLINE: Duration = Duration::from_secs(30);
const NS: &str = "team";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

async fn kubectl_ok(cluster: &DevCluster, args: &[&str]) {
    let out = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn queue(name: &str) -> JobQueue {
    let mut q = JobQueue::new(name, serde_yaml::from_str("{priorities: 1}").unwrap());
    q.metadata.namespace = Some(NS.into());
    q
}

/// The hello example's Worker as `name`, on the queue `queue`.
fn worker(name: &str, queue: &str) -> Worker {
    let mut w: Worker =
        serde_yaml::from_str(include_str!("../../examples/hello/worker.yaml")).unwrap();
    w.metadata.name = Some(name.into());
    w.metadata.namespace = Some(NS.into());
    w.spec.queue = queue.into();
    w
}

/// A JobSchedule `name` running `@hourly` on the queue `queue`.
fn schedule(name: &str, queue: &str) -> JobSchedule {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "JobSchedule",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"schedule": "@hourly", "job": {"queue": queue}},
    }))
    .unwrap()
}

/// The operator in-process on `cluster` and `nats` (resync 1 s), and the token that stops it.
fn start_operator(
    cluster: &DevCluster,
    nats: &NatsServer,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), conveyor_operator::Error>>,
) {
    let mut config = Config::with_nats_url(nats.url());
    config.http_addr = "127.0.0.1:0".parse().unwrap();
    config.resync = Duration::from_secs(1);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let operator = tokio::spawn(conveyor_operator::run_with_client(
        config,
        cluster.client(),
        async move { stopped.cancelled().await },
    ));
    (stop, operator)
}

/// The `MalformedObject` Event on the object `name`, once there is one.
async fn malformed_event(events: &Api<Event>, name: &str) -> Option<Event> {
    let what = format!("a MalformedObject Event on {name}");
    let found = || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("MalformedObject")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
    };
    wait_for(DEADLINE, &what, || async { found().await.is_some() })
        .await
        .ok()?;
    found().await
}

/// Whether the queue `name` is `Ready=True`.
async fn ready(api: &Api<JobQueue>, name: &str) -> bool {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|q| q.status)
        .is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_reported_and_the_others_still_reconcile() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    for crd in [
        "crds/jobqueues.yaml",
        "crds/workers.yaml",
        "crds/jobschedules.yaml",
    ] {
        kubectl_ok(&cluster, &["apply", "-f", repo(crd).to_str().unwrap()]).await;
    }
    kubectl_ok(&cluster, &["create", "namespace", NS]).await;
    let nats = NatsServer::start().await.unwrap();
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);

    // The broken queue is there before the operator starts, so its first list holds it.
    cluster
        .store_unchecked(serde_json::json!({
            "apiVersion": "conveyor.dev/v1alpha1",
            "kind": "JobQueue",
            "metadata": {"name": "broken", "namespace": NS},
            "spec": {"priorities": "many"},
        }))
        .unwrap();
    api.create(&PostParams::default(), &queue("before"))
        .await
        .unwrap();
    cluster
        .store_unchecked(serde_json::json!({
            "apiVersion": "conveyor.dev/v1alpha1",
            "kind": "Worker",
            "metadata": {"name": "broken-worker", "namespace": NS},
            "spec": {"queue": 7},
        }))
        .unwrap();
    let workers: Api<Worker> = Api::namespaced(cluster.client(), NS);
    workers
        .create(&PostParams::default(), &worker("good", "before"))
        .await
        .unwrap();
    cluster
        .store_unchecked(serde_json::json!({
            "apiVersion": "conveyor.dev/v1alpha1",
            "kind": "JobSchedule",
            "metadata": {"name": "broken-schedule", "namespace": NS},
            "spec": {"schedule": 5, "job": {"queue": "before"}},
        }))
        .unwrap();
    let schedules: Api<JobSchedule> = Api::namespaced(cluster.client(), NS);
    schedules
        .create(&PostParams::default(), &schedule("hourly", "before"))
        .await
        .unwrap();
    assert!(
        api.get("broken").await.is_err(),
        "the stored object does not fit the JobQueue type"
    );
    assert!(
        api.list(&ListParams::default()).await.is_err(),
        "a typed list of the queues fails on the broken one: a watch of JobQueue would stall"
    );
    assert!(
        workers.list(&ListParams::default()).await.is_err(),
        "the same for Workers"
    );
    assert!(
        schedules.list(&ListParams::default()).await.is_err(),
        "and for JobSchedules"
    );

    let (stop, operator) = start_operator(&cluster, &nats);

    wait_for(DEADLINE, "JobQueue before Ready=True", || {
        ready(&api, "before")
    })
    .await
    .unwrap();
    api.create(&PostParams::default(), &queue("after"))
        .await
        .unwrap();
    wait_for(DEADLINE, "JobQueue after Ready=True", || {
        ready(&api, "after")
    })
    .await
    .unwrap();

    let deployments: Api<Deployment> = Api::namespaced(cluster.client(), NS);
    wait_for(DEADLINE, "the Deployment of Worker good", || async {
        deployments.get_opt("good").await.ok().flatten().is_some()
    })
    .await
    .unwrap();

    wait_for(DEADLINE, "JobSchedule hourly Ready=True", || async {
        schedules
            .get_opt("hourly")
            .await
            .ok()
            .flatten()
            .and_then(|s| s.status)
            .is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    })
    .await
    .unwrap();

    let events: Api<Event> = Api::namespaced(cluster.client(), NS);
    for (name, kind, wrong) in [
        ("broken", "JobQueue", "\"many\""),
        ("broken-worker", "Worker", "7"),
        ("broken-schedule", "JobSchedule", "`5`"),
    ] {
        let event = malformed_event(&events, name)
            .await
            .unwrap_or_else(|| panic!("no MalformedObject Event on {kind} {name}"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let note = event.note.unwrap_or_default();
        assert!(note.contains(wrong), "the note says what is wrong: {note}");
        assert_eq!(event.regarding.and_then(|r| r.kind).as_deref(), Some(kind));
    }

    stop.cancel();
    operator.await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// The CRD of JobQueues as an older release may have left it (Helm does not upgrade CRDs): its
/// `spec` takes any fields, so the API server stores a spec the operator's type refuses.
fn loose_jobqueue_crd() -> String {
    let mut crd: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("crds/jobqueues.yaml")).unwrap())
            .unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    serde_json::to_string(&crd).unwrap()
}

/// A queue the operator put its finalizer on, whose stored spec no longer fits the JobQueue
/// type, is deleted: its cleanup needs the spec (which server, which deletion policy), so the
/// operator removes the finalizer and keeps the queue's streams, as `deletionPolicy: Retain`
/// would, and says so in an Event. Without that the object would wait for its finalizer
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_queue_being_deleted_is_let_go_and_its_streams_are_kept() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let crd = dir.path().join("jobqueues.json");
    std::fs::write(&crd, loose_jobqueue_crd()).unwrap();
    kubectl_ok(&cluster, &["apply", "-f", crd.to_str().unwrap()]).await;
    kubectl_ok(&cluster, &["create", "namespace", NS]).await;
    let nats = NatsServer::start().await.unwrap();
    let retired = QueueRef::new(NS, "retired");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: retired.stream(),
        subjects: vec!["retired.jobs".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let api: Api<DynamicObject> =
        Api::namespaced_with(cluster.client(), NS, &ApiResource::erase::<JobQueue>(&()));
    let object = serde_json::json!({
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "JobQueue",
        "metadata": {"name": "retired", "finalizers": [FINALIZER]},
        "spec": {"priorities": "many"},
    });
    api.create(
        &PostParams::default(),
        &serde_json::from_value(object).unwrap(),
    )
    .await
    .expect("the loose CRD stores a spec the JobQueue type refuses");

    let (stop, operator) = start_operator(&cluster, &nats);
    let events: Api<Event> = Api::namespaced(cluster.client(), NS);
    malformed_event(&events, "retired")
        .await
        .expect("the malformed queue is reported");

    api.delete("retired", &Default::default()).await.unwrap();
    wait_for(
        DEADLINE,
        "the malformed queue gone after its delete",
        || async { matches!(api.get_opt("retired").await, Ok(None)) },
    )
    .await
    .unwrap();
    js.get_stream(retired.stream())
        .await
        .expect("the deleted malformed queue's stream is kept");
    let said = wait_for(DEADLINE, "an Event saying the streams are kept", || async {
        events.list(&ListParams::default()).await.is_ok_and(|list| {
            list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("retired")
                    && e.note.as_deref().is_some_and(|n| {
                        n.contains("cleanup cannot run") && n.contains(&retired.stream())
                    })
            })
        })
    })
    .await;
    assert!(said.is_ok(), "{said:?}");

    stop.cancel();
    operator.await.unwrap().unwrap();
    cluster.shutdown().await;
}
