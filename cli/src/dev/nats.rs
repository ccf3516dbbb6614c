//! The local `nats-server -js` of `conveyor dev`: on a loopback port the server picks itself
//! (read back from its ports file, so no port race), with its store in the dev state directory,
//! logs in a file, stopped gracefully on shutdown.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How long the server gets to write its ports file and accept connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);
/// How long a SIGTERM'd server gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running local NATS server.
pub struct LocalNats {
    child: Child,
    url: String,
    log: PathBuf,
}

impl LocalNats {
    /// Starts `executable` with JetStream, storing under `dir`.
    pub async fn start(executable: &Path, dir: &Path) -> anyhow::Result<Self> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let executable = &locate(
            executable,
            std::env::var_os("PATH").as_deref(),
            home.as_deref(),
        )
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find {} on PATH nor in ~/.local/bin: install it with `make deps` \
                     (which puts it in ~/.local/bin), or pass --nats-server <path>",
                executable.display()
            )
        })?;
        let ports_dir = dir.join("ports");
        // A reused state directory may hold the ports file of an earlier run.
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)
            .with_context(|| format!("cannot create {}", ports_dir.display()))?;
        let log = dir.join("nats-server.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(executable)
            .args(["--jetstream", "--addr", "127.0.0.1", "--port", "-1"])
            .arg("--store_dir")
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install it with `make deps`, or pass --nats-server)",
                    executable.display()
                )
            })?;
        let mut server = Self {
            child,
            url: String::new(),
            log,
        };
        server.url = server.wait_for_url(&ports_dir).await?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn wait_for_url(&mut self, ports_dir: &Path) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            if let Some(url) = read_ports_file(ports_dir)? {
                let client = async_nats::connect(url.as_str()).await;
                if client.is_ok() {
                    return Ok(url);
                }
            }
            if start.elapsed() > STARTUP_DEADLINE {
                bail!(
                    "nats-server did not accept connections within {STARTUP_DEADLINE:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        if let Some(pid) = self.child.id() {
            let pid = Pid::from_raw(i32::try_from(pid)?);
            // It may have exited in between; the wait below settles it either way.
            let _ = kill(pid, Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.context("cannot kill nats-server")?;
        }
        Ok(())
    }
}

/// Where `executable` is: a path with a directory as given; a bare name on `path_var`, else in
/// `<home>/.local/bin`, where `make deps` installs nats-server (a fresh shell often lacks it on
/// `PATH`). `None` when neither has it.
fn locate(
    executable: &Path,
    path_var: Option<&std::ffi::OsStr>,
    home: Option<&Path>,
) -> Option<PathBuf> {
    if executable.components().count() != 1 {
        return Some(executable.to_owned());
    }
    let on_path = path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(executable));
    let local = home.map(|h| h.join(".local/bin").join(executable));
    on_path
        .chain(local)
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first client URL in a `*.ports` file nats-server wrote into `dir`.
fn read_ports_file(dir: &Path) -> anyhow::Result<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Ports {
        nats: Vec<String>,
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "ports") {
            let text = std::fs::read_to_string(&path)?;
            // The file may be half-written; try again on the next poll.
            if let Ok(ports) = serde_json::from_str::<Ports>(&text) {
                return Ok(ports.nats.into_iter().next());
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod locate_tests {
    use super::*;

    fn install(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let bin = dir.join("nats-server");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn finds_the_server_make_deps_installed_when_path_lacks_it() {
        let home = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let name = Path::new("nats-server");
        assert_eq!(
            locate(name, Some(empty.path().as_os_str()), Some(home.path())),
            None
        );
        let local = install(&home.path().join(".local/bin"));
        assert_eq!(
            locate(name, Some(empty.path().as_os_str()), Some(home.path())),
            Some(local)
        );
        let on_path = install(&empty.path().join("bin"));
        let path_var = std::env::join_paths([empty.path().join("bin")]).unwrap();
        assert_eq!(
            locate(name, Some(&path_var), Some(home.path())),
            Some(on_path),
            "PATH comes first"
        );
        let given = Path::new("/opt/nats/nats-server");
        assert_eq!(locate(given, None, None), Some(given.to_owned()));
    }
}
