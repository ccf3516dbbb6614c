//! One pod on the process kubelet: its directories and volumes, its init containers in order,
//! then a supervisor per app container (start, probe, enforce the memory limit, restart with
//! CrashLoopBackOff), status writes through `/status`, and graceful termination — SIGTERM to
//! every container's main process, SIGKILL to all its processes after the grace period, then
//! the final DELETE.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, Pod, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::launch::{self, Launch};
use super::probe::{self, Target};
use super::process::Spawner;
use super::status::{self, ContainerRun, PodRun};
use super::{ImageConfig, KubeletConfig};

/// How often the memory of a container with a limit is measured.
const MEMORY_POLL: Duration = Duration::from_millis(100);

/// Field manager of the kubelet's status writes.
const FIELD_MANAGER: &str = "devcluster-kubelet";

/// Which container of the pod a supervisor runs.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Init(usize),
    App(usize),
}

/// How a container's supervisor ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Stopped,
}

/// Why the pod worker stops its containers.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The pod was deleted gracefully: stop, report, then remove it from the API.
    Deleted,
    /// The pod vanished from the API: stop, nothing to report.
    Gone,
    /// The kubelet shuts down: kill at once.
    Shutdown,
}

/// What every pod worker of a kubelet shares besides its configuration.
pub struct Node {
    /// Starts container processes.
    pub spawner: Spawner,
    /// Records the kubelet's Events (Started, Killing, BackOff, Unhealthy, Failed).
    pub recorder: Recorder,
}

/// Shared state of one pod worker.
pub struct PodWorker {
    client: Client,
    cfg: Arc<KubeletConfig>,
    node: Arc<Node>,
    pod: watch::Receiver<Pod>,
    dir: PathBuf,
    log_dir: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
    run: Mutex<PodRun>,
    dirty: Notify,
    last_written: tokio::sync::Mutex<Option<PodStatus>>,
    /// Cancelled when the containers must stop.
    stop: CancellationToken,
    /// When SIGTERMed containers get SIGKILL.
    kill_at: Mutex<Instant>,
}

/// The grace period of a deletion (`deletionGracePeriodSeconds`), else the spec's.
fn grace_period(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .unwrap_or_else(|| spec_grace_seconds(pod));
    Duration::from_secs(u64::try_from(secs.max(0)).unwrap_or(0))
}

