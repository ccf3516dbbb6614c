//! Conveyor's own CRDs (`crds/*.yaml`) through the real kubectl: they install the way
//! docs/install.md says (client-side `kubectl apply -f crds/`, and the server-side upgrade of a
//! Helm-created CRD), and the API server refuses out-of-range durations and counts with
//! messages that give the range.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use conveyor_devcluster::DevCluster;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

async fn wait_established(cluster: &DevCluster, crd: &str) {
    kubectl_ok(
        cluster,
        &[
            "wait",
            "--for",
            "condition=Established",
            &format!("crd/{crd}"),
            "--timeout",
            "20s",
        ],
        None,
    )
    .await;
}

/// A cluster with both CRDs installed by `kubectl apply -f crds/` (client side) and a
/// namespace `q`.
async fn cluster_with_crds() -> DevCluster {
    let cluster = api_cluster().await;
    let out = kubectl_ok(&cluster, &["apply", "-f", path(&repo("crds"))], None).await;
    assert!(
        out.contains("jobqueues.conveyor.dev created")
            && out.contains("workers.conveyor.dev created"),
        "{out}"
    );
    wait_established(&cluster, "jobqueues.conveyor.dev").await;
    wait_established(&cluster, "workers.conveyor.dev").await;
    kubectl_ok(&cluster, &["create", "namespace", "q"], None).await;
    cluster
}

fn queue(spec: &str) -> String {
    format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: q1, namespace: q}}\nspec: {spec}\n"
    )
}

fn worker(extra: &str) -> String {
    format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: Worker\nmetadata: {{name: w1, namespace: q}}\nspec:\n  queue: q1\n  handler: {{mode: exec, command: [/h]}}\n  template: {{spec: {{containers: [{{name: h, image: hello}}]}}}}\n{extra}"
    )
}

/// Applies a manifest that must be refused and returns kubectl's error output.
async fn refused(cluster: &DevCluster, manifest: &str) -> String {
    let run = kubectl(cluster, &["apply", "-f", "-"], Some(manifest)).await;
    assert!(!run.ok, "accepted:\n{manifest}\n{}", run.stdout);
    run.stderr
}

#[tokio::test]
async fn kubectl_apply_installs_the_crds_and_the_example() {
    let cluster = cluster_with_crds().await;
    // Applying again (the last-applied annotation now holds each whole CRD) is a no-op.
    let out = kubectl_ok(&cluster, &["apply", "-f", path(&repo("crds"))], None).await;
    assert!(out.contains("unchanged"), "{out}");
    let out = kubectl_ok(
        &cluster,
        &["apply", "-n", "q", "-f", path(&repo("examples/hello"))],
        None,
    )
    .await;
    assert!(out.contains("created"), "{out}");
    // The chart's copy is the same.
    let out = kubectl_ok(
        &cluster,
        &["apply", "-f", path(&repo("charts/conveyor/crds"))],
        None,
    )
    .await;
    assert!(out.contains("unchanged"), "{out}");
}

#[tokio::test]
async fn a_crd_too_large_for_the_last_applied_annotation_is_refused() {
    let cluster = api_cluster().await;
    // The Worker CRD with 300 KB of description, as its embedded PodTemplateSpec once had.
    let yaml = std::fs::read_to_string(repo("crds/workers.yaml")).unwrap();
    let big = yaml.replacen(
        "description: A pool of worker pods that run a handler for one JobQueue.",
        &format!("description: {}", "x".repeat(300 * 1024)),
        1,
    );
    assert_ne!(
        big, yaml,
        "the description to inflate is in crds/workers.yaml"
    );
    let err = refused(&cluster, &big).await;
    assert!(
        err.contains("metadata.annotations: Too long: may not be more than 262144 bytes"),
        "{err}"
    );
    // Without the annotation (create, or server-side apply) the same CRD is fine, as on a
    // real API server.
    kubectl_ok(&cluster, &["create", "-f", "-"], Some(&big)).await;
}

#[tokio::test]
async fn the_documented_upgrade_applies_over_a_helm_installed_crd() {
    let cluster = api_cluster().await;
    // Helm installs CRDs with a plain create under its own field manager.
    let old = std::fs::read_to_string(repo("charts/conveyor/crds/jobqueues.yaml"))
        .unwrap()
        .replace("default: 30s", "default: 10s");
    kubectl_ok(
        &cluster,
        &["create", "--field-manager", "helm", "-f", "-"],
        Some(&old),
    )
    .await;
    // docs/install.md: `kubectl apply --server-side --force-conflicts -f charts/conveyor/crds/`.
    let crds = repo("charts/conveyor/crds");
    let run = kubectl(
        &cluster,
        &["apply", "--server-side", "-f", path(&crds)],
        None,
    )
    .await;
    assert!(
        !run.ok && run.stderr.contains("conflict"),
        "without --force-conflicts the fields Helm set conflict: {run:?}"
    );
    let out = kubectl_ok(
        &cluster,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            path(&crds),
        ],
        None,
    )
    .await;
    assert!(out.contains("serverside-applied"), "{out}");
    let schema = kubectl_ok(
        &cluster,
        &[
            "get",
            "crd",
            "jobqueues.conveyor.dev",
            "-o",
            "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.timeout.default}",
        ],
        None,
    )
    .await;
    assert_eq!(schema, "30s");
}

