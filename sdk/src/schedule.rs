//! Recurring jobs as NATS message schedules (ADR-51, nats-server 2.14+ for cron with time zones
//! and `@every`): a schedule is one message on `<prefix>.schedule.<hex name>` in the queue's
//! delayed stream; at each slot the server writes a copy (a *tick*) to
//! `<prefix>.tick.<level>.<hex name>`, which the work stream sources as a job of that level.
//! The server runs the schedule on its own, so runs happen while no operator is up and survive
//! server restarts. `docs/schedules.md` and `docs/protocol.md` say the same in prose.
//!
//! A tick carries the schedule message's headers (less the `Nats-Schedule*` ones) plus
//! `Nats-Scheduler` and `Nats-Schedule-Next`, never a `Nats-Msg-Id`. Its job id names its
//! slot: `<schedule name>@<slot time>`, where the slot is the occurrence of the schedule just
//! before `Nats-Schedule-Next` ([`tick_id`]); [`protocol::envelope`](crate::protocol::envelope)
//! reads it, so workers, the dispatcher and the CLI all agree on it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::names::QueueRef;
use crate::protocol;

/// Oldest NATS server release whose message schedules take cron expressions, `@every` and
/// `Nats-Schedule-Time-Zone`.
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 14);

/// The name of the schedule a job comes from; with [`SPEC`] it makes a tick's job id.
pub const NAME: &str = "Conveyor-Schedule";
/// The schedule's pattern as the server runs it (`@every 5s`, or six cron fields).
pub const SPEC: &str = "Conveyor-Schedule-Spec";
/// The IANA zone of a cron pattern (absent: UTC).
pub const TIME_ZONE: &str = "Conveyor-Schedule-Time-Zone";
/// Server header: the zone a cron `Nats-Schedule` is read in.
pub const NATS_TIME_ZONE: &str = "Nats-Schedule-Time-Zone";
/// Server header on a tick: the subject of the schedule that wrote it.
pub const NATS_SCHEDULER: &str = "Nats-Scheduler";
/// Server header on a tick: when the schedule fires next (RFC 3339, whole seconds).
pub const NATS_NEXT: &str = "Nats-Schedule-Next";
/// Server header: a rollup on the generated message, so a tick subject keeps only the last.
pub const NATS_ROLLUP: &str = "Nats-Schedule-Rollup";
/// Longest schedule name: the job id `<name>@<20-character time>` must fit 256 bytes.
pub const MAX_NAME: usize = 200;

/// Shortest `@every` interval: the server fires on whole seconds.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Longest `@every` interval: 8760h (365 days). An interval counts from when the schedule was
/// (re)written, so a longer one would restart at every change of the resource before it ever
/// fired; a yearly or rarer run is a cron expression's job (`@yearly`, `0 0 1 1 *`). The bound
/// also keeps the interval far inside the server's own duration range (Go's, ~292 years).
pub const MAX_INTERVAL: Duration = Duration::from_secs(8760 * 3600);

/// Most slots [`Pattern::slots_between`] counts one by one (a cron pattern), so that a long
/// outage costs a bounded reconcile; past it the count is given as this many ("at least").
/// A week of minutes is 10,080.
pub const MAX_COUNTED_SLOTS: u64 = 10_000;

/// A schedule that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The pattern does not parse.
    #[error("invalid schedule {value:?}: {reason}")]
    Invalid {
        /// The pattern as given.
        value: String,
        /// What the parser said.
        reason: String,
    },
    /// The time zone is not in the time zone database.
    #[error("unknown time zone {0:?} (expected an IANA name such as Europe/Berlin)")]
    TimeZone(String),
    /// A time zone with an `@every` interval (the server refuses it).
    #[error("a time zone applies to cron expressions and presets, not to @every intervals")]
    ZoneWithInterval,
    /// The server cannot run schedules.
    #[error(
        "NATS server version {0:?} cannot run cron or @every schedules; JobSchedules need {major}.{minor} or newer",
        major = MIN_SERVER_VERSION.0,
        minor = MIN_SERVER_VERSION.1
    )]
    UnsupportedServer(String),
}

