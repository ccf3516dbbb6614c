//! `conveyor-devcluster`: a **test double of Kubernetes** that runs in-process. It serves the
//! Kubernetes API over plain HTTP on `127.0.0.1` (enough of it for kube-rs and the real
//! `kubectl`), runs the Deployment/ReplicaSet controllers and a process "kubelet" that runs pod
//! containers as local processes. `docs/testing.md` lists what it emulates and where it differs
//! from a real cluster.
//!
//! ```no_run
//! # async fn demo() -> Result<(), conveyor_devcluster::Error> {
//! let cluster = conveyor_devcluster::DevCluster::start(Default::default()).await?;
//! let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::default_namespaced(cluster.client());
//! println!("kubectl --kubeconfig {}", cluster.kubeconfig_path().display());
//! cluster.shutdown().await;
//! # let _ = pods; Ok(()) }
//! ```

pub mod audit;
pub mod builtin;
pub mod cel;
pub mod controllers;
pub mod discovery;
pub mod error;
pub mod http;
pub mod kubelet;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod selectors;
pub mod ssa;
pub mod store;
pub mod table;
pub mod validation;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use kubelet::ImageConfig;

/// How long [`DevCluster::shutdown`] waits for the server, controllers and kubelet to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What to run besides the API server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run the process kubelet; new pods are then bound to its node (`spec.nodeName`).
    pub kubelet: bool,
    /// Run the Deployment and ReplicaSet controllers.
    pub controllers: bool,
    /// Container images the kubelet can run, by name without tag.
    pub images: BTreeMap<String, ImageConfig>,
    /// Where to keep the kubeconfig, logs and pod directories; a temporary directory (removed
    /// when the cluster is dropped) when `None`.
    pub state_dir: Option<PathBuf>,
    /// First CrashLoopBackOff delay of the kubelet (Kubernetes: 10 s); `None` keeps the default.
    pub base_backoff: Option<Duration>,
    /// Longest CrashLoopBackOff delay of the kubelet (Kubernetes: 5 min); `None` keeps the default.
    pub max_backoff: Option<Duration>,
}

impl Default for Options {
    /// Everything on: API server, controllers and kubelet, in a temporary directory.
    fn default() -> Self {
        Self {
            kubelet: true,
            controllers: true,
            images: BTreeMap::new(),
            state_dir: None,
            base_backoff: None,
            max_backoff: None,
        }
    }
}

impl Options {
    /// Only the API server: no controllers, no kubelet (pods stay `Pending`, unbound).
    pub fn api_only() -> Self {
        Self {
            kubelet: false,
            controllers: false,
            ..Self::default()
        }
    }
}

/// Errors starting a [`DevCluster`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No loopback port could be bound.
    #[error("cannot listen on 127.0.0.1: {0}")]
    Bind(std::io::Error),
    /// The kubeconfig could not be written.
    #[error("cannot write the kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The kube client could not be built.
    #[error("cannot build a kube client: {0}")]
    Client(#[from] kube::Error),
}

