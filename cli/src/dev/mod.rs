//! `conveyor dev`: everything a newcomer needs, with no cluster — a local `nats-server`, the
//! Kubernetes test double (`conveyor-devcluster`, with its process kubelet), Conveyor's CRDs and
//! the operator running in this process. `--demo` then drives the hello example end to end.
//! Whatever it started is stopped on Ctrl-C, on SIGTERM and when the demo ends.

mod demo;
mod kube;
pub(crate) mod nats;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conveyor_devcluster::{DevCluster, ImageConfig, Options};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::nats::LocalNats;
use crate::args::DevArgs;

/// Image name of the worker runtime, as the operator puts it in worker pods.
const WORKER_IMAGE: &str = "ghcr.io/conveyor-dev/conveyor-worker";
/// Image name of the hello example's handler.
const HELLO_IMAGE: &str = "ghcr.io/conveyor-dev/hello";
/// Resync of the in-process operator: short, so a dev loop sees drift repaired quickly.
const OPERATOR_RESYNC: Duration = Duration::from_secs(10);
/// How long each part gets to stop before `conveyor dev` gives up on it.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `conveyor dev`.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let paths = Paths::resolve(&args)?;
    let mut env = DevEnv::start(&args, &paths).await?;
    let result = if args.demo {
        tokio::select! {
            result = demo::run(&env, &args, &paths) => result,
            signal = shutdown_signal() => signal.and_then(|()| bail!("interrupted before the demo finished")),
        }
    } else {
        env.print_next_steps(&paths);
        tokio::select! {
            signal = shutdown_signal() => signal,
            error = env.operator_exit() => Err(error),
        }
    };
    eprintln!("stopping…");
    let stopped = env.stop().await;
    result.and(stopped)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}

/// Files and directories `conveyor dev` uses.
pub struct Paths {
    /// Root of the state: NATS store, kubeconfig, pod logs and volumes.
    pub state: PathBuf,
    /// Removes `state` on drop when it is a temporary directory.
    _temp: Option<tempfile::TempDir>,
    /// The `conveyor-worker` runtime binary.
    pub worker_bin: PathBuf,
    /// The repository's `examples/` directory.
    pub examples: PathBuf,
}

impl Paths {
    fn resolve(args: &DevArgs) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot locate the conveyor executable")?;
        let worker_bin = match &args.worker_bin {
            Some(p) => p.clone(),
            None => exe.with_file_name("conveyor-worker"),
        };
        if !worker_bin.is_file() {
            bail!(
                "the worker runtime {} is missing: build it with `cargo build --workspace --bins` (or pass --worker-bin)",
                worker_bin.display()
            );
        }
        let examples = match &args.examples_dir {
            Some(p) => p.clone(),
            None if Path::new("examples/hello").is_dir() => PathBuf::from("examples"),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
        };
        let (state, temp) = match &args.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create state directory {}", dir.display()))?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("conveyor-dev-")
                    .tempdir()
                    .context("cannot create a temporary state directory")?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        // Absolute: pod processes run in their own directories.
        let state = std::path::absolute(&state)?;
        Ok(Self {
            state,
            _temp: temp,
            worker_bin: std::path::absolute(worker_bin)?,
            examples: std::path::absolute(examples)?,
        })
    }

    /// A directory standing in for the worker runtime image: `usr/local/bin/conveyor-worker`
    /// linked to the built runtime.
    fn worker_image_root(&self) -> anyhow::Result<PathBuf> {
        let root = self.state.join("images/conveyor-worker");
        let bin_dir = root.join("usr/local/bin");
        std::fs::create_dir_all(&bin_dir)?;
        let link = bin_dir.join("conveyor-worker");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&self.worker_bin, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
        Ok(root)
    }
}

/// The running parts.
pub struct DevEnv {
    nats: LocalNats,
    cluster: DevCluster,
    /// The operator task; `None` once it ended.
    operator: Option<JoinHandle<anyhow::Result<()>>>,
    stopping: CancellationToken,
    /// Kubernetes client for the test double.
    pub client: ::kube::Client,
    /// Kubeconfig of the test double.
    pub kubeconfig: PathBuf,
    /// Where the operator serves its web dashboard.
    pub dashboard: SocketAddr,
    /// The dashboard's write token, new each run.
    dashboard_token: String,
}

