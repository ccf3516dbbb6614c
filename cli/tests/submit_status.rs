//! `conveyor submit` and `conveyor status` as a user runs them: the real binary against a real
//! `nats-server` whose queue was created with the SDK's `ensure_queue` (as the operator would).

use std::path::Path;
use std::process::{Output, Stdio};

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor_testkit::NatsServer;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Runs `conveyor <args>` against `nats`, feeding `stdin`, with no CONVEYOR_* from the caller.
async fn conveyor(nats: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
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
    let mut held = consumer.fetch().max_messages(2).messages().await.unwrap();
    let mut taken = Vec::new();
    while let Some(message) = held.next().await {
        taken.push(message.unwrap());
    }
    assert_eq!(taken.len(), 2);
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
