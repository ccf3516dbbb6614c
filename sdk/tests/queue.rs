//! Component tests of the producer client and the Rust worker SDK against a real nats-server.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::protocol::{self, Backoff, dead_letter};
use conveyor::worker::{Outcome, ReceivedJob, WorkerOptions};
use conveyor::{Client, Job, JobResult, SubmitError, WaitError, Worker};
use conveyor_testkit::dead_letters::{header, read_all as dead_letters};
use conveyor_testkit::{NatsServer, wait_for};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

async fn queue_with(
    nats: &NatsServer,
    settings: QueueSettings,
) -> anyhow::Result<(Client, QueueRef)> {
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("test", "jobs");
    ensure_queue(client.jetstream(), &queue, &settings).await?;
    Ok((client, queue))
}

async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(stream) => stream
            .get_info()
            .await
            .map(|i| i.state.messages)
            .unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    }
}

fn fast_options() -> WorkerOptions {
    WorkerOptions {
        concurrency: 4,
        poll_wait: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(5),
        pod_name: "test-pod".into(),
        ..Default::default()
    }
}

/// [`fast_options`] with a constant 50 ms backoff, for tests that go through attempts.
fn quick_retries() -> WorkerOptions {
    WorkerOptions {
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(50),
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..fast_options()
    }
}

/// Jobs running now, most running at once, and finished: for tests of concurrency caps.
#[derive(Default)]
struct Occupancy(Mutex<(usize, usize, usize)>);

impl Occupancy {
    /// Counts one job as running for `work`.
    async fn run_for(&self, work: Duration) {
        {
            let mut s = self.0.lock().unwrap();
            s.0 += 1;
            s.1 = s.1.max(s.0);
        }
        tokio::time::sleep(work).await;
        let mut s = self.0.lock().unwrap();
        s.0 -= 1;
        s.2 += 1;
    }

    fn most(&self) -> usize {
        self.0.lock().unwrap().1
    }

    fn finished(&self) -> usize {
        self.0.lock().unwrap().2
    }
}

/// Runs a worker in the background; cancel the token to stop it.
fn spawn_worker<F, Fut>(
    client: &Client,
    queue: &QueueRef,
    options: WorkerOptions,
    handler: F,
) -> CancellationToken
where
    F: Fn(ReceivedJob) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let stop = CancellationToken::new();
    let worker = Worker::new(client.jetstream().clone(), queue.clone())
        .options(options)
        .handler(handler);
    let token = stop.clone();
    tokio::spawn(async move { worker.run(async move { token.cancelled().await }).await });
    stop
}

#[tokio::test]
async fn duplicate_submission_is_reported_and_not_queued_twice() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let first = client.submit(&queue, Job::new("order-1", "a")).await?;
    let second = client.submit(&queue, Job::new("order-1", "a")).await?;
    assert!(!first.duplicate);
    assert!(
        second.duplicate,
        "resubmission inside the window is a duplicate"
    );
    assert_eq!(second.sequence, first.sequence);
    assert_eq!(stream_len(client.jetstream(), &queue.stream()).await, 1);
    Ok(())
}

#[tokio::test]
async fn batch_submission_queues_every_job() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let jobs = (0..2000).map(|i| Job::new(format!("job-{i}"), format!("payload {i}")));
    let results = client.submit_batch(&queue, jobs).await;
    assert_eq!(results.len(), 2000);
    for (i, result) in results.iter().enumerate() {
        let ack = result
            .as_ref()
            .map_err(|e| anyhow::anyhow!("job {i}: {e}"))?;
        assert_eq!(ack.id, format!("job-{i}"));
        assert!(!ack.duplicate);
    }
    assert_eq!(stream_len(client.jetstream(), &queue.stream()).await, 2000);
    Ok(())
}