/// When the runs of a schedule are due.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// A cron expression (six fields, seconds first) in a time zone.
    Cron {
        /// The six fields as the server reads them.
        fields: String,
        /// The parsed expression.
        cron: Box<Cron>,
        /// The zone the fields are read in.
        zone: TimeZone,
        /// The zone's IANA name, when not UTC by default.
        zone_name: Option<String>,
    },
    /// A fixed interval.
    Every(Duration),
}

impl Pattern {
    /// Reads a `JobSchedule` schedule: five cron fields, a preset (`@hourly` …) or
    /// `@every <n>h<n>m<n>s`, with an optional IANA zone (cron and presets only).
    pub fn parse(schedule: &str, zone: Option<&str>) -> Result<Self, ScheduleError> {
        let invalid = |reason: &str| ScheduleError::Invalid {
            value: schedule.to_owned(),
            reason: reason.to_owned(),
        };
        let schedule = schedule.trim();
        if let Some(interval) = schedule.strip_prefix("@every ") {
            if zone.is_some() {
                return Err(ScheduleError::ZoneWithInterval);
            }
            let every = interval_of(interval.trim()).map_err(invalid)?;
            return Ok(Self::Every(every));
        }
        let fields = match schedule {
            "@yearly" | "@annually" => "0 0 0 1 1 *".to_owned(),
            "@monthly" => "0 0 0 1 * *".to_owned(),
            "@weekly" => "0 0 0 * * 0".to_owned(),
            "@daily" | "@midnight" => "0 0 0 * * *".to_owned(),
            "@hourly" => "0 0 * * * *".to_owned(),
            other if other.starts_with('@') => {
                return Err(invalid(
                    "unknown preset (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or @every <duration>)",
                ));
            }
            other => {
                let parts: Vec<&str> = other.split_whitespace().collect();
                if parts.len() != 5 {
                    return Err(invalid(
                        "expected five fields: minute hour day-of-month month day-of-week",
                    ));
                }
                format!("0 {}", parts.join(" "))
            }
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .build()
            .parse(&fields)
            .map_err(|e| invalid(&e.to_string()))?;
        let (zone, zone_name) = match zone {
            None => (TimeZone::UTC, None),
            Some(name) => (
                TimeZone::get(name).map_err(|_| ScheduleError::TimeZone(name.to_owned()))?,
                Some(name.to_owned()),
            ),
        };
        Ok(Self::Cron {
            fields,
            cron: Box::new(cron),
            zone,
            zone_name,
        })
    }

    /// The `Nats-Schedule` value: `@every <seconds>s` or the six cron fields.
    pub fn server_pattern(&self) -> String {
        match self {
            Self::Cron { fields, .. } => fields.clone(),
            Self::Every(every) => format!("@every {}s", every.as_secs()),
        }
    }

    /// The first slot after `after`, for a cron pattern; `None` for an interval (its slots
    /// count from when the server took the schedule) or when no slot follows.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Cron { cron, zone, .. } => cron
                .find_next_occurrence(&after.to_zoned(zone.clone()), false)
                .ok()
                .map(|z| z.timestamp()),
            Self::Every(_) => None,
        }
    }

    /// The slot just before `next`: the one a tick whose `Nats-Schedule-Next` is `next` ran
    /// for.
    pub fn slot_before(&self, next: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Cron { cron, zone, .. } => cron
                .find_previous_occurrence(&next.to_zoned(zone.clone()), false)
                .ok()
                .map(|z| z.timestamp()),
            Self::Every(every) => {
                let every = jiff::SignedDuration::try_from(*every).ok()?;
                next.checked_sub(every).ok()
            }
        }
    }

    /// How many slots fall strictly between `after` and `before` (the runs skipped between two
    /// slots): for an interval, counted from `after` in steps of the interval; for cron, one by
    /// one, at most [`MAX_COUNTED_SLOTS`].
    pub fn slots_between(&self, after: Timestamp, before: Timestamp) -> u64 {
        if before <= after {
            return 0;
        }
        match self {
            Self::Every(every) => {
                let span = before.duration_since(after).as_secs();
                let step = i64::try_from(every.as_secs().max(1)).unwrap_or(i64::MAX);
                // Slots at after + k·step for k ≥ 1, strictly before `before`.
                u64::try_from((span - 1).max(0) / step).unwrap_or(0)
            }
            Self::Cron { .. } => {
                let mut n = 0;
                let mut at = after;
                while let Some(next) = self.next_after(at) {
                    if next >= before || n >= MAX_COUNTED_SLOTS {
                        break;
                    }
                    n += 1;
                    at = next;
                }
                n
            }
        }
    }

    /// The zone's IANA name, for cron patterns with an explicit zone.
    pub fn zone_name(&self) -> Option<&str> {
        match self {
            Self::Cron { zone_name, .. } => zone_name.as_deref(),
            Self::Every(_) => None,
        }
    }
}

