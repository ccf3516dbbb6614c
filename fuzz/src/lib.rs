//! The bodies of the fuzz targets, as plain functions over bytes: `cargo fuzz run <name>` calls
//! them through `fuzz_targets/<name>.rs`, and `sdk/tests/fuzz_corpus.rs` includes this file to
//! feed them every input of `fuzz/corpus/` and `fuzz/regressions/` in `make test`. Each one
//! panics (a finding) when a codec panics or breaks one of the properties asserted here.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use base64::Engine as _;
use conveyor::protocol::block::{self, HeaderBlock, MAX_BLOCK_BYTES};
use conveyor::protocol::record::{
    self, DeadLetter, ORIGINAL_HEADERS, ORIGINAL_HEADERS_TRUNCATED, Original, Outcome, Reason,
};
use conveyor::protocol::{
    self, JobEnvelope, JobOptions, MSG_ID, dead_letter, envelope, parse_duration, schedule,
};
use conveyor::stored::StoredJob;

/// The CLI's input module, compiled here as it is in the binary (it is private to
/// `conveyor-cli`): the JSON Lines target drives its public [`input::Jsonl`].
#[allow(dead_code, unreachable_pub)]
#[path = "../../cli/src/input.rs"]
mod input;

/// What a dead letter's header block may use (see `protocol::record`).
const DEAD_LETTER_BUDGET: usize = MAX_BLOCK_BYTES - 1024;
/// Stream name used for fallback ids.
const STREAM: &str = "conveyor_ns_q";

/// `HeaderBlock::decode` of any bytes: never panics, never yields a header that fails the
/// grammar, its map never panics and writes as many bytes as the headers re-encoded, the
/// re-encoded headers decode to themselves, and a stored job with the block reads.
pub fn header_block(data: &[u8]) {
    let block = match HeaderBlock::decode(data) {
        Ok(block) => block,
        Err(_) => {
            assert!(!data.starts_with(b"NATS/1.0"));
            read_stored(Some(data));
            return;
        }
    };
    for (name, value) in &block.headers {
        assert!(block::check_name(name.as_bytes()).is_ok(), "name {name:?}");
        assert!(block::check_value(value).is_ok(), "value {value:?}");
        assert_eq!(value.trim(), value, "values come trimmed");
    }
    let map = block.header_map();
    let again = encode_pairs(&block.headers);
    assert_eq!(block::wire_len(&map), again.len());
    let back = HeaderBlock::decode(&again).expect("re-encoded block has the version line");
    assert!(
        back.bad.is_empty(),
        "re-encoded block is clean: {:?}",
        back.bad
    );
    assert_eq!(back.headers, block.headers);
    read_stored(Some(data));
}

/// A stored job with this header block reads without panicking; a block with unreadable lines
/// is always reported malformed.
fn read_stored(raw: Option<&[u8]>) {
    let job = StoredJob {
        subject: "conveyor.ns.q.jobs.0".into(),
        sequence: 7,
        raw_headers: raw.map(<[u8]>::to_vec),
        payload: bytes::Bytes::new(),
        time: String::new(),
    };
    let reading = job.read(STREAM);
    if !reading.unreadable.is_empty() {
        assert!(reading.malformed.is_some());
    }
    assert!(!reading.id.is_empty());
    if let Some(reply) = &reading.reply_to {
        assert!(reply.starts_with(envelope::INBOX_PREFIX));
    }
}