#[tokio::test]
async fn oversized_jobs_are_refused_with_the_limit() -> anyhow::Result<()> {
    let nats = NatsServer::builder().max_payload(64 * 1024).start().await?;
    let settings = QueueSettings {
        max_job_size: Some(1024),
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    // Larger than the queue's maxJobSize, smaller than the server's max_payload.
    let err = client
        .submit(&queue, Job::new("big", vec![0u8; 4096]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::TooLarge { size: 4096, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("larger than the queue accepts"),
        "{err}"
    );
    // Larger than the server's max_payload: refused before it is sent.
    let err = client
        .submit(&queue, Job::new("huge", vec![0u8; 100 * 1024]))
        .await
        .unwrap_err();
    assert!(matches!(err, SubmitError::TooLarge { .. }), "{err:?}");
    assert_eq!(stream_len(client.jetstream(), &queue.stream()).await, 0);
    Ok(())
}

#[tokio::test]
async fn full_queue_refuses_new_jobs_and_keeps_the_old_ones() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        max_jobs: Some(3),
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    for i in 0..3 {
        client
            .submit(&queue, Job::new(format!("j{i}"), "x"))
            .await?;
    }
    let err = client
        .submit(&queue, Job::new("j3", "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, SubmitError::QueueFull { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("is full"), "{err}");
    assert_eq!(stream_len(client.jetstream(), &queue.stream()).await, 3);
    Ok(())
}

#[tokio::test]
async fn unknown_priority_and_bad_ids_are_refused() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        priorities: 2,
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    client
        .submit(&queue, Job::new("ok", "x").priority(1))
        .await?;
    let err = client
        .submit(&queue, Job::new("p5", "x").priority(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::NoSuchQueue { priority: 5, .. }),
        "{err:?}"
    );
    let err = client
        .submit(&queue, Job::new("has space", "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, SubmitError::InvalidId(_)), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn worker_acks_successful_jobs_and_the_stream_empties() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let stop = spawn_worker(&client, &queue, fast_options(), move |job: ReceivedJob| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(job.id.clone());
            Outcome::Done(job.payload)
        }
    });
    let results = client
        .submit_batch(&queue, (0..500).map(|i| Job::new(format!("j{i}"), "x")))
        .await;
    assert!(results.iter().all(Result::is_ok));
    wait_for(WAIT, "all 500 jobs handled", || async {
        seen.lock().unwrap().len() >= 500
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        stream_len(client.jetstream(), &queue.stream()).await == 0
    })
    .await?;
    stop.cancel();
    let seen: HashSet<String> = seen.lock().unwrap().iter().cloned().collect();
    let expected: HashSet<String> = (0..500).map(|i| format!("j{i}")).collect();
    assert_eq!(seen, expected, "each job id handled");
    Ok(())
}

#[tokio::test]
async fn failed_attempt_is_retried_after_the_backoff_delay() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let delay = Duration::from_millis(1500);
    let options = WorkerOptions {
        backoff: Backoff {
            initial: delay,
            max: delay,
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..fast_options()
    };
    let attempts: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let record = attempts.clone();
    let stop = spawn_worker(&client, &queue, options, move |job: ReceivedJob| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push((job.attempt, Instant::now()));
            if job.attempt == 1 {
                Outcome::Failed("first try fails".into())
            } else {
                Outcome::Done(job.payload)
            }
        }
    });
    client.submit(&queue, Job::new("flaky", "x")).await?;
    wait_for(WAIT, "the second attempt", || async {
        attempts.lock().unwrap().len() >= 2
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        stream_len(client.jetstream(), &queue.stream()).await == 0
    })
    .await?;
    stop.cancel();
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    assert_eq!((attempts[0].0, attempts[1].0), (1, 2));
    let gap = attempts[1].1 - attempts[0].1;
    println!("redelivered after {gap:?} (configured delay {delay:?})");
    assert!(
        gap >= delay,
        "redelivered after {gap:?}, before the {delay:?} delay"
    );
    Ok(())
}

/// Reads every message of the dead-letter stream.

