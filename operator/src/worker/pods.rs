//! The health of a Worker's pods as its `Degraded` condition: which pods were OOM-killed,
//! crash-loop, cannot pull their image, cannot start or cannot be scheduled. A pure function of
//! the pods and the time, so the same pods give the same condition and no status write.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::reasons as reason;
use crate::conditions::Status;
use crate::events::{NOTE_LIMIT, bound, names};

/// Condition type of a `Worker`: some of its pods crash, were OOM-killed or cannot start.
pub const DEGRADED: &str = "Degraded";

/// How long an OOM kill keeps a pod listed after its container restarted: long enough to be
/// seen, short enough that a pod that recovered stops being reported.
pub const RECENT: SignedDuration = SignedDuration::from_mins(10);

/// Pods named in the message; the rest are counted.
const LISTED: usize = 5;

/// What is wrong with one pod, most severe first (the order decides the condition's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trouble {
    /// A container was killed for exceeding its memory limit.
    OomKilled,
    /// A container keeps exiting and waits to be restarted.
    CrashLoopBackOff,
    /// The image cannot be pulled.
    ImagePullBackOff,
    /// The container cannot be configured (a missing Secret or ConfigMap).
    CreateContainerConfigError,
    /// No node can take the pod.
    Unschedulable,
}

impl Trouble {
    /// Every trouble, most severe first.
    pub const ALL: [Trouble; 5] = [
        Self::OomKilled,
        Self::CrashLoopBackOff,
        Self::ImagePullBackOff,
        Self::CreateContainerConfigError,
        Self::Unschedulable,
    ];

    /// The CamelCase reason of the condition and of the `WorkerCrashed` Event.
    pub fn reason(self) -> &'static str {
        match self {
            Self::OomKilled => reason::OOM_KILLED,
            Self::CrashLoopBackOff => reason::CRASH_LOOP_BACK_OFF,
            Self::ImagePullBackOff => reason::IMAGE_PULL_BACK_OFF,
            Self::CreateContainerConfigError => reason::CREATE_CONTAINER_CONFIG_ERROR,
            Self::Unschedulable => reason::UNSCHEDULABLE,
        }
    }

    /// Whether the pod's process died, so a job it was running is retried by redelivery.
    fn lost_jobs(self) -> bool {
        matches!(self, Self::OomKilled | Self::CrashLoopBackOff)
    }
}

/// The `Degraded` condition computed from the pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `True` when at least one pod is in trouble.
    pub status: Status,
    /// CamelCase reason: the most severe trouble, or `PodsHealthy`.
    pub reason: &'static str,
    /// Names the pods and what is wrong with each. Stable while the troubles are (no restart
    /// counts), so it only changes, and is only announced, when something new happens.
    pub message: String,
    /// The `WorkerCrashed` Event's note: the same troubles summarised to fit an Event note
    /// (1 KiB) however many pods and however long their names are.
    pub note: String,
}

/// The trouble of one pod, if any. Terminating pods are not judged.
pub fn trouble(pod: &Pod, now: Timestamp) -> Option<(Trouble, String)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    let mut worst: Option<(Trouble, String)> = None;
    for container in containers {
        if let Some(found) = container_trouble(container, now)
            && worst.as_ref().is_none_or(|(w, _)| found.0 < *w)
        {
            worst = Some(found);
        }
    }
    if worst.is_none()
        && let Some(condition) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && Status::parse(&c.status) == Status::False)
        && condition.reason.as_deref() == Some("Unschedulable")
    {
        let detail = condition.message.clone().unwrap_or_default();
        worst = Some((Trouble::Unschedulable, detail));
    }
    worst
}

fn container_trouble(container: &ContainerStatus, now: Timestamp) -> Option<(Trouble, String)> {
    let name = &container.name;
    let terminations = [container.state.as_ref(), container.last_state.as_ref()];
    for terminated in terminations
        .into_iter()
        .flatten()
        .flat_map(|s| &s.terminated)
    {
        let recent = terminated
            .finished_at
            .as_ref()
            .is_none_or(|at| now.duration_since(at.0) <= RECENT);
        if terminated.reason.as_deref() == Some("OOMKilled") && recent {
            return Some((
                Trouble::OomKilled,
                format!(
                    "container {name} exceeded its memory limit{}",
                    running_jobs(terminated)
                ),
            ));
        }
    }
    let waiting = container.state.as_ref()?.waiting.as_ref()?;
    let trouble = match waiting.reason.as_deref()? {
        "CrashLoopBackOff" => Trouble::CrashLoopBackOff,
        "ImagePullBackOff" | "ErrImagePull" => Trouble::ImagePullBackOff,
        "CreateContainerConfigError" => Trouble::CreateContainerConfigError,
        _ => return None,
    };
    let exit = container
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| format!(", last exit code {}{}", t.exit_code, running_jobs(t)))
        .unwrap_or_default();
    Some((trouble, format!("container {name}{exit}")))
}

