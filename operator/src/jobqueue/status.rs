//! The status of a `JobQueue` as a pure function of the previous status and what the reconcile
//! found, so "nothing changed" yields an equal status and no write. Also pure: which Events a
//! status change deserves ([`notices`]) and whether a new status is worth a write now
//! ([`to_write`]).

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueueStatus, RecentFailure, StreamStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::reasons as reason;
use crate::assets::Figures;
use crate::conditions::{self, Status};

/// At most one status write per queue within this long, unless a condition changes status or
/// reason (figures alone wait).
pub const STATUS_THROTTLE: Duration = Duration::from_secs(5);
/// Dead letters shown in `status.recentFailures`.
pub const RECENT_FAILURES: usize = 10;
/// Longest error excerpt in `status.recentFailures`, in characters.
pub const ERROR_EXCERPT: usize = 200;

/// What one reconcile of a queue found.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Streams and consumers are in place; what JetStream says about the queue.
    Ready(Observed),
    /// The spec cannot be applied; why.
    Invalid(String),
    /// NATS could not be reached; details.
    Unavailable(String),
    /// NATS refused the credentials (or a credentials Secret is missing); the server's words.
    AuthFailed(String),
    /// The TLS handshake or setup failed (or a TLS Secret is missing); why.
    TlsFailed(String),
    /// NATS refused a change; its answer.
    Failed(String),
}

/// The figures of a ready queue.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Pending and in flight, from the consumers.
    pub figures: Figures,
    /// Dead letters and ages; `None` when reading them failed this time (the previous values
    /// and the alert conditions are kept).
    pub health: Option<Health>,
}

pub use crate::figures::{Counters, Health};

/// A reading of [`Counters`] and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When.
    pub at: std::time::Instant,
    /// What.
    pub counters: Counters,
}

/// Jobs submitted and finished per second between two samples, formatted; `None` when less
/// than a second apart (too short to say) or when the stream was recreated (counters fell).
pub fn rates(previous: Sample, now: Sample) -> Option<(String, String)> {
    let seconds = now.at.checked_duration_since(previous.at)?.as_secs_f64();
    if seconds < 1.0 || now.counters.submitted < previous.counters.submitted {
        return None;
    }
    let submitted = now.counters.submitted - previous.counters.submitted;
    // Finished = what came in minus what is still stored, over the interval.
    let finished = (previous.counters.stored + submitted).saturating_sub(now.counters.stored);
    let per_second = |n: u64| {
        let rate = n as f64 / seconds;
        if rate >= 10.0 || rate == 0.0 {
            format!("{rate:.0}")
        } else {
            format!("{rate:.1}")
        }
    };
    Some((per_second(submitted), per_second(finished)))
}

/// `spec.alerts`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    /// `maxPending`.
    pub max_pending: Option<u64>,
    /// `maxOldestPendingAge`.
    pub max_age: Option<Duration>,
    /// `maxFailures`.
    pub max_failures: u64,
    /// `failureWindow`.
    pub window: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_pending: None,
            max_age: None,
            max_failures: 0,
            window: Duration::from_secs(300),
        }
    }
}

