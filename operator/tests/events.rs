//! The operator's Events as `kubectl describe` and `kubectl get events` show them: a note is
//! bounded to what the API server accepts (the test double refuses longer ones, as a real
//! server does), a repeat of the same note is counted into one Event, and an occurrence that
//! says something new is an Event of its own, so the latest note is always visible. The last
//! test runs the operator: each `Recycled` Event names the pod replaced that time.

mod worker_env;

use std::time::Duration;

use conveyor_crds::{JobQueue, Worker};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::events::{NOTE_LIMIT, Recorder};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::wait_for;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource};
use worker_env::{Env, NS, oom_worker};

async fn kubectl(cluster: &DevCluster, args: &[&str]) -> String {
    Kubectl::new(cluster.kubeconfig_path()).ok(args, None).await
}

/// A cluster with the ConfigMap `pool` the Events are about.
async fn cluster_with_object() -> (DevCluster, ObjectReference) {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("pool".into());
    let cm = api.create(&PostParams::default(), &cm).await.unwrap();
    (cluster, cm.object_ref(&()))
}

async fn events(cluster: &DevCluster) -> Vec<Event> {
    let api: Api<Event> = Api::default_namespaced(cluster.client());
    api.list(&ListParams::default()).await.unwrap().items
}

#[tokio::test]
async fn each_scale_down_says_where_the_pool_went() {
    let (cluster, pool) = cluster_with_object().await;
    let recorder = Recorder::new(cluster.client(), "conveyor-operator", None);
    for (from, to) in [(3, 2), (2, 1), (1, 0)] {
        let note = format!("scaled down from {from} to {to}: no backlog");
        recorder
            .publish(&pool, EventType::Normal, "ScaledDown", "Reconcile", &note)
            .await
            .expect("published");
    }
    let notes: Vec<String> = events(&cluster)
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    assert_eq!(notes.len(), 3, "{notes:?}");
    let listed = kubectl(&cluster, &["get", "events"]).await;
    let described = kubectl(&cluster, &["describe", "configmap", "pool"]).await;
    for shown in [&listed, &described] {
        assert!(shown.contains("scaled down from 1 to 0"), "{shown}");
        assert!(shown.contains("scaled down from 3 to 2"), "{shown}");
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_same_note_again_is_counted_into_one_event() {
    let (cluster, pool) = cluster_with_object().await;
    let recorder = Recorder::new(cluster.client(), "conveyor-operator", None);
    for _ in 0..3 {
        recorder
            .publish(
                &pool,
                EventType::Warning,
                "WorkerCrashed",
                "Reconcile",
                "1 pod CrashLoopBackOff: pool-1",
            )
            .await
            .expect("published");
    }
    let all = events(&cluster).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].series.as_ref().map(|s| s.count), Some(3));
    let described = kubectl(&cluster, &["describe", "configmap", "pool"]).await;
    assert!(described.contains("(x3 over"), "{described}");
    // Something new is a new Event, shown next to the counted one.
    recorder
        .publish(
            &pool,
            EventType::Warning,
            "WorkerCrashed",
            "Reconcile",
            "2 pods CrashLoopBackOff: pool-1, pool-2",
        )
        .await
        .expect("published");
    assert_eq!(events(&cluster).await.len(), 2);
    let described = kubectl(&cluster, &["describe", "configmap", "pool"]).await;
    assert!(described.contains("pool-1, pool-2"), "{described}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_note_too_long_for_the_api_server_is_shortened_not_lost() {
    let (cluster, pool) = cluster_with_object().await;
    let recorder = Recorder::new(cluster.client(), "conveyor-operator", None);
    let pods: Vec<String> = (0..40)
        .map(|i| format!("{}-{i:05}", "w".repeat(50)))
        .collect();
    let note = format!("replacing pods: {}", pods.join(", "));
    assert!(note.len() > NOTE_LIMIT);
    recorder
        .publish(&pool, EventType::Normal, "Recycled", "Reconcile", &note)
        .await
        .expect("the bounded note is accepted");
    let all = events(&cluster).await;
    let shown = all[0].note.clone().unwrap_or_default();
    assert!(shown.len() <= NOTE_LIMIT, "{}", shown.len());
    assert!(shown.starts_with("replacing pods: www"), "{shown}");
    cluster.shutdown().await;
}

fn queue() -> String {
    JobQueue::test("aging").timeout("30s").yaml()
}

fn worker() -> String {
    Worker::test("aging")
        .replicas(1)
        .recycle_after("2s")
        .recycle_at_most(1)
        .exec(&["true"])
        .image("ghcr.io/conveyor-dev/handler")
        .grace_period(5)
        .yaml()
}

#[tokio::test]
async fn every_recycled_event_names_the_pod_replaced_that_time() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let api: Api<Event> = Api::namespaced(env.cluster.client(), NS);
    let recycled = || async {
        let mut notes: Vec<(String, String)> = api
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Recycled"))
            .map(|e| {
                let name = e.metadata.name.clone().unwrap_or_default();
                (name, e.note.unwrap_or_default())
            })
            .collect();
        notes.sort();
        notes
    };
    wait_for(Duration::from_secs(60), "two Recycled Events", || async {
        recycled().await.len() >= 2
    })
    .await
    .unwrap();
    let notes: Vec<String> = recycled().await.into_iter().map(|(_, n)| n).collect();
    let distinct: std::collections::BTreeSet<&String> = notes.iter().collect();
    assert_eq!(
        distinct.len(),
        notes.len(),
        "each names another pod: {notes:?}"
    );
    let latest = notes.last().unwrap();
    let pod = latest.rsplit(": ").next().unwrap();
    assert!(pod.starts_with("aging-"), "{latest}");
    let described = env.kubectl(&["describe", "worker", "aging"]).await;
    assert!(described.contains(pod), "{described}");
    env.shutdown().await;
}