/// The job, outcome and dead-letter codecs over one fuzzed header block.
///
/// Input: byte 0 picks the dead letter's reason and subject and, when its two top bits are set,
/// adds a padding header (to reach the 64 KiB bound) of byte 1 times 256 bytes, bytes 2..10 the sequence and
/// attempts; the rest is the block after its `NATS/1.0` line, the error text and the pod name,
/// split at `0xff` bytes.
pub fn records(data: &[u8]) {
    if data.len() < 10 {
        return;
    }
    let (head, rest) = data.split_at(10);
    let sequence = u64::from(u32::from_le_bytes(head[2..6].try_into().unwrap()));
    let attempts = u64::from(u32::from_le_bytes(head[6..10].try_into().unwrap()));
    let mut parts = rest.splitn(3, |&b| b == 0xff);
    let lines = parts.next().unwrap_or_default();
    let error = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let pod = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();

    let mut raw = b"NATS/1.0\r\n".to_vec();
    raw.extend_from_slice(lines);
    if head[0] & 0xc0 == 0xc0 {
        raw.extend_from_slice(b"\r\nX-Pad: ");
        raw.extend(std::iter::repeat_n(b'p', usize::from(head[1]) * 256));
    }
    raw.extend_from_slice(b"\r\n\r\n");
    let block = HeaderBlock::decode(&raw).expect("starts with the version line");
    let map = block.header_map();
    let lenient = client_map(&raw);

    // The job envelope.
    let id = match JobEnvelope::decode(Some(&map), STREAM, sequence) {
        Ok(job) => {
            check_envelope(&job, sequence);
            job.id
        }
        Err(malformed) => {
            assert!(
                malformed.id == envelope::fallback_id(STREAM, sequence)
                    || protocol::validate_id(&malformed.id).is_ok()
            );
            malformed.id
        }
    };
    if let Ok(job) = JobEnvelope::decode(Some(&lenient), STREAM, sequence) {
        check_envelope(&job, sequence);
    }

    // The outcome: what decodes encodes back to itself (after `one_line`).
    if let Ok((outcome_id, outcome)) = Outcome::decode(Some(&map)) {
        let outcome = normal(outcome);
        let outcome_id = outcome_id
            .filter(|id| protocol::validate_id(id).is_ok())
            .unwrap_or_else(|| id.clone());
        let (back_id, back) =
            Outcome::decode(Some(&outcome.encode(&outcome_id))).expect("an encoded outcome");
        assert_eq!(back_id.as_deref(), Some(outcome_id.as_str()));
        assert_eq!(back, outcome);
    }

    // The dead letter, from the block as stored and from the headers the client read.
    let reason = [
        Reason::Permanent,
        Reason::Exhausted,
        Reason::Malformed,
        Reason::MaxDeliveries,
    ][usize::from(head[0] & 3)];
    let letter = DeadLetter {
        job_id: id,
        reason,
        error,
        attempts,
        pod,
        original_subject: format!("conveyor.ns.q.jobs.{}", head[0] & 7),
        original_sequence: sequence,
    };
    let failed_at = "2026-12-01T20:55:00.123456789Z";
    let from_block = letter.encode(
        Original::Block {
            raw: &raw,
            decoded: &map,
        },
        failed_at,
    );
    check_dead_letter(&letter, &from_block, failed_at, Some(&raw));
    let from_client = letter.encode(Original::Headers(Some(&lenient)), failed_at);
    check_dead_letter(&letter, &from_client, failed_at, None);
    let bare = letter.encode(Original::Headers(None), failed_at);
    check_dead_letter(&letter, &bare, failed_at, None);
}

fn check_envelope(job: &JobEnvelope, sequence: u64) {
    assert!(
        job.id == envelope::fallback_id(STREAM, sequence) || protocol::validate_id(&job.id).is_ok(),
        "id {:?}",
        job.id
    );
    if let Some(reply) = &job.reply_to {
        assert!(envelope::reply_subject(reply).is_ok());
    }
    if let Some(timeout) = job.options.timeout {
        assert!(!timeout.is_zero() && timeout <= envelope::MAX_TIMEOUT);
    }
    assert_ne!(job.options.max_attempts, Some(0));
    let mut written = HeaderMap::new();
    job.options.write(&mut written);
    assert_eq!(JobOptions::parse(Some(&written)).unwrap(), job.options);
}

/// An outcome as it reads back after encoding: reason and error made one line.
fn normal(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::DeadLettered {
            reason,
            error,
            attempts,
        } => Outcome::DeadLettered {
            reason: record::one_line(&reason),
            error: record::one_line(&error),
            attempts,
        },
        other => other,
    }
}

/// A dead letter fits, says what the letter says, travels as headers, and any copy of the
/// original block it carries is the original's (a prefix of it when cut).
fn check_dead_letter(
    letter: &DeadLetter,
    headers: &HeaderMap,
    failed_at: &str,
    raw: Option<&[u8]>,
) {
    let wire = block::wire_len(headers);
    assert!(wire <= DEAD_LETTER_BUDGET, "dead letter is {wire} bytes");
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(get(MSG_ID), Some(letter.message_id()));
    assert_eq!(
        get(dead_letter::JOB_ID).as_deref(),
        Some(letter.job_id.as_str())
    );
    let reason = get(dead_letter::REASON).and_then(|r| Reason::parse(&r));
    assert_eq!(reason, Some(letter.reason));
    assert_eq!(
        get(dead_letter::ERROR),
        Some(record::one_line(&letter.error))
    );
    assert_eq!(get(dead_letter::POD), Some(record::one_line(&letter.pod)));
    let attempts = get(dead_letter::ATTEMPTS).and_then(|a| a.parse::<u64>().ok());
    assert_eq!(attempts, Some(letter.attempts));
    assert_eq!(get(dead_letter::FAILED_AT).as_deref(), Some(failed_at));
    assert_eq!(
        get(dead_letter::SUBJECT).as_deref(),
        Some(letter.original_subject.as_str())
    );
    let sequence = get(dead_letter::SEQUENCE).and_then(|s| s.parse::<u64>().ok());
    assert_eq!(sequence, Some(letter.original_sequence));
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        assert!(block::check_name(name.as_bytes()).is_ok(), "name {name:?}");
        for value in values {
            assert!(
                block::check_value(value.as_str()).is_ok(),
                "{name}: {value:?}"
            );
        }
    }
    let Some(copy) = get(ORIGINAL_HEADERS) else {
        assert!(get(ORIGINAL_HEADERS_TRUNCATED).is_none());
        return;
    };
    let kept = base64::engine::general_purpose::STANDARD
        .decode(copy)
        .expect("the original block is base64");
    let whole: Option<usize> = get(ORIGINAL_HEADERS_TRUNCATED).map(|n| n.parse().unwrap());
    match (raw, whole) {
        (Some(raw), None) => assert_eq!(kept, raw),
        (Some(raw), Some(whole)) => {
            assert_eq!(whole, raw.len());
            assert!(kept.len() < whole && raw.starts_with(&kept));
        }
        (None, Some(whole)) => assert!(kept.len() < whole && kept.starts_with(b"NATS/1.0\r\n")),
        (None, None) => {
            assert!(
                HeaderBlock::decode(&kept).is_ok(),
                "the copy is a header block"
            );
        }
    }
}