/// `terminationGracePeriodSeconds` (default 30), used when a failed probe kills a container.
fn spec_grace_seconds(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Runs one pod until it is deleted (or vanishes, or the kubelet shuts down).
pub async fn run(
    client: Client,
    cfg: Arc<KubeletConfig>,
    node: Arc<Node>,
    pod: watch::Receiver<Pod>,
    ip: Ipv4Addr,
    gone: CancellationToken,
    shutdown: CancellationToken,
) {
    let current = pod.borrow().clone();
    let uid = current.metadata.uid.clone().unwrap_or_default();
    let ns = current.metadata.namespace.clone().unwrap_or_default();
    let name = current.metadata.name.clone().unwrap_or_default();
    let dir = cfg.state_dir.join("pods").join(&uid);
    let log_dir = cfg.logs_dir.join(&ns).join(&name);
    let spec = current.spec.clone().unwrap_or_default();
    let has_init = spec.init_containers.as_ref().is_some_and(|c| !c.is_empty());
    let app_reason = if has_init {
        "PodInitializing"
    } else {
        "ContainerCreating"
    };
    let image = |c: &Container| c.image.clone().unwrap_or_default();
    let run = PodRun {
        init: spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ContainerRun::waiting(&c.name, &image(c), "PodInitializing"))
            .collect(),
        containers: spec
            .containers
            .iter()
            .map(|c| ContainerRun::waiting(&c.name, &image(c), app_reason))
            .collect(),
        initialized: !has_init,
        init_failed: false,
        ip,
        started: Timestamp::now(),
        qos_class: status::qos_class(&current).into(),
    };
    let volumes = match prepare(&client, &current, &dir, &log_dir).await {
        Ok(volumes) => volumes,
        Err(err) => {
            tracing::warn!(%err, pod = %name, "cannot prepare pod directories");
            BTreeMap::new()
        }
    };
    let worker = Arc::new(PodWorker {
        volumes,
        client,
        cfg,
        node,
        pod,
        dir,
        log_dir,
        run: Mutex::new(run),
        dirty: Notify::new(),
        last_written: tokio::sync::Mutex::new(None),
        stop: CancellationToken::new(),
        kill_at: Mutex::new(Instant::now()),
    });
    let runs = !is_terminal(&current) && current.metadata.deletion_timestamp.is_none();
    let writer_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    if runs {
        tasks.spawn(worker.clone().write_status_loop(writer_stop.clone()));
        tasks.spawn(worker.clone().run_containers());
    }
    let reason = worker.wait_for_stop(&gone, &shutdown).await;
    let grace = match reason {
        Stop::Shutdown => Duration::ZERO,
        _ => grace_period(&worker.pod.borrow()),
    };
    *worker.kill_at.lock().expect("kill_at lock") = Instant::now() + grace;
    worker.stop.cancel();
    writer_stop.cancel();
    while tasks.join_next().await.is_some() {}
    if reason == Stop::Deleted {
        if runs {
            worker.write_status().await;
        }
        worker.delete(&uid).await;
    }
    if reason != Stop::Shutdown {
        let _ = tokio::fs::remove_dir_all(&worker.dir).await;
        let _ = tokio::fs::remove_dir_all(&worker.log_dir).await;
    }
}

