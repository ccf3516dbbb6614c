//! What `conveyor dev` does through the Kubernetes API: install the CRDs, apply manifests (with
//! the real `kubectl` when it is on PATH, else with kube-rs server-side apply), and read back
//! what the demo waits for.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde::Deserialize;

/// Field manager of everything `conveyor dev` applies.
const FIELD_MANAGER: &str = "conveyor-dev";

/// Applies Conveyor's CRDs (from the `conveyor-crds` crate) and waits until their kinds serve.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in [
        conveyor_crds::JobQueue::crd(),
        conveyor_crds::Worker::crd(),
        conveyor_crds::JobSchedule::crd(),
    ] {
        let name = crd.name_any();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("cannot apply CRD {name}"))?;
    }
    Ok(())
}

/// True once the API server serves both Conveyor kinds.
pub async fn crds_served(client: &Client) -> bool {
    let jobqueues: Api<conveyor_crds::JobQueue> = Api::all(client.clone());
    let workers: Api<conveyor_crds::Worker> = Api::all(client.clone());
    let lp = ListParams::default().limit(1);
    jobqueues.list_metadata(&lp).await.is_ok() && workers.list_metadata(&lp).await.is_ok()
}

/// The `kubectl` executable on PATH, if any.
pub fn kubectl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
}

/// Runs `kubectl --kubeconfig <kubeconfig> <args>` and returns its stdout; fails with its stderr.
pub async fn run_kubectl(
    kubectl: &Path,
    kubeconfig: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}", kubectl.display()))?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The objects of every `*.yaml`/`*.yml` file directly in `dir`, in file-name order.
pub fn read_manifests(dir: &Path) -> anyhow::Result<Vec<DynamicObject>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read manifest directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .with_context(|| format!("invalid YAML in {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let object: DynamicObject = serde_yaml::from_value(value)
                .with_context(|| format!("not a Kubernetes object in {}", file.display()))?;
            objects.push(object);
        }
    }
    if objects.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    Ok(objects)
}

/// Server-side applies `objects` with kube-rs, as `kubectl apply --server-side` would.
pub async fn apply_objects(client: &Client, objects: &[DynamicObject]) -> anyhow::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in objects {
        let types = object
            .types
            .as_ref()
            .context("a manifest has no apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(types)?;
        let name = object.name_any();
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("the cluster does not serve {}", types.kind))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                object.namespace().as_deref().unwrap_or("default"),
                &resource,
            ),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .with_context(|| format!("cannot apply {} {name}", types.kind))?;
    }
    Ok(())
}

/// Ready replicas of the Deployment that the Worker `worker` owns (0 while it has none).
pub async fn worker_ready_replicas(
    client: &Client,
    namespace: &str,
    worker: &str,
) -> anyhow::Result<i32> {
    let workers: Api<conveyor_crds::Worker> = Api::namespaced(client.clone(), namespace);
    let Some(owner) = workers.get_opt(worker).await? else {
        return Ok(0);
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let ready = deployments
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|d| {
            d.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == owner.uid().as_ref())
        })
        .filter_map(|d| d.status.as_ref()?.ready_replicas)
        .sum();
    Ok(ready)
}

/// What the `JobQueue` says about itself, for error messages: its `Ready` condition.
pub async fn queue_story(client: &Client, namespace: &str, name: &str) -> String {
    let api: Api<conveyor_crds::JobQueue> = Api::namespaced(client.clone(), namespace);
    let ready = match api.get_opt(name).await {
        Err(e) => return format!("cannot read JobQueue {namespace}/{name}: {e}"),
        Ok(None) => return format!("JobQueue {namespace}/{name} does not exist"),
        Ok(Some(queue)) => queue
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready")),
    };
    match ready {
        None => format!(
            "JobQueue {namespace}/{name} has no Ready condition yet (is the operator reconciling it?)"
        ),
        Some(c) => format!(
            "JobQueue {namespace}/{name}: Ready={} ({}: {})",
            c.status, c.reason, c.message
        ),
    }
}

/// What the worker pods of a namespace are doing, for error messages: phase and the reason a
/// container is waiting or terminated.
pub async fn pods_story(client: &Client, namespace: &str) -> String {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = match api.list(&ListParams::default()).await {
        Ok(pods) => pods.items,
        Err(e) => return format!("cannot list pods: {e}"),
    };
    if pods.is_empty() {
        return format!("no pods in namespace {namespace}");
    }
    let lines: Vec<String> = pods
        .iter()
        .map(|pod| {
            let status = pod.status.clone().unwrap_or_default();
            let containers: Vec<String> = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    let state = c.state.unwrap_or_default();
                    let why = match (state.waiting, state.terminated) {
                        (Some(w), _) => w.reason.unwrap_or_default(),
                        (None, Some(t)) => {
                            format!("{} (exit {})", t.reason.unwrap_or_default(), t.exit_code)
                        }
                        (None, None) => "running".to_owned(),
                    };
                    format!("{}: {why}, ready={}", c.name, c.ready)
                })
                .collect();
            format!(
                "pod {} {} [{}]",
                pod.name_any(),
                status.phase.unwrap_or_default(),
                containers.join("; ")
            )
        })
        .collect();
    lines.join("\n  ")
}