/// `@every` interval syntax: `<n>h<n>m<n>s` groups in that order, at least one, at least 1s.
fn interval_of(value: &str) -> Result<Duration, &'static str> {
    let mut rest = value;
    let mut total: u64 = 0;
    let mut next_unit = 0;
    if rest.is_empty() {
        return Err("@every needs a duration, e.g. @every 90s");
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 8 {
            return Err("expected <number><unit> groups with units h, m, s in that order");
        }
        let n: u64 = rest[..digits].parse().map_err(|_| "too many digits")?;
        let unit = rest[digits..].chars().next();
        let (pos, secs) = match unit {
            Some('h') => (0, 3600),
            Some('m') => (1, 60),
            Some('s') => (2, 1),
            _ => return Err("expected <number><unit> groups with units h, m, s in that order"),
        };
        if pos < next_unit {
            return Err("units out of order or repeated (h, m, s in that order)");
        }
        next_unit = pos + 1;
        total = total.saturating_add(n.saturating_mul(secs));
        rest = &rest[digits + 1..];
    }
    if total < MIN_INTERVAL.as_secs() {
        return Err("the interval must be at least 1s");
    }
    if total > MAX_INTERVAL.as_secs() {
        return Err(
            "the interval must be at most 8760h (365 days); use a cron expression such as @yearly for rarer runs",
        );
    }
    Ok(Duration::from_secs(total))
}

/// Checks that a server (its reported version, e.g. `2.15.1`) runs cron and `@every`
/// schedules.
pub fn check_server_version(version: &str) -> Result<(), ScheduleError> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= MIN_SERVER_VERSION => Ok(()),
        _ => Err(ScheduleError::UnsupportedServer(version.to_owned())),
    }
}

/// The job id of a run: `<schedule name>@<slot time, RFC 3339 UTC>`.
pub fn job_id(name: &str, slot: Timestamp) -> String {
    format!("{name}@{}", slot.strftime("%Y-%m-%dT%H:%M:%SZ"))
}

/// The job id of a tick: its schedule's name and the slot before its `Nats-Schedule-Next`;
/// `None` when it is not a tick of a Conveyor schedule or a header does not read.
pub fn tick_id(headers: &HeaderMap) -> Option<String> {
    headers.get(NATS_SCHEDULER)?;
    let name = headers.get(NAME)?.as_str();
    let spec = headers.get(SPEC)?.as_str();
    let zone = headers.get(TIME_ZONE).map(|z| z.as_str());
    let next: Timestamp = headers.get(NATS_NEXT)?.as_str().parse().ok()?;
    let pattern = if let Some(every) = spec.strip_prefix("@every ") {
        Pattern::Every(interval_of(every).ok()?)
    } else {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .build()
            .parse(spec)
            .ok()?;
        let zone_db = match zone {
            Some(name) => TimeZone::get(name).ok()?,
            None => TimeZone::UTC,
        };
        Pattern::Cron {
            fields: spec.to_owned(),
            cron: Box::new(cron),
            zone: zone_db,
            zone_name: zone.map(str::to_owned),
        }
    };
    Some(job_id(name, pattern.slot_before(next)?))
}

