//! The JetStream assets of a queue: the desired configuration (pure, from a `JobQueue` spec)
//! and the idempotent calls that create, update, measure and delete them.
//!
//! What the assets look like is defined once, in `conveyor::admin` (a work stream with one
//! subject per priority level, one durable pull consumer per level, and its companion streams:
//! delayed jobs, cancellations, dead letters and captured advisories); this
//! module maps a `JobQueue` spec onto it and adds what only the operator does: dropping the
//! consumers of removed levels, reading the figures, and deleting the streams.

use async_nats::jetstream::{self, consumer, consumer::pull, stream};
use conveyor::admin::{self, AdminError, QueueSettings, Storage};
use conveyor::names::QueueRef;
use conveyor_crds::{JobQueueSpec, StorageType, duration::DurationError};
use futures::TryStreamExt;

/// Everything a queue needs in JetStream, as `conveyor::admin` defines it.
#[derive(Debug, Clone)]
pub struct QueueAssets {
    /// Which queue these assets belong to.
    pub queue: QueueRef,
    /// The work stream.
    pub stream: stream::Config,
    /// The companion streams (delayed jobs, cancellations, dead letters, advisories), created
    /// before the work stream because it sources due jobs from the delayed one.
    pub companions: Vec<stream::Config>,
    /// One durable pull consumer per priority level, index = level.
    pub consumers: Vec<pull::Config>,
}

/// Jobs in a queue, summed over its priority levels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Jobs not yet delivered to a worker.
    pub pending: u64,
    /// Jobs delivered and not yet acknowledged.
    pub in_flight: u64,
}

impl Figures {
    /// Pending plus in-flight: what the scaler sizes the pool from.
    pub fn backlog(&self) -> u64 {
        self.pending + self.in_flight
    }
}

/// A spec value the schema admitted but the operator cannot use.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A duration that does not parse.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// Settings `conveyor::admin` refuses.
    #[error(transparent)]
    Settings(#[from] AdminError),
}

/// The queue settings a `JobQueue` spec stands for.
pub fn settings(spec: &JobQueueSpec) -> Result<QueueSettings, SpecError> {
    let settings = QueueSettings {
        priorities: spec.priorities,
        max_attempts: u32::try_from(spec.retry.max_attempts).unwrap_or(0),
        timeout: spec.timeout()?,
        storage: match spec.stream.storage {
            StorageType::File => Storage::File,
            StorageType::Memory => Storage::Memory,
        },
        replicas: usize::from(spec.stream.replicas),
        max_jobs: spec.stream.max_jobs,
        max_bytes: spec.stream.max_bytes,
        max_job_size: spec.stream.max_job_size,
        max_age: spec.max_age()?,
        deduplication_window: spec.deduplication_window()?,
        concurrency_limit: spec.concurrency_limit.map(i64::from),
        result_retention: spec.result_retention()?,
        rate_limit: spec.rate_limit.and_then(|r| u32::try_from(r).ok()),
        wait_timeout: spec.wait_timeout()?,
        ..QueueSettings::default()
    };
    settings.validate()?;
    Ok(settings)
}

/// Builds the desired assets of a queue with `conveyor::admin`'s builders.
pub fn desired(queue: &QueueRef, spec: &JobQueueSpec) -> Result<QueueAssets, SpecError> {
    let settings = settings(spec)?;
    Ok(QueueAssets {
        queue: queue.clone(),
        stream: admin::stream_config(queue, &settings),
        companions: [
            admin::delayed_stream_config(queue, &settings),
            admin::cancel_stream_config(queue, &settings),
            admin::dead_letter_stream_config(queue, &settings),
            admin::events_stream_config(queue, &settings),
            admin::results_stream_config(queue, &settings),
            admin::waiting_stream_config(queue, &settings),
            admin::flow_stream_config(queue, &settings),
        ]
        .into_iter()
        .chain(admin::tokens_stream_config(queue, &settings))
        .collect(),
        consumers: (0..settings.priorities)
            .map(|level| admin::consumer_config(queue, level, &settings))
            .collect(),
    })
}

