//! The operator's NATS clients outlive a message that kills their connection task: async-nats
//! 0.51 panics in that task on a header value with a bare CR (any subscriber of a subject a
//! hostile producer can publish into receives it). The pool notices the dead client and makes
//! a new one on next use, instead of reporting the server unreachable until a restart.

use std::time::Duration;

use conveyor_operator::nats::NatsPool;
use conveyor_testkit::raw::RawPublisher;
use conveyor_testkit::{NatsServer, wait_for};

#[tokio::test]
async fn a_client_whose_connection_task_died_is_replaced() {
    let server = NatsServer::start().await.unwrap();
    let pool = NatsPool::new(server.url(), "pool-test");
    let first = pool.client(None).await.unwrap();
    let _subscriber = first.subscribe("poison").await.unwrap();
    first.flush().await.unwrap();
    let mut raw = RawPublisher::connect(server.port()).await.unwrap();
    // Core NATS: no JetStream answer comes, so the publisher only sends it.
    raw.send("poison", Some(b"NATS/1.0\r\nX-Note: a\rb\r\n\r\n"), b"x")
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the first client to die",
        || async { first.flush().await.is_err() },
    )
    .await
    .unwrap();
    wait_for(Duration::from_secs(30), "a new, working client", || async {
        let client = pool.client(None).await.unwrap();
        client.flush().await.is_ok()
    })
    .await
    .unwrap();
    let [(_, _, live)] = pool.clients().await.try_into().unwrap();
    live.flush().await.unwrap();
}
