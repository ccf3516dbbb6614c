//! Delayed jobs against a real nats-server: message schedules in the delayed stream, sourced
//! into the work stream when due.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::protocol::{self, schedule};
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, SubmitError, Worker};
use conveyor_testkit::{NatsServer, wait_for};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// When each job id was handled, and at which priority level.
type Seen = Arc<Mutex<HashMap<String, (SystemTime, u8)>>>;

async fn queue_with(nats: &NatsServer, priorities: u8) -> anyhow::Result<(Client, QueueRef)> {
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("test", "delayed");
    let settings = QueueSettings {
        priorities,
        ..Default::default()
    };
    ensure_queue(client.jetstream(), &queue, &settings).await?;
    Ok((client, queue))
}

/// Runs a worker recording what it handles; cancel the token to stop it.
fn spawn_recorder(
    client: &Client,
    queue: &QueueRef,
    priorities: u8,
    seen: &Seen,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let seen = seen.clone();
    let options = WorkerOptions {
        concurrency: 4,
        priorities,
        poll_wait: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(5),
        pod_name: "test-pod".into(),
        ..Default::default()
    };
    let worker = Worker::new(client.jetstream().clone(), queue.clone())
        .options(options)
        .handler(move |job: ReceivedJob| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .insert(job.id.clone(), (SystemTime::now(), job.priority));
                Outcome::Done(job.payload)
            }
        });
    let token = stop.clone();
    tokio::spawn(async move { worker.run(async move { token.cancelled().await }).await });
    stop
}

#[tokio::test]
async fn delayed_job_runs_after_its_time_not_before() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, 2).await?;
    let seen = Seen::default();
    let stop = spawn_recorder(&client, &queue, 2, &seen);

    let due = SystemTime::now() + Duration::from_secs(3);
    let ack = client
        .submit(&queue, Job::new("later", "x").priority(1).run_at(due))
        .await?;
    assert!(!ack.duplicate);
    let again = client
        .submit(&queue, Job::new("later", "x").priority(1).run_at(due))
        .await?;
    assert!(again.duplicate, "a delayed job id is deduplicated too");
    client.submit(&queue, Job::new("now", "y")).await?;

    wait_for(WAIT, "the immediate job", || async {
        seen.lock().unwrap().contains_key("now")
    })
    .await?;
    assert!(
        !seen.lock().unwrap().contains_key("later"),
        "the delayed job ran before its time"
    );
    wait_for(WAIT, "the delayed job", || async {
        seen.lock().unwrap().contains_key("later")
    })
    .await?;
    let (ran, level) = seen.lock().unwrap()["later"];
    assert!(
        ran >= due,
        "ran {:?} early",
        due.duration_since(ran).unwrap_or_default()
    );
    assert_eq!(level, 1, "the delayed job keeps its priority level");
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn delayed_jobs_survive_a_nats_restart() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, 1).await?;
    let due = SystemTime::now() + Duration::from_secs(4);
    let jobs = (0..20).map(|i| Job::new(format!("job-{i}"), "x").run_at(due));
    for result in client.submit_batch(&queue, jobs).await {
        result?;
    }
    nats.restart().await?;

    let client = Client::connect(&nats.url()).await?;
    let seen = Seen::default();
    let stop = spawn_recorder(&client, &queue, 1, &seen);
    wait_for(WAIT, "all 20 delayed jobs after the restart", || async {
        seen.lock().unwrap().len() == 20
    })
    .await?;
    let seen = seen.lock().unwrap();
    for i in 0..20 {
        let (ran, _) = seen[&format!("job-{i}")];
        assert!(ran >= due, "job-{i} ran early");
    }
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn malformed_schedules_are_refused_with_a_clear_error() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, 1).await?;

    // A foreign producer's schedule whose time the server cannot read.
    let mut headers = HeaderMap::new();
    headers.insert(protocol::MSG_ID, "bad-time");
    headers.insert(schedule::SCHEDULE, "@at tomorrow");
    headers.insert(schedule::TARGET, queue.due_subject(0).as_str());
    let err = client
        .jetstream()
        .publish_with_headers(queue.delayed_subject("bad-time"), headers, "x".into())
        .await?
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "publish failed: message schedules pattern is invalid (code 400, error code 10189)"
    );

    // Through the client: a schedule header on a job for the work stream.
    let job = Job::new("on-work-stream", "x").header(schedule::SCHEDULE, "@at tomorrow");
    let err = client.submit(&queue, job).await.unwrap_err();
    assert!(
        matches!(err, SubmitError::InvalidSchedule { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "job on-work-stream refused: invalid schedule (message schedules is disabled (code 400, error code 10188))"
    );

    // A delayed job for a level the queue does not have.
    let job = Job::new("high", "x")
        .priority(3)
        .delay(Duration::from_secs(60));
    let err = client.submit(&queue, job).await.unwrap_err();
    assert!(
        matches!(err, SubmitError::NoSuchQueue { priority: 3, .. }),
        "{err:?}"
    );

    // Nothing of it was stored.
    for name in [queue.delayed_stream(), queue.stream()] {
        let info = client
            .jetstream()
            .get_stream(&name)
            .await?
            .get_info()
            .await?;
        assert_eq!(info.state.messages, 0, "{name} holds a refused job");
    }
    Ok(())
}

#[tokio::test]
async fn due_job_waits_while_the_queue_is_full() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("test", "full");
    let settings = QueueSettings {
        max_jobs: Some(1),
        ..Default::default()
    };
    ensure_queue(client.jetstream(), &queue, &settings).await?;
    client.submit(&queue, Job::new("first", "x")).await?;
    let due = SystemTime::now() + Duration::from_secs(1);
    client
        .submit(&queue, Job::new("delayed", "y").run_at(due))
        .await?;
    // Due, but the queue is full: the due copy waits in the delayed stream.
    wait_for(WAIT, "the schedule to fire", || async {
        let Ok(stream) = client.jetstream().get_stream(queue.delayed_stream()).await else {
            return false;
        };
        stream
            .get_last_raw_message_by_subject(&queue.due_subject(0))
            .await
            .is_ok()
    })
    .await?;
    let seen = Seen::default();
    let stop = spawn_recorder(&client, &queue, 1, &seen);
    wait_for(WAIT, "both jobs, once the queue has room", || async {
        seen.lock().unwrap().len() == 2
    })
    .await?;
    stop.cancel();
    Ok(())
}

