//! Names of the JetStream assets that back a queue, and the environment the operator injects
//! into worker pods. Documented in `docs/protocol.md`; changing anything here is a protocol change.

/// Identifies one queue: the namespace and name of its `JobQueue` resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueRef {
    /// Kubernetes namespace of the `JobQueue`.
    pub namespace: String,
    /// Name of the `JobQueue`.
    pub name: String,
}

/// Kubernetes names may contain `.`, which separates NATS subject tokens and is not allowed in
/// stream names; `_` never occurs in a Kubernetes name, so mapping `.` to `_` stays unambiguous.
fn token(s: &str) -> String {
    s.replace('.', "_")
}

/// A job id as one subject token: its bytes in lowercase hex (ids may contain `.`, `*`, `>`).
pub(crate) fn hex_token(job_id: &str) -> String {
    job_id.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The text a [`hex_token`] stands for, if `token` is one.
pub(crate) fn unhex(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

impl QueueRef {
    /// A queue reference from namespace and name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The work stream: `conveyor_<namespace>_<queue>`.
    pub fn stream(&self) -> String {
        format!("conveyor_{}_{}", token(&self.namespace), token(&self.name))
    }

    /// The dead-letter stream: `conveyor_<namespace>_<queue>_dlq`.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_dlq", self.stream())
    }

    /// Subject prefix of every subject of this queue: `conveyor.<namespace>.<queue>`.
    pub fn subject_prefix(&self) -> String {
        format!("conveyor.{}.{}", token(&self.namespace), token(&self.name))
    }

    /// Subject a job of the given priority level is published to: `<prefix>.jobs.<level>`.
    /// Level 0 is the default and the lowest; higher levels are more urgent.
    pub fn job_subject(&self, priority: u8) -> String {
        format!("{}.jobs.{priority}", self.subject_prefix())
    }

    /// Wildcard matching every job subject of the queue (the work stream's subject filter).
    pub fn jobs_wildcard(&self) -> String {
        format!("{}.jobs.*", self.subject_prefix())
    }

    /// Subject of the dead-letter stream.
    pub fn dead_letter_subject(&self) -> String {
        format!("{}.dlq", self.subject_prefix())
    }

    /// The delayed-jobs stream: `conveyor_<namespace>_<queue>_delayed`. It holds the schedules
    /// of jobs that must not run before a given time; the work stream sources their due copies.
    pub fn delayed_stream(&self) -> String {
        format!("{}_delayed", self.stream())
    }

    /// Subject of a delayed job's schedule: `<prefix>.delayed.<hex of the job id>`. One
    /// schedule per subject: re-scheduling an id replaces its schedule, and cancelling purges it.
    pub fn delayed_subject(&self, job_id: &str) -> String {
        format!("{}.delayed.{}", self.subject_prefix(), hex_token(job_id))
    }

    /// The cancellations stream: `conveyor_<namespace>_<queue>_cancel`. It remembers for a
    /// while which jobs were cancelled, so a worker that receives one later skips it.
    pub fn cancel_stream(&self) -> String {
        format!("{}_cancel", self.stream())
    }

    /// Subject a job's cancellation is published to: `<prefix>.cancel.<hex of the job id>`.
    pub fn cancel_subject(&self, job_id: &str) -> String {
        format!("{}.cancel.{}", self.subject_prefix(), hex_token(job_id))
    }

    /// Wildcard matching every cancellation of the queue: `<prefix>.cancel.*`.
    pub fn cancels_wildcard(&self) -> String {
        format!("{}.cancel.*", self.subject_prefix())
    }

    /// Subject a delayed job of the given level appears on, in the delayed stream, once due:
    /// `<prefix>.due.<level>`. The work stream sources it as `<prefix>.jobs.<level>`.
    pub fn due_subject(&self, priority: u8) -> String {
        format!("{}.due.{priority}", self.subject_prefix())
    }

    /// Every delayed job's schedule subject: `<prefix>.delayed.*`.
    pub fn delayed_wildcard(&self) -> String {
        format!("{}.delayed.*", self.subject_prefix())
    }

    /// The results stream: `conveyor_<namespace>_<queue>_results`. It keeps each finished
    /// job's outcome (one per job id) for the queue's `results.retention`.
    pub fn results_stream(&self) -> String {
        format!("{}_results", self.stream())
    }

    /// Subject of a job's stored outcome: `<prefix>.results.<hex of the job id>`.
    pub fn result_subject(&self, job_id: &str) -> String {
        format!("{}.results.{}", self.subject_prefix(), hex_token(job_id))
    }

    /// Wildcard matching every stored outcome of the queue: `<prefix>.results.*`.
    pub fn results_wildcard(&self) -> String {
        format!("{}.results.*", self.subject_prefix())
    }

    /// The waiting stream: `conveyor_<namespace>_<queue>_waiting`. It holds the jobs of the
    /// queue that wait for other jobs (dependencies, or a continuation's children), one per
    /// subject, until the releaser moves them to the work stream or dead-letters them. Its
    /// message count is the queue's `waiting` figure.
    pub fn waiting_stream(&self) -> String {
        format!("{}_waiting", self.stream())
    }

    /// Subject of a job waiting for dependencies: `<prefix>.waiting.<hex of the job id>`.
    pub fn waiting_subject(&self, job_id: &str) -> String {
        format!("{}.waiting.{}", self.subject_prefix(), hex_token(job_id))
    }

    /// Subject of the continuation of job `parent_id`, waiting for the parent's children:
    /// `<prefix>.cont.<hex of the parent id>`.
    pub fn continuation_subject(&self, parent_id: &str) -> String {
        format!("{}.cont.{}", self.subject_prefix(), hex_token(parent_id))
    }

    /// The flow stream: `conveyor_<namespace>_<queue>_flow`. It keeps the edges to the jobs
    /// waiting for a job of this queue, the records of finished children of this queue's
    /// jobs, and one child count per parent.
    pub fn flow_stream(&self) -> String {
        format!("{}_flow", self.stream())
    }

    /// Subject of the edges of job `job_id` (one message per dependent, payload its full
    /// reference): `<prefix>.edge.<hex of the job id>`.
    pub fn edge_subject(&self, job_id: &str) -> String {
        format!("{}.edge.{}", self.subject_prefix(), hex_token(job_id))
    }

    /// Subject of the record of finished child `child` (`<namespace>/<queue>/<id>`) of job
    /// `parent_id`: `<prefix>.child.<hex of the parent id>.<hex of the child reference>`.
    pub fn child_subject(&self, parent_id: &str, child: &str) -> String {
        format!(
            "{}.child.{}.{}",
            self.subject_prefix(),
            hex_token(parent_id),
            hex_token(child)
        )
    }

    /// Every child record of job `parent_id`: `<prefix>.child.<hex of the parent id>.*`.
    pub fn children_wildcard(&self, parent_id: &str) -> String {
        format!("{}.child.{}.*", self.subject_prefix(), hex_token(parent_id))
    }

    /// Subject of the child count of job `parent_id` (the last message only is kept):
    /// `<prefix>.count.<hex of the parent id>`.
    pub fn count_subject(&self, parent_id: &str) -> String {
        format!("{}.count.{}", self.subject_prefix(), hex_token(parent_id))
    }

    /// The rate-limit tokens stream: `conveyor_<namespace>_<queue>_tokens`, for queues with a
    /// `rateLimit`. The operator adds tokens at the rate; a worker takes one per job it starts.
    pub fn tokens_stream(&self) -> String {
        format!("{}_tokens", self.stream())
    }

    /// Subject of the rate-limit tokens: `<prefix>.tokens`.
    pub fn tokens_subject(&self) -> String {
        format!("{}.tokens", self.subject_prefix())
    }

    /// Durable pull consumer all workers take tokens from: `rate`.
    pub fn tokens_consumer(&self) -> &'static str {
        "rate"
    }

    /// Durable pull consumer that workers share for one priority level: `workers-p<level>`.
    pub fn consumer(&self, priority: u8) -> String {
        format!("workers-p{priority}")
    }

    /// The events stream: `conveyor_<namespace>_<queue>_events`. It keeps the server's
    /// `MAX_DELIVERIES` advisories of the queue's consumers (which JetStream publishes
    /// fire-and-forget) until the dispatcher has dead-lettered the job they name.
    pub fn events_stream(&self) -> String {
        format!("{}_events", self.stream())
    }

    /// Subjects of the `MAX_DELIVERIES` advisories of every consumer of the work stream:
    /// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.*`.
    pub fn max_deliveries_advisories(&self) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            self.stream()
        )
    }
}

