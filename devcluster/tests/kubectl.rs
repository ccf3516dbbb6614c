//! The devcluster driven by the real kubectl: apply (client- and server-side), get with printer
//! columns, describe, explain, scale, annotate, label selectors, watch, delete, CEL rejections.

mod common;

use std::time::{Duration, Instant};

use common::*;
use conveyor_devcluster::{DevCluster, Options};
use tokio::io::AsyncBufReadExt;

const WIDGET: &str = "
apiVersion: test.devcluster.io/v1
kind: Widget
metadata:
  name: w1
  labels: {team: blue}
spec:
  color: red
";

#[tokio::test]
async fn client_side_apply_and_printer_columns() {
    let cluster = api_cluster().await;
    install_widgets(&cluster).await;
    let out = kubectl_ok(&cluster, &["apply", "-f", "-"], Some(WIDGET)).await;
    assert!(
        out.contains("widget.test.devcluster.io/w1 created"),
        "{out}"
    );
    let out = kubectl_ok(&cluster, &["apply", "-f", "-"], Some(WIDGET)).await;
    assert!(out.contains("unchanged"), "{out}");
    let out = kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(&WIDGET.replace("red", "green")),
    )
    .await;
    assert!(out.contains("configured"), "{out}");

    let table = kubectl_ok(&cluster, &["get", "widgets"], None).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["NAME", "COLOR", "REPLICAS", "READY", "AGE"]);
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(
        &row[..3],
        ["w1", "green", "1"],
        "defaulted replicas shown: {table}"
    );

    // Short name, category, label selectors.
    assert!(
        kubectl_ok(&cluster, &["get", "wd", "-o", "name"], None)
            .await
            .contains("widget.test.devcluster.io/w1")
    );
    assert!(
        kubectl_ok(&cluster, &["get", "devtest", "-o", "name"], None)
            .await
            .contains("w1")
    );
    assert!(
        kubectl_ok(
            &cluster,
            &["get", "wd", "-l", "team in (blue,red)", "-o", "name"],
            None
        )
        .await
        .contains("w1")
    );
    assert!(
        kubectl_ok(
            &cluster,
            &["get", "wd", "-l", "team!=blue", "-o", "name"],
            None
        )
        .await
        .is_empty()
    );

    let described = kubectl_ok(&cluster, &["describe", "widget", "w1"], None).await;
    assert!(described.contains("Name:         w1"), "{described}");
    assert!(described.contains("Color:"), "{described}");
    let explained = kubectl_ok(&cluster, &["explain", "widget.spec.color"], None).await;
    assert!(
        explained.contains("The colour of the widget."),
        "{explained}"
    );

    let out = kubectl_ok(&cluster, &["delete", "widget", "w1"], None).await;
    assert!(out.contains("deleted"), "{out}");
    let gone = kubectl(&cluster, &["get", "widget", "w1"], None).await;
    assert!(!gone.ok && gone.stderr.contains("NotFound"), "{gone:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_with_conflicts() {
    let cluster = api_cluster().await;
    install_widgets(&cluster).await;
    let w = WIDGET.replace("color: red", "color: red\n  replicas: 2");
    let out = kubectl_ok(&cluster, &["apply", "--server-side", "-f", "-"], Some(&w)).await;
    assert!(out.contains("serverside-applied"), "{out}");
    let before = kubectl_ok(
        &cluster,
        &[
            "get",
            "wd",
            "w1",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
        None,
    )
    .await;
    kubectl_ok(&cluster, &["apply", "--server-side", "-f", "-"], Some(&w)).await;
    let after = kubectl_ok(
        &cluster,
        &[
            "get",
            "wd",
            "w1",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
        None,
    )
    .await;
    assert_eq!(
        before, after,
        "re-applying the same configuration changes nothing"
    );
    let other = w.replace("replicas: 2", "replicas: 3");
    let conflict = kubectl(
        &cluster,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            "-",
        ],
        Some(&other),
    )
    .await;
    assert!(!conflict.ok, "{conflict:?}");
    assert!(
        conflict.stderr.contains("conflict with \"kubectl\""),
        "{}",
        conflict.stderr
    );
    assert!(
        conflict.stderr.contains(".spec.replicas"),
        "{}",
        conflict.stderr
    );
    kubectl_ok(
        &cluster,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&other),
    )
    .await;
    let replicas = kubectl_ok(
        &cluster,
        &["get", "wd", "w1", "-o", "jsonpath={.spec.replicas}"],
        None,
    )
    .await;
    assert_eq!(replicas, "3");
    let managers = kubectl_ok(
        &cluster,
        &[
            "get",
            "wd",
            "w1",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
        None,
    )
    .await;
    assert!(
        managers.contains("kubectl") && managers.contains("other"),
        "{managers}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn cel_rule_violation_is_rejected_at_apply() {
    let cluster = api_cluster().await;
    install_widgets(&cluster).await;
    let bad = WIDGET.replace(
        "color: red",
        "color: red\n  minReplicas: 5\n  maxReplicas: 2",
    );
    let run = kubectl(&cluster, &["apply", "-f", "-"], Some(&bad)).await;
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("minReplicas must not exceed maxReplicas"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("spec"), "{}", run.stderr);
    let enum_bad = kubectl(
        &cluster,
        &["apply", "-f", "-"],
        Some(&WIDGET.replace("red", "purple")),
    )
    .await;
    assert!(
        enum_bad
            .stderr
            .contains("spec.color: Unsupported value: \"purple\""),
        "{}",
        enum_bad.stderr
    );
    let unknown = kubectl(
        &cluster,
        &["apply", "-f", "-"],
        Some(&WIDGET.replace("color: red", "color: red\n  junk: 1")),
    )
    .await;
    assert!(
        unknown.stderr.contains("unknown field \"spec.junk\""),
        "{}",
        unknown.stderr
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn scale_and_annotate() {
    let cluster = api_cluster().await;
    install_widgets(&cluster).await;
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(WIDGET)).await;
    kubectl_ok(
        &cluster,
        &["scale", "widget", "w1", "--replicas", "4"],
        None,
    )
    .await;
    assert_eq!(
        kubectl_ok(
            &cluster,
            &["get", "wd", "w1", "-o", "jsonpath={.spec.replicas}"],
            None
        )
        .await,
        "4"
    );

    let deployment = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, image: ghcr.io/conveyor-dev/hello}]
";
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(deployment)).await;
    kubectl_ok(
        &cluster,
        &["scale", "deployment", "web", "--replicas", "3"],
        None,
    )
    .await;
    let got = kubectl_ok(
        &cluster,
        &[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas}/{.metadata.generation}",
        ],
        None,
    )
    .await;
    assert_eq!(got, "3/2");
    let table = kubectl_ok(&cluster, &["get", "deploy"], None).await;
    assert!(
        table.starts_with("NAME") && table.contains("UP-TO-DATE") && table.contains("0/3"),
        "{table}"
    );

    kubectl_ok(
        &cluster,
        &["annotate", "deployment", "web", "example.com/owner=me"],
        None,
    )
    .await;
    let ann = kubectl_ok(
        &cluster,
        &[
            "get",
            "deploy",
            "web",
            "-o",
            r"jsonpath={.metadata.annotations.example\.com/owner}",
        ],
        None,
    )
    .await;
    assert_eq!(ann, "me");
    let gen_after = kubectl_ok(
        &cluster,
        &[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.metadata.generation}",
        ],
        None,
    )
    .await;
    assert_eq!(gen_after, "2", "metadata changes do not bump generation");
    cluster.shutdown().await;
}

