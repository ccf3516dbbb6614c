//! The `Workflow` controller: checks what the CRD's schema cannot (a cycle in `dependsOn`, CEL
//! that does not compile, a timeout that does not parse — `conveyor::workflow::validate` —
//! and JobQueues that do not exist, including the namespace's run queue [`RUN_QUEUE`]) and
//! reports it in `Ready`, with an Event on each transition. Runs themselves live in JetStream,
//! not here (`docs/workflows.md`).

pub mod engine;

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::names::QueueRef;
use conveyor::workflow::{self as flow, Definition};
use conveyor_crds::{JobQueue, Workflow, WorkflowStatus};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::predicates;
use kube::{Api, Resource, ResourceExt};
use tracing::instrument;

use crate::conditions::{self, READY, Status};
use crate::context::{Context, FIELD_MANAGER, Shared};
use crate::guarded;

/// The namespace's run queue (the SDK owns the name: it is part of the protocol). Declared by
/// the user, like any queue, so it has the usual streams, releaser and dead-letter tools.
pub use conveyor::workflow::engine::RUN_QUEUE;
const CONTROLLER: &str = "workflow";

/// Reasons of the `Ready` condition.
pub mod reason {
    /// Runs can be started.
    pub const VALID: &str = "Valid";
    /// The graph or an expression is wrong (the message says where).
    pub const INVALID_WORKFLOW: &str = "InvalidWorkflow";
    /// A step's (or `onFailure`'s, or the run) queue does not exist.
    pub const QUEUE_NOT_FOUND: &str = "QueueNotFound";
}

/// Why a reconcile failed; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a JobQueue failed.
    #[error("cannot read JobQueue {queue}: {source}")]
    GetQueue {
        /// `ns/name`.
        queue: String,
        /// Kubernetes error.
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("cannot write status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::GetQueue { .. } => "get_queue",
            Self::Status(_) => "kube",
        }
    }
}

/// A Workflow as stored (a malformed one is an `Err`, see [`guarded`]).
pub type Stored = DeserializeGuard<Workflow>;
/// What the reconciles share.
pub type Workflows = Shared<Workflow, ()>;

fn api<K>(ctx: &Context) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
}

/// Shortest wait between two checks for the Workflow CRD.
const CRD_PROBE: Duration = Duration::from_secs(10);

/// Runs the Workflow controller until `shutdown` resolves, once the API server serves
/// Workflows (an older chart without the CRD keeps the other controllers running).
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let served = async {
        let probe = kube::api::ListParams::default().limit(1);
        let mut said = false;
        loop {
            match api::<Workflow>(&ctx).list_metadata(&probe).await {
                Ok(_) => return,
                Err(err) if !said => {
                    tracing::info!(%err, "Workflows are not served (CRD not installed?); checking again");
                    said = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(ctx.config.resync.max(CRD_PROBE)).await;
        }
    };
    let mut shutdown = Box::pin(shutdown);
    tokio::select! {
        () = served => {}
        () = &mut shutdown => return,
    }
    let shared = Arc::new(Shared::new(ctx.clone()));
    // Status writes do not change the generation, so they do not retrigger a reconcile.
    let (controller, _) = guarded::controller(api::<Stored>(&ctx), predicates::generation);
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, shared)
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(%err, "workflow reconcile ended with an error");
            }
            std::future::ready(())
        })
        .await;
}

/// Retries transient errors with per-object exponential backoff.
pub fn error_policy(stored: Arc<Stored>, err: &Error, shared: Arc<Workflows>) -> Action {
    shared.ctx.metrics.failed(CONTROLLER, err.label());
    let delay = match &stored.0 {
        Ok(w) => shared.states.backoff(w, shared.ctx.config.resync),
        Err(_) => shared.ctx.config.resync,
    };
    tracing::warn!(%err, ?delay, name = stored.name_any(), "workflow reconcile failed, retrying");
    Action::requeue(delay)
}

