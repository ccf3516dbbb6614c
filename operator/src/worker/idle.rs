//! Safe scale-down: before the scaler shrinks a pool, each pod's deletion cost
//! (`controller.kubernetes.io/pod-deletion-cost`) is set from the jobs it is running, read from
//! the runtime's `/metrics` (`conveyor_worker_jobs_in_flight`) on the pod IP. The ReplicaSet
//! controller deletes lower costs first, so idle pods go and busy ones keep their jobs.

use std::collections::BTreeMap;
use std::time::Duration;

use conveyor_crds::Worker;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::deployment::{HEALTH_PORT, selector_string};
use crate::context::Context;

/// The annotation the ReplicaSet controller orders scale-down victims by (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The runtime's gauge of jobs being handled (see `worker-image/src/health.rs`).
const IN_FLIGHT_METRIC: &str = "conveyor_worker_jobs_in_flight";
/// Cost per running job: a pod running more jobs is kept longer.
const COST_PER_JOB: i64 = 100;
/// How long one pod's `/metrics` may take before it counts as unknown.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// The in-flight gauge from a Prometheus text exposition, if present.
pub fn in_flight(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(IN_FLIGHT_METRIC)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v.max(0.0) as u64)
    })
}

/// The deletion cost of a pod running `in_flight` jobs: 0 when idle or unknown (a pod whose
/// metrics cannot be read is starting or broken, and losing it costs no job it reported),
/// 100 per running job otherwise.
pub fn deletion_cost(in_flight: Option<u64>) -> i32 {
    let jobs = i64::try_from(in_flight.unwrap_or(0)).unwrap_or(i64::MAX);
    i32::try_from(jobs.saturating_mul(COST_PER_JOB)).unwrap_or(i32::MAX)
}

/// The annotation patches needed: pods whose recorded cost (absent = 0) differs from `cost`.
pub fn changes(pods: &[(String, Option<&str>, i32)]) -> BTreeMap<String, i32> {
    pods.iter()
        .filter(|(_, recorded, cost)| {
            recorded.and_then(|r| r.parse::<i32>().ok()).unwrap_or(0) != *cost
        })
        .map(|(name, _, cost)| (name.clone(), *cost))
        .collect()
}

/// Sets the deletion cost of every running pod of `worker` from its in-flight jobs. Best effort:
/// errors are logged and the scale-down goes ahead (the drain still gives jobs back).
pub async fn mark(ctx: &Context, worker: &Worker) {
    let ns = worker.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let params = ListParams::default().labels(&selector_string(&worker.name_any()));
    let pods = match api.list(&params).await {
        Ok(list) => list.items,
        Err(err) => {
            tracing::warn!(%err, worker = worker.name_any(), "cannot list pods to mark idle ones");
            return;
        }
    };
    let mut judged = Vec::new();
    for pod in &pods {
        // A pod being recycled keeps the lowest cost: it is the first to go.
        if pod.metadata.deletion_timestamp.is_some() || super::recycle::marked(pod).is_some() {
            continue;
        }
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        let jobs = match ip {
            Some(ip) => scrape(ip).await.as_deref().and_then(in_flight),
            None => None,
        };
        let recorded = pod.annotations().get(DELETION_COST).map(String::as_str);
        judged.push((pod.name_any(), recorded, deletion_cost(jobs)));
    }
    for (name, cost) in changes(&judged) {
        let patch = serde_json::json!({
            "metadata": {"annotations": {DELETION_COST: cost.to_string()}}
        });
        if let Err(err) = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(%err, pod = name, "cannot set the pod deletion cost");
        }
    }
}

/// `GET /metrics` from the runtime on `ip`; `None` when it does not answer in time.
async fn scrape(ip: &str) -> Option<String> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect((ip, HEALTH_PORT as u16)).await?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {ip}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(SCRAPE_TIMEOUT, get).await.ok()?.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP conveyor_worker_jobs_in_flight Jobs being handled now.\n\
        # TYPE conveyor_worker_jobs_in_flight gauge\n\
        conveyor_worker_jobs_in_flight 3\n\
        conveyor_worker_jobs_in_flight_other 9\n";

    #[test]
    fn reads_the_gauge_and_only_it() {
        assert_eq!(in_flight(TEXT), Some(3));
        assert_eq!(in_flight("conveyor_worker_jobs_in_flight_other 9\n"), None);
        assert_eq!(in_flight(""), None);
        assert_eq!(in_flight("conveyor_worker_jobs_in_flight 0\n"), Some(0));
    }

    #[test]
    fn busy_pods_cost_more_than_idle_or_unknown_ones() {
        assert_eq!(deletion_cost(Some(0)), 0);
        assert_eq!(deletion_cost(None), 0);
        assert_eq!(deletion_cost(Some(2)), 200);
        assert_eq!(deletion_cost(Some(u64::MAX)), i32::MAX);
    }

    #[test]
    fn only_changed_costs_are_patched() {
        let pods = [
            ("idle-new".to_owned(), None, 0),
            ("idle-was-busy".to_owned(), Some("100"), 0),
            ("busy".to_owned(), Some("100"), 100),
            ("busy-new".to_owned(), None, 200),
            ("garbage".to_owned(), Some("x"), 0),
        ];
        let patches = changes(&pods);
        assert_eq!(
            patches,
            BTreeMap::from([("busy-new".into(), 200), ("idle-was-busy".into(), 0)])
        );
    }
}
