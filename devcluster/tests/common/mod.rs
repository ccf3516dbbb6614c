//! Helpers shared by the devcluster tests: the real kubectl against a cluster and waits on
//! conditions with deadlines (both from `conveyor-testkit`, bound to a `DevCluster` here), and the
//! `Widget` CRD fixture.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use conveyor_devcluster::{DevCluster, Options};

/// The kubectl the tests drive.
pub const KUBECTL: &str = conveyor_testkit::kubectl::KUBECTL;

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

use conveyor_testkit::kubectl::Kubectl;
pub use conveyor_testkit::kubectl::Run;

/// Runs kubectl with the cluster's kubeconfig; `stdin` is piped in when given.
pub async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> Run {
    kubectl_with(cluster.kubeconfig_path(), args, stdin).await
}

/// Runs kubectl with a kubeconfig path.
pub async fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    Kubectl::new(kubeconfig).run(args, stdin).await
}

/// Runs kubectl and fails the test unless it succeeds; returns stdout.
pub async fn kubectl_ok(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> String {
    Kubectl::new(cluster.kubeconfig_path())
        .ok(args, stdin)
        .await
}

/// Polls `check` until it returns `Some`, failing with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match conveyor_testkit::wait_for_some(deadline, what, check).await {
        Ok(found) => found,
        Err(e) => panic!("{e}"),
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
