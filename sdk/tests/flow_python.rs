//! The Python example (`examples/flow-python/flow.py`, nats-py, no Conveyor SDK) submits a job
//! and a job in another queue that waits for it, by the rules of `docs/protocol.md`; a Rust
//! worker and the releaser do the rest, and the example prints the dependent's outcome.

use std::time::Duration;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::flow::{DependencyState, Releaser};
use conveyor::names::QueueRef;
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Worker};
use conveyor_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_python_producer_submits_a_dependent_job_without_the_sdk() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let (fetch, report) = (
        QueueRef::new("test", "fetch"),
        QueueRef::new("test", "report"),
    );
    for queue in [&fetch, &report] {
        ensure_queue(client.jetstream(), queue, &QueueSettings::default()).await?;
    }
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    for queue in [&fetch, &report] {
        let releaser = Releaser::new(client.jetstream().clone());
        let (queue, stop) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if releaser.serve(&queue, &stop).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    for queue in [&fetch, &report] {
        let runner = Worker::new(client.jetstream().clone(), queue.clone())
            .options(WorkerOptions {
                poll_wait: Duration::from_millis(300),
                ..Default::default()
            })
            .handler(|job: ReceivedJob| async move {
                if job.flow.headers().after.is_empty() {
                    return Outcome::Done(job.payload);
                }
                let dependencies = match job.flow.dependencies().await {
                    Ok(dependencies) => dependencies,
                    Err(error) => return Outcome::Failed(error.to_string()),
                };
                let mut text = String::from_utf8_lossy(&job.payload).into_owned();
                for dependency in dependencies {
                    if dependency.state == DependencyState::Completed {
                        text.push_str(" from ");
                        text.push_str(&String::from_utf8_lossy(&dependency.result));
                    }
                }
                Outcome::Done(text.into())
            });
        let stop = stop.clone();
        tokio::spawn(async move { runner.run(async move { stop.cancelled().await }).await });
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/flow-python/flow.py"
    );
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("python3")
            .args([script, &nats.url(), "test", "fetch", "report"])
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the example failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "report-py-1 completed monthly report from numbers"
    );
    Ok(())
}
