//! Handler modes: how the runtime hands a job to the user's program.

mod exec;
mod http;
mod jsonl;

use conveyor::protocol::JsonlContinuation;
use conveyor::worker::{Handler, Outcome, ReceivedJob};

use crate::settings::HandlerMode;

pub use exec::ExecHandler;
pub use http::HttpHandler;
pub use jsonl::JsonlHandler;

/// The handler of the configured mode.
#[derive(Debug)]
pub enum RuntimeHandler {
    /// One process per job.
    Exec(ExecHandler),
    /// One long-lived JSON-lines process.
    Jsonl(JsonlHandler),
    /// An HTTP endpoint in the pod.
    Http(HttpHandler),
}

impl RuntimeHandler {
    /// The handler of `mode`: `command` (program and arguments) for `exec` and `jsonl`,
    /// `url` for `http` (which also opens its progress endpoint on the loopback).
    pub async fn new(
        mode: HandlerMode,
        command: &[String],
        url: Option<&str>,
    ) -> anyhow::Result<Self> {
        if mode == HandlerMode::Http {
            let Some(url) = url else {
                anyhow::bail!("http handler mode needs --handler-url (CONVEYOR_HANDLER_URL)");
            };
            return Ok(Self::Http(HttpHandler::new(url.to_owned()).await?));
        }
        let Some((program, args)) = command.split_first() else {
            anyhow::bail!("no handler command given: `conveyor-worker run -- <command> [args…]`");
        };
        Ok(match mode {
            HandlerMode::Jsonl => Self::Jsonl(JsonlHandler::new(program.clone(), args.to_vec())),
            _ => Self::Exec(ExecHandler::new(program.clone(), args.to_vec())),
        })
    }
}

/// Largest dependency result the `exec` and `http` modes pass inline (environment variables
/// and headers are small); larger ones by reference.
const SMALL_INLINE: usize = 1024;

/// The job's dependencies' outcomes for a handler process (`None` for a job without
/// dependencies), results up to `inline` bytes inline.
async fn dependencies(
    job: &ReceivedJob,
    inline: usize,
) -> Result<Option<Vec<conveyor::protocol::HandlerDependency>>, String> {
    if job.flow.headers().after.is_empty() {
        return Ok(None);
    }
    let results = job
        .flow
        .dependencies()
        .await
        .map_err(|e| format!("reading the job's dependencies: {e}"))?;
    Ok(Some(conveyor::flow::for_handler(&results, inline)))
}

/// [`dependencies`] as a JSON array.
async fn dependencies_json(job: &ReceivedJob, inline: usize) -> Result<Option<String>, String> {
    Ok(dependencies(job, inline)
        .await?
        .map(|d| serde_json::to_string(&d).unwrap_or_default()))
}

impl Handler for RuntimeHandler {
    async fn handle(&self, job: ReceivedJob) -> Outcome {
        match self {
            Self::Exec(handler) => handler.run(job).await,
            Self::Jsonl(handler) => handler.run(job).await,
            Self::Http(handler) => handler.run(job).await,
        }
    }
}

/// The job's continuation, as a handler process answered it (every mode: the JSON object of
/// a `jsonl` `continuation`): `spawned` children are counted for it, and it runs once they
/// have finished.
fn continue_with(job: &ReceivedJob, continuation: JsonlContinuation) -> Outcome {
    // A continuation that could never be stored, or never released, is a bad answer for
    // good: dead-lettered at once with the reason, not retried (which would run the process
    // and spawn its children again).
    if let Err(error) = conveyor::protocol::validate_id(&continuation.id) {
        return Outcome::Permanent(format!("the handler's continuation has a bad id: {error}"));
    }
    if continuation.spawned > MAX_SPAWNED {
        return Outcome::Permanent(format!(
            "the handler's continuation says it spawned {} children; at most {MAX_SPAWNED} can \
             be waited for",
            continuation.spawned
        ));
    }
    job.flow.add_spawned(continuation.spawned);
    Outcome::Continue(Box::new(conveyor::Job::new(
        continuation.id,
        continuation.payload.unwrap_or_default(),
    )))
}

/// Most children a handler process may say it spawned (more could never all finish within a
/// wait timeout; a count above what was spawned leaves the continuation waiting until then).
const MAX_SPAWNED: u64 = 100_000_000;

/// [`continue_with`] the continuation in `json` (an `exec` control line, an `http` body); a
/// failed attempt, saying what is wrong, when it is not one.
fn continuation(job: &ReceivedJob, json: &[u8]) -> Outcome {
    match serde_json::from_slice::<JsonlContinuation>(json) {
        Ok(continuation) => continue_with(job, continuation),
        Err(error) => Outcome::Failed(format!(
            "the handler's continuation is not a JSON object {{\"id\", \"payload\", \"spawned\"}}: \
             {error}"
        )),
    }
}

/// Sends `signal` to the process group `pid` leads; a group already gone is fine.
///
/// Every handler process is started as the leader of a group of its own
/// (`process_group(0)`): a signal to the runtime's group (Ctrl-C on `conveyor-worker run`, a
/// kill of the group) then no longer reaches a running handler, so the runtime drains instead
/// of losing the attempt, and a handler that is timed out or cancelled is stopped together with
/// the processes it started, which would otherwise live on as orphans.
fn signal_group(pid: Option<u32>, signal: nix::sys::signal::Signal) {
    let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) else {
        return;
    };
    if let Err(error) = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal) {
        tracing::debug!(%error, ?signal, "signalling a handler's process group");
    }
}

/// SIGKILLs a handler's process group when dropped: when its attempt ends, is timed out or is
/// abandoned, nothing the handler started outlives it.
#[derive(Debug)]
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The last `limit` bytes of a process's output, as one trimmed line for error messages.
fn excerpt(bytes: &[u8], limit: usize) -> String {
    let start = bytes.len().saturating_sub(limit);
    String::from_utf8_lossy(&bytes[start..])
        .trim()
        .replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_command_or_url_is_a_clear_error() {
        let err = RuntimeHandler::new(HandlerMode::Exec, &[], None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("no handler command given"),
            "{err}"
        );
        let err = RuntimeHandler::new(HandlerMode::Http, &[], None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("needs --handler-url"), "{err}");
        let url = Some("http://127.0.0.1:1/");
        assert!(matches!(
            RuntimeHandler::new(HandlerMode::Http, &[], url).await,
            Ok(RuntimeHandler::Http(_))
        ));
    }
}
