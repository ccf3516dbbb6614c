//! Component tests of the `conveyor-worker` binary against a real nats-server: the real
//! runtime process, real handler processes, real signals.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::{QueueRef, env};
use conveyor::protocol::dead_letter;
use conveyor::{Client, Job};
use conveyor_testkit::dead_letters::{header, read_all as dead_letters};
use conveyor_testkit::{NatsServer, free_port, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    nats: NatsServer,
    client: Client,
    queue: QueueRef,
    out: tempfile::TempDir,
}

async fn setup(settings: QueueSettings) -> anyhow::Result<Setup> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("test", "work");
    ensure_queue(client.jetstream(), &queue, &settings).await?;
    Ok(Setup {
        nats,
        client,
        queue,
        out: tempfile::tempdir()?,
    })
}

impl Setup {
    /// Starts the real runtime binary, configured through the environment like in a pod.
    fn worker(
        &self,
        mode: &str,
        extra: &[(&str, &str)],
        command: &[&str],
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor-worker"));
        cmd.arg("run")
            .arg("--")
            .args(command)
            .env(env::NATS_URL, self.nats.url())
            .env(env::QUEUE_NAMESPACE, &self.queue.namespace)
            .env(env::QUEUE_NAME, &self.queue.name)
            .env(env::HANDLER_MODE, mode)
            .env(env::POD_NAME, "worker-under-test")
            .env(env::POLL_WAIT, "300ms")
            .env("OUT", self.out.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in extra {
            cmd.env(key, value);
        }
        Ok(cmd.spawn()?)
    }

    /// Submits `job` and awaits it, collecting the progress reports (as text) and the outcome.
    async fn watch(&self, job: Job) -> anyhow::Result<(Vec<String>, conveyor::JobResult)> {
        let mut updates = Vec::new();
        let result = self
            .client
            .submit_and_watch(&self.queue, job, WAIT, |update| {
                updates.push(String::from_utf8_lossy(&update).into_owned());
            })
            .await?;
        Ok((updates, result))
    }

    fn files(&self, prefix: &str) -> Vec<String> {
        files(self.out.path(), prefix)
    }

    async fn stream_len(&self, stream: &str) -> u64 {
        stream_len(self.client.jetstream(), stream).await
    }
}

fn files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .map(|n| n[prefix.len()..].to_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(stream) => stream
            .get_info()
            .await
            .map(|i| i.state.messages)
            .unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    }
}

