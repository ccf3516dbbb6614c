//! The controller-manager of the Kubernetes test double: the Deployment controller (Deployment →
//! ReplicaSets) and the ReplicaSet controller (ReplicaSet → Pods). They talk to the API server only
//! through a [`kube::Client`], like the real `kube-controller-manager`, so they would run against a
//! real cluster as well.
//!
//! Both run in one loop over three reflectors (Deployments, ReplicaSets, Pods): any change, or a
//! one-second tick for time-based state (minReadySeconds, progress deadlines), reconciles every
//! object. The decisions are pure functions in [`deployment`] and [`replicaset`]. Like Kubernetes,
//! the loop keeps *expectations* of its own writes and leaves an object alone until the reflectors
//! have seen them, so a stale cache never creates or deletes pods twice.

pub mod deployment;
pub mod events;
pub mod replicaset;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};

use self::events::Recorder;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Field manager of every write of the controllers.
pub const FIELD_MANAGER: &str = "devcluster-controller-manager";

/// How long an unmet expectation blocks an object before the controller acts anyway.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The owner reference a controller puts on the objects it creates.
pub(crate) fn controller_owner<K: Resource<DynamicType = ()>>(
    meta: &ObjectMeta,
) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Whether `child` is controlled by `owner` (same namespace, controller owner reference by uid).
pub(crate) fn is_owned_by(child: &ObjectMeta, owner: &ObjectMeta) -> bool {
    child.namespace == owner.namespace
        && owner.uid.is_some()
        && child
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == owner.uid.as_ref())
}

fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Writes a controller made but has not seen in its cache yet.
#[derive(Debug)]
struct Expectation {
    /// Pods (or ReplicaSets) created and not yet seen.
    created: BTreeSet<String>,
    /// Pods deleted and still seen as active.
    deleted: BTreeSet<String>,
    /// ReplicaSets scaled, with the generation their write produced.
    scaled: Vec<(String, i64)>,
    since: Instant,
}

impl Expectation {
    fn new() -> Self {
        Self {
            created: BTreeSet::new(),
            deleted: BTreeSet::new(),
            scaled: Vec::new(),
            since: Instant::now(),
        }
    }
}

struct Manager {
    client: Client,
    deployments: Store<Deployment>,
    replica_sets: Store<ReplicaSet>,
    pods: Store<Pod>,
    /// Per Deployment key / ReplicaSet key.
    expectations: HashMap<String, Expectation>,
    deployment_events: Recorder,
    replica_set_events: Recorder,
}

/// Records a Normal event about `reference`, without waiting for it to be written.
fn record(recorder: &Recorder, reference: ObjectReference, reason: &str, note: String) {
    let recorder = recorder.clone();
    let reason = reason.to_owned();
    tokio::spawn(async move {
        if let Err(err) = recorder.record(&reference, &reason, &note).await {
            tracing::debug!(%err, "cannot record an event");
        }
    });
}

fn spawn_reflector<K>(
    client: &Client,
    changed: Arc<Notify>,
    shutdown: &CancellationToken,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    None => return,
                    Some(Err(err)) => tracing::debug!(%err, kind = %K::kind(&()), "watch failed; retrying"),
                    Some(Ok(_)) => changed.notify_one(),
                },
            }
        }
    });
    store
}

/// Runs the Deployment and ReplicaSet controllers until `shutdown` is cancelled.
///
/// Errors talking to the API server are logged and retried; the function only returns on shutdown.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let changed = Arc::new(Notify::new());
    let mut manager = Manager {
        deployments: spawn_reflector(&client, changed.clone(), &shutdown),
        replica_sets: spawn_reflector(&client, changed.clone(), &shutdown),
        pods: spawn_reflector(&client, changed.clone(), &shutdown),
        deployment_events: Recorder::new(client.clone(), "deployment-controller"),
        replica_set_events: Recorder::new(client.clone(), "replicaset-controller"),
        client,
        expectations: HashMap::new(),
    };
    let ready = async {
        let _ = manager.deployments.wait_until_ready().await;
        let _ = manager.replica_sets.wait_until_ready().await;
        let _ = manager.pods.wait_until_ready().await;
    };
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = ready => {}
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        manager.reconcile_all().await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = changed.notified() => {}
            _ = tick.tick() => {}
        }
    }
}

