//! Component tests of the JetStream side of the JobQueue controller against a real
//! `nats-server` (one per test, on a free port, removed on drop).

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::JobQueueSpec;
use conveyor_operator::assets::{self, Figures};
use conveyor_operator::nats::NatsPool;
use conveyor_testkit::{NatsServer, wait_for};
use futures::TryStreamExt;

const DEADLINE: Duration = Duration::from_secs(20);

fn spec(yaml: &str) -> JobQueueSpec {
    serde_yaml::from_str(yaml).unwrap()
}

async fn jetstream(server: &NatsServer) -> async_nats::jetstream::Context {
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
}

async fn stream_names(js: &async_nats::jetstream::Context) -> Vec<String> {
    let mut names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    names.sort();
    names
}

#[tokio::test]
async fn ensure_creates_streams_and_consumers_and_counts_jobs() {
    let server = NatsServer::start().await.unwrap();
    let js = jetstream(&server).await;
    let queue = QueueRef::new("team", "mail");
    let desired = assets::desired(
        &queue,
        &spec("priorities: 2\ntimeout: 10s\nretry: {maxAttempts: 4}\nconcurrencyLimit: 25"),
    )
    .unwrap();

    let figures = assets::ensure(&js, &desired).await.unwrap();
    assert_eq!(figures, Figures::default());
    assert_eq!(
        stream_names(&js).await,
        [
            "conveyor_team_mail",
            "conveyor_team_mail_cancel",
            "conveyor_team_mail_delayed",
            "conveyor_team_mail_dlq",
            "conveyor_team_mail_events",
            "conveyor_team_mail_flow",
            "conveyor_team_mail_results",
            "conveyor_team_mail_waiting",
        ]
    );
    let mut stream = js.get_stream("conveyor_team_mail").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.config.subjects,
        ["conveyor.team.mail.jobs.0", "conveyor.team.mail.jobs.1"]
    );
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("workers-p1").await.unwrap();
    assert_eq!(consumer.cached_info().config.max_deliver, 4);
    assert_eq!(consumer.cached_info().config.max_ack_pending, 25);
    assert_eq!(
        consumer.cached_info().config.ack_wait,
        Duration::from_secs(10)
    );

    for level in [0, 1, 1] {
        js.publish(queue.job_subject(level), "job".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let figures = assets::ensure(&js, &desired).await.unwrap();
    assert_eq!(
        figures,
        Figures {
            pending: 3,
            in_flight: 0
        }
    );
    assert_eq!(assets::figures(&js, &desired).await.unwrap().backlog(), 3);
}

#[tokio::test]
async fn ensure_recreates_what_was_deleted_behind_its_back() {
    let server = NatsServer::start().await.unwrap();
    let js = jetstream(&server).await;
    let queue = QueueRef::new("ns", "q");
    let desired = assets::desired(&queue, &spec("{}")).unwrap();
    assets::ensure(&js, &desired).await.unwrap();

    let mut all = vec![
        queue.stream(),
        queue.delayed_stream(),
        queue.cancel_stream(),
        queue.dead_letter_stream(),
        queue.events_stream(),
        queue.results_stream(),
        queue.waiting_stream(),
        queue.flow_stream(),
    ];
    all.sort();
    assert_eq!(stream_names(&js).await, all);
    for name in &all {
        js.delete_stream(name).await.unwrap();
    }
    assert!(stream_names(&js).await.is_empty());

    assets::ensure(&js, &desired).await.unwrap();
    assert_eq!(stream_names(&js).await, all);
    let stream = js.get_stream(queue.stream()).await.unwrap();
    let consumers: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    assert_eq!(consumers, ["workers-p0"]);
}

#[tokio::test]
async fn fewer_priorities_drop_the_extra_consumers() {
    let server = NatsServer::start().await.unwrap();
    let js = jetstream(&server).await;
    let queue = QueueRef::new("ns", "q");
    assets::ensure(
        &js,
        &assets::desired(&queue, &spec("priorities: 3")).unwrap(),
    )
    .await
    .unwrap();
    assets::ensure(
        &js,
        &assets::desired(&queue, &spec("priorities: 1")).unwrap(),
    )
    .await
    .unwrap();
    let mut stream = js.get_stream(queue.stream()).await.unwrap();
    let consumers: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    assert_eq!(consumers, ["workers-p0"]);
    assert_eq!(
        stream.info().await.unwrap().config.subjects,
        [queue.job_subject(0)]
    );
}

#[tokio::test]
async fn delete_is_idempotent() {
    let server = NatsServer::start().await.unwrap();
    let js = jetstream(&server).await;
    let queue = QueueRef::new("ns", "gone");
    assets::ensure(&js, &assets::desired(&queue, &spec("{}")).unwrap())
        .await
        .unwrap();
    assets::delete(&js, &queue).await.unwrap();
    assert!(stream_names(&js).await.is_empty());
    assets::delete(&js, &queue).await.unwrap();
}

#[tokio::test]
async fn nats_refusing_a_change_is_not_reported_as_unavailable() {
    let server = NatsServer::start().await.unwrap();
    let js = jetstream(&server).await;
    let queue = QueueRef::new("ns", "q");
    assets::ensure(&js, &assets::desired(&queue, &spec("{}")).unwrap())
        .await
        .unwrap();
    // JetStream cannot change the storage type of an existing stream.
    let err = assets::ensure(
        &js,
        &assets::desired(&queue, &spec("stream: {storage: memory}")).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(!err.is_unavailable(), "{err}");
    assert!(err.to_string().contains(&queue.stream()), "{err}");
}

#[tokio::test]
async fn the_pool_waits_for_a_server_that_starts_later() {
    let mut server = NatsServer::start().await.unwrap();
    server.stop().await.unwrap();
    let pool = NatsPool::new(server.url(), "test");
    assert!(
        pool.connected(None).await.unwrap().is_none(),
        "no server yet"
    );

    server.restart().await.unwrap();
    wait_for(
        DEADLINE,
        "the pool to connect to the restarted server",
        || async { pool.connected(None).await.unwrap().is_some() },
    )
    .await
    .unwrap();
    let js = pool.connected(None).await.unwrap().unwrap();
    let queue = QueueRef::new("ns", "late");
    assets::ensure(&js, &assets::desired(&queue, &spec("{}")).unwrap())
        .await
        .unwrap();
}
