//! The Deployment controller's decisions, as pure functions: which ReplicaSet runs the current pod
//! template, how far to scale the new and the old ones during a rolling update or a recreate, and
//! the Deployment's status. Follows `pkg/controller/deployment` of Kubernetes.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{controller_owner, is_owned_by};

/// Label that ties a ReplicaSet and its pods to one pod template of a Deployment.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Annotation with the rollout revision of a ReplicaSet (and of its Deployment).
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// What the Deployment controller wants written.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// ReplicaSets to create.
    pub create: Vec<ReplicaSet>,
    /// Existing ReplicaSets (by name) to set to a replica count.
    pub scale: Vec<(String, i32)>,
    /// Existing ReplicaSets (by name) whose revision annotation must change (rollback).
    pub revision: Vec<(String, String)>,
    /// Old, empty ReplicaSets beyond the revision history limit, to delete.
    pub delete: Vec<String>,
    /// The Deployment's new status, when it changed.
    pub status: Option<DeploymentStatus>,
}

/// Characters Kubernetes uses for generated name parts (no vowels, no confusable digits).
pub const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The `pod-template-hash` of a pod template: FNV-1a over its JSON, spelled like Kubernetes
/// spells it (decimal digits mapped onto [`SAFE_ALPHABET`]).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let json = serde_json::to_vec(template).unwrap_or_default();
    let mut hash: u32 = 0x811c_9dc5;
    for b in json {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.to_string()
        .bytes()
        .map(|b| char::from(SAFE_ALPHABET[usize::from(b) % SAFE_ALPHABET.len()]))
        .collect()
}