/// A JetStream call that failed, with the asset it was about.
#[derive(Debug, thiserror::Error)]
pub enum AssetsError {
    /// Creating or updating a stream failed.
    #[error("cannot create or update stream {stream}: {source}")]
    Stream {
        /// Stream name.
        stream: String,
        /// The JetStream error.
        source: jetstream::context::CreateStreamError,
    },
    /// Looking up a stream failed.
    #[error("cannot look up stream {stream}: {source}")]
    GetStream {
        /// Stream name.
        stream: String,
        /// The JetStream error.
        source: jetstream::context::GetStreamError,
    },
    /// Listing, creating or deleting a consumer failed.
    #[error("cannot manage consumer {consumer} of stream {stream}: {source}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// The JetStream error.
        source: jetstream::stream::ConsumerError,
    },
    /// Listing the consumers of a stream failed.
    #[error("cannot list consumers of stream {stream}: {source}")]
    ListConsumers {
        /// Stream name.
        stream: String,
        /// The JetStream error.
        source: jetstream::context::StreamsError,
    },
    /// Deleting a stream failed.
    #[error("cannot delete stream {stream}: {source}")]
    DeleteStream {
        /// Stream name.
        stream: String,
        /// The JetStream error.
        source: jetstream::context::DeleteStreamError,
    },
}

impl AssetsError {
    /// True when the error says NATS or JetStream could not be reached (as opposed to NATS
    /// refusing the configuration): the condition reason is then `NatsUnavailable`.
    pub fn is_unavailable(&self) -> bool {
        use jetstream::context::RequestErrorKind as L;
        use jetstream::context::{CreateStreamErrorKind as C, GetStreamErrorKind as G};
        use jetstream::stream::ConsumerErrorKind as K;
        match self {
            Self::Stream { source, .. } => {
                matches!(source.kind(), C::TimedOut | C::JetStreamUnavailable)
            }
            Self::GetStream { source, .. } | Self::DeleteStream { source, .. } => {
                matches!(source.kind(), G::Request)
            }
            Self::Consumer { source, .. } => matches!(source.kind(), K::TimedOut | K::Request),
            Self::ListConsumers { source, .. } => {
                matches!(source.kind(), L::TimedOut | L::NoResponders | L::Other)
            }
        }
    }
}

fn is_not_found(err: &jetstream::Error, code: jetstream::ErrorCode) -> bool {
    err.error_code() == code
}

/// Creates or updates the streams and consumers so they match `assets` (recreating whatever
/// was deleted behind the operator's back), removes consumers of priority levels that no
/// longer exist, and returns the queue's figures.
pub async fn ensure(js: &jetstream::Context, assets: &QueueAssets) -> Result<Figures, AssetsError> {
    let name = assets.stream.name.clone();
    for companion in &assets.companions {
        js.create_or_update_stream(companion.clone())
            .await
            .map_err(|source| AssetsError::Stream {
                stream: companion.name.clone(),
                source,
            })?;
    }
    // The tokens stream exists only while the queue has a rate limit: without it, workers
    // started with the limit would keep waiting for tokens that no longer come.
    let tokens = assets.queue.tokens_stream();
    if !assets.companions.iter().any(|c| c.name == tokens) {
        delete_stream(js, tokens).await?;
    }
    let stream = match js.get_stream(&name).await {
        Ok(stream) => Some(stream),
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
                if is_not_found(&e, jetstream::ErrorCode::STREAM_NOT_FOUND)) =>
        {
            None
        }
        Err(source) => {
            return Err(AssetsError::GetStream {
                stream: name,
                source,
            });
        }
    };
    // Consumers of removed priority levels go first, so the stream may drop their subjects.
    if let Some(stream) = &stream {
        let wanted: Vec<&str> = assets
            .consumers
            .iter()
            .filter_map(|c| c.durable_name.as_deref())
            .collect();
        let existing: Vec<String> =
            stream
                .consumer_names()
                .try_collect()
                .await
                .map_err(|source| AssetsError::ListConsumers {
                    stream: name.clone(),
                    source,
                })?;
        for extra in existing
            .iter()
            .filter(|c| is_level_consumer(c) && !wanted.contains(&c.as_str()))
        {
            stream
                .delete_consumer(extra)
                .await
                .map_err(|source| AssetsError::Consumer {
                    stream: name.clone(),
                    consumer: extra.clone(),
                    source,
                })?;
        }
    }
    js.create_or_update_stream(assets.stream.clone())
        .await
        .map_err(|source| AssetsError::Stream {
            stream: name.clone(),
            source,
        })?;
    let mut figures = Figures::default();
    for config in &assets.consumers {
        let consumer: consumer::PullConsumer = js
            .create_consumer_on_stream(config.clone(), &name)
            .await
            .map_err(|source| AssetsError::Consumer {
                stream: name.clone(),
                consumer: config.durable_name.clone().unwrap_or_default(),
                source,
            })?;
        let info = consumer.cached_info();
        figures.pending += info.num_pending;
        figures.in_flight += info.num_ack_pending as u64;
    }
    Ok(figures)
}

