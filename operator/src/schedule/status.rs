//! The pure half of the JobSchedule controller: reading the spec into the schedule the server
//! runs, checking it against its queue, the next run, and the status.

use bytes::Bytes;
use conveyor::protocol::{self, block};
use conveyor::schedule::{self, LastRun, Pattern, ScheduleMessage, Template};
use conveyor_crds::{JobQueueSpec, JobScheduleSpec, JobScheduleStatus, ScheduleRun};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::conditions::{self, Status};

/// Reasons (CamelCase) of a JobSchedule's `Ready` condition.
pub mod reason {
    /// The NATS server holds the schedule and submits its runs.
    pub const SCHEDULED: &str = "Scheduled";
    /// `spec.suspend` is set: the server holds no schedule.
    pub const SUSPENDED: &str = "Suspended";
    /// The cron expression, preset or interval does not parse.
    pub const INVALID_SCHEDULE: &str = "InvalidSchedule";
    /// The time zone is not in the time zone database.
    pub const INVALID_TIME_ZONE: &str = "InvalidTimeZone";
    /// Another spec value cannot be used (headers, timeout, priority, name).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `spec.job.queue` names no JobQueue in the namespace.
    pub const QUEUE_NOT_FOUND: &str = crate::conditions::reason::QUEUE_NOT_FOUND;
    /// The job is larger than the queue's `stream.maxJobSize`.
    pub const JOB_TOO_LARGE: &str = "JobTooLarge";
    /// The queue's NATS server is older than `conveyor::schedule::MIN_SERVER_VERSION`.
    pub const UNSUPPORTED_SERVER: &str = "UnsupportedServer";
    /// The queue's NATS server cannot be reached.
    pub const NATS_UNAVAILABLE: &str = crate::conditions::reason::NATS_UNAVAILABLE;
    /// The server refused the schedule; the message has its answer.
    pub const SCHEDULE_ERROR: &str = "ScheduleError";
}

/// Why a schedule is not running: a `Ready` reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// CamelCase reason.
    pub reason: &'static str,
    /// What is wrong, for users.
    pub message: String,
}

impl Problem {
    /// A problem with `reason`.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// What a reconcile found on the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Subject of the schedule message.
    pub subject: String,
    /// Whether the schedule is suspended (and so not on the server).
    pub suspended: bool,
    /// The last run: the one the server wrote (`Allow`), or the one the operator submitted in
    /// this reconcile with its work-stream sequence (`Forbid`, `Replace`).
    pub last: Option<(LastRun, Option<u64>)>,
    /// Whether this reconcile skipped a slot (`Forbid`).
    pub skipped: bool,
    /// The slot this reconcile handled (`Forbid`, `Replace`).
    pub handled: Option<String>,
    /// What became of the last run, when known.
    pub outcome: Option<String>,
    /// When the next run is due.
    pub next: Option<Timestamp>,
    /// The status as read afresh from the API server this reconcile (`Forbid`, `Replace`): the
    /// new status builds on it, not on the cached object, which may predate the last write.
    pub fresh: Option<JobScheduleStatus>,
}

/// The pattern and job a spec stands for, or the first problem with it.
pub fn desired(name: &str, spec: &JobScheduleSpec) -> Result<(Pattern, Template), Problem> {
    if name.len() > schedule::MAX_NAME {
        return Err(Problem::new(
            reason::INVALID_SPEC,
            format!(
                "the name is {} characters long; a JobSchedule name may have at most {} (job ids are <name>@<time>)",
                name.len(),
                schedule::MAX_NAME
            ),
        ));
    }
    let pattern = Pattern::parse(&spec.schedule, spec.time_zone.as_deref()).map_err(|err| {
        let reason = match err {
            schedule::ScheduleError::TimeZone(_) => reason::INVALID_TIME_ZONE,
            _ => reason::INVALID_SCHEDULE,
        };
        Problem::new(reason, err.to_string())
    })?;
    let job = &spec.job;
    let invalid = |m: String| Problem::new(reason::INVALID_SPEC, m);
    for (key, value) in &job.headers {
        // The protocol's own header rules, with this resource's tighter lengths.
        if key.len() > 128 || block::check_name(key.as_bytes()).is_err() {
            return Err(invalid(format!(
                "job.headers name {key:?} must be 1 to 128 visible ASCII characters without ':'"
            )));
        }
        if value.len() > 4096 || block::check_value(value).is_err() {
            return Err(invalid(format!(
                "job.headers value of {key} must be one line of at most 4096 bytes, without CR, LF or NUL"
            )));
        }
    }
    let timeout = match job.timeout.as_deref() {
        None => None,
        Some(text) => {
            let ok = protocol::parse_duration(text)
                .filter(|d| !d.is_zero() && *d <= protocol::envelope::MAX_TIMEOUT);
            if ok.is_none() {
                return Err(invalid(format!(
                    "job.timeout {text:?} is not a duration from 1ms to 168h like 30s, 1500ms, 5m or 2h"
                )));
            }
            Some(text.to_owned())
        }
    };
    let template = Template {
        priority: job.priority.unwrap_or(0),
        payload: Bytes::from(job.payload.clone().unwrap_or_default()),
        headers: job
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        max_attempts: job.max_attempts.and_then(|n| u32::try_from(n).ok()),
        timeout,
    };
    Ok((pattern, template))
}

