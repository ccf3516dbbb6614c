//! Every CamelCase reason a `JobQueue` shows: in its conditions (`Ready`, `Backlogged`,
//! `JobsFailing`) and in the Events published on it. The few that other resources or modules
//! share are defined in [`crate::conditions::reason`] and listed here too.

pub use crate::conditions::reason::{
    DEAD_LETTER_FAILED, INVALID_SPEC, MALFORMED_OBJECT, NATS_UNAVAILABLE,
};

/// `Ready`: the streams and consumers exist and match the spec.
pub const STREAM_READY: &str = "StreamReady";
/// `Ready`: NATS refused to create or update an asset; the message has NATS's answer.
pub const STREAM_ERROR: &str = "StreamError";
/// `Ready`: the NATS server refused the queue's credentials.
pub const NATS_AUTH_FAILED: &str = "NatsAuthFailed";
/// `Ready`: the TLS handshake with the queue's NATS server failed.
pub const NATS_TLS_FAILED: &str = "NatsTlsFailed";
/// `Backlogged`: more jobs wait than `alerts.maxPending` allows.
pub const DEPTH_OVER_THRESHOLD: &str = "DepthOverThreshold";
/// `Backlogged`: the oldest job waiting for a worker is older than `alerts.maxOldestPendingAge`.
pub const AGE_OVER_THRESHOLD: &str = "AgeOverThreshold";
/// `Backlogged` is `False`: depth and age are within the thresholds (or none are set).
pub const WITHIN_THRESHOLDS: &str = "WithinThresholds";
/// `JobsFailing`: too many jobs were dead-lettered within the window; the message names the
/// last one. Also the Event raised when the condition turns `True`.
pub const JOBS_DEAD_LETTERED: &str = "JobsDeadLettered";
/// `JobsFailing` is `False`: no more dead letters within the window than allowed.
pub const NO_RECENT_FAILURES: &str = "NoRecentFailures";
/// Event: the queue's `JobsFailing` condition turned `True` (one Event per transition, not
/// per job).
pub const JOB_DEAD_LETTERED: &str = "JobDeadLettered";
/// Event: the queue's `Backlogged` condition turned `True`.
pub const BACKLOGGED: &str = "Backlogged";
/// Event: the queue's `Backlogged` or `JobsFailing` condition turned back to `False`.
pub const RECOVERED: &str = "Recovered";
/// Event: dead letters were requeued with fresh attempts (`conveyor.dev/dlq-requeue`).
pub const DEAD_LETTERS_REQUEUED: &str = "DeadLettersRequeued";
/// Event: dead letters were purged (`conveyor.dev/dlq-purge`).
pub const DEAD_LETTERS_PURGED: &str = "DeadLettersPurged";
/// Event: a dead-letter request's value could not be read; nothing was changed.
pub const INVALID_DEAD_LETTER_REQUEST: &str = "InvalidDeadLetterRequest";
/// Event: no dead letter has the job id a request asked for; nothing was changed.
pub const DEAD_LETTER_NOT_FOUND: &str = "DeadLetterNotFound";
/// Event: a dead-letter request failed; its annotation stays and it is retried.
pub const DEAD_LETTER_REQUEST_FAILED: &str = "DeadLetterRequestFailed";

/// Every `Ready` reason, for turning a reason read back from a condition into its constant.
pub const READY: [&str; 6] = [
    STREAM_READY,
    INVALID_SPEC,
    NATS_UNAVAILABLE,
    NATS_AUTH_FAILED,
    NATS_TLS_FAILED,
    STREAM_ERROR,
];
