//! The real `kubectl`, run against a kubeconfig (the Kubernetes test double's, in tests) the way
//! a user runs it: arguments, optional stdin, its exit status and output.
//!
//! ```no_run
//! # async fn demo(kubeconfig: &std::path::Path) {
//! use conveyor_testkit::kubectl::Kubectl;
//! let kubectl = Kubectl::new(kubeconfig);
//! kubectl.ok(&["create", "namespace", "team"], None).await;
//! let run = kubectl.run(&["get", "jobqueue", "missing"], None).await;
//! assert!(!run.ok && run.stderr.contains("NotFound"));
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;

/// The kubectl the tests drive.
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// How long one kubectl run may take before the test fails (generous: the machine may be busy).
const DEADLINE: Duration = Duration::from_secs(120);

/// What one kubectl run answered.
#[derive(Debug, Clone)]
pub struct Run {
    /// It exited with status 0.
    pub ok: bool,
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// kubectl bound to one kubeconfig. Its discovery cache goes to `kubectl-cache` beside the
/// kubeconfig, so tests never share (or read a stale) `~/.kube/cache`.
#[derive(Debug, Clone)]
pub struct Kubectl {
    kubeconfig: PathBuf,
    plugins: Option<PathBuf>,
    unset: Vec<String>,
}

impl Kubectl {
    /// `kubectl --kubeconfig <kubeconfig> …`.
    pub fn new(kubeconfig: impl AsRef<Path>) -> Self {
        Kubectl {
            kubeconfig: kubeconfig.as_ref().to_path_buf(),
            plugins: None,
            unset: Vec::new(),
        }
    }

    /// kubectl as a plugin host: `dir` first on `PATH` (where `kubectl-<name>` plugins are
    /// found), and the kubeconfig in `KUBECONFIG` instead of a flag, since kubectl hands its
    /// environment, not its flags, to a plugin.
    pub fn with_plugins(mut self, dir: impl AsRef<Path>) -> Self {
        self.plugins = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Runs kubectl (and the plugins it starts) without the environment variable `name`.
    pub fn without_env(mut self, name: &str) -> Self {
        self.unset.push(name.to_owned());
        self
    }

    /// Runs `kubectl <args>`, with `stdin` piped in when given; an error when kubectl cannot
    /// be started or does not finish within two minutes.
    pub async fn output(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Run> {
        let mut command = tokio::process::Command::new(KUBECTL);
        match &self.plugins {
            None => {
                command.arg("--kubeconfig").arg(&self.kubeconfig);
            }
            Some(dir) => {
                let path = std::env::var_os("PATH").unwrap_or_default();
                let path = std::env::join_paths(
                    std::iter::once(dir.clone()).chain(std::env::split_paths(&path)),
                )
                .context("joining PATH")?;
                command
                    .env("PATH", path)
                    .env("KUBECONFIG", &self.kubeconfig);
            }
        }
        let cache = self
            .kubeconfig
            .parent()
            .unwrap_or(Path::new("."))
            .join("kubectl-cache");
        command.env("KUBECACHEDIR", cache).args(args);
        for name in &self.unset {
            command.env_remove(name);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {KUBECTL}"))?;
        let mut pipe = child.stdin.take().context("kubectl's stdin")?;
        // Fed while the output is read, under the same deadline: a kubectl that does not read
        // its stdin (it refused the arguments, say) neither blocks the write nor fails it; its
        // exit status and stderr tell what happened.
        let feed = async move {
            if let Some(text) = stdin {
                match pipe.write_all(text.as_bytes()).await {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    written => written.context("writing kubectl's stdin")?,
                }
            }
            anyhow::Ok(())
        };
        let (fed, out) = tokio::time::timeout(
            DEADLINE,
            futures::future::join(feed, child.wait_with_output()),
        )
        .await
        .with_context(|| format!("kubectl {args:?} did not finish within {DEADLINE:?}"))?;
        fed?;
        let out = out.context("reading kubectl's output")?;
        Ok(Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `kubectl <args>`; panics (failing the test) when kubectl cannot run at all.
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> Run {
        match self.output(args, stdin).await {
            Ok(run) => run,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Runs `kubectl <args>` and returns its stdout; panics with its output unless it succeeds.
    pub async fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let run = self.run(args, stdin).await;
        assert!(
            run.ok,
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    /// Runs `kubectl <args>` and returns its stdout, or an error with its stderr.
    pub async fn checked(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let run = self.output(args, stdin).await?;
        if !run.ok {
            bail!("kubectl {args:?} failed: {}", run.stderr);
        }
        Ok(run.stdout)
    }
}
