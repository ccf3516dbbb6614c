//! The messages Conveyor itself writes about a job: the dead-letter record (a copy of the job
//! with the failure headers) and the outcome (the result message sent to `Conveyor-Reply-To`
//! and kept in the results stream). One encoder and one decoder each; everybody who writes or
//! reads them (workers, the dispatcher, the client, the dead-letter tools) goes through here.

use async_nats::HeaderMap;
use base64::Engine as _;

use super::block::{self, MAX_BLOCK_BYTES};
use super::{MSG_ID, dead_letter, result};

/// Longest `Conveyor-Error`, in characters.
pub const MAX_ERROR_CHARS: usize = 1024;
/// Header of a dead letter whose original headers could not be copied as headers (one of them
/// broke the grammar, or they would not fit beside the dead-letter headers): the original
/// header block, base64 (standard alphabet, padded), cut to what fits.
pub const ORIGINAL_HEADERS: &str = "Conveyor-Original-Headers";
/// Set beside [`ORIGINAL_HEADERS`] when the copy was cut: the original block's length in bytes.
pub const ORIGINAL_HEADERS_TRUNCATED: &str = "Conveyor-Original-Headers-Truncated";
/// What a dead letter's header block may use, leaving room for the server's own headers.
const DEAD_LETTER_BUDGET: usize = MAX_BLOCK_BYTES - 1024;

/// Why a job was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The handler said the job can never succeed.
    Permanent,
    /// The last attempt failed.
    Exhausted,
    /// The job breaks the protocol (a header, or bytes no layer could read).
    Malformed,
    /// Every delivery went unanswered (the worker crashed, was killed or hung).
    MaxDeliveries,
    /// A waiting job's dependency failed and its policy is `if-failed=fail`.
    DependencyFailed,
    /// A waiting job waited longer than its wait timeout.
    DependencyTimeout,
}

impl Reason {
    /// The value of `Conveyor-Reason`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Permanent => "permanent",
            Reason::Exhausted => "exhausted",
            Reason::Malformed => "malformed",
            Reason::MaxDeliveries => "max_deliveries",
            Reason::DependencyFailed => "dependency_failed",
            Reason::DependencyTimeout => "dependency_timeout",
        }
    }

    /// The reason a `Conveyor-Reason` value names.
    pub fn parse(value: &str) -> Option<Self> {
        [
            Reason::Permanent,
            Reason::Exhausted,
            Reason::Malformed,
            Reason::MaxDeliveries,
            Reason::DependencyFailed,
            Reason::DependencyTimeout,
        ]
        .into_iter()
        .find(|r| r.as_str() == value)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure a dead letter records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job id.
    pub job_id: String,
    /// Why.
    pub reason: Reason,
    /// The last error (made one line of at most [`MAX_ERROR_CHARS`] when encoded).
    pub error: String,
    /// Attempts made, including the last.
    pub attempts: u64,
    /// Pod that ran the last attempt (`unknown` when none reported).
    pub pod: String,
    /// The subject the job was published to.
    pub original_subject: String,
    /// The job's sequence in the work stream.
    pub original_sequence: u64,
}

/// The original headers of a job being dead-lettered.
#[derive(Debug, Clone, Copy)]
pub enum Original<'a> {
    /// Headers the client could read: copied as they are, when they fit.
    Headers(Option<&'a HeaderMap>),
    /// A raw header block with lines that break the grammar: its well-formed headers are
    /// copied and the block is kept in [`ORIGINAL_HEADERS`].
    Block {
        /// The block as stored.
        raw: &'a [u8],
        /// Its well-formed headers.
        decoded: &'a HeaderMap,
    },
}