#[tokio::test]
async fn permanent_failure_and_exhausted_attempts_go_to_the_dead_letter_stream()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        max_attempts: 3,
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let options = quick_retries();
    let stop = spawn_worker(&client, &queue, options, |job: ReceivedJob| async move {
        match job.id.as_str() {
            "bad" => Outcome::Permanent("payload is not an invoice".into()),
            _ => Outcome::Failed(format!("attempt {} failed", job.attempt)),
        }
    });
    client.submit(&queue, Job::new("bad", "x")).await?;
    client.submit(&queue, Job::new("flaky", "y")).await?;
    client
        .submit(&queue, Job::new("capped", "z").max_attempts(2))
        .await?;
    let js = client.jetstream();
    wait_for(WAIT, "three dead letters", || async {
        stream_len(js, &queue.dead_letter_stream()).await == 3
    })
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        stream_len(js, &queue.stream()).await == 0
    })
    .await?;
    stop.cancel();
    let letters = dead_letters(js, &queue).await?;
    let by_id = |id: &str| {
        letters
            .iter()
            .find(|m| header(m, dead_letter::JOB_ID) == id)
            .expect(id)
    };
    let bad = by_id("bad");
    assert_eq!(header(bad, dead_letter::REASON), "permanent");
    assert_eq!(header(bad, dead_letter::ATTEMPTS), "1");
    assert_eq!(header(bad, dead_letter::ERROR), "payload is not an invoice");
    assert_eq!(header(bad, dead_letter::POD), "test-pod");
    assert_eq!(bad.payload.as_ref(), b"x");
    let flaky = by_id("flaky");
    assert_eq!(header(flaky, dead_letter::REASON), "exhausted");
    assert_eq!(header(flaky, dead_letter::ATTEMPTS), "3");
    assert_eq!(header(flaky, dead_letter::ERROR), "attempt 3 failed");
    assert_eq!(
        header(by_id("capped"), dead_letter::ATTEMPTS),
        "2",
        "per-job cap honoured"
    );
    Ok(())
}

#[tokio::test]
async fn a_panicking_handler_fails_its_attempt_and_the_other_jobs_carry_on() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        max_attempts: 2,
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let options = quick_retries();
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    let record = done.clone();
    let stop = spawn_worker(&client, &queue, options, move |job: ReceivedJob| {
        let record = record.clone();
        async move {
            if job.id == "always" {
                panic!("cannot parse {}", job.id);
            }
            if job.id == "once" && job.attempt == 1 {
                panic!("first attempt of {}", job.id);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            record.lock().unwrap().insert(job.id.clone());
            Outcome::Done(job.payload)
        }
    });
    let jobs = ["always", "once"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..50).map(|i| format!("good{i}")))
        .map(|id| Job::new(id, "x"));
    assert!(
        client
            .submit_batch(&queue, jobs)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let js = client.jetstream();
    wait_for(WAIT, "51 jobs done and one dead letter", || async {
        done.lock().unwrap().len() == 51 && stream_len(js, &queue.dead_letter_stream()).await == 1
    })
    .await?;
    stop.cancel();
    assert!(
        done.lock().unwrap().contains("once"),
        "retried after its panic"
    );
    let letters = dead_letters(js, &queue).await?;
    let always = &letters[0];
    assert_eq!(header(always, dead_letter::JOB_ID), "always");
    assert_eq!(header(always, dead_letter::REASON), "exhausted");
    assert_eq!(header(always, dead_letter::ATTEMPTS), "2");
    assert_eq!(
        header(always, dead_letter::ERROR),
        "handler panicked: cannot parse always"
    );
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_a_long_job_and_a_silent_one_times_out() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let ack_wait = Duration::from_secs(1);
    let settings = QueueSettings {
        // The consumer's ack wait: a job not heard of for this long is redelivered.
        timeout: ack_wait,
        max_attempts: 2,
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let options = quick_retries();
    let attempts: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let record = attempts.clone();
    let stop = spawn_worker(&client, &queue, options, move |job: ReceivedJob| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push((job.id.clone(), job.attempt));
            match job.id.as_str() {
                // Three ack waits of work: heartbeats keep the job with this worker.
                "long" => tokio::time::sleep(3 * ack_wait).await,
                // Hangs: its own 300 ms timeout ends each attempt.
                _ => std::future::pending::<()>().await,
            }
            Outcome::Done(job.payload)
        }
    });
    client.submit(&queue, Job::new("long", "x")).await?;
    client
        .submit(
            &queue,
            Job::new("hung", "y").timeout(Duration::from_millis(300)),
        )
        .await?;
    let js = client.jetstream();
    wait_for(
        WAIT,
        "the long job done, the hung one dead-lettered",
        || async {
            stream_len(js, &queue.stream()).await == 0
                && stream_len(js, &queue.dead_letter_stream()).await == 1
        },
    )
    .await?;
    stop.cancel();
    let attempts = attempts.lock().unwrap().clone();
    let of = |id: &str| attempts.iter().filter(|(job, _)| job == id).count();
    assert_eq!(
        of("long"),
        1,
        "never redelivered while it ran: {attempts:?}"
    );
    assert_eq!(of("hung"), 2, "each attempt timed out: {attempts:?}");
    let letters = dead_letters(js, &queue).await?;
    assert_eq!(header(&letters[0], dead_letter::JOB_ID), "hung");
    assert_eq!(
        header(&letters[0], dead_letter::ERROR),
        "handler timed out after 300ms"
    );
    Ok(())
}

