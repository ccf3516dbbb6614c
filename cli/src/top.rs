//! `conveyor top`: a refreshing terminal view of a namespace's queues and workers, for people
//! who live in a terminal. It reads what the operator keeps in the JobQueues' and Workers'
//! status (through the kubeconfig, one list of each per refresh), so it costs the NATS server
//! nothing and shows the same figures as `kubectl get` and `/metrics`.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use conveyor_crds::{JobQueue, Worker};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::ListParams;
use kube::config::KubeConfigOptions;
use kube::{Api, ResourceExt};

use crate::args::bounds;

/// Arguments of `conveyor top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// kubeconfig context (default: the current context).
    #[arg(long, env = "CONVEYOR_KUBE_CONTEXT")]
    pub context: Option<String>,
    /// Kubernetes namespace of the queues and workers.
    #[arg(
        long,
        short = 'n',
        env = "CONVEYOR_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Time between refreshes (100ms to 1h).
    #[arg(long, default_value = "2s",
          value_parser = |s: &str| bounds::duration(s, Duration::from_millis(100), Duration::from_secs(3600)))]
    pub interval: Duration,
    /// Print one view and exit (for scripts). Without it, each refresh replaces the view on a
    /// terminal and follows the previous one otherwise.
    #[arg(long)]
    pub once: bool,
}

/// Runs `conveyor top` until Ctrl-C (or once with `--once`).
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .context("reading the kubeconfig (conveyor top reads JobQueues and Workers)")?;
    let client = kube::Client::try_from(config).context("building a Kubernetes client")?;
    let queues: Api<JobQueue> = Api::namespaced(client.clone(), &args.namespace);
    let workers: Api<Worker> = Api::namespaced(client, &args.namespace);
    let terminal = std::io::stdout().is_terminal();
    loop {
        let listed_queues = queues
            .list(&ListParams::default())
            .await
            .context("listing JobQueues")?;
        let listed_workers = workers
            .list(&ListParams::default())
            .await
            .context("listing Workers")?;
        let now = k8s_openapi::jiff::Timestamp::now();
        let text = view(
            &args.namespace,
            &listed_queues.items,
            &listed_workers.items,
            &now.strftime("%H:%M:%S UTC").to_string(),
        );
        if terminal && !args.once {
            // Home, clear, then the view: one frame per refresh.
            print!("\x1b[H\x1b[2J{text}");
        } else {
            println!("{text}");
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(args.interval) => {}
        }
    }
}

/// The conditions worth a glance: `Ready` when false, the alerting ones when true.
fn state(conditions: &[Condition], alerting: &[&str]) -> String {
    let mut notes: Vec<String> = Vec::new();
    for c in conditions {
        let bad = match c.type_.as_str() {
            "Ready" | "Available" => c.status == "False",
            t if alerting.contains(&t) => c.status == "True",
            _ => false,
        };
        if bad {
            notes.push(format!("{}: {}", c.type_, c.reason));
        }
    }
    if notes.is_empty() {
        "ok".to_owned()
    } else {
        notes.join(", ")
    }
}

