//! A hostile producer: raw publishes (header blocks sent byte for byte, as any NATS client of
//! any language could) into one queue, beside 100 good jobs and a second queue nobody should
//! touch. Two real `conveyor-worker` runtimes and the dispatcher serve the queue. Every row
//! states how its message must end — refused at publish, dead-lettered with a reason, or
//! processed — and the test checks each one, that every good job completed, that no runtime
//! exited or panicked in Conveyor's code, that the other queue kept every job, and that the
//! work stream, the dead-letter stream and the advisories account for every message.
//!
//! Needs `cargo build -p conveyor-worker --bins` (`make test` builds every binary first).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use conveyor::admin::{self, QueueSettings};
use conveyor::names::{QueueRef, env};
use conveyor::protocol;
use conveyor::{Client, JobResult};
use conveyor_operator::dispatcher::Dispatcher;
use conveyor_testkit::dead_letters;
use conveyor_testkit::raw::{Answer, RawPublisher};
use conveyor_testkit::{NatsServer, stream_messages, wait_for};
use futures::StreamExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(180);
const GOOD_JOBS: usize = 100;
/// Largest job the hostile queue accepts (payload plus headers).
const MAX_JOB_SIZE: usize = 256 * 1024;

/// How a hostile message must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server refuses the publish; nothing is stored.
    Refused,
    /// It lands in the dead-letter stream with this `Conveyor-Reason`.
    DeadLettered(&'static str),
    /// A handler runs it and it completes.
    Processed,
}

/// One row of the table.
struct Case {
    name: &'static str,
    /// Job subject level (`None`: level 0 of the hostile queue) or a whole subject.
    subject: Option<String>,
    /// Header lines after `NATS/1.0`, each without its CRLF; `None` sends no headers at all.
    lines: Option<Vec<Vec<u8>>>,
    /// Add `Nats-Msg-Id: case-<n>` (false for the rows about ids).
    with_id: bool,
    payload: Vec<u8>,
    end: End,
}

fn case(name: &'static str, lines: &[&[u8]], end: End) -> Case {
    Case {
        name,
        subject: None,
        lines: Some(lines.iter().map(|l| l.to_vec()).collect()),
        with_id: true,
        payload: name.as_bytes().to_vec(),
        end,
    }
}

fn without_id(mut case: Case) -> Case {
    case.with_id = false;
    case
}

const MALFORMED: End = End::DeadLettered("malformed");

