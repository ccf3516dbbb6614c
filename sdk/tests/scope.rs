//! The permission set docs/security.md designs for a per-Worker identity
//! ([`conveyor::permissions::worker`]), signed into a user JWT with an account signing key
//! ([`conveyor::jwt::user`], as the operator mints it) and presented to a real operator-mode
//! `nats-server`: the SDK's worker loop works its queue with it (jobs acked, a failing one
//! dead-lettered, a cancellation followed, replies under its own inbox prefix), and the server
//! refuses it purging or deleting a stream and publishing into another queue, which keeps its
//! jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::connect::{Auth, NatsOptions, Secret};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, Worker, jwt, permissions};
use conveyor_testkit::{NatsServer, ServerAuth, wait_for};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

/// An operator-mode server and a worker identity of `queue` minted with its signing key:
/// the client, connected with the minted `.creds` and the Worker's inbox prefix.
async fn start_server(queue: &QueueRef) -> (NatsServer, async_nats::Client) {
    let server = NatsServer::builder()
        .operator_mode()
        .unwrap()
        .start()
        .await
        .expect("an operator-mode nats-server starts");
    let Some(ServerAuth::Operator(keys)) = server.auth() else {
        unreachable!("the builder made an operator-mode server")
    };
    let prefix = permissions::worker_inbox_prefix("0f5c0a52-5d4e-4a8e-9b1e-3d3e0e7c1a11");
    let minted = jwt::user(
        &keys.signing_key(),
        &keys.account,
        "team/mail-worker",
        &permissions::worker(queue, 1, false, &prefix),
        jiff::Timestamp::now().as_second(),
        3600,
    )
    .unwrap();
    let worker = NatsOptions::new(&server.url())
        .unwrap()
        .auth(Auth::Creds(Secret::new(minted.creds())))
        .unwrap()
        .inbox_prefix(prefix)
        .connect()
        .await
        .expect("the server accepts the minted creds");
    (server, worker)
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
    let (server, worker_nats) = start_server(&queue).await;
    let admin = Client::new(server.client().await.unwrap());
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
    let violations = server.violations();
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
    let refused = |subject: String| {
        let server = &server;
        async move { server.refused(&subject, DEADLINE).await.unwrap() }
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
