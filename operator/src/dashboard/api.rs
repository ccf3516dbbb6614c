//! The dashboard's JSON API. Every answer is bounded: lists are paged with a limit the server
//! caps, texts are cut, and no request reads more than one page of jobs from NATS.

use async_nats::jetstream;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use conveyor::dlq::{self, DlqError};
use conveyor::names::QueueRef;
use conveyor::{JobResult, stored};
use conveyor_crds::{JobQueue, Worker};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use serde::{Deserialize, Serialize};

use super::{DashboardState, Stores, refuse_write};

/// Queues or Workers in one answer when the request names no limit, and at most.
const LIST_LIMIT: (usize, usize) = (50, 200);
/// Dead letters in one answer when the request names no limit, and at most.
const DEAD_LETTER_LIMIT: (usize, usize) = (20, 50);
/// Longest payload or result shown; the rest is cut (its full size is given).
const SHOWN_BYTES: usize = 64 * 1024;
/// Longest message, error or header value shown, in characters.
const SHOWN_TEXT: usize = 1024;
/// Most headers shown of one dead letter.
const SHOWN_HEADERS: usize = 64;

/// An answer that is not a success: its status and a message for people.
pub struct Failure(pub(super) StatusCode, pub(super) String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type Answer<T> = Result<Json<T>, Failure>;

/// NATS answered with an error (or not at all): `502` with what it said.
pub(super) fn bad_gateway(error: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::BAD_GATEWAY, error.to_string())
}

pub(super) fn not_running() -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "this operator replica is not running the controllers (standing by for the leader \
         Lease, or starting): reach the leader's dashboard"
            .into(),
    )
}

/// `?limit=&after=` of a list.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    /// `<namespace>/<name>` of the last item of the previous page.
    after: Option<String>,
}

/// `?limit=&from=` of the dead letters.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    limit: Option<usize>,
    /// First dead-letter sequence to read.
    from: Option<u64>,
}

pub(super) fn limit(asked: Option<usize>, (default, max): (usize, usize)) -> usize {
    asked.unwrap_or(default).clamp(1, max)
}

pub(super) fn cut(text: &str) -> String {
    match text.char_indices().nth(SHOWN_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A page of a list: its items and the cursor of the next page, if any.
#[derive(Debug, Serialize)]
pub struct Listed<T> {
    items: Vec<T>,
    /// `after` of the next page.
    next: Option<String>,
    /// Items in the whole list.
    total: usize,
}

/// The objects of `store` in namespace/name order, one page after `after`.
fn page_of<K, T>(
    objects: Vec<std::sync::Arc<K>>,
    query: &ListQuery,
    view: impl Fn(&K) -> T,
) -> Listed<T>
where
    K: kube::Resource,
{
    let key = |k: &K| format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any());
    let mut keyed: Vec<(String, std::sync::Arc<K>)> =
        objects.into_iter().map(|k| (key(&k), k)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let total = keyed.len();
    let limit = limit(query.limit, LIST_LIMIT);
    let rest: Vec<_> = keyed
        .into_iter()
        .filter(|(k, _)| query.after.as_ref().is_none_or(|after| k > after))
        .collect();
    let next = (rest.len() > limit).then(|| rest[limit - 1].0.clone());
    Listed {
        items: rest.iter().take(limit).map(|(_, k)| view(k)).collect(),
        next,
        total,
    }
}

/// A condition as shown.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    r#type: String,
    status: String,
    reason: String,
    message: String,
    since: String,
}

fn conditions(list: &[Condition]) -> Vec<ConditionView> {
    list.iter()
        .map(|c| ConditionView {
            r#type: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: cut(&c.message),
            since: c.last_transition_time.0.to_string(),
        })
        .collect()
}

/// What `/api/info` says about the dashboard itself.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Info {
    /// Whether writes are possible (the operator has a token).
    writable: bool,
    /// Whether this replica runs the controllers (else lists are unavailable).
    running: bool,
    version: &'static str,
}

