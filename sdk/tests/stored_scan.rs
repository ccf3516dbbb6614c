//! `stored::scan` reads what one `next` request after another would, in order, with dense,
//! sparse and deleted stretches of the stream, from any start and for any limit.

use async_nats::jetstream::{self, stream};
use conveyor::stored::{self, StoredJob};
use conveyor_testkit::NatsServer;

/// What `limit` sequential `next` requests from `from` read.
async fn one_by_one(
    client: &async_nats::Client,
    subject: &str,
    from: u64,
    limit: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut found = Vec::new();
    let mut at = from;
    while found.len() < limit {
        let Some(message) = stored::next(client, "scan", subject, at).await? else {
            break;
        };
        at = message.sequence + 1;
        found.push(message.sequence);
    }
    Ok(found)
}

fn sequences(messages: &[StoredJob]) -> Vec<u64> {
    messages.iter().map(|m| m.sequence).collect()
}

#[tokio::test]
async fn a_scan_reads_what_sequential_gets_read() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let scan = js
        .create_stream(stream::Config {
            name: "scan".into(),
            subjects: vec!["s.>".into()],
            ..Default::default()
        })
        .await?;
    // 1..=600: `a` on every third sequence; 601..=2100: `b` only (a stretch with no `a`,
    // longer than any window); 2101..=2400: `a` on every other; then a few `a`s deleted.
    for i in 1..=2400u64 {
        let subject = match i {
            1..=600 if i % 3 == 0 => "s.a",
            2101.. if i % 2 == 0 => "s.a",
            _ => "s.b",
        };
        js.publish(subject, format!("{i}").into()).await?.await?;
    }
    for deleted in [3, 300, 2102, 2398] {
        scan.delete_message(deleted).await?;
    }

    for subject in ["s.a", "s.b", "s.>"] {
        for from in [1, 2, 599, 601, 2100, 2399, 2401] {
            for limit in [1, 7, 16, 17, 100, 1000, 5000] {
                let scanned = stored::scan(&client, "scan", subject, from, limit).await?;
                assert_eq!(
                    sequences(&scanned),
                    one_by_one(&client, subject, from, limit).await?,
                    "{subject} from {from}, limit {limit}"
                );
                // Each message is the one stored at its sequence, payload included.
                for message in &scanned {
                    assert_eq!(message.payload, format!("{}", message.sequence).as_bytes());
                }
            }
        }
    }
    Ok(())
}
