//! The job envelope on the wire: which NATS headers a job carries, how they are parsed (with a
//! clear error for malformed values from foreign producers), the retry backoff rule, and the
//! messages exchanged with handler processes. `docs/protocol.md` is the prose version of this
//! module; keep them in step.
//!
//! Every message from the wire is hostile until decoded here: [`block`] reads raw header
//! blocks without the NATS client's parser, [`envelope`] decodes a delivered job (id, options,
//! reply subject), [`record`] encodes and decodes what Conveyor writes about a job (dead
//! letters, outcomes). Decoding is total: any input gives a value or a typed error, and every
//! duration and count is checked.

pub mod block;
pub mod envelope;
pub mod flow;
pub mod record;

pub use envelope::{JobEnvelope, Malformed};
pub use record::{DeadLetter, Outcome, Reason};

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};

/// Job id; JetStream deduplicates submissions with the same id within the stream's window.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The job id, when `Nats-Msg-Id` is not it: a due delayed job (the server does not copy
/// `Nats-Msg-Id` from its schedule) or a requeued dead letter. Takes precedence over `Nats-Msg-Id`.
pub const JOB_ID: &str = "Conveyor-Job-Id";
/// Priority level the producer asked for (the subject decides; this header is informational).
pub const PRIORITY: &str = "Conveyor-Priority";
/// Per-job cap on attempts, at most the queue's `maxAttempts`.
pub const MAX_ATTEMPTS: &str = "Conveyor-Max-Attempts";
/// Per-job processing timeout of one attempt, e.g. `30s`, `1500ms`, `5m`.
pub const TIMEOUT: &str = "Conveyor-Timeout";

/// Subject the final outcome of the job is published to (for producers awaiting it).
pub const REPLY_TO: &str = "Conveyor-Reply-To";

/// Headers of a delayed job: a JetStream message schedule (server 2.12+) in the queue's delayed
/// stream. See `docs/protocol.md`, "Delayed jobs".
pub mod schedule {
    /// When the job becomes due: `@at <RFC 3339 time>` (server header).
    pub const SCHEDULE: &str = "Nats-Schedule";
    /// Subject the due job is written to: `<prefix>.due.<level>` (server header).
    pub const TARGET: &str = "Nats-Schedule-Target";
    /// How long the due copy stays in the delayed stream after the work stream sourced it
    /// (server header).
    pub const TTL: &str = "Nats-Schedule-TTL";
    /// Value of [`TTL`] the client sets: long enough for the work stream to source the copy
    /// even after a long outage of the server or a full queue.
    pub const DUE_TTL: &str = "24h";

    /// Latest time a job may be delayed to, in seconds after the Unix epoch:
    /// 9999-12-30T22:00:00Z, the latest time jiff holds (it keeps every instant writable as a
    /// civil time of year 9999 or before in any offset), close to the last RFC 3339 can write.
    pub const LATEST: i64 = 253_402_207_200;

    /// A due time that cannot be scheduled.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("a job cannot be delayed to {0}: the latest due time is 9999-12-30T22:00:00Z")]
    pub struct OutOfRange(pub String);

    /// The `Nats-Schedule` value for a job due at `at`; a time past [`LATEST`] is an error
    /// (never a silent fallback that would run the job at once).
    pub fn at(at: std::time::SystemTime) -> Result<String, OutOfRange> {
        let out_of_range = || OutOfRange(format!("{at:?}"));
        let at = jiff::Timestamp::try_from(at).map_err(|_| out_of_range())?;
        // Whole seconds (rounded up, never early), `Z`: the plainest RFC 3339 form.
        let seconds = at.as_second() + i64::from(at.subsec_nanosecond() > 0);
        if seconds > LATEST {
            return Err(out_of_range());
        }
        let at = jiff::Timestamp::from_second(seconds).map_err(|_| out_of_range())?;
        Ok(format!("@at {}", at.strftime("%Y-%m-%dT%H:%M:%SZ")))
    }
}

