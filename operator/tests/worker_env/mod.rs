//! Fixture of the `worker_*` tests: the Kubernetes test double with its controllers and process
//! kubelet (so worker pods run the real `conveyor-worker` runtime), a real `nats-server`, the
//! CRDs, the namespace `team` and the operator in-process (`--resync 1s`). Needs
//! `cargo build -p conveyor-worker --bins` first.

// Shared by several test binaries (and the scaling bench), each of which uses a part of it;
// the compiler checks each binary alone and would call the rest unused.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_crds::Worker;
use conveyor_devcluster::{DevCluster, ImageConfig, Options};
use conveyor_operator::Config;
use conveyor_testkit::fixtures::{Test as _, WorkerFixture};
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::{NatsServer, wait_for, wait_for_some};
use kube::Api;
use tokio_util::sync::CancellationToken;

/// Namespace of the test objects.
pub const NS: &str = "team";
/// The runtime image the operator injects.
const WORKER_IMAGE: &str = "ghcr.io/conveyor-dev/conveyor-worker";

/// A Worker `name` on the queue `name`, 16 jobs per pod, whose JSON-lines handler answers
/// `ok` at once to every job.
pub fn noop_worker(name: &str) -> WorkerFixture {
    Worker::test(name)
        .concurrency(16)
        .jsonl(&[
            "python3",
            "-u",
            "-c",
            "import sys, json; [print(json.dumps({'id': json.loads(l)['id'], 'status': 'ok'}), flush=True) for l in sys.stdin]",
        ])
        .image("ghcr.io/conveyor-dev/handler")
}

/// A Worker `name` on the queue `name` whose exec handler makes `mib` MiB resident under a
/// memory limit of `limit`, so the kubelet OOM-kills each of its pods once it takes a job.
pub fn oom_worker(name: &str, mib: u32, limit: &str) -> WorkerFixture {
    let allocate = format!("import time; x = b'x' * ({mib} << 20); time.sleep(30)");
    Worker::test(name)
        .exec(&["python3", "-c", &allocate])
        .image("ghcr.io/conveyor-dev/handler")
        .memory_limit(limit)
}

/// [`noop_worker`] autoscaled with `scaling`, a YAML mapping (`{minReplicas: 0, …}`), as YAML.
pub fn noop_autoscaled_worker(name: &str, scaling: &str) -> String {
    let scaling: serde_json::Value =
        serde_yaml::from_str(scaling).expect("scaling is a YAML mapping");
    noop_worker(name).with(&["scaling"], scaling).yaml()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The built `conveyor-worker`.
fn runtime_binary() -> PathBuf {
    conveyor_testkit::workspace_binary("conveyor-worker")
}

/// A running environment; `shutdown` stops everything and removes the state directory.
pub struct Env {
    pub cluster: DevCluster,
    pub nats: NatsServer,
    stop: CancellationToken,
    operator: tokio::task::JoinHandle<Result<(), conveyor_operator::Error>>,
    state: PathBuf,
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`Env::start`] with the operator's settings changed by `tune` after the fixture's own
    /// (`--resync 1s`, `--scaler-interval 200ms`).
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_as(None, tune).await
    }

    /// [`Env::start_with`] with the operator acting as `user` (impersonated, so the test
    /// double records its requests apart: `DevCluster::access`) when one is given.
    pub async fn start_as(user: Option<&str>, tune: impl FnOnce(&mut Config)) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let state = std::env::temp_dir().join(format!(
            "conveyor-worker-test-{}-{}",
            std::process::id(),
            conveyor_testkit::free_port().unwrap()
        ));
        let image = state.join("images/conveyor-worker");
        let bin = image.join("usr/local/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(runtime_binary(), bin.join("conveyor-worker")).unwrap();
        let options = Options {
            images: BTreeMap::from([(
                WORKER_IMAGE.to_owned(),
                ImageConfig {
                    root: image,
                    entrypoint: vec!["/usr/local/bin/conveyor-worker".into()],
                },
            )]),
            state_dir: Some(state.join("cluster")),
            base_backoff: Some(Duration::from_millis(500)),
            max_backoff: Some(Duration::from_secs(2)),
            ..Options::default()
        };
        let cluster = DevCluster::start(options).await.unwrap();
        for crd in ["crds/jobqueues.yaml", "crds/workers.yaml"] {
            kubectl(
                &cluster,
                &["apply", "-f", repo(crd).to_str().unwrap()],
                None,
            )
            .await;
        }
        kubectl(&cluster, &["create", "namespace", NS], None).await;
        let nats = NatsServer::start().await.unwrap();
        let mut config = Config::with_nats_url(nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.resync = Duration::from_secs(1);
        config.scaler_interval = Duration::from_millis(200);
        config.worker_image = format!("{WORKER_IMAGE}:test");
        tune(&mut config);
        let stop = CancellationToken::new();
        let on_stop = stop.clone();
        let client = match user {
            Some(user) => cluster.client_as(user).unwrap(),
            None => cluster.client(),
        };
        let operator = tokio::spawn(conveyor_operator::run_with_client(
            config,
            client,
            async move { on_stop.cancelled().await },
        ));
        Self {
            cluster,
            nats,
            stop,
            operator,
            state,
        }
    }

    /// `kubectl apply -n team -f -` with `yaml`.
    pub async fn apply(&self, yaml: &str) {
        kubectl(&self.cluster, &["apply", "-n", NS, "-f", "-"], Some(yaml)).await;
    }

    /// `kubectl -n team <args>`; panics with stderr when it fails.
    pub async fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", NS];
        all.extend_from_slice(args);
        kubectl(&self.cluster, &all, None).await
    }

    pub fn workers(&self) -> Api<Worker> {
        Api::namespaced(self.cluster.client(), NS)
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.nats.url()).await.unwrap())
    }

    /// Waits until `check` finds what it wants in the Worker `name` and returns it.
    pub async fn wait_worker<T>(
        &self,
        name: &str,
        deadline: Duration,
        what: &str,
        check: impl Fn(&Worker) -> Option<T>,
    ) -> T {
        let api = self.workers();
        wait_for_some(deadline, what, || async {
            api.get_opt(name)
                .await
                .ok()
                .flatten()
                .as_ref()
                .and_then(&check)
        })
        .await
        .unwrap()
    }

    /// The replicas the Deployment `name` asks for (`None` while it does not exist).
    pub async fn deployment_replicas(&self, name: &str) -> Option<i32> {
        let api: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.cluster.client(), NS);
        api.get_opt(name).await.ok().flatten()?.spec?.replicas
    }

    /// Messages in `stream` now.
    pub async fn stream_messages(&self, stream: &str) -> u64 {
        conveyor_testkit::stream_messages(&self.jetstream().await, stream).await
    }

    /// Waits until the queue's streams exist (the JobQueue controller made them).
    pub async fn wait_stream(&self, stream: &str) {
        let js = self.jetstream().await;
        wait_for(
            Duration::from_secs(30),
            &format!("stream {stream}"),
            || async { js.get_stream(stream).await.is_ok() },
        )
        .await
        .unwrap();
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.operator)
            .await
            .expect("operator stops");
        result.unwrap().expect("operator exits cleanly");
        self.cluster.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> String {
    Kubectl::new(cluster.kubeconfig_path())
        .ok(args, stdin)
        .await
}