fn table(other: &QueueRef) -> Vec<Case> {
    let purge = format!("Conveyor-Reply-To: $JS.API.STREAM.PURGE.{}", other.stream());
    let delete = format!(
        "Conveyor-Reply-To: $JS.API.STREAM.DELETE.{}",
        other.stream()
    );
    let other_jobs = format!("Conveyor-Reply-To: {}", other.job_subject(0));
    let pad_under = format!("X-Pad: {}", "p".repeat(65_200));
    let pad_over = format!("X-Pad: {}", "p".repeat(66_000));
    let long_id = format!("Nats-Msg-Id: {}", "i".repeat(10_000));
    let mut cases = vec![
        // Bytes the NATS client cannot carry: each delivery costs a worker its connection
        // (async-nats 0.51 panics on a bare CR, drops the connection on the rest); the runtime
        // reconnects, and after the last delivery the dispatcher, which reads the block itself,
        // dead-letters it.
        case("cr in a value", &[b"X-Note: line1\rline2"], MALFORMED),
        case("lf in a value", &[b"X-Note: line1\nline2"], MALFORMED),
        case("non-utf-8 value", &[b"X-Note: \xff\xfe"], MALFORMED),
        case("cr in a name", &[b"X\rNote: v"], MALFORMED),
        case("non-utf-8 name", &[b"X-\xffNote: v"], MALFORMED),
        case("line without a colon", &[b"just some words"], MALFORMED),
        // The server drops a status from a stored message's version line: a plain job.
        case("status on the version line", &[], End::Processed),
        // Bytes the client reads but the protocol refuses: the worker dead-letters at once.
        case("nul in a value", &[b"X-Note: a\0b"], MALFORMED),
        case(
            "max-attempts not a number",
            &[b"Conveyor-Max-Attempts: lots"],
            MALFORMED,
        ),
        case(
            "max-attempts negative",
            &[b"Conveyor-Max-Attempts: -1"],
            MALFORMED,
        ),
        case(
            "max-attempts zero",
            &[b"Conveyor-Max-Attempts: 0"],
            MALFORMED,
        ),
        case(
            "max-attempts huge",
            &[b"Conveyor-Max-Attempts: 99999999999"],
            MALFORMED,
        ),
        case(
            "max-attempts empty",
            &[b"Conveyor-Max-Attempts:"],
            MALFORMED,
        ),
        case(
            "max-attempts twice, different",
            &[b"Conveyor-Max-Attempts: 2", b"Conveyor-Max-Attempts: 3"],
            MALFORMED,
        ),
        case(
            "max-attempts twice, same",
            &[b"Conveyor-Max-Attempts: 2", b"Conveyor-Max-Attempts: 2"],
            End::Processed,
        ),
        case("timeout garbage", &[b"Conveyor-Timeout: soon"], MALFORMED),
        case(
            "timeout u64 max",
            &[b"Conveyor-Timeout: 18446744073709551615s"],
            MALFORMED,
        ),
        case("timeout negative", &[b"Conveyor-Timeout: -5s"], MALFORMED),
        case("timeout zero", &[b"Conveyor-Timeout: 0s"], MALFORMED),
        case("timeout empty", &[b"Conveyor-Timeout:"], MALFORMED),
        case(
            "timeout over a week",
            &[b"Conveyor-Timeout: 999999h"],
            MALFORMED,
        ),
        case("timeout in days", &[b"Conveyor-Timeout: 7d"], MALFORMED),
        case("timeout fine", &[b"Conveyor-Timeout: 30s"], End::Processed),
        case("priority garbage", &[b"Conveyor-Priority: high"], MALFORMED),
        case(
            "priority out of range",
            &[b"Conveyor-Priority: 256"],
            MALFORMED,
        ),
        without_id(case("no job id", &[b"X-Note: hi"], End::Processed)),
        without_id(Case {
            lines: None,
            ..case("no headers at all", &[], End::Processed)
        }),
        without_id(case("empty job id", &[b"Nats-Msg-Id:"], End::Processed)),
        without_id(case("10 KB job id", &[long_id.as_bytes()], MALFORMED)),
        without_id(case(
            "path-like job id",
            &[b"Nats-Msg-Id: ../../etc/passwd"],
            End::Processed,
        )),
        without_id(case(
            "wildcard job id",
            &[b"Nats-Msg-Id: a.*.>"],
            End::Processed,
        )),
        case(
            "job id header with a space",
            &[b"Conveyor-Job-Id: a b"],
            MALFORMED,
        ),
        case(
            "job id header twice",
            &[b"Conveyor-Job-Id: a", b"Conveyor-Job-Id: b"],
            MALFORMED,
        ),
        case(
            "reply into STREAM.PURGE",
            &[purge.as_bytes()],
            End::Processed,
        ),
        case(
            "reply into STREAM.DELETE",
            &[delete.as_bytes()],
            End::Processed,
        ),
        case(
            "reply into $SYS",
            &[b"Conveyor-Reply-To: $SYS.REQ.SERVER.PING"],
            End::Processed,
        ),
        case(
            "reply into another queue",
            &[other_jobs.as_bytes()],
            End::Processed,
        ),
        case(
            "reply to a wildcard",
            &[b"Conveyor-Reply-To: _INBOX.>"],
            End::Processed,
        ),
        case(
            "reply to an inbox",
            &[b"Conveyor-Reply-To: _INBOX.hostile.answer"],
            End::Processed,
        ),
        case(
            "unknown Conveyor header",
            &[b"Conveyor-Whatever: x"],
            End::Processed,
        ),
        case(
            "forged dead-letter headers",
            &[b"Conveyor-Reason: permanent", b"Conveyor-Error: forged"],
            End::Processed,
        ),
        case(
            "header just under 64 KiB",
            &[pad_under.as_bytes()],
            End::Processed,
        ),
        case(
            "header just under 64 KiB and a bad timeout",
            &[pad_under.as_bytes(), b"Conveyor-Timeout: soon"],
            MALFORMED,
        ),
        case(
            "header just under 64 KiB and a bare CR",
            &[pad_under.as_bytes(), b"X-Note: a\rb"],
            MALFORMED,
        ),
        case("header over 64 KiB", &[pad_over.as_bytes()], End::Refused),
    ];
    let mut oversized = case("payload over maxJobSize", &[], End::Refused);
    oversized.payload = vec![b'x'; MAX_JOB_SIZE + 1024];
    cases.push(oversized);
    let mut unknown_level = case("unknown priority level", &[], End::Refused);
    unknown_level.subject = Some("7".into());
    cases.push(unknown_level);
    cases
}

