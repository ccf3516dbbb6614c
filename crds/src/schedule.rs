//! `JobSchedule`: a recurring job. The operator turns it into a NATS message schedule in the
//! queue's delayed stream, so the broker submits the runs (also while the operator is down);
//! see `docs/schedules.md`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bounds;
use crate::duration::{self, Bounds};

/// CEL rule of `spec.schedule`: a preset, `@every <h/m/s duration>`, or five cron fields of
/// digits, names and `*,/-`. It judges the form only; the operator's cron parser and the NATS
/// server judge the values (`Ready=False`, `InvalidSchedule`).
pub const CRON_RULE: &str = "self.matches('^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$') || (self.matches('^@every ([0-9]{1,5}h)?([0-9]{1,6}m)?([0-9]{1,8}s)?$') && self != '@every ') || self.matches('^[0-9A-Za-z*,/-]+( +[0-9A-Za-z*,/-]+){4}$')";

/// CEL rule of `spec.schedule`: an `@every` interval of at most 8760h (365 days,
/// `conveyor::schedule::MAX_INTERVAL`). It judges only what [`CRON_RULE`] admits as an
/// interval, whose digits keep it inside Go's duration range, so `duration()` never fails.
pub const EVERY_RULE: &str = "!self.matches('^@every ([0-9]{1,5}h)?([0-9]{1,6}m)?([0-9]{1,8}s)?$') || self == '@every ' || duration(self.substring(7)).getMilliseconds() <= 31536000000";

/// Range of `spec.startingDeadline`.
pub const STARTING_DEADLINE: Bounds = Bounds::new("1s", "3650d");

/// A job submitted on a schedule (cron with a time zone, a preset, or a fixed interval).
// Each `printcolumn(...)` repeats `type_ = ...`, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "conveyor.dev",
    version = "v1alpha1",
    kind = "JobSchedule",
    plural = "jobschedules",
    singular = "jobschedule",
    namespaced,
    doc = "A job submitted to a JobQueue on a schedule, run by the NATS server's message schedules.",
    status = "JobScheduleStatus",
    derive = "PartialEq",
    shortname = "jsch",
    category = "conveyor",
    printcolumn(
        name = "Queue",
        type_ = "string",
        json_path = ".spec.job.queue",
        description = "The JobQueue the runs are submitted to"
    ),
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        description = "Cron expression, preset or @every interval"
    ),
    printcolumn(
        name = "Suspend",
        type_ = "boolean",
        json_path = ".spec.suspend",
        description = "Whether runs are paused"
    ),
    printcolumn(
        name = "Last",
        type_ = "date",
        json_path = ".status.lastRun.time",
        description = "When the last run was submitted"
    ),
    printcolumn(
        name = "Next",
        type_ = "string",
        json_path = ".status.nextRun",
        description = "When the next run is due"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#,
        description = "Whether the NATS server holds the schedule as specified"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
        description = "Why the schedule is or is not ready"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.timeZone) || !self.schedule.startsWith('@every')").message("timeZone applies to cron expressions and presets, not to @every intervals"))]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct JobScheduleSpec {
    /// When runs are due: five cron fields (`minute hour day-of-month month day-of-week`,
    /// e.g. `30 4 * * mon-fri`; names, lists, ranges and steps as in crontab(5)), a preset
    /// (`@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`), or a
    /// fixed interval `@every <duration>` with units h, m, s in that order (e.g. `@every 90s`,
    /// `@every 1h30m`; 1s to 8760h). An `@every` interval counts from when the schedule was
    /// (re)created. At most 128 characters.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(CRON_RULE).message("schedule must be five cron fields (minute hour day-of-month month day-of-week), a preset (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly) or @every <duration> with units h, m, s (e.g. @every 90s)"))]
    #[x_kube(validation = Rule::new(EVERY_RULE).message("an @every interval must be at most 8760h (365 days); use a cron expression such as @yearly for rarer runs"))]
    pub schedule: String,

    /// IANA time zone the cron expression or preset is read in, e.g. `Europe/Berlin`;
    /// `UTC` when absent. Across a daylight-saving change a run is due at the wall-clock time
    /// the expression names in that zone. Not allowed with `@every`. An unknown zone makes
    /// `Ready` `False` with reason `InvalidTimeZone`. At most 64 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), pattern("^[A-Za-z][A-Za-z0-9_+/-]*$"))]
    pub time_zone: Option<String>,

    /// The job each run submits.
    pub job: JobTemplate,

    /// What a run does when the previous one is still queued or running: `Allow` (the
    /// default) submits it anyway, and the NATS server submits every run on its own, also
    /// while the operator is down; `Forbid` skips it (counted in `status.missedRuns`);
    /// `Replace` cancels the previous run and submits the new one. With `Forbid` and
    /// `Replace` the server still keeps time, but the operator submits each run (at most once
    /// per slot, as the job id names the slot), so runs wait while no operator runs: once it
    /// is back it submits the newest slot only (if within `startingDeadline`) and counts the
    /// others in `status.missedRuns`.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,

    /// How late a run may still be submitted, 1s to 3650d (`30s`, `5m`, `1h`, `2d`). When
    /// set, the operator submits each run (as under `Forbid` and `Replace`, the NATS server
    /// keeps time) so that it can judge lateness: a run not submitted at its slot because no
    /// operator was running is submitted once when the operator is back, the newest missed
    /// slot only, if that slot is at most this long ago; otherwise it is skipped. Skipped
    /// slots count in `status.missedRuns`, raise a `MissedRuns` Event and are named in the
    /// `Ready` message. Without it the newest missed slot always runs once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(duration::PATTERN), length(min = duration::MIN_LENGTH, max = duration::MAX_LENGTH))]
    #[x_kube(validation = STARTING_DEADLINE.rule("startingDeadline"))]
    pub starting_deadline: Option<String>,

    /// Pauses the schedule: while `true` the NATS server holds no schedule and submits
    /// nothing. Setting it back to `false` starts afresh from that moment, without catching
    /// up on the runs skipped meanwhile.
    #[serde(default)]
    pub suspend: bool,
}