#[tokio::test]
async fn workers_run_at_most_their_concurrency_and_share_a_backlog() -> anyhow::Result<()> {
    const JOBS: usize = 300;
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let results = client
        .submit_batch(&queue, (0..JOBS).map(|i| Job::new(format!("s{i}"), "x")))
        .await;
    assert!(results.iter().all(Result::is_ok));
    // Per worker: how many jobs ran at once; every (id, attempt) seen.
    let states: Vec<Arc<Occupancy>> = (0..2).map(|_| Arc::default()).collect();
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let stops: Vec<CancellationToken> = states
        .iter()
        .map(|state| {
            let (state, seen) = (state.clone(), seen.clone());
            spawn_worker(&client, &queue, fast_options(), move |job: ReceivedJob| {
                let (state, seen) = (state.clone(), seen.clone());
                async move {
                    seen.lock().unwrap().push((job.id.clone(), job.attempt));
                    state.run_for(Duration::from_millis(10)).await;
                    Outcome::Done(job.payload)
                }
            })
        })
        .collect();
    wait_for(WAIT, "every job finished", || async {
        states.iter().map(|s| s.finished()).sum::<usize>() == JOBS
    })
    .await?;
    for stop in stops {
        stop.cancel();
    }
    let concurrency = fast_options().concurrency;
    for state in &states {
        assert_eq!(
            state.most(),
            concurrency,
            "each worker used all its slots, no more"
        );
        assert!(state.finished() > 0, "both workers got jobs");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), JOBS, "each job ran once");
    assert!(
        seen.iter().all(|(_, attempt)| *attempt == 1),
        "no job was held unstarted until it came back"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_header_from_a_foreign_producer_is_dead_lettered_with_a_clear_error()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let handled = Arc::new(Mutex::new(0));
    let count = handled.clone();
    let stop = spawn_worker(&client, &queue, fast_options(), move |job: ReceivedJob| {
        let count = count.clone();
        async move {
            *count.lock().unwrap() += 1;
            Outcome::Done(job.payload)
        }
    });
    // A producer in another language, publishing by hand.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(protocol::MSG_ID, "foreign-1");
    headers.insert(protocol::MAX_ATTEMPTS, "lots");
    client
        .jetstream()
        .publish_with_headers(queue.job_subject(0), headers, "p".into())
        .await?
        .await?;
    let js = client.jetstream();
    wait_for(
        WAIT,
        "the malformed job in the dead-letter stream",
        || async { stream_len(js, &queue.dead_letter_stream()).await == 1 },
    )
    .await?;
    stop.cancel();
    let letters = dead_letters(js, &queue).await?;
    assert_eq!(header(&letters[0], dead_letter::REASON), "malformed");
    assert_eq!(
        header(&letters[0], dead_letter::ERROR),
        "malformed header Conveyor-Max-Attempts: \"lots\" is not a whole number from 1 to 4294967295"
    );
    assert_eq!(*handled.lock().unwrap(), 0, "the handler never saw it");
    Ok(())
}

