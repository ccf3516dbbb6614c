//! `conveyor submit` and `conveyor status` as a user runs them: the real binary against a real
//! `nats-server` whose queue was created with the SDK's `ensure_queue` (as the operator would).

use std::path::Path;
use std::process::{Output, Stdio};

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor_testkit::NatsServer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Runs `conveyor <args>` against `nats`, feeding `stdin`, with no CONVEYOR_* from the caller.
async fn conveyor(nats: &str, args: &[&str], stdin: &[u8]) -> Output {
    conveyor_with_env(nats, args, stdin, &[]).await
}

/// [`conveyor`] with environment variables set.
async fn conveyor_with_env(
    nats: &str,
    args: &[&str],
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .envs(env.iter().copied())
        .env("CONVEYOR_NATS_URL", nats)
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conveyor");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin).await.expect("write stdin");
    drop(pipe);
    child.wait_with_output().await.expect("conveyor runs")
}

fn stdout_lines(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "conveyor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn queue(nats: &NatsServer, namespace: &str, name: &str) -> (jetstream::Context, QueueRef) {
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let queue = QueueRef::new(namespace, name);
    ensure_queue(&js, &queue, &QueueSettings::default())
        .await
        .expect("create queue");
    (js, queue)
}

async fn figures(nats: &str, args: &[&str]) -> Value {
    let out = conveyor(nats, &[&["status", "-o", "json"], args].concat(), b"").await;
    let lines = stdout_lines(&out).join("\n");
    serde_json::from_str(&lines).expect("status prints JSON")
}

/// The id and payload of every job in the stream, in order.
async fn jobs(js: &jetstream::Context, queue: &QueueRef) -> Vec<(String, String)> {
    let mut stream = js.get_stream(queue.stream()).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.expect("message");
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push((id, String::from_utf8_lossy(&message.payload).into_owned()));
    }
    out
}

