//! Round-trip properties of every wire codec of `conveyor::protocol`: what an encoder writes,
//! its decoder reads back as the same values, for generated inputs across each codec's whole
//! range (the fuzz targets in `fuzz/` cover the hostile side: any bytes at all).

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use base64::Engine as _;
use conveyor::protocol::block::{self, HeaderBlock, MAX_BLOCK_BYTES};
use conveyor::protocol::envelope::{self, MAX_TIMEOUT};
use conveyor::protocol::record::{
    DeadLetter, ORIGINAL_HEADERS, ORIGINAL_HEADERS_TRUNCATED, Original, Outcome, Reason, one_line,
};
use conveyor::protocol::{JobEnvelope, JobOptions, MSG_ID, dead_letter, parse_duration, schedule};
use conveyor::stored::StoredJob;
use proptest::prelude::*;

/// A valid job id: 1–256 visible ASCII characters.
fn job_id() -> impl Strategy<Value = String> {
    "[!-~]{1,256}"
}

/// A header name the grammar takes (visible ASCII without `:`), not one of Conveyor's.
fn header_name() -> impl Strategy<Value = String> {
    "X-[!-9;-~]{1,40}"
}

/// A header value that travels as it is: no CR, LF or NUL, no surrounding blanks (a block's
/// values are read trimmed), any other character.
fn header_value() -> impl Strategy<Value = String> {
    "[^\r\n\0]{0,60}".prop_map(|v| v.trim().to_owned())
}

fn reason() -> impl Strategy<Value = Reason> {
    prop_oneof![
        Just(Reason::Permanent),
        Just(Reason::Exhausted),
        Just(Reason::Malformed),
        Just(Reason::MaxDeliveries),
    ]
}

