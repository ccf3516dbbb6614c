//! `http` mode: each job is a `POST` to an HTTP endpoint in the pod (a container beside the
//! runtime). Body = payload; the status code decides: 2xx success (body = result), 422 permanent
//! failure, 429 or 503 retry later (honouring `Retry-After` seconds), anything else a failed
//! attempt.

use std::time::Duration;

use conveyor::worker::{Outcome, ReceivedJob};
use reqwest::StatusCode;

/// Request header with the job id.
pub const JOB_ID_HEADER: &str = "Conveyor-Job-Id";
/// Request header with the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "Conveyor-Attempt";
/// Request header with the attempts allowed.
pub const MAX_ATTEMPTS_HEADER: &str = "Conveyor-Max-Attempts";

/// Posts jobs to a URL.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    url: String,
    client: reqwest::Client,
}

impl HttpHandler {
    /// A handler posting to `url`.
    pub fn new(url: String) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().build()?;
        Ok(Self { url, client })
    }

    /// Runs one attempt. Dropping the future cancels the request.
    pub async fn run(&self, job: ReceivedJob) -> Outcome {
        let response = self
            .client
            .post(&self.url)
            .header(JOB_ID_HEADER, &job.id)
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
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => {
                return Outcome::Failed(format!("reading the handler's response: {error}"));
            }
        };
        if status.is_success() {
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