#[tokio::test]
async fn submit_from_argument_file_stdin_and_jsonl() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "hello").await;
    let url = nats.url();

    let out = conveyor(
        &url,
        &["submit", "hello", "--id", "first", r#"{"name":"arg"}"#],
        b"",
    )
    .await;
    assert_eq!(stdout_lines(&out), ["first"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payload.json");
    std::fs::write(&file, b"from a file").expect("write");
    let out = conveyor(
        &url,
        &["submit", "hello", "--id", "file", "--file", path(&file)],
        b"",
    )
    .await;
    assert_eq!(stdout_lines(&out), ["file"]);

    let out = conveyor(&url, &["submit", "hello", "--id", "stdin"], b"from stdin").await;
    assert_eq!(stdout_lines(&out), ["stdin"]);

    let jsonl = dir.path().join("jobs.jsonl");
    std::fs::write(&jsonl, "{\"id\":\"j1\",\"payload\":{\"n\":1}}\n\n{\"id\":\"j2\",\"payload\":\"text\"}\n{\"n\":3}\n")
        .expect("write");
    let out = conveyor(&url, &["submit", "hello", "--jsonl", path(&jsonl)], b"").await;
    let ids = stdout_lines(&out);
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[..2], ["j1", "j2"]);

    let jobs = jobs(&js, &queue).await;
    let expected = [
        ("first", r#"{"name":"arg"}"#),
        ("file", "from a file"),
        ("stdin", "from stdin"),
        ("j1", r#"{"n":1}"#),
        ("j2", "text"),
        (ids[2].as_str(), r#"{"n":3}"#),
    ];
    let jobs: Vec<(&str, &str)> = jobs.iter().map(|(i, p)| (i.as_str(), p.as_str())).collect();
    assert_eq!(jobs, expected);
}

#[tokio::test]
async fn count_submits_distinct_jobs_and_resubmission_is_idempotent() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (_js, _queue) = queue(&nats, "team-a", "load").await;
    let url = nats.url();

    let args = [
        "submit", "load", "-n", "team-a", "--count", "250", "--id", "batch", "x",
    ];
    let ids = stdout_lines(&conveyor(&url, &args, b"").await);
    assert_eq!(ids.len(), 250);
    assert_eq!(ids[0], "batch-1");
    assert_eq!(ids[249], "batch-250");

    // The same ids again are duplicates: reported, not queued twice.
    let out = conveyor(&url, &args, b"").await;
    assert_eq!(stdout_lines(&out).len(), 250);
    assert!(String::from_utf8_lossy(&out.stderr).contains("250 already submitted before"));

    let random = stdout_lines(
        &conveyor(
            &url,
            &["submit", "load", "-n", "team-a", "--count", "10", "y"],
            b"",
        )
        .await,
    );
    assert_eq!(
        random
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        10
    );

    let status = figures(&url, &["-n", "team-a", "load"]).await;
    assert_eq!(status[0]["pending"], 260);
    assert_eq!(status[0]["inFlight"], 0);
    assert_eq!(status[0]["deadLettered"], 0);
}

#[tokio::test]
async fn status_counts_pending_in_flight_and_dead_lettered() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "emails").await;
    let _other = self::queue(&nats, "default", "images.v2").await;
    let _elsewhere = self::queue(&nats, "other", "emails").await;
    let url = nats.url();
    stdout_lines(&conveyor(&url, &["submit", "emails", "--count", "5", "hi"], b"").await);

    // A worker takes two jobs and holds them.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(queue.stream())
        .await
        .unwrap()
        .get_consumer(&queue.consumer(0))
        .await
        .unwrap();
    let _held = conveyor_testkit::take(&consumer, 2, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    // One job ends in the dead-letter queue.
    js.publish(queue.dead_letter_subject(), "failed".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let all = figures(&url, &[]).await;
    let queues: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["queue"].as_str().unwrap())
        .collect();
    assert_eq!(queues, ["emails", "images.v2"]);
    assert_eq!(all[0]["pending"], 3);
    assert_eq!(all[0]["inFlight"], 2);
    assert_eq!(all[0]["deadLettered"], 1);

    let table = stdout_lines(&conveyor(&url, &["status", "emails"], b"").await);
    assert_eq!(table.len(), 2, "{table:?}");
    assert!(table[0].starts_with("NAMESPACE"));
    let cells: Vec<&str> = table[1].split_whitespace().collect();
    assert_eq!(cells, ["default", "emails", "3", "2", "1"]);
}

#[tokio::test]
async fn errors_exit_non_zero_with_a_clear_message() {
    let nats = NatsServer::start().await.expect("nats-server");
    let url = nats.url();

    let out = conveyor(&url, &["submit", "missing", "x"], b"").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not exist") && stderr.contains("kubectl get jobqueue missing"),
        "{stderr}"
    );

    let out = conveyor(&url, &["status", "missing"], b"").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue default/missing not found"));

    let out = conveyor(&url, &["submit", "q", "--id", "has space", "x"], b"").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job id"));

    let dir = tempfile::tempdir().expect("tempdir");
    let jsonl = dir.path().join("bad.jsonl");
    std::fs::write(&jsonl, "ok\n{\"id\": 5, \"payload\": 1}\n").expect("write");
    let out = conveyor(&url, &["submit", "q", "--jsonl", path(&jsonl)], b"").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));

    let unreachable = format!(
        "nats://127.0.0.1:{}",
        conveyor_testkit::free_port().unwrap()
    );
    let out = conveyor(&unreachable, &["submit", "q", "x"], b"").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to NATS at"));
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[tokio::test]
async fn delayed_jobs_wait_and_cancel_removes_them() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "later").await;
    let url = nats.url();

    let out = conveyor(
        &url,
        &["submit", "later", "--id", "d-1", "--delay", "1h", "x"],
        b"",
    )
    .await;
    assert_eq!(stdout_lines(&out), ["d-1"]);
    // Not yet a job of the work stream: it waits in the delayed stream.
    let mut work = js.get_stream(queue.stream()).await.expect("work stream");
    assert_eq!(work.info().await.expect("info").state.messages, 0);
    let mut delayed = js
        .get_stream(queue.delayed_stream())
        .await
        .expect("delayed stream");
    assert_eq!(delayed.info().await.expect("info").state.messages, 1);

    let out = conveyor(&url, &["cancel", "later", "d-1"], b"").await;
    assert_eq!(
        stdout_lines(&out),
        ["d-1\tcancelled (was delayed; it will never run)"]
    );
    assert_eq!(delayed.info().await.expect("info").state.messages, 0);

    // `--with-children`: the cancellation says so, for the workers of the job's children; a
    // plain one does not.
    let out = conveyor(&url, &["cancel", "later", "--with-children", "p-1"], b"").await;
    assert_eq!(stdout_lines(&out), ["p-1\tcancelled"]);
    let cancels = js
        .get_stream(queue.cancel_stream())
        .await
        .expect("cancellations stream");
    for (id, children) in [("d-1", false), ("p-1", true)] {
        let cancellation = cancels
            .get_last_raw_message_by_subject(&queue.cancel_subject(id))
            .await
            .expect("the cancellation is stored");
        assert_eq!(
            conveyor::protocol::flow::cancels_children(&cancellation.headers),
            children,
            "{id}"
        );
    }

    let out = conveyor(&url, &["submit", "later", "--delay", "soon", "x"], b"").await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--delay"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn wait_reports_each_outcome_and_fails_when_a_job_does_not_complete() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "answers").await;
    let worker = conveyor::worker::Worker::new(js, queue).handler(
        |job: conveyor::worker::ReceivedJob| async move {
            if job.payload.as_ref() == b"bad" {
                conveyor::worker::Outcome::Permanent("refused: bad input".into())
            } else {
                conveyor::worker::Outcome::Done(job.payload)
            }
        },
    );
    let stop = tokio::sync::Notify::new();
    let stop = std::sync::Arc::new(stop);
    let running = tokio::spawn({
        let stop = stop.clone();
        worker.run(async move { stop.notified().await })
    });

    let out = conveyor(
        &nats.url(),
        &["submit", "answers", "--id", "ok-1", "--wait", "fine"],
        b"",
    )
    .await;
    assert_eq!(stdout_lines(&out), ["ok-1\tcompleted\tfine"]);

    let out = conveyor(
        &nats.url(),
        &["submit", "answers", "--id", "bad-1", "--wait", "bad"],
        b"",
    )
    .await;
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .starts_with("bad-1\tdead-lettered\tpermanent after 1 attempt(s): refused: bad input"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 1 job(s) did not complete"));
    stop.notify_one();
    running.await.expect("worker task").expect("worker");
}

