//! Conditions in the `metav1.Condition` shape, and the CamelCase reasons the operator sets.
//! `lastTransitionTime` changes only when a condition's status flips, so a status computed
//! twice from the same state is equal and is not written again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition type of a `JobQueue`: the JetStream assets exist and match the spec.
pub const READY: &str = "Ready";
/// Condition type of a `JobQueue`: pending jobs or the oldest job's age exceed
/// `spec.alerts`.
pub const BACKLOGGED: &str = "Backlogged";
/// Condition type of a `JobQueue`: more than `spec.alerts.maxFailures` jobs were
/// dead-lettered within `spec.alerts.failureWindow`.
pub const JOBS_FAILING: &str = "JobsFailing";
/// Condition type of a `Worker`: enough pods are ready to take jobs.
pub const AVAILABLE: &str = "Available";
/// Condition type of a `Worker`: the pool is changing size (`True`) or is at the size asked
/// for (`False`).
pub const SCALING: &str = "Scaling";

/// The reasons several resources or modules share. Each resource lists all of its reasons in
/// one place (`jobqueue::reasons`, `worker::reasons`, `schedule::status::reason`), re-exporting
/// these.
pub mod reason {
    /// The operator cannot reach the NATS server of a queue (`JobQueue` and `JobSchedule`).
    pub const NATS_UNAVAILABLE: &str = "NatsUnavailable";
    /// The spec holds a value the operator cannot use; the message says which (every
    /// resource).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The `JobQueue` a `Worker` or a `JobSchedule` names does not exist.
    pub const QUEUE_NOT_FOUND: &str = "QueueNotFound";
    /// `JobsFailing` of a `JobQueue`: jobs exhausted their attempts over a minute ago and are
    /// still not in the dead-letter stream (their dead letter cannot be written; they stay in
    /// the work stream); the message names them. Also the Warning Event the dispatcher raises,
    /// with the error, each time such a job fails again.
    pub const DEAD_LETTER_FAILED: &str = "DeadLetterFailed";
    /// Event: the stored object does not fit its type (written before a schema change, or past
    /// validation); the operator leaves it alone until it changes (every resource).
    pub const MALFORMED_OBJECT: &str = "MalformedObject";
}

/// Status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl Status {
    /// The text of the status in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    /// The status a condition's `status` text says (anything but `True` or `False` reads as
    /// `Unknown`); also for the conditions of built-in kinds (a pod's `Ready`).
    pub fn parse(text: &str) -> Self {
        match text {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }

    /// The status of `condition`.
    pub fn of(condition: &Condition) -> Self {
        Self::parse(&condition.status)
    }
}

/// Whether `condition` has status `True`.
pub fn is_true(condition: &Condition) -> bool {
    Status::of(condition) == Status::True
}

/// Inserts or replaces the condition `type_` in `conditions`, keeping its
/// `lastTransitionTime` when the status did not change. The message is cut to the 32 KiB the
/// API server accepts (a longer one would fail the whole status write).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(old) if old.status == status.as_str() => old.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: crate::events::bound(message, crate::events::CONDITION_MESSAGE_LIMIT),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// The condition `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM_READY: &str = "StreamReady";
    const STREAM_ERROR: &str = "StreamError";

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn keeps_transition_time_while_status_holds() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            READY,
            Status::False,
            reason::NATS_UNAVAILABLE,
            "down",
            Some(1),
            at(10),
        );
        set(
            &mut conditions,
            READY,
            Status::False,
            STREAM_ERROR,
            "refused",
            Some(2),
            at(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(conditions[0].reason, STREAM_ERROR);
        assert_eq!(conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn flipping_status_moves_transition_time() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            READY,
            Status::False,
            reason::NATS_UNAVAILABLE,
            "down",
            None,
            at(10),
        );
        set(
            &mut conditions,
            READY,
            Status::True,
            STREAM_READY,
            "ok",
            None,
            at(30),
        );
        assert_eq!(conditions[0].last_transition_time, Time(at(30)));
        assert_eq!(conditions[0].status, "True");
        assert!(is_true(&conditions[0]));
    }

    #[test]
    fn same_inputs_give_equal_conditions() {
        let mut a = Vec::new();
        set(
            &mut a,
            READY,
            Status::True,
            STREAM_READY,
            "ok",
            Some(1),
            at(10),
        );
        let mut b = a.clone();
        set(
            &mut b,
            READY,
            Status::True,
            STREAM_READY,
            "ok",
            Some(1),
            at(99),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn messages_are_bounded_to_what_the_api_server_accepts() {
        let mut conditions = Vec::new();
        let huge = "x".repeat(100_000);
        set(
            &mut conditions,
            READY,
            Status::False,
            STREAM_ERROR,
            huge,
            None,
            at(1),
        );
        assert!(conditions[0].message.len() <= 32 * 1024);
        assert!(conditions[0].message.ends_with('…'));
    }

    #[test]
    fn statuses_read_back_as_typed_values() {
        let mut conditions = Vec::new();
        for status in [Status::True, Status::False, Status::Unknown] {
            set(
                &mut conditions,
                READY,
                status,
                STREAM_READY,
                "",
                None,
                at(1),
            );
            assert_eq!(Status::of(&conditions[0]), status);
        }
        conditions[0].status = "true".into();
        assert_eq!(Status::of(&conditions[0]), Status::Unknown, "case matters");
        assert!(!is_true(&conditions[0]));
    }

    #[test]
    fn types_are_independent() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            READY,
            Status::True,
            STREAM_READY,
            "",
            None,
            at(1),
        );
        set(
            &mut conditions,
            AVAILABLE,
            Status::False,
            reason::QUEUE_NOT_FOUND,
            "",
            None,
            at(2),
        );
        assert_eq!(conditions.len(), 2);
        assert_eq!(find(&conditions, READY).unwrap().status, "True");
        assert_eq!(Status::of(&conditions[1]), Status::False);
    }
}
