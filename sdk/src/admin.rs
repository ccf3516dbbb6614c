//! The one definition of the JetStream assets behind a queue: the work stream, one durable pull
//! consumer per priority level, the dead-letter stream, and the events stream that keeps the
//! advisories the dispatcher acts on. The operator applies these from a
//! `JobQueue` spec; tests and `conveyor dev` call [`ensure_queue`] directly.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::names::QueueRef;

/// Highest number of priority levels a queue may have.
pub const MAX_PRIORITIES: u8 = 10;

/// Where JetStream keeps a queue's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// On disk: survives server restarts.
    #[default]
    File,
    /// In memory: faster, lost on restart.
    Memory,
}

/// Settings of a queue, as a `JobQueue` spec gives them. `None` limits mean "unlimited".
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Priority levels, 1 to [`MAX_PRIORITIES`]; level `n - 1` is the most urgent.
    pub priorities: u8,
    /// Deliveries per job before it is given up (consumer `max_deliver`).
    pub max_attempts: u32,
    /// Time without ack or heartbeat after which a job is redelivered (consumer `ack_wait`).
    pub timeout: Duration,
    /// Storage of the work stream.
    pub storage: Storage,
    /// JetStream replicas (1 or 3).
    pub replicas: usize,
    /// Most jobs the stream holds; further submissions are refused.
    pub max_jobs: Option<i64>,
    /// Most bytes the stream holds; further submissions are refused.
    pub max_bytes: Option<i64>,
    /// Largest job (payload plus headers) accepted.
    pub max_job_size: Option<i32>,
    /// Jobs older than this are dropped by JetStream.
    pub max_age: Option<Duration>,
    /// Window in which a second submission with the same job id is a duplicate.
    pub deduplication_window: Duration,
    /// Cap of jobs in flight across all workers, per priority level (each level consumer's
    /// `max_ack_pending`; exact for the queue with one level).
    pub concurrency_limit: Option<i64>,
    /// How long dead letters are kept.
    pub dead_letter_max_age: Option<Duration>,
    /// Most bytes of dead letters kept (oldest dropped first).
    pub dead_letter_max_bytes: Option<i64>,
    /// How long finished jobs' outcomes are kept in the results stream (workers store them
    /// only when told to, `WorkerOptions::store_results`); [`DEFAULT_RESULT_RETENTION`] when
    /// `None`.
    pub result_retention: Option<Duration>,
    /// Most jobs started per second across all workers: the queue gets a tokens stream
    /// ([`tokens_stream_config`]) that holds at most one second of tokens.
    pub rate_limit: Option<u32>,
    /// Longest time a job may wait for its dependencies or children before it is
    /// dead-lettered (`dependency_timeout`); [`DEFAULT_WAIT_TIMEOUT`] when `None`, at most
    /// [`MAX_WAIT_TIMEOUT`].
    pub wait_timeout: Option<Duration>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            priorities: 1,
            max_attempts: 5,
            timeout: Duration::from_secs(30),
            storage: Storage::File,
            replicas: 1,
            max_jobs: None,
            max_bytes: None,
            max_job_size: None,
            max_age: None,
            deduplication_window: Duration::from_secs(120),
            concurrency_limit: None,
            dead_letter_max_age: None,
            dead_letter_max_bytes: None,
            result_retention: None,
            rate_limit: None,
            wait_timeout: None,
        }
    }
}

/// Shortest deduplication window JetStream accepts.
pub const MIN_DEDUPLICATION_WINDOW: Duration = Duration::from_millis(100);

/// A duration as whole seconds (`90s`) or milliseconds (`250ms`), for error messages.
fn humantime_like(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Failure to create or update a queue's JetStream assets.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The settings are out of range.
    #[error("invalid queue settings: {0}")]
    Invalid(String),
    /// The NATS server is too old.
    #[error(transparent)]
    UnsupportedServer(#[from] crate::protocol::UnsupportedServer),
    /// Creating or updating a stream failed.
    #[error("creating or updating stream {stream}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    /// Looking up a stream failed.
    #[error("looking up stream {stream}")]
    GetStream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// Creating or updating a consumer failed.
    #[error("creating or updating consumer {consumer} on stream {stream}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// Cause.
        #[source]
        source: jetstream::stream::ConsumerError,
    },
}