/// Durable consumer of the events stream through which the operator's dispatcher reads the
/// advisories.
pub const DISPATCHER_CONSUMER: &str = "dispatcher";
/// Durable consumers of the releaser (`conveyor::flow`) on the waiting, results and flow
/// streams of a queue.
pub const RELEASER_CONSUMER: &str = "releaser";
/// Queue group of the wake-up subscriptions of idle multi-level workers on a queue's job
/// subjects: each published job wakes one idle worker, not all of them (and a message the NATS
/// client cannot read reaches one of them, not every idle one).
pub const WAKE_GROUP: &str = "conveyor-wake";

/// Environment variables the operator sets in worker pods and the runtime reads.
pub mod env {
    /// NATS server URL(s), comma-separated.
    pub const NATS_URL: &str = "CONVEYOR_NATS_URL";
    /// Path to a NATS credentials file (mounted from a Secret), optional.
    pub const NATS_CREDS: &str = "CONVEYOR_NATS_CREDS";
    /// Namespace of the `JobQueue`.
    pub const QUEUE_NAMESPACE: &str = "CONVEYOR_QUEUE_NAMESPACE";
    /// Name of the `JobQueue`.
    pub const QUEUE_NAME: &str = "CONVEYOR_QUEUE";
    /// Number of priority levels of the queue.
    pub const PRIORITIES: &str = "CONVEYOR_PRIORITIES";
    /// Jobs one pod runs at once.
    pub const CONCURRENCY: &str = "CONVEYOR_CONCURRENCY";
    /// How jobs reach user code: `exec`, `jsonl` or `http`.
    pub const HANDLER_MODE: &str = "CONVEYOR_HANDLER_MODE";
    /// Base URL of the handler for `http` mode.
    pub const HANDLER_URL: &str = "CONVEYOR_HANDLER_URL";
    /// Pod name, for failure reports.
    pub const POD_NAME: &str = "CONVEYOR_POD_NAME";
    /// Address the runtime serves health and metrics on.
    pub const HEALTH_ADDR: &str = "CONVEYOR_HEALTH_ADDR";
    /// Longest time in-flight jobs may take after SIGTERM before they are given back (`25s`).
    pub const DRAIN_TIMEOUT: &str = "CONVEYOR_DRAIN_TIMEOUT";
    /// How long a cancelled running job's handler may take to wind down before it is stopped
    /// (`5s`); `exec` handlers get SIGTERM at once and SIGKILL after it.
    pub const CANCEL_GRACE: &str = "CONVEYOR_CANCEL_GRACE";
    /// Default timeout of one attempt when the job sets none (`5m`); unset means none.
    pub const JOB_TIMEOUT: &str = "CONVEYOR_JOB_TIMEOUT";
    /// Longest single wait for new jobs (`5s`).
    pub const POLL_WAIT: &str = "CONVEYOR_POLL_WAIT";
    /// Delay after the first failed attempt (`1s`).
    pub const BACKOFF_INITIAL: &str = "CONVEYOR_BACKOFF_INITIAL";
    /// Longest delay between attempts (`5m`).
    pub const BACKOFF_MAX: &str = "CONVEYOR_BACKOFF_MAX";
    /// Growth factor of the delay per attempt (`2`).
    pub const BACKOFF_MULTIPLIER: &str = "CONVEYOR_BACKOFF_MULTIPLIER";
    /// Relative jitter of the delay, 0 to 1 (`0.2`).
    pub const BACKOFF_JITTER: &str = "CONVEYOR_BACKOFF_JITTER";
    /// After taking this many jobs the runtime starts over as a fresh process in place.
    pub const MAX_JOBS: &str = "CONVEYOR_MAX_JOBS";
    /// Log format of the runtime: `text` or `json`.
    pub const LOG_FORMAT: &str = "CONVEYOR_LOG_FORMAT";
    /// `true`: the runtime takes a rate-limit token per job it starts (queues with `rateLimit`).
    pub const RATE_LIMITED: &str = "CONVEYOR_RATE_LIMITED";
    /// `true`: the runtime stores each finished job's outcome in the queue's results stream.
    pub const STORE_RESULTS: &str = "CONVEYOR_STORE_RESULTS";
    /// File the runtime keeps the ids of its running jobs in (the container's termination
    /// message file), so a pod that dies mid-job says which job it ran.
    pub const TERMINATION_MESSAGE_PATH: &str = "CONVEYOR_TERMINATION_MESSAGE_PATH";
}

/// Environment the runtime gives a handler process in `exec` mode.
pub mod handler_env {
    /// The job's id.
    pub const JOB_ID: &str = "CONVEYOR_JOB_ID";
    /// This attempt's number, 1 for the first.
    pub const JOB_ATTEMPT: &str = "CONVEYOR_JOB_ATTEMPT";
    /// Attempts allowed in total.
    pub const JOB_MAX_ATTEMPTS: &str = "CONVEYOR_JOB_MAX_ATTEMPTS";
    /// The job's reference `<namespace>/<queue>/<id>` (the `Conveyor-Parent` of children it
    /// spawns).
    pub const JOB_REF: &str = "CONVEYOR_JOB_REF";
    /// The job's dependencies' outcomes, a JSON array (`protocol::HandlerDependency`), results
    /// up to 1 KiB inline; set only for a job with dependencies.
    pub const DEPENDENCIES: &str = "CONVEYOR_DEPENDENCIES";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_tokens_decode() {
        assert_eq!(unhex(&hex_token("a.b/c")), Some("a.b/c".into()));
        assert_eq!(unhex("6"), None);
        assert_eq!(unhex("zz"), None);
    }
}
