//! The status of a `Worker` as a pure function of its previous status, its Deployment and its
//! queue's figures.

use conveyor_crds::{JobQueueStatus, ScaleBasis, WorkerStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;

use super::deployment::selector_string;
use super::reasons as reason;
use crate::conditions::{self, Status};

/// What the Worker's `JobQueue` reports in its status (the operator's own reading of the
/// queue's consumers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueFigures {
    /// The queue's name.
    pub name: String,
    /// Jobs waiting for a worker, when known.
    pub pending: Option<u64>,
    /// Jobs delivered and not yet finished, when known.
    pub in_flight: Option<u64>,
    /// Jobs one pod runs at once: `concurrency`, at most the queue's `concurrencyLimit`.
    pub per_pod: i32,
}

impl QueueFigures {
    /// The figures of queue `name` with `status`, for pods running `concurrency` jobs each
    /// under the queue's `concurrency_limit`.
    pub fn of(
        name: &str,
        status: Option<&JobQueueStatus>,
        concurrency: i32,
        concurrency_limit: Option<i32>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            pending: status.and_then(|s| s.pending),
            in_flight: status.and_then(|s| s.in_flight),
            per_pod: concurrency_limit.map_or(concurrency, |limit| concurrency.min(limit)),
        }
    }
}

/// Something that keeps the Worker from running, with a CamelCase reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    reason: &'static str,
    message: String,
}

impl Problem {
    /// The Worker's queue does not exist.
    pub fn queue_not_found(message: String) -> Self {
        Self {
            reason: reason::QUEUE_NOT_FOUND,
            message,
        }
    }

    /// The Worker's spec cannot be rendered.
    pub fn invalid(message: String) -> Self {
        Self {
            reason: reason::INVALID_SPEC,
            message,
        }
    }
}

/// The new status: the previous one with the Deployment's figures, the selector, the desired
/// size (only for pools without `scaling`; the scaler writes it otherwise), the busy and total
/// job slots, and `Available`, which is `False` ([`reason::NO_READY_PODS`]) while jobs wait and no pod
/// is ready, so a pool at 0 pods with a backlog never reads as healthy.
#[allow(clippy::too_many_arguments)]
pub fn compute_status(
    old: &WorkerStatus,
    generation: Option<i64>,
    name: &str,
    deployment: Option<&Deployment>,
    desired: i32,
    surge: i32,
    scaled: bool,
    problem: Option<&Problem>,
    queue: &QueueFigures,
    now: Timestamp,
) -> WorkerStatus {
    let mut status = old.clone();
    status.observed_generation = generation;
    status.selector = Some(selector_string(name));
    if let Some(d) = deployment {
        let observed = d.status.clone().unwrap_or_default();
        status.replicas = observed.replicas.unwrap_or(0);
        status.ready_replicas = observed.ready_replicas.unwrap_or(0);
    }
    if !scaled {
        status.desired_replicas = Some(desired);
    }
    let ready = status.ready_replicas;
    status.busy = queue.in_flight;
    status.slots = Some(i64::from(ready.max(0)) * i64::from(queue.per_pod.max(0)));
    let waiting = queue.pending.unwrap_or(0);
    let want = status.desired_replicas.unwrap_or(desired);
    let (state, why, message) = match problem {
        Some(p) => (Status::False, p.reason, p.message.clone()),
        None if ready < 1 && waiting > 0 => (
            Status::False,
            reason::NO_READY_PODS,
            no_ready_pods(waiting, &queue.name, status.replicas, want),
        ),
        None if desired == 0 => (
            Status::True,
            reason::MINIMUM_REPLICAS_AVAILABLE,
            "scaled to zero: no pods needed".to_owned(),
        ),
        None if ready >= 1 => (
            Status::True,
            reason::MINIMUM_REPLICAS_AVAILABLE,
            format!("{ready} of {desired} pods ready"),
        ),
        None => (
            Status::False,
            reason::MINIMUM_REPLICAS_UNAVAILABLE,
            format!("{ready} of {desired} pods ready"),
        ),
    };
    conditions::set(
        &mut status.conditions,
        conditions::AVAILABLE,
        state,
        why,
        message,
        generation,
        now,
    );
    let (state, why, message) = scaling(&status, desired, surge);
    conditions::set(
        &mut status.conditions,
        conditions::SCALING,
        state,
        why,
        message,
        generation,
        now,
    );
    status
}