#[tokio::test]
async fn high_priority_jobs_run_before_a_low_priority_backlog() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        priorities: 2,
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let low = client
        .submit_batch(
            &queue,
            (0..10_000).map(|i| Job::new(format!("low-{i}"), "l")),
        )
        .await;
    assert!(low.iter().all(Result::is_ok));
    let high = client
        .submit_batch(
            &queue,
            (0..100).map(|i| Job::new(format!("high-{i}"), "h").priority(1)),
        )
        .await;
    assert!(high.iter().all(Result::is_ok));
    let order = Arc::new(Mutex::new(Vec::new()));
    let record = order.clone();
    let options = WorkerOptions {
        priorities: 2,
        ..fast_options()
    };
    let stop = spawn_worker(&client, &queue, options, move |job: ReceivedJob| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(job.id.clone());
            Outcome::Done(job.payload)
        }
    });
    wait_for(WAIT, "all 10100 jobs handled", || async {
        order.lock().unwrap().len() >= 10_100
    })
    .await?;
    stop.cancel();
    let order = order.lock().unwrap().clone();
    let last_high = order
        .iter()
        .rposition(|id| id.starts_with("high-"))
        .expect("high jobs ran");
    let low_before = order[..last_high]
        .iter()
        .filter(|id| id.starts_with("low-"))
        .count();
    println!("low-priority jobs run before the last high one: {low_before}");
    // Every tenth sweep serves the low level first (anti-starvation): about one low job per ten
    // high ones, plus at most one prefetch (`concurrency` = 4) of slack on each side.
    assert!(
        low_before <= 100 / 10 + 2 * 4,
        "{low_before} low jobs ran before the high ones finished"
    );
    assert_eq!(
        order.iter().collect::<HashSet<_>>().len(),
        10_100,
        "each job id handled once"
    );
    Ok(())
}

