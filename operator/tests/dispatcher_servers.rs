//! The dispatcher serves every NATS server the operator uses, not only its default one: a
//! queue whose `spec.nats` names another server gets its exhausted jobs dead-lettered there
//! (before, crashed jobs of such a queue stayed in its work stream for ever).

mod worker_env;

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use conveyor::dlq::REASON_MAX_DELIVERIES;
use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_crds::JobQueue;
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::{NatsServer, wait_for};
use futures::StreamExt;
use worker_env::{Env, NS};

#[tokio::test]
async fn a_queue_on_its_own_nats_server_gets_its_exhausted_jobs_dead_lettered() {
    let env = Env::start().await;
    let own = NatsServer::start().await.unwrap();
    env.apply(
        &JobQueue::test("elsewhere")
            .nats_url(&own.url())
            .timeout("1s")
            .max_attempts(2)
            .yaml(),
    )
    .await;
    let queue = QueueRef::new(NS, "elsewhere");
    let client = Client::connect(&own.url()).await.unwrap();
    let js = client.jetstream().clone();
    wait_for(
        Duration::from_secs(30),
        "the queue on its own server",
        || async {
            js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                queue.consumer(0),
                queue.stream(),
            )
            .await
            .is_ok()
        },
    )
    .await
    .unwrap();
    client
        .submit(&queue, Job::new("crashes-every-time", "x"))
        .await
        .unwrap();

    // A worker that takes the job and dies before answering, on every delivery.
    let consumer: PullConsumer = js
        .get_consumer_from_stream(queue.consumer(0), queue.stream())
        .await
        .unwrap();
    let dead_lettered = wait_for(Duration::from_secs(60), "the job dead-lettered", || async {
        if let Ok(mut batch) = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_millis(300))
            .messages()
            .await
        {
            while batch.next().await.is_some() {}
        }
        conveyor::dlq::list(&js, &queue, &conveyor::dlq::Selector::All, 10)
            .await
            .is_ok_and(|entries| {
                entries
                    .iter()
                    .any(|e| e.job_id == "crashes-every-time" && e.reason == REASON_MAX_DELIVERIES)
            })
    })
    .await;
    dead_lettered.unwrap();
    env.shutdown().await;
}
