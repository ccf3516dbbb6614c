//! What a running job can do with jobs that wait for jobs: read its dependencies' results,
//! spawn children, read its children's results (a continuation), see [`crate::flow`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream;

use crate::client::{Client, Job, SubmitAck, SubmitError};
use crate::flow::{self, ChildResult, DependencyResult, FlowError, JobRef};
use crate::names::QueueRef;
use crate::protocol::flow::{self as headers, FlowHeaders};

/// A delivered job's place among jobs that wait for jobs.
#[derive(Debug, Clone)]
pub struct JobFlow {
    jetstream: Option<jetstream::Context>,
    /// This job.
    me: JobRef,
    /// Its flow headers.
    headers: FlowHeaders,
    /// Children spawned by this attempt.
    spawned: Arc<AtomicU64>,
    /// `Conveyor-Failed-Dependencies` / `Conveyor-Skipped-Dependencies` as given.
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl Default for JobFlow {
    fn default() -> Self {
        Self {
            jetstream: None,
            me: JobRef::new("", "", ""),
            headers: FlowHeaders::default(),
            spawned: Arc::default(),
            failed: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

/// A list header as its items.
fn items(headers: &async_nats::HeaderMap, name: &str) -> Vec<String> {
    headers
        .get(name)
        .map(|v| {
            v.as_str()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The refusal of a child spawned by a job that no worker delivered (no server to spawn on).
fn cannot_spawn(job: Job) -> SubmitError {
    SubmitError::BadDependencies {
        id: job.id,
        problem: "this job was not delivered by a worker, so it cannot spawn".into(),
    }
}

impl JobFlow {
    pub(super) fn new(
        jetstream: jetstream::Context,
        me: JobRef,
        headers: FlowHeaders,
        raw: &async_nats::HeaderMap,
    ) -> Self {
        Self {
            jetstream: Some(jetstream),
            me,
            headers,
            spawned: Arc::default(),
            failed: items(raw, headers::FAILED_DEPENDENCIES),
            skipped: items(raw, headers::SKIPPED_DEPENDENCIES),
        }
    }

    /// This job's reference.
    pub fn me(&self) -> &JobRef {
        &self.me
    }

    /// The job's flow headers (dependencies, parent, children, what it continues).
    pub fn headers(&self) -> &FlowHeaders {
        &self.headers
    }

    /// The `if-failed=run` dependencies that failed (the job runs in spite of them).
    pub fn failed_dependencies(&self) -> &[String] {
        &self.failed
    }

    /// The optional dependencies that were skipped.
    pub fn skipped_dependencies(&self) -> &[String] {
        &self.skipped
    }

    fn jetstream(&self) -> Result<&jetstream::Context, FlowError> {
        self.jetstream.as_ref().ok_or_else(|| FlowError::Consumer {
            stream: String::new(),
            reason: "this job was not delivered by a worker".into(),
        })
    }

    /// Each dependency's outcome and result (read from its queue's results stream; results
    /// larger than 64 KiB by reference).
    pub async fn dependencies(&self) -> Result<Vec<DependencyResult>, FlowError> {
        let client = self.jetstream()?.client();
        flow::dependency_results(&client, &self.headers.after).await
    }

    /// Submits `job` to `queue` as a child of this job (any queue of the server). A handler
    /// that then returns [`super::Outcome::Continue`] goes on once every child it spawned has
    /// finished. Child ids should be derived from the parent's (a retried parent then spawns
    /// the same children, which deduplication absorbs) and unique among its children.
    pub async fn spawn(&self, queue: &QueueRef, mut job: Job) -> Result<SubmitAck, SubmitError> {
        job.headers
            .insert(headers::PARENT, self.me.to_string().as_str());
        let Some(jetstream) = &self.jetstream else {
            return Err(cannot_spawn(job));
        };
        let ack = Client::new(jetstream.client()).submit(queue, job).await?;
        self.spawned.fetch_add(1, Ordering::Relaxed);
        Ok(ack)
    }

    /// [`JobFlow::spawn`] for many children, pipelined; one result per job, in order.
    pub async fn spawn_batch(
        &self,
        queue: &QueueRef,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Vec<Result<SubmitAck, SubmitError>> {
        let me = self.me.to_string();
        let jobs: Vec<Job> = jobs
            .into_iter()
            .map(|mut job| {
                job.headers.insert(headers::PARENT, me.as_str());
                job
            })
            .collect();
        let Some(jetstream) = &self.jetstream else {
            return jobs.into_iter().map(|job| Err(cannot_spawn(job))).collect();
        };
        let results = Client::new(jetstream.client())
            .submit_batch(queue, jobs)
            .await;
        let spawned = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.spawned.fetch_add(spawned, Ordering::Relaxed);
        results
    }

    /// Counts `n` children spawned by the handler itself (a handler process that published
    /// them with `Conveyor-Parent` set to this job), for the continuation.
    pub fn add_spawned(&self, n: u64) {
        self.spawned.fetch_add(n, Ordering::Relaxed);
    }

    /// Children spawned so far by this attempt.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    /// How many children the job this continuation runs for spawned (`Conveyor-Children`).
    pub fn children_expected(&self) -> Option<u64> {
        self.headers.children.as_ref().map(|c| c.1)
    }

    /// Up to `limit` finished children of the job this continuation runs for, after
    /// flow-stream sequence `after` (0 first; then the last page's last `sequence`). An empty
    /// page is the end.
    pub async fn children_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChildResult>, FlowError> {
        let client = self.jetstream()?.client();
        let parent = self.continued_parent();
        flow::children_page(&client, &parent, after, limit).await
    }

    /// The job whose children a continuation reads (`Conveyor-Children`), else this job.
    fn continued_parent(&self) -> JobRef {
        self.headers
            .children
            .as_ref()
            .map_or_else(|| self.me.clone(), |c| c.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_no_worker_delivered_cannot_spawn() {
        let flow = JobFlow::default();
        let queue = QueueRef::new("ns", "kids");
        let one = futures::executor::block_on(flow.spawn(&queue, Job::new("c1", "")));
        assert!(
            matches!(&one, Err(SubmitError::BadDependencies { id, .. }) if id == "c1"),
            "{one:?}"
        );
        let many = futures::executor::block_on(
            flow.spawn_batch(&queue, [Job::new("c2", ""), Job::new("c3", "")]),
        );
        let ids: Vec<_> = many
            .iter()
            .map(|r| match r {
                Err(SubmitError::BadDependencies { id, .. }) => id.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, ["c2", "c3"]);
        assert_eq!(flow.spawned(), 0, "nothing was spawned");
    }
}
