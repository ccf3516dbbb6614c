//! The process kubelet of the Kubernetes test double: it runs the containers of the pods bound to
//! its node as local processes (one loopback IP per pod, volumes as per-pod directories), probes
//! them, enforces memory limits, writes their logs, and reports pod status through the API
//! server's `/status` subresource — only through a [`kube::Client`], like a real kubelet.

mod launch;
mod pod;
mod probe;
mod process;
mod status;

pub(crate) use launch::parse_quantity;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use launch::image_name;

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
    /// The first pod IP; later pods count up from it. [`KubeletConfig::new`] picks `127.N.0.2`
    /// with a random `N`, so clusters running side by side never hand out the same pod IP.
    pub first_pod_ip: Ipv4Addr,
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
            first_pod_ip: Ipv4Addr::new(127, 1 + uuid::Uuid::new_v4().as_bytes()[0] % 254, 0, 2),
        }
    }
}

/// Hands out pod IPs: the lowest free address from the first one, skipping `.0` and `.255`.
#[derive(Debug)]
struct IpPool {
    first: u32,
    used: BTreeSet<u32>,
}

impl IpPool {
    fn allocate(&mut self) -> Ipv4Addr {
        let mut ip = self.first;
        while self.used.contains(&ip) || matches!(ip & 0xff, 0 | 255) {
            ip += 1;
        }
        self.used.insert(ip);
        Ipv4Addr::from(ip)
    }

    fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
    }
}

/// A pod the kubelet runs.
struct PodHandle {
    pod: watch::Sender<Pod>,
    gone: CancellationToken,
    task: JoinHandle<()>,
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
        let spawner = match process::Spawner::new() {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(%err, "kubelet cannot start its process spawner");
                return;
            }
        };
        let reporter = Reporter {
            controller: "kubelet".into(),
            instance: Some(self.cfg.node_name.clone()),
        };
        let node = Arc::new(pod::Node {
            spawner,
            recorder: Recorder::new(self.client.clone(), reporter),
        });
        let cfg = Arc::new(self.cfg);
        // Stops the pod workers, also when the watch ends on its own.
        let stop = shutdown.child_token();
        let ips = Arc::new(Mutex::new(IpPool {
            first: u32::from(cfg.first_pod_ip),
            used: BTreeSet::new(),
        }));
        let mut pods: HashMap<String, PodHandle> = HashMap::new();
        let mut listed: Option<HashSet<String>> = None;
        let events = watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                event = events.next() => match event {
                    Some(Ok(event)) => event,
                    Some(Err(err)) => {
                        tracing::debug!(%err, "kubelet pod watch failed; retrying");
                        continue;
                    }
                    None => break,
                },
            };
            pods.retain(|_, h| !h.task.is_finished());
            match event {
                watcher::Event::Init => listed = Some(HashSet::new()),
                watcher::Event::InitDone => {
                    if let Some(listed) = listed.take() {
                        pods.iter()
                            .filter(|(uid, _)| !listed.contains(*uid))
                            .for_each(|(_, h)| h.gone.cancel());
                    }
                }
                watcher::Event::Delete(p) => {
                    if let Some(h) = p.metadata.uid.as_ref().and_then(|uid| pods.get(uid)) {
                        h.gone.cancel();
                    }
                }
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    let Some(uid) = p.metadata.uid.clone() else {
                        continue;
                    };
                    if let Some(listed) = listed.as_mut() {
                        listed.insert(uid.clone());
                    }
                    if p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                        != Some(cfg.node_name.as_str())
                    {
                        continue;
                    }
                    if let Some(h) = pods.get(&uid) {
                        h.pod.send_replace(p);
                        continue;
                    }
                    let ip = ips.lock().expect("ip pool lock").allocate();
                    let (tx, rx) = watch::channel(p);
                    let gone = CancellationToken::new();
                    let task = tokio::spawn({
                        let (client, cfg, node, ips, gone, shutdown) = (
                            self.client.clone(),
                            cfg.clone(),
                            node.clone(),
                            ips.clone(),
                            gone.clone(),
                            stop.clone(),
                        );
                        async move {
                            pod::run(client, cfg, node, rx, ip, gone, shutdown).await;
                            ips.lock().expect("ip pool lock").release(ip);
                        }
                    });
                    pods.insert(
                        uid,
                        PodHandle {
                            pod: tx,
                            gone,
                            task,
                        },
                    );
                }
            }
        }
        stop.cancel();
        for (_, h) in pods {
            let _ = h.task.await;
        }
    }
}

/// Runs a [`Kubelet`] until `shutdown` is cancelled, then kills every process it started.
pub async fn run(client: Client, cfg: KubeletConfig, shutdown: CancellationToken) {
    Kubelet::new(client, cfg).run(shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ips_count_up_skip_broadcast_and_reuse_released_ones() {
        let mut pool = IpPool {
            first: u32::from(Ipv4Addr::new(127, 9, 0, 253)),
            used: BTreeSet::new(),
        };
        let a = pool.allocate();
        let b = pool.allocate();
        let c = pool.allocate();
        assert_eq!(
            (a, b, c),
            (
                Ipv4Addr::new(127, 9, 0, 253),
                Ipv4Addr::new(127, 9, 0, 254),
                Ipv4Addr::new(127, 9, 1, 1)
            )
        );
        pool.release(b);
        assert_eq!(pool.allocate(), b);
    }
}
