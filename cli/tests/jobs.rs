//! `conveyor jobs list` as a user runs it: the real binary against a real nats-server holding
//! pending jobs at two priority levels, one of them delivered to a worker, and a delayed job.

use std::process::Output;
use std::time::Duration;

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_testkit::NatsServer;

fn conveyor(nats: &NatsServer, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["jobs", "list", "orders"])
        .args(args)
        .args(["--nats-url", &nats.url(), "-n", "shop"])
        .output()
        .expect("running conveyor")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "conveyor failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn pending_and_delayed_jobs_are_listed_a_page_at_a_time() {
    let nats = NatsServer::start().await.unwrap();
    let client = Client::connect(&nats.url()).await.unwrap();
    let js = client.jetstream().clone();
    let queue = QueueRef::new("shop", "orders");
    let settings = QueueSettings {
        priorities: 2,
        ..QueueSettings::default()
    };
    ensure_queue(&js, &queue, &settings).await.unwrap();
    for n in 0..5 {
        client
            .submit(&queue, Job::new(format!("low-{n}"), "{}"))
            .await
            .unwrap();
    }
    client
        .submit(&queue, Job::new("urgent-1", "{}").priority(1))
        .await
        .unwrap();
    client
        .submit(
            &queue,
            Job::new("later-1", "{}").delay(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    // A worker takes the first low job and holds it (no ack): it shows as delivered.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(queue.consumer(0), queue.stream())
        .await
        .unwrap();
    let taken = conveyor_testkit::take(&consumer, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        taken
            .headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .as_str(),
        "low-0"
    );

    let first = conveyor(&nats, &["--limit", "2"]);
    let table = stdout(&first);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SEQ") && lines[0].ends_with("STATE"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].contains("low-0") && lines[1].ends_with("delivered"),
        "{table}"
    );
    assert!(
        lines[2].contains("low-1") && lines[2].ends_with("waiting"),
        "{table}"
    );
    let more = String::from_utf8_lossy(&first.stderr).into_owned();
    let from = more
        .trim()
        .strip_prefix("more: --from ")
        .unwrap_or_else(|| panic!("a pointer to the next page: {more:?}"));

    let rest = stdout(&conveyor(&nats, &["--from", from, "-o", "json"]));
    let page: serde_json::Value = serde_json::from_str(&rest).unwrap();
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["low-2", "low-3", "low-4"], "{page}");
    assert!(page["next"].is_null());

    let urgent = stdout(&conveyor(&nats, &["--level", "1"]));
    assert!(
        urgent.contains("urgent-1") && !urgent.contains("low-"),
        "{urgent}"
    );
    let delayed = stdout(&conveyor(&nats, &["--delayed"]));
    assert!(
        delayed.lines().next().unwrap().ends_with("RUNS"),
        "{delayed}"
    );
    assert!(
        delayed.contains("later-1") && delayed.contains("@at "),
        "{delayed}"
    );

    let no_level = conveyor(&nats, &["--level", "2"]);
    assert!(!no_level.status.success());
    assert!(
        String::from_utf8_lossy(&no_level.stderr).contains("has no priority level 2"),
        "{no_level:?}"
    );
    let too_many = conveyor(&nats, &["--limit", "5000"]);
    assert!(!too_many.status.success(), "a page is bounded");
    drop(taken);
}
