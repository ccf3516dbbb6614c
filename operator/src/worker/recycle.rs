//! Recycling: which pods of a Worker to delete now because they reached `recycle.maxAge`.
//! A pure decision: each pod's limit is `maxAge` plus a jitter of up to 10 % derived from its
//! name (stable across reconciles, different between pods born together); the oldest go first,
//! and only as many ready pods as `maxUnavailable` allows once the pods already missing from
//! the desired ready count are subtracted. The Worker controller replaces a Ready one with a
//! surge (a new pod Ready before the old one goes, see `recycle_old_pods`); the old pod is
//! deleted gracefully, so its runtime drains.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::conditions::Status;
/// Annotation on a pod being recycled: [`WAITING`] while its replacement starts (the
/// Deployment runs one more pod), then [`RELEASED`] (the ReplicaSet's scale-down removes it).
pub const MARK: &str = "conveyor.dev/recycle";
/// [`MARK`]: waiting for a replacement to be Ready.
pub const WAITING: &str = "waiting";
/// [`MARK`]: handed to the ReplicaSet's scale-down.
pub const RELEASED: &str = "released";

/// The recycling mark of a pod, if any.
pub fn marked(pod: &Pod) -> Option<&str> {
    pod.annotations().get(MARK).map(String::as_str)
}

/// Whether the pod's `Ready` condition is `True`.
pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Ready" && Status::parse(&c.status) == Status::True)
        })
}

/// What the decision needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAge {
    /// Pod name (also the jitter's seed).
    pub name: String,
    /// `metadata.creationTimestamp`.
    pub created: Timestamp,
    /// The pod's `Ready` condition is `True`.
    pub ready: bool,
}

impl PodAge {
    /// The facts of a live pod; `None` for a terminating one or one without a creation time.
    pub fn of(pod: &Pod) -> Option<Self> {
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        Some(Self {
            name: pod.name_any(),
            created: pod.metadata.creation_timestamp.as_ref()?.0,
            ready: ready(pod),
        })
    }
}

/// The age at which the pod `name` is recycled: `max_age` plus up to 10 % of it.
pub fn limit(name: &str, max_age: Duration) -> Duration {
    // FNV-1a: stable across processes and releases, unlike the std hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let permille = u32::try_from(hash % 101).unwrap_or(0);
    max_age + max_age / 1000 * permille
}

/// The pods to delete now, oldest first. `desired` is the pool's size; `terminating` counts
/// pods already being deleted (they count as unavailable).
pub fn due(
    pods: &[PodAge],
    max_age: Duration,
    max_unavailable: i32,
    desired: i32,
    terminating: usize,
    now: Timestamp,
) -> Vec<String> {
    let ready = pods.iter().filter(|p| p.ready).count();
    let missing = usize::try_from(desired)
        .unwrap_or(0)
        .saturating_sub(ready)
        .max(terminating);
    let mut budget = usize::try_from(max_unavailable.max(1))
        .unwrap_or(1)
        .saturating_sub(missing);
    let mut expired: Vec<&PodAge> = pods
        .iter()
        .filter(|p| {
            let age = now.duration_since(p.created);
            age.is_positive() && age.unsigned_abs() >= limit(&p.name, max_age)
        })
        .collect();
    expired.sort_by_key(|p| (p.created, p.name.clone()));
    let mut chosen = Vec::new();
    for pod in expired {
        // A pod that is not ready gives no capacity: replacing it costs nothing.
        if !pod.ready {
            chosen.push(pod.name.clone());
        } else if budget > 0 {
            budget -= 1;
            chosen.push(pod.name.clone());
        }
    }
    chosen
}

/// What recycling asks of one reconcile, decided from the pods alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No pod is due.
    Nothing,
    /// Marked pods wait for their replacements: run this many pods beyond the pool's size.
    Wait {
        /// Pods beyond the pool's size.
        surge: i32,
    },
    /// The replacements are Ready: release these marked pods to the ReplicaSet's scale-down.
    Release(Vec<String>),
    /// These pods reached `maxAge`: mark them, each with one more pod to replace it.
    Mark(Vec<String>),
}

