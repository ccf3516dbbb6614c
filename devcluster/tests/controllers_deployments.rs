//! The Deployment and ReplicaSet controllers with the process kubelet, driven by the real
//! kubectl: readiness through a probe, scaling with pod-deletion-cost, rolling updates,
//! replacement of deleted pods.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{kubectl_ok, wait_for};
use conveyor_devcluster::{DevCluster, Options};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use kube::Api;
use kube::api::ListParams;

async fn cluster() -> DevCluster {
    DevCluster::start(Options::default())
        .await
        .expect("devcluster starts")
}

/// Pods of app `app` that are not being deleted, with whether they are ready.
async fn live_pods(cluster: &DevCluster, app: &str) -> Vec<(String, bool)> {
    let pods = Api::<Pod>::default_namespaced(cluster.client())
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list pods");
    pods.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let ready = p
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (p.metadata.name.unwrap_or_default(), ready)
        })
        .collect()
}

async fn wait_ready_pods(cluster: &DevCluster, app: &str, n: usize) -> Vec<String> {
    wait_for(
        &format!("{n} ready pods of {app}"),
        Duration::from_secs(40),
        || async {
            let pods = live_pods(cluster, app).await;
            (pods.len() == n && pods.iter().all(|(_, ready)| *ready))
                .then(|| pods.into_iter().map(|(name, _)| name).collect())
        },
    )
    .await
}

/// A Deployment of `sh` loops (ready as soon as they run), `replicas` of them.
fn sleeper(name: &str, replicas: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: main
        image: busybox
        command: ["sh", "-c", "exec sleep 300"]
"#
    )
}

#[tokio::test]
async fn deployment_becomes_ready_through_its_readiness_probe() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: http
        image: python
        command: ["python3", "-m", "http.server", "8080", "--bind", "$(POD_IP)"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 1
"#,
        ),
    )
    .await;
    kubectl_ok(
        &cluster,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
        None,
    )
    .await;
    let d = Api::<Deployment>::default_namespaced(cluster.client())
        .get("web")
        .await
        .unwrap();
    let status = d.status.unwrap();
    assert_eq!(
        (
            status.replicas,
            status.ready_replicas,
            status.available_replicas,
            status.updated_replicas
        ),
        (Some(2), Some(2), Some(2), Some(2))
    );
    assert_eq!(status.observed_generation, d.metadata.generation);
    let conditions = status.conditions.unwrap();
    let available = conditions.iter().find(|c| c.type_ == "Available").unwrap();
    assert_eq!(available.status, "True");
    let progressing = conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        progressing.reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );
    // The pods really serve on their own IPs.
    for pod in Api::<Pod>::default_namespaced(cluster.client())
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        let ip = pod.status.unwrap().pod_ip.unwrap();
        let reply = reqwest::get(format!("http://{ip}:8080/"))
            .await
            .expect("pod answers");
        assert!(reply.status().is_success());
    }
    let described = kubectl_ok(&cluster, &["describe", "deployment", "web"], None).await;
    assert!(
        described.contains("ScalingReplicaSet"),
        "describe shows the scaling event:\n{described}"
    );
    let table = kubectl_ok(&cluster, &["get", "deployment", "web"], None).await;
    assert!(
        table.contains("2/2"),
        "kubectl get shows 2/2 ready:\n{table}"
    );
}