impl DevEnv {
    async fn start(args: &DevArgs, paths: &Paths) -> anyhow::Result<Self> {
        let started = Instant::now();
        let nats = LocalNats::start(&args.nats_server, &paths.state.join("nats")).await?;
        eprintln!("nats-server with JetStream on {}", nats.url());

        let images = BTreeMap::from([
            (
                WORKER_IMAGE.to_owned(),
                ImageConfig {
                    root: paths.worker_image_root()?,
                    entrypoint: vec!["/usr/local/bin/conveyor-worker".to_owned()],
                },
            ),
            (
                HELLO_IMAGE.to_owned(),
                ImageConfig {
                    root: paths.examples.join("hello/image"),
                    entrypoint: Vec::new(),
                },
            ),
        ]);
        let options = Options {
            images,
            state_dir: Some(paths.state.join("cluster")),
            ..Options::default()
        };
        let cluster = DevCluster::start(options)
            .await
            .context("cannot start the Kubernetes test double")?;
        let kubeconfig = cluster.kubeconfig_path().to_owned();
        let client = cluster.client();
        eprintln!("Kubernetes test double on {}", cluster.url());

        kube::install_crds(&client).await?;
        wait_until(
            Duration::from_secs(10),
            "the JobQueue and Worker kinds to be served",
            || async { Ok(kube::crds_served(&client).await.then_some(())) },
        )
        .await?;

        // Every setting explicit: the CLI's own CONVEYOR_* variables mean other things to the
        // operator (CONVEYOR_NAMESPACE would restrict it to one namespace).
        let mut config = conveyor_operator::Config::with_nats_url(nats.url());
        config.worker_image = WORKER_IMAGE.to_owned();
        config.resync = OPERATOR_RESYNC;
        config.http_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        config.namespace = None;
        config.leader_election = false;
        // A port free now on loopback (the operator binds it a moment later), printed below.
        let dashboard = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("cannot find a free port for the dashboard")?;
        config.dashboard_addr = Some(dashboard);
        let dashboard_token = uuid::Uuid::new_v4().simple().to_string();
        config.dashboard_token = Some(conveyor_operator::config::Token(dashboard_token.clone()));
        let stopping = CancellationToken::new();
        let operator = tokio::spawn({
            let client = client.clone();
            let shutdown = stopping.clone().cancelled_owned();
            async move { Ok(conveyor_operator::run_with_client(config, client, shutdown).await?) }
        });
        eprintln!(
            "operator running ({:.1?} to start everything); dashboard on http://{dashboard}/",
            started.elapsed()
        );
        Ok(Self {
            nats,
            cluster,
            operator: Some(operator),
            stopping,
            client,
            kubeconfig,
            dashboard,
            dashboard_token,
        })
    }

    /// Resolves when the operator task ends, which it only should on shutdown: the error says why.
    async fn operator_exit(&mut self) -> anyhow::Error {
        let Some(handle) = self.operator.as_mut() else {
            return std::future::pending().await;
        };
        let exit = handle.await;
        self.operator = None;
        match exit {
            Ok(Ok(())) => anyhow::anyhow!("the operator stopped on its own"),
            Ok(Err(e)) => e.context("the operator failed"),
            Err(join) => anyhow::Error::from(join).context("the operator panicked"),
        }
    }

    /// The NATS URL clients use.
    pub fn nats_url(&self) -> &str {
        self.nats.url()
    }

    fn print_next_steps(&self, paths: &Paths) {
        let examples = paths.examples.display();
        println!(
            "\nConveyor is running on the Kubernetes test double (no cluster). In another shell:\n\n\
             \x20 export KUBECONFIG={kubeconfig}\n\
             \x20 export CONVEYOR_NATS_URL={nats}\n\n\
             \x20 kubectl apply -f {examples}/hello/\n\
             \x20 kubectl get jobqueues,workers\n\
             \x20 conveyor submit hello '{{\"name\": \"world\"}}'\n\
             \x20 conveyor submit hello --count 1000 '{{\"name\": \"load\"}}'\n\
             \x20 conveyor status\n\
             \x20 kubectl describe jobqueue hello\n\n\
             Dashboard: http://{dashboard}/ (write token for requeue and purge: {token})\n\n\
             Ctrl-C stops everything.",
            dashboard = self.dashboard,
            token = self.dashboard_token,
            kubeconfig = self.kubeconfig.display(),
            nats = self.nats.url(),
        );
    }

    /// Stops the operator, then the cluster (which stops every pod process), then NATS.
    async fn stop(self) -> anyhow::Result<()> {
        self.stopping.cancel();
        let operator = match self.operator {
            None => Ok(()),
            Some(handle) => match tokio::time::timeout(STOP_DEADLINE, handle).await {
                Ok(Ok(result)) => result.context("the operator failed"),
                Ok(Err(join)) => Err(anyhow::Error::from(join).context("the operator panicked")),
                Err(_) => Err(anyhow::anyhow!(
                    "the operator did not stop within {STOP_DEADLINE:?}"
                )),
            },
        };
        // Stops the kubelet too, which stops every pod's processes.
        let cluster = tokio::time::timeout(STOP_DEADLINE, self.cluster.shutdown())
            .await
            .map_err(|_| {
                anyhow::anyhow!("the Kubernetes test double did not stop within {STOP_DEADLINE:?}")
            });
        let nats = self.nats.stop().await;
        operator.and(cluster).and(nats)
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `deadline`; the error says
/// what was awaited and the last error `check` returned, if any.
pub async fn wait_until<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() >= deadline {
            let base = format!("timed out after {deadline:?} waiting for {what}");
            return Err(match last_error {
                Some(e) => e.context(base),
                None => anyhow::anyhow!(base),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