#[tokio::test]
async fn out_of_range_durations_are_refused_with_the_range() {
    let cluster = cluster_with_crds().await;
    let timeout = "timeout must be a duration from 1s to 24h (units d, h, m, s, ms in that order, e.g. 1h30m)";
    for bad in ["0s", "999ms", "25h", "2d"] {
        let err = refused(&cluster, &queue(&format!("{{timeout: {bad}}}"))).await;
        assert!(
            err.contains(&format!(
                "spec.timeout: Invalid value: \"{bad}\": {timeout}"
            )),
            "{bad}: {err}"
        );
    }
    // Too many digits: the pattern refuses it, and the rule stays quiet (no evaluation error).
    let err = refused(&cluster, &queue("{timeout: 200000d}")).await;
    assert!(
        err.contains("spec.timeout: Invalid value: \"200000d\": spec.timeout in body should match"),
        "{err}"
    );
    assert!(!err.contains("evaluation error"), "{err}");
    // Units out of order are refused by the pattern too.
    let err = refused(&cluster, &queue("{timeout: 30s1m}")).await;
    assert!(err.contains("should match"), "{err}");
    assert!(!err.contains("evaluation error"), "{err}");

    let err = refused(&cluster, &queue("{stream: {maxAge: 1m}}")).await;
    assert!(
        err.contains("stream.maxAge must be a duration from 2m to 3650d"),
        "{err}"
    );
    let err = refused(&cluster, &queue("{results: {retention: 3651d}}")).await;
    assert!(
        err.contains("results.retention must be a duration from 1s to 3650d"),
        "{err}"
    );
    let err = refused(&cluster, &worker("  recycle: {maxAge: 366d}\n")).await;
    assert!(
        err.contains("recycle.maxAge must be a duration from 1s to 365d"),
        "{err}"
    );

    // In range, with days (which Kubernetes' duration() does not know) and milliseconds.
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(&queue(
            "{timeout: 1d, stream: {maxAge: 7d12h}, results: {retention: 3650d}, retry: {backoff: {initial: 250ms, max: 1h30m}}, alerts: {failureWindow: 30d, maxOldestPendingAge: 90m}}",
        )),
    )
    .await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(&worker(
            "  scaling: {maxReplicas: 1000, scaleDownDelay: 0s}\n  recycle: {maxAge: 365d}\n",
        )),
    )
    .await;
}

#[tokio::test]
async fn out_of_range_counts_are_refused_with_the_range() {
    let cluster = cluster_with_crds().await;
    let err = refused(
        &cluster,
        &worker("  scaling: {minReplicas: 0, maxReplicas: 1000000000}\n"),
    )
    .await;
    assert!(
        err.contains("spec.scaling.maxReplicas: Invalid value: 1000000000: spec.scaling.maxReplicas in body should be less than or equal to 1000"),
        "{err}"
    );
    let err = refused(&cluster, &worker("  replicas: 1001\n")).await;
    assert!(
        err.contains("should be less than or equal to 1000"),
        "{err}"
    );
    let err = refused(&cluster, &queue("{stream: {maxJobSize: 100000000}}")).await;
    assert!(
        err.contains("should be less than or equal to 67108864"),
        "{err}"
    );
    let err = refused(&cluster, &queue("{concurrencyLimit: 0}")).await;
    assert!(
        err.contains("spec.concurrencyLimit in body should be greater than or equal to 1"),
        "{err}"
    );
}

#[tokio::test]
async fn rules_wait_for_the_schema_errors_that_block_them() {
    let cluster = cluster_with_crds().await;
    // An enum violation blocks every CEL rule of the object, as on a real API server: the
    // timeout's range is only reported once the storage is fixed.
    let err = refused(&cluster, &queue("{timeout: 0s, stream: {storage: tape}}")).await;
    assert!(
        err.contains("spec.stream.storage: Unsupported value: \"tape\""),
        "{err}"
    );
    assert!(
        err.contains("some validation rules were not checked because the object was invalid"),
        "{err}"
    );
    assert!(!err.contains("timeout must be a duration"), "{err}");
    // A string longer than maxLength blocks them too (the server bounds rule costs by it).
    let long = format!("{{timeout: {}s}}", "1".repeat(40));
    let err = refused(&cluster, &queue(&long)).await;
    assert!(
        err.contains("spec.timeout: Too long: may not be more than 39 bytes"),
        "{err}"
    );
    let err = refused(&cluster, &queue("{timeout: 0s}")).await;
    assert!(
        err.contains("timeout must be a duration from 1s to 24h"),
        "{err}"
    );
}