/// A running test double of Kubernetes. Stops (killing the kubelet's processes) on
/// [`DevCluster::shutdown`] or when dropped.
pub struct DevCluster {
    url: String,
    kubeconfig: PathBuf,
    logs_dir: PathBuf,
    state_dir: PathBuf,
    client: kube::Client,
    state: Arc<http::ApiState>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    // Declared last: removed after everything else stopped.
    _tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for DevCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCluster")
            .field("url", &self.url)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl DevCluster {
    /// Starts the API server on a free loopback port, writes the kubeconfig, and starts the
    /// controllers and kubelet the options ask for.
    pub async fn start(options: Options) -> Result<Self, Error> {
        let (tmp, state_dir) = match &options.state_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("devcluster-")
                    .tempdir()
                    .map_err(|source| Error::StateDir {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                let path = tmp.path().to_owned();
                (Some(tmp), path)
            }
        };
        let logs_dir = state_dir.join("logs");
        std::fs::create_dir_all(&logs_dir).map_err(|source| Error::StateDir {
            path: logs_dir.clone(),
            source,
        })?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let url = format!("http://{addr}");
        let shutdown = CancellationToken::new();
        let state = Arc::new(http::ApiState::new(
            logs_dir.clone(),
            options.kubelet,
            shutdown.clone(),
            addr.to_string(),
        ));
        let router = http::router(state.clone());
        let stop = shutdown.clone();
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::warn!(error = %e, "devcluster API server stopped");
            }
        })];
        let kubeconfig = state_dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url)).map_err(|source| Error::Kubeconfig {
            path: kubeconfig.clone(),
            source,
        })?;
        let mut config = kube::Config::new(url.parse().expect("a valid URL"));
        config.default_namespace = "default".into();
        let client = kube::Client::try_from(config)?;
        if options.controllers {
            tasks.push(tokio::spawn(controllers::run(
                client.clone(),
                shutdown.clone(),
            )));
        }
        if options.kubelet {
            let mut cfg = kubelet::KubeletConfig::new(state_dir.join("kubelet"), logs_dir.clone());
            cfg.images = options.images.clone();
            if let Some(b) = options.base_backoff {
                cfg.base_backoff = b;
            }
            if let Some(b) = options.max_backoff {
                cfg.max_backoff = b;
            }
            tasks.push(tokio::spawn(kubelet::run(
                client.clone(),
                cfg,
                shutdown.clone(),
            )));
        }
        tracing::info!(%url, "devcluster started");
        Ok(Self {
            url,
            kubeconfig,
            logs_dir,
            state_dir,
            client,
            state,
            shutdown,
            tasks,
            _tmp: tmp,
        })
    }

    /// Base URL of the API server (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The kubeconfig file (context `devcluster`, namespace `default`) for `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube client for this cluster (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Where container logs live: `<logs_dir>/<namespace>/<pod>/<container>.log`.
    pub fn logs_dir(&self) -> &Path {
        &self.logs_dir
    }

    /// The state directory (kubeconfig, logs, pod directories).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Requests the API server has served so far, by HTTP method (`GET`, `PATCH`, …; a watch
    /// counts once), for tests that measure the load a client puts on it.
    pub fn requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A kube client for this cluster acting as `user` (it sends `Impersonate-User`, as
    /// `kubectl --as` does), whose requests [`DevCluster::access`] records apart.
    pub fn client_as(&self, user: &str) -> Result<kube::Client, Error> {
        let mut config = kube::Config::new(self.url.parse().expect("a valid URL"));
        config.default_namespace = "default".into();
        config.auth_info.impersonate = Some(user.to_owned());
        Ok(kube::Client::try_from(config)?)
    }

    /// The permissions (API group, resource or `resource/subresource`, RBAC verb) that the
    /// requests of `user` needed so far; `""` is every request made without impersonation.
    pub fn access(&self, user: &str) -> std::collections::BTreeSet<audit::Access> {
        self.state.access.of(user)
    }

    /// Stores `obj` (which names its `apiVersion` and `kind`) as it is, without the admission
    /// a create through the API does (schema validation, defaulting, pruning): how an object
    /// written before a schema change, or straight into etcd, can look. For tests of clients
    /// that must cope with a stored object that does not fit their types. The store still
    /// fills the name-independent metadata (uid, resourceVersion, generation) and refuses a
    /// name that exists.
    pub fn store_unchecked(
        &self,
        obj: serde_json::Value,
    ) -> Result<serde_json::Value, error::ApiError> {
        let field = |name: &str| obj.get(name).and_then(|v| v.as_str()).unwrap_or_default();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let registry = self.state.registry();
        let info = registry
            .by_kind(api_version, kind)
            .ok_or_else(|| error::ApiError::not_found("", kind, api_version))?;
        let namespace = obj
            .pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_owned();
        self.state
            .store
            .create(&info.storage, &namespace, obj.clone(), info.rules(), false)
    }

    /// The newest resourceVersion of the store (for tests of watch semantics).
    pub fn resource_version(&self) -> u64 {
        self.state.store.current_rv()
    }

    /// Stops the kubelet (which kills its processes), the controllers and the API server, and
    /// waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, futures::future::join_all(tasks)).await;
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: devcluster
  cluster:
    server: {url}
users:
- name: devcluster
  user: {{}}
contexts:
- name: devcluster
  context:
    cluster: devcluster
    user: devcluster
    namespace: default
current-context: devcluster
preferences: {{}}
"
    )
}
