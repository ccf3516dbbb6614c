//! The chart's RBAC is exactly what the operator uses. The operator runs a representative
//! workload through the Kubernetes test double as the chart's ServiceAccount (impersonated, so
//! the double records its requests apart): a queue with a credentials Secret and a Worker,
//! scaling up and down (with a busy pod to keep), recycling, a dead letter requeued twice,
//! leader election, deleting the Worker and the queue. The permissions those requests needed
//! (`DevCluster::access`) are compared with the rules of the chart's ClusterRole and
//! leader-election Role, rendered by Helm's own template engine (`scripts/render-chart.py`).
//! The test fails when the code uses a permission the chart lacks and when the chart grants one
//! the code never used.
//!
//! Scope: the JobSchedule and Workflow controllers' rules (`jobschedules*`, `workflows*`) are
//! left out of both sides; this workload runs neither, so they are not checked here. Needs `make deps` (the
//! `helm-python-sdk` module) and `cargo build -p conveyor-worker --bins` first.

mod worker_env;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use conveyor::connect::{Auth, NatsOptions, Secret as Hidden};
use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_crds::JobQueue;
use conveyor_devcluster::audit::Access;
use conveyor_testkit::{NatsServer, dead_letters, wait_for};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde::Deserialize as _;
use serde_json::Value;
use worker_env::{Env, NS};

/// The operator's identity: the chart's ServiceAccount in the release namespace.
const RELEASE_NS: &str = "conveyor";
const USER: &str = "system:serviceaccount:conveyor:conveyor";
/// The password of the queue's own NATS server, read from the Secret the queue names.
const PASSWORD: &str = "audit-pa55";
const DEADLINE: Duration = Duration::from_secs(90);
/// Resources of other controllers, left out of the comparison (see the module doc).
const OUT_OF_SCOPE: [&str; 2] = ["jobschedules", "workflows"];

/// The Worker, recycling its pods after `max_age` when one is given. One job per pod at a time;
/// a job's payload is how long it sleeps, or `fail` for a permanent failure (exit 65).
fn worker(max_age: Option<&str>) -> String {
    let recycle = max_age.map_or(String::new(), |age| {
        format!("\n  recycle: {{maxAge: {age}}}")
    });
    format!(
        r#"apiVersion: conveyor.dev/v1alpha1
kind: Worker
metadata: {{name: audit}}
spec:
  queue: audit{recycle}
  scaling: {{minReplicas: 1, maxReplicas: 2, targetBacklogPerReplica: 1, scaleDownDelay: 0s}}
  handler:
    mode: exec
    command: ["python3", "-c", "import sys, time; d = sys.stdin.read(); sys.exit(65) if d == 'fail' else time.sleep(float(d))"]
  template:
    spec:
      terminationGracePeriodSeconds: 10
      containers:
        - name: handler
          image: ghcr.io/conveyor-dev/handler
"#
    )
}

/// The permissions the chart's ClusterRole and Role (each rule's groups x resources x verbs)
/// grant, as Helm renders them.
fn chart_grants() -> BTreeSet<Access> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .arg(repo.join("scripts/render-chart.py"))
        .args(["--name", "conveyor", "--namespace", RELEASE_NS])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "rendering the chart failed (make deps installs helm-python-sdk): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut grants = BTreeSet::new();
    for role in objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("ClusterRole" | "Role")))
    {
        if role["kind"] == "Role" {
            assert_eq!(
                role["metadata"]["namespace"], RELEASE_NS,
                "a Role only grants in the release namespace, where the operator's Lease is"
            );
        }
        for rule in role["rules"].as_array().unwrap() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.insert(Access::new(&group, &resource, &verb));
                    }
                }
            }
        }
    }
    grants
}

fn in_scope(access: &Access) -> bool {
    !(access.group == "conveyor.dev"
        && OUT_OF_SCOPE
            .iter()
            .any(|resource| access.resource.starts_with(resource)))
}

