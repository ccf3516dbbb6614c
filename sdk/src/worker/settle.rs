//! What to do with a finished attempt: a pure function of the handler's outcome, the attempt
//! number and the attempts allowed, apart from any I/O (like `scaler::decide` in the operator).

use std::time::Duration;

use bytes::Bytes;

use super::Outcome;
use crate::protocol::{Backoff, Reason};

/// How to settle one attempt.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// Ack; the bytes are the job's result.
    Ack(Bytes),
    /// Store the continuation, then ack.
    Continue(Box<crate::client::Job>),
    /// Nak for another attempt after the delay.
    Retry(Duration),
    /// Copy to the dead-letter stream, then terminate.
    DeadLetter {
        /// Why.
        reason: Reason,
        /// The last error.
        error: String,
    },
}

/// Decides how to settle attempt `attempt` (1-based) of `max_attempts` that ended with
/// `outcome`; `unit` is the backoff's random draw in `[0, 1)`.
pub(super) fn decide(
    outcome: Outcome,
    attempt: u32,
    max_attempts: u32,
    backoff: &Backoff,
    unit: f64,
) -> Plan {
    let last = attempt >= max_attempts;
    match outcome {
        Outcome::Done(result) => Plan::Ack(result),
        Outcome::Continue(job) => Plan::Continue(job),
        Outcome::Permanent(error) => Plan::DeadLetter {
            reason: Reason::Permanent,
            error,
        },
        Outcome::Failed(error) if last => Plan::DeadLetter {
            reason: Reason::Exhausted,
            error,
        },
        Outcome::Retry { .. } if last => Plan::DeadLetter {
            reason: Reason::Exhausted,
            error: "handler asked for a retry on the last attempt".into(),
        },
        Outcome::Failed(_) => Plan::Retry(backoff.delay_with(attempt, unit)),
        Outcome::Retry { after } => {
            Plan::Retry(after.unwrap_or_else(|| backoff.delay_with(attempt, unit)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    fn plan(outcome: Outcome, attempt: u32, max: u32) -> Plan {
        decide(outcome, attempt, max, &backoff(), 0.5)
    }

    #[test]
    fn success_acks_with_the_result() {
        assert_eq!(
            plan(Outcome::Done(Bytes::from_static(b"r")), 3, 3),
            Plan::Ack(Bytes::from_static(b"r"))
        );
    }

    #[test]
    fn failures_back_off_until_the_last_attempt() {
        assert_eq!(
            plan(Outcome::Failed("x".into()), 1, 3),
            Plan::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            plan(Outcome::Failed("x".into()), 2, 3),
            Plan::Retry(Duration::from_secs(2))
        );
        assert_eq!(
            plan(Outcome::Failed("x".into()), 3, 3),
            Plan::DeadLetter {
                reason: Reason::Exhausted,
                error: "x".into()
            }
        );
        assert!(matches!(
            plan(Outcome::Failed("x".into()), 9, 3),
            Plan::DeadLetter { .. }
        ));
    }

    #[test]
    fn retries_take_the_asked_delay_except_on_the_last_attempt() {
        let after = Some(Duration::from_millis(250));
        assert_eq!(
            plan(Outcome::Retry { after }, 1, 2),
            Plan::Retry(Duration::from_millis(250))
        );
        assert_eq!(
            plan(Outcome::Retry { after: None }, 1, 2),
            Plan::Retry(Duration::from_secs(1))
        );
        assert!(matches!(
            plan(Outcome::Retry { after }, 2, 2),
            Plan::DeadLetter {
                reason: Reason::Exhausted,
                ..
            }
        ));
    }

    #[test]
    fn permanent_failures_dead_letter_at_once() {
        assert_eq!(
            plan(Outcome::Permanent("bad".into()), 1, 10),
            Plan::DeadLetter {
                reason: Reason::Permanent,
                error: "bad".into()
            }
        );
    }
}