#[tokio::test]
async fn get_watch_sees_changes() {
    let cluster = api_cluster().await;
    install_widgets(&cluster).await;
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(WIDGET)).await;
    let mut child = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(["get", "widgets", "-w", "--output-watch-events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl get -w runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a watch line within 20s")
            .expect("readable")
            .expect("a line")
    };
    let header = next().await;
    assert!(
        header.contains("EVENT") && header.contains("COLOR"),
        "{header}"
    );
    assert!(next().await.contains("ADDED"));
    kubectl_ok(
        &cluster,
        &[
            "patch",
            "widget",
            "w1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"color":"blue"}}"#,
        ],
        None,
    )
    .await;
    let modified = next().await;
    assert!(
        modified.contains("MODIFIED") && modified.contains("blue"),
        "{modified}"
    );
    kubectl_ok(&cluster, &["delete", "widget", "w1"], None).await;
    assert!(next().await.contains("DELETED"));
    drop(child);
    cluster.shutdown().await;
}

#[tokio::test]
async fn builtin_kinds_apply_get_describe_delete() {
    let cluster = api_cluster().await;
    let manifests = "
apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: team}
data: {a: '1'}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: team, labels: {app: p}}
spec:
  containers:
  - name: c
    image: busybox
    env: [{name: A, value: '1'}]
