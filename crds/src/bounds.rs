//! The range of every duration and count in the specs, in one place. The schema attributes
//! (`minimum`/`maximum`), the CEL rules of the duration fields and the parse functions the
//! operator calls all read these, and `docs/crds.md` lists them.
//!
//! The ranges are generous for real use and small enough that nothing downstream overflows:
//! the largest duration (3650 days) is about 3·10¹⁷ ns, far inside the signed 64-bit nanosecond
//! counts JetStream and `jiff` use.

use crate::duration::Bounds;

/// `JobQueue` `timeout` (consumer `ack_wait`): a job silent for longer than a day is lost, not
/// slow; below a second every heartbeat would race the redelivery.
pub const TIMEOUT: Bounds = Bounds::new("1s", "24h");
/// `JobQueue` `stream.maxAge`: at least the work stream's 2-minute deduplication window
/// (JetStream refuses a shorter age), at most ten years.
pub const STREAM_MAX_AGE: Bounds = Bounds::new("2m", "3650d");
/// `JobQueue` `results.retention`.
pub const RESULT_RETENTION: Bounds = Bounds::new("1s", "3650d");
/// `JobQueue` `waitTimeout`: at most 30 days, the longest a job may wait for others.
pub const WAIT_TIMEOUT: Bounds = Bounds::new("1s", "30d");
/// `JobQueue` `retry.backoff.initial` and `retry.backoff.max`.
pub const BACKOFF: Bounds = Bounds::new("1ms", "24h");
/// `JobQueue` `alerts.maxOldestPendingAge`.
pub const MAX_OLDEST_PENDING_AGE: Bounds = Bounds::new("1s", "3650d");
/// `JobQueue` `alerts.failureWindow`.
pub const FAILURE_WINDOW: Bounds = Bounds::new("1s", "30d");
/// `JobQueue` `deduplicationWindow` (the work stream's `duplicate_window`): JetStream takes
/// 100ms up to the stream's `maxAge`; at least a second, at most ten years here. The server
/// keeps every job id of the window in memory, so a long window costs memory per job.
pub const DEDUPLICATION_WINDOW: Bounds = Bounds::new("1s", "3650d");
/// `Worker` `recycle.maxAge`.
pub const RECYCLE_MAX_AGE: Bounds = Bounds::new("1s", "365d");
/// `Worker` `scaling.scaleDownDelay`: 0 shrinks as soon as the backlog allows.
pub const SCALE_DOWN_DELAY: Bounds = Bounds::new("0s", "24h");

/// Most priority levels of a queue (each is a subject and a consumer).
pub const MAX_PRIORITIES: u8 = 10;
/// Most JetStream copies of a stream (JetStream's own limit for a replicated stream).
pub const MAX_STREAM_REPLICAS: u8 = 5;
/// Most jobs a stream may be limited to, and most pending jobs an alert threshold may allow.
pub const MAX_JOBS: i64 = 1_000_000_000_000;
/// Most bytes a stream may be limited to: 1 PiB.
pub const MAX_BYTES: i64 = 1 << 50;
/// Largest job size: 64 MiB, the NATS server's upper limit for `max_payload`.
pub const MAX_JOB_SIZE: i32 = 64 << 20;
/// Most deliveries of one job.
pub const MAX_ATTEMPTS: i32 = 1000;
/// Most jobs running at once across a queue (1000 pods of 1000 jobs).
pub const MAX_CONCURRENCY_LIMIT: i32 = 1_000_000;
/// Most jobs started per second across a queue.
pub const MAX_RATE_LIMIT: i32 = 100_000;
/// Most dead letters within the failure window that still count as healthy.
pub const MAX_FAILURES: i64 = 1_000_000_000;
/// Most pods of a worker pool (`replicas`, `scaling.minReplicas`/`maxReplicas`,
/// `recycle.maxUnavailable`).
pub const MAX_PODS: i32 = 1000;
/// Most jobs one pod runs at once.
pub const MAX_CONCURRENCY: i32 = 1000;
/// Most backlog one pod is expected to handle.
pub const MAX_TARGET_BACKLOG: i32 = 1_000_000;
/// Most jobs a worker runtime takes before it restarts (`recycle.maxJobs`).
pub const MAX_RECYCLE_JOBS: i64 = 1_000_000_000;

/// Every duration bound with its field, for tests and docs.
pub const DURATIONS: [(&str, Bounds); 11] = [
    ("spec.timeout", TIMEOUT),
    ("spec.stream.maxAge", STREAM_MAX_AGE),
    ("spec.results.retention", RESULT_RETENTION),
    ("spec.deduplicationWindow", DEDUPLICATION_WINDOW),
    ("spec.waitTimeout", WAIT_TIMEOUT),
    ("spec.retry.backoff.initial", BACKOFF),
    ("spec.retry.backoff.max", BACKOFF),
    ("spec.alerts.maxOldestPendingAge", MAX_OLDEST_PENDING_AGE),
    ("spec.alerts.failureWindow", FAILURE_WINDOW),
    ("spec.recycle.maxAge", RECYCLE_MAX_AGE),
    ("spec.scaling.scaleDownDelay", SCALE_DOWN_DELAY),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_parses_and_is_ordered() {
        for (field, b) in DURATIONS {
            assert!(b.min() <= b.max(), "{field}: {b:?}");
        }
    }
}