pub async fn info(State(state): State<DashboardState>) -> Json<Info> {
    Json(Info {
        writable: state.token.is_some(),
        running: state.stores().is_some(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// One queue with its figures, from its status.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    namespace: String,
    name: String,
    priorities: u8,
    pending: Option<u64>,
    in_flight: Option<u64>,
    delayed: Option<u64>,
    waiting: Option<u64>,
    dead_lettered: Option<u64>,
    awaiting_dead_letter: Option<u64>,
    oldest_pending_age: Option<String>,
    submitted_per_second: Option<String>,
    finished_per_second: Option<String>,
    observed_at: Option<String>,
    conditions: Vec<ConditionView>,
}

fn queue_view(queue: &JobQueue) -> QueueView {
    let status = queue.status.clone().unwrap_or_default();
    QueueView {
        namespace: queue.namespace().unwrap_or_default(),
        name: queue.name_any(),
        priorities: queue.spec.priorities,
        pending: status.pending,
        in_flight: status.in_flight,
        delayed: status.delayed,
        waiting: status.waiting,
        dead_lettered: status.dead_lettered,
        awaiting_dead_letter: status.awaiting_dead_letter,
        oldest_pending_age: status.oldest_pending_age,
        submitted_per_second: status.submitted_per_second,
        finished_per_second: status.finished_per_second,
        observed_at: status.observed_at.map(|t| t.0.to_string()),
        conditions: conditions(&status.conditions),
    }
}

/// One queue with its newest failures (at most the 10 its status keeps).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueDetail {
    #[serde(flatten)]
    queue: QueueView,
    recent_failures: Vec<FailureView>,
}

/// One of a queue's recent failures.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureView {
    job_id: String,
    attempts: Option<u32>,
    reason: String,
    error: String,
    pod: String,
    time: Option<String>,
}

pub async fn queues(
    State(state): State<DashboardState>,
    Query(query): Query<ListQuery>,
) -> Answer<Listed<QueueView>> {
    let stores = state.stores().ok_or_else(not_running)?;
    Ok(Json(page_of(stores.queues.state(), &query, queue_view)))
}

pub(super) fn find_queue(
    stores: &Stores,
    namespace: &str,
    name: &str,
) -> Result<JobQueue, Failure> {
    stores
        .queues
        .get(&ObjectRef::new(name).within(namespace))
        .map(|q| (*q).clone())
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                format!("no JobQueue {namespace}/{name}"),
            )
        })
}

pub async fn queue(
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Answer<QueueDetail> {
    let stores = state.stores().ok_or_else(not_running)?;
    let queue = find_queue(&stores, &namespace, &name)?;
    let failures = queue
        .status
        .as_ref()
        .map(|s| s.recent_failures.clone())
        .unwrap_or_default();
    Ok(Json(QueueDetail {
        queue: queue_view(&queue),
        recent_failures: failures
            .into_iter()
            .map(|f| FailureView {
                job_id: cut(&f.job_id),
                attempts: f.attempts,
                reason: f.reason,
                error: cut(&f.error),
                pod: f.pod,
                time: f.time.map(|t| t.0.to_string()),
            })
            .collect(),
    }))
}

/// One Worker pool, from its status.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    namespace: String,
    name: String,
    queue: String,
    concurrency: i32,
    replicas: i32,
    ready_replicas: i32,
    desired_replicas: Option<i32>,
    busy: Option<u64>,
    slots: Option<i64>,
    recycled_pods: i64,
    last_scale_reason: Option<String>,
    /// Crash reasons and the pods they hit: the `Degraded` condition's message when it is
    /// `True`.
    troubles: Option<String>,
    conditions: Vec<ConditionView>,
}

