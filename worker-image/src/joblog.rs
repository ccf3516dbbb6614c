//! One log line per finished attempt (job id, attempt, duration, outcome), as the quickstart
//! promises `kubectl logs <pod> -c handler` shows: an [`Observer`] that logs each attempt and
//! hands every event on to the observer it wraps (the metrics), so the runtime keeps one
//! observer.

use std::sync::Arc;
use std::time::Instant;

use conveyor::worker::{Disposition, JobReport, Observer};

/// Logs each finished attempt at `info`, then passes every event to `inner`.
#[derive(Debug)]
pub struct JobLog<O> {
    inner: Arc<O>,
}

impl<O: Observer> JobLog<O> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<O>) -> Arc<Self> {
        Arc::new(Self { inner })
    }
}

/// The outcome word of a log line: `done`, `retry in 2s`, `dead-lettered (exhausted)`,
/// `given back`, `cancelled`, `continued (waits for its children)`.
pub fn outcome(disposition: &Disposition) -> String {
    match disposition {
        Disposition::Acked => "done".to_owned(),
        Disposition::Retried { delay } => {
            format!("retry in {}", humantime::format_duration(*delay))
        }
        Disposition::DeadLettered { reason } => format!("dead-lettered ({reason})"),
        Disposition::GivenBack => "given back".to_owned(),
        Disposition::Cancelled => "cancelled".to_owned(),
        Disposition::Continued => "continued (waits for its children)".to_owned(),
    }
}

impl<O: Observer> Observer for JobLog<O> {
    fn started(&self, id: &str, sequence: u64, deadline: Option<Instant>) {
        self.inner.started(id, sequence, deadline);
    }

    fn finished(&self, report: &JobReport) {
        tracing::info!(
            job = %report.id,
            attempt = report.attempt,
            duration = %humantime::format_duration(millis(report.duration)),
            outcome = %outcome(&report.disposition),
            "job attempt finished"
        );
        self.inner.finished(report);
    }

    fn pulled(&self) {
        self.inner.pulled();
    }
}

/// A duration to the millisecond, so the line reads `1s 250ms`, not nanoseconds.
fn millis(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[derive(Default)]
    struct Count(AtomicU32);
    impl Observer for Count {
        fn finished(&self, _report: &JobReport) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn says_what_became_of_each_attempt_and_passes_it_on() {
        assert_eq!(outcome(&Disposition::Acked), "done");
        assert_eq!(
            outcome(&Disposition::Retried {
                delay: Duration::from_secs(2)
            }),
            "retry in 2s"
        );
        assert_eq!(
            outcome(&Disposition::DeadLettered {
                reason: "exhausted"
            }),
            "dead-lettered (exhausted)"
        );
        let inner = Arc::new(Count::default());
        let log = JobLog::new(inner.clone());
        log.finished(&JobReport {
            id: "job-1".into(),
            sequence: 1,
            attempt: 1,
            disposition: Disposition::Acked,
            duration: Duration::from_micros(1_250_300),
        });
        assert_eq!(inner.0.load(Ordering::Relaxed), 1);
        assert_eq!(
            millis(Duration::from_micros(1_250_300)),
            Duration::from_millis(1250)
        );
    }
}