impl DeadLetter {
    /// The dead-letter message's `Nats-Msg-Id`: `<job id>:<work sequence>`, the same whoever
    /// writes it, so a retried or racing copy is a duplicate.
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.job_id, self.original_sequence)
    }

    /// The dead letter's headers: the original headers (or, when they cannot travel as headers
    /// or would not fit, their raw block in base64, cut to fit) plus the dead-letter headers.
    /// The block never exceeds what JetStream stores.
    pub fn encode(&self, original: Original<'_>, failed_at: &str) -> HeaderMap {
        let mut own = HeaderMap::new();
        own.insert(MSG_ID, self.message_id().as_str());
        own.insert(dead_letter::JOB_ID, self.job_id.as_str());
        own.insert(dead_letter::REASON, self.reason.as_str());
        own.insert(dead_letter::ERROR, one_line(&self.error).as_str());
        own.insert(dead_letter::ATTEMPTS, self.attempts.to_string().as_str());
        own.insert(dead_letter::POD, one_line(&self.pod).as_str());
        own.insert(dead_letter::FAILED_AT, failed_at);
        own.insert(dead_letter::SUBJECT, self.original_subject.as_str());
        own.insert(
            dead_letter::SEQUENCE,
            self.original_sequence.to_string().as_str(),
        );
        let (copied, raw) = match original {
            Original::Headers(headers) => (headers.cloned().unwrap_or_default(), None),
            Original::Block { raw, decoded } => (decoded.clone(), Some(raw.to_vec())),
        };
        // Headers the client read but that break the grammar (a NUL) are not copied as
        // headers: the block keeps them.
        let (mut headers, raw) = match (well_formed(&copied), raw) {
            (Some(clean), None) => (clean, Some(block_bytes(&copied))),
            (None, raw) => (copied.clone(), raw),
            (Some(clean), raw) => (clean, raw),
        };
        for (name, values) in own.iter() {
            let name: &str = name.as_ref();
            if let Some(value) = values.first() {
                headers.insert(name, value.as_str());
            }
        }
        if raw.is_none() && block::wire_len(&headers) <= DEAD_LETTER_BUDGET {
            return headers;
        }
        // Too big beside our headers, or not all of it could be copied: keep the dead-letter
        // headers and the original block as base64, cut to what fits.
        let raw = raw.unwrap_or_else(|| block_bytes(&copied));
        let overhead = ORIGINAL_HEADERS.len() + ORIGINAL_HEADERS_TRUNCATED.len() + 32;
        let whole = block::wire_len(&headers) + raw.len().div_ceil(3) * 4 + overhead;
        // The copied headers stay beside the block when both fit; else only ours do.
        let mut headers = if whole <= DEAD_LETTER_BUDGET {
            headers
        } else {
            own
        };
        let room = DEAD_LETTER_BUDGET
            .saturating_sub(block::wire_len(&headers))
            .saturating_sub(overhead);
        let fits = room / 4 * 3;
        let kept = &raw[..raw.len().min(fits)];
        headers.insert(
            ORIGINAL_HEADERS,
            base64::engine::general_purpose::STANDARD
                .encode(kept)
                .as_str(),
        );
        if kept.len() < raw.len() {
            headers.insert(ORIGINAL_HEADERS_TRUNCATED, raw.len().to_string().as_str());
        }
        headers
    }
}

/// `headers` without the ones that break the grammar, or `None` when all follow it. A
/// producer's own [`ORIGINAL_HEADERS`] or [`ORIGINAL_HEADERS_TRUNCATED`] counts as breaking it:
/// copied as a header it would pass for the dead letter's copy of the block (the block keeps it).
fn well_formed(headers: &HeaderMap) -> Option<HeaderMap> {
    let ok = |name: &str, value: &str| {
        block::check_name(name.as_bytes()).is_ok()
            && block::check_value(value).is_ok()
            && name != ORIGINAL_HEADERS
            && name != ORIGINAL_HEADERS_TRUNCATED
    };
    let all_ok = headers.iter().all(|(name, values)| {
        let name: &str = name.as_ref();
        values.iter().all(|v| ok(name, v.as_str()))
    });
    if all_ok {
        return None;
    }
    let mut clean = HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values.iter().filter(|v| ok(name, v.as_str())) {
            clean.append(name, value.as_str());
        }
    }
    Some(clean)
}