fn worker_view(worker: &Worker) -> WorkerView {
    let status = worker.status.clone().unwrap_or_default();
    let troubles = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| cut(&format!("{}: {}", c.reason, c.message)));
    WorkerView {
        namespace: worker.namespace().unwrap_or_default(),
        name: worker.name_any(),
        queue: worker.spec.queue.clone(),
        concurrency: worker.spec.concurrency,
        replicas: status.replicas,
        ready_replicas: status.ready_replicas,
        desired_replicas: status.desired_replicas,
        busy: status.busy,
        slots: status.slots,
        recycled_pods: status.recycled_pods,
        last_scale_reason: status.last_scale_reason.as_deref().map(cut),
        troubles,
        conditions: conditions(&status.conditions),
    }
}

pub async fn workers(
    State(state): State<DashboardState>,
    Query(query): Query<ListQuery>,
) -> Answer<Listed<WorkerView>> {
    let stores = state.stores().ok_or_else(not_running)?;
    Ok(Json(page_of(stores.workers.state(), &query, worker_view)))
}

/// The queue's names (it must be one the operator knows), a JetStream context on its NATS
/// server and its number of priority levels.
pub(super) async fn queue_nats(
    state: &DashboardState,
    namespace: &str,
    name: &str,
) -> Result<(QueueRef, jetstream::Context, u8), Failure> {
    let stores = state.stores().ok_or_else(not_running)?;
    let queue = find_queue(&stores, namespace, name)?;
    let url = queue.spec.nats.as_ref().map(|n| n.url.as_str());
    let unavailable = |why: String| Failure(StatusCode::SERVICE_UNAVAILABLE, why);
    let js = state
        .ctx
        .nats
        .connected(url)
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .ok_or_else(|| {
            unavailable(format!(
                "NATS at {} is not connected",
                state.ctx.nats.shown_url(url)
            ))
        })?;
    Ok((QueueRef::new(namespace, name), js, queue.spec.priorities))
}

pub(super) fn dlq_failure(error: DlqError) -> Failure {
    let status = match error {
        DlqError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure(status, text)
}

/// A dead letter as listed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    sequence: u64,
    job_id: String,
    reason: String,
    error: String,
    attempts: Option<u32>,
    pod: String,
    failed_at: String,
    subject: String,
    size: Option<u64>,
}

fn dead_letter_view(entry: &dlq::DeadLetter) -> DeadLetterView {
    DeadLetterView {
        sequence: entry.sequence,
        job_id: cut(&entry.job_id),
        reason: cut(&entry.reason),
        error: cut(&entry.error),
        attempts: entry.attempts,
        pod: cut(&entry.pod),
        failed_at: cut(&entry.failed_at),
        subject: cut(&entry.subject),
        size: entry.size,
    }
}

/// One page of dead letters.
#[derive(Debug, Serialize)]
pub struct DeadLetterPage {
    items: Vec<DeadLetterView>,
    /// `from` of the next page; absent after the last.
    next: Option<u64>,
}

pub async fn dead_letters(
    State(state): State<DashboardState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<PageQuery>,
) -> Answer<DeadLetterPage> {
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    let limit = limit(query.limit, DEAD_LETTER_LIMIT);
    // One more than shown tells whether a next page exists.
    // Entries only: the page shows no payload, so none is held.
    let found = dlq::entries(&js, &queue, query.from.unwrap_or(0), limit + 1)
        .await
        .map_err(dlq_failure)?;
    let next = found.get(limit).map(|entry| entry.sequence);
    Ok(Json(DeadLetterPage {
        items: found.iter().take(limit).map(dead_letter_view).collect(),
        next,
    }))
}

/// Bytes as shown: UTF-8 text when they are, else base64; cut at [`SHOWN_BYTES`].
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BytesView {
    size: usize,
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
}