impl QueueSettings {
    /// Checks the ranges the builders rely on.
    pub fn validate(&self) -> Result<(), AdminError> {
        if self.priorities == 0 || self.priorities > MAX_PRIORITIES {
            return Err(AdminError::Invalid(format!(
                "priorities is {}, must be 1 to {MAX_PRIORITIES}",
                self.priorities
            )));
        }
        if self.max_attempts == 0 {
            return Err(AdminError::Invalid("maxAttempts must be at least 1".into()));
        }
        if self.timeout < Duration::from_secs(1) {
            return Err(AdminError::Invalid("timeout must be at least 1s".into()));
        }
        if self.deduplication_window < MIN_DEDUPLICATION_WINDOW {
            return Err(AdminError::Invalid(
                "deduplicationWindow must be at least 100ms".into(),
            ));
        }
        if let Some(max_age) = self.max_age.filter(|age| *age < self.deduplication_window) {
            return Err(AdminError::Invalid(format!(
                "deduplicationWindow ({}) is longer than stream.maxAge ({}): JetStream cannot remember a job id longer than it keeps jobs",
                humantime_like(self.deduplication_window),
                humantime_like(max_age)
            )));
        }
        if let Some(wait) = self.wait_timeout
            && (wait < Duration::from_secs(1) || wait > MAX_WAIT_TIMEOUT)
        {
            return Err(AdminError::Invalid(format!(
                "waitTimeout is {}, must be 1s to {}",
                humantime_like(wait),
                humantime_like(MAX_WAIT_TIMEOUT)
            )));
        }
        Ok(())
    }

    /// The wait timeout that applies: the setting or [`DEFAULT_WAIT_TIMEOUT`].
    pub fn wait_timeout(&self) -> Duration {
        self.wait_timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT)
    }
}

/// How long a job may wait for its dependencies or children when the queue sets nothing.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `waitTimeout` a queue may set.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// How much longer than the wait timeout the flow stream keeps edges and child records.
pub const FLOW_RETENTION_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// The waiting stream: jobs waiting for dependencies (`<prefix>.waiting.<hex id>`) or for a
/// parent's children (`<prefix>.cont.<hex parent id>`), one per subject. Limits retention and
/// no `max_age`: nothing vanishes silently, the releaser dead-letters what waited past its
/// wait timeout. Its message count is the queue's `waiting` figure.
pub fn waiting_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    stream::Config {
        name: queue.waiting_stream(),
        description: Some(format!(
            "Conveyor waiting jobs of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: vec![
            format!("{}.waiting.*", queue.subject_prefix()),
            format!("{}.cont.*", queue.subject_prefix()),
        ],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_messages_per_subject: 1,
        max_message_size: settings.max_job_size.unwrap_or(-1),
        duplicate_window: settings.deduplication_window,
        ..Default::default()
    }
}

/// The flow stream: edges (`<prefix>.edge.<hex id>`, one message per dependent), child
/// records (`<prefix>.child.<hex parent>.<hex child>`, written create-only) and child counts
/// (`<prefix>.count.<hex parent>`, rolled up so one message per parent is kept), for the wait
/// timeout plus [`FLOW_RETENTION_MARGIN`].
pub fn flow_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    let prefix = queue.subject_prefix();
    stream::Config {
        name: queue.flow_stream(),
        description: Some(format!(
            "Conveyor dependency edges and child records of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: vec![
            format!("{prefix}.edge.*"),
            format!("{prefix}.child.*.*"),
            format!("{prefix}.count.*"),
        ],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_age: settings.wait_timeout() + FLOW_RETENTION_MARGIN,
        allow_rollup: true,
        duplicate_window: settings.deduplication_window,
        ..Default::default()
    }
}