/// "no pod is ready while 20 jobs wait in JobQueue q: …", saying why there is no pod.
fn no_ready_pods(waiting: u64, queue: &str, pods: i32, want: i32) -> String {
    let why = if want == 0 {
        "the pool is asked for 0 pods (spec.replicas 0, scaling.maxReplicas 0, or the scaler has not grown it yet)".to_owned()
    } else if pods == 0 {
        format!("0 of {want} pods started")
    } else {
        format!("{pods} of {want} pods started, none ready yet")
    };
    format!("no pod is ready while {waiting} jobs wait in JobQueue {queue}: {why}")
}

/// The `Scaling` condition: the Deployment's pods against the size asked for, with the
/// scaler's last reason.
fn scaling(status: &WorkerStatus, desired: i32, surge: i32) -> (Status, &'static str, String) {
    let want = status.desired_replicas.unwrap_or(desired);
    // Pods run beyond the size while old ones are recycled are not a scale-down.
    let have = status
        .replicas
        .saturating_sub(surge.max(0))
        .max(want.min(status.replicas));
    let why = status
        .last_scale_reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    if have < want {
        (
            Status::True,
            reason::SCALING_UP,
            format!("{have} of {want} pods running{why}"),
        )
    } else if have > want {
        (
            Status::True,
            reason::SCALING_DOWN,
            format!("{have} pods running, {want} asked for{why}"),
        )
    } else if status.scale_basis == Some(ScaleBasis::Held) {
        (
            Status::False,
            reason::BACKLOG_UNKNOWN,
            format!("{have} pods{why}"),
        )
    } else {
        (
            Status::False,
            reason::AT_DESIRED_SIZE,
            format!("{have} pods{why}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn deployment(replicas: i32, ready: i32) -> Deployment {
        Deployment {
            status: Some(DeploymentStatus {
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn available(s: &WorkerStatus) -> (String, String) {
        let c = conditions::find(&s.conditions, conditions::AVAILABLE).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn mirrors_the_deployment() {
        let s = compute_status(
            &WorkerStatus::default(),
            Some(2),
            "hello",
            Some(&deployment(3, 2)),
            3,
            0,
            false,
            None,
            &QueueFigures::default(),
            at(1),
        );
        assert_eq!(
            (s.replicas, s.ready_replicas, s.desired_replicas),
            (3, 2, Some(3))
        );
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/name=conveyor-worker,conveyor.dev/worker=hello")
        );
        assert_eq!(
            available(&s),
            ("True".into(), reason::MINIMUM_REPLICAS_AVAILABLE.into())
        );
    }

    #[test]
    fn no_ready_pod_is_unavailable_unless_scaled_to_zero() {
        let s = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            Some(&deployment(1, 0)),
            1,
            0,
            false,
            None,
            &QueueFigures::default(),
            at(1),
        );
        assert_eq!(available(&s).0, "False");
        let zero = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            Some(&deployment(0, 0)),
            0,
            0,
            false,
            None,
            &QueueFigures::default(),
            at(1),
        );
        assert_eq!(available(&zero).0, "True");
    }

    #[test]
    fn scaled_pools_keep_the_scalers_figure() {
        let old = WorkerStatus {
            desired_replicas: Some(7),
            ..Default::default()
        };
        let s = compute_status(
            &old,
            None,
            "w",
            Some(&deployment(7, 7)),
            2,
            0,
            true,
            None,
            &QueueFigures::default(),
            at(1),
        );
        assert_eq!(s.desired_replicas, Some(7));
    }

    fn scaling_condition(s: &WorkerStatus) -> (String, String, String) {
        let c = conditions::find(&s.conditions, conditions::SCALING).unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn a_surge_pod_of_recycling_is_no_scale_down() {
        let status = |pods: i32, surge: i32| {
            scaling_condition(&compute_status(
                &WorkerStatus::default(),
                None,
                "w",
                Some(&deployment(pods, pods)),
                2,
                surge,
                false,
                None,
                &QueueFigures::default(),
                at(1),
            ))
        };
        // Two pods asked for, a third one started to replace an old pod.
        assert_eq!(status(3, 1).1, reason::AT_DESIRED_SIZE);
        assert_eq!(
            status(2, 1).1,
            reason::AT_DESIRED_SIZE,
            "before the surge pod exists"
        );
        assert_eq!(status(3, 0).1, reason::SCALING_DOWN);
        assert_eq!(status(1, 1).1, reason::SCALING_UP);
    }

    #[test]
    fn scaling_compares_the_pods_with_the_size_asked_for() {
        let scaled = |replicas: i32, desired: i32, why: &str, basis: ScaleBasis| {
            let old = WorkerStatus {
                desired_replicas: Some(desired),
                last_scale_reason: Some(why.into()),
                scale_basis: Some(basis),
                ..Default::default()
            };
            let d = deployment(replicas, replicas);
            scaling_condition(&compute_status(
                &old,
                None,
                "w",
                Some(&d),
                0,
                0,
                true,
                None,
                &QueueFigures::default(),
                at(1),
            ))
        };
        let (status, why, message) = scaled(
            1,
            4,
            "backlog 40, target 10 per replica",
            ScaleBasis::Backlog,
        );
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("True", reason::SCALING_UP)
        );
        assert_eq!(
            message,
            "1 of 4 pods running: backlog 40, target 10 per replica"
        );
        let (status, why, _) = scaled(4, 0, "backlog 0", ScaleBasis::Backlog);
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("True", reason::SCALING_DOWN)
        );
        let (status, why, message) = scaled(2, 2, "backlog 20", ScaleBasis::Backlog);
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("False", reason::AT_DESIRED_SIZE)
        );
        assert_eq!(message, "2 pods: backlog 20");
        let (status, why, _) = scaled(
            3,
            3,
            "NATS unreachable: holding 3 replicas",
            ScaleBasis::Held,
        );
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("False", reason::BACKLOG_UNKNOWN)
        );
    }

    #[test]
    fn fixed_pools_scale_to_their_replicas() {
        let s = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            Some(&deployment(1, 1)),
            3,
            0,
            false,
            None,
            &QueueFigures::default(),
            at(1),
        );
        let (status, why, message) = scaling_condition(&s);
        assert_eq!(
            (status.as_str(), why.as_str(), message.as_str()),
            ("True", reason::SCALING_UP, "1 of 3 pods running")
        );
    }

    fn queue(pending: u64, in_flight: u64) -> QueueFigures {
        QueueFigures {
            name: "thumbs".into(),
            pending: Some(pending),
            in_flight: Some(in_flight),
            per_pod: 4,
        }
    }

    #[test]
    fn jobs_waiting_with_no_ready_pod_are_never_available() {
        for (replicas, desired) in [(0, 0), (0, 2), (2, 2)] {
            let s = compute_status(
                &WorkerStatus::default(),
                None,
                "w",
                Some(&deployment(replicas, 0)),
                desired,
                0,
                false,
                None,
                &queue(20, 0),
                at(1),
            );
            assert_eq!(
                available(&s),
                ("False".into(), reason::NO_READY_PODS.into()),
                "{replicas} pods of {desired}"
            );
            let c = conditions::find(&s.conditions, conditions::AVAILABLE).unwrap();
            assert!(
                c.message
                    .starts_with("no pod is ready while 20 jobs wait in JobQueue thumbs: "),
                "{}",
                c.message
            );
        }
        let idle = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            Some(&deployment(0, 0)),
            0,
            0,
            false,
            None,
            &queue(0, 0),
            at(1),
        );
        assert_eq!(
            available(&idle),
            ("True".into(), reason::MINIMUM_REPLICAS_AVAILABLE.into()),
            "scaled to zero with nothing to do"
        );
        let running = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            Some(&deployment(1, 1)),
            1,
            0,
            false,
            None,
            &queue(20, 4),
            at(1),
        );
        assert_eq!(available(&running).0, "True");
    }

    #[test]
    fn busy_and_total_slots_come_from_the_queue_and_the_ready_pods() {
        let s = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            Some(&deployment(3, 2)),
            3,
            0,
            false,
            None,
            &queue(9, 7),
            at(1),
        );
        assert_eq!((s.busy, s.slots), (Some(7), Some(8)));
        let capped = QueueFigures::of("q", None, 8, Some(3));
        assert_eq!((capped.per_pod, capped.in_flight), (3, None));
    }

    #[test]
    fn missing_queue_says_so() {
        let problem = Problem::queue_not_found("JobQueue q does not exist in namespace n".into());
        let s = compute_status(
            &WorkerStatus::default(),
            None,
            "w",
            None,
            1,
            0,
            false,
            Some(&problem),
            &QueueFigures::default(),
            at(1),
        );
        assert_eq!(
            available(&s),
            ("False".into(), reason::QUEUE_NOT_FOUND.into())
        );
    }

    #[test]
    fn unchanged_inputs_give_an_equal_status() {
        let first = compute_status(
            &WorkerStatus::default(),
            Some(1),
            "w",
            Some(&deployment(2, 2)),
            2,
            0,
            false,
            None,
            &QueueFigures::default(),
            at(1),
        );
        let second = compute_status(
            &first,
            Some(1),
            "w",
            Some(&deployment(2, 2)),
            2,
            0,
            false,
            None,
            &QueueFigures::default(),
            at(9),
        );
        assert_eq!(first, second);
    }
}
