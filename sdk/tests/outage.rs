//! Producers during an outage, on a real 3-node JetStream cluster
//! (`conveyor_testkit::NatsCluster`) with an R3 queue: while the stream leader's server is
//! SIGKILLed, `Client::submit` either succeeds or fails; it never reports success for a job the
//! stream does not have, and a failed job resubmitted with the same id is stored once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use conveyor::admin::QueueSettings;
use conveyor::names::QueueRef;
use conveyor::{Client, Job, SubmitError};
use conveyor_testkit::{NatsCluster, wait_for};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// Producers submitting at once, so many submissions are in flight when the leader dies.
const PRODUCERS: usize = 8;

/// The job ids in `stream`, read message by message (a work-queue stream admits no second
/// consumer to read it with), and how often each is there.
async fn stored_ids(js: &jetstream::Context, stream: &str) -> HashMap<String, u32> {
    let mut stream = js.get_stream(stream).await.expect("the work stream");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut ids = HashMap::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue; // a gap: nothing was stored at this sequence
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .expect("every job has an id")
            .to_string();
        *ids.entry(id).or_default() += 1;
    }
    ids
}

/// What the producers were told.
#[derive(Default)]
struct Told {
    stored: Vec<String>,
    /// Job id and the kind of error.
    failed: Vec<(String, &'static str)>,
}

/// The kind of a submission error, for the summary.
fn kind(error: &SubmitError) -> &'static str {
    match error {
        SubmitError::Unavailable { .. } => "unavailable",
        SubmitError::TimedOut { .. } => "timed out",
        SubmitError::Publish { .. } => "publish failed",
        SubmitError::QueueFull { .. } => "queue full",
        _ => "other",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_never_reports_a_job_the_stream_does_not_have() {
    let mut cluster = NatsCluster::start().await.expect("a 3-node cluster");
    // The comma-separated URL of every node, as users configure a cluster.
    let client = Client::connect(&cluster.url())
        .await
        .expect("connect to the cluster");
    let js = client.jetstream().clone();
    let queue = QueueRef::new("team", "outage");
    let settings = QueueSettings {
        replicas: 3,
        ..Default::default()
    };
    cluster
        .ensure_queue(&js, &queue, &settings)
        .await
        .expect("R3 queue");
    let mut info = js.get_stream(queue.stream()).await.unwrap();
    assert_eq!(info.info().await.unwrap().config.num_replicas, 3);

    let told = Arc::new(Mutex::new(Told::default()));
    let stop = CancellationToken::new();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (client, queue, told, stop) =
                (client.clone(), queue.clone(), told.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.is_cancelled() {
                    let id = format!("p{p}-{i}");
                    i += 1;
                    let result = client.submit(&queue, Job::new(id.clone(), "x")).await;
                    let mut told = told.lock().unwrap();
                    match result {
                        Ok(ack) => {
                            assert!(!ack.duplicate, "{id} is submitted once");
                            told.stored.push(id);
                        }
                        Err(error) => {
                            assert!(
                                error.is_retryable(),
                                "{id}: an outage is a retryable error: {error}"
                            );
                            told.failed.push((id, kind(&error)));
                        }
                    }
                }
            })
        })
        .collect();
    let stored = || told.lock().unwrap().stored.len();

    wait_for(DEADLINE, "500 jobs stored before the kill", || async {
        stored() >= 500
    })
    .await
    .unwrap();
    let leader = cluster.stream_leader(&js, &queue.stream()).await.unwrap();
    cluster.kill(leader).unwrap();
    let at_kill = stored();
    wait_for(DEADLINE, "500 more jobs stored after the kill", || async {
        stored() >= at_kill + 500
    })
    .await
    .unwrap();
    cluster.restart(leader).await.unwrap();
    let at_restart = stored();
    wait_for(
        DEADLINE,
        "500 more jobs stored after the restart",
        || async { stored() >= at_restart + 500 },
    )
    .await
    .unwrap();
    stop.cancel();
    for producer in producers {
        producer.await.expect("a producer");
    }

    let told = std::mem::take(&mut *told.lock().unwrap());
    let in_stream = stored_ids(&js, &queue.stream()).await;
    let missing: Vec<&String> = told
        .stored
        .iter()
        .filter(|id| !in_stream.contains_key(*id))
        .collect();
    let failed_but_stored = told
        .failed
        .iter()
        .filter(|(id, _)| in_stream.contains_key(id))
        .count();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, kind) in &told.failed {
        *kinds.entry(kind).or_default() += 1;
    }
    println!(
        "{} submissions reported stored, {} failed ({failed_but_stored} of those stored \
         anyway); the stream holds {} jobs; failures by kind: {kinds:?}",
        told.stored.len(),
        told.failed.len(),
        in_stream.len()
    );
    assert!(
        missing.is_empty(),
        "{} jobs reported stored are not in the stream: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        in_stream.values().all(|&n| n == 1),
        "every job is stored once"
    );

    // A failed submission may or may not be stored: resubmitting it with the same id stores
    // it exactly once.
    for (id, _) in &told.failed {
        let ack = client
            .submit(&queue, Job::new(id.clone(), "x"))
            .await
            .unwrap_or_else(|e: SubmitError| panic!("resubmitting {id} after the outage: {e}"));
        assert_eq!(
            ack.duplicate,
            in_stream.contains_key(id),
            "{id} is a duplicate exactly when the failed submission was stored"
        );
    }
    let in_stream = stored_ids(&js, &queue.stream()).await;
    assert_eq!(in_stream.len(), told.stored.len() + told.failed.len());
    assert!(in_stream.values().all(|&n| n == 1), "no job stored twice");
}
