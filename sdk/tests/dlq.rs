//! The dead-letter tools against a real nats-server: list (filtered, bounded), show, requeue
//! (one, by error, all — requeued jobs run again with fresh attempts and their own id) and
//! purge.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::dlq::{self, DlqError, Selector};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, WorkerOptions};
use conveyor::{Client, Job, Worker};
use conveyor_testkit::dead_letters::count as dead_letters;
use conveyor_testkit::{NatsServer, wait_for};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Attempt numbers each job id ran with, in order.
type Runs = Arc<Mutex<BTreeMap<String, Vec<u32>>>>;

fn ran(runs: &Runs, id: &str) -> Vec<u32> {
    runs.lock().unwrap().get(id).cloned().unwrap_or_default()
}

#[tokio::test]
async fn list_show_requeue_and_purge_dead_letters() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let js = client.jetstream().clone();
    let queue = QueueRef::new("test", "dlq-tools");
    let settings = QueueSettings {
        priorities: 2,
        max_attempts: 3,
        ..Default::default()
    };
    ensure_queue(&js, &queue, &settings).await?;

    // While `broken`, every job fails for good with an error taken from its payload.
    let broken = Arc::new(AtomicBool::new(true));
    let runs: Runs = Arc::default();
    let stop = CancellationToken::new();
    let worker = Worker::new(js.clone(), queue.clone())
        .options(WorkerOptions {
            concurrency: 4,
            priorities: 2,
            poll_wait: Duration::from_millis(200),
            pod_name: "pod-7".into(),
            ..Default::default()
        })
        .handler({
            let (broken, runs) = (broken.clone(), runs.clone());
            move |job: conveyor::ReceivedJob| {
                let (broken, runs) = (broken.clone(), runs.clone());
                async move {
                    runs.lock()
                        .unwrap()
                        .entry(job.id.clone())
                        .or_default()
                        .push(job.attempt);
                    if broken.load(Ordering::SeqCst) {
                        Outcome::Permanent(String::from_utf8_lossy(&job.payload).into_owned())
                    } else {
                        Outcome::Done(job.payload)
                    }
                }
            }
        });
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token.cancelled_owned()).await });

    for i in 1..=3 {
        client
            .submit(&queue, Job::new(format!("db-{i}"), "database down"))
            .await?;
        client
            .submit(
                &queue,
                Job::new(format!("net-{i}"), "network unreachable").priority(1),
            )
            .await?;
    }
    wait_for(WAIT, "six dead letters", || async {
        dead_letters(&js, &queue).await == 6
    })
    .await?;

    // list: everything, bounded, filtered.
    let all = dlq::list(&js, &queue, &Selector::All, 100).await?;
    assert_eq!(all.len(), 6);
    for entry in &all {
        assert_eq!(entry.reason, "permanent");
        assert_eq!(entry.attempts, Some(1));
        assert_eq!(entry.pod, "pod-7");
        assert!(!entry.failed_at.is_empty());
    }
    assert_eq!(dlq::list(&js, &queue, &Selector::All, 2).await?.len(), 2);
    let db = dlq::list(&js, &queue, &Selector::ErrorMatch("DATABASE".into()), 100).await?;
    let mut db_ids: Vec<_> = db.iter().map(|e| e.job_id.as_str()).collect();
    db_ids.sort();
    assert_eq!(db_ids, ["db-1", "db-2", "db-3"]);

    // show: payload and headers of one job.
    let shown = dlq::show(&js, &queue, "net-2").await?;
    assert_eq!(shown.payload, "network unreachable");
    assert_eq!(shown.entry.error, "network unreachable");
    assert_eq!(shown.entry.subject, queue.job_subject(1));
    assert!(matches!(
        dlq::show(&js, &queue, "nope").await,
        Err(DlqError::NotFound(_))
    ));

    // requeue one: it runs again from attempt 1 under its own id and level, and succeeds.
    broken.store(false, Ordering::SeqCst);
    let moved = dlq::requeue(&js, &queue, &Selector::One("db-1".into())).await?;
    assert_eq!(moved.jobs, ["db-1"]);
    wait_for(WAIT, "db-1 to run again", || async {
        ran(&runs, "db-1") == [1, 1]
    })
    .await?;
    assert_eq!(dead_letters(&js, &queue).await, 5);

    // requeue by error text, then all that is left.
    let moved = dlq::requeue(&js, &queue, &Selector::ErrorMatch("network".into())).await?;
    assert_eq!(moved.jobs.len(), 3);
    let moved = dlq::requeue(&js, &queue, &Selector::All).await?;
    let mut rest = moved.jobs.clone();
    rest.sort();
    assert_eq!(rest, ["db-2", "db-3"]);
    wait_for(WAIT, "every requeued job to run again", || async {
        ["db-2", "db-3", "net-1", "net-2", "net-3"]
            .iter()
            .all(|id| ran(&runs, id) == [1, 1])
    })
    .await?;
    assert_eq!(dead_letters(&js, &queue).await, 0);
    assert!(matches!(
        dlq::requeue(&js, &queue, &Selector::One("db-1".into())).await,
        Err(DlqError::NotFound(_))
    ));

    // purge one, then all.
    broken.store(true, Ordering::SeqCst);
    for id in ["p-1", "p-2", "p-3"] {
        client.submit(&queue, Job::new(id, "bad")).await?;
    }
    wait_for(WAIT, "three new dead letters", || async {
        dead_letters(&js, &queue).await == 3
    })
    .await?;
    let purged = dlq::purge(&js, &queue, &Selector::One("p-2".into())).await?;
    assert_eq!(purged.jobs, ["p-2"]);
    assert_eq!(dead_letters(&js, &queue).await, 2);
    let purged = dlq::purge(&js, &queue, &Selector::All).await?;
    assert_eq!(purged.jobs.len(), 2);
    assert_eq!(dead_letters(&js, &queue).await, 0);
    assert!(dlq::list(&js, &queue, &Selector::All, 10).await?.is_empty());

    stop.cancel();
    running.await??;
    Ok(())
}

