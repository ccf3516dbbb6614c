//! A quick throughput measurement of the SDK (submit_batch → Worker → ack) against a real
//! nats-server, producers and workers running at once. Not a timed test: it prints figures.
//! Run with `cargo test -p conveyor --release --test throughput -- --ignored --nocapture`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, Worker};
use conveyor_testkit::{NatsServer, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn sdk_throughput() -> anyhow::Result<()> {
    const JOBS: u64 = 200_000;
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("bench", "noop");
    ensure_queue(client.jetstream(), &queue, &QueueSettings::default()).await?;
    let done = Arc::new(AtomicU64::new(0));
    let count = done.clone();
    let options = WorkerOptions {
        concurrency: 64,
        ..Default::default()
    };
    let worker_client = Client::connect(&nats.url()).await?;
    let worker = Worker::new(worker_client.jetstream().clone(), queue.clone())
        .options(options)
        .handler(move |job: ReceivedJob| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::Relaxed);
                Outcome::Done(job.payload)
            }
        });
    tokio::spawn(worker.run(std::future::pending()));
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let start = Instant::now();
    let jobs = (0..JOBS).map(|i| Job::new(format!("j{i}"), payload.clone()));
    let results = client.submit_batch(&queue, jobs).await;
    let submitted = start.elapsed();
    assert!(results.iter().all(Result::is_ok));
    wait_for(Duration::from_secs(300), "all jobs handled", || async {
        done.load(Ordering::Relaxed) >= JOBS
    })
    .await?;
    let elapsed = start.elapsed();
    println!(
        "{JOBS} no-op jobs of 256 B: submitted in {submitted:?} ({:.0}/s), all handled and acked in {elapsed:?} ({:.0} jobs/s end to end)",
        JOBS as f64 / submitted.as_secs_f64(),
        JOBS as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
