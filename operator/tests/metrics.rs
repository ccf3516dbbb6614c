//! The operator's `/metrics` after a known workload: 1,000 jobs of which 10 fail twice and are
//! dead-lettered on their third attempt, run by a stand-in worker that does what the runtime
//! does on the wire (ack; nak; publish the dead letter, then terminate). The figures and counters
//! of the queue and its Worker are scraped from the operator's real HTTP endpoint; 10,000 more
//! jobs with distinct ids add no series; deleting the queue and the Worker removes theirs; and
//! every metric the chart's Grafana dashboard and alert rules query is one that the operator or
//! the worker runtime exports. Kubernetes test double (API server only), a real `nats-server`,
//! the operator in-process. And with the test double's kubelet running real worker pods: an
//! OOM-killed pod counts as a crash by reason and as a troubled pod.

mod worker_env;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::{NatsServer, wait_for};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(90);
const NS: &str = "team";
const JOBS: usize = 1000;
const POISON: usize = 10;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> String {
    Kubectl::new(cluster.kubeconfig_path())
        .ok(args, stdin)
        .await
}

/// `GET /metrics` on the operator's HTTP port.
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The series of a scrape (`name{labels}`), without values and comments.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_owned()))
        .collect()
}

/// The metric names a scrape exports: those of its samples, and those its `# TYPE` lines
/// declare (a family with no series yet, e.g. no crash so far, still has its name).
fn names(text: &str) -> BTreeSet<String> {
    let declared = text.lines().filter_map(|l| {
        let mut words = l.strip_prefix("# TYPE ")?.split(' ');
        let (name, kind) = (words.next()?, words.next()?);
        Some(match kind {
            "counter" => vec![format!("{name}_total")],
            "histogram" => ["bucket", "sum", "count"]
                .iter()
                .map(|s| format!("{name}_{s}"))
                .collect(),
            _ => vec![name.to_owned()],
        })
    });
    series(text)
        .iter()
        .map(|s| s.split('{').next().unwrap_or_default().to_owned())
        .chain(declared.flatten())
        .collect()
}

/// The value of the one sample `series` (exact name and labels) in `text`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs the 1,000 jobs: acks all but the last [`POISON`], which are nak'd twice and then
/// dead-lettered as the runtime does (dead letter first, then `Term`).
async fn run_workload(js: &jetstream::Context, queue: &QueueRef) {
    let consumer: consumer::PullConsumer = js
        .get_consumer_from_stream(queue.consumer(0), queue.stream())
        .await
        .unwrap();
    let mut finished = 0;
    while finished < JOBS {
        let mut batch = consumer
            .fetch()
            .max_messages(200)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            let message = message.unwrap();
            let n: usize = std::str::from_utf8(&message.payload)
                .unwrap()
                .parse()
                .unwrap();
            let delivered = message.info().unwrap().delivered;
            if n < JOBS - POISON {
                message.double_ack().await.unwrap();
                finished += 1;
            } else if delivered < 3 {
                message.ack_with(AckKind::Nak(None)).await.unwrap();
            } else {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("job-{n}:dl").as_str());
                headers.insert("Conveyor-Job-Id", format!("job-{n}").as_str());
                headers.insert("Conveyor-Reason", "exhausted");
                headers.insert(
                    "Conveyor-Error",
                    "exit status 3: this job id must not become a label",
                );
                headers.insert("Conveyor-Attempts", "3");
                headers.insert("Conveyor-Original-Subject", queue.job_subject(0).as_str());
                js.publish_with_headers(
                    queue.dead_letter_subject(),
                    headers,
                    message.payload.clone(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
                message.ack_with(AckKind::Term).await.unwrap();
                finished += 1;
            }
        }
    }
}

async fn submit(js: &jetstream::Context, queue: &QueueRef, range: std::ops::Range<usize>) {
    let mut acks = Vec::new();
    for i in range {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("job-{i}").as_str());
        acks.push(
            js.publish_with_headers(queue.job_subject(0), headers, i.to_string().into())
                .await
                .unwrap(),
        );
        if acks.len() >= 500 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Metric names the chart's dashboard and alert rules query.
fn chart_queries() -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("charts/conveyor/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has queries: {exprs:?}");
    exprs.push(
        std::fs::read_to_string(repo("charts/conveyor/templates/prometheusrule.yaml")).unwrap(),
    );
    let mut used = BTreeSet::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(at) = expr[i..].find("conveyor_") {
            let start = i + at;
            let end = expr[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |e| start + e);
            // Not part of a longer identifier (e.g. a label value like `conveyor_x` in a name).
            if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_')
            {
                used.insert(expr[start..end].to_owned());
            }
            i = end;
        }
    }
    used
}

/// What the worker runtime exports once it ran a job.
fn worker_runtime_names() -> BTreeSet<String> {
    use conveyor::worker::{Disposition, JobReport, Observer};
    let metrics = conveyor_worker::health::Metrics::new(2, Duration::from_secs(60));
    metrics.started("job-1", 1, None);
    metrics.finished(&JobReport {
        id: "job-1".into(),
        sequence: 1,
        attempt: 1,
        disposition: Disposition::Acked,
        duration: Duration::from_millis(5),
    });
    names(&metrics.encode())
}