fn bytes_view(bytes: &[u8]) -> BytesView {
    let shown = &bytes[..bytes.len().min(SHOWN_BYTES)];
    // A cut may split a character: keep the valid prefix as text.
    let text = match std::str::from_utf8(shown) {
        Ok(text) => Some(text.to_owned()),
        Err(e) if e.error_len().is_none() => {
            Some(String::from_utf8_lossy(&shown[..e.valid_up_to()]).into_owned())
        }
        Err(_) => None,
    };
    BytesView {
        size: bytes.len(),
        truncated: shown.len() < bytes.len(),
        base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(shown)),
        text,
    }
}

/// One dead letter with its payload and headers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    entry: DeadLetterView,
    headers: Vec<(String, String)>,
    payload: BytesView,
}

async fn read_dead_letter(
    js: &jetstream::Context,
    queue: &QueueRef,
    sequence: u64,
) -> Result<dlq::DeadLetterJob, Failure> {
    dlq::page(js, queue, sequence, 1)
        .await
        .map_err(dlq_failure)?
        .pop()
        .filter(|job| job.entry.sequence == sequence)
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                format!("no dead letter at sequence {sequence} (requeued or purged?)"),
            )
        })
}

pub async fn dead_letter(
    State(state): State<DashboardState>,
    Path((namespace, name, sequence)): Path<(String, String, u64)>,
) -> Answer<DeadLetterDetail> {
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    let job = read_dead_letter(&js, &queue, sequence).await?;
    let headers = job
        .headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| (name.to_owned(), cut(v.as_str())))
        })
        .take(SHOWN_HEADERS)
        .collect();
    Ok(Json(DeadLetterDetail {
        entry: dead_letter_view(&job.entry),
        headers,
        payload: bytes_view(&job.payload),
    }))
}

/// A write to dead letters, as its path names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Back to the queue with fresh attempts.
    Requeue,
    /// Deleted for good.
    Purge,
}

impl Action {
    /// The action a path segment names, or the `404` that says which exist.
    pub(super) fn parse(segment: &str) -> Result<Self, Failure> {
        match segment {
            "requeue" => Ok(Self::Requeue),
            "purge" => Ok(Self::Purge),
            other => Err(Failure(
                StatusCode::NOT_FOUND,
                format!("no action {other:?} (requeue or purge)"),
            )),
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Requeue => "requeue",
            Self::Purge => "purge",
        }
    }

    /// Carries the action out on one dead letter (as read by [`dlq::page`]).
    pub(super) async fn apply(
        self,
        js: &jetstream::Context,
        queue: &QueueRef,
        job: &dlq::DeadLetterJob,
    ) -> Result<(), DlqError> {
        match self {
            Self::Requeue => dlq::requeue_one(js, queue, job).await,
            Self::Purge => dlq::purge_one(js, queue, job.entry.sequence).await,
        }
    }
}

/// What a write did.
#[derive(Debug, Serialize)]
pub struct Done {
    action: &'static str,
    jobs: Vec<String>,
}

pub async fn dead_letter_action(
    State(state): State<DashboardState>,
    Path((namespace, name, sequence, action)): Path<(String, String, u64, String)>,
    headers: HeaderMap,
) -> Result<Json<Done>, Failure> {
    if let Some((status, message)) = refuse_write(state.token.as_deref(), &headers) {
        return Err(Failure(status, message));
    }
    let action = Action::parse(&action)?;
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    // This one dead letter, read and moved by sequence: one page, never a scan.
    let job = read_dead_letter(&js, &queue, sequence).await?;
    action.apply(&js, &queue, &job).await.map_err(dlq_failure)?;
    tracing::info!(queue = %queue.stream(), sequence, action = action.name(), "dashboard write");
    Ok(Json(Done {
        action: action.name(),
        jobs: vec![cut(&job.entry.job_id)],
    }))
}

/// Where a job is, and where the dashboard looked.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobLookup {
    id: String,
    /// `completed`, `deadLettered`, `cancelled`, `delayed` or `notFound`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<BytesView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    /// The delayed job's schedule (`@at <time>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    delayed_until: Option<String>,
    /// The places looked at, in order.
    checked: Vec<String>,
    /// What the lookup cannot see.
    not_checked: &'static str,
}