";
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(manifests)).await;
    // Client-side apply of a change uses a strategic merge patch keyed by container/env name.
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(&manifests.replace("value: '1'", "value: '2'")),
    )
    .await;
    let env = kubectl_ok(
        &cluster,
        &[
            "-n",
            "team",
            "get",
            "pod",
            "p",
            "-o",
            "jsonpath={.spec.containers[0].env[0].value}",
        ],
        None,
    )
    .await;
    assert_eq!(env, "2");
    let pods = kubectl_ok(&cluster, &["-n", "team", "get", "pods"], None).await;
    let header: Vec<&str> = pods
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert!(pods.contains("Pending"), "{pods}");
    let described = kubectl_ok(&cluster, &["-n", "team", "describe", "pod", "p"], None).await;
    assert!(
        described.contains("Status:") && described.contains("Pending"),
        "{described}"
    );
    let described = kubectl_ok(&cluster, &["describe", "node", "devcluster"], None).await;
    assert!(described.contains("devcluster"), "{described}");
    // Deleting the namespace deletes its contents.
    kubectl_ok(
        &cluster,
        &[
            "delete",
            "namespace",
            "team",
            "--wait=true",
            "--timeout=20s",
        ],
        None,
    )
    .await;
    let left = kubectl(
        &cluster,
        &["get", "configmap", "settings", "-n", "team"],
        None,
    )
    .await;
    assert!(!left.ok, "{left:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn starts_fast_and_many_run_in_parallel() {
    let started = Instant::now();
    let first = DevCluster::start(Options::api_only())
        .await
        .expect("starts");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    let clusters =
        futures::future::join_all((0..8).map(|_| DevCluster::start(Options::api_only()))).await;
    let clusters: Vec<DevCluster> = clusters.into_iter().map(|c| c.expect("starts")).collect();
    let urls: std::collections::HashSet<&str> = clusters.iter().map(DevCluster::url).collect();
    assert_eq!(urls.len(), 8, "each cluster has its own port");
    // Each cluster is independent.
    let cm = |name: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\n");
    kubectl_ok(&clusters[0], &["apply", "-f", "-"], Some(&cm("only-here"))).await;
    assert!(
        kubectl(&clusters[1], &["get", "cm", "only-here"], None)
            .await
            .stderr
            .contains("NotFound")
    );
    for c in clusters {
        c.shutdown().await;
    }
    first.shutdown().await;
}