/// A schedule's name as one subject token: its bytes in lowercase hex.
fn hex_token(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Subject of a schedule's message in the delayed stream: `<prefix>.schedule.<hex name>`.
pub fn schedule_subject(queue: &QueueRef, name: &str) -> String {
    format!("{}.schedule.{}", queue.subject_prefix(), hex_token(name))
}

/// Subjects of a queue's schedules in its delayed stream.
pub fn schedules_wildcard(queue: &QueueRef) -> String {
    format!("{}.schedule.*", queue.subject_prefix())
}

/// Subject a schedule's ticks are written to: `<prefix>.tick.<level>.<hex name>` (the work
/// stream sources it as `<prefix>.jobs.<level>`); only the last tick is kept.
pub fn tick_subject(queue: &QueueRef, level: u8, name: &str) -> String {
    format!(
        "{}.tick.{level}.{}",
        queue.subject_prefix(),
        hex_token(name)
    )
}

/// Subjects of a queue's ticks in its delayed stream.
pub fn ticks_wildcard(queue: &QueueRef) -> String {
    format!("{}.tick.*.*", queue.subject_prefix())
}

/// Subject the ticks of a `Forbid` or `Replace` schedule are written to:
/// `<prefix>.hold.<level>.<hex name>`. The work stream does not source it: the operator
/// reads the newest tick and submits the run itself ([`submit_tick`]) when the policy allows.
pub fn hold_subject(queue: &QueueRef, level: u8, name: &str) -> String {
    format!(
        "{}.hold.{level}.{}",
        queue.subject_prefix(),
        hex_token(name)
    )
}

/// Subjects of a queue's held ticks in its delayed stream.
pub fn holds_wildcard(queue: &QueueRef) -> String {
    format!("{}.hold.*.*", queue.subject_prefix())
}

/// What a run submits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Template {
    /// Priority level.
    pub priority: u8,
    /// Payload bytes.
    pub payload: Bytes,
    /// The handler's own headers.
    pub headers: Vec<(String, String)>,
    /// Per-job attempts cap.
    pub max_attempts: Option<u32>,
    /// Per-job attempt timeout, as the `Conveyor-Timeout` header reads it (`30s`).
    pub timeout: Option<String>,
}

/// The message that holds a schedule: subject, headers and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleMessage {
    /// `<prefix>.schedule.<hex name>`.
    pub subject: String,
    /// Server schedule headers, Conveyor's schedule headers and the job's headers.
    pub headers: HeaderMap,
    /// The job's payload.
    pub payload: Bytes,
}

impl ScheduleMessage {
    /// The schedule message of `name` on `queue` with `pattern` and `job`; `held` writes the
    /// ticks to [`hold_subject`] for the operator instead of straight to the queue.
    pub fn new(
        queue: &QueueRef,
        name: &str,
        pattern: &Pattern,
        job: &Template,
        held: bool,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            protocol::schedule::SCHEDULE,
            pattern.server_pattern().as_str(),
        );
        let target = if held {
            hold_subject(queue, job.priority, name)
        } else {
            tick_subject(queue, job.priority, name)
        };
        headers.insert(protocol::schedule::TARGET, target.as_str());
        // A tick waits in the delayed stream until the work stream sourced it; the rollup
        // keeps one per schedule, so missed slots of a full queue collapse into one run.
        headers.insert(protocol::schedule::TTL, protocol::schedule::DUE_TTL);
        headers.insert(NATS_ROLLUP, "sub");
        if let Some(zone) = pattern.zone_name() {
            headers.insert(NATS_TIME_ZONE, zone);
            headers.insert(TIME_ZONE, zone);
        }
        headers.insert(NAME, name);
        headers.insert(SPEC, pattern.server_pattern().as_str());
        headers.insert(protocol::PRIORITY, job.priority.to_string().as_str());
        if let Some(n) = job.max_attempts {
            headers.insert(protocol::MAX_ATTEMPTS, n.to_string().as_str());
        }
        if let Some(timeout) = &job.timeout {
            headers.insert(protocol::TIMEOUT, timeout.as_str());
        }
        for (name, value) in &job.headers {
            headers.insert(name.as_str(), value.as_str());
        }
        Self {
            subject: schedule_subject(queue, name),
            headers,
            payload: job.payload.clone(),
        }
    }

    /// Bytes the job of each run takes (headers as written on the wire plus payload), for the
    /// queue's `maxJobSize`.
    pub fn job_size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .filter(|(name, _)| !AsRef::<str>::as_ref(name).starts_with("Nats-Schedule"))
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|v| AsRef::<str>::as_ref(name).len() + 2 + v.as_str().len() + 2)
                    .sum::<usize>()
            })
            .sum();
        // `NATS/1.0\r\n` and the closing `\r\n`, plus the headers the server adds to a tick.
        let added = NATS_SCHEDULER.len() + NATS_NEXT.len() + self.subject.len() + 30;
        12 + headers + added + self.payload.len()
    }

    /// Whether a stored schedule message (its headers and payload) is this one.
    pub fn matches(&self, headers: &HeaderMap, payload: &[u8]) -> bool {
        payload == self.payload.as_ref()
            && self.headers.iter().all(|(name, values)| {
                headers
                    .get_all(AsRef::<str>::as_ref(name))
                    .map(|v| v.as_str())
                    .eq(values.iter().map(|v| v.as_str()))
            })
            && headers
                .iter()
                .filter(|(name, _)| !SERVER_ADDED.contains(&AsRef::<str>::as_ref(name)))
                .all(|(name, _)| self.headers.get(AsRef::<str>::as_ref(name)).is_some())
    }
}

