//! The status of a `JobQueue` as a pure function of the previous status and what the reconcile
//! found, so "nothing changed" yields an equal status and no write.

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueueStatus, StreamStatus};
use k8s_openapi::jiff::Timestamp;

use crate::assets::Figures;
use crate::conditions::{self, Status, reason};

/// What one reconcile of a queue found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Streams and consumers are in place; the queue's figures.
    Ready(Figures),
    /// The spec cannot be applied; why.
    Invalid(String),
    /// NATS could not be reached; details.
    Unavailable(String),
    /// NATS refused a change; its answer.
    Failed(String),
}

/// The new status. Figures from an earlier successful reconcile are kept while NATS is away.
pub fn compute_status(
    old: Option<&JobQueueStatus>,
    generation: Option<i64>,
    queue: &QueueRef,
    levels: u8,
    outcome: &Outcome,
    now: Timestamp,
) -> JobQueueStatus {
    let mut status = old.cloned().unwrap_or_default();
    status.observed_generation = generation;
    status.stream = Some(StreamStatus {
        name: queue.stream(),
        dead_letter: queue.dead_letter_stream(),
        subjects: (0..levels.clamp(1, 10))
            .map(|l| queue.job_subject(l))
            .collect(),
    });
    let (state, why, message) = match outcome {
        Outcome::Ready(figures) => {
            status.pending = Some(figures.pending);
            status.in_flight = Some(figures.in_flight);
            let message = format!(
                "stream {} and {} consumer(s) match the spec",
                queue.stream(),
                levels.clamp(1, 10)
            );
            (Status::True, reason::STREAM_READY, message)
        }
        Outcome::Invalid(m) => (Status::False, reason::INVALID_SPEC, m.clone()),
        Outcome::Unavailable(m) => (Status::False, reason::NATS_UNAVAILABLE, m.clone()),
        Outcome::Failed(m) => (Status::False, reason::STREAM_ERROR, m.clone()),
    };
    conditions::set(
        &mut status.conditions,
        conditions::READY,
        state,
        why,
        message,
        generation,
        now,
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn queue() -> QueueRef {
        QueueRef::new("team", "hello")
    }

    #[test]
    fn ready_reports_figures_and_names() {
        let figures = Figures {
            pending: 7,
            in_flight: 2,
        };
        let s = compute_status(None, Some(3), &queue(), 2, &Outcome::Ready(figures), at(1));
        assert_eq!(s.pending, Some(7));
        assert_eq!(s.in_flight, Some(2));
        assert_eq!(s.observed_generation, Some(3));
        let stream = s.stream.unwrap();
        assert_eq!(stream.name, "conveyor_team_hello");
        assert_eq!(
            stream.subjects,
            ["conveyor.team.hello.jobs.0", "conveyor.team.hello.jobs.1"]
        );
        let ready = conditions::find(&s.conditions, conditions::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", reason::STREAM_READY)
        );
    }

    #[test]
    fn nats_outage_keeps_last_figures_and_says_why() {
        let ready = compute_status(
            None,
            Some(1),
            &queue(),
            1,
            &Outcome::Ready(Figures {
                pending: 5,
                in_flight: 1,
            }),
            at(1),
        );
        let down = compute_status(
            Some(&ready),
            Some(1),
            &queue(),
            1,
            &Outcome::Unavailable("cannot reach NATS at nats://x:4222; retrying".into()),
            at(2),
        );
        assert_eq!(down.pending, Some(5));
        let cond = conditions::find(&down.conditions, conditions::READY).unwrap();
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", reason::NATS_UNAVAILABLE)
        );
        assert!(cond.message.contains("nats://x:4222"));
    }

    #[test]
    fn recomputing_the_same_outcome_is_stable() {
        let outcome = Outcome::Ready(Figures::default());
        let first = compute_status(None, Some(1), &queue(), 1, &outcome, at(1));
        let second = compute_status(Some(&first), Some(1), &queue(), 1, &outcome, at(50));
        assert_eq!(first, second);
    }

    #[test]
    fn invalid_and_failed_have_distinct_reasons() {
        let invalid = compute_status(
            None,
            None,
            &queue(),
            1,
            &Outcome::Invalid("bad".into()),
            at(1),
        );
        let failed = compute_status(
            None,
            None,
            &queue(),
            1,
            &Outcome::Failed("refused".into()),
            at(1),
        );
        assert_eq!(invalid.conditions[0].reason, reason::INVALID_SPEC);
        assert_eq!(failed.conditions[0].reason, reason::STREAM_ERROR);
    }
}