/// Whether runs of a schedule may overlap.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConcurrencyPolicy {
    /// Every run is submitted, by the NATS server, whatever the previous one is doing.
    #[default]
    Allow,
    /// A run is skipped while the previous one is still queued or running.
    Forbid,
    /// The previous run is cancelled if it is still queued or running, then the new one is
    /// submitted.
    Replace,
}

/// What each run of a schedule submits.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplate {
    /// Name of the `JobQueue` in the schedule's namespace that the runs go to.
    #[schemars(length(min = 1, max = 253))]
    pub queue: String,

    /// The job's payload, as text (UTF-8); empty when absent. Payload and headers together
    /// must fit the queue's `stream.maxJobSize`, else `Ready` is `False` with reason
    /// `JobTooLarge`. At most 1 MiB here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1048576))]
    pub payload: Option<String>,

    /// Headers the handler reads, name to value. Names starting with `Nats-` or `Conveyor-`
    /// in any case (`nats-msg-id` too: header names are case-insensitive) are reserved for the
    /// broker and Conveyor and refused. At most 32 headers; a name is
    /// visible ASCII without `:`, a value one line (else `Ready` is `False` with reason
    /// `InvalidSpec`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new("self.all(k, !k.lowerAscii().startsWith('nats-') && !k.lowerAscii().startsWith('conveyor-'))").message("job.headers names must not start with Nats- or Conveyor- (in any case)"))]
    pub headers: BTreeMap<String, String>,

    /// Priority level of the runs, 0 (lowest, the default) to the queue's `priorities` - 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 9))]
    pub priority: Option<u8>,

    /// Most deliveries of each run, 1 to 1000; at most the queue's `retry.maxAttempts`
    /// counts. The queue's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = bounds::MAX_ATTEMPTS))]
    pub max_attempts: Option<i32>,

    /// Processing timeout of one attempt of each run, 1ms to 168h; the queue's `timeout` when
    /// absent. Format: `500ms`, `30s`, `5m`, `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 16), pattern("^[0-9]{1,9}(ms|s|m|h)$"))]
    pub timeout: Option<String>,
}

/// Observed state of a `JobSchedule`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[schemars(transform = crate::schema::kubernetes_formats)]
#[serde(rename_all = "camelCase")]
pub struct JobScheduleStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` is `True` when the NATS server holds the schedule as specified (reason
    /// `Scheduled`) or holds none because it is suspended (`Suspended`); otherwise its reason
    /// (`InvalidSchedule`, `InvalidTimeZone`, `QueueNotFound`, `JobTooLarge`,
    /// `UnsupportedServer`, `NatsUnavailable`, `ScheduleError`) and message say what is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The last run the NATS server submitted (read from the queue's delayed stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<ScheduleRun>,

    /// Slots that got no run: skipped under `concurrencyPolicy: Forbid` because the previous
    /// run was still queued or running, and, where the operator submits the runs (`Forbid`,
    /// `Replace`, or a `startingDeadline`), slots that went by while no operator was running
    /// (only the newest is run, if within `startingDeadline`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub missed_runs: u64,

    /// The last slot that got no run and why, e.g. `nightly@2026-12-02T01:30:00Z: 95s late,
    /// past startingDeadline 1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_missed: Option<String>,

    /// The job id of the last slot the operator handled (submitted, skipped or replaced the
    /// previous run for) where it submits the runs (`Forbid`, `Replace`, a
    /// `startingDeadline`), so a restarted operator never handles a slot twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled: Option<String>,

    /// When the next run is due; absent while suspended or not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,

    /// Subject of the message schedule in the queue's delayed stream, for `nats` CLI users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// One run of a schedule.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRun {
    /// The slot the run was due at.
    pub time: Time,
    /// The job id of the run: `<schedule name>@<slot time>`, e.g.
    /// `nightly@2026-03-29T01:30:00Z`.
    pub job_id: String,
    /// Its sequence in the queue's work stream, when the operator submitted it (`Forbid`,
    /// `Replace`, a `startingDeadline`): while the stream still holds it, the run is queued
    /// or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// What became of it, when known: `Pending` (still queued or running; known where the
    /// operator submits the runs), `Completed`, `DeadLettered` or `Cancelled` (from the queue's
    /// stored results, so only with `results.retention` on the queue), or `Finished` (no longer
    /// queued, outcome not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