/// Headers of a result message, published to the job's `Conveyor-Reply-To` subject once the
/// job is done for good; the payload is the handler's result (empty for dead letters). Progress
/// updates go to the same subject before it, with [`result::STATUS`] = [`result::PROGRESS`].
pub mod result {
    /// The job's id.
    pub const JOB_ID: &str = "Conveyor-Job-Id";
    /// `completed` or `dead_lettered`.
    pub const STATUS: &str = "Conveyor-Status";
    /// Value of [`STATUS`] after success.
    pub const COMPLETED: &str = "completed";
    /// Value of [`STATUS`] after the job was dead-lettered; the message then also carries
    /// the dead-letter headers `Conveyor-Reason`, `Conveyor-Error` and `Conveyor-Attempts`.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Value of [`STATUS`] after the job was cancelled (`Client::cancel`).
    pub const CANCELLED: &str = "cancelled";
    /// Value of [`STATUS`] of a progress update: the handler is still running and reports
    /// where it is (the payload, opaque to Conveyor). Any number of these may precede the one
    /// final message; they are best effort (a waiter that is not listening misses them).
    pub const PROGRESS: &str = "progress";
}

/// Dead-letter headers, added by whoever moves a job into the dead-letter stream.
pub mod dead_letter {
    /// The job's id (the dead-letter message's own `Nats-Msg-Id` is `<id>:<sequence>`).
    pub const JOB_ID: &str = "Conveyor-Job-Id";
    /// Human-readable reason of the last failure.
    pub const ERROR: &str = "Conveyor-Error";
    /// Attempts made, including the last one.
    pub const ATTEMPTS: &str = "Conveyor-Attempts";
    /// Pod (or host) that ran the last attempt.
    pub const POD: &str = "Conveyor-Pod";
    /// When the job was dead-lettered, RFC 3339.
    pub const FAILED_AT: &str = "Conveyor-Failed-At";
    /// Subject the job was published to (encodes its priority level).
    pub const SUBJECT: &str = "Conveyor-Original-Subject";
    /// Sequence of the job in the work stream.
    pub const SEQUENCE: &str = "Conveyor-Original-Sequence";
    /// Why the job was dead-lettered: `permanent`, `exhausted` or `malformed`.
    pub const REASON: &str = "Conveyor-Reason";
}

/// Oldest NATS server release Conveyor supports (work-queue streams with one filtered consumer
/// per level, nak with delay, consumer create-or-update, message schedules for delayed jobs).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);

/// The server is older than [`MIN_SERVER_VERSION`] or reports no version we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NATS server version {version:?} is not supported; Conveyor needs {}.{} or newer", MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1)]
pub struct UnsupportedServer {
    /// Version the server reported.
    pub version: String,
}

/// Checks a server's reported version (e.g. `2.15.1`) against [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str) -> Result<(), UnsupportedServer> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= MIN_SERVER_VERSION => Ok(()),
        _ => Err(UnsupportedServer {
            version: version.to_owned(),
        }),
    }
}

/// Longest job id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// A header with a value that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed header {header}: {value:?} {problem}")]
pub struct HeaderError {
    /// Header name.
    pub header: &'static str,
    /// The value as received (control characters escaped, cut to 128 characters).
    pub value: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl HeaderError {
    /// An error about `value` of `header`, showing the value safely.
    pub fn new(header: &'static str, value: &str, problem: &'static str) -> Self {
        Self {
            header,
            value: envelope::shown(value),
            problem,
        }
    }
}

/// A job id that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// Ids must not be empty.
    #[error("job id is empty")]
    Empty,
    /// Ids are header values: printable ASCII, no spaces.
    #[error("job id {0:?} contains a character other than printable ASCII without spaces")]
    BadCharacter(String),
    /// Ids longer than [`MAX_ID_LEN`].
    #[error("job id is {0} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong(usize),
}

/// The headers of a cancellation of job `id` (an empty message on `cancel.<hex id>`): its id,
/// and [`flow::CANCEL_CHILDREN`] when its children are cancelled with it.
pub fn cancellation(id: &str, children: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(JOB_ID, id);
    if children {
        headers.insert(flow::CANCEL_CHILDREN, "true");
    }
    headers
}

/// Checks that an id can travel in a header and be used for deduplication.
pub fn validate_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        return Err(InvalidId::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(InvalidId::TooLong(id.len()));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidId::BadCharacter(id.to_owned()));
    }
    Ok(())
}

/// The per-job settings a producer can put in headers; `None` means the queue default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// Attempts cap (`Conveyor-Max-Attempts`), at least 1.
    pub max_attempts: Option<u32>,
    /// Timeout of one attempt (`Conveyor-Timeout`).
    pub timeout: Option<Duration>,
}

impl JobOptions {
    /// Writes the options into `headers`.
    pub fn write(&self, headers: &mut HeaderMap) {
        if let Some(max_attempts) = self.max_attempts {
            headers.insert(MAX_ATTEMPTS, max_attempts.to_string().as_str());
        }
        if let Some(timeout) = self.timeout {
            headers.insert(TIMEOUT, format!("{}ms", timeout.as_millis()).as_str());
        }
    }