/// Headers as a client writes them, one line a value.
fn block_bytes(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = b"NATS/1.0\r\n".to_vec();
    for (name, value) in pairs {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn map_of(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(name.as_str(), value.as_str());
    }
    map
}

proptest! {
    #[test]
    fn job_options_write_then_parse_to_the_same(
        max_attempts in proptest::option::of(1..=u32::MAX),
        timeout_ms in proptest::option::of(1..=MAX_TIMEOUT.as_millis() as u64),
    ) {
        let options = JobOptions {
            max_attempts,
            timeout: timeout_ms.map(Duration::from_millis),
        };
        let mut headers = HeaderMap::new();
        options.write(&mut headers);
        prop_assert_eq!(JobOptions::parse(Some(&headers)), Ok(options.clone()));
        let job = JobEnvelope::decode(Some(&headers), "conveyor_ns_q", 1).unwrap();
        prop_assert_eq!(job.options, options);
    }

    #[test]
    fn durations_parse_to_what_they_say(n in 0..=999_999_999_999u64, unit in 0..4usize) {
        let (suffix, expected) = [
            ("ms", Duration::from_millis(n)),
            ("s", Duration::from_secs(n)),
            ("m", Duration::from_secs(n * 60)),
            ("h", Duration::from_secs(n * 3600)),
        ][unit];
        let expected = Some(expected).filter(|d| !d.is_zero());
        prop_assert_eq!(parse_duration(&format!(" {n}{suffix} ")), expected);
        // At most 12 digits, leading zeros included.
        let padded = parse_duration(&format!("0{n}{suffix}"));
        prop_assert_eq!(padded, expected.filter(|_| n.to_string().len() < 12));
    }

    #[test]
    fn outcomes_encode_then_decode_to_the_same(
        id in job_id(),
        which in 0..4u8,
        reason in any::<String>(),
        error in any::<String>(),
        attempts in any::<u64>(),
    ) {
        let outcome = match which {
            0 => Outcome::Completed,
            1 => Outcome::Cancelled,
            2 => Outcome::Progress,
            _ => Outcome::DeadLettered { reason: reason.clone(), error: error.clone(), attempts },
        };
        let (back_id, back) = Outcome::decode(Some(&outcome.encode(&id))).unwrap();
        prop_assert_eq!(back_id, Some(id));
        let expected = match outcome {
            Outcome::DeadLettered { .. } => Outcome::DeadLettered {
                reason: one_line(&reason),
                error: one_line(&error),
                attempts,
            },
            other => other,
        };
        prop_assert_eq!(back, expected);
    }

    #[test]
    fn well_formed_header_bytes_decode_to_the_same_headers(
        pairs in proptest::collection::vec((header_name(), header_value()), 0..20),
    ) {
        let bytes = block_bytes(&pairs);
        let block = HeaderBlock::decode(&bytes).unwrap();
        prop_assert!(block.bad.is_empty(), "{:?}", block.bad);
        prop_assert_eq!(&block.headers, &pairs);
        let map = block.header_map();
        prop_assert_eq!(block::wire_len(&map), bytes.len());
        prop_assert_eq!(block::wire_len(&map_of(&pairs)), bytes.len());
        for (name, _) in &pairs {
            let want: Vec<&str> = pairs.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
            let got: Vec<&str> = map.get_all(name.as_str()).map(|v| v.as_str()).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_stored_job_reads_its_own_id_and_reply_subject(
        id in job_id(),
        inbox in "[A-Za-z0-9]{1,40}(\\.[A-Za-z0-9]{1,20}){0,3}",
        pairs in proptest::collection::vec((header_name(), header_value()), 0..8),
    ) {
        let reply = format!("{}{inbox}", envelope::INBOX_PREFIX);
        let mut all = pairs.clone();
        all.push((MSG_ID.into(), id.clone()));
        all.push(("Conveyor-Reply-To".into(), reply.clone()));
        let job = StoredJob {
            subject: "conveyor.ns.q.jobs.0".into(),
            sequence: 9,
            raw_headers: Some(block_bytes(&all)),
            payload: Default::default(),
            time: String::new(),
        };
        let reading = job.read("conveyor_ns_q");
        prop_assert_eq!(reading.id, id);
        prop_assert_eq!(reading.malformed, None);
        prop_assert_eq!(reading.reply_to, Some(reply));
    }

    #[test]
    fn due_times_in_range_write_the_second_they_name(
        seconds in 0..schedule::LATEST as u64,
        nanos in 0..1_000_000_000u32,
    ) {
        let at = SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos);
        let value = schedule::at(at).unwrap();
        let text = value.strip_prefix("@at ").unwrap();
        let back: jiff::Timestamp = text.parse().unwrap();
        prop_assert_eq!(back.as_second() as u64, seconds + u64::from(nanos > 0));
        prop_assert!(back.as_nanosecond() >= at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128);
    }

    #[test]
    fn due_times_past_the_latest_are_refused(extra in 1..1_000_000_000u64) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(schedule::LATEST as u64 + extra);
        prop_assert!(schedule::at(at).is_err());
    }
}

proptest! {
    // Dead letters of up to 64 KiB each: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn dead_letters_keep_what_failed_and_fit(
        id in job_id(),
        reason in reason(),
        error in any::<String>(),
        pod in any::<String>(),
        attempts in any::<u64>(),
        sequence in any::<u64>(),
        level in 0..10u8,
        pairs in proptest::collection::vec((header_name(), header_value()), 0..10),
        big in proptest::option::of(0..70_000usize),
        as_block in any::<bool>(),
    ) {
        let mut pairs = pairs;
        if let Some(len) = big {
            pairs.push(("X-Big".into(), "b".repeat(len)));
        }
        let letter = DeadLetter {
            job_id: id.clone(),
            reason,
            error: error.clone(),
            attempts,
            pod: pod.clone(),
            original_subject: format!("conveyor.ns.q.jobs.{level}"),
            original_sequence: sequence,
        };
        let raw = block_bytes(&pairs);
        let original = map_of(&pairs);
        let headers = if as_block {
            letter.encode(Original::Block { raw: &raw, decoded: &original }, "2026-01-01T00:00:00Z")
        } else {
            letter.encode(Original::Headers(Some(&original)), "2026-01-01T00:00:00Z")
        };
        prop_assert!(block::wire_len(&headers) <= MAX_BLOCK_BYTES - 1024);
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        prop_assert_eq!(get(MSG_ID), Some(format!("{id}:{sequence}")));
        prop_assert_eq!(get(dead_letter::JOB_ID), Some(id));
        prop_assert_eq!(get(dead_letter::REASON).and_then(|r| Reason::parse(&r)), Some(reason));
        prop_assert_eq!(get(dead_letter::ERROR), Some(one_line(&error)));
        prop_assert_eq!(get(dead_letter::POD), Some(one_line(&pod)));
        prop_assert_eq!(get(dead_letter::ATTEMPTS), Some(attempts.to_string()));
        prop_assert_eq!(get(dead_letter::SUBJECT), Some(letter.original_subject.clone()));
        prop_assert_eq!(get(dead_letter::SEQUENCE), Some(sequence.to_string()));
        // The original travels as headers when it fits, else as its block (cut to fit).
        match get(ORIGINAL_HEADERS) {
            None => {
                prop_assert!(!as_block);
                for (name, value) in &pairs {
                    prop_assert!(headers.get_all(name.as_str()).any(|v| v.as_str() == value));
                }
            }
            Some(copy) => {
                let kept = base64::engine::general_purpose::STANDARD.decode(copy).unwrap();
                match get(ORIGINAL_HEADERS_TRUNCATED) {
                    None if as_block => prop_assert_eq!(&kept, &raw),
                    None => {
                        let back = HeaderBlock::decode(&kept).unwrap();
                        prop_assert_eq!(back.headers.len(), pairs.len());
                    }
                    Some(whole) => {
                        prop_assert!(kept.len() < whole.parse::<usize>().unwrap());
                        prop_assert!(kept.starts_with(b"NATS/1.0\r\n"));
                    }
                }
            }
        }
        // And it can be read the way the dead-letter tools read it: as a stored block.
        let mut pairs_back = Vec::new();
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            for value in values {
                prop_assert!(block::check_value(value.as_str()).is_ok());
                pairs_back.push((name.to_owned(), value.as_str().to_owned()));
            }
        }
        let stored = HeaderBlock::decode(&block_bytes(&pairs_back)).unwrap();
        prop_assert!(stored.bad.is_empty(), "{:?}", stored.bad);
    }
}

