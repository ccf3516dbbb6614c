//! The dashboard at scale (issue #13): 100 queues, one of them holding 1,000,000 pending jobs
//! and 100,000 dead letters, every API call timed (client-side over loopback, so an upper bound
//! of the server's time) and weighed, and the operator's memory before and after. A real
//! nats-server, the Kubernetes test double, the operator binary as its own process (so its
//! resident memory is its own). Run by `make bench`: `cargo bench -p conveyor-operator --bench
//! dashboard` (after `cargo build --release --workspace --bins`). `DASHBOARD_JOBS` and
//! `DASHBOARD_DEAD_LETTERS` change the sizes.

use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use conveyor::names::QueueRef;
use conveyor::protocol::{self, dead_letter};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::{NatsServer, wait_for};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

const NS: &str = "bench";
const QUEUES: usize = 100;
/// Calls of each endpoint.
const CALLS: usize = 50;
/// Publishes in flight while seeding.
const WINDOW: usize = 2048;
const DEADLINE: Duration = Duration::from_secs(600);

fn size(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(run());
}

/// Resident memory of process `pid` in MiB, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Publishes `count` messages made by `message` with at most [`WINDOW`] acks outstanding.
async fn seed(
    js: &jetstream::Context,
    count: u64,
    message: impl Fn(u64) -> (String, HeaderMap, bytes::Bytes),
) {
    let mut acks = FuturesUnordered::new();
    for n in 0..count {
        let (subject, headers, payload) = message(n);
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .expect("publish");
        acks.push(ack.into_future());
        while acks.len() >= WINDOW {
            acks.next().await.expect("an ack").expect("stored");
        }
    }
    while let Some(ack) = acks.next().await {
        ack.expect("stored");
    }
}

/// An endpoint's path for call `n` (so paged calls spread over the stream).
type PathOf<'a> = Box<dyn Fn(usize) -> String + 'a>;

struct Figures {
    p50: Duration,
    p95: Duration,
    max_bytes: usize,
}

/// Calls `path(n)` [`CALLS`] times; its latencies and the largest answer.
async fn measure(http: &reqwest::Client, base: &str, path: impl Fn(usize) -> String) -> Figures {
    let mut times = Vec::with_capacity(CALLS);
    let mut max_bytes = 0;
    for n in 0..CALLS {
        let url = format!("{base}{}", path(n));
        let started = Instant::now();
        let answer = http.get(&url).send().await.expect("the dashboard answers");
        let status = answer.status();
        let body = answer.bytes().await.expect("a body");
        times.push(started.elapsed());
        assert!(status.is_success(), "{url}: {status} {body:?}");
        max_bytes = max_bytes.max(body.len());
    }
    times.sort();
    Figures {
        p50: times[CALLS / 2],
        p95: times[CALLS * 95 / 100],
        max_bytes,
    }
}

