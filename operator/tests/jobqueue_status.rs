//! What a user sees of a queue's health in `kubectl describe jobqueue` and `kubectl get`:
//! figures, `Backlogged` and `JobsFailing` conditions, recent failures and a handful of Events
//! after a thousand dead letters. Kubernetes test double (API server only), a real
//! `nats-server`, the operator in-process; dead letters are published with the headers a worker
//! writes (`docs/protocol.md`, "Dead letters").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::JobQueue;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_testkit::dead_letters::{self, Letter};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::{NatsServer, wait_for};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const NS: &str = "team";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> String {
    Kubectl::new(cluster.kubeconfig_path())
        .ok(args, stdin)
        .await
}

/// Publishes `n` dead letters of the queue `thumbs` the way a worker writes them.
async fn dead_letters(js: &async_nats::jetstream::Context, from: usize, n: usize) {
    let queue = QueueRef::new(NS, "thumbs");
    dead_letters::publish(
        js,
        (from..from + n).map(|i| {
            Letter::of(&queue, &format!("job-{i}"))
                .sequence(i as u64)
                .error(&format!("exit status 3: cannot resize image {i}"))
                .attempts(3)
                .pod("thumbs-7d9f-abcde")
        }),
    )
    .await
    .unwrap();
}

fn condition(q: &JobQueue, type_: &str) -> Option<(String, String)> {
    q.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the JobQueue `name` is `Ready`.
async fn wait_ready(api: &Api<JobQueue>, name: &str) {
    wait_for(DEADLINE, "the queue Ready", || async {
        api.get(name)
            .await
            .ok()
            .and_then(|q| condition(&q, "Ready"))
            .map(|c| c.0)
            == Some("True".into())
    })
    .await
    .unwrap();
}

/// Both CRDs.
const BOTH_CRDS: &[&str] = &["crds/jobqueues.yaml", "crds/workers.yaml"];

/// The API server of the test double with `crds` and the namespace, a nats-server, and the
/// operator in-process (its defaults but for a free HTTP port, then `tune`).
struct Fixture {
    cluster: DevCluster,
    nats: NatsServer,
    stop: CancellationToken,
    operator: tokio::task::JoinHandle<Result<(), conveyor_operator::Error>>,
}

impl Fixture {
    async fn start(crds: &[&str], tune: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(crds, NatsServer::builder(), tune).await
    }

    async fn start_with(
        crds: &[&str],
        nats: conveyor_testkit::NatsServerBuilder,
        tune: impl FnOnce(&mut Config),
    ) -> Self {
        let cluster = DevCluster::start(Options::api_only()).await.unwrap();
        for crd in crds {
            kubectl(
                &cluster,
                &["apply", "-f", repo(crd).to_str().unwrap()],
                None,
            )
            .await;
        }
        kubectl(&cluster, &["create", "namespace", NS], None).await;
        let nats = nats.start().await.unwrap();
        let mut config = Config::with_nats_url(nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        tune(&mut config);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let operator = tokio::spawn(conveyor_operator::run_with_client(
            config,
            cluster.client(),
            async move { stopped.cancelled().await },
        ));
        Self {
            cluster,
            nats,
            stop,
            operator,
        }
    }

    /// Stops the operator (it must exit cleanly) and the API server.
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.operator)
            .await
            .expect("operator stops")
            .unwrap()
            .expect("operator exits cleanly");
        self.cluster.shutdown().await;
    }
}

