//! Every CamelCase reason a `Worker` shows: in its conditions (`Available`, `Scaling`,
//! `Degraded`) and in the Events published on it (by the Worker controller and by the
//! scaler). The few that other resources share are defined in [`crate::conditions::reason`]
//! and listed here too.

pub use crate::conditions::reason::{INVALID_SPEC, MALFORMED_OBJECT, QUEUE_NOT_FOUND};

/// `Available`: the Deployment has at least the minimum number of ready pods.
pub const MINIMUM_REPLICAS_AVAILABLE: &str = "MinimumReplicasAvailable";
/// `Available`: the Deployment has fewer ready pods than the minimum.
pub const MINIMUM_REPLICAS_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
/// `Available`: jobs wait in the queue and no pod is ready to run them, whatever size the pool
/// was asked for (a pool scaled or paused to zero included).
pub const NO_READY_PODS: &str = "NoReadyPods";
/// `Scaling`: fewer pods run than are asked for; more are starting.
pub const SCALING_UP: &str = "ScalingUp";
/// `Scaling`: more pods run than are asked for; the extra ones are draining.
pub const SCALING_DOWN: &str = "ScalingDown";
/// `Scaling` is `False`: the pool has the size asked for.
pub const AT_DESIRED_SIZE: &str = "AtDesiredSize";
/// `Scaling` is `False`: the scaler cannot read the backlog from NATS and holds the current
/// size until it can.
pub const BACKLOG_UNKNOWN: &str = "BacklogUnknown";
/// `Degraded` is `False`: no worker pod is crash-looping, OOM-killed, failing to pull or
/// unschedulable.
pub const PODS_HEALTHY: &str = "PodsHealthy";
/// `Degraded`: a worker pod's container was killed for exceeding its memory limit.
pub const OOM_KILLED: &str = "OOMKilled";
/// `Degraded`: a worker pod's container keeps exiting.
pub const CRASH_LOOP_BACK_OFF: &str = "CrashLoopBackOff";
/// `Degraded`: a worker pod's image cannot be pulled.
pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
/// `Degraded`: a worker pod's container cannot be configured (missing Secret or ConfigMap).
pub const CREATE_CONTAINER_CONFIG_ERROR: &str = "CreateContainerConfigError";
/// `Degraded`: no node can take a worker pod.
pub const UNSCHEDULABLE: &str = "Unschedulable";
/// Event: worker pods started crashing or their troubles changed.
pub const WORKER_CRASHED: &str = "WorkerCrashed";
/// Event: old pods were replaced once their replacements were ready (`recycle.maxAge`).
pub const RECYCLED: &str = "Recycled";
/// Event: the scaler grew the pool.
pub const SCALED_UP: &str = "ScaledUp";
/// Event: the scaler shrank the pool.
pub const SCALED_DOWN: &str = "ScaledDown";
/// Event: the operator signed a NATS identity for the Worker's pods (first, at half-life, or
/// because the permissions it needs changed).
pub const NATS_IDENTITY_SIGNED: &str = "NatsIdentitySigned";
/// Event (Warning): the Worker's NATS identity cannot be signed or stored.
pub const NATS_IDENTITY_FAILED: &str = "NatsIdentityFailed";
