//! Paged peeks at the jobs a queue holds (pending by priority level, delayed; the reads are
//! `conveyor::peek`'s) and the bulk dead-letter actions. Each request reads at most one page of
//! jobs from NATS, found by subject and sequence: never a scan of the stream.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use conveyor::dlq::{self, Selector};
use conveyor::peek::{self, Jobs, PeekError, Peeked};
use serde::{Deserialize, Serialize};

use super::DashboardState;
use super::api::{Action, Failure, bad_gateway, cut, dlq_failure, limit, queue_nats};
use super::refuse_write;

/// Jobs in one peek when the request names no limit, and at most.
const PEEK_LIMIT: (usize, usize) = (20, 100);
/// Dead letters one bulk request reads (and acts on, when they match) before it answers.
const BULK_PAGE: usize = 100;
/// Headers shown of one peeked job.
const SHOWN_HEADERS: usize = 16;

/// `?level=&from=&limit=` of a peek.
#[derive(Debug, Deserialize)]
pub struct PeekQuery {
    /// Priority level of the pending jobs (0 when absent); ignored for delayed jobs.
    level: Option<u8>,
    /// First stream sequence to read.
    from: Option<u64>,
    limit: Option<usize>,
}

/// One job as peeked: where it is stored and what its headers say, not its payload.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeekedJob {
    sequence: u64,
    job_id: String,
    size: usize,
    stored_at: String,
    /// Pending jobs: delivered to a worker at least once and not acked yet (running, or
    /// waiting for its retry); `false` means no worker has taken it yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<bool>,
    /// Delayed jobs: the schedule (`@at <time>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    run_at: Option<String>,
    /// A protocol rule the job breaks (a worker will dead-letter it as `malformed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    malformed: Option<String>,
    headers: Vec<(String, String)>,
}

/// One page of peeked jobs.
#[derive(Debug, Serialize)]
pub struct PeekPage {
    items: Vec<PeekedJob>,
    /// `from` of the next page; absent after the last.
    next: Option<u64>,
}

fn view(job: Peeked) -> PeekedJob {
    let headers = job
        .headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values.iter().map(move |v| (cut(name), cut(v.as_str())))
        })
        .take(SHOWN_HEADERS)
        .collect();
    PeekedJob {
        sequence: job.sequence,
        job_id: cut(&job.id),
        size: job.size,
        stored_at: cut(&job.stored_at),
        delivered: job.delivered,
        run_at: job.run_at.as_deref().map(cut),
        malformed: job.malformed.as_deref().map(cut),
        headers,
    }
}

/// One page of `jobs` of the queue as the API answers it.
async fn peek_page(
    state: &DashboardState,
    namespace: &str,
    name: &str,
    jobs: impl FnOnce(u8) -> Result<Jobs, Failure>,
    query: &PeekQuery,
) -> Result<Json<PeekPage>, Failure> {
    let (queue, js, priorities) = queue_nats(state, namespace, name).await?;
    let jobs = jobs(priorities)?;
    let limit = limit(query.limit, PEEK_LIMIT);
    let (found, next) = peek::page(&js, &queue, jobs, query.from.unwrap_or(1), limit)
        .await
        .map_err(|e| match e {
            PeekError::NoLevel { .. } => Failure(StatusCode::NOT_FOUND, e.to_string()),
            other => bad_gateway(other),
        })?;
    Ok(Json(PeekPage {
        items: found.into_iter().map(view).collect(),
        next,
    }))
}

/// The pending jobs of one priority level, oldest first.
pub async fn pending(
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PeekQuery>,
) -> Result<Json<PeekPage>, Failure> {
    let level = query.level.unwrap_or(0);
    let jobs = |priorities: u8| {
        if level < priorities {
            Ok(Jobs::Pending(level))
        } else {
            Err(Failure(
                StatusCode::BAD_REQUEST,
                format!(
                    "queue {namespace}/{name} has priority levels 0 to {}",
                    priorities.saturating_sub(1)
                ),
            ))
        }
    };
    peek_page(&state, &namespace, &name, jobs, &query).await
}

/// The delayed jobs (not yet due), in the order they were submitted.
pub async fn delayed(
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PeekQuery>,
) -> Result<Json<PeekPage>, Failure> {
    peek_page(&state, &namespace, &name, |_| Ok(Jobs::Delayed), &query).await
}

/// `?match=&from=&until=` of a bulk dead-letter action.
#[derive(Debug, Deserialize)]
pub struct BulkQuery {
    /// Text the error or reason contains (case-insensitive); absent or empty: every one.
    r#match: Option<String>,
    /// First dead-letter sequence to read.
    from: Option<u64>,
    /// Last dead-letter sequence the action covers: the first step answers the stream's last
    /// sequence at that moment, and the next steps send it back.
    until: Option<u64>,
}

/// What one step of a bulk action did.
#[derive(Debug, Serialize)]
pub struct BulkDone {
    action: &'static str,
    /// Job ids acted on in this step (each cut to the shown length).
    jobs: Vec<String>,
    /// Dead letters read in this step, matching or not.
    scanned: usize,
    /// `from` of the next step; absent when the action reached `until`.
    next: Option<u64>,
    /// The last sequence the action covers; send it back with `next`.
    until: u64,
    /// Why the step stopped early, after acting on `jobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Requeues or purges the dead letters whose error or reason matches (or all of them), one
/// page of [`BULK_PAGE`] per request: the page calls again with `next` and `until` until
/// `next` is absent, so no request holds more than one page and a long dead-letter queue shows
/// progress. The action ends at the last sequence the stream had when it started (`until`):
/// a requeued job that fails again gets a later sequence and is not requeued a second time.
pub async fn bulk(
    State(state): State<DashboardState>,
    Path((namespace, name, action)): Path<(String, String, String)>,
    Query(query): Query<BulkQuery>,
    headers: HeaderMap,
) -> Result<Json<BulkDone>, Failure> {
    if let Some((status, message)) = refuse_write(state.token.as_deref(), &headers) {
        return Err(Failure(status, message));
    }
    let action = Action::parse(&action)?;
    let selector = match query.r#match.as_deref().map(str::trim) {
        None | Some("") => Selector::All,
        Some(text) => Selector::ErrorMatch(text.to_owned()),
    };
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    let until = match query.until {
        Some(until) => until,
        None => {
            let stream = js
                .get_stream(queue.dead_letter_stream())
                .await
                .map_err(bad_gateway)?;
            stream.cached_info().state.last_sequence
        }
    };
    let mut found = dlq::page(&js, &queue, query.from.unwrap_or(0), BULK_PAGE + 1)
        .await
        .map_err(dlq_failure)?;
    found.retain(|job| job.entry.sequence <= until);
    let next = found.get(BULK_PAGE).map(|job| job.entry.sequence);
    let mut done = BulkDone {
        action: action.name(),
        jobs: Vec::new(),
        scanned: found.len().min(BULK_PAGE),
        next,
        until,
        error: None,
    };
    for job in found.iter().take(BULK_PAGE) {
        if !selector.matches(&job.entry) {
            continue;
        }
        if let Err(error) = action.apply(&js, &queue, job).await {
            // What was done stays reported; the page says where it stopped.
            done.error = Some(dlq_failure(error).1);
            done.next = None;
            break;
        }
        done.jobs.push(cut(&job.entry.job_id));
    }
    tracing::info!(
        queue = %queue.stream(),
        action = action.name(),
        jobs = done.jobs.len(),
        "dashboard bulk write"
    );
    Ok(Json(done))
}