/// The bytes a client would send for `headers`.
fn block_bytes(headers: &HeaderMap) -> Vec<u8> {
    let mut out = b"NATS/1.0\r\n".to_vec();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Header values are one line of printable text: control characters become spaces, at most
/// [`MAX_ERROR_CHARS`] characters, never empty.
pub fn one_line(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_CHARS)
        .collect();
    if line.trim().is_empty() {
        "unknown error".into()
    } else {
        line
    }
}

/// A job's final outcome or a progress report, as sent to `Conveyor-Reply-To` and stored in
/// the results stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the payload is the handler's result.
    Completed,
    /// Dead-lettered; the payload is empty.
    DeadLettered {
        /// Why (`Conveyor-Reason`, kept as text: a newer writer may know more reasons).
        reason: String,
        /// The last error.
        error: String,
        /// Attempts made.
        attempts: u64,
    },
    /// Cancelled before or while it ran.
    Cancelled,
    /// Still running; the payload says how far it got.
    Progress,
}

/// An outcome message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("result message {problem}")]
pub struct OutcomeError {
    /// What is wrong.
    pub problem: String,
}

impl Outcome {
    /// The dead-lettered outcome of a dead letter.
    pub fn dead_lettered(letter: &DeadLetter) -> Self {
        Outcome::DeadLettered {
            reason: letter.reason.as_str().to_owned(),
            error: letter.error.clone(),
            attempts: letter.attempts,
        }
    }

    /// The headers of the message for job `id`.
    pub fn encode(&self, id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(result::JOB_ID, id);
        let status = match self {
            Outcome::Completed => result::COMPLETED,
            Outcome::DeadLettered {
                reason,
                error,
                attempts,
            } => {
                headers.insert(dead_letter::REASON, one_line(reason).as_str());
                headers.insert(dead_letter::ERROR, one_line(error).as_str());
                headers.insert(dead_letter::ATTEMPTS, attempts.to_string().as_str());
                result::DEAD_LETTERED
            }
            Outcome::Cancelled => result::CANCELLED,
            Outcome::Progress => result::PROGRESS,
        };
        headers.insert(result::STATUS, status);
        headers
    }