/// Creates the pod's directories, its volumes and its log directory; returns the volumes' host
/// directories by volume name.
async fn prepare(
    client: &Client,
    pod: &Pod,
    dir: &std::path::Path,
    log_dir: &std::path::Path,
) -> std::io::Result<BTreeMap<String, PathBuf>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    tokio::fs::create_dir_all(log_dir).await?;
    let mut volumes = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(host) = v.host_path.as_ref() {
            volumes.insert(v.name.clone(), PathBuf::from(&host.path));
            continue;
        }
        let vol_dir = dir.join("volumes").join(&v.name);
        tokio::fs::create_dir_all(&vol_dir).await?;
        let files: BTreeMap<String, Vec<u8>> = if let Some(cm) = &v.config_map {
            let found = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt(&cm.name)
                .await
                .ok()
                .flatten();
            found
                .map(|c| {
                    let mut f: BTreeMap<String, Vec<u8>> = c
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    f.extend(
                        c.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                    f
                })
                .unwrap_or_default()
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let found = Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await
                .ok()
                .flatten();
            found
                .map(|s| {
                    s.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        for (file, content) in files {
            tokio::fs::write(vol_dir.join(file), content).await?;
        }
        volumes.insert(v.name.clone(), vol_dir);
    }
    tokio::fs::create_dir_all(dir.join("work")).await?;
    Ok(volumes)
}

impl PodWorker {
    /// Records an Event about the pod, without waiting for it to be written.
    fn record(&self, type_: EventType, reason: &str, note: String) {
        let recorder = self.node.recorder.clone();
        let reference = self.pod.borrow().object_ref(&());
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&event, &reference).await {
                tracing::debug!(%err, "cannot record a pod event");
            }
        });
    }

    fn probe_grace(&self) -> Duration {
        Duration::from_secs(
            u64::try_from(spec_grace_seconds(&self.pod.borrow()).max(0)).unwrap_or(0),
        )
    }

    async fn wait_for_stop(&self, gone: &CancellationToken, shutdown: &CancellationToken) -> Stop {
        let mut pod = self.pod.clone();
        loop {
            if pod
                .borrow_and_update()
                .metadata
                .deletion_timestamp
                .is_some()
            {
                return Stop::Deleted;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Stop::Shutdown,
                () = gone.cancelled() => return Stop::Gone,
                changed = pod.changed() => if changed.is_err() { return Stop::Gone },
            }
        }
    }

    fn update(&self, slot: Slot, f: impl FnOnce(&mut ContainerRun)) {
        {
            let mut run = self.run.lock().expect("pod state lock");
            let c = match slot {
                Slot::Init(i) => run.init.get_mut(i),
                Slot::App(i) => run.containers.get_mut(i),
            };
            if let Some(c) = c {
                f(c);
            }
        }
        self.dirty.notify_one();
    }

    fn update_pod(&self, f: impl FnOnce(&mut PodRun)) {
        f(&mut self.run.lock().expect("pod state lock"));
        self.dirty.notify_one();
    }

    /// Writes the pod status if it changed since the last write; `false` if the write failed.
    async fn write_status(&self) -> bool {
        let mut last = self.last_written.lock().await;
        let pod = self.pod.borrow().clone();
        let run = self.run.lock().expect("pod state lock").clone();
        let previous = last.clone().or_else(|| pod.status.clone());
        let status = status::pod_status(&run, &pod, previous.as_ref(), Timestamp::now());
        if last.as_ref() == Some(&status) {
            return true;
        }
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patch = json!({ "status": status });
        match api
            .patch_status(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &params,
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                *last = Some(status);
                true
            }
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(err) => {
                tracing::debug!(%err, "pod status write failed; retrying");
                false
            }
        }
    }

    async fn write_status_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut retry = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.dirty.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)), if retry => {}
            }
            retry = !self.write_status().await;
        }
    }

    /// The final DELETE after the containers stopped, bound to this pod's uid.
    async fn delete(&self, uid: &str) {
        let pod = self.pod.borrow().clone();
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        for _ in 0..5 {
            match api
                .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                Err(err) => tracing::debug!(%err, "final pod delete failed; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn run_containers(self: Arc<Self>) {
        let spec = self.pod.borrow().spec.clone().unwrap_or_default();
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let init_policy = if policy == "Never" {
            "Never"
        } else {
            "OnFailure"
        };
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            match self.supervise(Slot::Init(i), c, init_policy).await {
                Outcome::Succeeded => {}
                Outcome::Failed => {
                    self.update_pod(|r| r.init_failed = true);
                    return;
                }
                Outcome::Stopped => return,
            }
        }
        self.update_pod(|r| {
            r.initialized = true;
            for c in &mut r.containers {
                c.state = status::waiting("ContainerCreating", None);
            }
        });
        let mut apps = JoinSet::new();
        for (i, c) in spec.containers.iter().enumerate() {
            let (me, c, policy) = (self.clone(), c.clone(), policy.clone());
            apps.spawn(async move { me.supervise(Slot::App(i), &c, &policy).await });
        }
        while apps.join_next().await.is_some() {}
    }

    fn image(&self, c: &Container) -> Option<ImageConfig> {
        self.cfg
            .images
            .get(launch::image_name(c.image.as_deref().unwrap_or_default()))
            .cloned()
    }

    /// Waits `delay`; `false` if the pod is stopping instead.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Runs one container, restarting it as `policy` says, until it is done or the pod stops.
    async fn supervise(&self, slot: Slot, c: &Container, policy: &str) -> Outcome {
        let mut crashes = 0u32;
        let image = self.image(c);
        let mut mounts = launch::mounts(c, &self.volumes);
        // The termination message file (`terminationMessagePath`, default
        // /dev/termination-log): a host file of its own, read into `terminated.message`.
        let termination = self.dir.join(format!("{}.termination-log", c.name));
        if let Some(path) = c.termination_message_path.as_deref() {
            mounts.push(launch::Mount {
                mount_path: path.to_owned(),
                host: termination.clone(),
            });
            mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_path.len()));
        }
        let log = self.log_dir.join(format!("{}.log", c.name));
        let previous_log = self.log_dir.join(format!("{}.previous.log", c.name));
        loop {
            if self.stop.is_cancelled() {
                return Outcome::Stopped;
            }
            let pod = self.pod.borrow().clone();
            let ip = self.run.lock().expect("pod state lock").ip;
            let env = match launch::container_env(&self.client, &pod, c, &ip.to_string()).await {
                Ok(env) => env,
                Err(message) => {
                    self.record(EventType::Warning, "Failed", format!("Error: {message}"));
                    self.update(slot, |s| {
                        s.state = status::waiting("CreateContainerConfigError", Some(message))
                    });
                    if self
                        .pause(self.cfg.base_backoff.max(Duration::from_secs(1)))
                        .await
                    {
                        continue;
                    }
                    return Outcome::Stopped;
                }
            };
            if log.exists() {
                let _ = tokio::fs::rename(&log, &previous_log).await;
            }
            let started = Timestamp::now();
            let begun = Instant::now();
            // Empty at each start, as a kubelet makes it.
            let _ = tokio::fs::write(&termination, b"").await;
            let launched = launch::launch(c, image.as_ref(), &mounts, env, &self.dir.join("work"));
            let mut exit = match launched {
                Err(message) => {
                    status::terminated(128, None, Some("StartError"), Some(message), None, None)
                }
                Ok(l) => match self.node.spawner.spawn(&l, &log).await {
                    Err(err) => status::terminated(
                        128,
                        None,
                        Some("StartError"),
                        Some(err.to_string()),
                        None,
                        None,
                    ),
                    Ok(child) => {
                        self.watch_process(
                            slot,
                            c,
                            child,
                            l,
                            image.clone(),
                            mounts.clone(),
                            started,
                        )
                        .await
                    }
                },
            };
            if let Some(t) = exit.terminated.as_mut()
                && t.message.is_none()
            {
                t.message = termination_message(c, &termination, &log, t.exit_code).await;
            }
            let code = exit.terminated.as_ref().map_or(0, |t| t.exit_code);
            if let Some(t) = exit
                .terminated
                .as_ref()
                .filter(|t| t.reason.as_deref() == Some("StartError"))
            {
                let message = t.message.clone().unwrap_or_default();
                self.record(EventType::Warning, "Failed", format!("Error: {message}"));
            }
            self.update(slot, |s| {
                s.state = exit.clone();
                s.ready = false;
            });
            if self.stop.is_cancelled() {
                return Outcome::Stopped;
            }
            let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
            if !restart {
                self.update(slot, |s| s.done = true);
                return if code == 0 {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                };
            }
            if begun.elapsed() >= self.cfg.max_backoff.saturating_mul(2) {
                crashes = 0;
            }
            crashes += 1;
            let delay = crash_loop_delay(crashes, self.cfg.base_backoff, self.cfg.max_backoff);
            if !delay.is_zero() {
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let message = format!(
                    "back-off {} restarting failed container={} pod={pod_name}_{ns}({uid})",
                    humanize(delay),
                    c.name
                );
                self.update(slot, |s| {
                    s.last_state = Some(exit.clone());
                    s.state = status::waiting("CrashLoopBackOff", Some(message));
                });
                self.record(
                    EventType::Warning,
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {} in pod {pod_name}_{ns}({uid})",
                        c.name
                    ),
                );
                if !self.pause(delay).await {
                    return Outcome::Stopped;
                }
            }
            self.update(slot, |s| {
                s.last_state = Some(exit.clone());
                s.restart_count += 1;
                s.state = status::waiting("ContainerCreating", None);
            });
        }
    }

    /// Watches a running container: probes, memory limit, pod stop. Returns its terminated state.
    #[allow(clippy::too_many_arguments)]
    async fn watch_process(
        &self,
        slot: Slot,
        c: &Container,
        mut child: tokio::process::Child,
        launch: Launch,
        image: Option<ImageConfig>,
        mounts: Vec<launch::Mount>,
        started: Timestamp,
    ) -> ContainerState {
        let pid = child.id().unwrap_or_default();
        // Kills what the container leaves behind when it exits, or when this future is dropped.
        let procs = self.node.spawner.processes(pid);
        let container_id = format!("devcluster://{pid}");
        let is_app = matches!(slot, Slot::App(_));
        let (startup, readiness, liveness) = if is_app {
            (
                c.startup_probe.clone(),
                c.readiness_probe.clone(),
                c.liveness_probe.clone(),
            )
        } else {
            (None, None, None)
        };
        self.update(slot, |s| {
            s.state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(started)),
                }),
                ..ContainerState::default()
            };
            s.container_id = Some(container_id.clone());
            s.started = startup.is_none();
            s.ready = startup.is_none() && readiness.is_none();
        });
        self.record(
            EventType::Normal,
            "Started",
            format!("Started container {}", c.name),
        );
        let ip = self.run.lock().expect("pod state lock").ip;
        let target = Target {
            ip: IpAddr::V4(ip),
            container: c.clone(),
            launch,
            mounts,
            image,
        };
        let probes = self.stop.child_token();
        let _stop_probes = probes.clone().drop_guard();
        let (startup_tx, mut startup_rx) = watch::channel(None);
        let (ready_tx, mut ready_rx) = watch::channel(None);
        let (live_tx, mut live_rx) = watch::channel(None);
        let spawn_probe = |p: Option<&k8s_openapi::api::core::v1::Probe>,
                           tx: &watch::Sender<Option<bool>>| {
            if let Some(p) = p {
                tokio::spawn(probe::run(
                    p.clone(),
                    target.clone(),
                    tx.clone(),
                    probes.clone(),
                ));
            }
        };
        spawn_probe(startup.as_ref(), &startup_tx);
        if startup.is_none() {
            spawn_probe(readiness.as_ref(), &ready_tx);
            spawn_probe(liveness.as_ref(), &live_tx);
        }
        let limit = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| launch::parse_bytes(&q.0));
        let mut memory = tokio::time::interval(MEMORY_POLL);
        let mut oom = false;
        let mut kill_at: Option<Instant> = None;
        let mut stopping = false;
        let mut startup_done = startup.is_none();
        let exit = loop {
            let kill_deadline =
                kill_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
            tokio::select! {
                exit = child.wait() => break exit,
                _ = memory.tick(), if limit.is_some() && !oom => {
                    if limit.is_some_and(|l| procs.rss() > l) {
                        oom = true;
                        procs.kill_all();
                    }
                }
                () = self.stop.cancelled(), if !stopping => {
                    // Also when a failed probe is already stopping it: the earlier deadline wins.
                    stopping = true;
                    self.record(EventType::Normal, "Killing", format!("Stopping container {}", c.name));
                    procs.signal_main(Signal::SIGTERM);
                    let deadline = *self.kill_at.lock().expect("kill_at lock");
                    kill_at = Some(kill_at.map_or(deadline, |k| k.min(deadline)));
                }
                () = tokio::time::sleep_until(kill_deadline.into()), if kill_at.is_some() => {
                    procs.kill_all();
                    kill_at = Some(Instant::now() + Duration::from_secs(86_400));
                }
                Ok(()) = startup_rx.changed(), if !startup_done => {
                    let verdict = *startup_rx.borrow_and_update();
                    match verdict {
                        Some(true) => {
                            self.update(slot, |s| {
                                s.started = true;
                                s.ready = readiness.is_none();
                            });
                            spawn_probe(readiness.as_ref(), &ready_tx);
                            spawn_probe(liveness.as_ref(), &live_tx);
                            startup_done = true;
                        }
                        Some(false) if kill_at.is_none() => {
                            self.record(EventType::Warning, "Unhealthy", "Startup probe failed".into());
                            self.record(EventType::Normal, "Killing", format!("Container {} failed startup probe, will be restarted", c.name));
                            procs.signal_main(Signal::SIGTERM);
                            kill_at = Some(Instant::now() + self.probe_grace());
                        }
                        _ => {}
                    }
                }
                Ok(()) = ready_rx.changed() => {
                    let verdict = *ready_rx.borrow_and_update();
                    if verdict == Some(false) {
                        self.record(EventType::Warning, "Unhealthy", "Readiness probe failed".into());
                    }
                    self.update(slot, |s| s.ready = verdict == Some(true));
                }
                Ok(()) = live_rx.changed() => {
                    if *live_rx.borrow_and_update() == Some(false) && kill_at.is_none() {
                        self.record(EventType::Warning, "Unhealthy", "Liveness probe failed".into());
                        self.record(EventType::Normal, "Killing", format!("Container {} failed liveness probe, will be restarted", c.name));
                        procs.signal_main(Signal::SIGTERM);
                        kill_at = Some(Instant::now() + self.probe_grace());
                    }
                }
            }
        };
        let (code, signal) = match exit {
            Ok(status) => match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(code), _) => (code, None),
                (None, Some(sig)) => (128 + sig, Some(sig)),
                (None, None) => (255, None),
            },
            Err(_) => (255, None),
        };
        if oom {
            status::terminated(
                137,
                signal,
                Some("OOMKilled"),
                None,
                Some(started),
                Some(container_id),
            )
        } else {
            status::terminated(code, signal, None, None, Some(started), Some(container_id))
        }
    }
}