#[tokio::test]
async fn submit_and_wait_gets_the_result_or_the_dead_letter() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let stop = spawn_worker(
        &client,
        &queue,
        fast_options(),
        |job: ReceivedJob| async move {
            match job.payload.as_ref() {
                b"bad" => Outcome::Permanent("bad input".into()),
                text => Outcome::Done(text.to_ascii_uppercase().into()),
            }
        },
    );
    let wait = Duration::from_secs(10);
    let result = client
        .submit_and_wait(&queue, Job::new("a", "hello"), wait)
        .await?;
    assert_eq!(
        result,
        JobResult::Completed {
            id: "a".into(),
            result: "HELLO".into()
        }
    );
    let result = client
        .submit_and_wait(&queue, Job::new("b", "bad"), wait)
        .await?;
    assert_eq!(
        result,
        JobResult::DeadLettered {
            id: "b".into(),
            reason: "permanent".into(),
            error: "bad input".into(),
            attempts: 1
        }
    );
    let err = client
        .submit_and_wait(&queue, Job::new("a", "hello"), wait)
        .await
        .unwrap_err();
    assert!(matches!(err, WaitError::Duplicate { .. }), "{err:?}");
    stop.cancel();
    // A queue nobody works on: a definite "not yet" after the timeout.
    let idle = QueueRef::new("test", "idle");
    ensure_queue(client.jetstream(), &idle, &QueueSettings::default()).await?;
    let err = client
        .submit_and_wait(&idle, Job::new("c", "x"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, WaitError::TimedOut { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn nats_restart_during_a_run_loses_nothing() -> anyhow::Result<()> {
    const JOBS: usize = 50_000;
    let mut nats = NatsServer::start().await?;
    // Acks sent while the server is down are lost; those jobs come back after the ack wait.
    let settings = QueueSettings {
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let results = client
        .submit_batch(&queue, (0..JOBS).map(|i| Job::new(format!("j{i}"), "x")))
        .await;
    assert!(results.iter().all(Result::is_ok));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let options = WorkerOptions {
        concurrency: 16,
        ..fast_options()
    };
    let worker_client = Client::connect(&nats.url()).await?;
    let stop = spawn_worker(&worker_client, &queue, options, move |job: ReceivedJob| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(job.id.clone());
            Outcome::Done(job.payload)
        }
    });
    wait_for(WAIT, "a quarter of the jobs handled", || async {
        seen.lock().unwrap().len() >= JOBS / 4
    })
    .await?;
    nats.restart().await?;
    let restarted_at = seen.lock().unwrap().len();
    wait_for(
        Duration::from_secs(60),
        "every job handled after the restart",
        || async { seen.lock().unwrap().iter().collect::<HashSet<_>>().len() == JOBS },
    )
    .await?;
    wait_for(WAIT, "the work stream to be empty", || async {
        stream_len(client.jetstream(), &queue.stream()).await == 0
    })
    .await?;
    stop.cancel();
    let seen = seen.lock().unwrap().clone();
    let duplicates = seen.len() - JOBS;
    println!(
        "nats restarted after {restarted_at} of {JOBS} jobs: all handled, {duplicates} delivered twice"
    );
    Ok(())
}

#[tokio::test]
async fn concurrency_limit_caps_jobs_in_flight_across_workers() -> anyhow::Result<()> {
    const LIMIT: usize = 3;
    const JOBS: usize = 18;
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        concurrency_limit: Some(LIMIT as i64),
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let results = client
        .submit_batch(&queue, (0..JOBS).map(|i| Job::new(format!("c{i}"), "x")))
        .await;
    assert!(results.iter().all(Result::is_ok));
    let state = Arc::new(Occupancy::default());
    // Two workers with room for 4 jobs each: 8 slots, but only LIMIT jobs may run.
    let stops: Vec<CancellationToken> = (0..2)
        .map(|_| {
            let state = state.clone();
            let options = WorkerOptions {
                concurrency: 4,
                ..fast_options()
            };
            spawn_worker(&client, &queue, options, move |job: ReceivedJob| {
                let state = state.clone();
                async move {
                    state.run_for(Duration::from_millis(150)).await;
                    Outcome::Done(job.payload)
                }
            })
        })
        .collect();
    wait_for(WAIT, "every job finished", || async {
        state.finished() == JOBS
    })
    .await?;
    for stop in stops {
        stop.cancel();
    }
    let most = state.most();
    assert_eq!(
        most, LIMIT,
        "never more than the limit, and the limit is used"
    );
    Ok(())
}

#[tokio::test]
async fn a_handler_reports_progress_to_the_awaiting_client() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (client, queue) = queue_with(&nats, QueueSettings::default()).await?;
    let stop = spawn_worker(
        &client,
        &queue,
        fast_options(),
        |job: ReceivedJob| async move {
            assert!(job.progress.is_awaited());
            for step in 1..=3 {
                job.progress.report(format!("step {step} of 3")).await;
            }
            Outcome::Done("all done".into())
        },
    );
    let mut updates = Vec::new();
    let result = client
        .submit_and_watch(&queue, Job::new("p1", "x"), WAIT, |update| {
            updates.push(String::from_utf8_lossy(&update).into_owned());
        })
        .await?;
    assert_eq!(updates, ["step 1 of 3", "step 2 of 3", "step 3 of 3"]);
    assert_eq!(
        result,
        JobResult::Completed {
            id: "p1".into(),
            result: "all done".into()
        }
    );
    // submit_and_wait skips progress and returns the outcome.
    let result = client
        .submit_and_wait(&queue, Job::new("p2", "x"), WAIT)
        .await?;
    assert!(matches!(result, JobResult::Completed { .. }), "{result:?}");
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn outcomes_are_kept_for_the_result_retention_and_then_forgotten() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        result_retention: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let options = WorkerOptions {
        store_results: true,
        ..fast_options()
    };
    let stop = spawn_worker(&client, &queue, options, |job: ReceivedJob| async move {
        match job.id.as_str() {
            "bad" => Outcome::Permanent("cannot resize".into()),
            _ => Outcome::Done(format!("done {}", job.id).into()),
        }
    });
    // Nobody waits: the outcomes are fetched afterwards.
    for id in ["good", "bad"] {
        client.submit(&queue, Job::new(id, "x")).await?;
    }
    wait_for(WAIT, "both outcomes stored", || async {
        matches!(client.result(&queue, "good").await, Ok(Some(_)))
            && matches!(client.result(&queue, "bad").await, Ok(Some(_)))
    })
    .await?;
    assert_eq!(
        client.result(&queue, "good").await?,
        Some(JobResult::Completed {
            id: "good".into(),
            result: "done good".into()
        })
    );
    match client.result(&queue, "bad").await? {
        Some(JobResult::DeadLettered { reason, error, .. }) => {
            assert_eq!(
                (reason.as_str(), error.as_str()),
                ("permanent", "cannot resize")
            );
        }
        other => panic!("expected a dead-lettered outcome: {other:?}"),
    }
    assert_eq!(client.result(&queue, "never-submitted").await?, None);
    wait_for(WAIT, "the outcomes expire after the retention", || async {
        matches!(client.result(&queue, "good").await, Ok(None))
    })
    .await?;
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn a_rate_limit_holds_across_workers() -> anyhow::Result<()> {
    rate_limited_run(false).await
}

/// After an idle spell the tokens stream holds one second's worth: the first second may start
/// that many more, and no more than that.
#[tokio::test]
async fn a_rate_limit_after_an_idle_spell_bursts_by_one_second_at_most() -> anyhow::Result<()> {
    rate_limited_run(true).await
}

/// 100 jobs at 20/s through two workers with 16 free slots; with `idle_first` the issuer fills
/// the tokens stream before any job is there. Checks the guarantee of `conveyor::rate`.
async fn rate_limited_run(idle_first: bool) -> anyhow::Result<()> {
    const RATE: u32 = 20;
    const JOBS: usize = 100;
    let nats = NatsServer::start().await?;
    let settings = QueueSettings {
        rate_limit: Some(RATE),
        ..Default::default()
    };
    let (client, queue) = queue_with(&nats, settings).await?;
    let submit = || async {
        let results = client
            .submit_batch(&queue, (0..JOBS).map(|i| Job::new(format!("r{i}"), "x")))
            .await;
        assert!(results.iter().all(Result::is_ok));
    };
    if !idle_first {
        // Jobs first: the stream holds no saved tokens when they start.
        submit().await;
    }
    let issuing = CancellationToken::new();
    let issuer = tokio::spawn(conveyor::rate::issue(
        client.jetstream().client(),
        queue.clone(),
        RATE,
        issuing.clone(),
    ));
    if idle_first {
        let js = client.jetstream().clone();
        wait_for(WAIT, "a second's worth of tokens saved", || async {
            match js.get_stream(queue.tokens_stream()).await {
                Ok(mut stream) => stream
                    .info()
                    .await
                    .is_ok_and(|i| i.state.messages == u64::from(RATE)),
                Err(_) => false,
            }
        })
        .await?;
        submit().await;
    }
    let starts = Arc::new(Mutex::new(Vec::new()));
    // Two workers with 16 free slots: without the limit they would run everything at once.
    let stops: Vec<CancellationToken> = (0..2)
        .map(|_| {
            let starts = starts.clone();
            let options = WorkerOptions {
                concurrency: 8,
                rate_limited: true,
                ..fast_options()
            };
            spawn_worker(&client, &queue, options, move |job: ReceivedJob| {
                let starts = starts.clone();
                async move {
                    starts.lock().unwrap().push(Instant::now());
                    Outcome::Done(job.payload)
                }
            })
        })
        .collect();
    wait_for(WAIT, "every job started", || async {
        starts.lock().unwrap().len() >= JOBS
    })
    .await?;
    for stop in stops {
        stop.cancel();
    }
    issuing.cancel();
    issuer.await?;
    let mut starts = starts.lock().unwrap().clone();
    starts.sort();
    let spread = starts[JOBS - 1] - starts[0];
    // 100 jobs at 20/s take about 5 s (4 s with a second's worth saved).
    assert!(spread >= Duration::from_secs(3), "{spread:?}");
    // The guarantee (conveyor::rate): in any one-second window at most the tokens the stream
    // held at its start (none, or a second's worth after the idle spell) plus those issued in
    // it, rate × (1 s + 150 ms) + 1, however loaded the machine; without the limit all 100
    // would start at once.
    let busiest = starts
        .iter()
        .map(|&t| {
            starts
                .iter()
                .filter(|&&u| u >= t && u < t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let saved = if idle_first { RATE as usize } else { 0 };
    let bound = saved + (f64::from(RATE) * 1.15).floor() as usize + 1;
    assert!(
        busiest <= bound,
        "{busiest} jobs started within a second (at most {bound})"
    );
    println!("{JOBS} jobs at {RATE}/s over {spread:?}, at most {busiest} in any second");
    Ok(())
}
