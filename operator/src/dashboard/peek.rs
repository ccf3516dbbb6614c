//! Paged peeks at the jobs a queue holds (pending by priority level, delayed) and the bulk
//! dead-letter actions. Each request reads at most one page of jobs from NATS, found by
//! subject and sequence (`STREAM.MSG.GET` with `next_by_subj`): never a scan of the stream.

use async_nats::jetstream;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use conveyor::dlq::{self, Selector};
use conveyor::names::QueueRef;
use conveyor::protocol::schedule::SCHEDULE;
use conveyor::stored::{self, StoredJob};
use serde::{Deserialize, Serialize};

use super::DashboardState;
use super::api::{Failure, cut, dlq_failure, limit, queue_nats};
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

fn peeked(job: &StoredJob, stream: &str) -> PeekedJob {
    let reading = job.read(stream);
    let headers = reading
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
        job_id: cut(&reading.id),
        size: job.payload.len(),
        stored_at: cut(&job.time),
        delivered: None,
        run_at: reading.headers.get(SCHEDULE).map(|v| cut(v.as_str())),
        malformed: reading.malformed.as_deref().map(cut),
        headers,
    }
}

fn bad_gateway(error: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::BAD_GATEWAY, error.to_string())
}

/// One page of `subject` in `stream` from `from` (see [`stored::page`]).
async fn page(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    from: u64,
    limit: usize,
) -> Result<(Vec<StoredJob>, Option<u64>), Failure> {
    stored::page(&js.client(), stream, subject, from, limit)
        .await
        .map_err(bad_gateway)
}

/// The pending jobs of one priority level, oldest first.
pub async fn pending(
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PeekQuery>,
) -> Result<Json<PeekPage>, Failure> {
    let (queue, js, priorities) = queue_nats(&state, &namespace, &name).await?;
    let level = query.level.unwrap_or(0);
    if level >= priorities {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!(
                "queue {namespace}/{name} has priority levels 0 to {}",
                priorities.saturating_sub(1)
            ),
        ));
    }
    let stream = queue.stream();
    let limit = limit(query.limit, PEEK_LIMIT);
    // What the level's consumer has handed out so far: a job at or below that sequence was
    // delivered (it is running or waits for its retry), one above it was not.
    let delivered_up_to = delivered_sequence(&js, &queue, level).await?;
    let (jobs, next) = page(
        &js,
        &stream,
        &queue.job_subject(level),
        query.from.unwrap_or(1),
        limit,
    )
    .await?;
    let items = jobs
        .iter()
        .map(|job| PeekedJob {
            delivered: Some(job.sequence <= delivered_up_to),
            ..peeked(job, &stream)
        })
        .collect();
    Ok(Json(PeekPage { items, next }))
}

/// The stream sequence of the last job the level's consumer delivered (0 before any).
async fn delivered_sequence(
    js: &jetstream::Context,
    queue: &QueueRef,
    level: u8,
) -> Result<u64, Failure> {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(queue.consumer(level), queue.stream())
        .await
        .map_err(bad_gateway)?;
    let info = consumer.info().await.map_err(bad_gateway)?;
    Ok(info.delivered.stream_sequence)
}

/// The delayed jobs (not yet due), in the order they were submitted.
pub async fn delayed(
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PeekQuery>,
) -> Result<Json<PeekPage>, Failure> {
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    let stream = queue.delayed_stream();
    let (jobs, next) = page(
        &js,
        &stream,
        &queue.delayed_wildcard(),
        query.from.unwrap_or(1),
        limit(query.limit, PEEK_LIMIT),
    )
    .await?;
    let items = jobs.iter().map(|job| peeked(job, &stream)).collect();
    Ok(Json(PeekPage { items, next }))
}

/// `?match=&from=` of a bulk dead-letter action.
#[derive(Debug, Deserialize)]
pub struct BulkQuery {
    /// Text the error or reason contains (case-insensitive); absent or empty: every one.
    r#match: Option<String>,
    /// First dead-letter sequence to read.
    from: Option<u64>,
}

/// What one step of a bulk action did.
#[derive(Debug, Serialize)]
pub struct BulkDone {
    action: &'static str,
    /// Job ids acted on in this step (each cut to the shown length).
    jobs: Vec<String>,
    /// Dead letters read in this step, matching or not.
    scanned: usize,
    /// `from` of the next step; absent when the end of the dead letters was reached.
    next: Option<u64>,
}

/// Requeues or purges the dead letters whose error or reason matches (or all of them), one
/// page of [`BULK_PAGE`] per request: the page calls again with `next` until it is absent,
/// so no request holds more than one page and a long dead-letter queue shows progress.
pub async fn bulk(
    State(state): State<DashboardState>,
    Path((namespace, name, action)): Path<(String, String, String)>,
    Query(query): Query<BulkQuery>,
    headers: HeaderMap,
) -> Result<Json<BulkDone>, Failure> {
    if let Some((status, message)) = refuse_write(state.token.as_deref(), &headers) {
        return Err(Failure(status, message));
    }
    let action = match action.as_str() {
        "requeue" => "requeue",
        "purge" => "purge",
        other => {
            return Err(Failure(
                StatusCode::NOT_FOUND,
                format!("no action {other:?} (requeue or purge)"),
            ));
        }
    };
    let selector = match query.r#match.as_deref().map(str::trim) {
        None | Some("") => Selector::All,
        Some(text) => Selector::ErrorMatch(text.to_owned()),
    };
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    let found = dlq::page(&js, &queue, query.from.unwrap_or(0), BULK_PAGE + 1)
        .await
        .map_err(dlq_failure)?;
    let next = found.get(BULK_PAGE).map(|job| job.entry.sequence);
    let mut done = BulkDone {
        action,
        jobs: Vec::new(),
        scanned: found.len().min(BULK_PAGE),
        next,
    };
    for job in found.iter().take(BULK_PAGE) {
        if !selector.matches(&job.entry) {
            continue;
        }
        match action {
            "requeue" => dlq::requeue_one(&js, &queue, job).await,
            _ => dlq::purge_one(&js, &queue, job.entry.sequence).await,
        }
        .map_err(dlq_failure)?;
        done.jobs.push(cut(&job.entry.job_id));
    }
    tracing::info!(
        queue = %queue.stream(),
        action,
        jobs = done.jobs.len(),
        "dashboard bulk write"
    );
    Ok(Json(done))
}