fn figure(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// One view of the namespace's queues and workers at `at`.
pub fn view(namespace: &str, queues: &[JobQueue], workers: &[Worker], at: &str) -> String {
    let mut out = format!("conveyor top — namespace {namespace} — {at}\n\n");
    if queues.is_empty() {
        let _ = writeln!(out, "no JobQueues in namespace {namespace}");
    } else {
        let rows: Vec<Vec<String>> = queues
            .iter()
            .map(|q| {
                let s = q.status.clone().unwrap_or_default();
                vec![
                    q.name_any(),
                    figure(s.pending),
                    figure(s.in_flight),
                    figure(s.delayed),
                    figure(s.dead_lettered),
                    s.oldest_pending_age.unwrap_or_else(|| "-".to_owned()),
                    s.submitted_per_second.unwrap_or_else(|| "-".to_owned()),
                    s.finished_per_second.unwrap_or_else(|| "-".to_owned()),
                    state(&s.conditions, &["Backlogged", "JobsFailing"]),
                ]
            })
            .collect();
        out.push_str(&crate::table::render_spaced(
            &[
                "QUEUE",
                "PENDING",
                "IN FLIGHT",
                "DELAYED",
                "DEAD",
                "OLDEST",
                "IN/S",
                "DONE/S",
                "STATE",
            ],
            &rows,
            2,
        ));
    }
    out.push('\n');
    if workers.is_empty() {
        let _ = writeln!(out, "no Workers in namespace {namespace}");
    } else {
        let rows: Vec<Vec<String>> = workers
            .iter()
            .map(|w| {
                let s = w.status.clone().unwrap_or_default();
                let desired = s
                    .desired_replicas
                    .map_or_else(|| "-".to_owned(), |d| d.to_string());
                let slots = s.slots.map_or_else(|| "-".to_owned(), |n| n.to_string());
                vec![
                    w.name_any(),
                    w.spec.queue.clone(),
                    format!("{}/{desired}", s.ready_replicas),
                    format!("{}/{slots}", figure(s.busy)),
                    s.recycled_pods.to_string(),
                    state(&s.conditions, &["Degraded"]),
                ]
            })
            .collect();
        out.push_str(&crate::table::render_spaced(
            &[
                "WORKER",
                "QUEUE",
                "READY",
                "BUSY/SLOTS",
                "RECYCLED",
                "STATE",
            ],
            &rows,
            2,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str, status: serde_json::Value) -> JobQueue {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "conveyor.dev/v1alpha1", "kind": "JobQueue",
            "metadata": {"name": name}, "spec": {}, "status": status
        }))
        .unwrap()
    }

    #[test]
    fn shows_figures_and_only_the_conditions_that_need_a_look() {
        let calm = queue(
            "calm",
            serde_json::json!({"pending": 0, "inFlight": 1, "conditions": [
                {"type": "Ready", "status": "True", "reason": "StreamReady", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Backlogged", "status": "False", "reason": "WithinThresholds",
                 "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        let busy = queue(
            "thumbnails",
            serde_json::json!({"pending": 1200, "inFlight": 8, "delayed": 3, "deadLettered": 10,
                "oldestPendingAge": "4m10s", "submittedPerSecond": "35", "finishedPerSecond": "8.5",
                "conditions": [{"type": "Backlogged", "status": "True",
                    "reason": "DepthOverThreshold", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        let worker: Worker = serde_json::from_value(serde_json::json!({
            "apiVersion": "conveyor.dev/v1alpha1", "kind": "Worker",
            "metadata": {"name": "thumbs"},
            "spec": {"queue": "thumbnails", "handler": {"mode": "exec", "command": ["/h"]},
                     "template": {"spec": {"containers": [{"name": "h", "image": "h"}]}}},
            "status": {"replicas": 2, "readyReplicas": 1, "desiredReplicas": 2, "busy": 8,
                       "slots": 4, "recycledPods": 3, "conditions": [
                {"type": "Degraded", "status": "True", "reason": "OOMKilled", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let text = view("team", &[calm, busy], &[worker], "12:00:00 UTC");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "conveyor top — namespace team — 12:00:00 UTC");
        assert_eq!(
            lines[2],
            "QUEUE       PENDING  IN FLIGHT  DELAYED  DEAD  OLDEST  IN/S  DONE/S  STATE"
        );
        assert_eq!(
            lines[3],
            "calm        0        1          -        -     -       -     -       ok"
        );
        assert_eq!(
            lines[4],
            "thumbnails  1200     8          3        10    4m10s   35    8.5     Backlogged: DepthOverThreshold"
        );
        assert_eq!(
            lines[6],
            "WORKER  QUEUE       READY  BUSY/SLOTS  RECYCLED  STATE"
        );
        assert_eq!(
            lines[7],
            "thumbs  thumbnails  1/2    8/4         3         Degraded: OOMKilled"
        );
    }

    #[test]
    fn says_when_there_is_nothing() {
        let text = view("empty", &[], &[], "now");
        assert!(text.contains("no JobQueues in namespace empty"), "{text}");
        assert!(text.contains("no Workers in namespace empty"), "{text}");
    }
}