#[tokio::test]
async fn queue_and_worker_metrics_after_a_known_workload() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    for crd in ["crds/jobqueues.yaml", "crds/workers.yaml"] {
        kubectl(
            &cluster,
            &["apply", "-f", repo(crd).to_str().unwrap()],
            None,
        )
        .await;
    }
    kubectl(&cluster, &["create", "namespace", NS], None).await;
    let nats = NatsServer::start().await.unwrap();
    let port = conveyor_testkit::free_port().unwrap();
    let mut config = Config::with_nats_url(nats.url());
    config.http_addr = format!("127.0.0.1:{port}").parse().unwrap();
    config.resync = Duration::from_secs(1);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let operator = tokio::spawn(conveyor_operator::run_with_client(
        config,
        cluster.client(),
        async move { stopped.cancelled().await },
    ));
    kubectl(
        &cluster,
        &["apply", "-n", NS, "-f", "-"],
        Some(
            &[
                JobQueue::test("thumbs").max_attempts(3).yaml(),
                // Its NATS is unreachable: reconcile errors, and no queue series.
                JobQueue::test("offline")
                    .nats_url("nats://127.0.0.1:1")
                    .yaml(),
                Worker::test("thumbs")
                    .concurrency(4)
                    .replicas(2)
                    .exec(&["/handler"])
                    .image("thumbs:1")
                    .yaml(),
            ]
            .join("---\n"),
        ),
    )
    .await;
    let queue = QueueRef::new(NS, "thumbs");
    let q = r#"{namespace="team",queue="thumbs"}"#;
    let level0 = r#"{namespace="team",queue="thumbs",level="0"}"#;
    let w = r#"{namespace="team",worker="thumbs",queue="thumbs"}"#;
    wait_for(DEADLINE, "the queue's metrics", || async {
        value(
            &scrape(port).await,
            &format!("conveyor_queue_pending_jobs{level0}"),
        ) == Some(0.0)
    })
    .await
    .unwrap();

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    submit(&js, &queue, 0..JOBS).await;
    run_workload(&js, &queue).await;

    let expected = [
        (format!("conveyor_queue_submitted_jobs_total{q}"), 1000.0),
        (format!("conveyor_queue_completed_jobs_total{q}"), 990.0),
        (format!("conveyor_queue_retried_jobs_total{q}"), 20.0),
        (format!("conveyor_queue_failed_jobs_total{q}"), 30.0),
        (format!("conveyor_queue_dead_lettered_jobs_total{q}"), 10.0),
        (format!("conveyor_queue_dead_letter_jobs{q}"), 10.0),
        (format!("conveyor_queue_delayed_jobs{q}"), 0.0),
        (format!("conveyor_queue_pending_jobs{level0}"), 0.0),
        (format!("conveyor_queue_in_flight_jobs{level0}"), 0.0),
        (format!("conveyor_queue_oldest_pending_age_seconds{q}"), 0.0),
        (format!("conveyor_worker_desired_replicas{w}"), 2.0),
        (format!("conveyor_worker_ready_replicas{w}"), 0.0),
        (format!("conveyor_worker_busy_slots{w}"), 0.0),
        (format!("conveyor_worker_free_slots{w}"), 0.0),
        (format!("conveyor_worker_recycled_pods_total{w}"), 0.0),
    ];
    let last = std::sync::Mutex::new(String::new());
    let (seen, wanted) = (&last, &expected);
    let settled = wait_for(
        DEADLINE,
        "the workload's figures in /metrics",
        move || async move {
            let text = scrape(port).await;
            let ok = wanted.iter().all(|(s, v)| value(&text, s) == Some(*v));
            *seen.lock().unwrap() = text;
            ok
        },
    )
    .await;
    let mut text = last.lock().unwrap().clone();
    if settled.is_err() {
        let wrong: Vec<_> = expected
            .iter()
            .map(|(s, v)| (s, v, value(&text, s)))
            .filter(|(_, v, got)| *got != Some(**v))
            .collect();
        panic!("wrong figures (series, want, got): {wrong:#?}\n{text}");
    }
    for line in text.lines().filter(|l| l.starts_with("# HELP conveyor_")) {
        assert!(line.split(' ').count() > 3, "HELP with text: {line}");
    }
    for line in [
        r#"conveyor_worker_troubled_pods{namespace="team",worker="thumbs",queue="thumbs",reason="CrashLoopBackOff"} 0"#,
        r#"conveyor_worker_crashes_total{namespace="team",worker="thumbs",queue="thumbs",reason="OOMKilled"} 0"#,
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(!text.contains(r#"queue="offline""#), "{text}");

    // 10,000 more jobs with distinct ids: the same series, only the values move.
    let before: BTreeSet<String> = series(&text)
        .into_iter()
        .filter(|s| s.starts_with("conveyor_queue_") || s.starts_with("conveyor_worker_"))
        .collect();
    submit(&js, &queue, JOBS..JOBS + 10_000).await;
    wait_for(
        DEADLINE,
        "10,000 pending jobs in /metrics",
        move || async move {
            let text = scrape(port).await;
            let ok =
                value(&text, &format!("conveyor_queue_pending_jobs{level0}")) == Some(10_000.0);
            *seen.lock().unwrap() = text;
            ok
        },
    )
    .await
    .unwrap();
    text = last.lock().unwrap().clone();
    let after: BTreeSet<String> = series(&text)
        .into_iter()
        .filter(|s| s.starts_with("conveyor_queue_") || s.starts_with("conveyor_worker_"))
        .collect();
    assert_eq!(before, after, "new jobs added or removed series");
    assert!(!text.contains("job-"), "a job id became a label:\n{text}");
    assert!(
        value(
            &text,
            &format!("conveyor_queue_oldest_pending_age_seconds{q}")
        )
        .is_some()
    );

    // The unreachable queue's reconciles fail (the NATS client gives up on it after its own
    // connect timeout).
    let error = r#"conveyor_operator_reconcile_errors_total{controller="jobqueue",error="nats_unavailable"}"#;
    wait_for(
        DEADLINE,
        "a nats_unavailable reconcile error",
        move || async move {
            let text = scrape(port).await;
            let ok = text.contains(error);
            *seen.lock().unwrap() = text;
            ok
        },
    )
    .await
    .unwrap();
    text = last.lock().unwrap().clone();

    // Every metric the dashboard and the alerts query is exported by the operator or the
    // worker runtime.
    let exported: BTreeSet<String> = names(&text)
        .into_iter()
        .chain(worker_runtime_names())
        .collect();
    let used = chart_queries();
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );

    // The series of a deleted queue and Worker go with them.
    kubectl(&cluster, &["delete", "-n", NS, "worker", "thumbs"], None).await;
    kubectl(&cluster, &["delete", "-n", NS, "jobqueue", "thumbs"], None).await;
    wait_for(
        DEADLINE,
        "no series of the deleted queue and Worker",
        move || async move {
            let text = scrape(port).await;
            text.contains("conveyor_operator_reconciles_total")
                && !text.contains(r#"queue="thumbs""#)
        },
    )
    .await
    .unwrap();

    stop.cancel();
    tokio::time::timeout(DEADLINE, operator)
        .await
        .expect("operator stops")
        .unwrap()
        .expect("operator exits cleanly");
    cluster.shutdown().await;
}

// The handler writes 300 MiB (touched, so resident) under a 64 MiB limit.
fn heavy() -> String {
    let queue = JobQueue::test("heavy")
        .timeout("30s")
        .max_attempts(2)
        .yaml();
    let worker = worker_env::oom_worker("heavy", 300, "64Mi")
        .replicas(1)
        .yaml();
    format!("{queue}---\n{worker}")
}

#[tokio::test]
async fn an_oom_killed_worker_pod_counts_as_a_crash_by_reason() {
    let port = conveyor_testkit::free_port().unwrap();
    let env = worker_env::Env::start_with(|c| {
        c.http_addr = format!("127.0.0.1:{port}").parse().unwrap();
    })
    .await;
    env.apply(&heavy()).await;
    let queue = QueueRef::new(worker_env::NS, "heavy");
    env.wait_stream(&queue.stream()).await;
    let w = r#"{namespace="team",worker="heavy",queue="heavy""#;
    let ready = format!("conveyor_worker_ready_replicas{w}}}");
    let oom = format!(r#"conveyor_worker_crashes_total{w},reason="OOMKilled"}}"#);
    wait_for(
        DEADLINE,
        "a ready pod and no crash in /metrics",
        move || {
            let (ready, oom) = (ready.clone(), oom.clone());
            async move {
                let text = scrape(port).await;
                value(&text, &ready) == Some(1.0) && value(&text, &oom) == Some(0.0)
            }
        },
    )
    .await
    .unwrap();

    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    client
        .submit(&queue, conveyor::Job::new("resize-huge-image", "boom"))
        .await
        .unwrap();
    let oom = format!(r#"conveyor_worker_crashes_total{w},reason="OOMKilled"}}"#);
    let troubled = format!(r#"conveyor_worker_troubled_pods{w},reason="OOMKilled"}}"#);
    let last = std::sync::Mutex::new(String::new());
    let seen = &last;
    let counted = wait_for(DEADLINE, "the OOM kill counted in /metrics", move || {
        let (oom, troubled) = (oom.clone(), troubled.clone());
        async move {
            let text = scrape(port).await;
            let ok = value(&text, &oom).is_some_and(|n| n >= 1.0)
                && value(&text, &troubled) == Some(1.0);
            *seen.lock().unwrap() = text;
            ok
        }
    })
    .await;
    let text = last.lock().unwrap().clone();
    assert!(counted.is_ok(), "{counted:?}\n{text}");
    // The job id stays out of the labels even though the pod's last words name it.
    assert!(!text.contains("resize-huge-image"), "{text}");
    env.shutdown().await;
}
