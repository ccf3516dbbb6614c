//! The scaler: about once per `--scaler-interval`, reads the backlog (pending + in-flight) of
//! every autoscaled Worker's queue straight from JetStream and decides its pool size:
//! `clamp(ceil(backlog / targetBacklogPerReplica), min, max)`, up at once, down only after the
//! backlog stayed low for `scaleDownDelay` (the highest recommendation within that window wins,
//! so a bursty queue does not flap). The decision is a pure function; the loop around it writes
//! `status.desiredReplicas` (field manager `conveyor-operator-scaler`, the only writer of that
//! field for autoscaled pools), and the Worker controller, triggered by that status change,
//! applies it to the Deployment.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, ScaleBasis, ScalingSpec, Worker};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};

use crate::assets;
use crate::context::Context;
use crate::worker::reasons;

/// What the scaler knows about one pool at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Replicas asked for now.
    pub current: i32,
    /// Pending + in-flight jobs, `None` when NATS could not be read.
    pub backlog: Option<u64>,
    /// `scaling.minReplicas`.
    pub min: i32,
    /// `scaling.maxReplicas`.
    pub max: i32,
    /// `scaling.targetBacklogPerReplica`.
    pub target: i32,
}

/// The scaler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to ask for.
    pub replicas: i32,
    /// What it rests on (`status.scaleBasis`; the `Scaling` condition reads it).
    pub basis: ScaleBasis,
    /// Why, for `status.lastScaleReason` and Events.
    pub reason: String,
}

/// Recommendations of the last `scaleDownDelay`, per pool.
#[derive(Debug, Clone, Default)]
pub struct History(VecDeque<(Instant, i32)>);

/// The replicas the backlog alone asks for.
pub fn recommend(backlog: u64, min: i32, max: i32, target: i32) -> i32 {
    let max = max.max(0);
    let min = min.clamp(0, max);
    let target = u64::try_from(target.max(1)).unwrap_or(1);
    let wanted = i32::try_from(backlog.div_ceil(target)).unwrap_or(i32::MAX);
    wanted.clamp(min, max)
}

/// Decides the pool size at `now`, remembering the recommendation in `history`.
pub fn decide(input: Input, window: Duration, history: &mut History, now: Instant) -> Decision {
    let Some(backlog) = input.backlog else {
        return Decision {
            replicas: input.current,
            basis: ScaleBasis::Held,
            reason: format!("NATS unreachable: holding {} replicas", input.current),
        };
    };
    let recommended = recommend(backlog, input.min, input.max, input.target);
    history
        .0
        .retain(|(at, _)| now.saturating_duration_since(*at) <= window);
    history.0.push_back((now, recommended));
    let bounds = format!("min {}, max {}", input.min, input.max);
    let why = format!(
        "backlog {backlog}, target {} per replica ({bounds})",
        input.target
    );
    if recommended >= input.current {
        return Decision {
            replicas: recommended,
            basis: ScaleBasis::Backlog,
            reason: why,
        };
    }
    // Scaling down: never below what the window still asked for, and always within bounds.
    let floor = history
        .0
        .iter()
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(recommended);
    let replicas = floor
        .min(input.current)
        .clamp(input.min.clamp(0, input.max.max(0)), input.max.max(0));
    let reason = if replicas == input.current {
        format!("{why}; waiting for the scale-down delay")
    } else {
        why
    };
    Decision {
        replicas,
        basis: ScaleBasis::Backlog,
        reason,
    }
}

/// Field manager of the scaler's status writes.
const SCALER_MANAGER: &str = "conveyor-operator-scaler";