#[tokio::test]
async fn result_prints_stored_outcomes_and_fails_for_unknown_ids() {
    let nats = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let queue = QueueRef::new("default", "kept");
    let settings = QueueSettings {
        result_retention: Some(std::time::Duration::from_secs(3600)),
        ..QueueSettings::default()
    };
    ensure_queue(&js, &queue, &settings)
        .await
        .expect("create queue");
    let options = conveyor::worker::WorkerOptions {
        store_results: true,
        poll_wait: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = conveyor::Worker::new(js.clone(), queue.clone())
        .options(options)
        .handler(|job: conveyor::ReceivedJob| async move {
            conveyor::Outcome::Done(format!("thumbnail of {}", job.id).into())
        });
    let token = stop.clone();
    tokio::spawn(async move { worker.run(async move { token.cancelled().await }).await });

    let out = conveyor(&nats.url(), &["submit", "kept", "--id", "img-1", "x"], b"").await;
    stdout_lines(&out);
    let client = conveyor::Client::connect(&nats.url()).await.unwrap();
    conveyor_testkit::wait_for(
        std::time::Duration::from_secs(20),
        "the outcome stored",
        || async { matches!(client.result(&queue, "img-1").await, Ok(Some(_))) },
    )
    .await
    .unwrap();
    let out = conveyor(&nats.url(), &["result", "kept", "img-1"], b"").await;
    assert_eq!(stdout_lines(&out), ["img-1\tcompleted\tthumbnail of img-1"]);
    let out = conveyor(&nats.url(), &["result", "kept", "img-1", "img-9"], b"").await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "img-1\tcompleted\tthumbnail of img-1"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no stored result for img-9"), "{said}");
    stop.cancel();
}

/// Messages in the queue's work stream and in its delayed stream.
async fn stored(js: &jetstream::Context, queue: &QueueRef) -> (u64, u64) {
    let mut work = js.get_stream(queue.stream()).await.expect("work stream");
    let mut delayed = js
        .get_stream(queue.delayed_stream())
        .await
        .expect("delayed stream");
    (
        work.info().await.expect("info").state.messages,
        delayed.info().await.expect("info").state.messages,
    )
}

#[tokio::test]
async fn out_of_range_flag_values_are_refused_in_one_line_before_anything_is_sent() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "bounded").await;
    let url = nats.url();
    let cases: &[(&[&str], &str, &str)] = &[
        // Ran at once: the schedule of a time past year 9999 fell back to the epoch.
        (&["--delay", "10000y"], "--delay", "allowed: 0s to 365d"),
        (&["--delay", "366d"], "--delay", "allowed: 0s to 365d"),
        (
            &["--delay", "99999999999999999999999999y"],
            "--delay",
            "0s to 365d",
        ),
        (&["--delay=-5m"], "--delay", "0s to 365d"),
        // Panicked.
        (
            &["--count", "18446744073709551615"],
            "--count",
            "allowed: 1 to 1000000",
        ),
        (
            &["--count", "18446744073709551616"],
            "--count",
            "allowed: 1 to 1000000",
        ),
        // Built 4.8 GB of jobs before sending the first.
        (
            &["--count", "100000000"],
            "--count",
            "allowed: 1 to 1000000",
        ),
        (&["--count", "0"], "--count", "allowed: 1 to 1000000"),
        (&["--count", "many"], "--count", "not a whole number"),
        (&["--priority", "10"], "--priority", "allowed: 0 to 9"),
        (&["--priority", "256"], "--priority", "allowed: 0 to 9"),
        (
            &["--wait", "--wait-timeout", "0s"],
            "--wait-timeout",
            "allowed: 1s to 7d",
        ),
        (
            &["--wait", "--wait-timeout", "8d"],
            "--wait-timeout",
            "allowed: 1s to 7d",
        ),
    ];
    for (flags, flag, allowed) in cases {
        let args = [&["submit", "bounded"], *flags, &["x"]].concat();
        let out = conveyor(&url, &args, b"").await;
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert_eq!(said.lines().count(), 1, "{args:?}: one line, got {said}");
        assert!(
            said.starts_with("error: invalid value")
                && said.contains(&format!("'{flag} <"))
                && said.contains(allowed),
            "{args:?}: {said}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // From the environment alike.
    let out = conveyor_with_env(
        &url,
        &["submit", "bounded", "x"],
        b"",
        &[("CONVEYOR_DELAY", "10000y")],
    )
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("'--delay <DELAY>'") && said.contains("365d"),
        "{said}"
    );
    // Other subcommands' numbers and durations (`dev` and `bench` come with the feature `dev`).
    if cfg!(feature = "dev") {
        for (args, flag) in [
            (&["dev", "--demo", "--demo-jobs", "0"][..], "--demo-jobs"),
            (&["dev", "--demo", "--timeout", "100y"], "--timeout"),
            (&["bench", "--nats-url", &url, "--rate", "0"], "--rate"),
            (
                &["bench", "--nats-url", &url, "--payload", "99999999999"],
                "--payload",
            ),
            (
                &[
                    "bench",
                    "--nats-url",
                    &url,
                    "--latency-seconds",
                    "18446744073709551615",
                ],
                "--latency-seconds",
            ),
            (&["bench", "--nats-url", &url, "--rounds", "0"], "--rounds"),
        ] {
            let out = conveyor(&url, args, b"").await;
            let said = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
            assert!(
                said.lines().count() == 1 && said.contains(&format!("'{flag} <")),
                "{args:?}: {said}"
            );
        }
    }
    // Nothing reached the queue, neither at once nor as a delayed job.
    assert_eq!(stored(&js, &queue).await, (0, 0));
    // The bounds themselves are accepted.
    let out = conveyor(
        &url,
        &["submit", "bounded", "--id", "year", "--delay", "365d", "x"],
        b"",
    )
    .await;
    assert_eq!(stdout_lines(&out), ["year"]);
    assert_eq!(stored(&js, &queue).await, (0, 1));
}