/// The pool of issue #15: a 50-character Worker name and a 63-character container name, so a
/// `Degraded` message naming four or more OOM-killed pods is longer than an Event note may be.
/// The `WorkerCrashed` Event is still published (the test double refuses notes over 1 KiB, as
/// the API server does), with a summary that counts the pods.
#[tokio::test]
async fn many_oom_killed_pods_with_long_names_still_make_a_worker_crashed_event() {
    let name = format!("oom{}", "x".repeat(47));
    let container = "c".repeat(63);
    let env = Env::start().await;
    env.apply(&JobQueue::test(&name).timeout("30s").max_attempts(20).yaml())
        .await;
    env.apply(
        &oom_worker(&name, 96, "48Mi")
            .replicas(6)
            .container_name(&container)
            .yaml(),
    )
    .await;
    let queue = conveyor::names::QueueRef::new(NS, &name);
    env.wait_stream(&queue.stream()).await;
    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    for i in 0..12 {
        client
            .submit(&queue, conveyor::Job::new(format!("job-{i}"), "x"))
            .await
            .unwrap();
    }
    let message = env
        .wait_worker(
            &name,
            Duration::from_secs(90),
            "Degraded naming four OOM-killed pods",
            |w| {
                let c = w
                    .status
                    .as_ref()?
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Degraded")?;
                (c.message.matches(": OOMKilled (").count() >= 4).then(|| c.message.clone())
            },
        )
        .await;
    assert!(message.len() > NOTE_LIMIT, "{}", message.len());
    let api: Api<Event> = Api::namespaced(env.cluster.client(), NS);
    let note = wait_for(
        Duration::from_secs(30),
        "a WorkerCrashed Event for four pods",
        || async {
            api.list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("WorkerCrashed"))
                .filter_map(|e| e.note)
                .any(|n| {
                    n.split(" pods OOMKilled: ")
                        .next()
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|n| n >= 4)
                })
        },
    )
    .await;
    note.unwrap();
    env.shutdown().await;
}