fn credentials_secret() -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("audit-creds".into()),
            ..Default::default()
        },
        string_data: Some(
            [
                ("user".to_owned(), "conveyor".to_owned()),
                ("password".to_owned(), PASSWORD.to_owned()),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// Annotates the queue with a dead-letter request and waits until the operator removed it.
async fn request_requeue(env: &Env, queues: &Api<JobQueue>) {
    env.kubectl(&[
        "annotate",
        "--overwrite",
        "jobqueue",
        "audit",
        "conveyor.dev/dlq-requeue=all",
    ])
    .await;
    wait_for(DEADLINE, "the requeue request handled", || async {
        queues
            .get("audit")
            .await
            .is_ok_and(|q| !q.annotations().contains_key("conveyor.dev/dlq-requeue"))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_chart_grants_exactly_what_the_operator_uses() {
    let env = Env::start_as(Some(USER), |c| {
        c.leader_election = true;
        c.lease_namespace = RELEASE_NS.into();
        c.identity = Some("conveyor-0".into());
    })
    .await;
    env.kubectl(&["create", "namespace", RELEASE_NS]).await;
    let nats = NatsServer::builder()
        .user_password("conveyor", PASSWORD)
        .start()
        .await
        .unwrap();
    let client = env.cluster.client();
    Api::<Secret>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &credentials_secret())
        .await
        .unwrap();
    env.apply(&format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: audit}}\nspec:\n  timeout: 60s\n  retry: {{maxAttempts: 1}}\n  nats: {{url: '{}', credentialsSecret: audit-creds}}\n",
        nats.url()
    ))
    .await;
    env.apply(&worker(None)).await;
    let queue = QueueRef::new(NS, "audit");

    // Scale up: a long job and four short ones ask for the 2 pods allowed; scaling down to 1
    // while the long job runs marks the busy pod expensive to delete (a pod patch).
    let options = NatsOptions::new(&nats.url())
        .unwrap()
        .auth(Auth::UserPassword {
            user: "conveyor".into(),
            password: Hidden::new(PASSWORD),
        });
    let jobs = Client::connect_with(&options.unwrap()).await.unwrap();
    let js = jobs.jetstream();
    wait_for(DEADLINE, "the queue's stream", || async {
        js.get_stream(queue.stream()).await.is_ok()
    })
    .await
    .unwrap();
    jobs.submit(&queue, Job::new("long", "40")).await.unwrap();
    for i in 0..4 {
        jobs.submit(&queue, Job::new(format!("short-{i}"), "0.5"))
            .await
            .unwrap();
    }
    wait_for(DEADLINE, "the Deployment scaled to 2", || async {
        env.deployment_replicas("audit").await == Some(2)
    })
    .await
    .unwrap();
    wait_for(DEADLINE, "the Deployment scaled down to 1", || async {
        env.deployment_replicas("audit").await == Some(1)
    })
    .await
    .unwrap();

    // Recycling: once maxAge is set, pods older than 3 s are replaced.
    env.apply(&worker(Some("3s"))).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let selector = ListParams::default().labels("conveyor.dev/worker=audit");
    let first: BTreeSet<String> = pods
        .list(&selector)
        .await
        .unwrap()
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    wait_for(DEADLINE, "a pod recycled", || async {
        pods.list(&selector).await.is_ok_and(|l| {
            l.iter()
                .any(|p| first.contains(&p.name_any()) && p.metadata.deletion_timestamp.is_some())
        })
    })
    .await
    .unwrap();

    // A dead letter, requeued twice (it fails again): the second Event repeats the first.
    let queues: Api<JobQueue> = Api::namespaced(client.clone(), NS);
    for _ in 0..2 {
        if dead_letters::count(js, &queue).await == 0 {
            jobs.submit(&queue, Job::new("doomed", "fail"))
                .await
                .unwrap();
        }
        wait_for(DEADLINE, "the job dead-lettered", || async {
            dead_letters::count(js, &queue).await == 1
        })
        .await
        .unwrap();
        request_requeue(&env, &queues).await;
    }

    // Deleting the Worker and the queue (its finalizer removes the streams).
    env.kubectl(&["delete", "worker", "audit", "--wait=false"])
        .await;
    env.kubectl(&["delete", "jobqueue", "audit", "--wait=false"])
        .await;
    wait_for(DEADLINE, "the JobQueue gone", || async {
        queues.get_opt("audit").await.is_ok_and(|q| q.is_none())
    })
    .await
    .unwrap();

    // Leader election: the holder renews its Lease every third of the Lease's duration, so a
    // workload that finished quickly may not have renewed it yet. Wait for a renewal rather
    // than count on how long the workload took.
    let renewal = Access::new("coordination.k8s.io", "leases", "update");
    wait_for(DEADLINE, "the operator to renew its Lease", || async {
        env.cluster.access(USER).contains(&renewal)
    })
    .await
    .unwrap();

    let used: BTreeSet<Access> = env
        .cluster
        .access(USER)
        .into_iter()
        .filter(in_scope)
        .collect();
    let granted: BTreeSet<Access> = chart_grants().into_iter().filter(in_scope).collect();
    env.shutdown().await;
    let lacking: Vec<String> = used.difference(&granted).map(Access::to_string).collect();
    let unused: Vec<String> = granted.difference(&used).map(Access::to_string).collect();
    assert!(
        lacking.is_empty() && unused.is_empty(),
        "charts/conveyor/templates/rbac.yaml differs from what the operator used.\n\
         used but not granted: {lacking:?}\ngranted but never used: {unused:?}\nused: {:?}",
        used.iter().map(Access::to_string).collect::<Vec<_>>()
    );
}