/// Job ids named at most per dead container.
const JOBS_NAMED: usize = 3;

/// `" while running job a, b"` from the termination message the worker runtime keeps
/// (`{"runningJobs":[…]}`), or nothing when it holds no job.
fn running_jobs(terminated: &ContainerStateTerminated) -> String {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct LastWords {
        running_jobs: Vec<String>,
    }
    let Some(words) = terminated
        .message
        .as_deref()
        .and_then(|m| serde_json::from_str::<LastWords>(m).ok())
    else {
        return String::new();
    };
    let jobs = &words.running_jobs;
    if jobs.is_empty() {
        return String::new();
    }
    let mut named = jobs
        .iter()
        .take(JOBS_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if jobs.len() > JOBS_NAMED {
        named.push_str(&format!(" and {} more", jobs.len() - JOBS_NAMED));
    }
    let noun = if jobs.len() == 1 { "job" } else { "jobs" };
    format!(" while running {noun} {named}")
}

/// How many of `pods` have each trouble (by reason), every trouble listed: what the
/// `conveyor_worker_troubled_pods` gauges say.
pub fn troubled(pods: &[Pod], now: Timestamp) -> [(&'static str, i64); 5] {
    let mut counts = Trouble::ALL.map(|t| (t.reason(), 0));
    for pod in pods {
        if let Some((trouble, _)) = trouble(pod, now)
            && let Some(count) = counts.iter_mut().find(|(r, _)| *r == trouble.reason())
        {
            count.1 += 1;
        }
    }
    counts
}

/// The `Degraded` condition of a pool from its pods at `now`.
pub fn health(pods: &[Pod], now: Timestamp) -> Health {
    // Sorted by pod name so the message does not depend on the list order.
    let troubles: BTreeMap<String, (Trouble, String)> = pods
        .iter()
        .filter_map(|pod| {
            let name = pod.metadata.name.clone().unwrap_or_default();
            trouble(pod, now).map(|t| (name, t))
        })
        .collect();
    let Some(worst) = troubles.values().map(|(t, _)| *t).min() else {
        let message: String = "no pod is crash-looping, OOM-killed, failing to pull its image or \
                               unschedulable"
            .into();
        return Health {
            status: Status::False,
            reason: reason::PODS_HEALTHY,
            note: message.clone(),
            message,
        };
    };
    let mut parts: Vec<String> = troubles
        .iter()
        .take(LISTED)
        .map(|(pod, (t, detail))| format!("pod {pod}: {} ({detail})", t.reason()))
        .collect();
    if troubles.len() > LISTED {
        parts.push(format!("and {} more", troubles.len() - LISTED));
    }
    let mut message = parts.join("; ");
    let lost_jobs = troubles.values().any(|(t, _)| t.lost_jobs());
    if lost_jobs {
        message.push_str(
            ". A job a pod was running when it died is redelivered after the queue's timeout, \
             and that attempt counts against retry.maxAttempts, so a job that keeps killing \
             its worker ends in the dead-letter queue",
        );
    }
    Health {
        status: Status::True,
        reason: worst.reason(),
        note: crash_note(&troubles, lost_jobs),
        message,
    }
}

/// Bytes of a crash note given to the pod lists; the rest is for the first pod's detail.
const NOTE_LISTS: usize = 600;
/// Bytes of a crash note given to the first pod's detail.
const NOTE_DETAIL: usize = 300;

/// `"6 pods OOMKilled: a, b and 4 more; 1 pod CrashLoopBackOff: c. Pod a: container …"`: the
/// pods per trouble, most severe first, what the first of them says and what becomes of the
/// jobs, within an Event note.
fn crash_note(troubles: &BTreeMap<String, (Trouble, String)>, lost_jobs: bool) -> String {
    let mut groups: BTreeMap<Trouble, Vec<&str>> = BTreeMap::new();
    for (pod, (trouble, _)) in troubles {
        groups.entry(*trouble).or_default().push(pod);
    }
    let mut lists = Vec::new();
    let mut left = NOTE_LISTS;
    for (i, (trouble, pods)) in groups.iter().enumerate() {
        let noun = if pods.len() == 1 { "pod" } else { "pods" };
        let head = format!("{} {noun} {}: ", pods.len(), trouble.reason());
        let share = left / (groups.len() - i);
        let list = head.clone() + &names(pods, share.saturating_sub(head.len()));
        left = left.saturating_sub(list.len() + 2);
        lists.push(list);
    }
    let mut note = lists.join("; ");
    if let Some((pod, (trouble, detail))) = troubles.iter().min_by_key(|(_, (t, _))| *t) {
        let first = format!(". Pod {pod}: {} ({detail})", trouble.reason());
        note.push_str(&bound(first, NOTE_DETAIL));
    }
    let advice = ". Jobs they were running are retried, each attempt counting against \
                  retry.maxAttempts";
    if lost_jobs && note.len() + advice.len() <= NOTE_LIMIT {
        note.push_str(advice);
    }
    bound(note, NOTE_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn pod(name: &str, containers: Vec<ContainerStatus>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(containers),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn waiting(reason: &str) -> Option<ContainerState> {
        Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: None,
            }),
            ..Default::default()
        })
    }

    fn terminated(reason: &str, code: i32, finished: i64) -> Option<ContainerState> {
        Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                reason: Some(reason.into()),
                exit_code: code,
                finished_at: Some(Time(at(finished))),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn running() -> Option<ContainerState> {
        Some(ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        })
    }

    fn container(state: Option<ContainerState>, last: Option<ContainerState>) -> ContainerStatus {
        ContainerStatus {
            name: "handler".into(),
            state,
            last_state: last,
            ..Default::default()
        }
    }

    #[test]
    fn healthy_pods_are_not_degraded() {
        let pods = [pod("w-1", vec![container(running(), None)])];
        let h = health(&pods, at(100));
        assert_eq!((h.status, h.reason), (Status::False, reason::PODS_HEALTHY));
    }

    #[test]
    fn a_recent_oom_kill_names_the_pod_and_redelivery() {
        let pods = [
            pod("w-1", vec![container(running(), None)]),
            pod(
                "w-2",
                vec![container(running(), terminated("OOMKilled", 137, 90))],
            ),
        ];
        let h = health(&pods, at(100));
        assert_eq!((h.status, h.reason), (Status::True, reason::OOM_KILLED));
        assert!(h.message.starts_with("pod w-2: OOMKilled"), "{}", h.message);
        assert!(h.message.contains("retry.maxAttempts"), "{}", h.message);
        assert!(!h.message.contains("w-1"), "{}", h.message);
    }

    #[test]
    fn a_dead_container_names_the_jobs_it_was_running() {
        let with_words = |state: Option<ContainerState>, words: &str| {
            let mut state = state.unwrap();
            state.terminated.as_mut().unwrap().message = Some(words.into());
            Some(state)
        };
        let oom = with_words(
            terminated("OOMKilled", 137, 90),
            r#"{"runningJobs":["resize-7"]}"#,
        );
        let h = health(&[pod("w-1", vec![container(running(), oom)])], at(100));
        assert!(
            h.message
                .starts_with("pod w-1: OOMKilled (container handler exceeded its memory limit while running job resize-7)"),
            "{}",
            h.message
        );
        let crash = with_words(
            terminated("Error", 139, 90),
            r#"{"runningJobs":["a","b","c","d"]}"#,
        );
        let h = health(
            &[pod(
                "w-2",
                vec![container(waiting("CrashLoopBackOff"), crash)],
            )],
            at(100),
        );
        assert!(
            h.message
                .contains("last exit code 139 while running jobs a, b, c and 1 more"),
            "{}",
            h.message
        );
        let idle = with_words(terminated("OOMKilled", 137, 90), r#"{"runningJobs":[]}"#);
        let h = health(&[pod("w-3", vec![container(running(), idle)])], at(100));
        assert!(!h.message.contains("while running"), "{}", h.message);
        let foreign = with_words(terminated("OOMKilled", 137, 90), "segfault in libfoo");
        let h = health(&[pod("w-4", vec![container(running(), foreign)])], at(100));
        assert!(!h.message.contains("while running"), "{}", h.message);
    }

    #[test]
    fn an_old_oom_kill_is_forgotten() {
        let pods = [pod(
            "w-2",
            vec![container(running(), terminated("OOMKilled", 137, 0))],
        )];
        let later = at(0) + RECENT + SignedDuration::from_secs(1);
        assert_eq!(health(&pods, later).status, Status::False);
    }

    #[test]
    fn oom_outranks_a_crash_loop_and_both_are_listed() {
        let pods = [
            pod(
                "w-a",
                vec![container(
                    waiting("CrashLoopBackOff"),
                    terminated("Error", 1, 95),
                )],
            ),
            pod(
                "w-b",
                vec![container(
                    waiting("CrashLoopBackOff"),
                    terminated("OOMKilled", 137, 95),
                )],
            ),
        ];
        let h = health(&pods, at(100));
        assert_eq!(h.reason, reason::OOM_KILLED);
        assert!(
            h.message
                .starts_with("pod w-a: CrashLoopBackOff (container handler, last exit code 1)"),
            "{}",
            h.message
        );
        assert!(h.message.contains("pod w-b: OOMKilled"), "{}", h.message);
    }

    #[test]
    fn image_pull_failures_and_config_errors_do_not_blame_jobs() {
        let mut init = pod("w-1", vec![container(waiting("PodInitializing"), None)]);
        init.status.as_mut().unwrap().init_container_statuses =
            Some(vec![container(waiting("ErrImagePull"), None)]);
        let h = health(&[init], at(1));
        assert_eq!(h.reason, reason::IMAGE_PULL_BACK_OFF);
        assert!(!h.message.contains("maxAttempts"), "{}", h.message);
        let config = pod(
            "w-2",
            vec![container(waiting("CreateContainerConfigError"), None)],
        );
        assert_eq!(
            health(&[config], at(1)).reason,
            reason::CREATE_CONTAINER_CONFIG_ERROR
        );
    }

    #[test]
    fn unschedulable_pods_say_why() {
        let mut p = pod("w-1", Vec::new());
        p.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes have enough memory".into()),
            ..Default::default()
        }]);
        let h = health(&[p], at(1));
        assert_eq!(h.reason, reason::UNSCHEDULABLE);
        assert!(h.message.contains("0/3 nodes"), "{}", h.message);
    }

    #[test]
    fn terminating_pods_are_ignored() {
        let mut p = pod("w-1", vec![container(waiting("CrashLoopBackOff"), None)]);
        p.metadata.deletion_timestamp = Some(Time(at(1)));
        assert_eq!(health(&[p], at(2)).status, Status::False);
    }

    #[test]
    fn many_pods_are_counted_and_order_does_not_matter() {
        let mut pods: Vec<Pod> = (0..8)
            .map(|i| {
                pod(
                    &format!("w-{i}"),
                    vec![container(waiting("CrashLoopBackOff"), None)],
                )
            })
            .collect();
        let h = health(&pods, at(1));
        assert!(h.message.contains("and 3 more"), "{}", h.message);
        pods.reverse();
        assert_eq!(health(&pods, at(1)), h);
    }

    /// The pool of issue #15: a 50-character Worker name, a 63-character container name and
    /// six OOM-killed pods gave a 1,120-byte note the API server refused.
    #[test]
    fn the_crash_note_fits_an_event_however_long_the_names() {
        let worker = "w".repeat(50);
        let pods: Vec<Pod> = (0..6)
            .map(|i| {
                let mut c = container(running(), terminated("OOMKilled", 137, 90));
                c.name = "c".repeat(63);
                if let Some(t) = c.last_state.as_mut().and_then(|s| s.terminated.as_mut()) {
                    t.message = Some(
                        r#"{"runningJobs":["resize-image-0001","resize-image-0002","resize-image-0003","x"]}"#
                            .into(),
                    );
                }
                pod(&format!("{worker}-6f9c8d7b5-{i:05}"), vec![c])
            })
            .collect();
        let h = health(&pods, at(100));
        assert!(
            h.message.len() > NOTE_LIMIT,
            "the condition has the details"
        );
        assert!(h.note.len() <= NOTE_LIMIT, "{}: {}", h.note.len(), h.note);
        assert!(h.note.starts_with("6 pods OOMKilled: "), "{}", h.note);
        assert!(h.note.contains(" more"), "{}", h.note);
        assert!(h.note.contains("exceeded its memory limit"), "{}", h.note);
        assert!(h.note.contains("retry.maxAttempts"), "{}", h.note);
    }

    #[test]
    fn the_crash_note_groups_pods_by_trouble_most_severe_first() {
        let pods = [
            pod("w-a", vec![container(waiting("CrashLoopBackOff"), None)]),
            pod(
                "w-b",
                vec![container(running(), terminated("OOMKilled", 137, 95))],
            ),
            pod(
                "w-c",
                vec![container(running(), terminated("OOMKilled", 137, 95))],
            ),
        ];
        let h = health(&pods, at(100));
        assert!(
            h.note.starts_with(
                "2 pods OOMKilled: w-b, w-c; 1 pod CrashLoopBackOff: w-a. Pod w-b: OOMKilled"
            ),
            "{}",
            h.note
        );
    }
}
