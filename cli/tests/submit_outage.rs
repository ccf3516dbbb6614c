//! `conveyor submit` while the stream leader of an R3 queue is SIGKILLed, on a real 3-node
//! JetStream cluster (`conveyor_testkit::NatsCluster`): every job id the CLI prints as stored is
//! in the stream, and if any job was not stored the CLI fails and says how many.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use conveyor::admin::QueueSettings;
use conveyor::names::QueueRef;
use conveyor_testkit::NatsCluster;
use tokio::process::Command;

const JOBS: u64 = 30_000;
const DEADLINE: Duration = Duration::from_secs(120);

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

/// The job ids in `stream`, read message by message.
async fn stored_ids(js: &jetstream::Context, stream: &str) -> HashSet<String> {
    let mut stream = js.get_stream(stream).await.expect("the work stream");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut ids = HashSet::new();
    for sequence in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let id = message.headers.get("Nats-Msg-Id").expect("a job id");
            ids.insert(id.to_string());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_only_jobs_the_stream_has_while_the_leader_dies() {
    let mut cluster = NatsCluster::start().await.expect("a 3-node cluster");
    let js = jetstream::new(cluster.client().await.unwrap());
    let queue = QueueRef::new("default", "outage");
    let settings = QueueSettings {
        replicas: 3,
        ..Default::default()
    };
    cluster
        .ensure_queue(&js, &queue, &settings)
        .await
        .expect("R3 queue");

    let count = JOBS.to_string();
    let mut submit = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["submit", "outage", "--id", "cli", "--count", &count, "x"])
        .env("CONVEYOR_NATS_URL", cluster.url())
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("conveyor runs");
    let start = Instant::now();
    while messages(&js, &queue.stream()).await < 2000 {
        if let Some(status) = submit.try_wait().unwrap() {
            let out = submit.wait_with_output().await.unwrap();
            panic!(
                "conveyor submit ended ({status}) before 2,000 jobs were stored: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "2,000 jobs stored within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = cluster.stream_leader(&js, &queue.stream()).await.unwrap();
    cluster.kill(leader).unwrap();
    let out = tokio::time::timeout(DEADLINE, submit.wait_with_output())
        .await
        .expect("conveyor submit finishes")
        .expect("its output");
    cluster.restart(leader).await.unwrap();

    let stdout = String::from_utf8(out.stdout).expect("ids are text");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let printed: Vec<&str> = stdout.lines().collect();
    let in_stream = stored_ids(&js, &queue.stream()).await;
    let missing: Vec<&&str> = printed
        .iter()
        .filter(|id| !in_stream.contains(**id))
        .collect();
    println!(
        "conveyor submit {}: {} ids printed as stored, {} jobs in the stream; stderr: {}",
        out.status,
        printed.len(),
        in_stream.len(),
        stderr.trim()
    );
    assert!(
        missing.is_empty(),
        "{} ids printed as stored are not in the stream: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    if out.status.success() {
        assert_eq!(printed.len() as u64, JOBS, "success means every job stored");
    } else {
        let refused = JOBS - printed.len() as u64;
        assert!(
            stderr.contains(&format!("{refused} of {JOBS} job(s) refused")),
            "a failed submit says how many jobs were not stored: {stderr}"
        );
    }
}
