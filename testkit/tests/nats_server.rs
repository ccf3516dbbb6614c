//! The fixture itself: a restart keeps port and store, drop removes the store.

use std::time::Duration;

use async_nats::jetstream;
use conveyor_testkit::{NatsServer, wait_for};

#[tokio::test]
async fn restart_keeps_port_and_file_store() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let url = nats.url();
    let js = jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(jetstream::stream::Config {
        name: "s".into(),
        subjects: vec!["s.>".into()],
        ..Default::default()
    })
    .await?;
    js.publish("s.a", "kept".into()).await?.await?;
    nats.restart().await?;
    assert_eq!(nats.url(), url);
    // The old client reconnects by itself; wait until JetStream answers again.
    wait_for(
        Duration::from_secs(15),
        "the stream to answer after the restart",
        || async {
            match js.get_stream("s").await {
                Ok(stream) => stream.get_info().await.is_ok_and(|i| i.state.messages == 1),
                Err(_) => false,
            }
        },
    )
    .await?;
    let store = nats.store_dir();
    assert!(store.exists());
    drop(nats);
    assert!(!store.exists(), "store removed on drop");
    Ok(())
}

#[tokio::test]
async fn wait_for_says_what_it_waited_for() {
    let err = wait_for(Duration::from_millis(50), "the moon", || async { false })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "timed out after 50ms waiting for the moon");
}

#[tokio::test]
async fn wait_for_some_returns_the_value_that_met_the_condition() {
    let mut calls = 0;
    let found = conveyor_testkit::wait_for_some(Duration::from_secs(5), "a third call", || {
        calls += 1;
        let n = calls;
        async move { (n >= 3).then_some(n) }
    })
    .await
    .unwrap();
    assert_eq!(found, 3);
    let err = conveyor_testkit::wait_for_some(Duration::from_millis(50), "nothing", || async {
        None::<()>
    })
    .await
    .unwrap_err();
    assert_eq!(err.to_string(), "timed out after 50ms waiting for nothing");
}