impl Manager {
    async fn reconcile_all(&mut self) {
        let now = Timestamp::now();
        let pods = self.pods.state();
        let replica_sets = self.replica_sets.state();
        let mut by_ns: HashMap<&str, (Vec<&ReplicaSet>, Vec<&Pod>)> = HashMap::new();
        for rs in &replica_sets {
            by_ns
                .entry(rs.metadata.namespace.as_deref().unwrap_or_default())
                .or_default()
                .0
                .push(rs);
        }
        for p in &pods {
            by_ns
                .entry(p.metadata.namespace.as_deref().unwrap_or_default())
                .or_default()
                .1
                .push(p);
        }
        let empty = (Vec::new(), Vec::new());
        for d in self.deployments.state() {
            if d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (rss, pods) = by_ns
                .get(d.metadata.namespace.as_deref().unwrap_or_default())
                .unwrap_or(&empty);
            let k = format!("deployment:{}", key(&d.metadata));
            if !self.satisfied(&k, rss, pods) {
                continue;
            }
            let plan = deployment::plan(&d, rss, pods, now);
            if let Err(err) = self.apply_deployment(&d, plan).await {
                tracing::warn!(%err, deployment = %k, "deployment sync failed");
            }
        }
        for rs in &replica_sets {
            if rs.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (rss, pods) = by_ns
                .get(rs.metadata.namespace.as_deref().unwrap_or_default())
                .unwrap_or(&empty);
            let k = format!("replicaset:{}", key(&rs.metadata));
            if !self.satisfied(&k, rss, pods) {
                continue;
            }
            let plan = replicaset::plan(rs, pods, now);
            if let Err(err) = self.apply_replica_set(rs, plan).await {
                tracing::warn!(%err, replicaset = %k, "replicaset sync failed");
            }
        }
    }

    /// Whether the cache reflects every write made for `key`; forgets expectations that are met
    /// or too old.
    fn satisfied(&mut self, key: &str, rss: &[&ReplicaSet], pods: &[&Pod]) -> bool {
        let Some(exp) = self.expectations.get(key) else {
            return true;
        };
        let seen = |name: &str| {
            pods.iter()
                .any(|p| p.metadata.name.as_deref() == Some(name))
                || rss
                    .iter()
                    .any(|rs| rs.metadata.name.as_deref() == Some(name))
        };
        let still_active = |name: &str| {
            pods.iter()
                .any(|p| p.metadata.name.as_deref() == Some(name) && replicaset::is_active(p))
        };
        let scaled = exp.scaled.iter().all(|(name, generation)| {
            rss.iter().any(|rs| {
                rs.metadata.name.as_deref() == Some(name.as_str())
                    && rs.metadata.generation.unwrap_or(0) >= *generation
            })
        });
        let met = exp.created.iter().all(|n| seen(n))
            && !exp.deleted.iter().any(|n| still_active(n))
            && scaled;
        if met || exp.since.elapsed() > EXPECTATION_TIMEOUT {
            self.expectations.remove(key);
            true
        } else {
            false
        }
    }

