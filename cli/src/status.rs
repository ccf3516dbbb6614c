//! `conveyor status`: queue figures read straight from JetStream — what is waiting, what workers
//! hold right now, and what ended in the dead-letter queue — without going through Kubernetes.

use anyhow::Context as _;
use std::collections::BTreeMap;

use async_nats::jetstream::{
    self, ErrorCode,
    context::{GetStreamError, GetStreamErrorKind},
    stream::Stream,
};
use conveyor::names::QueueRef;
use futures::TryStreamExt;
use serde::Serialize;

use crate::args::{Output, StatusArgs};

/// Prefix of the durable consumers that worker runtimes share (`workers-p<level>`).
const WORKER_CONSUMER_PREFIX: &str = "workers-p";

/// Runs `conveyor status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let client = crate::discover::connect(&args.queue_args, args.queue.as_deref()).await?;
    let js = jetstream::new(client);
    let queues = match &args.queue {
        Some(name) => vec![args.queue_args.queue(name)],
        None => namespace_queues(&js, &args.queue_args.namespace).await?,
    };
    let mut figures = Vec::with_capacity(queues.len());
    for queue in &queues {
        figures.push(queue_figures(&js, queue).await?);
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&figures)?),
        Output::Table if figures.is_empty() => {
            eprintln!("no queues in namespace {}", args.queue_args.namespace);
        }
        Output::Table => print!("{}", table(&figures)),
    }
    Ok(())
}

/// The figures of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueFigures {
    /// Namespace of the `JobQueue`.
    pub namespace: String,
    /// Name of the `JobQueue`.
    pub queue: String,
    /// Jobs waiting to be handed to a worker (including retries waiting for their backoff).
    pub pending: u64,
    /// Jobs a worker holds and has not acknowledged yet.
    pub in_flight: u64,
    /// Jobs in the dead-letter queue.
    pub dead_lettered: u64,
}

/// Reads the figures of one queue; fails with a clear message when the queue has no stream.
pub async fn queue_figures(
    js: &jetstream::Context,
    queue: &QueueRef,
) -> anyhow::Result<QueueFigures> {
    let Some(stream) = get_stream(js, &queue.stream())
        .await
        .context("cannot read the queue's stream")?
    else {
        anyhow::bail!(
            "queue {}/{} not found: JetStream has no stream {} (is the JobQueue applied and Ready?)",
            queue.namespace,
            queue.name,
            queue.stream()
        );
    };
    let messages = stream.cached_info().state.messages;
    let mut pending = 0;
    let mut in_flight = 0;
    let mut worker_consumers = 0;
    let mut consumers = stream.consumers();
    while let Some(info) = consumers
        .try_next()
        .await
        .context("cannot list the queue's consumers")?
    {
        if info.name.starts_with(WORKER_CONSUMER_PREFIX) {
            worker_consumers += 1;
            pending += info.num_pending;
            in_flight += info.num_ack_pending as u64;
        }
    }
    if worker_consumers == 0 {
        // No consumer yet: everything stored is waiting.
        pending = messages;
    }
    let dead_lettered = get_stream(js, &queue.dead_letter_stream())
        .await
        .context("cannot read the dead-letter stream")?
        .map_or(0, |dlq| dlq.cached_info().state.messages);
    Ok(QueueFigures {
        namespace: queue.namespace.clone(),
        queue: queue.name.clone(),
        pending,
        in_flight,
        dead_lettered,
    })
}

/// A stream, or `None` when JetStream has no stream of that name.
async fn get_stream(js: &jetstream::Context, name: &str) -> Result<Option<Stream>, GetStreamError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Every queue of a namespace, found by its work stream (`conveyor_<namespace>_<queue>`).
pub async fn namespace_queues(
    js: &jetstream::Context,
    namespace: &str,
) -> anyhow::Result<Vec<QueueRef>> {
    let streams: BTreeMap<String, Vec<String>> = js
        .streams()
        .map_ok(|info| (info.config.name, info.config.subjects))
        .try_collect()
        .await
        .context("cannot list JetStream streams")?;
    Ok(queues_among(&streams, namespace))
}

/// The queues of `namespace` among `streams` (name → subjects). Kubernetes names contain no `_`
/// and stream names map `.` to `_`, so a queue name is recovered by mapping back; the stream is
/// the queue's work stream only if it takes the queue's jobs — the queue's other streams
/// (dead letters, delayed jobs, events) share the name prefix but not the subjects.
fn queues_among(streams: &BTreeMap<String, Vec<String>>, namespace: &str) -> Vec<QueueRef> {
    let prefix = QueueRef::new(namespace, "").stream();
    streams
        .iter()
        .filter_map(|(name, subjects)| {
            let rest = name.strip_prefix(&prefix).filter(|q| !q.is_empty())?;
            let queue = QueueRef::new(namespace, rest.replace('_', "."));
            let takes_jobs = subjects
                .iter()
                .any(|s| *s == queue.job_subject(0) || *s == queue.jobs_wildcard());
            takes_jobs.then_some(queue)
        })
        .collect()
}

/// Renders figures as an aligned table, like `kubectl get`.
pub fn table(figures: &[QueueFigures]) -> String {
    let header = [
        "NAMESPACE",
        "QUEUE",
        "PENDING",
        "IN FLIGHT",
        "DEAD-LETTERED",
    ];
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|f| {
            [
                f.namespace.clone(),
                f.queue.clone(),
                f.pending.to_string(),
                f.in_flight.to_string(),
                f.dead_lettered.to_string(),
            ]
        })
        .collect();
    crate::table::render(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_found_by_their_work_stream() {
        let stream = |name: &str, subjects: &[&str]| {
            (
                name.to_owned(),
                subjects.iter().map(|s| s.to_string()).collect(),
            )
        };
        let streams: BTreeMap<String, Vec<String>> = [
            stream("conveyor_default_hello", &["conveyor.default.hello.jobs.0"]),
            stream(
                "conveyor_default_hello_dlq",
                &["conveyor.default.hello.dlq"],
            ),
            stream(
                "conveyor_default_hello_delayed",
                &["conveyor.default.hello.delayed.*"],
            ),
            stream(
                "conveyor_default_img_v2",
                &[
                    "conveyor.default.img_v2.jobs.0",
                    "conveyor.default.img_v2.jobs.1",
                ],
            ),
            stream("conveyor_other_hello", &["conveyor.other.hello.jobs.0"]),
            stream("unrelated", &["x"]),
        ]
        .into();
        let queues = queues_among(&streams, "default");
        assert_eq!(
            queues,
            [
                QueueRef::new("default", "hello"),
                QueueRef::new("default", "img.v2")
            ]
        );
    }

    #[test]
    fn table_aligns_columns() {
        let figures = [QueueFigures {
            namespace: "default".into(),
            queue: "hello".into(),
            pending: 12,
            in_flight: 3,
            dead_lettered: 0,
        }];
        assert_eq!(
            table(&figures),
            "NAMESPACE   QUEUE   PENDING   IN FLIGHT   DEAD-LETTERED\n\
             default     hello   12        3           0\n"
        );
    }
}
