//! Cancellation against a real nats-server: queued jobs are skipped, running ones are told and
//! stopped, delayed ones lose their schedule, and an awaiting client hears `Cancelled`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, JobResult, Worker};
use conveyor_testkit::{NatsServer, wait_for};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Attempts started per job id, and the ids whose handler saw the cancellation.
#[derive(Default)]
struct Record {
    started: HashMap<String, u32>,
    told: Vec<String>,
}

type Shared = Arc<Mutex<Record>>;

async fn queue(nats: &NatsServer) -> anyhow::Result<(Client, QueueRef)> {
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("test", "cancel");
    ensure_queue(client.jetstream(), &queue, &QueueSettings::default()).await?;
    Ok((client, queue))
}

async fn work_stream_len(client: &Client, queue: &QueueRef) -> u64 {
    match client.jetstream().get_stream(queue.stream()).await {
        Ok(mut stream) => stream
            .info()
            .await
            .map(|i| i.state.messages)
            .unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    }
}

/// A worker whose handler finishes jobs named `quick*` at once; any other job waits for its
/// cancellation, notes it, and (ids `stubborn*`) then ignores it and keeps running.
fn spawn_worker(client: &Client, queue: &QueueRef, record: &Shared) -> CancellationToken {
    let stop = CancellationToken::new();
    let record = record.clone();
    let options = WorkerOptions {
        concurrency: 4,
        poll_wait: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(5),
        cancel_grace: Duration::from_millis(500),
        pod_name: "test-pod".into(),
        ..Default::default()
    };
    let worker = Worker::new(client.jetstream().clone(), queue.clone())
        .options(options)
        .handler(move |job: ReceivedJob| {
            let record = record.clone();
            async move {
                *record
                    .lock()
                    .unwrap()
                    .started
                    .entry(job.id.clone())
                    .or_default() += 1;
                if job.id.starts_with("quick") {
                    return Outcome::Done(job.payload);
                }
                job.cancel.cancelled().await;
                record.lock().unwrap().told.push(job.id.clone());
                if job.id.starts_with("stubborn") {
                    std::future::pending::<()>().await;
                }
                // Would be retried if the worker did not know it was cancelled.
                Outcome::Failed("cancelled".into())
            }
        });
    let token = stop.clone();
    tokio::spawn(async move { worker.run(async move { token.cancelled().await }).await });
    stop
}

#[tokio::test]
async fn cancelled_queued_job_is_never_handled() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue(&nats).await?;
    client
        .submit(&queue, Job::new("quick-cancelled", "a"))
        .await?;
    client.submit(&queue, Job::new("quick-kept", "b")).await?;
    let ack = client.cancel(&queue, "quick-cancelled").await?;
    assert!(!ack.schedule_removed);

    let record = Shared::default();
    let stop = spawn_worker(&client, &queue, &record);
    wait_for(WAIT, "both jobs settled", || async {
        work_stream_len(&client, &queue).await == 0
    })
    .await?;
    let started = record.lock().unwrap().started.clone();
    assert_eq!(started.keys().collect::<Vec<_>>(), ["quick-kept"]);
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn cancelled_running_job_is_told_stopped_and_not_retried() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue(&nats).await?;
    let record = Shared::default();
    let stop = spawn_worker(&client, &queue, &record);
    client.submit(&queue, Job::new("polite", "a")).await?;
    client.submit(&queue, Job::new("stubborn", "b")).await?;
    wait_for(WAIT, "both handlers running", || async {
        record.lock().unwrap().started.len() == 2
    })
    .await?;

    client.cancel(&queue, "polite").await?;
    client.cancel(&queue, "stubborn").await?;
    // The stubborn handler ignores the cancellation: it is stopped after the grace.
    wait_for(WAIT, "both jobs settled", || async {
        work_stream_len(&client, &queue).await == 0
    })
    .await?;
    let mut told = record.lock().unwrap().told.clone();
    told.sort();
    assert_eq!(told, ["polite", "stubborn"], "each handler was told");

    // Not retried: a later job runs, and neither cancelled job started again.
    client.submit(&queue, Job::new("quick-after", "c")).await?;
    wait_for(WAIT, "the next job", || async {
        record.lock().unwrap().started.contains_key("quick-after")
    })
    .await?;
    let started = record.lock().unwrap().started.clone();
    assert_eq!(started["polite"], 1);
    assert_eq!(started["stubborn"], 1);
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn awaiting_client_gets_cancelled_for_running_and_delayed_jobs() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue(&nats).await?;
    let record = Shared::default();
    let stop = spawn_worker(&client, &queue, &record);

    let waiter = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(async move {
            client
                .submit_and_wait(&queue, Job::new("running", "a"), WAIT)
                .await
        })
    };
    wait_for(WAIT, "the handler running", || async {
        record.lock().unwrap().started.contains_key("running")
    })
    .await?;
    client.cancel(&queue, "running").await?;
    assert_eq!(
        waiter.await??,
        JobResult::Cancelled {
            id: "running".into()
        }
    );

    // A delayed job is cancelled by removing its schedule; the waiter hears it at once.
    let waiter = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(async move {
            let job = Job::new("quick-delayed", "b").delay(Duration::from_secs(60));
            client.submit_and_wait(&queue, job, WAIT).await
        })
    };
    wait_for(WAIT, "the delayed job stored", || async {
        let Ok(mut stream) = client.jetstream().get_stream(queue.delayed_stream()).await else {
            return false;
        };
        stream.info().await.is_ok_and(|i| i.state.messages == 1)
    })
    .await?;
    let ack = client.cancel(&queue, "quick-delayed").await?;
    assert!(ack.schedule_removed);
    assert_eq!(
        waiter.await??,
        JobResult::Cancelled {
            id: "quick-delayed".into()
        }
    );
    stop.cancel();
    Ok(())
}