/// The regressions the fuzzers found, as plain examples (their inputs are also replayed by
/// `fuzz_corpus.rs`).
#[test]
fn a_producers_original_headers_never_pass_for_the_dead_letters_copy() {
    let letter = DeadLetter {
        job_id: "j".into(),
        reason: Reason::Malformed,
        error: "e".into(),
        attempts: 1,
        pod: "p".into(),
        original_subject: "conveyor.ns.q.jobs.0".into(),
        original_sequence: 3,
    };
    let pairs = [
        (ORIGINAL_HEADERS.to_owned(), "Zm9v".to_owned()),
        (ORIGINAL_HEADERS_TRUNCATED.to_owned(), "5".to_owned()),
    ];
    let raw = block_bytes(&pairs);
    let map = map_of(&pairs);
    for headers in [
        letter.encode(Original::Headers(Some(&map)), "t"),
        letter.encode(
            Original::Block {
                raw: &raw,
                decoded: &map,
            },
            "t",
        ),
    ] {
        let copy = headers.get(ORIGINAL_HEADERS).unwrap().as_str();
        let kept = base64::engine::general_purpose::STANDARD
            .decode(copy)
            .unwrap();
        let mut kept = HeaderBlock::decode(&kept).unwrap().headers;
        kept.sort();
        assert_eq!(kept, pairs);
        assert!(headers.get(ORIGINAL_HEADERS_TRUNCATED).is_none());
    }
}

#[test]
fn the_latest_due_time_can_be_scheduled() {
    let latest = SystemTime::UNIX_EPOCH + Duration::from_secs(schedule::LATEST as u64);
    assert_eq!(schedule::at(latest).unwrap(), "@at 9999-12-30T22:00:00Z");
    assert!(schedule::at(latest + Duration::from_nanos(1)).is_err());
}
