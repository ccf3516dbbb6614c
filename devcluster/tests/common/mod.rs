//! Helpers shared by the devcluster tests: running the real kubectl against a cluster, waiting
//! on conditions with deadlines, and the `Widget` CRD fixture.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use conveyor_devcluster::{DevCluster, Options};

/// The kubectl the tests drive.
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// A CRD with status and scale subresources, printer columns, defaults, enum and a CEL rule.
pub const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.devcluster.io
spec:
  group: test.devcluster.io
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
    categories: [devtest]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale:
        specReplicasPath: .spec.replicas
        statusReplicasPath: .status.replicas
    additionalPrinterColumns:
    - name: Color
      type: string
      jsonPath: .spec.color
    - name: Replicas
      type: integer
      jsonPath: .spec.replicas
    - name: Ready
      type: string
      jsonPath: .status.conditions[?(@.type=="Ready")].status
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
    schema:
      openAPIV3Schema:
        type: object
        description: A widget for tests.
        properties:
          spec:
            type: object
            description: What the widget should look like.
            required: [color]
            x-kubernetes-validations:
            - rule: "self.minReplicas <= self.maxReplicas"
              message: minReplicas must not exceed maxReplicas
            properties:
              color:
                type: string
                description: The colour of the widget.
                enum: [red, green, blue]
              replicas:
                type: integer
                minimum: 0
                default: 1
              minReplicas:
                type: integer
                default: 0
              maxReplicas:
                type: integer
                default: 10
          status:
            type: object
            properties:
              replicas:
                type: integer
              conditions:
                type: array
                items:
                  type: object
                  x-kubernetes-preserve-unknown-fields: true
"#;

/// An API-only cluster (no controllers, no kubelet).
pub async fn api_cluster() -> DevCluster {
    DevCluster::start(Options::api_only())
        .await
        .expect("devcluster starts")
}

/// Output of one kubectl run.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs kubectl with the cluster's kubeconfig; `stdin` is piped in when given.
pub async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> Run {
    kubectl_with(cluster.kubeconfig_path(), args, stdin).await
}

/// Runs kubectl with a kubeconfig path.
pub async fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(KUBECTL);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    cmd.env(
        "KUBECACHEDIR",
        kubeconfig
            .parent()
            .expect("kubeconfig in a dir")
            .join("kubecache"),
    );
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().expect("kubectl runs");
    let mut pipe = child.stdin.take().expect("stdin piped");
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes())
            .await
            .expect("write kubectl stdin");
    }
    drop(pipe);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl finishes within 60s")
        .expect("kubectl output");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs kubectl and fails the test unless it succeeds; returns stdout.
pub async fn kubectl_ok(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> String {
    let run = kubectl(cluster, args, stdin).await;
    assert!(
        run.ok,
        "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    run.stdout
}

/// Polls `check` until it returns `Some`, failing with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs the Widget CRD with kubectl and waits until its kind is served.
pub async fn install_widgets(cluster: &DevCluster) {
    kubectl_ok(cluster, &["apply", "-f", "-"], Some(WIDGET_CRD)).await;
    kubectl_ok(
        cluster,
        &[
            "wait",
            "--for",
            "condition=Established",
            "crd/widgets.test.devcluster.io",
            "--timeout",
            "20s",
        ],
        None,
    )
    .await;
}