#[tokio::test]
async fn count_sends_a_window_at_a_time_and_never_builds_all_jobs() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "stream").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["submit", "stream", "--count", "1000000", "--id", "s", "x"])
        .env("CONVEYOR_NATS_URL", nats.url())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn conveyor");
    let pid = child.id().expect("pid");
    let mut ids = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    // Ids come out as their chunk is stored, long before the millionth job is made.
    let mut seen = Vec::new();
    while seen.len() < 10_000 {
        let line = tokio::time::timeout(std::time::Duration::from_secs(60), ids.next_line())
            .await
            .expect("ids within 60 s")
            .expect("read stdout")
            .expect("ids, not the end of stdout");
        seen.push(line);
    }
    assert_eq!(seen[0], "s-1");
    assert_eq!(seen[9_999], "s-10000");
    let (pending, _) = stored(&js, &queue).await;
    assert!(
        pending < 1_000_000,
        "{pending} jobs stored before the first ids"
    );
    // A million jobs built up front are hundreds of MB; a chunk is a few.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    assert!(peak_kib < 150 * 1024, "peak resident memory {peak_kib} KiB");
    child.kill().await.expect("stop conveyor");
}

#[tokio::test]
async fn a_broken_jsonl_line_is_refused_with_file_and_line_before_anything_is_sent() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "lines").await;
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let jsonl = dir.path().join("broken.jsonl");
    let content = "{\"id\":\"a\",\"payload\":1}\nplain\n\n{\"id\":\"c\",\"payload\": {\"n\":\n{\"id\":\"d\",\"payload\":4}\n";
    std::fs::write(&jsonl, content).expect("write");

    let out = conveyor(&url, &["submit", "lines", "--jsonl", path(&jsonl)], b"").await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.starts_with(&format!(
            "error: {}: line 4: starts with {{ but is not a JSON object",
            path(&jsonl)
        )) && said.contains("nothing was submitted"),
        "{said}"
    );
    assert!(out.stdout.is_empty());
    let out = conveyor(
        &url,
        &["submit", "lines", "--jsonl", "-"],
        content.as_bytes(),
    )
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.starts_with("error: stdin: line 4: "),
        "{said}"
    );
    for (bad, why) in [
        (
            &b"ok\n{\"id\": \"a b\", \"payload\": 1}\n"[..],
            "line 2: \"id\": job id",
        ),
        (b"ok\n\xff\xfe\n", "line 2: not UTF-8 text"),
    ] {
        std::fs::write(&jsonl, bad).expect("write");
        let out = conveyor(&url, &["submit", "lines", "--jsonl", path(&jsonl)], b"").await;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(why), "{said}");
    }
    assert_eq!(
        stored(&js, &queue).await,
        (0, 0),
        "nothing of the files was sent"
    );
}

