//! The job envelope as a worker reads it: one total decode of a delivered job's headers into
//! its id, per-job options and reply subject, or a [`Malformed`] that says which header broke
//! which rule. Workers, the dispatcher and the dead-letter tools all use this one rule.

use std::time::Duration;

use async_nats::HeaderMap;

use super::{HeaderError, JOB_ID, MAX_ATTEMPTS, MSG_ID, PRIORITY, REPLY_TO, TIMEOUT};
use super::{block, validate_id};

/// Subjects taken from a message (`Conveyor-Reply-To`) must start with this: a worker publishes
/// only into inboxes on a producer's word, never to `$JS.>`, `$SYS.>` or a queue's subjects.
pub const INBOX_PREFIX: &str = "_INBOX.";
/// Longest reply subject accepted, in bytes.
pub const MAX_REPLY_BYTES: usize = 256;
/// Longest per-job timeout (`Conveyor-Timeout`): 7 days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A delivered job, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnvelope {
    /// The job id (see [`job_id`]).
    pub id: String,
    /// Per-job options.
    pub options: super::JobOptions,
    /// Where the outcome goes: a subject under [`INBOX_PREFIX`], when the producer gave one.
    pub reply_to: Option<String>,
    /// A `Conveyor-Reply-To` that was refused (the job still runs; no reply is sent).
    pub refused_reply_to: Option<HeaderError>,
}

/// A job whose headers break the protocol: it is dead-lettered at once with reason
/// `malformed`, under `id` (the job's own id when that was readable, else `<stream>:<seq>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Malformed {
    /// The id to dead-letter the job under.
    pub id: String,
    /// The first rule broken.
    pub error: HeaderError,
}

impl JobEnvelope {
    /// Decodes the headers of the job at `sequence` of `stream`. Unknown headers are the
    /// handler's and pass; `Conveyor-*` headers this version does not know are ignored.
    pub fn decode(
        headers: Option<&HeaderMap>,
        stream: &str,
        sequence: u64,
    ) -> Result<Self, Malformed> {
        let fallback = || fallback_id(stream, sequence);
        let Some(headers) = headers else {
            return Ok(Self {
                id: fallback(),
                options: super::JobOptions::default(),
                reply_to: None,
                refused_reply_to: None,
            });
        };
        let id = job_id(headers, stream, sequence).map_err(|error| Malformed {
            id: fallback(),
            error,
        })?;
        let malformed = |error| Malformed {
            id: id.clone(),
            error,
        };
        check_values(headers).map_err(malformed)?;
        for name in [MAX_ATTEMPTS, TIMEOUT, PRIORITY, REPLY_TO] {
            single(headers, name).map_err(malformed)?;
        }
        if let Some(value) = headers.get(PRIORITY) {
            let value = value.as_str();
            if value.parse::<u8>().is_err() {
                return Err(malformed(HeaderError::new(
                    PRIORITY,
                    value,
                    "is not a whole number from 0 to 255",
                )));
            }
        }
        let options = super::JobOptions::parse(Some(headers)).map_err(malformed)?;
        let (reply_to, refused_reply_to) = match headers.get(REPLY_TO) {
            None => (None, None),
            Some(value) => match reply_subject(value.as_str()) {
                Ok(subject) => (Some(subject.to_owned()), None),
                Err(error) => (None, Some(error)),
            },
        };
        Ok(Self {
            id,
            options,
            reply_to,
            refused_reply_to,
        })
    }
}

/// The id of a job: `Conveyor-Job-Id` (a requeued dead letter, a due delayed job), else
/// `Nats-Msg-Id`, else the slot id of a schedule's run (`crate::schedule::tick_id`), else
/// `<stream>:<sequence>`. An empty header counts as absent; a present id
/// that [`validate_id`] refuses is an error.
pub fn job_id(headers: &HeaderMap, stream: &str, sequence: u64) -> Result<String, HeaderError> {
    for name in [JOB_ID, MSG_ID] {
        single(headers, name)?;
        if let Some(value) = headers.get(name).map(|v| v.as_str()) {
            if value.is_empty() {
                continue;
            }
            validate_id(value).map_err(|problem| HeaderError {
                header: name,
                value: shown(value),
                problem: match problem {
                    super::InvalidId::Empty => "is empty",
                    super::InvalidId::BadCharacter(_) => {
                        "has a character other than printable ASCII without spaces"
                    }
                    super::InvalidId::TooLong(_) => "is longer than 256 bytes",
                },
            })?;
            return Ok(value.to_owned());
        }
    }
    // A run of a JobSchedule written by the server: `<schedule>@<slot>`.
    if let Some(id) = crate::schedule::tick_id(headers).filter(|id| validate_id(id).is_ok()) {
        return Ok(id);
    }
    Ok(fallback_id(stream, sequence))
}

/// The id of a job that carries none readable: `<stream>:<sequence>`.
pub fn fallback_id(stream: &str, sequence: u64) -> String {
    format!("{stream}:{sequence}")
}

/// Checks a reply subject: under [`INBOX_PREFIX`], at most [`MAX_REPLY_BYTES`], tokens of
/// visible ASCII without wildcards.
pub fn reply_subject(value: &str) -> Result<&str, HeaderError> {
    let refuse = |problem| HeaderError::new(REPLY_TO, value, problem);
    if value.len() > MAX_REPLY_BYTES {
        return Err(refuse("is longer than 256 bytes"));
    }
    if !value.starts_with(INBOX_PREFIX) {
        return Err(refuse(
            "is not an inbox subject (it must start with _INBOX.)",
        ));
    }
    let tokens_ok = value.split('.').all(|token| {
        !token.is_empty()
            && token != "*"
            && token != ">"
            && token.bytes().all(|b| b.is_ascii_graphic())
    });
    if !tokens_ok {
        return Err(refuse(
            "is not a valid subject (empty token, wildcard or a character other than visible ASCII)",
        ));
    }
    Ok(value)
}