/// Reads the figures of an existing queue from its consumers (pending + in flight), without
/// changing anything. Missing consumers count as empty.
pub async fn figures(
    js: &jetstream::Context,
    assets: &QueueAssets,
) -> Result<Figures, AssetsError> {
    let name = &assets.stream.name;
    let mut figures = Figures::default();
    for config in &assets.consumers {
        let consumer_name = config.durable_name.clone().unwrap_or_default();
        let result: Result<consumer::PullConsumer, _> =
            js.get_consumer_from_stream(&consumer_name, name).await;
        match result {
            Ok(consumer) => {
                let info = consumer.cached_info();
                figures.pending += info.num_pending;
                figures.in_flight += info.num_ack_pending as u64;
            }
            Err(err)
                if matches!(err.kind(), jetstream::stream::ConsumerErrorKind::JetStream(e)
                    if is_not_found(&e, jetstream::ErrorCode::CONSUMER_NOT_FOUND)
                        || is_not_found(&e, jetstream::ErrorCode::STREAM_NOT_FOUND)) => {}
            Err(source) => {
                return Err(AssetsError::Consumer {
                    stream: name.clone(),
                    consumer: consumer_name,
                    source,
                });
            }
        }
    }
    Ok(figures)
}

/// Deletes the work stream and its companions (and with them their consumers). A stream that
/// does not exist counts as deleted, so this can run any number of times.
pub async fn delete(js: &jetstream::Context, queue: &QueueRef) -> Result<(), AssetsError> {
    for name in [
        queue.stream(),
        queue.delayed_stream(),
        queue.cancel_stream(),
        queue.dead_letter_stream(),
        queue.events_stream(),
        queue.results_stream(),
        queue.tokens_stream(),
        queue.waiting_stream(),
        queue.flow_stream(),
    ] {
        delete_stream(js, name).await?;
    }
    Ok(())
}

/// Deletes a stream (and its consumers); one that does not exist counts as deleted.
async fn delete_stream(js: &jetstream::Context, name: String) -> Result<(), AssetsError> {
    match js.delete_stream(&name).await {
        Ok(_) => {
            tracing::info!(stream = %name, "deleted stream");
            Ok(())
        }
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
                if is_not_found(&e, jetstream::ErrorCode::STREAM_NOT_FOUND)) =>
        {
            Ok(())
        }
        Err(source) => Err(AssetsError::DeleteStream {
            stream: name,
            source,
        }),
    }
}

/// Whether a consumer name is one of the per-level consumers the operator manages.
fn is_level_consumer(name: &str) -> bool {
    name.strip_prefix("workers-p")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
