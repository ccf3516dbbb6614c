//! Dead letters written the way a worker writes them and read back whole.

use async_nats::jetstream;
use conveyor::names::QueueRef;
use conveyor::protocol::{self, dead_letter};
use conveyor_testkit::NatsServer;
use conveyor_testkit::dead_letters::{self, Letter, header};

#[tokio::test]
async fn published_letters_are_read_back_with_a_workers_headers() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = jetstream::new(nats.client().await?);
    let queue = QueueRef::new("team", "thumbs");
    assert_eq!(dead_letters::count(&js, &queue).await, 0, "no stream yet");
    js.create_stream(jetstream::stream::Config {
        name: queue.dead_letter_stream(),
        subjects: vec![queue.dead_letter_subject()],
        ..Default::default()
    })
    .await?;
    dead_letters::publish(
        &js,
        (1..=3).map(|i| {
            Letter::of(&queue, &format!("job-{i}"))
                .sequence(i)
                .error(&format!("boom {i}"))
                .attempts(5)
                .payload(format!("payload {i}"))
        }),
    )
    .await?;
    assert_eq!(dead_letters::count(&js, &queue).await, 3);
    let read = dead_letters::read_all(&js, &queue).await?;
    let seen: Vec<_> = read
        .iter()
        .map(|m| {
            (
                header(m, protocol::MSG_ID),
                header(m, dead_letter::ERROR),
                header(m, dead_letter::ATTEMPTS),
                header(m, dead_letter::SUBJECT),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen[2],
        (
            "job-3:3".into(),
            "boom 3".into(),
            "5".into(),
            queue.job_subject(0),
            "payload 3".into()
        )
    );
    assert_eq!(seen.len(), 3);
    assert_eq!(header(&read[0], dead_letter::REASON), "exhausted");
    // Reading left the stream as it was.
    assert_eq!(dead_letters::read_all(&js, &queue).await?.len(), 3);
    Ok(())
}
