//! End-to-end test harness: a Kubernetes test double with the process kubelet and the images
//! the examples use, a real `nats-server`, the real `conveyor-operator` binary, and the real
//! `kubectl`. Binaries come from the Cargo target directory the tests were built in (`make
//! test` builds them first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use conveyor_devcluster::{DevCluster, ImageConfig, Options};
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::{NatsServer, free_port, wait_for};

/// The runtime image the operator injects.
pub const WORKER_IMAGE: &str = "ghcr.io/conveyor-dev/conveyor-worker";
/// The hello example's image.
pub const HELLO_IMAGE: &str = "ghcr.io/conveyor-dev/hello";

/// Path of a file in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A workspace binary next to the test executable's `deps/` directory.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target dir")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    Ok(path)
}

/// A running scenario environment; everything stops when it is dropped.
pub struct Env {
    /// The Kubernetes test double.
    pub cluster: DevCluster,
    /// The NATS server.
    pub nats: NatsServer,
    operator: Option<tokio::process::Child>,
    operator_port: u16,
    // The fake runtime image; removed when the environment is dropped.
    _images: tempfile::TempDir,
}

impl Env {
    /// Starts NATS and the cluster (with kubelet and the example images) and installs the CRDs
    /// and `namespace`.
    pub async fn start(namespace: &str) -> anyhow::Result<Self> {
        let images = tempfile::tempdir()?;
        let bin = images.path().join("conveyor-worker/usr/local/bin");
        std::fs::create_dir_all(&bin)?;
        std::os::unix::fs::symlink(binary("conveyor-worker")?, bin.join("conveyor-worker"))?;
        let options = Options {
            images: BTreeMap::from([
                (
                    WORKER_IMAGE.to_owned(),
                    ImageConfig {
                        root: images.path().join("conveyor-worker"),
                        entrypoint: vec!["/usr/local/bin/conveyor-worker".into()],
                    },
                ),
                (
                    HELLO_IMAGE.to_owned(),
                    ImageConfig {
                        root: repo("examples/hello/image"),
                        entrypoint: Vec::new(),
                    },
                ),
            ]),
            ..Options::default()
        };
        let cluster = DevCluster::start(options).await?;
        let nats = NatsServer::start().await?;
        let env = Self {
            cluster,
            nats,
            operator: None,
            operator_port: 0,
            _images: images,
        };
        for crd in ["crds/jobqueues.yaml", "crds/workers.yaml"] {
            env.kubectl(&["apply", "-f", repo(crd).to_str().unwrap()], None)
                .await?;
        }
        env.kubectl(&["create", "namespace", namespace], None)
            .await?;
        Ok(env)
    }

    /// Starts the `conveyor-operator` binary with leader election on, a 1 s resync and
    /// in-cluster defaults otherwise; waits until its HTTP port accepts connections.
    pub async fn start_operator(&mut self, namespace: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        let child = tokio::process::Command::new(binary("conveyor-operator")?)
            .env("KUBECONFIG", self.cluster.kubeconfig_path())
            .env("RUST_LOG", "info")
            .args(["--nats-url", &self.nats.url()])
            .args(["--worker-image", &format!("{WORKER_IMAGE}:test")])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--leader-election=true", "--lease-namespace", namespace])
            .args(["--resync", "1s", "--scaler-interval", "200ms"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting conveyor-operator")?;
        self.operator = Some(child);
        self.operator_port = port;
        wait_for(
            Duration::from_secs(20),
            "the operator's HTTP port",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await
    }

    /// `GET path` on the operator's HTTP server: the status line and the body.
    pub async fn operator_http(&self, path: &str) -> anyhow::Result<(String, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.operator_port)).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        let status = head.lines().next().unwrap_or_default().to_owned();
        Ok((status, body.to_owned()))
    }

    /// Asks the operator to stop (SIGTERM) and waits for a clean exit.
    pub async fn stop_operator(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.operator.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().context("operator gone")?)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
        if !status.success() {
            bail!("conveyor-operator exited with {status}");
        }
        Ok(())
    }

    /// Runs kubectl against the cluster; fails with its stderr when it fails.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        Kubectl::new(self.cluster.kubeconfig_path())
            .checked(args, stdin)
            .await
    }
}