/// The headers as the NATS client would read them: looser than the protocol's grammar (it
/// takes a NUL, a value with surrounding blanks), and lines it would refuse are skipped here
/// (the real client drops the connection on them).
fn client_map(raw: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    let lines = raw.split(|&b| b == b'\n').skip(1);
    for line in lines.filter_map(|l| std::str::from_utf8(l.strip_suffix(b"\r")?).ok()) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (false, Ok(name), Ok(value)) = (
            name.is_empty(),
            name.parse::<HeaderName>(),
            value.trim_start().parse::<HeaderValue>(),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// `parse_duration` and the options and schedule built on it, over any text: durations are
/// positive and bounded, options within their bounds write and parse back, and due times in
/// range format to the second they name.
pub fn duration(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(d) = parse_duration(&text) {
        assert!(!d.is_zero());
        assert!(d <= Duration::from_secs(999_999_999_999 * 3600));
        let millis = d.as_millis();
        if millis <= 999_999_999_999 {
            assert_eq!(parse_duration(&format!("{millis}ms")), Some(d));
        }
    }
    for name in [protocol::TIMEOUT, protocol::MAX_ATTEMPTS] {
        let Ok(value) = text.parse::<HeaderValue>() else {
            break;
        };
        let mut headers = HeaderMap::new();
        headers.insert(name, value);
        if let Ok(options) = JobOptions::parse(Some(&headers)) {
            let mut written = HeaderMap::new();
            options.write(&mut written);
            assert_eq!(JobOptions::parse(Some(&written)).unwrap(), options);
            if let Ok(job) = JobEnvelope::decode(Some(&headers), STREAM, 1) {
                assert_eq!(job.options, options);
            }
        }
    }
    if data.len() >= 8 {
        let seconds = u64::from_le_bytes(data[..8].try_into().unwrap());
        let nanos = u32::from(data.get(8).copied().unwrap_or(0)) * 3_900_000;
        if let Some(at) = SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos)) {
            check_schedule(at, seconds + u64::from(nanos > 0));
        }
    }
}

fn check_schedule(at: SystemTime, due_second: u64) {
    match schedule::at(at) {
        Ok(value) => {
            assert!(due_second <= schedule::LATEST as u64);
            let text = value.strip_prefix("@at ").expect("an @at schedule");
            let back: jiff::Timestamp = text.parse().expect("RFC 3339");
            assert_eq!(back.as_second() as u64, due_second);
            assert!(text.ends_with('Z') && text.len() == 20, "{text}");
        }
        Err(_) => assert!(due_second > schedule::LATEST as u64),
    }
}

/// A JSON Lines input as `conveyor submit --jsonl` reads it: never a panic; an input that
/// passes the check yields every job without an error, with valid ids that are the same on a
/// second reading, and a line that is not a wrapper is sent byte for byte.
pub fn jsonl(data: &[u8]) {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::io::Write::write_all(&mut file, data).expect("write the input");
    let read = || -> Option<Vec<input::JobInput>> {
        let jsonl = input::Jsonl::open(file.path()).ok()?;
        let jobs: Vec<_> = jsonl
            .jobs()
            .collect::<anyhow::Result<_>>()
            .expect("a checked input yields every job");
        Some(jobs)
    };
    let Some(jobs) = read() else {
        return;
    };
    assert!(!jobs.is_empty());
    assert_eq!(read(), Some(jobs.clone()), "a second reading is the same");
    let lines: Vec<&[u8]> = data
        .split_inclusive(|&b| b == b'\n')
        .map(|l| match l.strip_suffix(b"\n") {
            Some(l) => l.strip_suffix(b"\r").unwrap_or(l),
            None => l,
        })
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                l.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(l)
            } else {
                l
            }
        })
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    assert_eq!(lines.len(), jobs.len());
    for (line, job) in lines.iter().zip(&jobs) {
        let id = job.id.as_deref().expect("every JSON Lines job has an id");
        assert!(protocol::validate_id(id).is_ok(), "id {id:?}");
        let text = std::str::from_utf8(line).expect("a checked line is UTF-8");
        if !text.trim_start_matches([' ', '\t', '\r']).starts_with('{') {
            assert_eq!(&job.payload[..], *line, "a plain line is its payload");
        }
    }
}

/// `name: value` lines as the client writes them.
fn encode_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = b"NATS/1.0\r\n".to_vec();
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}