/// The header block of a row (`NATS/1.0 503` for the status row).
fn block(case: &Case, index: usize) -> Option<Vec<u8>> {
    let lines = case.lines.as_ref()?;
    let mut out: Vec<u8> = if case.name == "status on the version line" {
        b"NATS/1.0 503\r\n".to_vec()
    } else {
        b"NATS/1.0\r\n".to_vec()
    };
    if case.with_id {
        out.extend_from_slice(format!("Nats-Msg-Id: case-{index}\r\n").as_bytes());
    }
    for line in lines {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// The built `conveyor-worker`.
fn runtime_binary() -> PathBuf {
    conveyor_testkit::workspace_binary("conveyor-worker")
}

fn runtime(nats: &NatsServer, queue: &QueueRef, name: &str, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(runtime_binary())
        .args(["run", "--", "/bin/sh", "-c", "cat >/dev/null"])
        .env(env::NATS_URL, nats.url())
        .env(env::QUEUE_NAMESPACE, &queue.namespace)
        .env(env::QUEUE_NAME, &queue.name)
        .env(env::HANDLER_MODE, "exec")
        .env(env::POD_NAME, name)
        .env(env::CONCURRENCY, "4")
        .env(env::POLL_WAIT, "300ms")
        .env(env::STORE_RESULTS, "true")
        .env(env::BACKOFF_INITIAL, "100ms")
        .env(env::BACKOFF_MAX, "200ms")
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Every dead letter by its original work-stream sequence: (reason, error, whole headers).
async fn dead_letters(
    js: &jetstream::Context,
    queue: &QueueRef,
) -> HashMap<u64, (String, String, async_nats::HeaderMap)> {
    let mut out = HashMap::new();
    for message in dead_letters::read_all(js, queue).await.unwrap() {
        let get = |n: &str| dead_letters::header(&message, n);
        let sequence: u64 = get(protocol::dead_letter::SEQUENCE).parse().unwrap();
        let entry = (
            get(protocol::dead_letter::REASON),
            get(protocol::dead_letter::ERROR),
            message.headers.clone().unwrap_or_default(),
        );
        assert!(
            out.insert(sequence, entry).is_none(),
            "job {sequence} dead-lettered twice"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_end_as_their_row_says_and_good_jobs_complete() {
    let nats = NatsServer::start().await.unwrap();
    let client = Client::connect(&nats.url()).await.unwrap();
    let js = client.jetstream().clone();
    let queue = QueueRef::new("test", "hostile");
    let other = QueueRef::new("test", "other");
    let settings = QueueSettings {
        // Each unreadable job costs a worker its connection on every delivery; the good jobs
        // running there come back after the ack wait, so they get attempts to spare.
        max_attempts: 6,
        timeout: Duration::from_secs(2),
        max_job_size: Some(i32::try_from(MAX_JOB_SIZE).unwrap()),
        ..Default::default()
    };
    admin::ensure_queue(&js, &queue, &settings).await.unwrap();
    admin::ensure_queue(&js, &other, &QueueSettings::default())
        .await
        .unwrap();
    for i in 0..5 {
        client
            .submit(&other, conveyor::Job::new(format!("kept-{i}"), "kept"))
            .await
            .unwrap();
    }
    // A cancellation no client can read, published straight into the cancellations stream:
    // every worker reads them all from the start, so it must not take each new client down.
    let mut raw = RawPublisher::connect(nats.port()).await.unwrap();
    let poisoned_cancel = raw
        .publish(
            &queue.cancel_subject("nobody"),
            Some(b"NATS/1.0\r\nConveyor-Job-Id: nobody\r\nX-Note: a\rb\r\n\r\n"),
            b"",
        )
        .await
        .unwrap();
    assert!(poisoned_cancel.sequence().is_some(), "{poisoned_cancel:?}");
    let answers = client
        .jetstream()
        .client()
        .subscribe("_INBOX.hostile.answer")
        .await
        .unwrap();

    let logs = tempfile::tempdir().unwrap();
    let mut workers = vec![
        runtime(&nats, &queue, "worker-a", &logs.path().join("a.log")),
        runtime(&nats, &queue, "worker-b", &logs.path().join("b.log")),
    ];
    let stop = CancellationToken::new();
    let dispatcher_client = async_nats::connect(nats.url()).await.unwrap();
    let dispatcher = tokio::spawn(
        Dispatcher::new(dispatcher_client, {
            let served = vec![queue.clone(), other.clone()];
            Arc::new(move || served.clone())
        })
        .interval(Duration::from_millis(200))
        .run(stop.clone()),
    );

    // Good jobs before, between and after the hostile ones.
    let good = |range: std::ops::Range<usize>| {
        range
            .map(|i| conveyor::Job::new(format!("good-{i}"), "good"))
            .collect::<Vec<_>>()
    };
    for result in client.submit_batch(&queue, good(0..50)).await {
        result.unwrap();
    }
    let cases = table(&other);
    assert!(cases.len() >= 40, "the table has {} rows", cases.len());
    let mut stored: BTreeMap<usize, u64> = BTreeMap::new();
    for (index, case) in cases.iter().enumerate() {
        let subject = match &case.subject {
            Some(level) => format!("{}.jobs.{level}", queue.subject_prefix()),
            None => queue.job_subject(0),
        };
        let answer = raw
            .publish(&subject, block(case, index).as_deref(), &case.payload)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        match (case.end, answer.sequence()) {
            (End::Refused, None) => {
                if let Answer::ProtocolError(_) = answer {
                    raw = RawPublisher::connect(nats.port()).await.unwrap();
                }
            }
            (End::Refused, Some(_)) => panic!("{}: stored, expected a refusal", case.name),
            (_, Some(sequence)) => {
                stored.insert(index, sequence);
            }
            (_, None) => panic!("{}: refused with {answer:?}", case.name),
        }
    }
    for result in client.submit_batch(&queue, good(50..GOOD_JOBS)).await {
        result.unwrap();
    }

    let expected_dead = cases
        .iter()
        .filter(|c| matches!(c.end, End::DeadLettered(_)))
        .count() as u64;
    let settled = wait_for(
        DEADLINE,
        "every job settled and every advisory handled",
        || async {
            stream_messages(&js, &queue.stream()).await == 0
                && stream_messages(&js, &queue.events_stream()).await == 0
                && stream_messages(&js, &queue.dead_letter_stream()).await >= expected_dead
        },
    )
    .await;
    if let Err(error) = settled {
        let mut report = format!(
            "{error}: work {} events {} dead letters {} of {expected_dead}\n",
            stream_messages(&js, &queue.stream()).await,
            stream_messages(&js, &queue.events_stream()).await,
            stream_messages(&js, &queue.dead_letter_stream()).await,
        );
        for name in ["a.log", "b.log"] {
            let log = std::fs::read_to_string(logs.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            report.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                report.push_str(line);
                report.push('\n');
            }
        }
        panic!("{report}");
    }

    let letters = dead_letters(&js, &queue).await;
    let names: HashMap<u64, &str> = stored
        .iter()
        .map(|(index, sequence)| (*sequence, cases[*index].name))
        .collect();
    let summary: Vec<String> = letters
        .iter()
        .map(|(sequence, (reason, error, _))| {
            let name = names.get(sequence).copied().unwrap_or("a good job");
            format!("{name} (#{sequence}): {reason}: {error}")
        })
        .collect();
    assert_eq!(letters.len() as u64, expected_dead, "{summary:#?}");
    let stream = queue.stream();
    for (index, case) in cases.iter().enumerate() {
        let Some(&sequence) = stored.get(&index) else {
            continue;
        };
        match case.end {
            End::DeadLettered(reason) => {
                let (got, error, headers) = letters
                    .get(&sequence)
                    .unwrap_or_else(|| panic!("{}: not dead-lettered", case.name));
                assert_eq!(got, reason, "{}: {error}", case.name);
                assert!(!error.is_empty(), "{}: no error", case.name);
                assert!(
                    protocol::block::wire_len(headers) < protocol::block::MAX_BLOCK_BYTES,
                    "{}",
                    case.name
                );
            }
            End::Processed => {
                assert!(
                    !letters.contains_key(&sequence),
                    "{}: dead-lettered: {:?}",
                    case.name,
                    letters[&sequence].1
                );
                let id = match (case.with_id, case.name) {
                    (true, _) => format!("case-{index}"),
                    (false, "path-like job id") => "../../etc/passwd".into(),
                    (false, "wildcard job id") => "a.*.>".into(),
                    (false, _) => protocol::envelope::fallback_id(&stream, sequence),
                };
                let result = client.result(&queue, &id).await.unwrap();
                assert!(
                    matches!(result, Some(JobResult::Completed { .. })),
                    "{}: {result:?}",
                    case.name
                );
            }
            End::Refused => unreachable!("refused rows are never stored"),
        }
    }
    for i in 0..GOOD_JOBS {
        let result = client.result(&queue, &format!("good-{i}")).await.unwrap();
        assert!(
            matches!(result, Some(JobResult::Completed { .. })),
            "good-{i}: {result:?}"
        );
    }
    // The one well-formed inbox was answered; nothing reached the other queue.
    let mut answers = answers;
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("the inbox got its answer")
        .unwrap();
    let (_, outcome) = protocol::Outcome::decode(answer.headers.as_ref()).unwrap();
    assert_eq!(outcome, protocol::Outcome::Completed);
    assert_eq!(
        stream_messages(&js, &other.stream()).await,
        5,
        "the other queue kept every job"
    );
    assert_eq!(
        stream_messages(&js, &queue.cancel_stream()).await,
        0,
        "the unreadable cancellation was swept"
    );

    for worker in &mut workers {
        assert!(
            worker.try_wait().unwrap().is_none(),
            "a runtime exited during the hostile run"
        );
    }
    stop.cancel();
    dispatcher.await.unwrap();
    for worker in &mut workers {
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
    }
    for name in ["a.log", "b.log"] {
        let log = std::fs::read_to_string(logs.path().join(name)).unwrap();
        for line in log.lines().filter(|l| l.contains("panicked at")) {
            // async-nats 0.51 asserts on a bare CR in its own connection task (it is the
            // newest release); that is what the runtime recovers from. Nothing else may panic.
            assert!(
                line.contains("async-nats"),
                "a runtime panicked outside the NATS client: {line}"
            );
        }
    }
}
