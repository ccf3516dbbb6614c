//! Dead-letter operations asked for declaratively, with an annotation on the `JobQueue`:
//!
//! ```sh
//! kubectl annotate jobqueue emails conveyor.dev/dlq-requeue=all
//! kubectl annotate jobqueue emails conveyor.dev/dlq-requeue=id=order-1234
//! kubectl annotate jobqueue emails conveyor.dev/dlq-purge=error=timeout
//! ```
//!
//! The operator carries the request out once (with `conveyor::dlq`, the same code as the CLI),
//! says what it did in an Event and in `status.lastDeadLetterRequest`, and removes the
//! annotation. A value it cannot read gets a Warning Event and is removed without touching any
//! dead letter; a request that fails for a transient reason (NATS unreachable) keeps its
//! annotation and is tried again.

use std::collections::HashMap;

use async_nats::jetstream;
use conveyor::dlq::{self, Selector};
use conveyor::names::QueueRef;
use conveyor_crds::{DeadLetterRequest, JobQueue};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::reasons;
use crate::context::Context;

/// Requeue dead letters: `all`, `id=<job id>` or `error=<text>`.
pub const REQUEUE_ANNOTATION: &str = "conveyor.dev/dlq-requeue";
/// Purge dead letters: `all`, `id=<job id>` or `error=<text>`.
pub const PURGE_ANNOTATION: &str = "conveyor.dev/dlq-purge";

/// The requests already carried out, per annotation: the queue's `resourceVersion` they were
/// carried out at. A reconcile can see an object from the cache that predates the operator's
/// own removal of the annotation; this keeps such a request from running twice. Part of the
/// queue's state, forgotten with it.
pub type Handled = HashMap<&'static str, String>;

/// Job ids named in an Event at most.
const IDS_SHOWN: usize = 5;

/// Reads an annotation value: `all`, `id=<job id>` or `error=<text>`.
pub fn parse(value: &str) -> Result<Selector, String> {
    let value = value.trim();
    if value == "all" {
        return Ok(Selector::All);
    }
    let invalid = || format!("{value:?} is not `all`, `id=<job id>` or `error=<text>`");
    match value.split_once('=') {
        Some(("id", id)) if !id.trim().is_empty() => Ok(Selector::One(id.trim().to_owned())),
        Some(("error", text)) if !text.trim().is_empty() => {
            Ok(Selector::ErrorMatch(text.trim().to_owned()))
        }
        _ => Err(invalid()),
    }
}

/// "3 dead letter(s) (a, b, c)", naming at most [`IDS_SHOWN`] ids.
fn summary(ids: &[String]) -> String {
    let shown: Vec<&str> = ids.iter().take(IDS_SHOWN).map(String::as_str).collect();
    let more = ids.len().saturating_sub(IDS_SHOWN);
    let mut text = format!("{} dead letter(s)", ids.len());
    if !shown.is_empty() {
        text.push_str(&format!(" ({}", shown.join(", ")));
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text.push(')');
    }
    text
}

/// Outcome of a request that was carried out.
pub const DONE: &str = "Done";
/// Outcome of a request whose value could not be read.
pub const INVALID: &str = "Invalid";
/// Outcome of a request for a job id that has no dead letter.
pub const NOT_FOUND: &str = "NotFound";

/// Carries out the requests annotated on `jq`, if any, and returns the record of the last one
/// handled (for `status.lastDeadLetterRequest`). Each request carried out or refused gets an
/// Event of its own and its annotation removed; `handled` remembers it meanwhile.
pub async fn handle(
    jq: &JobQueue,
    api: &Api<JobQueue>,
    ctx: &Context,
    js: &jetstream::Context,
    queue: &QueueRef,
    now: k8s_openapi::jiff::Timestamp,
    handled: &mut Handled,
) -> Option<DeadLetterRequest> {
    let mut last = None;
    for annotation in [REQUEUE_ANNOTATION, PURGE_ANNOTATION] {
        let Some(value) = jq.annotations().get(annotation) else {
            continue;
        };
        let version = jq.resource_version().unwrap_or_default();
        if handled.get(annotation) == Some(&version) {
            continue;
        }
        let record = |outcome: &str, jobs: usize, message: String| DeadLetterRequest {
            annotation: annotation.to_owned(),
            value: value.clone(),
            outcome: outcome.to_owned(),
            jobs: u64::try_from(jobs).unwrap_or(u64::MAX),
            message,
            time: Some(Time(now)),
        };
        let done = match parse(value) {
            Err(err) => {
                let note = format!("{annotation}: {err}; nothing was changed");
                ctx.event(
                    jq,
                    EventType::Warning,
                    reasons::INVALID_DEAD_LETTER_REQUEST,
                    note.clone(),
                )
                .await;
                record(INVALID, 0, note)
            }
            Ok(selector) => {
                let (moved, verb, done_reason) = if annotation == REQUEUE_ANNOTATION {
                    let moved = dlq::requeue(js, queue, &selector).await;
                    (moved, "requeued", reasons::DEAD_LETTERS_REQUEUED)
                } else {
                    let moved = dlq::purge(js, queue, &selector).await;
                    (moved, "purged", reasons::DEAD_LETTERS_PURGED)
                };
                match moved {
                    Ok(moved) => {
                        let note = format!("{annotation}={value}: {verb} {}", summary(&moved.jobs));
                        ctx.event(jq, EventType::Normal, done_reason, note.clone())
                            .await;
                        record(DONE, moved.jobs.len(), note)
                    }
                    Err(dlq::DlqError::NotFound(id)) => {
                        let note = format!(
                            "{annotation}={value}: no dead letter with job id {id:?}; nothing was changed"
                        );
                        ctx.event(
                            jq,
                            EventType::Warning,
                            reasons::DEAD_LETTER_NOT_FOUND,
                            note.clone(),
                        )
                        .await;
                        record(NOT_FOUND, 0, note)
                    }
                    Err(err) => {
                        let note = format!("{annotation}={value} failed, will retry: {err}");
                        ctx.event(
                            jq,
                            EventType::Warning,
                            reasons::DEAD_LETTER_REQUEST_FAILED,
                            note,
                        )
                        .await;
                        continue;
                    }
                }
            }
        };
        handled.insert(annotation, version);
        let patch = serde_json::json!({ "metadata": { "annotations": { annotation: null } } });
        if let Err(err) = api
            .patch(
                &jq.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(%err, annotation, "cannot remove a handled dead-letter request");
        }
        last = Some(done);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_into_selectors() {
        assert_eq!(parse("all"), Ok(Selector::All));
        assert_eq!(parse(" all "), Ok(Selector::All));
        assert_eq!(parse("id=order-1"), Ok(Selector::One("order-1".into())));
        assert_eq!(
            parse("error=connection refused"),
            Ok(Selector::ErrorMatch("connection refused".into()))
        );
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        for bad in ["", "everything", "id=", "error= ", "name=x"] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.contains("`all`, `id=<job id>` or `error=<text>`"),
                "{err}"
            );
        }
    }

    #[test]
    fn summaries_name_a_few_ids() {
        let ids: Vec<String> = (1..=7).map(|i| format!("j{i}")).collect();
        assert_eq!(summary(&[]), "0 dead letter(s)");
        assert_eq!(summary(&ids[..2]), "2 dead letter(s) (j1, j2)");
        assert_eq!(
            summary(&ids),
            "7 dead letter(s) (j1, j2, j3, j4, j5 and 2 more)"
        );
    }
}