/// Checks the job against its queue: a priority level the queue has, a size it accepts.
pub fn fits(
    queue: &JobQueueSpec,
    template: &Template,
    message: &ScheduleMessage,
) -> Result<(), Problem> {
    if template.priority >= queue.priorities {
        return Err(Problem::new(
            reason::INVALID_SPEC,
            format!(
                "job.priority is {} but the queue has {} priority level(s) (0 to {})",
                template.priority,
                queue.priorities,
                queue.priorities.saturating_sub(1)
            ),
        ));
    }
    if let Some(max) = queue.stream.max_job_size {
        let size = message.job_size();
        if size > usize::try_from(max).unwrap_or(0) {
            return Err(Problem::new(
                reason::JOB_TOO_LARGE,
                format!(
                    "each run would be {size} bytes (payload and headers), over the queue's stream.maxJobSize of {max}"
                ),
            ));
        }
    }
    Ok(())
}

/// When the next run is due: the next cron slot after `now`; for an interval, the next slot
/// the server announced with its last run, or the first one after the schedule was written at
/// `since` (the server fires on whole seconds).
pub fn next_run(
    pattern: &Pattern,
    last: Option<&LastRun>,
    since: Timestamp,
    now: Timestamp,
) -> Option<Timestamp> {
    match pattern {
        Pattern::Cron { .. } => pattern.next_after(now),
        Pattern::Every(every) => {
            let announced = last.filter(|l| l.slot >= since).and_then(|l| l.next);
            announced.or_else(|| {
                let first = since
                    .checked_add(SignedDuration::try_from(*every).ok()?)
                    .ok()?;
                let whole = first.as_second() + i64::from(first.subsec_nanosecond() > 0);
                Timestamp::from_second(whole).ok()
            })
        }
    }
}

