//! Serves every namespace's run queue ([`super::RUN_QUEUE`]) on the leader: one
//! `conveyor::Worker` per queue whose handler is `conveyor::workflow::engine::Engine`. A run
//! is a chain of jobs in that queue, so what #11 guarantees for continuations (each wave
//! released once, nothing lost across restarts of the operator or NATS) holds for runs; the
//! operator keeps no run in memory. A queue that appears is served within a resync period; one
//! that goes away (or is being deleted) is let go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor::worker::{ReceivedJob, WorkerOptions};
use conveyor::workflow::engine::Engine;
use conveyor_crds::JobQueue;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use super::RUN_QUEUE;
use crate::context::Context;

/// Runs waves at once per run queue (each wave only spawns jobs and returns, so this bounds
/// NATS requests in flight, not work).
pub const CONCURRENCY: usize = 32;

/// Serves the run queues of `queues` until `stop`.
pub async fn run(ctx: Arc<Context>, queues: Store<JobQueue>, stop: CancellationToken) {
    let mut served: HashMap<QueueRef, CancellationToken> = HashMap::new();
    loop {
        let wanted: Vec<Arc<JobQueue>> = queues
            .state()
            .into_iter()
            .filter(|q| q.name_any() == RUN_QUEUE && q.metadata.deletion_timestamp.is_none())
            .collect();
        let names: Vec<QueueRef> = wanted
            .iter()
            .map(|q| QueueRef::new(q.namespace().unwrap_or_default(), q.name_any()))
            .collect();
        served.retain(|queue, token| {
            let keep = names.contains(queue) && !token.is_cancelled();
            if !keep {
                tracing::info!(queue = %queue.stream(), "no longer serving workflow runs");
                token.cancel();
            }
            keep
        });
        for (queue, spec) in names.into_iter().zip(wanted) {
            if served.contains_key(&queue) {
                continue;
            }
            if let Some(token) = serve(&ctx, &queue, &spec, &stop).await {
                tracing::info!(queue = %queue.stream(), "serving workflow runs");
                served.insert(queue, token);
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(ctx.config.resync.max(Duration::from_secs(1))) => {}
        }
    }
    for token in served.values() {
        token.cancel();
    }
}

/// Starts the run worker of `queue` on its NATS server; `None` when the server cannot be
/// reached now (tried again at the next pass).
async fn serve(
    ctx: &Context,
    queue: &QueueRef,
    spec: &JobQueue,
    stop: &CancellationToken,
) -> Option<CancellationToken> {
    let options = crate::jobqueue::nats_options(spec, ctx).await.ok()?;
    let url = spec.spec.nats.as_ref().map(|n| n.url.as_str());
    let js = ctx
        .nats
        .connected_with(
            url,
            options.as_ref().map(|(id, o)| (id.as_str(), o.clone())),
        )
        .await
        .ok()
        .flatten()?;
    let engine = Arc::new(Engine::new(js.clone()));
    let worker = conveyor::Worker::new(js, queue.clone())
        .options(WorkerOptions {
            concurrency: CONCURRENCY,
            priorities: spec.spec.priorities.max(1),
            pod_name: "conveyor-operator".into(),
            ..WorkerOptions::default()
        })
        .handler(move |job: ReceivedJob| {
            let engine = engine.clone();
            async move { engine.handle(job).await }
        });
    let token = stop.child_token();
    let (done, ended) = (token.clone(), token.clone());
    let name = queue.stream();
    tokio::spawn(async move {
        if let Err(err) = worker.run(async move { done.cancelled().await }).await {
            tracing::warn!(%err, queue = %name, "the run worker stopped; starting it again");
        }
        // Ending for any reason lets the next pass start it afresh.
        ended.cancel();
    });
    Some(token)
}