#[tokio::test]
async fn a_thousand_failures_show_in_describe_with_a_handful_of_events() {
    let fx = Fixture::start(BOTH_CRDS, |c| c.resync = Duration::from_secs(1)).await;
    let (cluster, nats) = (&fx.cluster, &fx.nats);
    kubectl(
        cluster,
        &["apply", "-n", NS, "-f", "-"],
        Some(
            &JobQueue::test("thumbs")
                .alert_when_pending_over(10)
                .alert_on_failures(5, "10m")
                .yaml(),
        ),
    )
    .await;
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    let until = |what: &'static str, type_: &'static str, want: (&'static str, &'static str)| {
        let api = api.clone();
        async move {
            wait_for(DEADLINE, what, || async {
                api.get("thumbs")
                    .await
                    .ok()
                    .and_then(|q| condition(&q, type_))
                    == Some((want.0.into(), want.1.into()))
            })
            .await
            .unwrap();
        }
    };
    until("a calm queue", "Backlogged", ("False", "WithinThresholds")).await;
    until(
        "no failures yet",
        "JobsFailing",
        ("False", "NoRecentFailures"),
    )
    .await;

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // 20 jobs wait (no worker): over maxPending 10.
    for i in 0..20 {
        js.publish("conveyor.team.thumbs.jobs.0", format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    until(
        "Backlogged by depth",
        "Backlogged",
        ("True", "DepthOverThreshold"),
    )
    .await;
    // A thousand failures, in bursts, while the operator reconciles every second.
    for burst in 0..10 {
        dead_letters(&js, burst * 100, 100).await;
    }
    until("JobsFailing", "JobsFailing", ("True", "JobsDeadLettered")).await;
    wait_for(DEADLINE, "1000 dead letters in the status", || async {
        api.get("thumbs")
            .await
            .ok()
            .and_then(|q| q.status)
            .and_then(|s| s.dead_lettered)
            == Some(1000)
    })
    .await
    .unwrap();

    let status = api.get("thumbs").await.unwrap().status.unwrap();
    assert_eq!(status.pending, Some(20));
    assert_eq!(status.recent_failures.len(), 10);
    assert_eq!(status.recent_failures[0].job_id, "job-999");
    assert!(status.oldest_pending_age.is_some());
    let failing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "JobsFailing")
        .unwrap();
    assert!(
        failing.message.starts_with("at least 100 jobs dead-lettered in the last 10m; last: job job-999 (exhausted after 3 attempt(s)) on pod thumbs-7d9f-abcde: exit status 3"),
        "{}",
        failing.message
    );

    let describe = kubectl(cluster, &["describe", "-n", NS, "jobqueue", "thumbs"], None).await;
    for expected in [
        "Backlogged",
        "DepthOverThreshold",
        "JobsFailing",
        "JobsDeadLettered",
        "Dead Lettered:           1000",
        "Recent Failures:",
        "job-999",
        "thumbs-7d9f-abcde",
        "JobDeadLettered",
    ] {
        assert!(
            describe.contains(expected),
            "{expected} missing:\n{describe}"
        );
    }
    println!("{describe}");
    let table = kubectl(cluster, &["get", "-n", NS, "jobqueues"], None).await;
    for expected in ["BACKLOGGED", "FAILING", "DEAD", "1000"] {
        assert!(table.contains(expected), "{expected} missing:\n{table}");
    }
    println!("{table}");

    // Draining the backlog and purging the dead letters clears both conditions.
    js.get_stream("conveyor_team_thumbs")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    js.get_stream("conveyor_team_thumbs_dlq")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    until(
        "the backlog recovered",
        "Backlogged",
        ("False", "WithinThresholds"),
    )
    .await;
    until(
        "failures recovered",
        "JobsFailing",
        ("False", "NoRecentFailures"),
    )
    .await;

    let events: Api<Event> = Api::namespaced(cluster.client(), NS);
    let events = events.list(&ListParams::default()).await.unwrap().items;
    let reasons: Vec<_> = events
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("thumbs"))
        .map(|e| e.reason.clone().unwrap_or_default())
        .collect();
    println!("events: {reasons:?}");
    assert!(
        reasons.len() <= 6,
        "a handful of events, not one per job: {reasons:?}"
    );
    for reason in ["Backlogged", "JobDeadLettered", "Recovered"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }

    fx.shutdown().await;
}

/// Reasons and notes of the Events regarding the `thumbs` queue.
async fn queue_events(cluster: &DevCluster) -> Vec<(String, String)> {
    events_of(cluster, "thumbs").await
}