/// The CrashLoopBackOff delay before the restart after the `crashes`-th crash in a row: the
/// first restart is immediate, then `base` doubles up to `max`.
fn crash_loop_delay(crashes: u32, base: Duration, max: Duration) -> Duration {
    if crashes <= 1 {
        return Duration::ZERO;
    }
    base.saturating_mul(2u32.saturating_pow(crashes - 2))
        .min(max)
}

/// A duration the way Kubernetes prints back-off delays (`10s`, `2m40s`).
fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    match (secs / 60, secs % 60) {
        (0, 0) => format!("{}ms", d.as_millis()),
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m0s"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// Most bytes of a termination message, as in Kubernetes.
const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The message of a terminated container: its termination message file, or with
/// `terminationMessagePolicy: FallbackToLogsOnError` and a failed, silent exit, the end of its
/// log (at most 80 lines), each cut to [`TERMINATION_MESSAGE_LIMIT`] bytes.
async fn termination_message(
    c: &Container,
    file: &std::path::Path,
    log: &std::path::Path,
    exit_code: i32,
) -> Option<String> {
    let cut = |bytes: &[u8]| {
        let start = bytes.len().saturating_sub(TERMINATION_MESSAGE_LIMIT);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    };
    let written = tokio::fs::read(file).await.unwrap_or_default();
    if !written.is_empty() {
        return Some(cut(&written[..written.len().min(TERMINATION_MESSAGE_LIMIT)]));
    }
    if exit_code == 0 || c.termination_message_policy.as_deref() != Some("FallbackToLogsOnError") {
        return None;
    }
    let text = tokio::fs::read(log).await.ok()?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    (!tail.is_empty()).then(|| cut(tail.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loop_back_off_doubles_up_to_the_maximum() {
        let delays: Vec<u64> = (1..=8)
            .map(|n| {
                crash_loop_delay(n, Duration::from_secs(10), Duration::from_secs(300)).as_secs()
            })
            .collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(
            crash_loop_delay(100, Duration::from_secs(10), Duration::from_secs(300)).as_secs(),
            300
        );
    }

    #[test]
    fn backoff_delays_print_like_kubernetes() {
        assert_eq!(humanize(Duration::from_secs(10)), "10s");
        assert_eq!(humanize(Duration::from_secs(160)), "2m40s");
        assert_eq!(humanize(Duration::from_secs(300)), "5m0s");
        assert_eq!(humanize(Duration::from_millis(200)), "200ms");
    }
}