/// The work stream: work-queue retention (an acked job is gone), one explicit subject per
/// priority level (a publish to an unknown level finds no stream and fails), `discard: new`
/// so a full stream refuses submissions instead of dropping old jobs.
pub fn stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    stream::Config {
        name: queue.stream(),
        description: Some(format!(
            "Conveyor jobs of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: (0..settings.priorities)
            .map(|level| queue.job_subject(level))
            .collect(),
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_messages: settings.max_jobs.unwrap_or(-1),
        max_bytes: settings.max_bytes.unwrap_or(-1),
        max_message_size: settings.max_job_size.unwrap_or(-1),
        max_age: settings.max_age.unwrap_or_default(),
        duplicate_window: settings.deduplication_window,
        sources: Some(vec![stream::Source {
            name: queue.delayed_stream(),
            subject_transforms: vec![
                stream::SubjectTransform {
                    source: format!("{}.due.*", queue.subject_prefix()),
                    destination: format!("{}.jobs.{{{{wildcard(1)}}}}", queue.subject_prefix()),
                },
                // Runs of JobSchedules (`crate::schedule`): `<prefix>.tick.<level>.<name>`.
                stream::SubjectTransform {
                    source: crate::schedule::ticks_wildcard(queue),
                    destination: format!("{}.jobs.{{{{wildcard(1)}}}}", queue.subject_prefix()),
                },
            ],
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The delayed-jobs stream. A delayed job is a JetStream message schedule (`Nats-Schedule:
/// @at …`) on `<prefix>.delayed.<hex id>` whose target is `<prefix>.due.<level>`; when it is
/// due the server writes the job there, and the work stream sources it from there as
/// `<prefix>.jobs.<level>` (see [`stream_config`]). Schedules are refused on a `discard: new`
/// stream, which is why they live here and not in the work stream. Limits retention: the
/// server removes a fired schedule; a due copy expires after its `Nats-Schedule-TTL`. The
/// recurring schedules of JobSchedules live here too (`crate::schedule`), with their ticks.
pub fn delayed_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    let mut subjects = vec![format!("{}.delayed.*", queue.subject_prefix())];
    subjects.extend((0..settings.priorities).map(|level| queue.due_subject(level)));
    subjects.push(crate::schedule::schedules_wildcard(queue));
    subjects.push(crate::schedule::ticks_wildcard(queue));
    subjects.push(crate::schedule::holds_wildcard(queue));
    stream::Config {
        name: queue.delayed_stream(),
        description: Some(format!(
            "Conveyor delayed jobs of {}/{}",
            queue.namespace, queue.name
        )),
        subjects,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_message_size: settings.max_job_size.unwrap_or(-1),
        duplicate_window: settings.deduplication_window,
        allow_message_schedules: true,
        allow_message_ttl: true,
        ..Default::default()
    }
}

/// How long a cancellation is remembered when the queue has no `maxAge` (with one, a
/// cancellation is kept as long as a job may stay queued).
pub const CANCEL_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The cancellations stream: one message per cancelled job id on
/// `<prefix>.cancel.<hex id>` (the last per subject is kept), for the queue's `maxAge` or
/// [`CANCEL_RETENTION`]. Workers follow it from the start, so a job cancelled while queued is
/// skipped whenever it is delivered, and a running one is stopped.
pub fn cancel_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    stream::Config {
        name: queue.cancel_stream(),
        description: Some(format!(
            "Conveyor cancellations of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: vec![queue.cancels_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_messages_per_subject: 1,
        max_age: settings.max_age.unwrap_or(CANCEL_RETENTION),
        ..Default::default()
    }
}

/// How long outcomes are kept when a queue sets no result retention.
pub const DEFAULT_RESULT_RETENTION: Duration = Duration::from_secs(3600);

/// The results stream: the last outcome per job id, kept for the result retention.
pub fn results_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    stream::Config {
        name: queue.results_stream(),
        description: Some(format!(
            "Conveyor job results of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: vec![queue.results_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_messages_per_subject: 1,
        max_age: settings
            .result_retention
            .unwrap_or(DEFAULT_RESULT_RETENTION),
        ..Default::default()
    }
}

/// The rate-limit tokens stream of a queue with a `rate_limit`: work-queue retention (a token
/// taken is gone), at most one second's worth of tokens (the burst), oldest dropped when full.
pub fn tokens_stream_config(queue: &QueueRef, settings: &QueueSettings) -> Option<stream::Config> {
    let rate = settings.rate_limit?;
    Some(stream::Config {
        name: queue.tokens_stream(),
        description: Some(format!(
            "Conveyor rate-limit tokens of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: vec![queue.tokens_subject()],
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::Memory,
        num_replicas: settings.replicas,
        max_messages: i64::from(rate.max(1)),
        ..Default::default()
    })
}

/// The dead-letter stream: limits retention, oldest dropped when full.
pub fn dead_letter_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    stream::Config {
        name: queue.dead_letter_stream(),
        description: Some(format!(
            "Conveyor dead letters of {}/{}",
            queue.namespace, queue.name
        )),
        subjects: vec![queue.dead_letter_subject()],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        max_bytes: settings.dead_letter_max_bytes.unwrap_or(-1),
        max_age: settings.dead_letter_max_age.unwrap_or_default(),
        duplicate_window: settings.deduplication_window,
        ..Default::default()
    }
}

/// The events stream: captures the `MAX_DELIVERIES` advisories of the queue's consumers, so a
/// job exhausted by crashes or timeouts (no handler ever reported) is remembered even while no
/// dispatcher runs. Work-queue retention: an advisory is gone once the dispatcher acked it.
pub fn events_stream_config(queue: &QueueRef, settings: &QueueSettings) -> stream::Config {
    stream::Config {
        name: queue.events_stream(),
        description: Some(format!(
            "Conveyor advisories of {}/{} for the dispatcher",
            queue.namespace, queue.name
        )),
        subjects: vec![queue.max_deliveries_advisories()],
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::Old,
        storage: storage_type(settings.storage),
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// The durable pull consumer of one priority level: explicit acks, `max_deliver` =
/// `maxAttempts`, `ack_wait` = `timeout` (workers heartbeat to extend it).
pub fn consumer_config(
    queue: &QueueRef,
    level: u8,
    settings: &QueueSettings,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(queue.consumer(level)),
        description: Some(format!("Conveyor workers, priority {level}")),
        filter_subject: queue.job_subject(level),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: settings.timeout,
        max_deliver: i64::from(settings.max_attempts),
        max_ack_pending: settings.concurrency_limit.unwrap_or(-1),
        max_waiting: 4096,
        ..Default::default()
    }
}

/// Creates the queue's streams (work, dead-letter, events) and consumers, or updates them to
/// match `settings`.
pub async fn ensure_queue(
    jetstream: &jetstream::Context,
    queue: &QueueRef,
    settings: &QueueSettings,
) -> Result<(), AdminError> {
    settings.validate()?;
    crate::protocol::check_server_version(&jetstream.client().server_info().version)?;
    for config in [
        delayed_stream_config(queue, settings),
        cancel_stream_config(queue, settings),
        stream_config(queue, settings),
        dead_letter_stream_config(queue, settings),
        events_stream_config(queue, settings),
        results_stream_config(queue, settings),
        waiting_stream_config(queue, settings),
        flow_stream_config(queue, settings),
    ]
    .into_iter()
    .chain(tokens_stream_config(queue, settings))
    {
        let name = config.name.clone();
        jetstream
            .create_or_update_stream(config)
            .await
            .map_err(|source| AdminError::Stream {
                stream: name,
                source,
            })?;
    }
    let stream = jetstream
        .get_stream(queue.stream())
        .await
        .map_err(|source| AdminError::GetStream {
            stream: queue.stream(),
            source,
        })?;
    for level in 0..settings.priorities {
        stream
            .create_consumer(consumer_config(queue, level, settings))
            .await
            .map_err(|source| AdminError::Consumer {
                stream: queue.stream(),
                consumer: queue.consumer(level),
                source,
            })?;
    }
    Ok(())
}

fn storage_type(storage: Storage) -> stream::StorageType {
    match storage {
        Storage::File => stream::StorageType::File,
        Storage::Memory => stream::StorageType::Memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_has_one_subject_per_level_and_refuses_when_full() {
        let queue = QueueRef::new("team-a", "emails");
        let settings = QueueSettings {
            priorities: 3,
            max_jobs: Some(10),
            ..Default::default()
        };
        let config = stream_config(&queue, &settings);
        assert_eq!(config.name, "conveyor_team-a_emails");
        assert_eq!(
            config.subjects,
            [
                "conveyor.team-a.emails.jobs.0",
                "conveyor.team-a.emails.jobs.1",
                "conveyor.team-a.emails.jobs.2"
            ]
        );
        assert_eq!(config.discard, stream::DiscardPolicy::New);
        assert_eq!(config.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(config.max_messages, 10);
    }

    #[test]
    fn delayed_stream_allows_schedules_and_feeds_the_work_stream() {
        let queue = QueueRef::new("ns", "q");
        let settings = QueueSettings {
            priorities: 2,
            ..Default::default()
        };
        let delayed = delayed_stream_config(&queue, &settings);
        assert_eq!(delayed.name, "conveyor_ns_q_delayed");
        assert_eq!(
            delayed.subjects,
            [
                "conveyor.ns.q.delayed.*",
                "conveyor.ns.q.due.0",
                "conveyor.ns.q.due.1",
                "conveyor.ns.q.schedule.*",
                "conveyor.ns.q.tick.*.*",
                "conveyor.ns.q.hold.*.*"
            ]
        );
        assert!(delayed.allow_message_schedules);
        assert_eq!(delayed.discard, stream::DiscardPolicy::Old);
        let work = stream_config(&queue, &settings);
        let sources = work.sources.expect("the work stream sources due jobs");
        assert_eq!(sources[0].name, "conveyor_ns_q_delayed");
        assert_eq!(
            sources[0].subject_transforms[0].source,
            "conveyor.ns.q.due.*"
        );
        assert_eq!(
            sources[0].subject_transforms[0].destination,
            "conveyor.ns.q.jobs.{{wildcard(1)}}"
        );
        assert_eq!(
            queue.delayed_subject("a.b"),
            "conveyor.ns.q.delayed.612e62",
            "the id is hex-encoded into one token"
        );
    }

    #[test]
    fn consumer_follows_retry_and_timeout() {
        let queue = QueueRef::new("ns", "q");
        let settings = QueueSettings {
            max_attempts: 7,
            timeout: Duration::from_secs(9),
            ..Default::default()
        };
        let config = consumer_config(&queue, 2, &settings);
        assert_eq!(config.durable_name.as_deref(), Some("workers-p2"));
        assert_eq!(config.filter_subject, "conveyor.ns.q.jobs.2");
        assert_eq!(config.max_deliver, 7);
        assert_eq!(config.ack_wait, Duration::from_secs(9));
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        assert!(
            QueueSettings {
                priorities: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            QueueSettings {
                priorities: 11,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            QueueSettings {
                max_attempts: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(QueueSettings::default().validate().is_ok());
    }

    #[test]
    fn deduplication_window_fits_within_max_age() {
        let day = Duration::from_secs(86_400);
        let settings = QueueSettings {
            deduplication_window: day,
            ..Default::default()
        };
        assert!(settings.validate().is_ok());
        assert_eq!(
            stream_config(&QueueRef::new("ns", "q"), &settings).duplicate_window,
            day
        );
        let err = QueueSettings {
            max_age: Some(Duration::from_secs(3600)),
            ..settings
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid queue settings: deduplicationWindow (86400s) is longer than stream.maxAge (3600s): JetStream cannot remember a job id longer than it keeps jobs"
        );
    }
}
