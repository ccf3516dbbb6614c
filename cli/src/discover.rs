//! Where a queue's NATS server is, when `--nats-url` is not given: the `JobQueue` says so
//! (`status.natsUrl`, written by the operator, else `spec.nats.url`), looked up through the
//! kubeconfig — which is how `kubectl conveyor` finds queues on a cluster.

use anyhow::{Context as _, anyhow};
use conveyor_crds::JobQueue;
use kube::Api;
use kube::config::KubeConfigOptions;

use crate::args::QueueArgs;

/// The URL used when neither `--nats-url` nor a kubeconfig is there (`conveyor dev`'s habit of
/// a local server).
pub const LOCAL_NATS: &str = "nats://127.0.0.1:4222";

/// The NATS URL of `queue` (or, without one, of the namespace's first JobQueue).
pub async fn nats_url(args: &QueueArgs, queue: Option<&str>) -> anyhow::Result<String> {
    if let Some(url) = &args.nats_url {
        return Ok(url.clone());
    }
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match kube::Config::from_kubeconfig(&options).await {
        Ok(config) => config,
        Err(err) if args.context.is_none() => {
            tracing::debug!(%err, "no kubeconfig; using {LOCAL_NATS}");
            return Ok(LOCAL_NATS.to_owned());
        }
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "reading kubeconfig context {:?}",
                    args.context.as_deref().unwrap_or_default()
                )
            });
        }
    };
    let client = kube::Client::try_from(config).context("building a Kubernetes client")?;
    let ns = &args.namespace;
    let api: Api<JobQueue> = Api::namespaced(client, ns);
    let hint = "pass --nats-url (e.g. with `kubectl port-forward` to your NATS)";
    let jq = match queue {
        Some(name) => api
            .get(name)
            .await
            .with_context(|| format!("looking up JobQueue {ns}/{name} to find its NATS; {hint}"))?,
        None => api
            .list(&kube::api::ListParams::default().limit(1))
            .await
            .with_context(|| format!("listing the JobQueues of {ns} to find their NATS; {hint}"))?
            .items
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("namespace {ns} has no JobQueue to find NATS from; {hint}"))?,
    };
    let name = kube::ResourceExt::name_any(&jq);
    jq.status
        .and_then(|s| s.nats_url)
        .or_else(|| jq.spec.nats.map(|n| n.url))
        .ok_or_else(|| {
            anyhow!(
                "JobQueue {ns}/{name} does not say where its NATS is yet (no status.natsUrl: \
                 is the operator running?); {hint}"
            )
        })
}
