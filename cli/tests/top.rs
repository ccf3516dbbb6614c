//! `conveyor top` against the Kubernetes test double: the figures, rates and conditions the
//! operator keeps in a JobQueue's and a Worker's status (written here as the operator writes
//! them, so the CLI is tested on its own) show in one view with `--once`, and without it the
//! views keep coming at `--interval` until the process is stopped.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use conveyor_crds::{JobQueue, Worker};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::Kubectl;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const NS: &str = "team";
const DEADLINE: Duration = Duration::from_secs(30);

fn command(cluster: &DevCluster, program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env("KUBECACHEDIR", cluster.state_dir().join("kubectl-cache"))
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("CONVEYOR_KUBE_CONTEXT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
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

#[tokio::test]
async fn top_shows_the_queues_and_workers_of_a_namespace_and_refreshes() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let kubectl = Kubectl::new(cluster.kubeconfig_path());
    for crd in ["jobqueues.yaml", "workers.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crds")
            .join(crd);
        kubectl
            .ok(&["apply", "-f", path.to_str().unwrap()], None)
            .await;
    }
    kubectl.ok(&["create", "namespace", NS], None).await;
    let queues: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    let workers: Api<Worker> = Api::namespaced(cluster.client(), NS);
    queues
        .create(
            &PostParams::default(),
            &JobQueue::test("thumbnails").build(),
        )
        .await
        .unwrap();
    workers
        .create(
            &PostParams::default(),
            &Worker::test("thumbs")
                .queue("thumbnails")
                .exec(&["/h"])
                .image("h")
                .build(),
        )
        .await
        .unwrap();
    let condition = |type_: &str, status: &str, reason: &str| {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    let status = serde_json::json!({"status": {"pending": 1200, "inFlight": 8, "delayed": 3,
        "deadLettered": 10, "oldestPendingAge": "4m10s", "submittedPerSecond": "35",
        "finishedPerSecond": "8.5", "conditions": [
            condition("Ready", "True", "StreamReady"),
            condition("Backlogged", "True", "DepthOverThreshold")]}});
    queues
        .patch_status(
            "thumbnails",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    let status = serde_json::json!({"status": {"replicas": 2, "readyReplicas": 0,
        "desiredReplicas": 2, "busy": 8, "slots": 0, "recycledPods": 3, "conditions": [
            condition("Available", "False", "NoReadyPods")]}});
    workers
        .patch_status("thumbs", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let conveyor = env!("CARGO_BIN_EXE_conveyor");
    let text = ok(&command(&cluster, conveyor, &["top", "--once", "-n", NS])
        .output()
        .await
        .unwrap());
    for expected in [
        "conveyor top — namespace team — ",
        "QUEUE       PENDING  IN FLIGHT  DELAYED  DEAD  OLDEST  IN/S  DONE/S  STATE",
        "thumbnails  1200     8          3        10    4m10s   35    8.5     Backlogged: DepthOverThreshold",
        "WORKER  QUEUE       READY  BUSY/SLOTS  RECYCLED  STATE",
        "thumbs  thumbnails  0/2    8/0         3         Available: NoReadyPods",
    ] {
        assert!(text.contains(expected), "{expected:?} in\n{text}");
    }
    assert_eq!(text.matches("conveyor top — ").count(), 1, "{text}");
    let text = ok(
        &command(&cluster, conveyor, &["top", "--once", "-n", "nobody"])
            .output()
            .await
            .unwrap(),
    );
    assert!(text.contains("no JobQueues in namespace nobody"), "{text}");

    // Without --once the views keep coming (one after the other: stdout is a pipe here).
    let mut child = command(
        &cluster,
        conveyor,
        &["top", "-n", NS, "--interval", "100ms"],
    )
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let three_views = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        while seen.matches("conveyor top — ").count() < 3 {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "conveyor top ended early:\n{seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(
        three_views.is_ok(),
        "fewer than 3 views in {DEADLINE:?}:\n{seen}"
    );
    assert!(!seen.contains('\x1b'), "no terminal codes into a pipe");
    child.kill().await.unwrap();
    cluster.shutdown().await;
}
