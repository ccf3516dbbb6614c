//! The pure half of the JobSchedule controller: reading the spec into the schedule the server
//! runs, checking it against its queue, the next run, and the status.

use std::time::Duration;

use bytes::Bytes;
use conveyor::protocol::{self, block};
use conveyor::schedule::{self, LastRun, Pattern, ScheduleMessage, Template};
use conveyor_crds::schedule::STARTING_DEADLINE;
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

    /// Every reason above.
    pub const ALL: [&str; 10] = [
        SCHEDULED,
        SUSPENDED,
        INVALID_SCHEDULE,
        INVALID_TIME_ZONE,
        INVALID_SPEC,
        QUEUE_NOT_FOUND,
        JOB_TOO_LARGE,
        UNSUPPORTED_SERVER,
        NATS_UNAVAILABLE,
        SCHEDULE_ERROR,
    ];
}

/// Reasons (CamelCase) of the Events a JobSchedule gets, besides its `Ready` transitions (whose
/// Events carry the condition's reason).
pub mod event {
    /// A run was submitted: by the operator, or seen submitted by the NATS server (`Allow`).
    pub const RUN_SUBMITTED: &str = "RunSubmitted";
    /// `Forbid` skipped a slot: the previous run was still queued or running.
    pub const RUN_SKIPPED: &str = "RunSkipped";
    /// `Replace` cancelled the previous run, still queued or running, for a new one.
    pub const RUN_REPLACED: &str = "RunReplaced";
    /// Slots went by without a run while no operator could submit them, or a run was too late
    /// for `startingDeadline`.
    pub const MISSED_RUNS: &str = "MissedRuns";
}

/// An Event to publish on the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// `Normal` (else `Warning`).
    pub normal: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What happened, for `kubectl describe`.
    pub note: String,
}

impl Notice {
    /// A `Normal` Event.
    pub fn normal(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            normal: true,
            reason,
            note: note.into(),
        }
    }

    /// A `Warning` Event.
    pub fn warning(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            normal: false,
            reason,
            note: note.into(),
        }
    }
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
    /// Slots this reconcile found without a run (skipped by `Forbid`, gone by while no
    /// operator ran, or past `startingDeadline`).
    pub missed: u64,
    /// The newest of them and why (`<job id>: <why>`).
    pub last_missed: Option<String>,
    /// What this reconcile did, as Events.
    pub notices: Vec<Notice>,
    /// The slot this reconcile handled (`Forbid`, `Replace`).
    pub handled: Option<String>,
    /// What became of the last run, when known.
    pub outcome: Option<String>,
    /// When the next run is due.
    pub next: Option<Timestamp>,
}

/// What became of a slot whose `lastHandled` the status already names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Its run (`lastRun`) or why it has none (`lastMissed`) is recorded: nothing to do.
    Recorded,
    /// Neither is: the operator stopped, or its status write failed, between recording the
    /// slot and recording its run. Still within the queue's deduplication window of the slot
    /// (so of any publish of it), submitting it again is a duplicate if it went out.
    Resubmit,
    /// As [`Handled::Resubmit`], past the deduplication window: it is not submitted again
    /// (it may have run once) and counts as missed, for this reason.
    Lost(String),
}

/// What to do about the slot `run` that `status.lastHandled` names already.
pub fn handled_before(
    status: &JobScheduleStatus,
    run: &LastRun,
    now: Timestamp,
    window: Option<Duration>,
) -> Handled {
    let id = run.job_id.as_str();
    let ran = status.last_run.as_ref().is_some_and(|r| r.job_id == id);
    let missed = status
        .last_missed
        .as_deref()
        .and_then(|m| m.split_once(": "))
        .is_some_and(|(missed, _)| missed == id);
    if ran || missed {
        return Handled::Recorded;
    }
    let late = now.duration_since(run.slot);
    let within = window
        .and_then(|w| SignedDuration::try_from(w).ok())
        .is_some_and(|w| late < w);
    if within {
        Handled::Resubmit
    } else {
        Handled::Lost(
            "the slot was recorded as handled but its run was not (the operator stopped or could not write the status in between); past the queue's deduplicationWindow it is not submitted again, so it may not have run".to_owned(),
        )
    }
}