#[tokio::test]
async fn a_jsonl_rerun_after_an_interruption_sends_nothing_twice() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "rerun").await;
    let url = nats.url();
    let dir = tempfile::tempdir().expect("tempdir");
    // Lines without ids (bare payloads, wrappers without "id", the same line twice) and one with.
    let lines: Vec<String> = (0..600)
        .map(|i| match i % 4 {
            0 => format!("{{\"n\": {i}}}"),
            1 => format!("{{\"payload\": \"text {i}\"}}"),
            2 => "same".to_owned(),
            _ => format!("{{\"id\": \"own-{i}\", \"payload\": {i}}}"),
        })
        .collect();
    // The first run was cut off after 250 lines: what it sent is what a prefix of the file sends.
    let prefix = dir.path().join("prefix.jsonl");
    std::fs::write(&prefix, lines[..250].join("\n")).expect("write");
    let first =
        stdout_lines(&conveyor(&url, &["submit", "rerun", "--jsonl", path(&prefix)], b"").await);
    assert_eq!(first.len(), 250);

    let whole = dir.path().join("jobs.jsonl");
    std::fs::write(&whole, lines.join("\n") + "\n").expect("write");
    let out = conveyor(&url, &["submit", "rerun", "--jsonl", path(&whole)], b"").await;
    let ids = stdout_lines(&out);
    assert_eq!(ids.len(), 600);
    assert_eq!(ids[..250], first[..], "the same line gets the same id");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("250 already submitted before"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        ids[2].starts_with("jsonl-3-") && ids[3] == "own-3",
        "{:?}",
        &ids[..4]
    );
    assert_ne!(ids[2], ids[6], "the same text on two lines is two jobs");
    // Once more from stdin: all duplicates.
    let out = conveyor(
        &url,
        &["submit", "rerun", "--jsonl", "-"],
        (lines.join("\n") + "\n").as_bytes(),
    )
    .await;
    assert_eq!(stdout_lines(&out), ids);
    assert!(String::from_utf8_lossy(&out.stderr).contains("600 already submitted before"));
    assert_eq!(stored(&js, &queue).await, (600, 0));
}