fn without_hash_label(template: &PodTemplateSpec) -> serde_json::Value {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    serde_json::to_value(t).unwrap_or_default()
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status
        .as_ref()
        .map(|s| {
            (
                s.replicas,
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Resolves an absolute-or-percent value against `total`, rounding up or down like Kubernetes.
fn resolve(value: Option<&IntOrString>, default_percent: i32, total: i32, round_up: bool) -> i32 {
    let percent = match value {
        Some(IntOrString::Int(n)) => return (*n).max(0),
        Some(IntOrString::String(s)) => s
            .trim_end_matches('%')
            .parse::<i32>()
            .unwrap_or(default_percent),
        None => default_percent,
    };
    let scaled = i64::from(total) * i64::from(percent);
    let value = if round_up {
        (scaled + 99) / 100
    } else {
        scaled / 100
    };
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// `(maxSurge, maxUnavailable)` of a Deployment; never both zero.
pub fn surge_and_unavailable(d: &Deployment) -> (i32, i32) {
    let spec = d.spec.as_ref();
    let desired = spec.and_then(|s| s.replicas).unwrap_or(1);
    let rolling = spec
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(
        rolling.and_then(|r| r.max_surge.as_ref()),
        25,
        desired,
        true,
    );
    let unavailable = resolve(
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        25,
        desired,
        false,
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate")
}

/// Builds the ReplicaSet that runs the Deployment's current template.
fn new_replica_set(d: &Deployment, hash: &str, replicas: i32, revision: i64) -> ReplicaSet {
    let spec = d.spec.clone().unwrap_or_default();
    let mut template = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(POD_TEMPLATE_HASH.into(), hash.into());
    let labels = meta.labels.clone();
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(POD_TEMPLATE_HASH.into(), hash.into());
    let (surge, _) = surge_and_unavailable(d);
    let desired = spec.replicas.unwrap_or(1);
    let mut annotations = BTreeMap::new();
    annotations.insert(REVISION.to_owned(), revision.to_string());
    annotations.insert(DESIRED_REPLICAS.to_owned(), desired.to_string());
    annotations.insert(MAX_REPLICAS.to_owned(), (desired + surge).to_string());
    let name = d.metadata.name.clone().unwrap_or_default();
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: d.metadata.namespace.clone(),
            labels,
            annotations: Some(annotations),
            owner_references: controller_owner::<Deployment>(&d.metadata).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    }
}

/// Decides what to write for one Deployment, given every ReplicaSet and pod of its namespace.
pub fn plan(d: &Deployment, all_rs: &[&ReplicaSet], pods: &[&Pod], now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    let Some(spec) = d.spec.as_ref() else {
        return plan;
    };
    let desired = spec.replicas.unwrap_or(1);
    let owned: Vec<&ReplicaSet> = all_rs
        .iter()
        .copied()
        .filter(|rs| is_owned_by(&rs.metadata, &d.metadata))
        .collect();
    let hash = template_hash(&spec.template);
    let wanted = without_hash_label(&spec.template);
    let name = d.metadata.name.clone().unwrap_or_default();
    let new_name = format!("{name}-{hash}");
    let new_rs = owned.iter().copied().find(|rs| {
        rs.metadata.name.as_deref() == Some(new_name.as_str())
            || rs
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .map(without_hash_label)
                .as_ref()
                == Some(&wanted)
    });
    let mut old: Vec<&ReplicaSet> = owned
        .iter()
        .copied()
        .filter(|rs| new_rs.is_none_or(|n| n.metadata.uid != rs.metadata.uid))
        .collect();
    old.sort_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let max_old_revision = old.iter().map(|rs| revision_of(rs)).max().unwrap_or(0);

    // Counts after this plan: (name, spec replicas, available).
    let new_current = new_rs.map(spec_replicas).unwrap_or(0);
    let new_available = new_rs.map(|rs| status_of(rs).2).unwrap_or(0);
    let mut new_target = new_current;
    let mut old_targets: Vec<i32> = old.iter().map(|rs| spec_replicas(rs)).collect();
    let paused = spec.paused.unwrap_or(false);

    if paused {
        // A paused Deployment only follows scale changes of its newest ReplicaSet.
        if new_rs.is_some() {
            new_target = desired;
        }
    } else if is_recreate(d) {
        if old_targets.iter().any(|&n| n > 0) {
            old_targets.iter_mut().for_each(|n| *n = 0);
        } else {
            let old_pods_left = pods.iter().any(|p| {
                old.iter().any(|rs| is_owned_by(&p.metadata, &rs.metadata))
                    && !matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
            });
            if !old_pods_left {
                new_target = desired;
            }
        }
    } else {
        let (surge, unavailable) = surge_and_unavailable(d);
        let total: i32 = new_current + old_targets.iter().sum::<i32>();
        if new_current > desired {
            new_target = desired;
        } else if new_current < desired {
            let max_total = desired + surge;
            if total < max_total {
                new_target = new_current + (max_total - total).min(desired - new_current);
            }
        }
        if new_target <= new_current && old_targets.iter().any(|&n| n > 0) {
            scale_down_old(
                &old,
                &mut old_targets,
                desired - unavailable,
                new_current,
                new_available,
            );
        }
    }

    let revision = match new_rs {
        Some(rs) if revision_of(rs) > max_old_revision => revision_of(rs),
        _ => max_old_revision + 1,
    };
    match new_rs {
        None if !paused => plan
            .create
            .push(new_replica_set(d, &hash, new_target, revision)),
        None => {}
        Some(rs) => {
            let rs_name = rs.metadata.name.clone().unwrap_or_default();
            if new_target != new_current {
                plan.scale.push((rs_name.clone(), new_target));
            }
            if revision_of(rs) != revision {
                plan.revision.push((rs_name, revision.to_string()));
            }
        }
    }
    for (rs, target) in old.iter().zip(&old_targets) {
        if *target != spec_replicas(rs) {
            plan.scale
                .push((rs.metadata.name.clone().unwrap_or_default(), *target));
        }
    }

    let complete = new_rs.is_some_and(|rs| {
        let (replicas, _, available) = status_of(rs);
        spec_replicas(rs) == desired && replicas == desired && available == desired
    }) && old
        .iter()
        .all(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0);
    if complete {
        let limit = usize::try_from(spec.revision_history_limit.unwrap_or(10).max(0)).unwrap_or(0);
        let empty: Vec<&&ReplicaSet> = old
            .iter()
            .filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0)
            .collect();
        if empty.len() > limit {
            for rs in &empty[..empty.len() - limit] {
                plan.delete
                    .push(rs.metadata.name.clone().unwrap_or_default());
            }
        }
    }
    let status = status(d, new_rs, &old, complete, new_name, now);
    if d.status.as_ref() != Some(&status) {
        plan.status = Some(status);
    }
    plan
}

/// Scales old ReplicaSets down as far as `min_available` allows: first their unavailable pods,
/// then available ones, oldest ReplicaSet first (`reconcileOldReplicaSets` of Kubernetes).
fn scale_down_old(
    old: &[&ReplicaSet],
    targets: &mut [i32],
    min_available: i32,
    new_spec: i32,
    new_available: i32,
) {
    let all: i32 = new_spec + targets.iter().sum::<i32>();
    let new_unavailable = (new_spec - new_available).max(0);
    let mut budget = all - min_available - new_unavailable;
    for (rs, target) in old.iter().zip(targets.iter_mut()) {
        if budget <= 0 {
            return;
        }
        let unhealthy = (*target - status_of(rs).2).max(0);
        let cut = unhealthy.min(budget);
        *target -= cut;
        budget -= cut;
    }
    let available: i32 = new_available + old.iter().map(|rs| status_of(rs).2).sum::<i32>();
    let mut budget = (available - min_available).min(budget);
    for target in targets.iter_mut() {
        if budget <= 0 {
            return;
        }
        let cut = (*target).min(budget);
        *target -= cut;
        budget -= cut;
    }
}

fn condition(
    previous: Option<&DeploymentCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: Timestamp,
    progressed: bool,
) -> DeploymentCondition {
    let same = previous.is_some_and(|c| c.status == status);
    let same_reason = same
        && previous.is_some_and(|c| {
            c.reason.as_deref() == Some(reason) && c.message.as_deref() == Some(message.as_str())
        });
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: if same {
            previous.and_then(|c| c.last_transition_time.clone())
        } else {
            Some(Time(now))
        },
        last_update_time: if same_reason && !progressed {
            previous.and_then(|c| c.last_update_time.clone())
        } else {
            Some(Time(now))
        },
    }
}

fn status(
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    old: &[&ReplicaSet],
    complete: bool,
    new_name: String,
    now: Timestamp,
) -> DeploymentStatus {
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1);
    let all = new_rs.iter().chain(old.iter());
    let (replicas, ready, available) = all.fold((0, 0, 0), |acc, rs| {
        let (r, re, a) = status_of(rs);
        (acc.0 + r, acc.1 + re, acc.2 + a)
    });
    let updated = new_rs.map(|rs| status_of(rs).0).unwrap_or(0);
    let previous = d.status.clone().unwrap_or_default();
    let prev_cond = |t: &str| {
        previous
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == t))
    };
    let (_, max_unavailable) = surge_and_unavailable(d);
    let rs_name = new_rs
        .and_then(|rs| rs.metadata.name.clone())
        .unwrap_or(new_name);
    let available_cond = if available >= desired - max_unavailable {
        condition(
            prev_cond("Available"),
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            now,
            false,
        )
    } else {
        condition(
            prev_cond("Available"),
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            now,
            false,
        )
    };
    let progressed = previous.replicas != Some(replicas)
        || previous.updated_replicas != Some(updated)
        || previous.ready_replicas != Some(ready)
        || previous.available_replicas != Some(available);
    let prev_progress = prev_cond("Progressing");
    let progressing = if complete {
        condition(
            prev_progress,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
            now,
            false,
        )
    } else if spec.paused.unwrap_or(false) {
        condition(
            prev_progress,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".into(),
            now,
            false,
        )
    } else {
        let deadline = i64::from(spec.progress_deadline_seconds.unwrap_or(600));
        let since = prev_progress
            .filter(|c| c.status == "True" && c.reason.as_deref() != Some("NewReplicaSetAvailable"))
            .and_then(|c| c.last_update_time.as_ref())
            .map(|t| t.0);
        match since {
            Some(since) if !progressed && now.as_second() - since.as_second() > deadline => {
                condition(
                    prev_progress,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                    now,
                    false,
                )
            }
            _ if prev_progress
                .is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
                && !progressed =>
            {
                prev_progress.cloned().unwrap_or_default()
            }
            _ if new_rs.is_none() => condition(
                prev_progress,
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                format!("Created new replica set \"{rs_name}\""),
                now,
                true,
            ),
            _ => condition(
                prev_progress,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{rs_name}\" is progressing."),
                now,
                progressed,
            ),
        }
    };
    DeploymentStatus {
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((desired - available).max(0)),
        observed_generation: d.metadata.generation,
        conditions: Some(vec![available_cond, progressing]),
        collision_count: previous.collision_count,
        terminating_replicas: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        DeploymentSpec, DeploymentStrategy, ReplicaSetStatus, RollingUpdateDeployment,
    };

    fn deployment(replicas: i32, image: &str) -> Deployment {
        let template = PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..ObjectMeta::default()
            }),
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![k8s_openapi::api::core::v1::Container {
                    name: "c".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        };
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("d-uid".into()),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                template,
                ..DeploymentSpec::default()
            }),
            status: None,
        }
    }

    fn existing(d: &Deployment, uid: &str, replicas: i32, available: i32, age: i64) -> ReplicaSet {
        let hash = template_hash(&d.spec.as_ref().unwrap().template);
        let mut rs = new_replica_set(d, &hash, replicas, 1);
        rs.metadata.uid = Some(uid.into());
        rs.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(1_000_000 + age).unwrap()));
        rs.status = Some(ReplicaSetStatus {
            replicas,
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..ReplicaSetStatus::default()
        });
        rs
    }

    #[test]
    fn template_hash_is_stable_and_changes_with_the_template() {
        let a = deployment(3, "a");
        let b = deployment(3, "b");
        let ha = template_hash(&a.spec.as_ref().unwrap().template);
        assert_eq!(ha, template_hash(&a.spec.as_ref().unwrap().template));
        assert_ne!(ha, template_hash(&b.spec.as_ref().unwrap().template));
        assert!(ha.bytes().all(|c| SAFE_ALPHABET.contains(&c)));
    }

    #[test]
    fn first_plan_creates_the_replica_set_at_full_scale() {
        let d = deployment(3, "a");
        let plan = plan(&d, &[], &[], Timestamp::now());
        assert_eq!(plan.create.len(), 1);
        let rs = &plan.create[0];
        assert_eq!(rs.spec.as_ref().unwrap().replicas, Some(3));
        assert!(rs.metadata.name.as_ref().unwrap().starts_with("web-"));
        let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Deployment", Some(true))
        );
        let hash = rs.metadata.labels.as_ref().unwrap()[POD_TEMPLATE_HASH].clone();
        assert_eq!(
            rs.spec
                .as_ref()
                .unwrap()
                .selector
                .match_labels
                .as_ref()
                .unwrap()[POD_TEMPLATE_HASH],
            hash
        );
    }

    #[test]
    fn rolling_update_surges_then_scales_old_down_within_max_unavailable() {
        let old_d = deployment(4, "a");
        let old_rs = existing(&old_d, "old", 4, 4, 0);
        let mut d = deployment(4, "b");
        d.spec.as_mut().unwrap().strategy = Some(DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::Int(1)),
                max_unavailable: Some(IntOrString::Int(1)),
            }),
        });
        d.metadata.generation = Some(2);
        // Step 1: the new ReplicaSet is created with the surge only.
        let p = plan(&d, &[&old_rs], &[], Timestamp::now());
        assert_eq!(p.create[0].spec.as_ref().unwrap().replicas, Some(1));
        assert!(p.scale.is_empty());
        // Step 2: the new one exists with one unavailable pod: the old one may lose 1.
        let mut new_rs = existing(&d, "new", 1, 0, 10);
        let p = plan(&d, &[&old_rs, &new_rs], &[], Timestamp::now());
        assert_eq!(p.scale, vec![(old_rs.metadata.name.clone().unwrap(), 3)]);
        // Step 3: new pod available, old at 3: total 4 < 5, so the new one grows by 1.
        new_rs.status.as_mut().unwrap().available_replicas = Some(1);
        let old_rs = existing(&old_d, "old", 3, 3, 0);
        let p = plan(&d, &[&old_rs, &new_rs], &[], Timestamp::now());
        assert_eq!(p.scale, vec![(new_rs.metadata.name.clone().unwrap(), 2)]);
    }

    #[test]
    fn recreate_scales_old_to_zero_before_the_new_one_grows() {
        let old_d = deployment(2, "a");
        let old_rs = existing(&old_d, "old", 2, 2, 0);
        let mut d = deployment(2, "b");
        d.spec.as_mut().unwrap().strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        let p = plan(&d, &[&old_rs], &[], Timestamp::now());
        assert_eq!(p.create[0].spec.as_ref().unwrap().replicas, Some(0));
        assert_eq!(p.scale, vec![(old_rs.metadata.name.clone().unwrap(), 0)]);
    }

    #[test]
    fn status_reports_availability_and_completion() {
        let d = deployment(2, "a");
        let rs = existing(&d, "rs", 2, 2, 0);
        let p = plan(&d, &[&rs], &[], Timestamp::now());
        let status = p.status.unwrap();
        assert_eq!(
            (
                status.replicas,
                status.available_replicas,
                status.observed_generation
            ),
            (Some(2), Some(2), Some(1))
        );
        let conds = status.conditions.unwrap();
        assert_eq!(conds[0].status, "True");
        assert_eq!(conds[1].reason.as_deref(), Some("NewReplicaSetAvailable"));
    }

    #[test]
    fn percentages_round_like_kubernetes() {
        let mut d = deployment(10, "a");
        d.spec.as_mut().unwrap().strategy = Some(DeploymentStrategy {
            type_: None,
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::String("15%".into())),
                max_unavailable: Some(IntOrString::String("15%".into())),
            }),
        });
        assert_eq!(surge_and_unavailable(&d), (2, 1));
        assert_eq!(surge_and_unavailable(&deployment(1, "a")), (1, 0));
    }
}