/// A multi-level worker waits between sweeps for a publish on the job subjects; jobs that become
/// ready without a publish must not wait out its `poll_wait` (30 s here): a delayed job's due
/// copy wakes it, and so does the due time of a job it retried with a backoff itself.
#[tokio::test]
async fn due_and_retried_jobs_on_a_multi_level_queue_do_not_wait_for_the_poll() -> anyhow::Result<()>
{
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, 2).await?;
    let ran: Arc<Mutex<Vec<(String, u32, std::time::Instant)>>> = Arc::default();
    let stop = CancellationToken::new();
    let options = WorkerOptions {
        concurrency: 2,
        priorities: 2,
        poll_wait: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(5),
        pod_name: "test-pod".into(),
        ..Default::default()
    };
    let worker = {
        let ran = ran.clone();
        Worker::new(client.jetstream().clone(), queue.clone())
            .options(options)
            .handler(move |job: ReceivedJob| {
                let ran = ran.clone();
                async move {
                    let first = job.attempt == 1 && job.id.starts_with("retry");
                    ran.lock().unwrap().push((
                        job.id.clone(),
                        job.attempt,
                        std::time::Instant::now(),
                    ));
                    if first {
                        Outcome::Retry {
                            after: Some(Duration::from_secs(1)),
                        }
                    } else {
                        Outcome::Done(job.payload)
                    }
                }
            })
            .run(stop.clone().cancelled_owned())
    };
    let worker = tokio::spawn(worker);
    let submitted = std::time::Instant::now();
    client
        .submit(
            &queue,
            Job::new("later-1", "x").delay(Duration::from_secs(1)),
        )
        .await?;
    client.submit(&queue, Job::new("retry-1", "x")).await?;
    let done = |id: &'static str, attempt: u32| {
        let ran = ran.clone();
        move || {
            let ran = ran.clone();
            async move {
                ran.lock()
                    .unwrap()
                    .iter()
                    .any(|(i, a, _)| i == id && *a == attempt)
            }
        }
    };
    // Far sooner than the 30 s poll, with room for a busy machine.
    const SOONER: Duration = Duration::from_secs(15);
    wait_for(SOONER, "the delayed job ran", done("later-1", 1)).await?;
    client.submit(&queue, Job::new("retry-1", "x")).await?;
    wait_for(SOONER, "the retried job ran again", done("retry-1", 2)).await?;
    let at = |id: &str, attempt: u32| {
        ran.lock()
            .unwrap()
            .iter()
            .find(|(i, a, _)| i == id && *a == attempt)
            .map(|(_, _, t)| *t)
            .unwrap()
    };
    assert!(
        at("later-1", 1) >= submitted + Duration::from_millis(900),
        "not before its time"
    );
    assert!(
        at("retry-1", 2) >= at("retry-1", 1) + Duration::from_millis(900),
        "not before its backoff"
    );
    stop.cancel();
    worker.await??;
    Ok(())
}