    /// Reads the options from a delivered job's headers.
    pub fn parse(headers: Option<&HeaderMap>) -> Result<Self, HeaderError> {
        let Some(headers) = headers else {
            return Ok(Self::default());
        };
        let max_attempts = match headers.get(MAX_ATTEMPTS) {
            None => None,
            Some(value) => {
                let value = value.as_str().trim();
                match value.parse::<u32>() {
                    Ok(n) if n >= 1 => Some(n),
                    _ => {
                        return Err(HeaderError::new(
                            MAX_ATTEMPTS,
                            value,
                            "is not a whole number from 1 to 4294967295",
                        ));
                    }
                }
            }
        };
        let timeout = match headers.get(TIMEOUT) {
            None => None,
            Some(value) => Some(
                parse_duration(value.as_str())
                    .filter(|t| *t <= envelope::MAX_TIMEOUT)
                    .ok_or_else(|| {
                        HeaderError::new(
                            TIMEOUT,
                            value.as_str(),
                            "is not a duration from 1ms to 168h like 30s, 1500ms, 5m or 1h",
                        )
                    })?,
            ),
        };
        Ok(Self {
            max_attempts,
            timeout,
        })
    }
}

/// Parses `<digits><unit>` with unit `ms`, `s`, `m` or `h` (at most 12 digits); zero is
/// refused. Total: any text gives a duration or `None`, never an overflow.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    if digits.len() > 12 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

/// Exponential backoff with jitter between attempts of a failing job.
///
/// The delay after failed attempt `n` (1-based) is `min(max, initial * multiplier^(n-1))`,
/// then scaled by a uniform random factor in `[1 - jitter, 1 + jitter]` and capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Growth factor per attempt (≥ 1).
    pub multiplier: f64,
    /// Relative jitter in `[0, 1]`.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Delay before the next attempt after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_unit())
    }

    /// Like [`Backoff::delay`] with the random draw `unit` in `[0, 1)` given, for tests.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let max = self.max.as_secs_f64();
        let base = (self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent)).min(max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((base * factor).clamp(0.0, max))
    }
}

/// A uniform draw in `[0, 1)` from the OS random source (via a v4 UUID).
pub(crate) fn random_unit() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() >> 75; // 53 random bits
    bits as f64 / (1u64 << 53) as f64
}

/// Current time in RFC 3339, for headers.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::try_from(SystemTime::now())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Exit codes of a handler process in `exec` mode (one process per job).
pub mod exit_code {
    /// Success: stdout is the job's result.
    pub const SUCCESS: i32 = 0;
    /// `EX_DATAERR`: the job itself is bad; no more attempts (dead-lettered).
    pub const PERMANENT: i32 = 65;
    /// `EX_TEMPFAIL`: try again later, with backoff; counts as an attempt.
    pub const RETRY: i32 = 75;
}

/// One job handed to a `jsonl` handler process, one JSON object per line on its stdin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JsonlRequest {
    /// Job id; the response must carry the same id.
    pub id: String,
    /// Payload as base64 (standard alphabet, padded).
    pub payload_b64: String,
    /// Payload as text, present when it is valid UTF-8 (for handlers that want text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Attempt number, 1 for the first delivery.
    pub attempt: u32,
    /// Attempts allowed in total.
    pub max_attempts: u32,
    /// The job's own reference `<namespace>/<queue>/<id>`: the `Conveyor-Parent` of the
    /// children it spawns before answering `continue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The outcomes of the job's dependencies, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Vec<HandlerDependency>>,
}

/// One dependency's outcome as a handler process sees it (`jsonl` field `dependencies`, the
/// `CONVEYOR_DEPENDENCIES` environment variable of `exec`, the `Conveyor-Dependencies` header
/// of `http`, each a JSON array of these).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandlerDependency {
    /// The dependency, `<namespace>/<queue>/<id>`.
    pub job: String,
    /// `completed`, `failed`, `cancelled` (skipped) or `missing` (its record expired).
    pub status: String,
    /// The error of a failed dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its result as base64, when completed and small enough for the mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_b64: Option<String>,
    /// Its result as text, when it is valid UTF-8 and small enough for the mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Where a larger result is kept: `<results stream> <results subject>` (read it with
    /// `$JS.API.STREAM.MSG.GET.<stream>` and `last_by_subj`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<String>,
}