/// The status of a schedule after a reconcile that found `found` (or a problem), keeping the
/// last run and `lastTransitionTime` when nothing changed.
pub fn compute_status(
    old: Option<&JobScheduleStatus>,
    generation: Option<i64>,
    found: &Result<Found, Problem>,
    now: Timestamp,
) -> JobScheduleStatus {
    let mut status = old.cloned().unwrap_or_default();
    status.observed_generation = generation;
    match found {
        Ok(found) => {
            let (reason, message) = if found.suspended {
                (
                    reason::SUSPENDED,
                    "suspended: the NATS server holds no schedule".to_owned(),
                )
            } else {
                (
                    reason::SCHEDULED,
                    format!("the NATS server runs the schedule {}", found.subject),
                )
            };
            conditions::set(
                &mut status.conditions,
                conditions::READY,
                Status::True,
                reason,
                message,
                generation,
                now,
            );
            if let Some((last, sequence)) = &found.last {
                status.last_run = Some(ScheduleRun {
                    time: Time(last.slot),
                    job_id: last.job_id.clone(),
                    sequence: *sequence,
                    outcome: None,
                });
            }
            if let Some(run) = status.last_run.as_mut() {
                run.outcome.clone_from(&found.outcome);
            }
            if found.skipped {
                status.missed_runs = status.missed_runs.saturating_add(1);
            }
            if found.handled.is_some() {
                status.last_handled.clone_from(&found.handled);
            }
            // None while suspended: no schedule is on the server.
            status.next_run = found.next.map(Time);
            status.subject = Some(found.subject.clone());
        }
        Err(problem) => {
            conditions::set(
                &mut status.conditions,
                conditions::READY,
                Status::False,
                problem.reason,
                problem.message.clone(),
                generation,
                now,
            );
            status.next_run = None;
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor::names::QueueRef;
    use conveyor_crds::JobTemplate;

    fn spec(schedule: &str, zone: Option<&str>) -> JobScheduleSpec {
        JobScheduleSpec {
            schedule: schedule.into(),
            time_zone: zone.map(str::to_owned),
            job: JobTemplate {
                queue: "q".into(),
                payload: Some("hello".into()),
                ..Default::default()
            },
            suspend: false,
            concurrency_policy: Default::default(),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn bad_specs_name_the_reason() {
        let err = desired("s", &spec("61 * * * *", None)).unwrap_err();
        assert_eq!(err.reason, reason::INVALID_SCHEDULE);
        let err = desired("s", &spec("0 3 * * *", Some("Mars/Olympus"))).unwrap_err();
        assert_eq!(err.reason, reason::INVALID_TIME_ZONE);
        assert!(err.message.contains("Mars/Olympus"), "{}", err.message);
        let mut timeout = spec("@hourly", None);
        timeout.job.timeout = Some("0s".into());
        assert_eq!(
            desired("s", &timeout).unwrap_err().reason,
            reason::INVALID_SPEC
        );
        let long = "x".repeat(201);
        assert_eq!(
            desired(&long, &spec("@hourly", None)).unwrap_err().reason,
            reason::INVALID_SPEC
        );
    }

    #[test]
    fn a_job_over_max_job_size_or_a_missing_level_does_not_fit() {
        let (pattern, template) = desired("s", &spec("@every 1s", None)).unwrap();
        let message =
            ScheduleMessage::new(&QueueRef::new("ns", "q"), "s", &pattern, &template, false);
        let mut queue: JobQueueSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(fits(&queue, &template, &message).is_ok());
        queue.stream.max_job_size = Some(64);
        assert_eq!(
            fits(&queue, &template, &message).unwrap_err().reason,
            reason::JOB_TOO_LARGE
        );
        queue.stream.max_job_size = None;
        let high = Template {
            priority: 1,
            ..template
        };
        assert_eq!(
            fits(&queue, &high, &message).unwrap_err().reason,
            reason::INVALID_SPEC
        );
    }

    #[test]
    fn an_interval_runs_on_the_whole_second_after_it_was_written() {
        let every = Pattern::parse("@every 7s", None).unwrap();
        let since = ts("2026-12-01T23:06:04.76Z");
        let now = ts("2026-12-01T23:06:05Z");
        assert_eq!(
            next_run(&every, None, since, now),
            Some(ts("2026-12-01T23:06:12Z"))
        );
        let last = LastRun {
            job_id: "s@2026-12-01T23:06:12Z".into(),
            slot: ts("2026-12-01T23:06:12Z"),
            next: Some(ts("2026-12-01T23:06:19Z")),
        };
        assert_eq!(
            next_run(&every, Some(&last), since, now),
            Some(ts("2026-12-01T23:06:19Z"))
        );
        let cron = Pattern::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            next_run(&cron, None, since, now),
            Some(ts("2026-12-02T08:00:00Z"))
        );
    }

    #[test]
    fn status_keeps_the_last_run_through_a_problem() {
        let found = Ok(Found {
            subject: "conveyor.ns.q.schedule.73".into(),
            suspended: false,
            last: Some((
                LastRun {
                    job_id: "s@2026-12-01T23:06:12Z".into(),
                    slot: ts("2026-12-01T23:06:12Z"),
                    next: None,
                },
                None,
            )),
            next: Some(ts("2026-12-01T23:06:19Z")),
            skipped: false,
            handled: None,
            outcome: None,
            fresh: None,
        });
        let now = ts("2026-12-01T23:06:13Z");
        let ready = compute_status(None, Some(1), &found, now);
        assert_eq!(ready.conditions[0].reason, reason::SCHEDULED);
        assert_eq!(
            ready.last_run.as_ref().unwrap().job_id,
            "s@2026-12-01T23:06:12Z"
        );
        let down = compute_status(
            Some(&ready),
            Some(1),
            &Err(Problem::new(reason::NATS_UNAVAILABLE, "down")),
            now,
        );
        assert_eq!(down.conditions[0].status, "False");
        assert_eq!(down.last_run, ready.last_run);
        assert_eq!(down.next_run, None);
        assert_eq!(
            compute_status(Some(&ready), Some(1), &found, now),
            ready,
            "stable"
        );
    }
}
