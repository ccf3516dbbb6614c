//! Cancellation: the queue's cancelled ids, followed from its cancellations stream, and the
//! jobs running here that a cancellation must reach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::push};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::names::QueueRef;
use crate::protocol;

/// Cancelled job ids (from the queue's cancellations stream) and the jobs running here.
pub(super) struct Cancels {
    /// Cancelled ids and when this worker learnt of them.
    ids: HashMap<String, Instant>,
    /// Running jobs by stream sequence: their id and the token that tells their handler.
    running: HashMap<u64, (String, CancellationToken)>,
    /// How long the stream remembers a cancellation; older ids are forgotten here too.
    retention: Duration,
    /// Size of `ids` at which old ids are forgotten next.
    prune_at: usize,
}

impl Cancels {
    fn new(retention: Duration) -> Self {
        Self {
            ids: HashMap::new(),
            running: HashMap::new(),
            retention,
            prune_at: 1024,
        }
    }

    /// Records a cancellation and tells the handler if the job runs here.
    fn cancel(&mut self, id: String) {
        for (running_id, token) in self.running.values() {
            if *running_id == id {
                token.cancel();
            }
        }
        self.ids.insert(id, Instant::now());
        if self.ids.len() >= self.prune_at {
            let retention = self.retention;
            self.ids.retain(|_, seen| seen.elapsed() < retention);
            self.prune_at = (self.ids.len() * 2).max(1024);
        }
    }
}

/// A job registered as running, so a cancellation reaches it; unregistered on drop.
pub(super) struct Running<'a> {
    cancels: &'a Mutex<Cancels>,
    sequence: u64,
    pub(super) cancel: CancellationToken,
}

impl<'a> Running<'a> {
    /// Registers the job, or `None` when it is already cancelled. One lock for the check and
    /// the registration, so a cancellation arriving meanwhile is never missed.
    pub(super) fn start(cancels: &'a Mutex<Cancels>, sequence: u64, id: &str) -> Option<Self> {
        let mut state = cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.ids.contains_key(id) {
            return None;
        }
        let cancel = CancellationToken::new();
        state
            .running
            .insert(sequence, (id.to_owned(), cancel.clone()));
        Some(Self {
            cancels,
            sequence,
            cancel,
        })
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut state = self
            .cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.running.remove(&self.sequence);
    }
}

/// Reads the queue's cancellations from the start (before the worker takes jobs), then
/// follows new ones in the background until `done`. Without a cancellations stream (a queue
/// created by an older Conveyor) cancellation is off, with a warning.
pub(super) async fn follow_cancels(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    done: CancellationToken,
) -> Arc<Mutex<Cancels>> {
    let mut stream = match jetstream.get_stream(queue.cancel_stream()).await {
        Ok(stream) => stream,
        Err(error) => {
            warn!(stream = %queue.cancel_stream(), %error, "no cancellations stream; jobs cannot be cancelled");
            return Arc::new(Mutex::new(Cancels::new(Duration::ZERO)));
        }
    };
    let retention = match stream.info().await {
        Ok(info) if !info.config.max_age.is_zero() => info.config.max_age,
        _ => crate::admin::CANCEL_RETENTION,
    };
    let cancels = Arc::new(Mutex::new(Cancels::new(retention)));
    let config = push::OrderedConfig {
        deliver_subject: jetstream.client().new_inbox(),
        filter_subject: queue.cancels_wildcard(),
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = match stream.create_consumer(config).await {
        Ok(consumer) => consumer,
        Err(error) => {
            warn!(%error, "following cancellations failed; jobs cannot be cancelled");
            return cancels;
        }
    };
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = match consumer.messages().await {
        Ok(messages) => messages,
        Err(error) => {
            warn!(%error, "following cancellations failed; jobs cannot be cancelled");
            return cancels;
        }
    };
    let record = |cancels: &Mutex<Cancels>, message: &jetstream::Message| {
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(protocol::JOB_ID));
        if let Some(id) = id {
            let mut state = cancels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.cancel(id.as_str().to_owned());
        }
    };
    // Catch up with the cancellations made so far before taking any job.
    while pending > 0 {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(message))) => {
                record(&cancels, &message);
                pending = message.info().map(|info| info.pending).unwrap_or(0);
            }
            Ok(Some(Err(error))) => warn!(%error, "reading cancellations"),
            Ok(None) | Err(_) => break,
        }
    }
    let following = cancels.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(message)) => record(&following, &message),
                    Some(Err(error)) => warn!(%error, "reading cancellations"),
                    None => break,
                },
                () = done.cancelled() => break,
            }
        }
    });
    cancels
}