/// A handler process's continuation (`jsonl`: with status `continue`; `exec`: a
/// `conveyor:continue` stderr line; `http`: the body of a 2xx with `Conveyor-Status: continue`):
/// the job to run once the children it spawned (with `Conveyor-Parent` set to its own
/// reference) have finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonlContinuation {
    /// The continuation's job id.
    pub id: String,
    /// Its payload as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// How many children the handler spawned.
    pub spawned: u64,
}

/// How a handler finished a job, in a `jsonl` response.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JsonlStatus {
    /// Done; `result` is the result.
    Ok,
    /// Try again later (with backoff, or after `retry_after_ms`).
    Retry,
    /// Failed this attempt; retried with backoff until attempts are exhausted.
    Failed,
    /// Failed for good; dead-lettered at once.
    Permanent,
    /// Not an outcome: the job is still running and `progress` (any JSON) says how far it
    /// got. Forwarded to a producer awaiting the job; any number may precede the outcome.
    Progress,
    /// Done for now: `continuation` runs once the children the handler spawned are done.
    Continue,
}

/// A `jsonl` handler's answer for one job, one JSON object per line on its stdout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JsonlResponse {
    /// The request's id.
    pub id: String,
    /// Outcome.
    pub status: JsonlStatus,
    /// Result (any JSON) when `status` is `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Error message for the other statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Delay before the retry, for `retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// How far the job got (any JSON), for `progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// The continuation, for `continue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<JsonlContinuation>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, *v);
        }
        map
    }

    #[test]
    fn options_round_trip_through_headers() {
        let options = JobOptions {
            max_attempts: Some(3),
            timeout: Some(Duration::from_millis(1500)),
        };
        let mut map = HeaderMap::new();
        options.write(&mut map);
        assert_eq!(JobOptions::parse(Some(&map)).unwrap(), options);
        assert_eq!(JobOptions::parse(None).unwrap(), JobOptions::default());
    }

    #[test]
    fn malformed_headers_say_which_and_why() {
        let err = JobOptions::parse(Some(&headers(&[(MAX_ATTEMPTS, "three")]))).unwrap_err();
        assert_eq!(err.header, MAX_ATTEMPTS);
        assert_eq!(
            err.to_string(),
            "malformed header Conveyor-Max-Attempts: \"three\" is not a whole number from 1 to 4294967295"
        );
        assert!(JobOptions::parse(Some(&headers(&[(MAX_ATTEMPTS, "0")]))).is_err());
        let err = JobOptions::parse(Some(&headers(&[(TIMEOUT, "soon")]))).unwrap_err();
        assert_eq!(err.header, TIMEOUT);
        assert!(JobOptions::parse(Some(&headers(&[(TIMEOUT, "0s")]))).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
        };
        assert_eq!(b.delay_with(1, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay_with(3, 0.5), Duration::from_secs(4));
        assert_eq!(b.delay_with(30, 0.5), Duration::from_secs(10));
        assert_eq!(
            b.delay_with(30, 0.99),
            Duration::from_secs(10),
            "capped after jitter"
        );
        assert_eq!(b.delay_with(2, 0.0), Duration::from_secs(1));
        for attempt in 1..10 {
            let d = b.delay(attempt);
            assert!(d <= b.max);
        }
    }

    #[test]
    fn server_versions_are_checked() {
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.12.0-beta").is_ok());
        assert!(
            check_server_version("2.11.4").is_err(),
            "no message schedules"
        );
        assert!(check_server_version("3.0.0").is_ok());
        let err = check_server_version("2.9.22").unwrap_err();
        assert_eq!(
            err.to_string(),
            "NATS server version \"2.9.22\" is not supported; Conveyor needs 2.12 or newer"
        );
        assert!(check_server_version("").is_err());
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("order-42").is_ok());
        assert_eq!(validate_id(""), Err(InvalidId::Empty));
        assert!(matches!(
            validate_id("a b"),
            Err(InvalidId::BadCharacter(_))
        ));
        assert!(matches!(
            validate_id(&"x".repeat(300)),
            Err(InvalidId::TooLong(300))
        ));
    }

    #[test]
    fn jsonl_messages_use_the_documented_shape() {
        let line = r#"{"id":"a","status":"permanent","error":"bad input"}"#;
        let resp: JsonlResponse = serde_json::from_str(line).unwrap();
        assert_eq!(resp.status, JsonlStatus::Permanent);
        assert_eq!(resp.error.as_deref(), Some("bad input"));
    }
}
