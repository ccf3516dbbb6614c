//! `conveyor dlq` as a user runs it: the real binary against a real nats-server holding dead
//! letters.

use std::process::Output;

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor_testkit::NatsServer;
use conveyor_testkit::dead_letters::{self, Letter};

fn conveyor(nats: &NatsServer, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["dlq"])
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

/// Puts a dead letter into the queue's dead-letter stream the way a worker does.
async fn dead_letter(js: &jetstream::Context, queue: &QueueRef, id: &str, error: &str) {
    let letter = Letter::of(queue, id)
        .error(error)
        .attempts(5)
        .failed_at("2026-11-23T18:00:00Z")
        .payload(format!("payload of {id}"));
    dead_letters::publish(js, [letter]).await.unwrap();
}

#[tokio::test]
async fn list_show_requeue_and_purge_from_the_command_line() {
    let nats = NatsServer::start().await.unwrap();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let queue = QueueRef::new("shop", "orders");
    ensure_queue(&js, &queue, &QueueSettings::default())
        .await
        .unwrap();
    dead_letter(&js, &queue, "order-1", "smtp: connection refused").await;
    dead_letter(&js, &queue, "order-2", "card declined").await;
    dead_letter(&js, &queue, "order-3", "SMTP timeout").await;

    let list = stdout(&conveyor(&nats, &["list", "orders"]));
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("ID"), "{list}");
    assert_eq!(lines.len(), 4, "{list}");
    assert!(lines[1].starts_with("order-1") && lines[1].contains("worker-abc"));

    let json = stdout(&conveyor(
        &nats,
        &["list", "orders", "--error", "smtp", "-o", "json"],
    ));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["order-1", "order-3"]);

    let show = stdout(&conveyor(&nats, &["show", "orders", "order-2"]));
    assert!(show.contains("Conveyor-Error: card declined"), "{show}");
    assert!(show.ends_with("payload of order-2\n"), "{show}");
    let missing = conveyor(&nats, &["show", "orders", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter with job id"));

    let requeued = stdout(&conveyor(&nats, &["requeue", "orders", "--error", "smtp"]));
    assert!(requeued.contains("requeued 2 job(s)"), "{requeued}");
    let work = js.get_stream(queue.stream()).await.unwrap();
    assert_eq!(work.get_info().await.unwrap().state.messages, 2);

    let purged = stdout(&conveyor(&nats, &["purge", "orders", "--all"]));
    assert!(purged.contains("purged 1 dead letter(s)"), "{purged}");
    let dlq = js.get_stream(queue.dead_letter_stream()).await.unwrap();
    assert_eq!(dlq.get_info().await.unwrap().state.messages, 0);
    assert!(!conveyor(&nats, &["requeue", "orders"]).status.success());
}