/// The new status. Figures from an earlier successful reconcile are kept while NATS is away,
/// and so are the `Backlogged` and `JobsFailing` conditions computed from them.
pub fn compute_status(
    old: Option<&JobQueueStatus>,
    generation: Option<i64>,
    queue: &QueueRef,
    levels: u8,
    thresholds: &Thresholds,
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
        Outcome::Ready(observed) => {
            status.pending = Some(observed.figures.pending);
            status.in_flight = Some(observed.figures.in_flight);
            if let Some(health) = &observed.health {
                apply_health(
                    &mut status,
                    observed.figures,
                    health,
                    thresholds,
                    generation,
                    now,
                );
            }
            let message = format!(
                "stream {} and {} consumer(s) match the spec",
                queue.stream(),
                levels.clamp(1, 10)
            );
            (Status::True, reason::STREAM_READY, message)
        }
        Outcome::Invalid(m) => (Status::False, reason::INVALID_SPEC, m.clone()),
        Outcome::Unavailable(m) => (Status::False, reason::NATS_UNAVAILABLE, m.clone()),
        Outcome::AuthFailed(m) => (Status::False, reason::NATS_AUTH_FAILED, m.clone()),
        Outcome::TlsFailed(m) => (Status::False, reason::NATS_TLS_FAILED, m.clone()),
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

fn apply_health(
    status: &mut JobQueueStatus,
    figures: Figures,
    health: &Health,
    thresholds: &Thresholds,
    generation: Option<i64>,
    now: Timestamp,
) {
    status.dead_lettered = Some(health.dead_lettered);
    status.awaiting_dead_letter = Some(health.exhausted.count);
    status.delayed = Some(health.delayed);
    status.waiting = Some(health.waiting);
    if let Some((submitted, finished)) = &health.rates {
        status.submitted_per_second = Some(submitted.clone());
        status.finished_per_second = Some(finished.clone());
    }
    status.oldest_pending_age = health.oldest_age.map(format_age);
    status.recent_failures = health.tail.iter().take(RECENT_FAILURES).cloned().collect();
    let (state, why, message) = backlogged(figures.pending, health.oldest_age, thresholds);
    conditions::set(
        &mut status.conditions,
        conditions::BACKLOGGED,
        state,
        why,
        message,
        generation,
        now,
    );
    let (state, why, message) = failing(health, thresholds, now);
    conditions::set(
        &mut status.conditions,
        conditions::JOBS_FAILING,
        state,
        why,
        message,
        generation,
        now,
    );
}

/// `Backlogged`: depth first, then age.
fn backlogged(
    pending: u64,
    oldest: Option<Duration>,
    t: &Thresholds,
) -> (Status, &'static str, String) {
    let age = oldest.map_or_else(|| "none".to_owned(), format_age);
    if let Some(max) = t.max_pending.filter(|max| pending > *max) {
        let message = format!(
            "{pending} jobs pending, more than alerts.maxPending {max} (oldest job: {age})"
        );
        return (Status::True, reason::DEPTH_OVER_THRESHOLD, message);
    }
    if let (Some(max), Some(oldest)) = (t.max_age, oldest)
        && oldest > max
    {
        let message = format!(
            "the oldest job waiting for a worker is {age} old, more than alerts.maxOldestPendingAge {} ({pending} jobs pending)",
            format_age(max)
        );
        return (Status::True, reason::AGE_OVER_THRESHOLD, message);
    }
    let limits = match (t.max_pending, t.max_age) {
        (None, None) => "no thresholds set in spec.alerts".to_owned(),
        (p, a) => format!(
            "thresholds: maxPending {}, maxOldestPendingAge {}",
            p.map_or_else(|| "none".to_owned(), |p| p.to_string()),
            a.map_or_else(|| "none".to_owned(), format_age)
        ),
    };
    let message = format!("{pending} jobs pending, oldest job: {age}; {limits}");
    (Status::False, reason::WITHIN_THRESHOLDS, message)
}

/// How long a job may wait for its dead letter before `JobsFailing` says it cannot be written
/// (the dispatcher normally writes it within milliseconds; an outage is retried for longer).
pub const DEAD_LETTER_GRACE: Duration = Duration::from_secs(60);

/// `JobsFailing`: jobs whose dead letter cannot be written first, then dead letters within the
/// window, counted from the tail that was read.
fn failing(health: &Health, t: &Thresholds, now: Timestamp) -> (Status, &'static str, String) {
    if let Some(message) = stuck(&health.exhausted, now) {
        return (Status::True, reason::DEAD_LETTER_FAILED, message);
    }
    let since = now
        .checked_sub(jiff_span(t.window))
        .unwrap_or(Timestamp::MIN);
    let recent = health
        .tail
        .iter()
        .filter(|f| f.time.as_ref().is_some_and(|time| time.0 >= since))
        .count() as u64;
    // Every dead letter read lies inside the window and the stream holds more: there may be
    // more in the window than were read.
    let more = !health.tail_complete && recent == health.tail.len() as u64;
    let count = if more {
        format!("at least {recent}")
    } else {
        recent.to_string()
    };
    let window = format_age(t.window);
    if recent > t.max_failures {
        let last = health
            .tail
            .first()
            .map(describe_failure)
            .unwrap_or_default();
        let message = format!("{count} jobs dead-lettered in the last {window}; last: {last}");
        return (Status::True, reason::JOBS_DEAD_LETTERED, message);
    }
    let message = format!(
        "{count} jobs dead-lettered in the last {window} (alerts.maxFailures {})",
        t.max_failures
    );
    (Status::False, reason::NO_RECENT_FAILURES, message)
}

/// Names the jobs that have waited longer than [`DEAD_LETTER_GRACE`] for their dead letter.
fn stuck(exhausted: &conveyor::dlq::Exhausted, now: Timestamp) -> Option<String> {
    let grace = jiff_span(DEAD_LETTER_GRACE);
    let old: Vec<String> = exhausted
        .oldest
        .iter()
        .filter_map(|job| {
            let since = job.since.parse::<Timestamp>().ok()?;
            (now.duration_since(since) > grace).then(|| {
                format!(
                    "{} (work stream sequence {}, {} deliveries, since {})",
                    job.job_id,
                    job.sequence,
                    job.deliveries,
                    since
                        .round(k8s_openapi::jiff::Unit::Second)
                        .unwrap_or(since)
                )
            })
        })
        .collect();
    if old.is_empty() {
        return None;
    }
    let more = exhausted.count.saturating_sub(old.len() as u64);
    let others = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Some(format!(
        "{} exhausted their attempts but their dead letter cannot be written; they stay in the work stream: {}{others} (the DeadLetterFailed Events say why)",
        if exhausted.count == 1 {
            "1 job".to_owned()
        } else {
            format!("{} jobs", exhausted.count)
        },
        old.join(", ")
    ))
}

/// "job X (reason after N attempts) on pod P: error".
fn describe_failure(f: &RecentFailure) -> String {
    let attempts = f
        .attempts
        .map(|n| format!(" after {n} attempt(s)"))
        .unwrap_or_default();
    let pod = if f.pod.is_empty() { "unknown" } else { &f.pod };
    format!(
        "job {} ({}{attempts}) on pod {pod}: {}",
        f.job_id, f.reason, f.error
    )
}

fn jiff_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

/// The first `ERROR_EXCERPT` characters of an error, on one line.
pub fn excerpt(error: &str) -> String {
    let line = error.replace(['\n', '\r'], " ");
    match line.char_indices().nth(ERROR_EXCERPT) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A duration with second precision in the spec's format: `0s`, `45s`, `1m30s`, `2h5s`.
pub fn format_age(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// An Event a status change deserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `Normal` (true) or `Warning` (false).
    pub normal: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What happened.
    pub note: String,
}

/// The Events for the condition transitions from `old` to `new`: `Ready` on any change of
/// status or reason (under the condition's own reason), `Backlogged` and `JobDeadLettered`
/// when those conditions turn `True`, `Recovered` when they turn back to `False`. Nothing
/// while a condition holds, so a thousand failing jobs make one Event.
pub fn notices(old: Option<&JobQueueStatus>, new: &JobQueueStatus) -> Vec<Notice> {
    let before = |type_: &str| old.and_then(|s| conditions::find(&s.conditions, type_));
    let mut out = Vec::new();
    if let Some(ready) = conditions::find(&new.conditions, conditions::READY)
        && !before(conditions::READY)
            .is_some_and(|o| o.status == ready.status && o.reason == ready.reason)
    {
        out.push(Notice {
            normal: conditions::is_true(ready),
            reason: reason_const(&ready.reason),
            note: ready.message.clone(),
        });
    }
    for (type_, raised) in [
        (conditions::BACKLOGGED, reason::BACKLOGGED),
        (conditions::JOBS_FAILING, reason::JOB_DEAD_LETTERED),
    ] {
        let Some(cond) = conditions::find(&new.conditions, type_) else {
            continue;
        };
        let was_true = before(type_).is_some_and(conditions::is_true);
        if conditions::is_true(cond) && !was_true {
            out.push(Notice {
                normal: false,
                reason: raised,
                note: cond.message.clone(),
            });
        } else if !conditions::is_true(cond) && was_true {
            out.push(Notice {
                normal: true,
                reason: reason::RECOVERED,
                note: format!("{type_} is False again: {}", cond.message),
            });
        }
    }
    out
}

/// The `'static` constant for a `Ready` reason the status module set.
fn reason_const(r: &str) -> &'static str {
    reason::READY
        .into_iter()
        .find(|c| *c == r)
        .unwrap_or(reason::STREAM_ERROR)
}

/// The status to write now, or `None`: nothing changed, or only figures and messages changed
/// and the last write is less than [`STATUS_THROTTLE`] old. A change of a condition's status
/// or reason, of `observedGeneration`, of the stream names, of the NATS URL or of the last
/// dead-letter request is written at once. The written
/// status carries `observedAt` = `now` when `fresh` (figures were read this time).
pub fn to_write(
    old: Option<&JobQueueStatus>,
    mut new: JobQueueStatus,
    fresh: bool,
    now: Timestamp,
) -> Option<JobQueueStatus> {
    let urgent = match old {
        None => true,
        Some(old) if *old == new => return None,
        Some(old) => {
            let key = |s: &JobQueueStatus| {
                s.conditions
                    .iter()
                    .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                    .collect::<Vec<_>>()
            };
            key(old) != key(&new)
                || old.observed_generation != new.observed_generation
                || old.stream != new.stream
                || old.last_dead_letter_request != new.last_dead_letter_request
                || old.nats_url != new.nats_url
                || old
                    .observed_at
                    .as_ref()
                    .is_none_or(|t| now.duration_since(t.0) >= jiff_span(STATUS_THROTTLE))
        }
    };
    if !urgent {
        return None;
    }
    if fresh {
        new.observed_at = Some(Time(now));
    }
    Some(new)
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

    fn ready(pending: u64, health: Option<Health>) -> Outcome {
        Outcome::Ready(Observed {
            figures: Figures {
                pending,
                in_flight: 0,
            },
            health,
        })
    }

    fn failure(id: &str, secs: i64) -> RecentFailure {
        RecentFailure {
            job_id: id.into(),
            attempts: Some(3),
            reason: "exhausted".into(),
            error: "exit status 1".into(),
            pod: "work-abc".into(),
            time: Some(Time(at(secs))),
        }
    }

    fn health(tail: Vec<RecentFailure>, age: Option<u64>) -> Health {
        Health {
            dead_lettered: tail.len() as u64,
            oldest_age: age.map(Duration::from_secs),
            tail_complete: true,
            tail,
            delayed: 0,
            waiting: 0,
            counters: Counters::default(),
            rates: None,
            levels: Vec::new(),
            dead_letters_ever: 0,
            exhausted: Default::default(),
        }
    }

    #[test]
    fn a_job_whose_dead_letter_cannot_be_written_is_named_after_a_minute() {
        let t = Thresholds::default();
        let job = |id: &str, since: i64| conveyor::dlq::ExhaustedJob {
            job_id: id.into(),
            sequence: 7,
            deliveries: 3,
            since: at(since).to_string(),
        };
        let mut h = health(Vec::new(), None);
        h.exhausted = conveyor::dlq::Exhausted {
            count: 4,
            oldest: vec![job("big-1", 100), job("big-2", 150)],
        };
        // 30 s after the first: still within the grace, nothing to say yet.
        let (state, why, _) = failing(&h, &t, at(130));
        assert_eq!((state, why), (Status::False, reason::NO_RECENT_FAILURES));
        let (state, why, message) = failing(&h, &t, at(200));
        assert_eq!((state, why), (Status::True, reason::DEAD_LETTER_FAILED));
        assert!(message.starts_with("4 jobs exhausted"), "{message}");
        assert!(
            message.contains("big-1 (work stream sequence 7, 3 deliveries"),
            "{message}"
        );
        assert!(!message.contains("big-2"), "{message}");
        assert!(message.contains("and 3 more"), "{message}");
    }

    #[test]
    fn rates_count_what_came_in_and_what_left() {
        let t0 = std::time::Instant::now();
        let sample = |secs: u64, submitted: u64, stored: u64| Sample {
            at: t0 + Duration::from_secs(secs),
            counters: Counters { submitted, stored },
        };
        // 5,000 in over 5 s; 100 still stored of 600 before + 5,000 new: 5,500 finished.
        assert_eq!(
            rates(sample(0, 1_000, 600), sample(5, 6_000, 100)),
            Some(("1000".into(), "1100".into()))
        );
        assert_eq!(
            rates(sample(0, 10, 0), sample(5, 12, 0)),
            Some(("0.4".into(), "0.4".into()))
        );
        assert_eq!(
            rates(sample(0, 10, 3), sample(4, 10, 3)),
            Some(("0".into(), "0".into()))
        );
        assert_eq!(rates(sample(0, 10, 0), sample(0, 20, 0)), None, "too short");
        assert_eq!(
            rates(sample(0, 10, 0), sample(5, 2, 0)),
            None,
            "a recreated stream starts over"
        );
    }

    fn status_of(s: &JobQueueStatus, type_: &str) -> (String, String) {
        let c = conditions::find(&s.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn compute(
        old: Option<&JobQueueStatus>,
        t: &Thresholds,
        o: &Outcome,
        now: i64,
    ) -> JobQueueStatus {
        compute_status(old, Some(1), &queue(), 1, t, o, at(now))
    }

    #[test]
    fn ready_reports_figures_and_names() {
        let outcome = Outcome::Ready(Observed {
            figures: Figures {
                pending: 7,
                in_flight: 2,
            },
            health: Some(health(vec![failure("a", 1)], Some(95))),
        });
        let s = compute_status(
            None,
            Some(3),
            &queue(),
            2,
            &Thresholds::default(),
            &outcome,
            at(1),
        );
        assert_eq!(s.pending, Some(7));
        assert_eq!(s.in_flight, Some(2));
        assert_eq!(s.dead_lettered, Some(1));
        assert_eq!(s.oldest_pending_age.as_deref(), Some("1m35s"));
        assert_eq!(s.recent_failures[0].job_id, "a");
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
    fn nats_outage_keeps_last_figures_and_alert_conditions() {
        let t = Thresholds::default();
        let up = compute(None, &t, &ready(5, Some(health(vec![], None))), 1);
        let down = compute(
            Some(&up),
            &t,
            &Outcome::Unavailable("cannot reach NATS at nats://x:4222; retrying".into()),
            2,
        );
        assert_eq!(down.pending, Some(5));
        let cond = conditions::find(&down.conditions, conditions::READY).unwrap();
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", reason::NATS_UNAVAILABLE)
        );
        assert!(cond.message.contains("nats://x:4222"));
        assert_eq!(
            status_of(&down, conditions::BACKLOGGED),
            ("False".into(), reason::WITHIN_THRESHOLDS.into())
        );
    }

    #[test]
    fn recomputing_the_same_outcome_is_stable() {
        let outcome = ready(0, Some(health(vec![], None)));
        let t = Thresholds::default();
        let first = compute(None, &t, &outcome, 1);
        let second = compute(Some(&first), &t, &outcome, 50);
        assert_eq!(first, second);
    }

    #[test]
    fn invalid_and_failed_have_distinct_reasons() {
        let t = Thresholds::default();
        let invalid = compute(None, &t, &Outcome::Invalid("bad".into()), 1);
        let failed = compute(None, &t, &Outcome::Failed("refused".into()), 1);
        assert_eq!(invalid.conditions[0].reason, reason::INVALID_SPEC);
        assert_eq!(failed.conditions[0].reason, reason::STREAM_ERROR);
    }

    #[test]
    fn backlogged_flips_on_depth_and_clears() {
        let t = Thresholds {
            max_pending: Some(100),
            ..Thresholds::default()
        };
        let calm = compute(None, &t, &ready(100, Some(health(vec![], Some(5)))), 10);
        assert_eq!(
            status_of(&calm, conditions::BACKLOGGED),
            ("False".into(), reason::WITHIN_THRESHOLDS.into())
        );
        let deep = compute(
            Some(&calm),
            &t,
            &ready(101, Some(health(vec![], Some(5)))),
            20,
        );
        assert_eq!(
            status_of(&deep, conditions::BACKLOGGED),
            ("True".into(), reason::DEPTH_OVER_THRESHOLD.into())
        );
        let c = conditions::find(&deep.conditions, conditions::BACKLOGGED).unwrap();
        assert!(c.message.contains("101 jobs pending"), "{}", c.message);
        assert_eq!(c.last_transition_time, Time(at(20)));
        let back = compute(
            Some(&deep),
            &t,
            &ready(3, Some(health(vec![], Some(5)))),
            30,
        );
        assert_eq!(
            status_of(&back, conditions::BACKLOGGED),
            ("False".into(), reason::WITHIN_THRESHOLDS.into())
        );
    }

    #[test]
    fn backlogged_flips_on_age_and_clears() {
        let t = Thresholds {
            max_age: Some(Duration::from_secs(60)),
            ..Thresholds::default()
        };
        let old = compute(None, &t, &ready(2, Some(health(vec![], Some(61)))), 10);
        assert_eq!(
            status_of(&old, conditions::BACKLOGGED),
            ("True".into(), reason::AGE_OVER_THRESHOLD.into())
        );
        let c = conditions::find(&old.conditions, conditions::BACKLOGGED).unwrap();
        assert!(c.message.contains("1m1s old"), "{}", c.message);
        let drained = compute(Some(&old), &t, &ready(0, Some(health(vec![], None))), 20);
        assert_eq!(
            status_of(&drained, conditions::BACKLOGGED),
            ("False".into(), reason::WITHIN_THRESHOLDS.into())
        );
    }

    #[test]
    fn jobs_failing_names_the_last_failure_and_clears_when_the_window_passes() {
        let t = Thresholds {
            max_failures: 1,
            window: Duration::from_secs(60),
            ..Thresholds::default()
        };
        let one = compute(
            None,
            &t,
            &ready(0, Some(health(vec![failure("a", 100)], None))),
            110,
        );
        assert_eq!(
            status_of(&one, conditions::JOBS_FAILING),
            ("False".into(), reason::NO_RECENT_FAILURES.into())
        );
        let tail = vec![failure("c", 105), failure("b", 102), failure("a", 100)];
        let two = compute(
            Some(&one),
            &t,
            &ready(0, Some(health(tail.clone(), None))),
            110,
        );
        assert_eq!(
            status_of(&two, conditions::JOBS_FAILING),
            ("True".into(), reason::JOBS_DEAD_LETTERED.into())
        );
        let c = conditions::find(&two.conditions, conditions::JOBS_FAILING).unwrap();
        assert_eq!(
            c.message,
            "3 jobs dead-lettered in the last 1m; last: job c (exhausted after 3 attempt(s)) on pod work-abc: exit status 1"
        );
        // A minute later the same dead letters are outside the window.
        let later = compute(Some(&two), &t, &ready(0, Some(health(tail, None))), 200);
        assert_eq!(
            status_of(&later, conditions::JOBS_FAILING),
            ("False".into(), reason::NO_RECENT_FAILURES.into())
        );
    }

    #[test]
    fn a_partial_tail_inside_the_window_says_at_least() {
        let t = Thresholds::default();
        let mut h = health(vec![failure("b", 100), failure("a", 99)], None);
        h.tail_complete = false;
        h.dead_lettered = 1000;
        let s = compute(None, &t, &ready(0, Some(h)), 101);
        let c = conditions::find(&s.conditions, conditions::JOBS_FAILING).unwrap();
        assert!(c.message.starts_with("at least 2 jobs"), "{}", c.message);
    }

    #[test]
    fn recent_failures_are_bounded() {
        let tail: Vec<_> = (0..50).map(|i| failure(&format!("j{i}"), i)).collect();
        let s = compute(
            None,
            &Thresholds::default(),
            &ready(0, Some(health(tail, None))),
            60,
        );
        assert_eq!(s.recent_failures.len(), RECENT_FAILURES);
        assert_eq!(s.dead_lettered, Some(50));
    }

    #[test]
    fn events_only_on_transitions() {
        let t = Thresholds::default();
        let calm = compute(None, &t, &ready(0, Some(health(vec![], None))), 10);
        let first = notices(None, &calm);
        assert_eq!(first.len(), 1, "Ready became True: {first:?}");
        assert_eq!(first[0].reason, reason::STREAM_READY);
        let failing = compute(
            Some(&calm),
            &t,
            &ready(0, Some(health(vec![failure("a", 10)], None))),
            11,
        );
        let n = notices(Some(&calm), &failing);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].normal, n[0].reason),
            (false, reason::JOB_DEAD_LETTERED)
        );
        let tail = vec![failure("b", 12), failure("a", 10)];
        let still = compute(
            Some(&failing),
            &t,
            &ready(0, Some(health(tail.clone(), None))),
            12,
        );
        assert!(
            notices(Some(&failing), &still).is_empty(),
            "no event while failing holds"
        );
        let healed = compute(Some(&still), &t, &ready(0, Some(health(tail, None))), 1000);
        let n = notices(Some(&still), &healed);
        assert_eq!(
            (n.len(), n[0].normal, n[0].reason),
            (1, true, reason::RECOVERED)
        );
    }

    #[test]
    fn backlog_events_raise_and_recover() {
        let t = Thresholds {
            max_pending: Some(1),
            ..Thresholds::default()
        };
        let calm = compute(None, &t, &ready(0, Some(health(vec![], None))), 1);
        let deep = compute(Some(&calm), &t, &ready(5, Some(health(vec![], None))), 2);
        let n = notices(Some(&calm), &deep);
        assert_eq!((n.len(), n[0].reason), (1, reason::BACKLOGGED));
        let back = compute(Some(&deep), &t, &ready(0, Some(health(vec![], None))), 3);
        assert_eq!(notices(Some(&deep), &back)[0].reason, reason::RECOVERED);
    }

    #[test]
    fn writes_are_throttled_unless_a_condition_changes() {
        let t = Thresholds::default();
        let first = to_write(
            None,
            compute(None, &t, &ready(1, Some(health(vec![], None))), 10),
            true,
            at(10),
        )
        .expect("the first status is written");
        assert_eq!(first.observed_at, Some(Time(at(10))));
        let same = compute(Some(&first), &t, &ready(1, Some(health(vec![], None))), 11);
        assert_eq!(
            to_write(Some(&first), same, true, at(11)),
            None,
            "nothing changed"
        );
        let figures = compute(Some(&first), &t, &ready(2, Some(health(vec![], None))), 12);
        assert_eq!(
            to_write(Some(&first), figures.clone(), true, at(12)),
            None,
            "throttled"
        );
        let written = to_write(Some(&first), figures, true, at(15)).expect("5 s later");
        assert_eq!(written.pending, Some(2));
        let failing = compute(
            Some(&written),
            &t,
            &ready(2, Some(health(vec![failure("a", 15)], None))),
            16,
        );
        assert!(
            to_write(Some(&written), failing, true, at(16)).is_some(),
            "a flip is written at once"
        );
    }

    #[test]
    fn excerpts_and_ages_are_short() {
        let long = "é".repeat(500);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), ERROR_EXCERPT + 1);
        assert_eq!(excerpt("a\nb"), "a b");
        assert_eq!(format_age(Duration::from_millis(400)), "0s");
        assert_eq!(format_age(Duration::from_secs(7205)), "2h5s");
        assert_eq!(format_age(Duration::from_secs(90)), "1m30s");
    }
}
