//! The last hour of every queue's figures, for the dashboard's small charts: sampled from the
//! JobQueue status the controllers already keep (no NATS request) every [`SAMPLE_EVERY`] into a
//! ring of [`POINTS`] per queue, so memory is bounded by queues × points and a queue's ring goes
//! when the queue does.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use conveyor_crds::JobQueue;
use kube::ResourceExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::DashboardState;
use super::api::{Failure, find_queue, not_running};

/// How often the figures are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Points kept per queue: one hour at [`SAMPLE_EVERY`].
pub const POINTS: usize = 240;

/// One sample of a queue's figures.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Seconds since the Unix epoch.
    t: u64,
    pending: u64,
    in_flight: u64,
    delayed: u64,
    dead_lettered: u64,
    submitted_per_second: f64,
    finished_per_second: f64,
}

impl Point {
    fn of(t: u64, queue: &JobQueue) -> Self {
        let Some(status) = queue.status.as_ref() else {
            return Self {
                t,
                ..Self::default()
            };
        };
        let rate = |r: &Option<String>| r.as_deref().and_then(|r| r.parse().ok()).unwrap_or(0.0);
        Self {
            t,
            pending: status.pending.unwrap_or(0),
            in_flight: status.in_flight.unwrap_or(0),
            delayed: status.delayed.unwrap_or(0),
            dead_lettered: status.dead_lettered.unwrap_or(0),
            submitted_per_second: rate(&status.submitted_per_second),
            finished_per_second: rate(&status.finished_per_second),
        }
    }
}

/// The rings of every queue, keyed by `<namespace>/<name>`.
#[derive(Debug, Clone, Default)]
pub struct History(Arc<Mutex<HashMap<String, VecDeque<Point>>>>);

impl History {
    /// Adds one point per queue at time `t` (seconds) and forgets the queues not listed.
    pub fn record(&self, t: u64, queues: &[Arc<JobQueue>]) {
        let mut rings = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashMap::with_capacity(queues.len());
        for queue in queues {
            let key = key(&queue.namespace().unwrap_or_default(), &queue.name_any());
            let mut ring = rings.remove(&key).unwrap_or_default();
            if ring.len() == POINTS {
                ring.pop_front();
            }
            ring.push_back(Point::of(t, queue));
            seen.insert(key, ring);
        }
        *rings = seen;
    }

    /// The points of one queue, oldest first.
    pub fn points(&self, namespace: &str, name: &str) -> Vec<Point> {
        let rings = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        rings
            .get(&key(namespace, name))
            .map(|ring| ring.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Samples the controllers' JobQueue store every [`SAMPLE_EVERY`] until `stop` (every
    /// second until the controllers run).
    pub async fn sample(self, state: DashboardState, stop: CancellationToken) {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match state.stores() {
                Some(stores) => {
                    self.record(unix_now(), &stores.queues.state());
                    SAMPLE_EVERY
                }
                None => Duration::from_secs(1),
            };
        }
    }
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// A queue's last hour.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryView {
    interval_seconds: u64,
    points: Vec<Point>,
}

/// The queue's sampled points, then one for its figures now (so a chart always ends at the
/// present, and a queue created a moment ago already has a point).
pub async fn history(
    State(history): State<History>,
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<HistoryView>, Failure> {
    let stores = state.stores().ok_or_else(not_running)?;
    let queue = find_queue(&stores, &namespace, &name)?;
    let mut points = history.points(&namespace, &name);
    points.push(Point::of(unix_now(), &queue));
    Ok(Json(HistoryView {
        interval_seconds: SAMPLE_EVERY.as_secs(),
        points,
    }))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_crds::JobQueueStatus;

    fn queue(name: &str, pending: u64, rate: &str) -> Arc<JobQueue> {
        let mut queue = JobQueue::new(name, serde_json::from_str("{}").unwrap());
        queue.metadata.namespace = Some("team".into());
        queue.status = Some(JobQueueStatus {
            pending: Some(pending),
            submitted_per_second: Some(rate.into()),
            ..Default::default()
        });
        Arc::new(queue)
    }

    #[test]
    fn rings_are_bounded_and_follow_the_queues() {
        let history = History::default();
        for t in 0..(POINTS as u64 + 10) {
            history.record(t, &[queue("a", t, "1.5"), queue("b", 1, "x")]);
        }
        let a = history.points("team", "a");
        assert_eq!(a.len(), POINTS, "one hour kept");
        assert_eq!(a[0].t, 10, "the oldest went first");
        assert_eq!(a[POINTS - 1].pending, POINTS as u64 + 9);
        assert!((a[0].submitted_per_second - 1.5).abs() < f64::EPSILON);
        assert_eq!(history.points("team", "b")[0].submitted_per_second, 0.0);
        history.record(1_000, &[queue("b", 2, "0")]);
        assert!(
            history.points("team", "a").is_empty(),
            "a deleted queue is forgotten"
        );
        assert_eq!(history.points("team", "b").len(), POINTS);
        assert!(history.points("other", "b").is_empty());
    }
}
