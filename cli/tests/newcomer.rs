//! What a newcomer reads when a name is wrong or a flag is optional, from the real binary:
//! `conveyor status nosuch` against the Kubernetes test double names the missing JobQueue
//! (instead of a debug dump and advice about --nats-url), and `conveyor dlq requeue` usage does
//! not present `--nats-url` as required and names the queue first, in the order arguments are read.

use std::path::Path;

use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::kubectl::Kubectl;
use tokio::process::Command;

async fn conveyor(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("CONVEYOR_NATS_URL")
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("CONVEYOR_KUBE_CONTEXT")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("conveyor runs")
}

#[tokio::test]
async fn status_of_a_missing_queue_names_it() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/jobqueues.yaml");
    let applied = Kubectl::new(cluster.kubeconfig_path())
        .run(&["apply", "-f", crd.to_str().unwrap()], None)
        .await;
    assert!(applied.ok, "{applied:?}");
    let out = conveyor(cluster.kubeconfig_path(), &["status", "nosuch"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim(),
        "error: no JobQueue nosuch in namespace default",
        "{stderr}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn dlq_requeue_usage_shows_nats_url_as_optional() {
    let out = conveyor(Path::new("/nonexistent"), &["dlq", "requeue"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let usage = stderr
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_else(|| panic!("no usage line: {stderr}"));
    assert!(!usage.contains("--nats-url <"), "{usage}");
    assert!(
        usage.contains("requeue [OPTIONS] <QUEUE> <ID|--error <TEXT>|--all>"),
        "the queue comes first, as the arguments are read: {usage}"
    );
    let help = conveyor(Path::new("/nonexistent"), &["dlq", "requeue", "--help"]).await;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--nats-url"), "{help}");
}