/// What a lookup by id cannot see: the work stream keeps jobs by priority level, not by id.
const NOT_CHECKED: &str = "pending and running jobs: the work stream is indexed by priority \
                           level, not by job id, so finding one would take a scan";

pub async fn job(
    State(state): State<DashboardState>,
    Path((namespace, name, id)): Path<(String, String, String)>,
) -> Answer<JobLookup> {
    conveyor::protocol::validate_id(&id)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))?;
    let (queue, js, _) = queue_nats(&state, &namespace, &name).await?;
    let mut lookup = JobLookup {
        id: cut(&id),
        state: "notFound",
        result: None,
        reason: None,
        error: None,
        attempts: None,
        delayed_until: None,
        checked: vec![format!(
            "stored outcomes (stream {}, kept for the queue's results.retention)",
            queue.results_stream()
        )],
        not_checked: NOT_CHECKED,
    };
    let client = conveyor::Client::new(js.client());
    let outcome = client.result(&queue, &id).await.map_err(bad_gateway)?;
    match outcome {
        Some(JobResult::Completed { result, .. }) => {
            lookup.state = "completed";
            lookup.result = Some(bytes_view(&result));
            return Ok(Json(lookup));
        }
        Some(JobResult::DeadLettered {
            reason,
            error,
            attempts,
            ..
        }) => {
            lookup.state = "deadLettered";
            lookup.reason = Some(cut(&reason));
            lookup.error = Some(cut(&error));
            lookup.attempts = Some(attempts);
            return Ok(Json(lookup));
        }
        Some(JobResult::Cancelled { .. }) => {
            lookup.state = "cancelled";
            return Ok(Json(lookup));
        }
        None => {}
    }
    lookup.checked.push(format!(
        "delayed jobs (stream {}, subject {})",
        queue.delayed_stream(),
        queue.delayed_subject(&id)
    ));
    let delayed = stored::last(
        &js.client(),
        &queue.delayed_stream(),
        &queue.delayed_subject(&id),
    )
    .await
    .map_err(bad_gateway)?;
    if let Some(schedule) = delayed {
        let headers = schedule.block().header_map();
        lookup.state = "delayed";
        lookup.delayed_until = headers
            .get(conveyor::protocol::schedule::SCHEDULE)
            .map(|v| cut(v.as_str()));
    }
    Ok(Json(lookup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_capped() {
        assert_eq!(limit(None, LIST_LIMIT), 50);
        assert_eq!(limit(Some(100_000), LIST_LIMIT), 200);
        assert_eq!(limit(Some(0), DEAD_LETTER_LIMIT), 1);
    }

    #[test]
    fn bytes_are_text_or_base64_and_cut() {
        let text = bytes_view(b"{\"a\":1}");
        assert_eq!(text.text.as_deref(), Some("{\"a\":1}"));
        assert!(text.base64.is_none() && !text.truncated);
        let binary = bytes_view(&[0xff, 0xfe, 0]);
        assert_eq!(binary.base64.as_deref(), Some("//4A"));
        let big = vec![b'x'; SHOWN_BYTES * 3];
        let shown = bytes_view(&big);
        assert!(shown.truncated);
        assert_eq!(shown.size, SHOWN_BYTES * 3);
        assert_eq!(shown.text.unwrap().len(), SHOWN_BYTES);
        let mut split = vec![b'a'; SHOWN_BYTES - 1];
        split.extend("é".as_bytes());
        assert_eq!(bytes_view(&split).text.unwrap().len(), SHOWN_BYTES - 1);
    }

    #[test]
    fn texts_are_cut() {
        assert_eq!(cut("short"), "short");
        let long = "é".repeat(SHOWN_TEXT + 5);
        assert_eq!(cut(&long).chars().count(), SHOWN_TEXT + 1);
    }
}
