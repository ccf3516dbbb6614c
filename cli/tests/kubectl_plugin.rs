//! `kubectl conveyor`: the `conveyor` binary on `PATH` as `kubectl-conveyor`, run by the real
//! kubectl as a plugin against the Kubernetes test double. Without `--nats-url` it finds each
//! queue's NATS server from its JobQueue: `status.natsUrl` (what the operator writes), else
//! `spec.nats.url`; and it says what to do when neither is there.

use std::path::Path;
use std::process::Output;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor_crds::JobQueue;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::NatsServer;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::process::Command;

const NS: &str = "team";

/// `kubectl <args>` with the plugin directory first on PATH and the cluster's kubeconfig.
async fn kubectl(
    cluster: &DevCluster,
    plugins: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("/usr/bin/kubectl");
    command
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env_remove("CONVEYOR_NATS_URL")
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("CONVEYOR_KUBE_CONTEXT")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("kubectl runs");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        tokio::io::AsyncWriteExt::write_all(&mut pipe, text.as_bytes())
            .await
            .unwrap();
    }
    drop(pipe);
    child.wait_with_output().await.expect("kubectl ends")
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

fn pending(status_json: &str) -> u64 {
    let figures: serde_json::Value = serde_json::from_str(status_json).expect("JSON");
    figures[0]["pending"].as_u64().expect("pending")
}

#[tokio::test]
async fn kubectl_conveyor_finds_each_queues_nats_from_its_jobqueue() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let plugins = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_conveyor"),
        plugins.path().join("kubectl-conveyor"),
    )
    .unwrap();
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/jobqueues.yaml");
    ok(&kubectl(
        &cluster,
        plugins.path(),
        &["apply", "-f", crd.to_str().unwrap()],
        None,
    )
    .await);
    ok(&kubectl(&cluster, plugins.path(), &["create", "namespace", NS], None).await);

    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    for name in ["orders", "invoices", "orphans"] {
        ensure_queue(&js, &QueueRef::new(NS, name), &QueueSettings::default())
            .await
            .unwrap();
    }
    // orders names its server in spec; invoices relies on what the operator reports in status;
    // orphans has neither yet.
    let manifests = format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: orders}}\nspec: {{nats: {{url: \"{}\"}}}}\n---\n\
         apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: invoices}}\nspec: {{}}\n---\n\
         apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: orphans}}\nspec: {{}}\n",
        nats.url()
    );
    ok(&kubectl(
        &cluster,
        plugins.path(),
        &["apply", "-n", NS, "-f", "-"],
        Some(&manifests),
    )
    .await);
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    let status = serde_json::json!({"status": {"natsUrl": nats.url()}});
    api.patch_status("invoices", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    for queue in ["orders", "invoices"] {
        let submitted = ok(&kubectl(
            &cluster,
            plugins.path(),
            &[
                "conveyor",
                "submit",
                queue,
                "-n",
                NS,
                "--id",
                &format!("{queue}-1"),
                "{}",
            ],
            None,
        )
        .await);
        assert!(submitted.contains(&format!("{queue}-1")), "{submitted}");
        let figures = ok(&kubectl(
            &cluster,
            plugins.path(),
            &["conveyor", "status", queue, "-n", NS, "-o", "json"],
            None,
        )
        .await);
        assert_eq!(pending(&figures), 1, "{queue}: {figures}");
    }

    let lost = kubectl(
        &cluster,
        plugins.path(),
        &["conveyor", "submit", "orphans", "-n", NS, "{}"],
        None,
    )
    .await;
    assert!(!lost.status.success());
    let said = String::from_utf8_lossy(&lost.stderr);
    assert!(
        said.contains("JobQueue team/orphans does not say where its NATS is yet")
            && said.contains("pass --nats-url"),
        "{said}"
    );
    let missing = kubectl(
        &cluster,
        plugins.path(),
        &["conveyor", "status", "nowhere", "-n", NS],
        None,
    )
    .await;
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    // A missing queue is named as such, not as a NATS question (#15).
    assert_eq!(
        said.trim(),
        "error: no JobQueue nowhere in namespace team",
        "{said}"
    );
    let wrong_context = kubectl(
        &cluster,
        plugins.path(),
        &[
            "conveyor",
            "status",
            "orders",
            "-n",
            NS,
            "--context",
            "nope",
        ],
        None,
    )
    .await;
    assert!(!wrong_context.status.success());
    let said = String::from_utf8_lossy(&wrong_context.stderr);
    assert!(said.contains("kubeconfig context \"nope\""), "{said}");
    cluster.shutdown().await;
}
