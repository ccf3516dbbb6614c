//! The permission set docs/security.md designs for a per-Worker identity, given to a user of a
//! real `nats-server` (a static `permissions` block here; the operator is to sign it into a
//! user JWT): the SDK's worker loop works its queue with it (jobs acked, a failing one
//! dead-lettered, a cancellation followed), and the server refuses it purging or deleting a
//! stream and publishing into another queue, which keeps its jobs.

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, Worker};
use conveyor_testkit::wait_for;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

/// The publish and subscribe allow-lists of a worker of `queue` (one priority level).
fn worker_permissions(queue: &QueueRef) -> (Vec<String>, Vec<String>) {
    let stream = queue.stream();
    let cancels = queue.cancel_stream();
    let publish = vec![
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.INFO.{cancels}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.{}", queue.consumer(0)),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{}", queue.consumer(0)),
        format!("$JS.ACK.{stream}.>"),
        // The ordered consumer that follows cancellations is ephemeral: CREATE.<stream>.
        format!("$JS.API.CONSUMER.CREATE.{cancels}"),
        format!("$JS.API.CONSUMER.CREATE.{cancels}.>"),
        format!("$JS.API.CONSUMER.DELETE.{cancels}.>"),
        format!("$JS.FC.{cancels}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.STREAM.MSG.DELETE.{stream}"),
        queue.dead_letter_subject(),
        queue.results_wildcard(),
        "_INBOX.>".to_owned(),
    ];
    let subscribe = vec!["_INBOX.>".to_owned()];
    (publish, subscribe)
}

/// A `nats-server` started by the test; killed on drop.
struct Server(Child, tempfile::TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server with one account: `admin` may do anything, `worker` only what
/// [`worker_permissions`] allows for `queue`.
fn start_server(queue: &QueueRef) -> (Server, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = conveyor_testkit::free_port().unwrap();
    let quote = |list: &[String]| {
        list.iter()
            .map(|s| serde_json::Value::from(s.as_str()).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (publish, subscribe) = worker_permissions(queue);
    let config = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {store:?} }}\n\
         accounts {{\n  APP {{\n    jetstream: enabled\n    users: [\n      \
         {{ user: admin, password: admin }}\n      \
         {{ user: worker, password: worker, permissions: {{ publish: {{ allow: [{publish}] }}, \
         subscribe: {{ allow: [{subscribe}] }} }} }}\n    ]\n  }}\n}}\n",
        store = dir.path().join("store").display().to_string(),
        publish = quote(&publish),
        subscribe = quote(&subscribe),
    );
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(&path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("nats-server runs (PATH=$HOME/.local/bin:$PATH)");
    (Server(child, dir), format!("nats://127.0.0.1:{port}"))
}

async fn connect(url: &str, user: &str) -> async_nats::Client {
    let start = Instant::now();
    loop {
        match async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
            .connect(url)
            .await
        {
            Ok(client) => return client,
            Err(error) if start.elapsed() > DEADLINE => panic!("{user} connects: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut stream) => stream.info().await.map_or(u64::MAX, |i| i.state.messages),
        Err(_) => u64::MAX,
    }
}

#[tokio::test]
async fn a_worker_identity_works_its_queue_and_nothing_else() {
    let queue = QueueRef::new("team", "mail");
    let other = QueueRef::new("team", "billing");
    let (server, url) = start_server(&queue);
    let admin = Client::new(connect(&url, "admin").await);
    for q in [&queue, &other] {
        ensure_queue(admin.jetstream(), q, &QueueSettings::default())
            .await
            .expect("the admin creates the queues");
    }
    for i in 0..20 {
        admin
            .submit(&queue, Job::new(format!("job-{i}"), "ok"))
            .await
            .unwrap();
    }
    admin
        .submit(&queue, Job::new("poison", "fail"))
        .await
        .unwrap();
    admin.cancel(&queue, "cancelled").await.unwrap();
    admin
        .submit(&queue, Job::new("cancelled", "ok"))
        .await
        .unwrap();
    admin
        .submit(&other, Job::new("invoice", "ok"))
        .await
        .unwrap();

    let worker_nats = connect(&url, "worker").await;
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let worker = Worker::new(jetstream::new(worker_nats.clone()), queue.clone())
        .options(WorkerOptions {
            concurrency: 4,
            poll_wait: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(5),
            pod_name: "scoped".into(),
            ..Default::default()
        })
        .handler(move |job: ReceivedJob| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move {
                if job.payload.as_ref() == b"fail" {
                    Outcome::Permanent("cannot be done".into())
                } else {
                    Outcome::Done(Default::default())
                }
            }
        });
    let run = tokio::spawn(async move { worker.run(async move { token.cancelled().await }).await });
    let js = admin.jetstream().clone();
    let settled = wait_for(
        DEADLINE,
        "the queue worked by the scoped identity",
        || async {
            messages(&js, &queue.stream()).await == 0
                && messages(&js, &queue.dead_letter_stream()).await == 1
        },
    )
    .await;
    let log = std::fs::read_to_string(server.1.path().join("nats.log")).unwrap_or_default();
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(
        settled.is_ok() && violations.is_empty(),
        "the worker could not work its queue; the server refused: {violations:#?}"
    );
    assert_eq!(
        handled.load(Ordering::Relaxed),
        21,
        "20 jobs and the poison one ran; the cancelled one was skipped"
    );
    stop.cancel();
    run.await.unwrap().expect("the worker stops cleanly");

    // The same identity, misused: each attempt fails, and the server's log says it refused
    // exactly that subject (a refused request gets no answer, so the client sees a timeout).
    let misuse = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(worker_nats);
    let log_path = server.1.path().join("nats.log");
    let refused = |subject: String| {
        let log_path = log_path.clone();
        async move {
            let line = format!("Publish Violation - Subject \"{subject}\"");
            wait_for(
                DEADLINE,
                &format!("the server to refuse {subject}"),
                || async {
                    std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains(&line))
                },
            )
            .await
            .unwrap();
        }
    };
    for stream in [other.stream(), queue.stream()] {
        let purge = misuse
            .get_stream_no_info(&stream)
            .await
            .unwrap()
            .purge()
            .await;
        assert!(purge.is_err(), "purging {stream} fails");
        refused(format!("$JS.API.STREAM.PURGE.{stream}")).await;
    }
    assert!(
        misuse.delete_stream(other.stream()).await.is_err(),
        "deleting a stream fails"
    );
    refused(format!("$JS.API.STREAM.DELETE.{}", other.stream())).await;
    let publish = async {
        misuse
            .publish(other.job_subject(0), "forged".into())
            .await?
            .await
    };
    assert!(
        publish.await.is_err(),
        "publishing into another queue fails"
    );
    refused(other.job_subject(0)).await;
    assert_eq!(
        messages(&js, &other.stream()).await,
        1,
        "the other queue keeps its job and got no forged one"
    );
}