/// Reasons and notes of the Events regarding the queue `name`.
async fn events_of(cluster: &DevCluster, name: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::namespaced(cluster.client(), NS);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

async fn messages(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// A job whose dead letter can never be written (the job fits the server's `max_payload`, its
/// copy with the dead-letter headers does not) after its worker crashed on its only attempt:
/// it stays in the work stream, the status counts it in `awaitingDeadLetter`, and a
/// `DeadLetterFailed` Warning Event on the queue gives the server's reason.
#[tokio::test]
async fn a_job_whose_dead_letter_cannot_be_written_is_counted_and_reported() {
    const MAX_PAYLOAD: usize = 64 * 1024;
    let nats = NatsServer::builder().max_payload(MAX_PAYLOAD);
    let fx = Fixture::start_with(BOTH_CRDS, nats, |c| c.resync = Duration::from_secs(1)).await;
    let (cluster, nats) = (&fx.cluster, &fx.nats);
    let queue_yaml = &JobQueue::test("huge").max_attempts(1).timeout("1s").yaml();
    kubectl(cluster, &["apply", "-n", NS, "-f", "-"], Some(queue_yaml)).await;
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    wait_ready(&api, "huge").await;

    let queue = conveyor::names::QueueRef::new(NS, "huge");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(conveyor::protocol::MSG_ID, "huge-1");
    js.publish_with_headers(
        queue.job_subject(0),
        headers,
        vec![b'x'; MAX_PAYLOAD - 200].into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // A worker that takes the job and dies with it (never acks): its one attempt runs out.
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(queue.consumer(0), queue.stream())
        .await
        .unwrap();
    let taken = conveyor_testkit::take(&consumer, 1, DEADLINE)
        .await
        .unwrap();
    drop(taken);

    wait_for(DEADLINE, "the DeadLetterFailed Event", || async {
        events_of(cluster, "huge")
            .await
            .iter()
            .any(|(reason, _)| reason == "DeadLetterFailed")
    })
    .await
    .unwrap();
    let events = events_of(cluster, "huge").await;
    let (_, note) = events
        .iter()
        .find(|(r, _)| r == "DeadLetterFailed")
        .unwrap();
    assert!(note.contains("stays in the work stream"), "{note}");
    wait_for(DEADLINE, "status.awaitingDeadLetter = 1", || async {
        api.get("huge")
            .await
            .unwrap()
            .status
            .and_then(|s| s.awaiting_dead_letter)
            == Some(1)
    })
    .await
    .unwrap();
    assert_eq!(messages(&js, &queue.stream()).await, 1, "the job is kept");
    assert_eq!(messages(&js, &queue.dead_letter_stream()).await, 0);
    fx.shutdown().await;
}

#[tokio::test]
async fn annotations_requeue_and_purge_dead_letters_once_and_bad_values_change_nothing() {
    // Only the JobQueue CRD: the Worker controller's store never becomes ready, which also
    // checks that the operator still stops (within its shutdown grace) at the end.
    let fx = Fixture::start(&["crds/jobqueues.yaml"], |c| {
        c.resync = Duration::from_secs(1)
    })
    .await;
    let (cluster, nats) = (&fx.cluster, &fx.nats);
    let queue = JobQueue::test("thumbs").yaml();
    kubectl(cluster, &["apply", "-n", NS, "-f", "-"], Some(&queue)).await;
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    wait_ready(&api, "thumbs").await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    dead_letters(&js, 0, 5).await;

    // Each request: annotate, then wait until the operator has handled and removed it.
    let request = |annotation: &'static str, value: &'static str| {
        let (cluster, api) = (&cluster, api.clone());
        async move {
            let arg = format!("{annotation}={value}");
            kubectl(
                cluster,
                &["annotate", "-n", NS, "jobqueue", "thumbs", &arg],
                None,
            )
            .await;
            let handled = |q: &JobQueue| {
                q.status
                    .as_ref()
                    .and_then(|s| s.last_dead_letter_request.clone())
                    .filter(|r| r.annotation == annotation && r.value == value)
            };
            wait_for(
                DEADLINE,
                "the request handled, recorded in status and its annotation removed",
                || async {
                    api.get("thumbs").await.is_ok_and(|q| {
                        handled(&q).is_some() && !q.annotations().contains_key(annotation)
                    })
                },
            )
            .await
            .unwrap();
            handled(&api.get("thumbs").await.unwrap()).unwrap()
        }
    };

    let refused = request("conveyor.dev/dlq-requeue", "everything").await;
    assert_eq!((refused.outcome.as_str(), refused.jobs), ("Invalid", 0));
    assert_eq!(
        messages(&js, "conveyor_team_thumbs_dlq").await,
        5,
        "nothing was changed"
    );
    assert_eq!(messages(&js, "conveyor_team_thumbs").await, 0);
    let events = queue_events(cluster).await;
    assert!(
        events.iter().any(|(r, n)| r == "InvalidDeadLetterRequest"
            && n.contains("\"everything\" is not `all`, `id=<job id>` or `error=<text>`")),
        "{events:?}"
    );

    let missing = request("conveyor.dev/dlq-requeue", "id=job-99").await;
    assert_eq!((missing.outcome.as_str(), missing.jobs), ("NotFound", 0));
    assert_eq!(messages(&js, "conveyor_team_thumbs_dlq").await, 5);

    let requeued = request("conveyor.dev/dlq-requeue", "id=job-3").await;
    assert_eq!((requeued.outcome.as_str(), requeued.jobs), ("Done", 1));
    assert_eq!(messages(&js, "conveyor_team_thumbs_dlq").await, 4);
    assert_eq!(
        messages(&js, "conveyor_team_thumbs").await,
        1,
        "job-3 is queued again"
    );
    let events = queue_events(cluster).await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "DeadLettersRequeued"
                && n.contains("requeued 1 dead letter(s) (job-3)")),
        "{events:?}"
    );

    let purged = request("conveyor.dev/dlq-purge", "all").await;
    assert_eq!((purged.outcome.as_str(), purged.jobs), ("Done", 4));
    assert!(
        purged.message.contains("purged 4 dead letter(s)"),
        "{purged:?}"
    );
    assert_eq!(messages(&js, "conveyor_team_thumbs_dlq").await, 0);
    assert_eq!(
        messages(&js, "conveyor_team_thumbs").await,
        1,
        "purging leaves queued jobs alone"
    );
    let events = queue_events(cluster).await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "DeadLettersPurged" && n.contains("purged 4 dead letter(s)")),
        "{events:?}"
    );

    fx.shutdown().await;
}