async fn run() {
    let jobs = size("DASHBOARD_JOBS", 1_000_000);
    let dead = size("DASHBOARD_DEAD_LETTERS", 100_000);
    let cluster = DevCluster::start(Options::api_only())
        .await
        .expect("the test double");
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/jobqueues.yaml");
    let kubectl = Kubectl::new(cluster.kubeconfig_path());
    kubectl.ok(&["apply", "-f", crds], None).await;
    kubectl.ok(&["create", "namespace", NS], None).await;
    let nats = NatsServer::start().await.expect("nats-server");
    let port = conveyor_testkit::free_port().expect("a port");
    let mut operator =
        tokio::process::Command::new(conveyor_testkit::workspace_binary("conveyor-operator"))
            .args([
                format!("--nats-url={}", nats.url()),
                "--http-addr=127.0.0.1:0".into(),
                format!("--dashboard-addr=127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the operator binary runs");
    let pid = operator.id().expect("the operator's pid");

    let manifests: String = (0..QUEUES)
        .map(|n| {
            format!(
                "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: q{n:03}}}\nspec: {{}}\n---\n"
            )
        })
        .collect();
    kubectl
        .ok(&["apply", "-n", NS, "-f", "-"], Some(&manifests))
        .await;
    let client = conveyor::Client::connect(&nats.url()).await.expect("NATS");
    let js = client.jetstream().clone();
    let deep = QueueRef::new(NS, "q000");
    let last = QueueRef::new(NS, format!("q{:03}", QUEUES - 1));
    wait_for(DEADLINE, "the streams of every queue", || async {
        js.get_stream(last.dead_letter_stream()).await.is_ok()
            && js.get_stream(deep.dead_letter_stream()).await.is_ok()
    })
    .await
    .expect("streams");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for(DEADLINE, "the dashboard listing 100 queues", || async {
        let Ok(answer) = http.get(format!("{base}/api/queues?limit=1")).send().await else {
            return false;
        };
        let list: serde_json::Value = answer.json().await.unwrap_or_default();
        list["total"] == QUEUES
    })
    .await
    .expect("the dashboard");
    let rss_before = rss_mib(pid);

    let started = Instant::now();
    let subject = deep.job_subject(0);
    seed(&js, jobs, |n| {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::MSG_ID, format!("job-{n}").as_str());
        (
            subject.clone(),
            headers,
            bytes::Bytes::from_static(b"{\"n\":1}"),
        )
    })
    .await;
    let dlq_subject = deep.dead_letter_subject();
    seed(&js, dead, |n| {
        let mut headers = HeaderMap::new();
        headers.insert(dead_letter::JOB_ID, format!("dead-{n}").as_str());
        headers.insert(dead_letter::REASON, "permanent");
        let error = format!("card declined ({})", n % 10);
        headers.insert(dead_letter::ERROR, error.as_str());
        headers.insert(dead_letter::ATTEMPTS, "3");
        headers.insert(dead_letter::POD, "bench-0");
        headers.insert(dead_letter::FAILED_AT, "2026-12-02T00:00:00Z");
        headers.insert(dead_letter::SUBJECT, subject.as_str());
        (
            dlq_subject.clone(),
            headers,
            bytes::Bytes::from_static(b"{\"n\":1}"),
        )
    })
    .await;
    println!(
        "seeded {jobs} pending jobs and {dead} dead letters into {} in {:.1?}",
        deep.stream(),
        started.elapsed()
    );
    // The figures reach the dashboard through the queue's status.
    wait_for(DEADLINE, "the status of the deep queue", || async {
        let Ok(answer) = http
            .get(format!("{base}/api/queues/{NS}/q000"))
            .send()
            .await
        else {
            return false;
        };
        let queue: serde_json::Value = answer.json().await.unwrap_or_default();
        queue["pending"] == jobs && queue["deadLettered"] == dead
    })
    .await
    .expect("figures");
    let rss_seeded = rss_mib(pid);

    let q = format!("/api/queues/{NS}/q000");
    let spread = |n: usize, range: u64| 1 + (n as u64 * 7919) % range.max(1);
    let endpoints: Vec<(&str, PathOf)> = vec![
        ("/api/queues (page 1)", Box::new(|_| "/api/queues".into())),
        (
            "/api/queues?after=… (page 2)",
            Box::new(|_| format!("/api/queues?after={NS}/q049")),
        ),
        ("/api/queues/<q>", Box::new(|_| q.clone())),
        ("/api/workers", Box::new(|_| "/api/workers".into())),
        (
            "/dead-letters?from=…",
            Box::new(|n| format!("{q}/dead-letters?from={}", spread(n, dead))),
        ),
        (
            "/dead-letters/<seq>",
            Box::new(|n| format!("{q}/dead-letters/{}", spread(n, dead))),
        ),
        (
            "/pending?level=0&from=…",
            Box::new(|n| format!("{q}/pending?level=0&limit=100&from={}", spread(n, jobs))),
        ),
        ("/delayed", Box::new(|_| format!("{q}/delayed"))),
        ("/history", Box::new(|_| format!("{q}/history"))),
        (
            "/jobs/<id> (not found)",
            Box::new(|n| format!("{q}/jobs/job-{}", spread(n, jobs))),
        ),
        ("/ (page)", Box::new(|_| "/".into())),
        ("/assets/app.js", Box::new(|_| "/assets/app.js".into())),
    ];
    println!(
        "{:<32} {:>10} {:>10} {:>12}",
        "endpoint", "p50", "p95", "max bytes"
    );
    for (name, path) in &endpoints {
        let figures = measure(&http, &base, path).await;
        println!(
            "{:<32} {:>10.2?} {:>10.2?} {:>12}",
            name, figures.p50, figures.p95, figures.max_bytes
        );
    }
    let rss_after = rss_mib(pid);
    println!(
        "operator resident memory: {rss_before:.0} MiB with {QUEUES} empty queues, \
         {rss_seeded:.0} MiB with the jobs seeded, {rss_after:.0} MiB after {} calls",
        CALLS * endpoints.len()
    );
    operator.start_kill().ok();
    operator.wait().await.ok();
    cluster.shutdown().await;
}
