//! Issues rate-limit tokens for every `JobQueue` with a `rateLimit` (see `conveyor::rate`): one
//! issuer task per such queue, started, restarted on a change of rate or server, and stopped
//! when the queue goes or drops its limit. Runs on the leader only, so tokens come from one
//! place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::JobQueue;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// How often the set of issuers is brought in line with the queues.
const RECHECK: Duration = Duration::from_secs(1);

/// What an issuer runs with; a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issuing {
    per_second: u32,
    url: Option<String>,
}

/// Keeps an issuer running for every rate-limited queue until `shutdown` is cancelled.
pub async fn run(ctx: Arc<Context>, queues: Store<JobQueue>, shutdown: CancellationToken) {
    let mut running: HashMap<QueueRef, (Issuing, CancellationToken)> = HashMap::new();
    let mut ticker = tokio::time::interval(RECHECK);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let mut wanted = HashMap::new();
        for queue in queues.state() {
            let Some(per_second) = queue.spec.rate_limit.and_then(|r| u32::try_from(r).ok()) else {
                continue;
            };
            let key = QueueRef::new(queue.namespace().unwrap_or_default(), queue.name_any());
            let url = queue.spec.nats.as_ref().map(|n| n.url.clone());
            wanted.insert(key, Issuing { per_second, url });
        }
        running.retain(|key, (issuing, stop)| {
            let keep = wanted.get(key) == Some(issuing);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (key, issuing) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let Ok(Some(js)) = ctx.nats.connected(issuing.url.as_deref()).await else {
                continue;
            };
            let stop = shutdown.child_token();
            tracing::info!(queue = %key.stream(), per_second = issuing.per_second, "issuing rate-limit tokens");
            tokio::spawn(conveyor::rate::issue(
                js.client(),
                key.clone(),
                issuing.per_second,
                stop.clone(),
            ));
            running.insert(key, (issuing, stop));
        }
    }
    for (_, (_, stop)) in running {
        stop.cancel();
    }
}