/// What the checks found: `Ok` (runs can start) or the reason and message of `Ready=False`.
pub type Verdict = Result<(), (&'static str, String)>;

/// The definition a run of `spec` pins (the same JSON).
pub fn definition(workflow: &Workflow) -> Definition {
    serde_json::to_value(&workflow.spec)
        .and_then(serde_json::from_value)
        .unwrap_or_else(|_| Definition {
            steps: Vec::new(),
            on_failure: None,
            output: None,
        })
}

/// The checks that need nothing but the spec of Workflow `name`: [`flow::validate`], and that
/// sub-runs are of `name` itself (the only kind supported); every problem in one message.
pub fn check(name: &str, definition: &Definition) -> Verdict {
    let mut text: Vec<String> = flow::validate(definition)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.0)
        .collect();
    if let Err(problem) = conveyor::workflow::engine::check_workflow_name(name) {
        text.push(problem);
    }
    for step in &definition.steps {
        if let Some(other) = step.workflow.as_deref().filter(|w| *w != name) {
            text.push(format!(
                "step {:?}: a sub-run of another workflow ({other}) is not supported yet",
                step.name
            ));
        }
    }
    if text.is_empty() {
        Ok(())
    } else {
        Err((reason::INVALID_WORKFLOW, text.join("; ")))
    }
}

/// Every queue a run of `definition` in `namespace` uses, with who uses it: the run queue,
/// each step's, `onFailure`'s; each queue once, in that order.
pub fn queues(definition: &Definition, namespace: &str) -> Vec<(String, QueueRef)> {
    let mut out: Vec<(String, QueueRef)> =
        vec![("runs".into(), QueueRef::new(namespace, RUN_QUEUE))];
    let used = definition
        .steps
        .iter()
        .filter(|s| !s.queue.is_empty())
        .map(|s| (format!("step {}", s.name), s.queue.as_str()))
        .chain(
            definition
                .on_failure
                .iter()
                .map(|f| ("onFailure".to_string(), f.queue.as_str())),
        );
    for (user, queue) in used {
        let queue = flow::engine::step_queue(namespace, queue);
        if !out.iter().any(|(_, q)| q == &queue) {
            out.push((user, queue));
        }
    }
    out
}

/// Reconciles one Workflow: checks it and writes `Ready`.
#[instrument(skip(stored, shared), fields(namespace = stored.namespace(), name = stored.name_any()))]
pub async fn reconcile(stored: Arc<Stored>, shared: Arc<Workflows>) -> Result<Action, Error> {
    let ctx = &shared.ctx;
    let Some(w) = guarded::report(&stored, CONTROLLER, ctx).await else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let ns = w.namespace().unwrap_or_default();
    let definition = definition(&w);
    let mut verdict = check(&w.name_any(), &definition);
    if verdict.is_ok() {
        let mut missing = Vec::new();
        for (user, queue) in queues(&definition, &ns) {
            let api: Api<JobQueue> = Api::namespaced(ctx.client.clone(), &queue.namespace);
            match api.get_opt(&queue.name).await {
                Ok(Some(_)) => {}
                Ok(None) => missing.push(format!(
                    "JobQueue {}/{} ({user}) does not exist",
                    queue.namespace, queue.name
                )),
                Err(source) => {
                    return Err(Error::GetQueue {
                        queue: format!("{}/{}", queue.namespace, queue.name),
                        source,
                    });
                }
            }
        }
        if !missing.is_empty() {
            verdict = Err((reason::QUEUE_NOT_FOUND, missing.join("; ")));
        }
    }
    let old = w.status.clone().unwrap_or_default();
    let new = status(&old, w.meta().generation, &verdict, Timestamp::now());
    if new != old {
        let api: Api<Workflow> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": Workflow::api_version(&()),
            "kind": Workflow::kind(&()),
            "status": new,
        });
        api.patch_status(
            &w.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Status)?;
        let was =
            conditions::find(&old.conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
        let now =
            conditions::find(&new.conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
        if was != now {
            let (type_, reason, note) = match &verdict {
                Ok(()) => (
                    EventType::Normal,
                    reason::VALID,
                    "runs can be started".to_string(),
                ),
                Err((reason, message)) => (EventType::Warning, *reason, message.clone()),
            };
            ctx.event(&*w, type_, reason, note).await;
        }
    }
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    shared.states.succeeded(&w);
    Ok(match verdict {
        // A missing queue may be created later: look again at the resync period.
        Err((reason::QUEUE_NOT_FOUND, _)) => Action::requeue(ctx.config.resync),
        _ => Action::await_change(),
    })
}

