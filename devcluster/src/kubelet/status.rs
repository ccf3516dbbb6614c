//! What the kubelet knows about a pod's containers, and the pure function that turns it into the
//! pod's `status` (phase, conditions, container statuses) the way a real kubelet reports it.

use std::net::Ipv4Addr;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, HostIP, Pod,
    PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// One container as the kubelet tracks it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerRun {
    /// Container name.
    pub name: String,
    /// Image as written in the spec.
    pub image: String,
    /// Current state (waiting, running or terminated).
    pub state: ContainerState,
    /// State of the previous run.
    pub last_state: Option<ContainerState>,
    /// Restarts so far.
    pub restart_count: i32,
    /// Passing its readiness probe (or running without one).
    pub ready: bool,
    /// Passed its startup probe (or running without one).
    pub started: bool,
    /// `devcluster://<pid>` of the current or last process.
    pub container_id: Option<String>,
    /// Terminated for good: the restart policy brings it back no more.
    pub done: bool,
}

impl ContainerRun {
    /// A container that has not started yet, waiting for `reason`.
    pub fn waiting(name: &str, image: &str, reason: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            state: waiting(reason, None),
            ..Self::default()
        }
    }

    fn exit_code(&self) -> Option<i32> {
        self.state.terminated.as_ref().map(|t| t.exit_code)
    }

    fn never_ran(&self) -> bool {
        self.state.terminated.is_none()
            && self.state.running.is_none()
            && self.last_state.is_none()
            && !self.done
    }

    fn status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: format!("devcluster://{}", super::launch::image_name(&self.image)),
            container_id: self.container_id.clone(),
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            restart_count: self.restart_count,
            ready: self.ready,
            started: Some(self.started),
            ..ContainerStatus::default()
        }
    }
}

/// A `waiting` state.
pub fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..ContainerState::default()
    }
}

/// A `terminated` state; the reason follows the exit code unless given (`OOMKilled`, `StartError`).
pub fn terminated(
    exit_code: i32,
    signal: Option<i32>,
    reason: Option<&str>,
    message: Option<String>,
    started: Option<Timestamp>,
    container_id: Option<String>,
) -> ContainerState {
    let reason = reason.unwrap_or(if exit_code == 0 { "Completed" } else { "Error" });
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            signal,
            reason: Some(reason.into()),
            message,
            started_at: started.map(Time),
            finished_at: Some(Time(Timestamp::now())),
            container_id,
        }),
        ..ContainerState::default()
    }
}

/// Everything the kubelet knows about one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRun {
    /// Init containers, in order.
    pub init: Vec<ContainerRun>,
    /// App containers.
    pub containers: Vec<ContainerRun>,
    /// Every init container completed.
    pub initialized: bool,
    /// An init container failed and will not be retried.
    pub init_failed: bool,
    /// The pod's loopback IP.
    pub ip: Ipv4Addr,
    /// When the kubelet took the pod.
    pub started: Timestamp,
    /// The QoS class computed from the spec.
    pub qos_class: String,
}

fn phase(run: &PodRun) -> &'static str {
    if run.init_failed {
        return "Failed";
    }
    if !run.initialized || run.containers.iter().any(ContainerRun::never_ran) {
        return "Pending";
    }
    if run.containers.iter().all(|c| c.done) {
        return if run.containers.iter().all(|c| c.exit_code() == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        };
    }
    "Running"
}

fn condition(
    previous: Option<&PodStatus>,
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    now: Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_ && c.status == status))
        .and_then(|c| c.last_transition_time.clone());
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: if ok { None } else { reason.map(Into::into) },
        message: if ok { None } else { message },
        last_transition_time: Some(since.unwrap_or(Time(now))),
        ..PodCondition::default()
    }
}