/// Headers the server adds to a stored schedule message.
const SERVER_ADDED: [&str; 1] = ["Nats-Rollup"];

/// Failure to read or change a schedule in JetStream.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Publishing the schedule failed or the server refused it (its message).
    #[error("the NATS server refused the schedule: {0}")]
    Refused(String),
    /// A request could not be made (connection, timeout).
    #[error("cannot reach JetStream: {0}")]
    Unavailable(String),
}

/// Makes the delayed stream hold `message` (publishing it only when it differs from the
/// stored one, since republishing restarts an `@every` interval). Returns when the stored
/// schedule message was written: `@every` slots count from then.
pub async fn ensure(
    js: &jetstream::Context,
    queue: &QueueRef,
    message: &ScheduleMessage,
) -> Result<Timestamp, StoreError> {
    let current = crate::stored::last(&js.client(), &queue.delayed_stream(), &message.subject)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    if let Some(current) = current {
        let headers = current.block().header_map();
        if message.matches(&headers, &current.payload)
            && let Ok(written) = current.time.parse::<Timestamp>()
        {
            return Ok(written);
        }
    }
    let published = Timestamp::now();
    let ack = js
        .publish_with_headers(
            message.subject.clone(),
            message.headers.clone(),
            message.payload.clone(),
        )
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    ack.await.map_err(|e| StoreError::Refused(e.to_string()))?;
    Ok(published)
}

/// Removes the schedule `name` of `queue` (nothing more is submitted); true when there was
/// one. Ticks already written still run.
pub async fn remove(
    js: &jetstream::Context,
    queue: &QueueRef,
    name: &str,
) -> Result<bool, StoreError> {
    let stream = match js.get_stream(queue.delayed_stream()).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(false);
        }
        Err(err) => return Err(StoreError::Unavailable(err.to_string())),
    };
    let purged = stream
        .purge()
        .filter(schedule_subject(queue, name))
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(purged.purged > 0)
}

/// The last run the server wrote for schedule `name` at `level`: its job id, slot and the
/// next slot the server announced.
#[derive(Debug, Clone, PartialEq)]
pub struct LastRun {
    /// `<name>@<slot>`.
    pub job_id: String,
    /// The slot it ran for.
    pub slot: Timestamp,
    /// When the server fires next (`Nats-Schedule-Next`).
    pub next: Option<Timestamp>,
}

/// The newest tick of a schedule: its run and the job it carries.
#[derive(Debug, Clone)]
pub struct Tick {
    /// Job id, slot and next slot.
    pub run: LastRun,
    /// The tick's headers.
    pub headers: HeaderMap,
    /// The job's payload.
    pub payload: Bytes,
}

/// Reads the last tick of schedule `name` at `level` (kept after it was sourced, until the
/// next replaces it or it expires), from [`hold_subject`] when `held`.
pub async fn last_tick(
    js: &jetstream::Context,
    queue: &QueueRef,
    level: u8,
    name: &str,
    held: bool,
) -> Result<Option<Tick>, StoreError> {
    let subject = if held {
        hold_subject(queue, level, name)
    } else {
        tick_subject(queue, level, name)
    };
    let tick = crate::stored::last(&js.client(), &queue.delayed_stream(), &subject)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let Some(tick) = tick else {
        return Ok(None);
    };
    let headers = tick.block().header_map();
    let next = headers
        .get(NATS_NEXT)
        .and_then(|v| v.as_str().parse::<Timestamp>().ok());
    let Some(job_id) = tick_id(&headers) else {
        return Ok(None);
    };
    let slot = job_id
        .rsplit_once('@')
        .and_then(|(_, t)| t.parse::<Timestamp>().ok());
    Ok(slot.map(|slot| Tick {
        run: LastRun { job_id, slot, next },
        headers,
        payload: tick.payload,
    }))
}