/// The status for `verdict`, keeping `lastTransitionTime` when `Ready` did not change.
pub fn status(
    old: &WorkflowStatus,
    generation: Option<i64>,
    verdict: &Verdict,
    now: Timestamp,
) -> WorkflowStatus {
    let mut new = old.clone();
    new.observed_generation = generation;
    let (state, reason, message) = match verdict {
        Ok(()) => (
            Status::True,
            reason::VALID,
            "runs can be started".to_string(),
        ),
        Err((reason, message)) => (Status::False, *reason, message.clone()),
    };
    conditions::set(
        &mut new.conditions,
        READY,
        state,
        reason,
        message,
        generation,
        now,
    );
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workflow(spec: serde_json::Value) -> Workflow {
        Workflow::new("social", serde_json::from_value(spec).unwrap())
    }

    #[test]
    fn a_cycle_is_invalid_and_named() {
        let w = workflow(json!({"steps": [
            {"name": "a", "queue": "q", "dependsOn": ["b"]},
            {"name": "b", "queue": "q", "dependsOn": ["a"]}
        ]}));
        assert_eq!(
            check("social", &definition(&w)),
            Err((
                reason::INVALID_WORKFLOW,
                "dependsOn has a cycle: a → b → a".to_string()
            ))
        );
    }

    #[test]
    fn bad_cel_is_invalid_and_every_problem_is_told() {
        let w = workflow(json!({"steps": [
            {"name": "a", "queue": "q", "when": "input.x =="},
            {"name": "b", "queue": "q", "forEach": "[1,"}
        ]}));
        let Err((reason, message)) = check("social", &definition(&w)) else {
            panic!("bad CEL passed");
        };
        assert_eq!(reason, reason::INVALID_WORKFLOW);
        assert!(
            message.contains("step \"a\": when: does not compile"),
            "{message}"
        );
        assert!(
            message.contains("; step \"b\": forEach: does not compile"),
            "{message}"
        );
    }

    #[test]
    fn a_workflow_named_with_a_dot_is_refused() {
        let w = workflow(json!({"steps": [{"name": "a", "queue": "q"}]}));
        let (reason, message) = check("a.b", &definition(&w)).unwrap_err();
        assert_eq!(reason, reason::INVALID_WORKFLOW);
        assert!(message.contains("must be a DNS label"), "{message}");
    }

    #[test]
    fn a_sub_run_of_another_workflow_is_refused_and_its_step_needs_no_queue() {
        let w = workflow(json!({"steps": [
            {"name": "own", "workflow": "social"},
            {"name": "other", "workflow": "billing"}
        ]}));
        assert_eq!(
            check("social", &definition(&w)),
            Err((
                reason::INVALID_WORKFLOW,
                "step \"other\": a sub-run of another workflow (billing) is not supported yet"
                    .to_string()
            ))
        );
        assert_eq!(queues(&definition(&w), "ns").len(), 1, "the run queue only");
    }

    #[test]
    fn the_queues_a_run_uses_are_listed_once_each() {
        let w = workflow(json!({
            "steps": [
                {"name": "a", "queue": "q"},
                {"name": "b", "queue": "other/q2"},
                {"name": "c", "queue": "q"}
            ],
            "onFailure": {"queue": "notify"}
        }));
        let found: Vec<(String, String)> = queues(&definition(&w), "ns")
            .into_iter()
            .map(|(user, q)| (user, format!("{}/{}", q.namespace, q.name)))
            .collect();
        let want = [
            ("runs", "ns/workflow-runs"),
            ("step a", "ns/q"),
            ("step b", "other/q2"),
            ("onFailure", "ns/notify"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(u, q)| (u.to_string(), q.to_string()))
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn ready_keeps_its_transition_time_while_it_holds() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let bad: Verdict = Err((
            reason::QUEUE_NOT_FOUND,
            "JobQueue ns/q (step a) does not exist".into(),
        ));
        let first = status(&WorkflowStatus::default(), Some(1), &bad, t0);
        let again = status(&first, Some(1), &bad, t1);
        assert_eq!(first, again, "nothing changed, nothing to write");
        let good = status(&again, Some(2), &Ok(()), t1);
        let ready = conditions::find(&good.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", reason::VALID)
        );
        assert_eq!(ready.last_transition_time.0, t1);
        assert_eq!(good.observed_generation, Some(2));
    }
}