/// What a spec stands for: when, what, and how late a run may still be submitted.
#[derive(Debug, Clone)]
pub struct Desired {
    /// When runs are due.
    pub pattern: Pattern,
    /// What each run submits.
    pub template: Template,
    /// `spec.startingDeadline`.
    pub deadline: Option<Duration>,
}

/// Whether a header name is the broker's (`Nats-`) or Conveyor's (`Conveyor-`), in any case:
/// header names are case-insensitive, so `nats-msg-id` is `Nats-Msg-Id`.
pub fn reserved_header(key: &str) -> bool {
    ["nats-", "conveyor-"].iter().any(|prefix| {
        key.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    })
}

/// What a spec stands for, or the first problem with it.
pub fn desired(name: &str, spec: &JobScheduleSpec) -> Result<Desired, Problem> {
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
        if reserved_header(key) {
            return Err(invalid(format!(
                "job.headers name {key:?} is reserved: names starting with Nats- or Conveyor- (in any case) belong to the broker and Conveyor"
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
    let deadline = match spec.starting_deadline.as_deref() {
        None => None,
        Some(text) => Some(
            conveyor_crds::duration::parse("spec.startingDeadline", text, STARTING_DEADLINE)
                .map_err(|err| invalid(err.to_string()))?,
        ),
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
    Ok(Desired {
        pattern,
        template,
        deadline,
    })
}

/// Whether Events may name each run: slots at least a minute apart (every cron expression and
/// preset, `@every` of 60s or more). A faster schedule would publish an Event a second, each
/// a new one; its runs show in the status only.
pub fn runs_have_events(pattern: &Pattern) -> bool {
    match pattern {
        Pattern::Cron { .. } => true,
        Pattern::Every(every) => *every >= Duration::from_secs(60),
    }
}

/// The slot a job id `<name>@<time>` (or a `lastMissed` text starting with one) names.
pub fn slot_of(id: &str) -> Option<Timestamp> {
    let id = id.split_once(": ").map_or(id, |(id, _)| id);
    id.rsplit_once('@')?.1.parse().ok()
}

/// The slots without a run between the last slot handled and the one at hand: the server
/// keeps only the newest held slot, so those that went by while no operator ran were rolled
/// up. Only slots of the stored schedule count: an `@every` interval restarts when the
/// schedule is written again (`since`, then the first slot is the next whole second after
/// `since` + the interval), and a changed expression has no earlier slots.
pub fn gone_by(
    pattern: &Pattern,
    last_handled: Option<&str>,
    slot: Timestamp,
    since: Timestamp,
) -> u64 {
    let Some(handled) = last_handled.and_then(slot_of) else {
        return 0;
    };
    let start = match pattern {
        // The first slot of the stored schedule, less one interval: slots after it count.
        Pattern::Every(every) => next_run(pattern, None, since, since)
            .and_then(|first| {
                first
                    .checked_sub(SignedDuration::try_from(*every).ok()?)
                    .ok()
            })
            .unwrap_or(since),
        Pattern::Cron { .. } => since,
    };
    pattern.slots_between(handled.max(start), slot)
}

/// The `Ready` message of a running schedule, naming the last slot without a run while no run
/// came after it.
fn scheduled_message(status: &JobScheduleStatus, subject: &str) -> String {
    let base = format!("the NATS server runs the schedule {subject}");
    let last_run = status.last_run.as_ref().map(|r| r.time.0);
    match &status.last_missed {
        Some(missed) if slot_of(missed) > last_run => format!("{base}; no run for {missed}"),
        _ => base,
    }
}

/// The Events of a reconcile's status change: each `Ready` transition (a new reason), with the
/// condition's reason and message.
pub fn transitions(old: Option<&JobScheduleStatus>, new: &JobScheduleStatus) -> Vec<Notice> {
    let ready = |s: &JobScheduleStatus| {
        conditions::find(&s.conditions, conditions::READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let before = old.and_then(ready);
    let Some((status, reason, message)) = ready(new) else {
        return Vec::new();
    };
    if before
        .as_ref()
        .is_some_and(|(s, r, _)| *s == status && *r == reason)
    {
        return Vec::new();
    }
    let Some(reason) = reason::ALL.iter().copied().find(|r| *r == reason) else {
        return Vec::new();
    };
    if status == "True" {
        vec![Notice::normal(reason, message)]
    } else {
        vec![Notice::warning(reason, message)]
    }
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
                let whole = first
                    .as_second()
                    .saturating_add(i64::from(first.subsec_nanosecond() > 0));
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
            status.missed_runs = status.missed_runs.saturating_add(found.missed);
            if found.last_missed.is_some() {
                status.last_missed.clone_from(&found.last_missed);
            }
            if found.handled.is_some() {
                status.last_handled.clone_from(&found.handled);
            }
            let (reason, message) = if found.suspended {
                (
                    reason::SUSPENDED,
                    "suspended: the NATS server holds no schedule".to_owned(),
                )
            } else {
                (
                    reason::SCHEDULED,
                    scheduled_message(&status, &found.subject),
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
            starting_deadline: None,
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
    fn reserved_header_prefixes_are_refused_in_any_case() {
        for key in [
            "Nats-Msg-Id",
            "nats-msg-id",
            "NATS-Expected-Stream",
            "conveyor-timeout",
        ] {
            let mut headers = spec("@hourly", None);
            headers.job.headers.insert(key.into(), "x".into());
            let err = desired("s", &headers).unwrap_err();
            assert_eq!(err.reason, reason::INVALID_SPEC, "{key}");
            assert!(err.message.contains("reserved"), "{key}: {}", err.message);
        }
        let mut fine = spec("@hourly", None);
        fine.job.headers.insert("natsy-thing".into(), "x".into());
        fine.job.headers.insert("X-Nats-Id".into(), "x".into());
        assert!(desired("s", &fine).is_ok());
    }

    #[test]
    fn a_job_over_max_job_size_or_a_missing_level_does_not_fit() {
        let Desired {
            pattern, template, ..
        } = desired("s", &spec("@every 1s", None)).unwrap();
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
    fn a_slot_handled_without_a_recorded_run_is_resubmitted_only_within_the_dedup_window() {
        let run = LastRun {
            job_id: "s@2026-12-01T10:00:00Z".into(),
            slot: ts("2026-12-01T10:00:00Z"),
            next: None,
        };
        let mut status = JobScheduleStatus {
            last_handled: Some(run.job_id.clone()),
            last_run: Some(ScheduleRun {
                time: Time(ts("2026-12-01T09:00:00Z")),
                job_id: "s@2026-12-01T09:00:00Z".into(),
                sequence: Some(4),
                outcome: None,
            }),
            ..Default::default()
        };
        let window = Some(Duration::from_secs(120));
        let soon = ts("2026-12-01T10:01:00Z");
        let later = ts("2026-12-01T10:02:00Z");
        assert_eq!(
            handled_before(&status, &run, soon, window),
            Handled::Resubmit
        );
        // Past the window a publish would not be a duplicate: lost, not run twice.
        assert!(matches!(
            handled_before(&status, &run, later, window),
            Handled::Lost(_)
        ));
        assert!(matches!(
            handled_before(&status, &run, soon, None),
            Handled::Lost(_)
        ));
        // A recorded skip, or the run itself, is done with.
        status.last_missed = Some(format!("{}: past startingDeadline 30s", run.job_id));
        assert_eq!(
            handled_before(&status, &run, later, window),
            Handled::Recorded
        );
        status.last_missed = Some("s@2026-12-01T10:00:00Zx: other".into());
        assert!(matches!(
            handled_before(&status, &run, later, window),
            Handled::Lost(_)
        ));
        status.last_run.as_mut().unwrap().job_id = run.job_id.clone();
        assert_eq!(
            handled_before(&status, &run, later, window),
            Handled::Recorded
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
            missed: 0,
            last_missed: None,
            notices: Vec::new(),
            handled: None,
            outcome: None,
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

    #[test]
    fn a_starting_deadline_is_read_with_its_bounds() {
        let mut late = spec("@hourly", None);
        late.starting_deadline = Some("90s".into());
        assert_eq!(
            desired("s", &late).unwrap().deadline,
            Some(Duration::from_secs(90))
        );
        late.starting_deadline = Some("0s".into());
        let err = desired("s", &late).unwrap_err();
        assert_eq!(err.reason, reason::INVALID_SPEC);
        assert!(err.message.contains("startingDeadline"), "{}", err.message);
    }

    #[test]
    fn slots_gone_by_count_from_the_last_handled_one_within_the_stored_schedule() {
        let every = Pattern::parse("@every 1s", None).unwrap();
        let since = ts("2026-12-01T10:00:00.4Z");
        let slot = ts("2026-12-01T10:00:10Z");
        // Handled 10:00:03, now at 10:00:10: 10:00:04 to 10:00:09 went by.
        assert_eq!(
            gone_by(&every, Some("s@2026-12-01T10:00:03Z"), slot, since),
            6
        );
        assert_eq!(gone_by(&every, None, slot, since), 0, "a first run");
        // Written again at 10:00:07.5: its first slot is 10:00:09, so only that one counts.
        let again = ts("2026-12-01T10:00:07.5Z");
        assert_eq!(
            gone_by(&every, Some("s@2026-12-01T10:00:03Z"), slot, again),
            1
        );
        let hourly = Pattern::parse("@hourly", None).unwrap();
        assert_eq!(
            gone_by(
                &hourly,
                Some("s@2026-12-01T07:00:00Z"),
                ts("2026-12-01T10:00:00Z"),
                ts("2026-11-30T00:00:00Z")
            ),
            2
        );
    }

    #[test]
    fn the_ready_message_names_a_missed_slot_until_a_run_follows() {
        let subject = "conveyor.ns.q.schedule.73";
        let mut status = JobScheduleStatus {
            last_missed: Some("s@2026-12-01T10:00:10Z: 12s late, past startingDeadline 3s".into()),
            ..Default::default()
        };
        assert_eq!(
            scheduled_message(&status, subject),
            "the NATS server runs the schedule conveyor.ns.q.schedule.73; no run for s@2026-12-01T10:00:10Z: 12s late, past startingDeadline 3s"
        );
        status.last_run = Some(ScheduleRun {
            time: Time(ts("2026-12-01T10:00:20Z")),
            job_id: "s@2026-12-01T10:00:20Z".into(),
            sequence: Some(4),
            outcome: None,
        });
        assert_eq!(
            scheduled_message(&status, subject),
            "the NATS server runs the schedule conveyor.ns.q.schedule.73"
        );
    }

    #[test]
    fn ready_transitions_are_events_and_a_steady_state_is_not() {
        let now = ts("2026-12-01T10:00:00Z");
        let bad = compute_status(
            None,
            Some(1),
            &Err(Problem::new(
                reason::INVALID_SCHEDULE,
                "invalid schedule \"61 * * * *\"",
            )),
            now,
        );
        let notices = transitions(None, &bad);
        assert_eq!(
            notices,
            vec![Notice::warning(
                reason::INVALID_SCHEDULE,
                "invalid schedule \"61 * * * *\""
            )]
        );
        assert!(transitions(Some(&bad), &bad).is_empty());
        let found = Ok(Found {
            subject: "conveyor.ns.q.schedule.73".into(),
            suspended: false,
            last: None,
            next: None,
            missed: 0,
            last_missed: None,
            notices: Vec::new(),
            handled: None,
            outcome: None,
        });
        let good = compute_status(Some(&bad), Some(2), &found, now);
        let notices = transitions(Some(&bad), &good);
        assert_eq!(notices.len(), 1);
        assert!(notices[0].normal);
        assert_eq!(notices[0].reason, reason::SCHEDULED);
        let every = |s: &str| runs_have_events(&Pattern::parse(s, None).unwrap());
        assert!(every("@every 1m") && every("* * * * *") && !every("@every 59s"));
    }
}
