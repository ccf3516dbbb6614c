//! The ReplicaSet controller's decisions, as pure functions: how many pods to create, which pods
//! to delete on scale-down (ranked like Kubernetes' `ActivePodsWithRanks`), and the ReplicaSet's
//! status. Follows `pkg/controller/replicaset` of Kubernetes.

use std::cmp::Ordering;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{controller_owner, is_owned_by};

/// Annotation whose (integer) value makes a pod cheaper (lower) or dearer to delete on scale-down.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// What the ReplicaSet controller wants written.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Number of pods to create from the template.
    pub create: usize,
    /// Names of pods to delete.
    pub delete: Vec<String>,
    /// The ReplicaSet's new status, when it changed.
    pub status: Option<ReplicaSetStatus>,
}

/// A pod counts towards the replicas until it terminates or is being deleted.
pub fn is_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Since when the pod is Ready, if it is.
fn ready_since(p: &Pod) -> Option<Timestamp> {
    let cond = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (cond.status == "True").then(|| {
        cond.last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH)
    })
}

fn is_available(p: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    ready_since(p)
        .is_some_and(|since| since.as_second() + i64::from(min_ready_seconds) <= now.as_second())
}

fn deletion_cost(p: &Pod) -> i64 {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_DELETION_COST))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn phase_rank(p: &Pod) -> u8 {
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    }
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).max().unwrap_or(0))
        .unwrap_or(0)
}

/// Orders pods so that the ones to delete first come first: unscheduled, pending, not ready,
/// lower deletion cost, ready for a shorter time, more restarts, newer.
pub fn deletion_order(a: &Pod, b: &Pod) -> Ordering {
    let scheduled = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    scheduled(a)
        .cmp(&scheduled(b))
        .then_with(|| phase_rank(a).cmp(&phase_rank(b)))
        .then_with(|| ready_since(a).is_some().cmp(&ready_since(b).is_some()))
        .then_with(|| deletion_cost(a).cmp(&deletion_cost(b)))
        .then_with(|| ready_since(b).cmp(&ready_since(a)))
        .then_with(|| restarts(b).cmp(&restarts(a)))
        .then_with(|| {
            let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            created(b).cmp(&created(a))
        })
}

/// Decides what to write for one ReplicaSet, given the pods of its namespace.
pub fn plan(rs: &ReplicaSet, pods: &[&Pod], now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    let spec = rs.spec.clone().unwrap_or_default();
    let desired = usize::try_from(spec.replicas.unwrap_or(1).max(0)).unwrap_or(0);
    let mut active: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| is_owned_by(&p.metadata, &rs.metadata) && is_active(p))
        .collect();
    if active.len() < desired {
        plan.create = desired - active.len();
    } else if active.len() > desired {
        active.sort_by(|a, b| deletion_order(a, b));
        plan.delete = active[..active.len() - desired]
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
    }
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully_labeled = active
        .iter()
        .filter(|p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            template_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .count();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let status = ReplicaSetStatus {
        replicas: count(active.len()),
        fully_labeled_replicas: Some(count(fully_labeled)),
        ready_replicas: Some(count(
            active.iter().filter(|p| ready_since(p).is_some()).count(),
        )),
        available_replicas: Some(count(
            active
                .iter()
                .filter(|p| is_available(p, min_ready, now))
                .count(),
        )),
        observed_generation: rs.metadata.generation,
        conditions: rs.status.as_ref().and_then(|s| s.conditions.clone()),
        terminating_replicas: None,
    };
    if rs.status.as_ref() != Some(&status) {
        plan.status = Some(status);
    }
    plan
}

/// A new pod of the ReplicaSet named `<rs>-<suffix>`, owned by it.
pub fn new_pod(rs: &ReplicaSet, suffix: &str) -> Pod {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{suffix}")),
            generate_name: Some(format!("{name}-")),
            namespace: rs.metadata.namespace.clone(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: controller_owner::<ReplicaSet>(&rs.metadata).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::ReplicaSetSpec;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn rs(replicas: i32) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("default".into()),
                uid: Some("rs-uid".into()),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                ..ReplicaSetSpec::default()
            }),
            status: None,
        }
    }

    fn pod(name: &str, ready: bool, cost: Option<i64>, created: i64) -> Pod {
        let mut p = new_pod(&rs(1), name);
        p.metadata.name = Some(name.into());
        p.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(1_000_000 + created).unwrap()));
        if let Some(cost) = cost {
            p.metadata.annotations =
                Some([(POD_DELETION_COST.to_owned(), cost.to_string())].into());
        }
        p.spec = Some(PodSpec {
            node_name: Some("devcluster".into()),
            ..PodSpec::default()
        });
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                last_transition_time: Some(Time(Timestamp::from_second(1_000_000).unwrap())),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        p
    }

    #[test]
    fn creates_missing_pods_and_replaces_failed_ones() {
        let mut failed = pod("failed", false, None, 0);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let ok = pod("ok", true, None, 0);
        let p = plan(&rs(3), &[&failed, &ok], Timestamp::now());
        assert_eq!(p.create, 2);
        assert_eq!(p.status.unwrap().replicas, 1);
    }

    #[test]
    fn scale_down_removes_not_ready_then_cheapest_then_newest() {
        let a = pod("a", true, Some(10), 0);
        let b = pod("b", true, Some(-5), 0);
        let c = pod("c", false, Some(100), 0);
        let d = pod("d", true, None, 5);
        let e = pod("e", true, None, 1);
        let p = plan(&rs(1), &[&a, &b, &c, &d, &e], Timestamp::now());
        assert_eq!(p.delete, vec!["c", "b", "d", "e"]);
    }

    #[test]
    fn new_pods_are_owned_and_labelled() {
        let p = new_pod(&rs(1), "xyz12");
        assert_eq!(p.metadata.name.as_deref(), Some("web-abc-xyz12"));
        let owner = &p.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ReplicaSet", "rs-uid", Some(true))
        );
    }
}