/// Anyone who may publish on a queue's dead-letter or result subject can store headers there
/// that the NATS client cannot read (a bare CR panics async-nats 0.51's connection task). The
/// dead-letter tools and result lookups read them raw: the hostile entry is listed, shown and
/// purged like any other, a good one beside it is untouched, and the client stays connected.
#[tokio::test]
async fn unreadable_headers_in_the_dead_letter_and_result_streams_are_read_raw()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let js = client.jetstream().clone();
    let queue = QueueRef::new("test", "dlq-hostile");
    ensure_queue(&js, &queue, &QueueSettings::default()).await?;

    let mut raw = conveyor_testkit::raw::RawPublisher::connect(nats.port()).await?;
    let good = b"NATS/1.0\r\nConveyor-Job-Id: good-1\r\nConveyor-Reason: permanent\r\nConveyor-Error: boom\r\n\r\n";
    let bad = b"NATS/1.0\r\nConveyor-Job-Id: bad-1\r\nConveyor-Reason: permanent\r\nX-Note: line1\rline2\r\n\r\n";
    for block in [&good[..], &bad[..]] {
        let answer = raw
            .publish(&queue.dead_letter_subject(), Some(block), b"payload")
            .await?;
        assert!(answer.sequence().is_some(), "{answer:?}");
    }
    let result =
        b"NATS/1.0\r\nConveyor-Job-Id: r-1\r\nConveyor-Outcome: done\r\nX-Note: a\rb\r\n\r\n";
    let answer = raw
        .publish(&queue.result_subject("r-1"), Some(result), b"result")
        .await?;
    assert!(answer.sequence().is_some(), "{answer:?}");

    let listed = dlq::list(&js, &queue, &Selector::All, 10).await?;
    let ids: Vec<&str> = listed.iter().map(|e| e.job_id.as_str()).collect();
    assert_eq!(ids, ["good-1", "bad-1"]);
    assert_eq!(listed[1].size, Some(7));
    let shown = dlq::show(&js, &queue, "bad-1").await?;
    assert_eq!(&shown.payload[..], b"payload");
    assert!(
        shown.headers.get("X-Note").is_none(),
        "the unreadable line is left out"
    );
    // The stored result is read as well (whatever it says), without a panic.
    let _ = client.result(&queue, "r-1").await;
    assert_eq!(
        js.client().connection_state(),
        async_nats::connection::State::Connected,
        "the client survived every read"
    );
    let purged = dlq::purge(&js, &queue, &Selector::One("bad-1".into())).await?;
    assert_eq!(purged.jobs, ["bad-1"]);
    let left = dlq::list(&js, &queue, &Selector::All, 10).await?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].job_id, "good-1");
    Ok(())
}
