//! How fast the scaler reacts, against KEDA's defaults: five rounds of a burst of no-op jobs on
//! an idle pool (`minReplicas: 0`, defaults otherwise, so `scaleDownDelay: 30s`), each measuring
//! the time from the first job to the Deployment asking for pods, and from the queue becoming
//! empty to the Deployment back at zero. The operator runs with its default scaler interval (1 s). Real worker processes in the Kubernetes test double,
//! a real nats-server, the operator in-process. Run by `make bench` (after a release build of
//! the binaries): `cargo bench -p conveyor-operator --bench scaling`.

// The fixture of the worker tests.
#[path = "../tests/worker_env/mod.rs"]
mod worker_env;

use std::time::{Duration, Instant};

use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_testkit::wait_for;
use worker_env::{Env, NS, noop_autoscaled_worker};

const ROUNDS: usize = 5;
const JOBS: usize = 500;

const QUEUE: &str = "apiVersion: conveyor.dev/v1alpha1
kind: JobQueue
metadata: {name: reaction}
spec: {}
";

/// KEDA's defaults: the scaler is polled every 30 s (`pollingInterval`) and activates a
/// deployment from zero on that poll; on average a burst waits half an interval.
const KEDA_UP: Duration = Duration::from_secs(15);
/// KEDA scales to zero `cooldownPeriod` (300 s) after the last active poll (30 s apart).
const KEDA_DOWN: Duration = Duration::from_secs(300 + 15);

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    // The operator's default scaler interval, not the tests' faster one.
    let env = Env::start_with(|config| config.scaler_interval = Duration::from_secs(1)).await;
    env.apply(QUEUE).await;
    env.apply(&noop_autoscaled_worker(
        "reaction",
        "{minReplicas: 0, maxReplicas: 4}",
    ))
    .await;
    let queue = QueueRef::new(NS, "reaction");
    env.wait_stream(&queue.stream()).await;
    let replicas = || async { env.deployment_replicas("reaction").await.unwrap_or(-1) };
    let client = Client::connect(&env.nats.url()).await.expect("NATS");
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        wait_for(Duration::from_secs(120), "an idle pool", || async {
            replicas().await == 0
        })
        .await
        .expect("the pool scales to zero");
        // The pool reached zero on a scaler tick: start each round at another phase of the
        // 1 s tick (0, 0.2, … 0.8 s after it), so the median is a typical wait, not the worst.
        tokio::time::sleep(Duration::from_millis(200 * round as u64)).await;
        let first = Instant::now();
        let jobs = (0..JOBS).map(|i| Job::new(format!("r{round}-{i}"), "x"));
        let accepted = client.submit_batch(&queue, jobs).await;
        assert!(accepted.iter().all(Result::is_ok), "every job accepted");
        wait_for(Duration::from_secs(60), "pods asked for", || async {
            replicas().await > 0
        })
        .await
        .expect("the pool scales up");
        let up = first.elapsed();
        wait_for(Duration::from_secs(120), "an empty queue", || async {
            env.stream_messages(&queue.stream()).await == 0
        })
        .await
        .expect("every job done");
        let empty = Instant::now();
        wait_for(Duration::from_secs(120), "zero pods asked for", || async {
            replicas().await == 0
        })
        .await
        .expect("the pool scales down");
        let down = empty.elapsed();
        println!("round {}: scale-up {up:?}, scale-down {down:?}", round + 1);
        ups.push(up);
        downs.push(down);
    }
    let (up, down) = (median(ups), median(downs));
    println!(
        "median of {ROUNDS}: first job -> pods asked for {up:.2?} (KEDA default ~{KEDA_UP:?}: \
         {:.3}x), idle -> zero pods {down:.2?} (KEDA default ~{KEDA_DOWN:?}: {:.3}x)",
        up.as_secs_f64() / KEDA_UP.as_secs_f64(),
        down.as_secs_f64() / KEDA_DOWN.as_secs_f64(),
    );
    env.shutdown().await;
}
