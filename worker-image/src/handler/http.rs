//! `http` mode: each job is a `POST` to an HTTP endpoint in the pod (a container beside the
//! runtime). Body = payload; the status code decides: 2xx success (body = result), 422 permanent
//! failure, 429 or 503 retry later (honouring `Retry-After` seconds), anything else a failed
//! attempt; a 2xx with `Conveyor-Status: continue` gives a continuation as its body. While it
//! works, the handler may `POST` progress updates to the URL in the `Conveyor-Progress-Url`
//! header: a loopback-only endpoint of the runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use bytes::Bytes;
use conveyor::worker::{Outcome, Progress, ReceivedJob};
use reqwest::StatusCode;

/// Request header with the job id.
pub const JOB_ID_HEADER: &str = "Conveyor-Job-Id";
/// Request header with the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "Conveyor-Attempt";
/// Request header with the attempts allowed.
pub const MAX_ATTEMPTS_HEADER: &str = "Conveyor-Max-Attempts";
/// Request header with the URL this attempt's progress updates may be posted to.
pub const PROGRESS_URL_HEADER: &str = "Conveyor-Progress-Url";
/// Header with the job's dependencies' outcomes, a JSON array (results up to 1 KiB inline),
/// on a job with dependencies.
pub const DEPENDENCIES_HEADER: &str = "Conveyor-Dependencies";
/// Header with the job's reference `<namespace>/<queue>/<id>`.
pub const JOB_REF_HEADER: &str = "Conveyor-Job-Ref";
/// Response header: with value `continue` on a 2xx answer, the body is the job's continuation
/// (a JSON object `{"id", "payload", "spawned"}`: the handler spawned children).
pub const STATUS_HEADER: &str = "Conveyor-Status";

/// Posts jobs to a URL.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    url: String,
    client: reqwest::Client,
    progress: ProgressEndpoint,
}

impl HttpHandler {
    /// A handler posting to `url`, with its progress endpoint listening on the loopback.
    pub async fn new(url: String) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().build()?;
        let progress = ProgressEndpoint::start().await?;
        Ok(Self {
            url,
            client,
            progress,
        })
    }

    /// Runs one attempt. Dropping the future cancels the request.
    pub async fn run(&self, job: ReceivedJob) -> Outcome {
        let dependencies = match super::dependencies_json(&job, super::SMALL_INLINE).await {
            Ok(dependencies) => dependencies,
            Err(error) => return Outcome::Failed(error),
        };
        let progress = self.progress.register(job.progress.clone());
        let mut request = self.client.post(&self.url);
        if let Some(dependencies) = dependencies {
            request = request.header(DEPENDENCIES_HEADER, dependencies);
        }
        let response = request
            .header(JOB_ID_HEADER, &job.id)
            .header(JOB_REF_HEADER, job.flow.me().to_string())
            .header(PROGRESS_URL_HEADER, progress.url())
            .header(ATTEMPT_HEADER, job.attempt.to_string())
            .header(MAX_ATTEMPTS_HEADER, job.max_attempts.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(job.payload.clone())
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => return Outcome::Failed(format!("calling handler {}: {error}", self.url)),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let continues = response
            .headers()
            .get(STATUS_HEADER)
            .is_some_and(|v| v.as_bytes() == b"continue");
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => {
                return Outcome::Failed(format!("reading the handler's response: {error}"));
            }
        };
        if status.is_success() {
            if continues {
                return super::continuation(&job, &body);
            }
            return Outcome::Done(body);
        }
        let text = super::excerpt(&body, 512);
        match status {
            StatusCode::UNPROCESSABLE_ENTITY => {
                Outcome::Permanent(format!("handler answered {status}: {text}"))
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Outcome::Retry { after: retry_after }
            }
            _ => Outcome::Failed(format!("handler answered {status}: {text}")),
        }
    }
}

/// Running attempts by progress token.
type Attempts = Arc<Mutex<HashMap<String, Progress>>>;

/// Where HTTP handlers post progress: `POST http://127.0.0.1:<port>/progress/<token>`, one
/// token per running attempt. Loopback only: the handler runs in the same pod. Tokens are 122
/// random bits (a v4 UUID from the OS source), so another process in the pod cannot guess the
/// endpoint of an attempt it was not told about.
#[derive(Debug, Clone)]
struct ProgressEndpoint {
    base: String,
    attempts: Attempts,
}

impl ProgressEndpoint {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}/progress/", listener.local_addr()?);
        let attempts = Attempts::default();
        let app = axum::Router::new()
            .route("/progress/{token}", axum::routing::post(report))
            .with_state(attempts.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "the progress endpoint stopped");
            }
        });
        Ok(Self { base, attempts })
    }

    /// Opens the endpoint of one attempt until the returned guard is dropped.
    fn register(&self, progress: Progress) -> Registered<'_> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token.clone(), progress);
        Registered {
            endpoint: self,
            token,
        }
    }
}

/// One attempt's progress endpoint; closed on drop.
struct Registered<'a> {
    endpoint: &'a ProgressEndpoint,
    token: String,
}

impl Registered<'_> {
    fn url(&self) -> String {
        format!("{}{}", self.endpoint.base, self.token)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.endpoint
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.token);
    }
}

/// `POST /progress/<token>`: the body goes to the producer awaiting the job (204), or 404 when
/// the attempt is over.
async fn report(
    State(attempts): State<Attempts>,
    Path(token): Path<String>,
    update: Bytes,
) -> axum::http::StatusCode {
    let progress = attempts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&token)
        .cloned();
    match progress {
        Some(progress) => {
            progress.report(update).await;
            axum::http::StatusCode::NO_CONTENT
        }
        None => axum::http::StatusCode::NOT_FOUND,
    }
}
