//! The figures of `kubectl get jobqueues,workers` against what happened (issue #15): `Delayed`
//! drops when delayed jobs fall due, `Oldest` is empty whenever `Pending` is 0, a pool with no
//! ready pod while jobs wait is `Available=False` (`NoReadyPods`) even when it is scaled to zero,
//! and `Busy`/`Slots` show the jobs held against what the ready pods can run. Test double with
//! its process kubelet, a real nats-server, the operator in-process.

mod worker_env;

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, JobQueueStatus, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use futures::StreamExt;
use kube::Api;
use worker_env::{Env, NS};

const DEADLINE: Duration = Duration::from_secs(60);

fn available(w: &Worker) -> Option<(String, String, String)> {
    w.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Available")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the JobQueue `name`'s status passes `check`, and returns it.
async fn wait_queue(
    env: &Env,
    name: &str,
    what: &str,
    check: impl Fn(&JobQueueStatus) -> bool,
) -> JobQueueStatus {
    let api: Api<JobQueue> = Api::namespaced(env.cluster.client(), NS);
    let read = || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|q| q.status)
    };
    wait_for(DEADLINE, what, || async {
        read().await.as_ref().is_some_and(&check)
    })
    .await
    .unwrap();
    read().await.unwrap()
}

/// Takes up to `n` jobs from level 0 as a worker would, without finishing them.
async fn take(js: &jetstream::Context, queue: &QueueRef, n: usize) -> Vec<jetstream::Message> {
    let consumer: consumer::PullConsumer = js
        .get_consumer_from_stream(queue.consumer(0), queue.stream())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut taken = Vec::new();
    while let Some(message) = batch.next().await {
        taken.push(message.unwrap());
    }
    taken
}

#[tokio::test]
async fn delayed_and_oldest_follow_the_jobs() {
    let env = Env::start().await;
    env.apply(&JobQueue::test("later").timeout("1m").yaml())
        .await;
    let queue = QueueRef::new(NS, "later");
    env.wait_stream(&queue.stream()).await;
    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    let js = env.jetstream().await;

    client
        .submit(&queue, conveyor::Job::new("now", "{}"))
        .await
        .unwrap();
    wait_queue(&env, "later", "one job pending with an age", |s| {
        s.pending == Some(1) && s.oldest_pending_age.is_some()
    })
    .await;
    let running = take(&js, &queue, 1).await;
    assert_eq!(running.len(), 1);
    let status = wait_queue(&env, "later", "the job in flight", |s| {
        s.pending == Some(0) && s.in_flight == Some(1)
    })
    .await;
    assert_eq!(
        status.oldest_pending_age, None,
        "no job waits, so there is no oldest waiting job"
    );
    for message in running {
        message.double_ack().await.unwrap();
    }

    for id in ["later-1", "later-2"] {
        client
            .submit(
                &queue,
                // Long enough for a status write (at most every 5 s) to show them delayed.
                conveyor::Job::new(id, "{}").delay(Duration::from_secs(15)),
            )
            .await
            .unwrap();
    }
    wait_queue(&env, "later", "two delayed jobs", |s| s.delayed == Some(2)).await;
    let status = wait_queue(&env, "later", "both due and pending", |s| {
        s.pending == Some(2)
    })
    .await;
    assert_eq!(status.delayed, Some(0), "due jobs are no longer delayed");
    let ran = take(&js, &queue, 2).await;
    assert_eq!(ran.len(), 2);
    for message in ran {
        message.double_ack().await.unwrap();
    }
    let status = wait_queue(&env, "later", "both delayed jobs finished", |s| {
        s.pending == Some(0) && s.in_flight == Some(0)
    })
    .await;
    assert_eq!(
        (status.delayed, status.oldest_pending_age.as_deref()),
        (Some(0), None)
    );
    let wide = env
        .kubectl(&["get", "jobqueue", "later", "-o", "wide"])
        .await;
    let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    let delayed = header.iter().position(|h| *h == "DELAYED").unwrap();
    assert_eq!(row[delayed], "0", "{wide}");
    env.shutdown().await;
}

fn queue() -> String {
    JobQueue::test("thumbs").timeout("2m").yaml()
}

// Paused at 0 pods; each job sleeps long enough to be seen running.
fn worker() -> String {
    Worker::test("thumbs")
        .replicas(0)
        .concurrency(2)
        .exec(&["sleep", "60"])
        .image("ghcr.io/conveyor-dev/handler")
        .yaml()
}

#[tokio::test]
async fn a_pool_without_ready_pods_is_unavailable_while_jobs_wait_and_shows_busy_slots() {
    let env = Env::start().await;
    env.apply(&queue()).await;
    env.apply(&worker()).await;
    let queue = QueueRef::new(NS, "thumbs");
    env.wait_stream(&queue.stream()).await;
    let idle = env
        .wait_worker("thumbs", DEADLINE, "Available at 0 pods", |w| {
            available(w).filter(|c| c.0 == "True")
        })
        .await;
    assert_eq!(idle.2, "scaled to zero: no pods needed");

    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    for i in 0..20 {
        client
            .submit(&queue, conveyor::Job::new(format!("thumb-{i}"), "{}"))
            .await
            .unwrap();
    }
    let (_, reason, message) = env
        .wait_worker("thumbs", DEADLINE, "Available=False at 0 pods", |w| {
            available(w).filter(|c| c.0 == "False")
        })
        .await;
    assert_eq!(reason, "NoReadyPods");
    assert!(
        message.starts_with("no pod is ready while 20 jobs wait in JobQueue thumbs"),
        "{message}"
    );

    env.kubectl(&["scale", "worker", "thumbs", "--replicas=1"])
        .await;
    env.wait_worker("thumbs", DEADLINE, "two busy slots of two", |w| {
        w.status
            .as_ref()
            .filter(|s| s.busy == Some(2) && s.slots == Some(2))
            .map(|_| ())
    })
    .await;
    env.wait_worker("thumbs", DEADLINE, "Available again", |w| {
        available(w).filter(|c| c.0 == "True")
    })
    .await;
    let table = env.kubectl(&["get", "workers"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((column("BUSY"), column("SLOTS")), ("2", "2"), "{table}");
    env.shutdown().await;
}