/// Runs the scaler until `shutdown` resolves. `workers` and `queues` are the controllers'
/// caches.
pub async fn run(
    ctx: Arc<Context>,
    workers: Store<Worker>,
    queues: Store<JobQueue>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Per pool: recent recommendations and the size the scaler last wrote (the cache may lag
    // behind its own writes, the scaler's memory does not).
    let mut pools: HashMap<ObjectRef<Worker>, (History, i32)> = HashMap::new();
    let mut ticker = tokio::time::interval(ctx.config.scaler_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let mut seen = Vec::new();
        for worker in workers.state() {
            let Some(scaling) = worker.spec.scaling.clone() else {
                continue;
            };
            let key = ObjectRef::from_obj(&*worker);
            seen.push(key.clone());
            let ns = worker.namespace().unwrap_or_default();
            let queue = queues.get(&ObjectRef::new(&worker.spec.queue).within(&ns));
            let Some(queue) = queue else { continue };
            let (history, current) = pools.entry(key).or_insert_with(|| {
                let current = worker
                    .status
                    .as_ref()
                    .and_then(|s| s.desired_replicas)
                    .unwrap_or(scaling.min_replicas);
                // After a restart, assume the current size was just recommended, so the pool
                // does not shrink before a full delay has passed.
                (History(VecDeque::from([(now, current)])), current)
            });
            let backlog = backlog(&ctx, &queue).await;
            let window = scaling
                .scale_down_delay()
                .unwrap_or(Duration::from_secs(30));
            let cap = limit_cap(queue.spec.concurrency_limit, worker.spec.concurrency);
            let decision = decide(
                input(*current, backlog, &scaling, cap),
                window,
                history,
                now,
            );
            let written = worker.status.as_ref().and_then(|s| s.desired_replicas);
            // Going blind (NATS unreachable) or seeing again is recorded too, so the status
            // says why the size is held.
            let basis = worker.status.as_ref().and_then(|s| s.scale_basis);
            let blindness_changed = basis != Some(decision.basis);
            if decision.replicas != *current || written.is_none() || blindness_changed {
                if decision.replicas < *current {
                    // Idle pods first, so the ReplicaSet does not stop a busy worker mid-job.
                    crate::worker::idle::mark(&ctx, &worker).await;
                }
                if let Err(err) = record(&ctx, &worker, *current, &decision).await {
                    tracing::warn!(%err, worker = worker.name_any(), "cannot record scaling decision");
                    continue;
                }
                *current = decision.replicas;
            }
        }
        pools.retain(|k, _| seen.contains(k));
    }
}

fn input(
    current: i32,
    backlog: Option<u64>,
    scaling: &ScalingSpec,
    limit_cap: Option<i32>,
) -> Input {
    Input {
        current,
        backlog,
        min: scaling.min_replicas,
        max: limit_cap.map_or(scaling.max_replicas, |cap| scaling.max_replicas.min(cap)),
        target: scaling.target_backlog_per_replica,
    }
}

/// The most pods a queue's `concurrencyLimit` can keep busy with `concurrency` jobs each: more
/// would only wait, and could take the total over the cap when the queue has several priority
/// levels. At least one, so the queue is always worked on.
pub fn limit_cap(concurrency_limit: Option<i32>, concurrency: i32) -> Option<i32> {
    concurrency_limit.map(|limit| (limit / concurrency.max(1)).max(1))
}

/// Pending + in-flight of a queue, `None` if NATS cannot tell right now.
async fn backlog(ctx: &Context, queue: &JobQueue) -> Option<u64> {
    let queue_ref = QueueRef::new(queue.namespace().unwrap_or_default(), queue.name_any());
    let desired = assets::desired(&queue_ref, &queue.spec).ok()?;
    let url = queue.spec.nats.as_ref().map(|n| n.url.as_str());
    let js = ctx.nats.connected(url).await.ok()??;
    match assets::figures(&js, &desired).await {
        Ok(figures) => Some(figures.backlog()),
        Err(err) => {
            tracing::debug!(%err, queue = %queue_ref.stream(), "cannot read backlog");
            None
        }
    }
}

/// Writes the decision into the Worker's status and announces it.
async fn record(
    ctx: &Context,
    worker: &Worker,
    current: i32,
    decision: &Decision,
) -> Result<(), kube::Error> {
    let api: Api<Worker> =
        Api::namespaced(ctx.client.clone(), &worker.namespace().unwrap_or_default());
    // A decision that keeps the size keeps the last scale time (an apply patch that left it out
    // would remove it).
    let previous = worker
        .status
        .as_ref()
        .and_then(|s| s.last_scale_time.clone());
    let scale_time = match previous {
        Some(time) if decision.replicas == current => time,
        _ => {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
        }
    };
    let patch = serde_json::json!({
        "apiVersion": Worker::api_version(&()),
        "kind": Worker::kind(&()),
        "status": {
            "desiredReplicas": decision.replicas,
            "lastScaleTime": scale_time,
            "lastScaleReason": decision.reason,
            "scaleBasis": decision.basis,
        }
    });
    let params = PatchParams::apply(SCALER_MANAGER).force();
    api.patch_status(&worker.name_any(), &params, &Patch::Apply(&patch))
        .await?;
    if decision.replicas == current {
        return Ok(());
    }
    let up = decision.replicas > current;
    ctx.metrics.scaled(up);
    let (reason, verb) = if up {
        (reasons::SCALED_UP, "up")
    } else {
        (reasons::SCALED_DOWN, "down")
    };
    let note = format!(
        "scaled {verb} from {current} to {}: {}",
        decision.replicas, decision.reason
    );
    ctx.event(worker, EventType::Normal, reason, note).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    fn tick(current: i32, backlog: Option<u64>, min: i32, max: i32, target: i32) -> Input {
        Input {
            current,
            backlog,
            min,
            max,
            target,
        }
    }

    #[test]
    fn recommendation_is_the_clamped_ceiling() {
        assert_eq!(recommend(0, 0, 8, 10), 0);
        assert_eq!(recommend(1, 0, 8, 10), 1);
        assert_eq!(recommend(10, 0, 8, 10), 1);
        assert_eq!(recommend(11, 0, 8, 10), 2);
        assert_eq!(recommend(10_000, 0, 8, 10), 8);
        assert_eq!(recommend(0, 2, 8, 10), 2);
    }

    #[test]
    fn a_concurrency_limit_caps_the_pool_at_the_pods_it_keeps_busy() {
        assert_eq!(limit_cap(None, 4), None);
        assert_eq!(limit_cap(Some(20), 4), Some(5));
        assert_eq!(
            limit_cap(Some(22), 4),
            Some(5),
            "a sixth pod would only wait"
        );
        assert_eq!(limit_cap(Some(2), 4), Some(1), "one pod at least");
        let scaling: ScalingSpec =
            serde_yaml::from_str("{minReplicas: 0, maxReplicas: 8, targetBacklogPerReplica: 10}")
                .unwrap();
        let capped = input(0, Some(10_000), &scaling, limit_cap(Some(12), 4));
        let d = decide(capped, WINDOW, &mut History::default(), Instant::now());
        assert_eq!(d.replicas, 3);
        assert!(d.reason.contains("max 3"), "{}", d.reason);
        let uncapped = input(0, Some(10_000), &scaling, None);
        let d = decide(uncapped, WINDOW, &mut History::default(), Instant::now());
        assert_eq!(d.replicas, 8);
    }

    #[test]
    fn min_equal_max_pins_the_size() {
        for backlog in [0, 5, 1_000_000] {
            assert_eq!(recommend(backlog, 3, 3, 10), 3);
        }
    }

    #[test]
    fn max_zero_means_no_pods() {
        assert_eq!(recommend(1_000, 0, 0, 10), 0);
        let d = decide(
            tick(2, Some(1_000), 0, 0, 10),
            WINDOW,
            &mut History::default(),
            Instant::now(),
        );
        assert_eq!(d.replicas, 0);
    }

    #[test]
    fn scales_up_at_once() {
        let mut history = History::default();
        let now = Instant::now();
        let d = decide(tick(0, Some(35), 0, 8, 10), WINDOW, &mut history, now);
        assert_eq!(d.replicas, 4);
        assert!(d.reason.contains("backlog 35"), "{}", d.reason);
    }

    #[test]
    fn scales_down_only_after_the_delay() {
        let mut history = History::default();
        let t0 = Instant::now();
        assert_eq!(
            decide(tick(0, Some(80), 0, 8, 10), WINDOW, &mut history, t0).replicas,
            8
        );
        let early = decide(
            tick(8, Some(0), 0, 8, 10),
            WINDOW,
            &mut history,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(early.replicas, 8);
        assert!(early.reason.contains("scale-down delay"));
        let later = decide(
            tick(8, Some(0), 0, 8, 10),
            WINDOW,
            &mut history,
            t0 + Duration::from_secs(41),
        );
        assert_eq!(later.replicas, 0);
    }

    #[test]
    fn a_burst_within_the_window_prevents_flapping() {
        let mut history = History::default();
        let t0 = Instant::now();
        decide(tick(0, Some(50), 0, 8, 10), WINDOW, &mut history, t0);
        decide(
            tick(5, Some(0), 0, 8, 10),
            WINDOW,
            &mut history,
            t0 + Duration::from_secs(20),
        );
        decide(
            tick(5, Some(30), 0, 8, 10),
            WINDOW,
            &mut history,
            t0 + Duration::from_secs(40),
        );
        // 55 s: the 5 from t0 left the window, the 3 from 40 s did not.
        let d = decide(
            tick(5, Some(0), 0, 8, 10),
            WINDOW,
            &mut history,
            t0 + Duration::from_secs(55),
        );
        assert_eq!(d.replicas, 3);
    }

    #[test]
    fn nats_unreachable_holds_the_current_size() {
        let mut history = History::default();
        let d = decide(
            tick(3, None, 0, 8, 10),
            WINDOW,
            &mut history,
            Instant::now(),
        );
        assert_eq!(d.replicas, 3);
        assert!(d.reason.contains("NATS unreachable"), "{}", d.reason);
    }

    #[test]
    fn lowered_max_applies_at_once() {
        let mut history = History(VecDeque::from([(Instant::now(), 8)]));
        let d = decide(
            tick(8, Some(1_000), 0, 2, 10),
            WINDOW,
            &mut history,
            Instant::now(),
        );
        assert_eq!(d.replicas, 2);
    }
}