#[tokio::test]
async fn jsonl_payloads_are_kept_byte_for_byte() {
    let nats = NatsServer::start().await.expect("nats-server");
    let (js, queue) = queue(&nats, "default", "bytes").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let jsonl = dir.path().join("jobs.jsonl");
    std::fs::write(
        &jsonl,
        "  42  \n\t{\"n\": 1} \r\n{\"payload\": \"  padded\\n\"}\r\n \r\ncaf\u{e9} \\t\nlast, no newline ",
    )
    .expect("write");
    let out = conveyor(
        &nats.url(),
        &["submit", "bytes", "--jsonl", path(&jsonl)],
        b"",
    )
    .await;
    assert_eq!(stdout_lines(&out).len(), 5);
    let payloads: Vec<String> = jobs(&js, &queue)
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        payloads,
        [
            "  42  ",
            "\t{\"n\": 1} ",
            "  padded\n",
            "caf\u{e9} \\t",
            "last, no newline "
        ]
    );
}

#[tokio::test]
async fn bad_dependencies_are_refused_before_anything_is_sent() {
    let nats = NatsServer::start().await.unwrap();
    let (js, queue) = queue(&nats, "default", "deps").await;
    let url = nats.url();
    let held = || async {
        let mut total = 0;
        for stream in [
            queue.stream(),
            queue.delayed_stream(),
            queue.waiting_stream(),
        ] {
            total += conveyor_testkit::stream_messages(&js, &stream).await;
        }
        total
    };
    let too_many: Vec<String> = (0..=conveyor::protocol::flow::MAX_DEPENDENCIES)
        .map(|i| format!("job-{i}"))
        .collect();
    let too_many = too_many.join(",");
    for (flags, said_what) in [
        (&["--after", too_many.as_str()][..], "at most"),
        (&["--after", "Q/a"], "--after \"Q/a\""),
        (&["--after", "ns//a"], "--after \"ns//a\""),
        (&["--id", "me", "--after", "me"], "itself"),
        (&["--if-failed", "run"], "--after"),
        (&["--after", "a", "--if-failed", "maybe"], "--if-failed"),
    ] {
        let args = [&["submit", "deps"], flags, &["x"]].concat();
        let out = conveyor(&url, &args, b"").await;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} is refused: {said}");
        assert!(said.contains(said_what), "{args:?}: {said}");
    }
    assert_eq!(held().await, 0, "nothing reached the queue");
    // The same flags with good values are taken: the count above could have seen a job.
    let out = conveyor(&url, &["submit", "deps", "--after", "a", "x"], b"").await;
    stdout_lines(&out);
    assert_eq!(held().await, 1);
}