/// The headers of a run submitted to the work stream: the stored ones without the server's
/// (`Nats-*`, in any case: header names are case-insensitive), with `Nats-Msg-Id` = `id`.
fn run_headers(stored: &HeaderMap, id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (key, values) in stored.iter() {
        let key: &str = key.as_ref();
        if key
            .get(..5)
            .is_some_and(|head| head.eq_ignore_ascii_case("nats-"))
        {
            continue;
        }
        for value in values {
            headers.append(key, value.as_str());
        }
    }
    headers.insert(protocol::MSG_ID, id);
    headers
}

/// Publishes a job to the work stream at `level`; its sequence there (the original's for a
/// duplicate id).
async fn publish_run(
    js: &jetstream::Context,
    queue: &QueueRef,
    level: u8,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<u64, StoreError> {
    let ack = js
        .publish_with_headers(queue.job_subject(level), headers, payload)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let ack = ack.await.map_err(|e| StoreError::Refused(e.to_string()))?;
    Ok(ack.sequence)
}

/// Submits the run of a held tick to the work stream, with the tick's slot id as
/// `Nats-Msg-Id` (so a second submission of the slot within the deduplication window is a
/// duplicate); its sequence in the work stream.
pub async fn submit_tick(
    js: &jetstream::Context,
    queue: &QueueRef,
    level: u8,
    tick: &Tick,
) -> Result<u64, StoreError> {
    let headers = run_headers(&tick.headers, &tick.run.job_id);
    publish_run(js, queue, level, headers, tick.payload.clone()).await
}

/// Whether the work stream still holds the job at `sequence` (it is queued or running: an
/// acknowledged or dead-lettered job is deleted from the work stream).
pub async fn still_queued(
    js: &jetstream::Context,
    queue: &QueueRef,
    sequence: u64,
) -> Result<bool, StoreError> {
    crate::stored::get(&js.client(), &queue.stream(), sequence)
        .await
        .map(|job| job.is_some())
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// The job id of a run asked for by hand at `now`: `<name>@manual-<now, RFC 3339 UTC>`, never
/// the id of a slot (a trigger at a slot's second must not make that slot's run a duplicate),
/// and one a slot id parse ([`job_id`], `rsplit_once('@')`) does not read as a slot.
pub fn manual_job_id(name: &str, now: Timestamp) -> String {
    format!("{name}@manual-{}", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
}

/// The run a `conveyor schedule trigger` submits now: the job of the stored schedule message
/// with the id [`manual_job_id`] `<name>@manual-<now>`, published straight to the work stream
/// (a second trigger within the same second is a duplicate; a slot's run is not).
pub async fn trigger(
    js: &jetstream::Context,
    queue: &QueueRef,
    name: &str,
    now: Timestamp,
) -> Result<Option<String>, StoreError> {
    let subject = schedule_subject(queue, name);
    let stored = crate::stored::last(&js.client(), &queue.delayed_stream(), &subject)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let Some(stored) = stored else {
        return Ok(None);
    };
    let stored_headers = stored.block().header_map();
    let level = stored_headers
        .get(protocol::PRIORITY)
        .and_then(|p| p.as_str().parse::<u8>().ok())
        .unwrap_or(0);
    let id = manual_job_id(name, now);
    let headers = run_headers(&stored_headers, &id);
    publish_run(js, queue, level, headers, stored.payload).await?;
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn five_fields_gain_a_seconds_field_and_presets_expand() {
        let p = Pattern::parse("30 4 * * mon-fri", None).unwrap();
        assert_eq!(p.server_pattern(), "0 30 4 * * mon-fri");
        assert_eq!(
            Pattern::parse("@hourly", None).unwrap().server_pattern(),
            "0 0 * * * *"
        );
        assert_eq!(
            Pattern::parse("@every 1h30m", None)
                .unwrap()
                .server_pattern(),
            "@every 5400s"
        );
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        for bad in [
            "* * * *",
            "61 * * * *",
            "@sometimes",
            "@every 0s",
            "@every 1d",
            "@every 5",
            "@every 8761h",
            "@every 525601m",
        ] {
            let err = Pattern::parse(bad, None).unwrap_err();
            assert!(matches!(err, ScheduleError::Invalid { .. }), "{bad}: {err}");
        }
        assert_eq!(
            Pattern::parse("0 3 * * *", Some("Mars/Olympus")).unwrap_err(),
            ScheduleError::TimeZone("Mars/Olympus".into())
        );
        assert_eq!(
            Pattern::parse("@every 1s", Some("UTC")).unwrap_err(),
            ScheduleError::ZoneWithInterval
        );
    }

    #[test]
    fn next_runs_follow_the_wall_clock_across_daylight_saving_changes() {
        // Europe/Berlin springs forward on 2026-03-29 (02:00 CET -> 03:00 CEST) and falls back
        // on 2026-10-25 (03:00 CEST -> 02:00 CET).
        let p = Pattern::parse("30 1 * * *", Some("Europe/Berlin")).unwrap();
        let before = ts("2026-03-27T12:00:00Z");
        let first = p.next_after(before).unwrap();
        let second = p.next_after(first).unwrap();
        let third = p.next_after(second).unwrap();
        assert_eq!(first, ts("2026-03-28T00:30:00Z"), "01:30 CET");
        assert_eq!(
            second,
            ts("2026-03-29T00:30:00Z"),
            "01:30 CET, just before the change"
        );
        assert_eq!(third, ts("2026-03-29T23:30:00Z"), "01:30 CEST is 23:30 UTC");
        // A time inside the skipped hour runs when the clock jumps (03:00 CEST), as cron does.
        let gap = Pattern::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        let on_the_day = gap.next_after(ts("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(
            on_the_day,
            ts("2026-03-29T01:00:00Z"),
            "03:00 CEST on the 29th"
        );
        assert_eq!(
            gap.next_after(on_the_day),
            Some(ts("2026-03-30T00:30:00Z")),
            "02:30 CEST on the 30th"
        );
        // Autumn: 09:00 local stays 09:00 local, so the UTC time moves by an hour.
        let nine = Pattern::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        let saturday = nine.next_after(ts("2026-10-24T00:00:00Z")).unwrap();
        let sunday = nine.next_after(saturday).unwrap();
        assert_eq!(saturday, ts("2026-10-24T07:00:00Z"));
        assert_eq!(sunday, ts("2026-10-25T08:00:00Z"));
        // The slot a tick ran for is the one before its announced next run.
        assert_eq!(nine.slot_before(sunday), Some(saturday));
    }

    #[test]
    fn intervals_are_bounded_by_a_year() {
        assert_eq!(
            Pattern::parse("@every 8760h", None)
                .unwrap()
                .server_pattern(),
            "@every 31536000s"
        );
        let err = Pattern::parse("@every 99999h", None).unwrap_err();
        assert!(err.to_string().contains("at most 8760h"), "{err}");
    }

    #[test]
    fn the_slots_between_two_runs_are_counted() {
        let every = Pattern::parse("@every 10s", None).unwrap();
        let a = ts("2026-12-01T10:00:00Z");
        assert_eq!(every.slots_between(a, ts("2026-12-01T10:00:10Z")), 0);
        assert_eq!(every.slots_between(a, ts("2026-12-01T10:00:40Z")), 3);
        assert_eq!(every.slots_between(a, ts("2026-12-01T10:00:41Z")), 4);
        assert_eq!(every.slots_between(a, a), 0);
        assert_eq!(every.slots_between(ts("2026-12-01T10:00:40Z"), a), 0);
        let hourly = Pattern::parse("0 * * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            hourly.slots_between(a, ts("2026-12-01T13:00:00Z")),
            2,
            "11:00 and 12:00"
        );
        // A day of minutes, and the cap for a span longer than counting allows.
        let minutely = Pattern::parse("* * * * *", None).unwrap();
        assert_eq!(
            minutely.slots_between(a, ts("2026-12-02T10:00:00Z")),
            24 * 60 - 1
        );
        assert_eq!(
            minutely.slots_between(a, ts("2026-12-09T10:00:00Z")),
            MAX_COUNTED_SLOTS
        );
    }

    #[test]
    fn a_tick_is_named_by_its_schedule_and_slot() {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_SCHEDULER, "conveyor.ns.q.schedule.6e");
        headers.insert(NAME, "nightly");
        headers.insert(SPEC, "@every 5s");
        headers.insert(NATS_NEXT, "2026-12-01T23:06:19Z");
        assert_eq!(
            tick_id(&headers).as_deref(),
            Some("nightly@2026-12-01T23:06:14Z")
        );
        headers.insert(SPEC, "0 0 9 * * *");
        headers.insert(TIME_ZONE, "Europe/Berlin");
        headers.insert(NATS_NEXT, "2026-10-25T08:00:00Z");
        assert_eq!(
            tick_id(&headers).as_deref(),
            Some("nightly@2026-10-24T07:00:00Z")
        );
        headers.insert(NATS_NEXT, "soon");
        assert_eq!(tick_id(&headers), None, "hostile headers give no id");
        let mut plain = HeaderMap::new();
        plain.insert(NAME, "nightly");
        assert_eq!(tick_id(&plain), None, "not a tick");
    }

    #[test]
    fn the_schedule_message_carries_the_job_and_matches_itself() {
        let queue = QueueRef::new("ns", "q");
        let pattern = Pattern::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        let job = Template {
            priority: 1,
            payload: Bytes::from_static(b"{}"),
            headers: vec![("tenant".into(), "a".into())],
            max_attempts: Some(3),
            timeout: Some("30s".into()),
        };
        let m = ScheduleMessage::new(&queue, "nightly", &pattern, &job, false);
        let held = ScheduleMessage::new(&queue, "nightly", &pattern, &job, true);
        assert_eq!(
            held.headers
                .get(protocol::schedule::TARGET)
                .unwrap()
                .as_str(),
            "conveyor.ns.q.hold.1.6e696768746c79"
        );
        assert_eq!(m.subject, "conveyor.ns.q.schedule.6e696768746c79");
        assert_eq!(
            m.headers.get(protocol::schedule::TARGET).unwrap().as_str(),
            "conveyor.ns.q.tick.1.6e696768746c79"
        );
        assert_eq!(
            m.headers.get(NATS_TIME_ZONE).unwrap().as_str(),
            "Europe/Berlin"
        );
        let mut stored = m.headers.clone();
        stored.insert("Nats-Rollup", "sub");
        assert!(m.matches(&stored, b"{}"));
        assert!(!m.matches(&stored, b"[]"));
        stored.insert("tenant", "b");
        assert!(!m.matches(&stored, b"{}"));
        assert!(m.job_size() > 100);
    }

    #[test]
    fn a_manual_run_never_takes_a_slots_id() {
        let at = ts("2026-12-01T10:00:00Z");
        let manual = manual_job_id("hourly", at);
        assert_eq!(manual, "hourly@manual-2026-12-01T10:00:00Z");
        assert_ne!(manual, job_id("hourly", at));
        assert!(protocol::validate_id(&manual).is_ok());
        let longest = manual_job_id(&"n".repeat(MAX_NAME), at);
        assert!(protocol::validate_id(&longest).is_ok(), "{}", longest.len());
        // Not read as a slot.
        let (_, time) = manual.rsplit_once('@').unwrap();
        assert!(time.parse::<Timestamp>().is_err());
    }

    #[test]
    fn run_headers_drop_the_servers_in_any_case() {
        let mut stored = HeaderMap::new();
        stored.insert("Nats-Schedule", "@every 1s");
        stored.insert("nats-msg-id", "forged");
        stored.insert("NATS-Expected-Stream", "other");
        stored.insert("tenant", "a");
        let headers = run_headers(&stored, "s@2026-12-01T10:00:00Z");
        let names: Vec<String> = headers
            .iter()
            .map(|(k, _)| AsRef::<str>::as_ref(k).to_owned())
            .collect();
        assert_eq!(
            headers.get(protocol::MSG_ID).unwrap().as_str(),
            "s@2026-12-01T10:00:00Z"
        );
        assert_eq!(headers.get("tenant").unwrap().as_str(), "a");
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn server_versions_are_checked() {
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.14.0").is_ok());
        let err = check_server_version("2.12.3").unwrap_err();
        assert_eq!(
            err.to_string(),
            "NATS server version \"2.12.3\" cannot run cron or @every schedules; JobSchedules need 2.14 or newer"
        );
    }
}
