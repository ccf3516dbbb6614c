//! `kubectl conveyor`: the `conveyor` binary on `PATH` as `kubectl-conveyor`, run by the real
//! kubectl as a plugin against the Kubernetes test double. Without `--nats-url` it finds each
//! queue's NATS server from its JobQueue: `status.natsUrl` (what the operator writes), else
//! `spec.nats.url`; and it says what to do when neither is there.

use std::path::Path;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor_crds::JobQueue;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::NatsServer;
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::Kubectl;
use kube::Api;
use kube::api::{Patch, PatchParams};

const NS: &str = "team";

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
    // kubectl hands the plugin its environment: none of the CLI's own settings leak in.
    let kubectl = [
        "CONVEYOR_NATS_URL",
        "CONVEYOR_NAMESPACE",
        "CONVEYOR_KUBE_CONTEXT",
        "RUST_LOG",
    ]
    .into_iter()
    .fold(
        Kubectl::new(cluster.kubeconfig_path()).with_plugins(plugins.path()),
        Kubectl::without_env,
    );
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/jobqueues.yaml");
    kubectl
        .ok(&["apply", "-f", crd.to_str().unwrap()], None)
        .await;
    kubectl.ok(&["create", "namespace", NS], None).await;

    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    for name in ["orders", "invoices", "orphans"] {
        ensure_queue(&js, &QueueRef::new(NS, name), &QueueSettings::default())
            .await
            .unwrap();
    }
    // orders names its server in spec; invoices relies on what the operator reports in status;
    // orphans has neither yet.
    let manifests = [
        JobQueue::test("orders").nats_url(&nats.url()),
        JobQueue::test("invoices"),
        JobQueue::test("orphans"),
    ]
    .map(|queue| queue.yaml())
    .join("---\n");
    kubectl
        .ok(&["apply", "-n", NS, "-f", "-"], Some(&manifests))
        .await;
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    let status = serde_json::json!({"status": {"natsUrl": nats.url()}});
    api.patch_status("invoices", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    for queue in ["orders", "invoices"] {
        let submitted = kubectl
            .ok(
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
            .await;
        assert!(submitted.contains(&format!("{queue}-1")), "{submitted}");
        let figures = kubectl
            .ok(&["conveyor", "status", queue, "-n", NS, "-o", "json"], None)
            .await;
        assert_eq!(pending(&figures), 1, "{queue}: {figures}");
    }

    let lost = kubectl
        .run(&["conveyor", "submit", "orphans", "-n", NS, "{}"], None)
        .await;
    assert!(!lost.ok);
    let said = &lost.stderr;
    assert!(
        said.contains("JobQueue team/orphans does not say where its NATS is yet")
            && said.contains("pass --nats-url"),
        "{said}"
    );
    let missing = kubectl
        .run(&["conveyor", "status", "nowhere", "-n", NS], None)
        .await;
    assert!(!missing.ok);
    let said = &missing.stderr;
    // A missing queue is named as such, not as a NATS question (#15).
    assert_eq!(
        said.trim(),
        "error: no JobQueue nowhere in namespace team",
        "{said}"
    );
    let wrong_context = kubectl
        .run(
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
    assert!(!wrong_context.ok);
    let said = &wrong_context.stderr;
    assert!(said.contains("kubeconfig context \"nope\""), "{said}");
    cluster.shutdown().await;
}