/// The API load one busy queue puts on the API server: 1,000 jobs/s through a queue for 20 s
/// (an SDK worker acking them, a tenth of them failing into the dead-letter queue so
/// `JobsFailing` flips and stays `True`), while the test itself stays off the API. Every
/// request the API server serves in that window is the operator's.
#[tokio::test]
async fn a_queue_at_a_thousand_jobs_a_second_costs_a_bounded_number_of_api_requests() {
    // The operator's defaults, but for the HTTP port.
    let fx = Fixture::start(BOTH_CRDS, |_| {}).await;
    let (cluster, nats) = (&fx.cluster, &fx.nats);
    let queue_yaml = &JobQueue::test("busy")
        .max_attempts(1)
        .alert_when_pending_over(100_000)
        .yaml();
    kubectl(cluster, &["apply", "-n", NS, "-f", "-"], Some(queue_yaml)).await;
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    wait_ready(&api, "busy").await;

    let queue = conveyor::names::QueueRef::new(NS, "busy");
    let client = conveyor::Client::connect(&nats.url()).await.unwrap();
    let worker_stop = CancellationToken::new();
    let worker = {
        let stop = worker_stop.clone();
        let options = conveyor::worker::WorkerOptions {
            concurrency: 64,
            poll_wait: Duration::from_millis(500),
            ..Default::default()
        };
        conveyor::Worker::new(client.jetstream().clone(), queue.clone())
            .options(options)
            .handler(|job: conveyor::ReceivedJob| async move {
                if job.id.ends_with('7') {
                    conveyor::Outcome::Permanent("simulated failure".into())
                } else {
                    conveyor::Outcome::Done(job.payload)
                }
            })
            .run(async move { stop.cancelled().await })
    };
    let worker = tokio::spawn(worker);

    // Three jobs for later: the status counts them as delayed.
    for i in 0..3 {
        let later = conveyor::Job::new(format!("later-{i}"), "x").delay(Duration::from_secs(3600));
        client.submit(&queue, later).await.unwrap();
    }

    const SECONDS: u64 = 20;
    const PER_SECOND: usize = 1_000;
    let before = cluster.requests();
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut submitted = 0usize;
    while started.elapsed() < Duration::from_secs(SECONDS) {
        tick.tick().await;
        let batch = (submitted..submitted + PER_SECOND / 10)
            .map(|i| conveyor::Job::new(format!("job-{i}"), "x"));
        let results = client.submit_batch(&queue, batch).await;
        assert!(results.iter().all(Result::is_ok));
        submitted += PER_SECOND / 10;
    }
    let after = cluster.requests();
    let window = started.elapsed().as_secs_f64();
    let delta: BTreeMap<String, u64> = after
        .iter()
        .map(|(verb, n)| (verb.clone(), n - before.get(verb).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let total: u64 = delta.values().sum();
    let per_minute = total as f64 * 60.0 / window;
    println!(
        "{submitted} jobs in {window:.1} s ({:.0}/s): {total} API requests ({delta:?}) = \
         {per_minute:.1} per minute",
        submitted as f64 / window
    );
    // Status at most every 5 s (12 a minute), a few condition-transition Events, and the
    // leader-election Lease renewals; nothing per job.
    assert!(per_minute <= 40.0, "{per_minute:.1} requests a minute");

    // The figures the status shows of that run.
    let status = api.get("busy").await.unwrap().status.unwrap();
    assert_eq!(status.delayed, Some(3));
    let rate = |r: Option<String>| r.and_then(|r| r.parse::<f64>().ok()).unwrap_or(-1.0);
    let (submitted, finished) = (
        rate(status.submitted_per_second.clone()),
        rate(status.finished_per_second.clone()),
    );
    println!("status: submitted {submitted}/s, finished {finished}/s");
    assert!((500.0..=1500.0).contains(&submitted), "{status:?}");
    assert!((500.0..=1500.0).contains(&finished), "{status:?}");

    worker_stop.cancel();
    worker.await.unwrap().unwrap();
    fx.shutdown().await;
}

/// `spec.rateLimit`: the operator makes the tokens stream and issues tokens at the rate; two
/// rate-limited workers with 32 free slots between them start jobs no faster than that.
#[tokio::test]
async fn a_rate_limited_queue_gets_tokens_from_the_operator() {
    const RATE: usize = 20;
    const JOBS: usize = 80;
    let fx = Fixture::start(BOTH_CRDS, |c| c.resync = Duration::from_secs(1)).await;
    let (cluster, nats) = (&fx.cluster, &fx.nats);
    let queue_yaml = &JobQueue::test("quota").rate_limit(20).yaml();
    kubectl(cluster, &["apply", "-n", NS, "-f", "-"], Some(queue_yaml)).await;
    let api: Api<JobQueue> = Api::namespaced(cluster.client(), NS);
    wait_ready(&api, "quota").await;
    let queue = conveyor::names::QueueRef::new(NS, "quota");
    let client = conveyor::Client::connect(&nats.url()).await.unwrap();
    assert!(
        client
            .jetstream()
            .get_stream(queue.tokens_stream())
            .await
            .is_ok()
    );
    let results = client
        .submit_batch(
            &queue,
            (0..JOBS).map(|i| conveyor::Job::new(format!("q{i}"), "x")),
        )
        .await;
    assert!(results.iter().all(Result::is_ok));
    let starts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stops: Vec<CancellationToken> = (0..2)
        .map(|_| {
            let stop = CancellationToken::new();
            let token = stop.clone();
            let starts = starts.clone();
            let options = conveyor::worker::WorkerOptions {
                concurrency: 16,
                rate_limited: true,
                poll_wait: Duration::from_millis(500),
                ..Default::default()
            };
            let worker = conveyor::Worker::new(client.jetstream().clone(), queue.clone())
                .options(options)
                .handler(move |job: conveyor::ReceivedJob| {
                    let starts = starts.clone();
                    async move {
                        starts.lock().unwrap().push(std::time::Instant::now());
                        conveyor::Outcome::Done(job.payload)
                    }
                });
            tokio::spawn(async move { worker.run(async move { token.cancelled().await }).await });
            stop
        })
        .collect();
    wait_for(DEADLINE, "every job started", || async {
        starts.lock().unwrap().len() >= JOBS
    })
    .await
    .unwrap();
    for stop in stops {
        stop.cancel();
    }
    let mut starts = starts.lock().unwrap().clone();
    starts.sort();
    let spread = starts[JOBS - 1] - starts[0];
    // At most one second's worth saved up front, then 20/s: 80 jobs take at least ~3 s.
    assert!(spread >= Duration::from_secs(2), "{spread:?}");
    let second = Duration::from_secs(1);
    let busiest = starts
        .iter()
        .map(|&t| starts.iter().filter(|&&u| u >= t && u < t + second).count())
        .max()
        .unwrap_or(0);
    // The saved second plus one second of issuing, and a tick of slack.
    assert!(
        busiest <= 2 * RATE + RATE / 4,
        "{busiest} started within a second"
    );
    println!("{JOBS} jobs at rateLimit {RATE}/s over {spread:?}, at most {busiest} in any second");

    // Dropping the limit removes the tokens stream (workers started with it see it gone).
    kubectl(
        cluster,
        &[
            "patch",
            "jobqueue",
            "quota",
            "-n",
            NS,
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/spec/rateLimit"}]"#,
        ],
        None,
    )
    .await;
    wait_for(DEADLINE, "the tokens stream to be gone", || async {
        client
            .jetstream()
            .get_stream(queue.tokens_stream())
            .await
            .is_err()
    })
    .await
    .unwrap();
    fx.shutdown().await;
}