fn signal(child: &Child, signal: Signal) -> anyhow::Result<()> {
    let pid = Pid::from_raw(i32::try_from(child.id().expect("running"))?);
    kill(pid, signal)?;
    Ok(())
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

#[tokio::test]
async fn exec_mode_acks_every_job_and_serves_metrics() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let health = format!("127.0.0.1:{}", free_port()?);
    let mut worker = s.worker(
        "exec",
        &[(env::CONCURRENCY, "4"), (env::HEALTH_ADDR, &health)],
        &["sh", "-c", r#"cat > "$OUT/done-$CONVEYOR_JOB_ID""#],
    )?;
    let jobs = (0..100).map(|i| Job::new(format!("job-{i:03}"), format!("payload {i}")));
    assert!(
        s.client
            .submit_batch(&s.queue, jobs)
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_for(WAIT, "100 jobs handled", || async {
        s.files("done-").len() == 100
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    let expected: Vec<String> = (0..100).map(|i| format!("job-{i:03}")).collect();
    assert_eq!(s.files("done-"), expected, "each job id accounted for");
    assert_eq!(
        std::fs::read_to_string(s.out.path().join("done-job-007"))?,
        "payload 7"
    );

    wait_for(WAIT, "metrics to count 100 acked jobs", || async {
        http_get(&health, "/metrics")
            .await
            .is_ok_and(|t| t.contains(r#"conveyor_worker_jobs_total{outcome="acked"} 100"#))
    })
    .await?;
    assert!(
        http_get(&health, "/healthz")
            .await?
            .starts_with("HTTP/1.0 200")
    );
    assert!(
        http_get(&health, "/readyz")
            .await?
            .starts_with("HTTP/1.0 200")
    );
    signal(&worker, Signal::SIGTERM)?;
    let status = tokio::time::timeout(WAIT, worker.wait()).await??;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test]
async fn exec_exit_codes_decide_retry_and_permanent_failure() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let script = r#"
        case "$CONVEYOR_JOB_ID" in
          perm) echo "not an invoice" >&2; exit 65 ;;
          later) [ "$CONVEYOR_JOB_ATTEMPT" -ge 2 ] || exit 75 ;;
        esac
        touch "$OUT/done-$CONVEYOR_JOB_ID-$CONVEYOR_JOB_ATTEMPT"
    "#;
    let _worker = s.worker(
        "exec",
        &[(env::BACKOFF_INITIAL, "200ms"), (env::BACKOFF_JITTER, "0")],
        &["sh", "-c", script],
    )?;
    for id in ["ok", "perm", "later"] {
        s.client.submit(&s.queue, Job::new(id, "x")).await?;
    }
    wait_for(WAIT, "ok and later done", || async {
        s.files("done-") == ["later-2", "ok-1"]
    })
    .await?;
    wait_for(WAIT, "perm dead-lettered", || async {
        s.stream_len(&s.queue.dead_letter_stream()).await == 1
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    let letters = dead_letters(s.client.jetstream(), &s.queue).await?;
    assert_eq!(header(&letters[0], dead_letter::JOB_ID), "perm");
    assert_eq!(header(&letters[0], dead_letter::REASON), "permanent");
    assert_eq!(header(&letters[0], dead_letter::POD), "worker-under-test");
    assert_eq!(
        header(&letters[0], dead_letter::ERROR),
        "handler exited with 65 (permanent): not an invoice"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_in_flight_jobs_finish_and_leaves_the_rest_queued() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let slow =
        r#"touch "$OUT/started-$CONVEYOR_JOB_ID"; sleep 1; touch "$OUT/done-$CONVEYOR_JOB_ID""#;
    let mut first = s.worker(
        "exec",
        &[(env::CONCURRENCY, "2"), (env::DRAIN_TIMEOUT, "20s")],
        &["sh", "-c", slow],
    )?;
    assert!(
        s.client
            .submit_batch(&s.queue, (0..6).map(|i| Job::new(format!("j{i}"), "x")))
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_for(WAIT, "two jobs started", || async {
        s.files("started-").len() == 2
    })
    .await?;
    signal(&first, Signal::SIGTERM)?;
    let status = tokio::time::timeout(WAIT, first.wait()).await??;
    assert!(status.success(), "{status}");
    let started = s.files("started-");
    assert_eq!(started.len(), 2, "no job started after SIGTERM");
    assert_eq!(
        s.files("done-"),
        started,
        "in-flight jobs finished before exit"
    );

    let second_started = Instant::now();
    let _second = s.worker(
        "exec",
        &[(env::CONCURRENCY, "4")],
        &["sh", "-c", r#"touch "$OUT/done-$CONVEYOR_JOB_ID""#],
    )?;
    wait_for(WAIT, "all six jobs done", || async {
        s.files("done-").len() == 6
    })
    .await?;
    println!(
        "second worker finished the remaining 4 jobs in {:?}",
        second_started.elapsed()
    );
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_gives_back_jobs_that_cannot_finish_and_they_are_redelivered_at_once()
-> anyhow::Result<()> {
    // A long ack wait: a job that was not given back would only return after 60 s.
    let s = setup(QueueSettings {
        timeout: Duration::from_secs(60),
        ..Default::default()
    })
    .await?;
    let stuck = r#"touch "$OUT/started-$CONVEYOR_JOB_ID-$CONVEYOR_JOB_ATTEMPT"; exec sleep 60"#;
    let mut first = s.worker(
        "exec",
        &[(env::CONCURRENCY, "2"), (env::DRAIN_TIMEOUT, "500ms")],
        &["sh", "-c", stuck],
    )?;
    assert!(
        s.client
            .submit_batch(&s.queue, (0..2).map(|i| Job::new(format!("j{i}"), "x")))
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_for(WAIT, "two jobs started", || async {
        s.files("started-").len() == 2
    })
    .await?;
    signal(&first, Signal::SIGTERM)?;
    let status = tokio::time::timeout(WAIT, first.wait()).await??;
    assert!(status.success(), "{status}");

    let given_back = Instant::now();
    let _second = s.worker(
        "exec",
        &[(env::CONCURRENCY, "2")],
        &[
            "sh",
            "-c",
            r#"touch "$OUT/done-$CONVEYOR_JOB_ID-$CONVEYOR_JOB_ATTEMPT""#,
        ],
    )?;
    wait_for(
        Duration::from_secs(15),
        "both jobs redelivered and done",
        || async { s.files("done-").len() == 2 },
    )
    .await?;
    let elapsed = given_back.elapsed();
    println!("given-back jobs completed by the second worker after {elapsed:?}");
    assert_eq!(
        s.files("done-"),
        ["j0-2", "j1-2"],
        "second attempt of each job, none lost"
    );
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigkilled_worker_job_is_redelivered_after_the_ack_wait() -> anyhow::Result<()> {
    let ack_wait = Duration::from_secs(2);
    let s = setup(QueueSettings {
        timeout: ack_wait,
        ..Default::default()
    })
    .await?;
    let mut first = s.worker(
        "exec",
        &[],
        &[
            "sh",
            "-c",
            r#"touch "$OUT/started-$CONVEYOR_JOB_ID"; exec sleep 60"#,
        ],
    )?;
    let submitted = Instant::now();
    s.client.submit(&s.queue, Job::new("victim", "x")).await?;
    wait_for(WAIT, "the job started", || async {
        s.files("started-").len() == 1
    })
    .await?;
    signal(&first, Signal::SIGKILL)?;
    let killed = Instant::now();
    first.wait().await?;
    let _second = s.worker(
        "exec",
        &[],
        &[
            "sh",
            "-c",
            r#"touch "$OUT/done-$CONVEYOR_JOB_ID-$CONVEYOR_JOB_ATTEMPT""#,
        ],
    )?;
    wait_for(WAIT, "the job redelivered and done", || async {
        s.files("done-") == ["victim-2"]
    })
    .await?;
    println!(
        "redelivered and done {:?} after SIGKILL (ack wait {ack_wait:?})",
        killed.elapsed()
    );
    // The first delivery came after the submission, so the redelivery cannot be earlier
    // than one ack wait after it.
    assert!(
        submitted.elapsed() >= ack_wait,
        "came back before the ack wait"
    );
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn jsonl_mode_runs_jobs_concurrently_in_one_child() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let handler = s.out.path().join("handler.py");
    std::fs::write(
        &handler,
        r#"
import json, os, sys, threading
lock = threading.Lock()
def work(req):
    text = req.get("payload")
    if text == "bad":
        resp = {"id": req["id"], "status": "permanent", "error": "cannot process bad"}
    else:
        open(os.path.join(os.environ["OUT"], "done-" + req["id"]), "w").write(text)
        resp = {"id": req["id"], "status": "ok", "result": {"len": len(text)}}
    with lock:
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()
open(os.path.join(os.environ["OUT"], "pid-%d" % os.getpid()), "w").close()
for line in sys.stdin:
    threading.Thread(target=work, args=(json.loads(line),)).start()
"#,
    )?;
    let handler = handler.to_string_lossy().into_owned();
    let _worker = s.worker(
        "jsonl",
        &[(env::CONCURRENCY, "8")],
        &["python3", "-u", &handler],
    )?;
    let mut jobs: Vec<Job> = (0..200)
        .map(|i| Job::new(format!("j{i:03}"), format!("text {i}")))
        .collect();
    jobs.push(Job::new("poison", "bad"));
    assert!(
        s.client
            .submit_batch(&s.queue, jobs)
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_for(WAIT, "200 jobs done", || async {
        s.files("done-").len() == 200
    })
    .await?;
    wait_for(WAIT, "the bad job dead-lettered", || async {
        s.stream_len(&s.queue.dead_letter_stream()).await == 1
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    assert_eq!(
        s.files("pid-").len(),
        1,
        "one long-lived child for all jobs"
    );
    let letters = dead_letters(s.client.jetstream(), &s.queue).await?;
    assert_eq!(
        header(&letters[0], dead_letter::ERROR),
        "cannot process bad"
    );
    Ok(())
}

#[tokio::test]
async fn jsonl_child_that_dies_fails_its_job_and_is_restarted() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    // Exits on its first job of attempt 1 (a crash), answers ok otherwise.
    let script = r#"
import json, os, sys
open(os.path.join(os.environ["OUT"], "pid-%d" % os.getpid()), "w").close()
for line in sys.stdin:
    req = json.loads(line)
    if req["attempt"] == 1:
        sys.exit(3)
    open(os.path.join(os.environ["OUT"], "done-%s-%d" % (req["id"], req["attempt"])), "w").close()
    print(json.dumps({"id": req["id"], "status": "ok"}), flush=True)
"#;
    let _worker = s.worker(
        "jsonl",
        &[(env::BACKOFF_INITIAL, "100ms"), (env::BACKOFF_JITTER, "0")],
        &["python3", "-u", "-c", script],
    )?;
    s.client.submit(&s.queue, Job::new("crashy", "x")).await?;
    wait_for(WAIT, "the job done on its second attempt", || async {
        s.files("done-") == ["crashy-2"]
    })
    .await?;
    assert_eq!(s.files("pid-").len(), 2, "the child was restarted once");
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn jsonl_progress_lines_reach_the_awaiting_producer_in_order() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let script = r#"
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    for done in (25, 50, 75):
        print(json.dumps({"id": req["id"], "status": "progress", "progress": {"done": done}}), flush=True)
    print(json.dumps({"id": req["id"], "status": "ok", "result": "resized"}), flush=True)
"#;
    let _worker = s.worker("jsonl", &[], &["python3", "-u", "-c", script])?;
    let (updates, result) = s.watch(Job::new("resize-1", "x")).await?;
    assert_eq!(
        updates,
        [r#"{"done":25}"#, r#"{"done":50}"#, r#"{"done":75}"#]
    );
    assert_eq!(
        result,
        conveyor::JobResult::Completed {
            id: "resize-1".into(),
            result: r#""resized""#.into()
        }
    );
    // A job nobody awaits: its progress lines go nowhere and it completes all the same.
    s.client.submit(&s.queue, Job::new("resize-2", "x")).await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn exec_progress_lines_on_stderr_reach_the_awaiting_producer() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let script = "echo 'conveyor:progress {\"done\":1}' >&2; echo 'a log line' >&2; \
                  echo 'conveyor:progress {\"done\":2}' >&2; cat";
    let _worker = s.worker("exec", &[], &["sh", "-c", script])?;
    let (updates, result) = s.watch(Job::new("report", "done")).await?;
    assert_eq!(updates, [r#"{"done":1}"#, r#"{"done":2}"#]);
    assert_eq!(
        result,
        conveyor::JobResult::Completed {
            id: "report".into(),
            result: "done".into()
        }
    );
    Ok(())
}

/// Serves `handler` as `POST /jobs` on a loopback port, as the handler container of an `http`
/// Worker would; its URL.
async fn serve_jobs(handler: axum::routing::MethodRouter) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/jobs", listener.local_addr()?);
    let app = axum::Router::new().route("/jobs", handler);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Runs the queue's releaser (the operator's dispatcher does in a cluster) until dropped.
fn releaser(s: &Setup) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let releaser = conveyor::flow::Releaser::new(s.client.jetstream().clone())
        .scan_interval(Duration::from_millis(200));
    let (queue, until) = (s.queue.clone(), stop.clone());
    tokio::spawn(async move {
        while !until.is_cancelled() {
            if let Err(error) = releaser.serve(&queue, &until).await {
                eprintln!("releaser: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    stop.drop_guard()
}

/// A child of job `parent` of the test queue, submitted by the test on the handler's behalf (a
/// handler process publishes it with `Conveyor-Parent` the same way).
fn child_of(parent: &str, id: &str) -> Job {
    Job::new(id, "").header(
        conveyor::protocol::flow::PARENT,
        &format!("test/work/{parent}"),
    )
}

#[tokio::test]
async fn exec_and_http_handlers_continue_once_their_children_finish() -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    // A short ack wait: a job the stopped exec worker was handed as it went comes back soon.
    let s = setup(QueueSettings {
        timeout: Duration::from_secs(2),
        ..QueueSettings::default()
    })
    .await?;
    let _releaser = releaser(&s);
    // A parent answers a continuation that waits for one child; the continuation joins. A
    // continuation that is not one fails the attempt, saying so.
    let script = r#"case "$CONVEYOR_JOB_ID" in
        *.k) echo "joined $(cat)" ;;
        *.c) echo child ;;
        bad) echo 'conveyor:continue {"id": 5}' >&2 ;;
        badid) echo 'conveyor:continue {"id": "", "spawned": 0}' >&2 ;;
        toomany) echo 'conveyor:continue {"id": "t.k", "spawned": 18446744073709551615}' >&2 ;;
        *) echo "conveyor:continue {\"id\": \"$CONVEYOR_JOB_ID.k\", \"payload\": \"from $CONVEYOR_JOB_ID\", \"spawned\": 1}" >&2 ;;
    esac"#;
    let mut exec = s.worker("exec", &[], &["sh", "-c", script])?;
    s.client.submit(&s.queue, child_of("e", "e.c")).await?;
    let joined = s
        .client
        .submit_and_wait(&s.queue, Job::new("e", ""), WAIT)
        .await?;
    assert_eq!(
        joined,
        conveyor::JobResult::Completed {
            id: "e".into(),
            result: "joined from e\n".into()
        }
    );
    let bad = s
        .client
        .submit_and_wait(&s.queue, Job::new("bad", "").max_attempts(1), WAIT)
        .await?;
    match bad {
        conveyor::JobResult::DeadLettered { error, .. } => assert!(
            error.contains("continuation is not a JSON object"),
            "{error}"
        ),
        other => panic!("expected a dead letter, got {other:?}"),
    }
    // A continuation that could never be stored or released is dead-lettered at once, not
    // retried (which would spawn the children again).
    for (id, said) in [("badid", "bad id"), ("toomany", "can be waited for")] {
        match s
            .client
            .submit_and_wait(&s.queue, Job::new(id, ""), WAIT)
            .await?
        {
            conveyor::JobResult::DeadLettered {
                reason,
                error,
                attempts,
                ..
            } => {
                assert_eq!((reason.as_str(), attempts), ("permanent", 1), "{error}");
                assert!(error.contains(said), "{error}");
            }
            other => panic!("expected a dead letter for {id}, got {other:?}"),
        }
    }
    // Stopped as a pod is (SIGTERM, drain) and awaited: a worker killed outright may have had
    // a pull request open, and a job the server handed to it then would come back only after
    // the ack wait (seen in CI: `h.c` stuck 30 s).
    signal(&exec, Signal::SIGTERM)?;
    tokio::time::timeout(WAIT, exec.wait()).await??;

    async fn handle(headers: HeaderMap, body: String) -> (StatusCode, HeaderMap, String) {
        let id = headers
            .get("Conveyor-Job-Id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut out = HeaderMap::new();
        if id.ends_with(".k") {
            return (StatusCode::OK, out, format!("joined {body}"));
        }
        if id.ends_with(".c") {
            return (StatusCode::OK, out, "child".into());
        }
        out.insert("conveyor-status", "continue".parse().expect("valid header"));
        let continuation = format!(r#"{{"id": "{id}.k", "payload": "from {id}", "spawned": 1}}"#);
        (StatusCode::OK, out, continuation)
    }
    let url = serve_jobs(axum::routing::post(handle)).await?;
    let _http = s.worker("http", &[(env::HANDLER_URL, &url)], &[])?;
    s.client.submit(&s.queue, child_of("h", "h.c")).await?;
    let joined = s
        .client
        .submit_and_wait(&s.queue, Job::new("h", ""), WAIT)
        .await?;
    assert_eq!(
        joined,
        conveyor::JobResult::Completed {
            id: "h".into(),
            result: "joined from h".into()
        }
    );
    Ok(())
}

#[tokio::test]
async fn http_progress_posts_reach_the_awaiting_producer() -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    let s = setup(QueueSettings::default()).await?;
    // The handler posts two updates to its attempt's progress URL, then answers; it hands
    // the URL back in its result so the test can check the URL closes with the attempt.
    async fn handle(headers: HeaderMap, body: String) -> (StatusCode, String) {
        let url = headers
            .get("Conveyor-Progress-Url")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let http = reqwest::Client::new();
        for done in [1, 2] {
            let posted = http
                .post(&url)
                .body(format!(r#"{{"done":{done}}}"#))
                .send()
                .await
                .map(|r| r.status().as_u16());
            if posted.as_ref().ok() != Some(&204) {
                return (StatusCode::INTERNAL_SERVER_ERROR, format!("{posted:?}"));
            }
        }
        (StatusCode::OK, format!("{body} {url}"))
    }
    let url = serve_jobs(axum::routing::post(handle)).await?;
    let _worker = s.worker("http", &[(env::HANDLER_URL, &url)], &[])?;

    let (updates, result) = s.watch(Job::new("report", "done")).await?;
    assert_eq!(updates, [r#"{"done":1}"#, r#"{"done":2}"#]);
    let conveyor::JobResult::Completed { result, .. } = result else {
        panic!("not completed: {result:?}");
    };
    let result = String::from_utf8_lossy(&result).into_owned();
    let (body, progress_url) = result.split_once(' ').expect("body and URL");
    assert_eq!(body, "done");
    assert!(
        progress_url.starts_with("http://127.0.0.1:"),
        "{progress_url}"
    );
    let late = reqwest::Client::new()
        .post(progress_url)
        .body("late")
        .send()
        .await?;
    assert_eq!(late.status().as_u16(), 404, "the attempt is over");
    Ok(())
}

#[test]
fn install_copies_the_runtime_into_a_directory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("bin");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor-worker"))
        .arg("install")
        .arg(&target)
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let copied = target.join("conveyor-worker");
    let help = std::process::Command::new(&copied).arg("--help").output()?;
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Conveyor worker runtime"));
    Ok(())
}

#[tokio::test]
async fn exec_stdout_is_the_result_a_waiting_producer_gets() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let _worker = s.worker("exec", &[], &["sh", "-c", "tr a-z A-Z"])?;
    let result = s
        .client
        .submit_and_wait(&s.queue, Job::new("shout", "hello"), WAIT)
        .await?;
    assert_eq!(
        result,
        conveyor::JobResult::Completed {
            id: "shout".into(),
            result: "HELLO".into()
        }
    );
    Ok(())
}

#[tokio::test]
async fn http_mode_posts_jobs_and_maps_status_codes() -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    let s = setup(QueueSettings::default()).await?;
    async fn handle(headers: HeaderMap, body: String) -> (StatusCode, HeaderMap, String) {
        let attempt = headers
            .get("Conveyor-Attempt")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut out = HeaderMap::new();
        match body.as_str() {
            "bad" => (StatusCode::UNPROCESSABLE_ENTITY, out, "bad body".into()),
            "busy" if attempt == "1" => {
                out.insert("retry-after", "1".parse().expect("valid header"));
                (StatusCode::SERVICE_UNAVAILABLE, out, String::new())
            }
            _ => (
                StatusCode::OK,
                out,
                format!("{}#{attempt}", body.to_uppercase()),
            ),
        }
    }
    let url = serve_jobs(axum::routing::post(handle)).await?;

    let _worker = s.worker(
        "http",
        &[(env::HANDLER_URL, &url), (env::CONCURRENCY, "4")],
        &[],
    )?;
    let hello = s
        .client
        .submit_and_wait(&s.queue, Job::new("h", "hello"), WAIT)
        .await?;
    assert_eq!(
        hello,
        conveyor::JobResult::Completed {
            id: "h".into(),
            result: "HELLO#1".into()
        }
    );
    let busy_start = Instant::now();
    let busy = s
        .client
        .submit_and_wait(&s.queue, Job::new("b", "busy"), WAIT)
        .await?;
    assert_eq!(
        busy,
        conveyor::JobResult::Completed {
            id: "b".into(),
            result: "BUSY#2".into()
        }
    );
    assert!(
        busy_start.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    let bad = s
        .client
        .submit_and_wait(&s.queue, Job::new("x", "bad"), WAIT)
        .await?;
    assert_eq!(
        bad,
        conveyor::JobResult::DeadLettered {
            id: "x".into(),
            reason: "permanent".into(),
            error: "handler answered 422 Unprocessable Entity: bad body".into(),
            attempts: 1,
        }
    );
    Ok(())
}

#[tokio::test]
async fn poison_job_that_crashes_its_handler_is_dead_lettered_while_good_jobs_flow()
-> anyhow::Result<()> {
    const GOOD: usize = 1000;
    let s = setup(QueueSettings {
        max_attempts: 3,
        ..Default::default()
    })
    .await?;
    // The poison job kills its own handler process with SIGKILL on every attempt.
    let script =
        r#"[ "$CONVEYOR_JOB_ID" = poison ] && kill -9 $$; touch "$OUT/done-$CONVEYOR_JOB_ID""#;
    let _worker = s.worker(
        "exec",
        &[
            (env::CONCURRENCY, "8"),
            (env::BACKOFF_INITIAL, "100ms"),
            (env::BACKOFF_JITTER, "0"),
        ],
        &["sh", "-c", script],
    )?;
    let mut jobs = vec![Job::new("poison", "x")];
    jobs.extend((0..GOOD).map(|i| Job::new(format!("good-{i:04}"), "x")));
    assert!(
        s.client
            .submit_batch(&s.queue, jobs)
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_for(WAIT, "every good job done", || async {
        s.files("done-good-").len() == GOOD
    })
    .await?;
    wait_for(WAIT, "the poison job dead-lettered", || async {
        s.stream_len(&s.queue.dead_letter_stream()).await == 1
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    let letters = dead_letters(s.client.jetstream(), &s.queue).await?;
    assert_eq!(header(&letters[0], dead_letter::JOB_ID), "poison");
    assert_eq!(header(&letters[0], dead_letter::REASON), "exhausted");
    assert_eq!(header(&letters[0], dead_letter::ATTEMPTS), "3");
    assert!(header(&letters[0], dead_letter::ERROR).starts_with("handler killed by a signal"));
    assert!(s.files("done-poison").is_empty());
    Ok(())
}

#[tokio::test]
async fn idle_worker_exits_promptly_on_sigterm_even_with_a_long_poll_open() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let health = format!("127.0.0.1:{}", free_port()?);
    let mut worker = s.worker(
        "exec",
        &[(env::POLL_WAIT, "30s"), (env::HEALTH_ADDR, &health)],
        &["true"],
    )?;
    wait_for(WAIT, "the worker to be ready", || async {
        http_get(&health, "/readyz")
            .await
            .is_ok_and(|t| t.starts_with("HTTP/1.0 200"))
    })
    .await?;
    let start = Instant::now();
    signal(&worker, Signal::SIGTERM)?;
    let status = tokio::time::timeout(WAIT, worker.wait()).await??;
    assert!(status.success(), "{status}");
    println!(
        "exited {:?} after SIGTERM with a 30 s long poll open",
        start.elapsed()
    );
    // The behaviour: it does not wait out its 30 s long poll (a bound well below it, so a busy
    // machine does not fail the test; it measured 5 s before and failed under load).
    assert!(start.elapsed() < Duration::from_secs(20));

    // The dead worker's open pull must not swallow a job submitted now (the ack wait is 30 s).
    let submitted = Instant::now();
    s.client.submit(&s.queue, Job::new("after", "x")).await?;
    let _second = s.worker(
        "exec",
        &[],
        &["sh", "-c", r#"touch "$OUT/done-$CONVEYOR_JOB_ID""#],
    )?;
    wait_for(
        Duration::from_secs(10),
        "the job done by the second worker",
        || async { s.files("done-") == ["after"] },
    )
    .await?;
    println!(
        "job submitted after the exit done in {:?}",
        submitted.elapsed()
    );
    Ok(())
}

/// `CONVEYOR_MAX_JOBS`: after that many jobs the runtime starts over as a fresh process in
/// place (same PID: the container never exits, so a kubelet neither restarts it nor backs off),
/// and goes on taking jobs; SIGTERM still drains and exits 0.
#[tokio::test]
async fn worker_recycles_itself_in_place_after_max_jobs() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let mut worker = s.worker(
        "exec",
        &[(env::CONCURRENCY, "2"), (env::MAX_JOBS, "3")],
        &["sh", "-c", r#"echo "$PPID" > "$OUT/done-$CONVEYOR_JOB_ID""#],
    )?;
    let pid = worker.id().expect("running");
    let jobs = (0..10).map(|i| Job::new(format!("j{i}"), "x"));
    assert!(
        s.client
            .submit_batch(&s.queue, jobs)
            .await
            .iter()
            .all(Result::is_ok)
    );
    wait_for(WAIT, "all 10 jobs done across recycles", || async {
        s.files("done-").len() == 10
    })
    .await?;
    assert!(worker.try_wait()?.is_none(), "the runtime never exited");
    let parents: std::collections::BTreeSet<String> = s
        .files("done-")
        .iter()
        .map(|f| {
            std::fs::read_to_string(s.out.path().join(format!("done-{f}")))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(
        parents.into_iter().collect::<Vec<_>>(),
        [pid.to_string()],
        "every job ran under the same PID"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, worker.wait()).await??;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test]
async fn worker_started_before_its_queue_waits_for_it() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let s = Setup {
        nats,
        client,
        queue: QueueRef::new("test", "later"),
        out: tempfile::tempdir()?,
    };
    let health = format!("127.0.0.1:{}", free_port()?);
    let mut worker = s.worker(
        "exec",
        &[(env::HEALTH_ADDR, &health)],
        &["sh", "-c", r#"touch "$OUT/done-$CONVEYOR_JOB_ID""#],
    )?;
    wait_for(
        WAIT,
        "/readyz to say the worker waits for its queue",
        || async {
            http_get(&health, "/readyz")
                .await
                .is_ok_and(|t| t.contains("waiting for the queue"))
        },
    )
    .await?;
    assert!(
        worker.try_wait()?.is_none(),
        "the worker waits instead of exiting"
    );
    ensure_queue(s.client.jetstream(), &s.queue, &QueueSettings::default()).await?;
    s.client.submit(&s.queue, Job::new("first", "x")).await?;
    wait_for(WAIT, "the job done", || async {
        s.files("done-") == ["first"]
    })
    .await?;
    wait_for(WAIT, "/readyz to say ready", || async {
        http_get(&health, "/readyz")
            .await
            .is_ok_and(|t| t.starts_with("HTTP/1.0 200"))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn cancelled_exec_job_gets_sigterm_and_is_not_retried() -> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let handler = r#"trap 'kill $!; touch "$OUT/term-$CONVEYOR_JOB_ID"; exit 1' TERM
touch "$OUT/started-$CONVEYOR_JOB_ID"
sleep 60 & wait"#;
    let _worker = s.worker(
        "exec",
        &[(env::CANCEL_GRACE, "10s")],
        &["sh", "-c", handler],
    )?;
    let waiter = {
        let (client, queue) = (s.client.clone(), s.queue.clone());
        tokio::spawn(async move {
            client
                .submit_and_wait(&queue, Job::new("long", "x"), WAIT)
                .await
        })
    };
    wait_for(WAIT, "the handler started", || async {
        s.files("started-") == ["long"]
    })
    .await?;
    s.client.cancel(&s.queue, "long").await?;
    assert_eq!(
        waiter.await??,
        conveyor::JobResult::Cancelled { id: "long".into() }
    );
    assert_eq!(s.files("term-"), ["long"], "the handler got SIGTERM");
    // Its exit code 1 would mean a retry: the job is gone instead.
    wait_for(WAIT, "the work stream to be empty", || async {
        s.stream_len(&s.queue.stream()).await == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_worker_whose_pulls_fail_while_connected_fails_liveness_and_readiness()
-> anyhow::Result<()> {
    let s = setup(QueueSettings::default()).await?;
    let health = format!("127.0.0.1:{}", free_port()?);
    let mut worker = s.worker("exec", &[(env::HEALTH_ADDR, &health)], &["true"])?;
    wait_for(WAIT, "the worker to be ready", || async {
        http_get(&health, "/readyz")
            .await
            .is_ok_and(|t| t.starts_with("HTTP/1.0 200"))
    })
    .await?;
    // Its consumer is gone: every pull fails although the connection is up. Failed pulls do
    // not count as consuming, so the stall check (3 poll waits + 10 s) fails both probes.
    let stream = s.client.jetstream().get_stream(s.queue.stream()).await?;
    stream.delete_consumer(&s.queue.consumer(0)).await?;
    wait_for(Duration::from_secs(60), "liveness to fail", || async {
        http_get(&health, "/healthz")
            .await
            .is_ok_and(|t| t.starts_with("HTTP/1.0 503") && t.contains("no pull for"))
    })
    .await?;
    let ready = http_get(&health, "/readyz").await?;
    assert!(ready.starts_with("HTTP/1.0 503"), "{ready}");
    worker.kill().await?;
    Ok(())
}