#[tokio::test]
async fn describe_shows_events_recorded_by_kube_rs() {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let cluster = api_cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: target}\n"),
    )
    .await;
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::default_namespaced(cluster.client());
    let target = api.get("target").await.expect("get");
    let recorder = Recorder::new(
        cluster.client(),
        Reporter {
            controller: "test-controller".into(),
            instance: Some("test-1".into()),
        },
    );
    let ev = Event {
        type_: EventType::Warning,
        reason: "SomethingBroke".into(),
        note: Some("the widget fell over".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder
        .publish(&ev, &target.object_ref(&()))
        .await
        .expect("first event");
    recorder
        .publish(&ev, &target.object_ref(&()))
        .await
        .expect("repeated event (series)");
    let described = kubectl_ok(&cluster, &["describe", "configmap", "target"], None).await;
    assert!(described.contains("SomethingBroke"), "{described}");
    assert!(described.contains("the widget fell over"), "{described}");
    assert!(
        described.contains("x2 over"),
        "a repeated event is aggregated: {described}"
    );
    let events = kubectl_ok(&cluster, &["get", "events"], None).await;
    assert!(
        events.contains("configmap/target") && events.contains("SomethingBroke"),
        "{events}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn logs_are_served_from_the_kubelet_files() {
    let cluster = api_cluster().await;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: talker}\nspec:\n  containers: [{name: main, image: x}]\n";
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(pod)).await;
    let dir = cluster.logs_dir().join("default").join("talker");
    std::fs::create_dir_all(&dir).expect("log dir");
    std::fs::write(dir.join("main.log"), "one\ntwo\nthree\n").expect("log");
    std::fs::write(dir.join("main.previous.log"), "before the crash\n").expect("log");
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "talker"], None).await,
        "one\ntwo\nthree\n"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "talker", "--tail", "1"], None).await,
        "three\n"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "talker", "--previous"], None).await,
        "before the crash\n"
    );

    let mut follow = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(["logs", "-f", "talker"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl logs -f runs");
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().expect("stdout")).lines();
    for want in ["one", "two", "three"] {
        assert_eq!(
            lines.next_line().await.expect("read").as_deref(),
            Some(want)
        );
    }
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("main.log"))
            .expect("open");
        f.write_all(b"four\n").expect("append");
    }
    let next = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a new line in time");
    assert_eq!(next.expect("read").as_deref(), Some("four"));
    // The stream ends when the pod is gone.
    kubectl_ok(&cluster, &["delete", "pod", "talker"], None).await;
    let end = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("stream ends in time");
    assert_eq!(end.expect("read"), None);
    cluster.shutdown().await;
}

#[tokio::test]
async fn kubectl_create_generators_work_for_simple_kinds() {
    let cluster = api_cluster().await;
    kubectl_ok(&cluster, &["create", "namespace", "made"], None).await;
    kubectl_ok(
        &cluster,
        &[
            "-n",
            "made",
            "create",
            "configmap",
            "cfg",
            "--from-literal",
            "a=1",
        ],
        None,
    )
    .await;
    kubectl_ok(
        &cluster,
        &[
            "-n",
            "made",
            "create",
            "secret",
            "generic",
            "creds",
            "--from-literal",
            "pw=hunter2",
        ],
        None,
    )
    .await;
    let data = kubectl_ok(
        &cluster,
        &["-n", "made", "get", "cm", "cfg", "-o", "jsonpath={.data.a}"],
        None,
    )
    .await;
    assert_eq!(data, "1");
    let secret = kubectl_ok(
        &cluster,
        &[
            "-n",
            "made",
            "get",
            "secret",
            "creds",
            "-o",
            "jsonpath={.data.pw}",
        ],
        None,
    )
    .await;
    assert_eq!(secret, "aHVudGVyMg==");
    let meta = kubectl_ok(
        &cluster,
        &[
            "-n",
            "made",
            "get",
            "secret",
            "creds",
            "-o",
            "jsonpath={.metadata}",
        ],
        None,
    )
    .await;
    assert!(!meta.contains("generateName"), "{meta}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_project_crds_and_examples_apply() {
    let cluster = api_cluster().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crds = [
        root.join("crds/jobqueues.yaml"),
        root.join("crds/workers.yaml"),
    ];
    for crd in &crds {
        let path = crd.to_str().expect("utf-8 path");
        kubectl_ok(&cluster, &["apply", "-f", path], None).await;
        // Large CRDs (the Worker embeds a pod template) also go through server-side apply.
        kubectl_ok(
            &cluster,
            &["apply", "--server-side", "--force-conflicts", "-f", path],
            None,
        )
        .await;
    }
    kubectl_ok(
        &cluster,
        &[
            "wait",
            "--for",
            "condition=Established",
            "crd",
            "--all",
            "--timeout",
            "20s",
        ],
        None,
    )
    .await;
    let examples = root.join("examples/hello");
    let mut applied = 0;
    for entry in std::fs::read_dir(&examples).expect("examples/hello") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            kubectl_ok(
                &cluster,
                &["apply", "-f", path.to_str().expect("utf-8 path")],
                None,
            )
            .await;
            applied += 1;
        }
    }
    assert!(applied > 0, "examples/hello has manifests");
    let listed = kubectl_ok(&cluster, &["get", "jobqueues,workers", "-o", "name"], None).await;
    assert!(
        listed.contains("jobqueue.conveyor.dev/") && listed.contains("worker.conveyor.dev/"),
        "{listed}"
    );
    cluster.shutdown().await;
}
