//! Cancelling a job with its children (`Conveyor-Cancel-Children`): whether one of a job's
//! ancestors was cancelled so, read from the ancestors' own queues and remembered briefly.
//!
//! A job's parent is its `Conveyor-Parent`; the parent's parent is the `Conveyor-Parent` of the
//! parent's waiting continuation (`cont.<hex id>`: a job that spawned children and finished
//! waits there), and so on up. A child that has not finished keeps nothing of its own in the
//! store, so this walk upwards, done by the worker about to run a job, is what lets a
//! cancellation reach every level without a list of children anywhere.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::protocol::flow::{self, JobRef};
use crate::stored::{self, StoredError};

use super::ANCESTORS_REMEMBERED as REMEMBERED;
/// Ancestors walked at most (a cycle of parents, which a producer can write, ends here).
const MAX_DEPTH: usize = 32;
/// Ancestors remembered at most; past it the expired ones are forgotten, then all.
const MAX_REMEMBERED: usize = 4096;

/// What a worker read of an ancestor.
#[derive(Debug, Clone)]
struct Ancestor {
    /// It was cancelled with its children.
    cancelled: bool,
    /// Its own parent, as its waiting continuation names it.
    parent: Option<JobRef>,
}

/// What an ancestor that could not be read counts as.
const NOT_CANCELLED: Ancestor = Ancestor {
    cancelled: false,
    parent: None,
};

/// Ancestors read lately, by reference.
#[derive(Default)]
pub(super) struct Ancestry {
    known: Mutex<HashMap<JobRef, (Instant, Ancestor)>>,
}

impl Ancestry {
    /// The nearest ancestor of a job whose parent is `parent` that was cancelled with its
    /// children, if any, read within `deadline` (the walk runs before the job's heartbeats
    /// start). An ancestor that cannot be read (its queue's streams unreachable or not this
    /// identity's to read), or a walk past its deadline, counts as not cancelled, and is
    /// remembered so for [`REMEMBERED`] like any reading: the job runs, as it would without
    /// the option, and the next jobs of that parent do not wait again.
    pub(super) async fn cancelled(
        &self,
        client: &async_nats::Client,
        parent: &JobRef,
        deadline: Duration,
    ) -> Option<JobRef> {
        match tokio::time::timeout(deadline, self.walk(client, parent)).await {
            Ok(found) => found,
            Err(_) => {
                debug!(%parent, ?deadline, "reading a job's ancestors took too long; running it");
                self.remember(parent, &NOT_CANCELLED);
                None
            }
        }
    }

    async fn walk(&self, client: &async_nats::Client, parent: &JobRef) -> Option<JobRef> {
        let mut next = Some(parent.clone());
        for _ in 0..MAX_DEPTH {
            let current = next?;
            let ancestor = match self.remembered(&current) {
                Some(ancestor) => ancestor,
                None => match read(client, &current).await {
                    Ok(ancestor) => {
                        self.remember(&current, &ancestor);
                        ancestor
                    }
                    Err(error) => {
                        debug!(ancestor = %current, %error, "cannot read an ancestor's cancellation");
                        self.remember(&current, &NOT_CANCELLED);
                        return None;
                    }
                },
            };
            if ancestor.cancelled {
                return Some(current);
            }
            next = ancestor.parent;
        }
        None
    }

    fn remembered(&self, job: &JobRef) -> Option<Ancestor> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        known
            .get(job)
            .filter(|(read_at, _)| read_at.elapsed() < REMEMBERED)
            .map(|(_, ancestor)| ancestor.clone())
    }

    fn remember(&self, job: &JobRef, ancestor: &Ancestor) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= MAX_REMEMBERED {
            known.retain(|_, (read_at, _)| read_at.elapsed() < REMEMBERED);
            if known.len() >= MAX_REMEMBERED {
                known.clear();
            }
        }
        known.insert(job.clone(), (Instant::now(), ancestor.clone()));
    }
}

/// Reads `job`'s last cancellation and, unless it cancels its children, its parent.
async fn read(client: &async_nats::Client, job: &JobRef) -> Result<Ancestor, StoredError> {
    let queue = job.queue_ref();
    let cancellation = stored::last_if_stream(
        client,
        &queue.cancel_stream(),
        &queue.cancel_subject(&job.id),
    )
    .await?;
    if cancellation.is_some_and(|c| flow::cancels_children(&c.block().header_map())) {
        return Ok(Ancestor {
            cancelled: true,
            parent: None,
        });
    }
    let continuation = stored::last_if_stream(
        client,
        &queue.waiting_stream(),
        &queue.continuation_subject(&job.id),
    )
    .await?;
    let parent = continuation.and_then(|k| {
        let headers = k.block().header_map();
        let parent = headers.get(flow::PARENT)?;
        // A parent that cannot be read is no parent (the continuation's own worker
        // dead-letters it as malformed when it runs).
        JobRef::parse(parent.as_str(), (&job.namespace, &job.queue)).ok()
    });
    Ok(Ancestor {
        cancelled: false,
        parent,
    })
}