#[tokio::test]
async fn scaling_down_honours_pod_deletion_cost_and_scaling_up_adds_pods() {
    let cluster = cluster().await;
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(&sleeper("pool", 3))).await;
    let pods = wait_ready_pods(&cluster, "pool", 3).await;
    let (keep, cheap, other) = (&pods[0], &pods[1], &pods[2]);
    let cost = "controller.kubernetes.io/pod-deletion-cost";
    kubectl_ok(
        &cluster,
        &["annotate", "pod", keep, &format!("{cost}=100")],
        None,
    )
    .await;
    kubectl_ok(
        &cluster,
        &["annotate", "pod", other, &format!("{cost}=50")],
        None,
    )
    .await;
    kubectl_ok(
        &cluster,
        &["annotate", "pod", cheap, &format!("{cost}=-100")],
        None,
    )
    .await;

    kubectl_ok(
        &cluster,
        &["scale", "deployment/pool", "--replicas=2"],
        None,
    )
    .await;
    let left = wait_ready_pods(&cluster, "pool", 2).await;
    assert_eq!(
        left.iter().collect::<BTreeSet<_>>(),
        [keep, other].into_iter().collect::<BTreeSet<_>>()
    );
    kubectl_ok(
        &cluster,
        &["scale", "deployment/pool", "--replicas=1"],
        None,
    )
    .await;
    assert_eq!(
        wait_ready_pods(&cluster, "pool", 1).await,
        vec![keep.clone()]
    );

    kubectl_ok(
        &cluster,
        &["scale", "deployment/pool", "--replicas=3"],
        None,
    )
    .await;
    let grown = wait_ready_pods(&cluster, "pool", 3).await;
    assert!(grown.contains(keep));
    let rs = Api::<ReplicaSet>::default_namespaced(cluster.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(rs.items.len(), 1, "scaling makes no new ReplicaSet");

    // Each scaling is an Event of its own that says what happened (core/v1, as the
    // controller-manager writes them), not a count on the first one.
    let rs_name = rs.items[0].metadata.name.clone().unwrap();
    let events: Api<CoreEvent> = Api::default_namespaced(cluster.client());
    let expected: Vec<String> = [
        format!("Scaled up replica set {rs_name} from 0 to 3"),
        format!("Scaled down replica set {rs_name} from 3 to 2"),
        format!("Scaled down replica set {rs_name} from 2 to 1"),
        format!("Scaled up replica set {rs_name} from 1 to 3"),
    ]
    .into();
    let scalings = || async {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=pool"))
            .await
            .ok()?;
        let mut found: Vec<_> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("ScalingReplicaSet"))
            .collect();
        found.sort_by_key(|e| e.metadata.name.clone());
        (found.len() == expected.len()).then_some(found)
    };
    let found = wait_for("four scaling Events", Duration::from_secs(20), scalings).await;
    let said: Vec<String> = found.iter().filter_map(|e| e.message.clone()).collect();
    assert_eq!(said, expected);
    for e in &found {
        assert_eq!(e.count, Some(1));
        assert_eq!(
            e.source.as_ref().and_then(|s| s.component.as_deref()),
            Some("deployment-controller")
        );
    }
}

#[tokio::test]
async fn rolling_update_replaces_every_pod() {
    let cluster = cluster().await;
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(&sleeper("roll", 3))).await;
    kubectl_ok(
        &cluster,
        &["rollout", "status", "deployment/roll", "--timeout=60s"],
        None,
    )
    .await;
    let before: BTreeSet<String> = wait_ready_pods(&cluster, "roll", 3)
        .await
        .into_iter()
        .collect();

    kubectl_ok(
        &cluster,
        &["set", "env", "deployment/roll", "VERSION=2"],
        None,
    )
    .await;
    kubectl_ok(
        &cluster,
        &["rollout", "status", "deployment/roll", "--timeout=60s"],
        None,
    )
    .await;
    let after: BTreeSet<String> = wait_ready_pods(&cluster, "roll", 3)
        .await
        .into_iter()
        .collect();
    assert!(
        before.is_disjoint(&after),
        "every pod replaced: {before:?} → {after:?}"
    );

    let sets = Api::<ReplicaSet>::default_namespaced(cluster.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(sets.items.len(), 2);
    let replicas: BTreeSet<i32> = sets
        .items
        .iter()
        .map(|rs| rs.spec.as_ref().unwrap().replicas.unwrap())
        .collect();
    assert_eq!(replicas, [0, 3].into());
    let d = Api::<Deployment>::default_namespaced(cluster.client())
        .get("roll")
        .await
        .unwrap();
    let revision = d.metadata.annotations.unwrap()["deployment.kubernetes.io/revision"].clone();
    assert_eq!(revision, "2");
    let history = kubectl_ok(&cluster, &["rollout", "history", "deployment/roll"], None).await;
    assert!(history.contains('2'), "rollout history:\n{history}");
}

#[tokio::test]
async fn deleted_pods_are_replaced() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(&sleeper("phoenix", 2)),
    )
    .await;
    let pods = wait_ready_pods(&cluster, "phoenix", 2).await;
    kubectl_ok(&cluster, &["delete", "pod", &pods[0]], None).await;
    let now = wait_ready_pods(&cluster, "phoenix", 2).await;
    assert!(!now.contains(&pods[0]));
    assert!(now.contains(&pods[1]));
}

#[tokio::test]
async fn recreate_strategy_stops_old_pods_before_starting_new_ones() {
    let cluster = cluster().await;
    let manifest = sleeper("redo", 2).replace(
        "  replicas: 2\n",
        "  replicas: 2\n  strategy: {type: Recreate}\n",
    );
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(&manifest)).await;
    let before: BTreeSet<String> = wait_ready_pods(&cluster, "redo", 2)
        .await
        .into_iter()
        .collect();
    kubectl_ok(
        &cluster,
        &["set", "env", "deployment/redo", "VERSION=2"],
        None,
    )
    .await;
    kubectl_ok(
        &cluster,
        &["rollout", "status", "deployment/redo", "--timeout=60s"],
        None,
    )
    .await;
    let after: BTreeSet<String> = wait_ready_pods(&cluster, "redo", 2)
        .await
        .into_iter()
        .collect();
    assert!(before.is_disjoint(&after));
}