/// The recycling step for `pods` (all of the Worker's, terminating ones included) of a pool
/// of `desired` pods: while marked pods wait, hold the surge until as many unmarked pods are
/// Ready as the pool wants, then release them; otherwise mark the pods [`due`] now.
pub fn plan(
    pods: &[Pod],
    max_age: Duration,
    max_unavailable: i32,
    desired: i32,
    now: Timestamp,
) -> Plan {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let waiting: Vec<String> = live
        .iter()
        .filter(|p| marked(p) == Some(WAITING))
        .map(|p| p.name_any())
        .collect();
    if !waiting.is_empty() {
        let fresh_ready = live
            .iter()
            .filter(|p| marked(p).is_none() && ready(p))
            .count();
        if fresh_ready < usize::try_from(desired).unwrap_or(0) {
            return Plan::Wait {
                surge: i32::try_from(waiting.len()).unwrap_or(i32::MAX),
            };
        }
        return Plan::Release(waiting);
    }
    let ages: Vec<_> = live
        .iter()
        .filter(|p| marked(p).is_none())
        .filter_map(|p| PodAge::of(p))
        .collect();
    let terminating = pods.len() - live.len();
    match due(&ages, max_age, max_unavailable, desired, terminating, now) {
        chosen if chosen.is_empty() => Plan::Nothing,
        chosen => Plan::Mark(chosen),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn pod(name: &str, created: i64, ready: bool) -> PodAge {
        PodAge {
            name: name.into(),
            created: at(created),
            ready,
        }
    }

    #[test]
    fn jitter_is_stable_bounded_and_spreads_pods() {
        let a = limit("w-abcde", HOUR);
        assert_eq!(a, limit("w-abcde", HOUR));
        assert!(a >= HOUR && a <= HOUR + HOUR / 10, "{a:?}");
        let limits: std::collections::BTreeSet<_> =
            (0..20).map(|i| limit(&format!("w-{i}"), HOUR)).collect();
        assert!(limits.len() > 10, "{limits:?}");
    }

    #[test]
    fn young_pods_stay() {
        let pods = [pod("a", 0, true), pod("b", 0, true)];
        assert!(due(&pods, HOUR, 1, 2, 0, at(3000)).is_empty());
    }

    #[test]
    fn old_pods_go_oldest_first_within_max_unavailable() {
        let pods = [pod("b", 100, true), pod("a", 0, true), pod("c", 200, true)];
        let now = at(10_000);
        assert_eq!(due(&pods, HOUR, 1, 3, 0, now), vec!["a"]);
        assert_eq!(due(&pods, HOUR, 2, 3, 0, now), vec!["a", "b"]);
        assert_eq!(due(&pods, HOUR, 5, 3, 0, now), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_pod_already_missing_or_terminating_uses_the_budget() {
        let pods = [pod("a", 0, true), pod("b", 0, true)];
        let now = at(10_000);
        // Three wanted, two ready: one is already unavailable.
        assert!(due(&pods, HOUR, 1, 3, 0, now).is_empty());
        // One being replaced right now.
        assert!(due(&pods, HOUR, 1, 2, 1, now).is_empty());
        assert_eq!(due(&pods, HOUR, 2, 2, 1, now), vec!["a"]);
    }

    #[test]
    fn old_pods_that_are_not_ready_go_regardless() {
        let pods = [pod("a", 0, false), pod("b", 0, true)];
        assert_eq!(due(&pods, HOUR, 1, 2, 0, at(10_000)), vec!["a"]);
    }

    fn listed(name: &str, created: i64, ready: bool, mark: Option<&str>) -> Pod {
        use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(at(created))),
                annotations: mark.map(|m| [(MARK.to_owned(), m.to_owned())].into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_plan_marks_waits_for_replacements_then_releases() {
        let now = at(10_000);
        let young = |name| listed(name, 9_000, true, None);
        assert_eq!(
            plan(&[young("a"), young("b")], HOUR, 1, 2, now),
            Plan::Nothing
        );
        let old = listed("a", 0, true, None);
        assert_eq!(
            plan(&[old, young("b")], HOUR, 1, 2, now),
            Plan::Mark(vec!["a".into()])
        );
        let waiting = listed("a", 0, true, Some(WAITING));
        let starting = listed("c", 9_990, false, None);
        assert_eq!(
            plan(&[waiting.clone(), young("b"), starting], HOUR, 1, 2, now),
            Plan::Wait { surge: 1 },
            "the replacement is not Ready yet"
        );
        assert_eq!(
            plan(&[waiting, young("b"), young("c")], HOUR, 1, 2, now),
            Plan::Release(vec!["a".into()])
        );
        let released = listed("a", 0, true, Some(RELEASED));
        assert_eq!(
            plan(&[released, young("b"), young("c")], HOUR, 1, 2, now),
            Plan::Nothing,
            "a released pod is the ReplicaSet's to remove"
        );
    }

    #[test]
    fn a_pool_scaled_to_zero_or_empty_has_nothing_to_do() {
        assert!(due(&[], HOUR, 1, 0, 0, at(10_000)).is_empty());
        // Clock skew: a pod from the future is not old.
        assert!(due(&[pod("a", 20_000, true)], HOUR, 1, 1, 0, at(10_000)).is_empty());
    }
}