    /// Reads an outcome message's headers: its job id and outcome.
    pub fn decode(headers: Option<&HeaderMap>) -> Result<(Option<String>, Self), OutcomeError> {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let id = header(result::JOB_ID).map(str::to_owned);
        let outcome = match header(result::STATUS) {
            Some(result::COMPLETED) => Outcome::Completed,
            Some(result::CANCELLED) => Outcome::Cancelled,
            Some(result::PROGRESS) => Outcome::Progress,
            Some(result::DEAD_LETTERED) => Outcome::DeadLettered {
                reason: header(dead_letter::REASON).unwrap_or_default().to_owned(),
                error: header(dead_letter::ERROR).unwrap_or_default().to_owned(),
                attempts: match header(dead_letter::ATTEMPTS) {
                    None => 0,
                    Some(text) => text.parse().map_err(|_| OutcomeError {
                        problem: format!(
                            "has {} {:?}, not a whole number",
                            dead_letter::ATTEMPTS,
                            super::envelope::shown(text)
                        ),
                    })?,
                },
            },
            other => {
                return Err(OutcomeError {
                    problem: format!(
                        "has {} {:?}",
                        result::STATUS,
                        other.map(super::envelope::shown)
                    ),
                });
            }
        };
        Ok((id, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> DeadLetter {
        DeadLetter {
            job_id: "job-1".into(),
            reason: Reason::Malformed,
            error: "bad\nthing".into(),
            attempts: 2,
            pod: "pod-a".into(),
            original_subject: "conveyor.ns.q.jobs.0".into(),
            original_sequence: 41,
        }
    }

    #[test]
    fn reasons_round_trip() {
        for reason in [
            Reason::Permanent,
            Reason::Exhausted,
            Reason::Malformed,
            Reason::MaxDeliveries,
            Reason::DependencyFailed,
            Reason::DependencyTimeout,
        ] {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::parse("nope"), None);
    }

    #[test]
    fn a_dead_letter_keeps_the_original_headers_and_adds_its_own() {
        let mut original = HeaderMap::new();
        original.insert(MSG_ID, "job-1");
        original.insert("X-User", "kept");
        let headers = letter().encode(Original::Headers(Some(&original)), "2026-01-01T00:00:00Z");
        let get = |n: &str| headers.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get(MSG_ID).as_deref(), Some("job-1:41"));
        assert_eq!(get("X-User").as_deref(), Some("kept"));
        assert_eq!(get(dead_letter::ERROR).as_deref(), Some("bad thing"));
        assert_eq!(get(dead_letter::REASON).as_deref(), Some("malformed"));
        assert_eq!(get(ORIGINAL_HEADERS), None);
    }

    #[test]
    fn an_oversized_original_is_kept_as_cut_base64_and_the_copy_fits() {
        let mut original = HeaderMap::new();
        original.insert("X-Big", "y".repeat(65_000).as_str());
        let headers = letter().encode(Original::Headers(Some(&original)), "t");
        assert!(block::wire_len(&headers) <= MAX_BLOCK_BYTES - 1024);
        assert!(headers.get("X-Big").is_none());
        assert!(headers.get(ORIGINAL_HEADERS).is_some());
        assert!(headers.get(ORIGINAL_HEADERS_TRUNCATED).is_some());
        assert_eq!(headers.get(dead_letter::JOB_ID).unwrap().as_str(), "job-1");
    }

    #[test]
    fn a_bad_block_is_kept_whole_when_it_fits() {
        let raw = b"NATS/1.0\r\nX-Note: a\rb\r\nok: 1\r\n\r\n";
        let decoded = block::HeaderBlock::decode(raw).unwrap().header_map();
        let headers = letter().encode(
            Original::Block {
                raw,
                decoded: &decoded,
            },
            "t",
        );
        let kept = base64::engine::general_purpose::STANDARD
            .decode(headers.get(ORIGINAL_HEADERS).unwrap().as_str())
            .unwrap();
        assert_eq!(kept, raw);
        assert_eq!(headers.get("ok").unwrap().as_str(), "1");
        assert!(headers.get(ORIGINAL_HEADERS_TRUNCATED).is_none());
    }

    #[test]
    fn a_header_the_client_read_but_the_grammar_refuses_is_kept_in_the_block_only() {
        let mut original = HeaderMap::new();
        original.insert("X-Nul", "a\0b");
        original.insert("X-Fine", "yes");
        let headers = letter().encode(Original::Headers(Some(&original)), "t");
        assert!(headers.get("X-Nul").is_none());
        assert_eq!(headers.get("X-Fine").unwrap().as_str(), "yes");
        let kept = base64::engine::general_purpose::STANDARD
            .decode(headers.get(ORIGINAL_HEADERS).unwrap().as_str())
            .unwrap();
        assert!(kept.windows(10).any(|w| w == b"X-Nul: a\0b"));
    }

    #[test]
    fn outcomes_round_trip() {
        for outcome in [
            Outcome::Completed,
            Outcome::Cancelled,
            Outcome::Progress,
            Outcome::dead_lettered(&letter()),
        ] {
            let headers = outcome.encode("job-1");
            let (id, back) = Outcome::decode(Some(&headers)).unwrap();
            assert_eq!(id.as_deref(), Some("job-1"));
            match (&outcome, &back) {
                (Outcome::DeadLettered { error, .. }, Outcome::DeadLettered { error: e2, .. }) => {
                    assert_eq!(&one_line(error), e2);
                }
                _ => assert_eq!(outcome, back),
            }
        }
        assert!(Outcome::decode(None).is_err());
        let mut bad = Outcome::Completed.encode("x");
        bad.insert(result::STATUS, "weird");
        assert!(Outcome::decode(Some(&bad)).is_err());
    }
}