/// Every header name and value must follow the block grammar (the client accepts a NUL, a
/// handler's environment cannot carry one).
fn check_values(headers: &HeaderMap) -> Result<(), HeaderError> {
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if let Err(problem) = block::check_name(name.as_bytes()) {
            return Err(HeaderError {
                header: "header name",
                value: shown(name),
                problem,
            });
        }
        for value in values {
            if let Err(problem) = block::check_value(value.as_str()) {
                return Err(HeaderError {
                    header: "header value",
                    value: format!("{}: {}", shown(name), shown(value.as_str())),
                    problem,
                });
            }
        }
    }
    Ok(())
}

/// A `Conveyor-*` header may appear once (or repeat the same value).
fn single(headers: &HeaderMap, name: &'static str) -> Result<(), HeaderError> {
    let mut values = headers.get_all(name);
    if let Some(first) = values.next()
        && values.any(|other| other != first)
    {
        return Err(HeaderError::new(
            name,
            first.as_str(),
            "appears more than once with different values",
        ));
    }
    Ok(())
}

/// A value for an error message (see [`block::shown_text`]).
pub(crate) fn shown(value: &str) -> String {
    block::shown_text(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, *v);
        }
        map
    }

    fn decode(pairs: &[(&str, &str)]) -> Result<JobEnvelope, Malformed> {
        JobEnvelope::decode(Some(&headers(pairs)), "conveyor_ns_q", 7)
    }

    #[test]
    fn ids_follow_one_rule() {
        assert_eq!(decode(&[]).unwrap().id, "conveyor_ns_q:7");
        assert_eq!(
            JobEnvelope::decode(None, "conveyor_ns_q", 7).unwrap().id,
            "conveyor_ns_q:7"
        );
        assert_eq!(decode(&[(MSG_ID, "a")]).unwrap().id, "a");
        assert_eq!(decode(&[(MSG_ID, "a"), (JOB_ID, "b")]).unwrap().id, "b");
        assert_eq!(decode(&[(MSG_ID, "")]).unwrap().id, "conveyor_ns_q:7");
        assert_eq!(
            decode(&[(MSG_ID, "../../etc/passwd")]).unwrap().id,
            "../../etc/passwd"
        );
        let long = "x".repeat(10_000);
        let err = decode(&[(MSG_ID, &long)]).unwrap_err();
        assert_eq!(err.id, "conveyor_ns_q:7");
        assert!(err.to_string().contains("longer than 256"), "{err}");
        let err = decode(&[(JOB_ID, "a b")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("malformed header Conveyor-Job-Id"),
            "{err}"
        );
    }

    #[test]
    fn options_are_bounded() {
        let ok = decode(&[(MSG_ID, "a"), (TIMEOUT, "7d"), (MAX_ATTEMPTS, "3")]);
        assert!(ok.is_err(), "days are not a unit");
        let err = decode(&[(MSG_ID, "a"), (TIMEOUT, "18446744073709551615s")]).unwrap_err();
        assert_eq!(err.id, "a");
        assert_eq!(err.error.header, TIMEOUT);
        assert!(decode(&[(TIMEOUT, "169h")]).is_err(), "over 7 days");
        assert_eq!(
            decode(&[(TIMEOUT, "168h")]).unwrap().options.timeout,
            Some(MAX_TIMEOUT)
        );
        assert!(decode(&[(MAX_ATTEMPTS, "-1")]).is_err());
        assert!(decode(&[(MAX_ATTEMPTS, "")]).is_err());
        assert!(decode(&[(MAX_ATTEMPTS, "4294967296")]).is_err());
        assert!(decode(&[(PRIORITY, "256")]).is_err());
        assert!(decode(&[(PRIORITY, "2")]).is_ok());
    }

    #[test]
    fn repeated_conveyor_headers_must_agree() {
        assert!(decode(&[(MAX_ATTEMPTS, "2"), (MAX_ATTEMPTS, "2")]).is_ok());
        let err = decode(&[(MAX_ATTEMPTS, "2"), (MAX_ATTEMPTS, "9")]).unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
        assert!(decode(&[(MSG_ID, "a"), (MSG_ID, "b")]).is_err());
        assert!(decode(&[("X-User", "1"), ("X-User", "2")]).is_ok());
    }

    #[test]
    fn nul_in_any_value_is_malformed() {
        let err = decode(&[("X-Note", "a\0b")]).unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
    }

    #[test]
    fn reply_subjects_are_inboxes_only() {
        let ok = decode(&[(REPLY_TO, "_INBOX.abc.def")]).unwrap();
        assert_eq!(ok.reply_to.as_deref(), Some("_INBOX.abc.def"));
        for hostile in [
            "$JS.API.STREAM.PURGE.conveyor_ns_other",
            "$JS.API.STREAM.DELETE.conveyor_ns_other",
            "$SYS.REQ.SERVER.PING",
            "conveyor.ns.other.jobs.0",
            "_INBOX.>",
            "_INBOX.*",
            "_INBOX..x",
            "_INBOX.",
            "_INBOXES.x",
        ] {
            let job = decode(&[(REPLY_TO, hostile)]).unwrap();
            assert_eq!(job.reply_to, None, "{hostile}");
            assert!(job.refused_reply_to.is_some(), "{hostile}");
        }
        let long = format!("_INBOX.{}", "x".repeat(300));
        assert!(decode(&[(REPLY_TO, &long)]).unwrap().reply_to.is_none());
    }
}