    async fn apply_deployment(
        &mut self,
        d: &Deployment,
        plan: deployment::Plan,
    ) -> Result<(), kube::Error> {
        let ns = d.metadata.namespace.as_deref().unwrap_or_default();
        let rs_api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), ns);
        let params = patch_params();
        let mut exp = Expectation::new();
        for rs in &plan.create {
            match rs_api.create(&post_params(), rs).await {
                Ok(created) => {
                    let name = created.metadata.name.unwrap_or_default();
                    let replicas = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let note = format!("Scaled up replica set {name} from 0 to {replicas}");
                    record(
                        &self.deployment_events,
                        d.object_ref(&()),
                        "ScalingReplicaSet",
                        note,
                    );
                    exp.created.insert(name);
                }
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => return Err(e),
            }
        }
        for (name, replicas) in &plan.scale {
            let before = self
                .replica_sets
                .get(&ObjectRef::new(name).within(ns))
                .and_then(|rs| rs.spec.as_ref()?.replicas)
                .unwrap_or(1);
            let patch = json!({ "spec": { "replicas": replicas } });
            let rs = rs_api.patch(name, &params, &Patch::Merge(&patch)).await?;
            let direction = if *replicas > before { "up" } else { "down" };
            let note = format!("Scaled {direction} replica set {name} from {before} to {replicas}");
            record(
                &self.deployment_events,
                d.object_ref(&()),
                "ScalingReplicaSet",
                note,
            );
            exp.scaled
                .push((name.clone(), rs.metadata.generation.unwrap_or(0)));
        }
        for (name, revision) in &plan.revision {
            let patch =
                json!({ "metadata": { "annotations": { deployment::REVISION: revision } } });
            rs_api.patch(name, &params, &Patch::Merge(&patch)).await?;
        }
        for name in &plan.delete {
            match rs_api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
        let d_api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let name = d.metadata.name.as_deref().unwrap_or_default();
        let revision = plan
            .create
            .iter()
            .filter_map(|rs| {
                rs.metadata
                    .annotations
                    .as_ref()?
                    .get(deployment::REVISION)
                    .cloned()
            })
            .chain(plan.revision.iter().map(|(_, r)| r.clone()))
            .next();
        if let Some(revision) = revision {
            let patch =
                json!({ "metadata": { "annotations": { deployment::REVISION: revision } } });
            d_api.patch(name, &params, &Patch::Merge(&patch)).await?;
        }
        if let Some(status) = plan.status {
            let patch = json!({ "status": status });
            match d_api
                .patch_status(name, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
        if !exp.created.is_empty() || !exp.scaled.is_empty() {
            self.expectations
                .insert(format!("deployment:{}", key(&d.metadata)), exp);
        }
        Ok(())
    }

    async fn apply_replica_set(
        &mut self,
        rs: &ReplicaSet,
        plan: replicaset::Plan,
    ) -> Result<(), kube::Error> {
        let ns = rs.metadata.namespace.as_deref().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut exp = Expectation::new();
        let mut result = Ok(());
        for _ in 0..plan.create {
            let pod = replicaset::new_pod(rs, &random_suffix());
            match pods.create(&post_params(), &pod).await {
                Ok(created) => {
                    let name = created.metadata.name.unwrap_or_default();
                    let note = format!("Created pod: {name}");
                    record(
                        &self.replica_set_events,
                        rs.object_ref(&()),
                        "SuccessfulCreate",
                        note,
                    );
                    exp.created.insert(name);
                }
                // A random name collided: the next pass creates another one.
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        for name in &plan.delete {
            match pods.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    let note = format!("Deleted pod: {name}");
                    record(
                        &self.replica_set_events,
                        rs.object_ref(&()),
                        "SuccessfulDelete",
                        note,
                    );
                    exp.deleted.insert(name.clone());
                }
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !exp.created.is_empty() || !exp.deleted.is_empty() {
            self.expectations
                .insert(format!("replicaset:{}", key(&rs.metadata)), exp);
        }
        result?;
        if let Some(status) = plan.status {
            let rs_api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), ns);
            let patch = json!({ "status": status });
            let name = rs.metadata.name.as_deref().unwrap_or_default();
            match rs_api
                .patch_status(name, &patch_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The HTTP status of an API error, if the API server answered with one.
fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

/// Five characters of [`deployment::SAFE_ALPHABET`], like the suffix of a generated pod name.
pub(crate) fn random_suffix() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| {
            char::from(deployment::SAFE_ALPHABET[usize::from(*b) % deployment::SAFE_ALPHABET.len()])
        })
        .collect()
}