/// The pod status for `run`; `previous` keeps the conditions' transition times stable.
pub fn pod_status(
    run: &PodRun,
    pod: &Pod,
    previous: Option<&PodStatus>,
    now: Timestamp,
) -> PodStatus {
    let phase = phase(run);
    let unready: Vec<&str> = run
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let all_ready = unready.is_empty();
    let (ready_reason, ready_message) = if phase == "Succeeded" || phase == "Failed" {
        (Some("PodCompleted"), None)
    } else {
        (
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    let uninitialized: Vec<&str> = run
        .init
        .iter()
        .filter(|c| c.exit_code() != Some(0))
        .map(|c| c.name.as_str())
        .collect();
    let init_message = Some(format!(
        "containers with incomplete status: [{}]",
        uninitialized.join(" ")
    ));
    let conditions = vec![
        condition(previous, "PodReadyToStartContainers", true, None, None, now),
        condition(
            previous,
            "Initialized",
            run.initialized,
            Some("ContainersNotInitialized"),
            init_message,
            now,
        ),
        condition(
            previous,
            "Ready",
            all_ready && phase == "Running",
            ready_reason,
            ready_message.clone(),
            now,
        ),
        condition(
            previous,
            "ContainersReady",
            all_ready && phase == "Running",
            ready_reason,
            ready_message,
            now,
        ),
        condition(previous, "PodScheduled", true, None, None, now),
    ];
    let ip = run.ip.to_string();
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some("127.0.0.1".into()),
        host_ips: Some(vec![HostIP {
            ip: "127.0.0.1".into(),
        }]),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip }]),
        start_time: Some(Time(run.started)),
        qos_class: Some(run.qos_class.clone()),
        init_container_statuses: (!run.init.is_empty())
            .then(|| run.init.iter().map(ContainerRun::status).collect()),
        container_statuses: Some(run.containers.iter().map(ContainerRun::status).collect()),
        observed_generation: pod.metadata.generation,
        ..PodStatus::default()
    }
}

/// The QoS class Kubernetes derives from requests and limits.
pub fn qos_class(pod: &Pod) -> &'static str {
    let containers: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .collect();
    let resources =
        |c: &&k8s_openapi::api::core::v1::Container| c.resources.clone().unwrap_or_default();
    if containers.iter().all(|c| {
        let r = resources(c);
        r.requests.as_ref().is_none_or(|m| m.is_empty())
            && r.limits.as_ref().is_none_or(|m| m.is_empty())
    }) {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        let r = resources(c);
        let limits = r.limits.unwrap_or_default();
        let requests = r.requests.unwrap_or_default();
        ["cpu", "memory"].iter().all(|k| {
            limits.contains_key(*k) && requests.get(*k).is_none_or(|q| Some(q) == limits.get(*k))
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(containers: Vec<ContainerRun>) -> PodRun {
        PodRun {
            init: vec![],
            containers,
            initialized: true,
            init_failed: false,
            ip: Ipv4Addr::new(127, 0, 0, 2),
            started: Timestamp::now(),
            qos_class: "BestEffort".into(),
        }
    }

    fn running(ready: bool) -> ContainerRun {
        ContainerRun {
            name: "c".into(),
            state: ContainerState {
                running: Some(Default::default()),
                ..ContainerState::default()
            },
            ready,
            started: true,
            ..ContainerRun::default()
        }
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    #[test]
    fn phases_follow_the_containers() {
        assert_eq!(
            phase(&run(vec![ContainerRun::waiting(
                "c",
                "i",
                "ContainerCreating"
            )])),
            "Pending"
        );
        assert_eq!(phase(&run(vec![running(false)])), "Running");
        let mut done = ContainerRun {
            done: true,
            ..running(false)
        };
        done.state = terminated(0, None, None, None, None, None);
        assert_eq!(phase(&run(vec![done.clone()])), "Succeeded");
        done.state = terminated(1, None, None, None, None, None);
        assert_eq!(phase(&run(vec![done])), "Failed");
        let mut r = run(vec![running(true)]);
        r.initialized = false;
        assert_eq!(phase(&r), "Pending");
    }

    #[test]
    fn ready_condition_keeps_its_transition_time() {
        let pod = Pod::default();
        let first = pod_status(
            &run(vec![running(true)]),
            &pod,
            None,
            Timestamp::from_second(100).unwrap(),
        );
        assert_eq!(cond(&first, "Ready").status, "True");
        let again = pod_status(
            &run(vec![running(true)]),
            &pod,
            Some(&first),
            Timestamp::from_second(200).unwrap(),
        );
        assert_eq!(
            cond(&again, "Ready").last_transition_time,
            cond(&first, "Ready").last_transition_time
        );
        let unready = pod_status(
            &run(vec![running(false)]),
            &pod,
            Some(&again),
            Timestamp::from_second(300).unwrap(),
        );
        assert_eq!(cond(&unready, "Ready").status, "False");
        assert_eq!(
            cond(&unready, "Ready").last_transition_time,
            Some(Time(Timestamp::from_second(300).unwrap()))
        );
        assert_eq!(unready.pod_ip.as_deref(), Some("127.0.0.2"));
    }

    #[test]
    fn terminated_reasons_follow_exit_codes() {
        let reason = |s: ContainerState| s.terminated.unwrap().reason.unwrap();
        assert_eq!(
            reason(terminated(0, None, None, None, None, None)),
            "Completed"
        );
        assert_eq!(reason(terminated(2, None, None, None, None, None)), "Error");
        assert_eq!(
            reason(terminated(
                137,
                Some(9),
                Some("OOMKilled"),
                None,
                None,
                None
            )),
            "OOMKilled"
        );
    }
}
