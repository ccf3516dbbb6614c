//! `exec` mode: one process per job. The payload is the process's stdin, stdout is the result,
//! and the exit code decides: 0 success, 75 (`EX_TEMPFAIL`) retry later, 65 (`EX_DATAERR`)
//! permanent failure, anything else (or a signal) a failed attempt. A stderr line starting
//! with [`PROGRESS_PREFIX`] reports progress to a producer awaiting the job, one starting with
//! [`CONTINUE_PREFIX`] gives a continuation (the process spawned children). The process leads
//! a process group of its own: a cancelled job's group gets SIGTERM at once, and the group is
//! SIGKILLed when the attempt ends (timed out, past the cancel grace, or done), so no process
//! the handler started outlives it.

use std::process::Stdio;

use conveyor::names::handler_env;
use conveyor::protocol::exit_code;
use conveyor::worker::{Outcome, ReceivedJob};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tracing::debug;

/// A line on the handler's stderr that starts with this reports progress (the rest of the
/// line), instead of being kept for the error message.
pub const PROGRESS_PREFIX: &str = "conveyor:progress ";
/// A line on the handler's stderr that starts with this gives the job's continuation (the rest
/// of the line, a JSON object `{"id", "payload", "spawned"}`), taken when the process exits 0;
/// the last such line counts. It is not kept for the error message either.
pub const CONTINUE_PREFIX: &str = "conveyor:continue ";

/// Runs a program once per job.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    program: String,
    args: Vec<String>,
}

impl ExecHandler {
    /// A handler that runs `program args…` for each job.
    pub fn new(program: String, args: Vec<String>) -> Self {
        Self { program, args }
    }

    /// Runs one attempt. Dropping the future kills the process; cancelling the job
    /// ([`ReceivedJob::cancel`]) sends it SIGTERM.
    pub async fn run(&self, job: ReceivedJob) -> Outcome {
        let dependencies = match super::dependencies_json(&job, super::SMALL_INLINE).await {
            Ok(dependencies) => dependencies,
            Err(error) => return Outcome::Failed(error),
        };
        let mut command = Command::new(&self.program);
        if let Some(dependencies) = dependencies {
            command.env(handler_env::DEPENDENCIES, dependencies);
        }
        let mut child = match command
            .args(&self.args)
            .env(handler_env::JOB_REF, job.flow.me().to_string())
            .env(handler_env::JOB_ID, &job.id)
            .env(handler_env::JOB_ATTEMPT, job.attempt.to_string())
            .env(handler_env::JOB_MAX_ATTEMPTS, job.max_attempts.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(error) => {
                return Outcome::Failed(format!("starting handler {:?}: {error}", self.program));
            }
        };
        let pid = child.id();
        // Dropped with the attempt, also when it is dropped unfinished (timed out).
        let _group = super::GroupGuard(pid);
        let stdin = child.stdin.take();
        let payload = job.payload.clone();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A handler may exit without reading its input; that is its business.
                let _ = stdin.write_all(&payload).await;
            }
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let collect_stdout = async move {
            let mut out = Vec::new();
            if let Some(mut stdout) = stdout {
                let _ = stdout.read_to_end(&mut out).await;
            }
            out
        };
        let progress = job.progress.clone();
        let collect_stderr = async move {
            let mut kept = Vec::new();
            let mut continuation = None;
            if let Some(stderr) = stderr {
                let mut lines = BufReader::new(stderr).split(b'\n');
                while let Ok(Some(line)) = lines.next_segment().await {
                    if let Some(update) = line.strip_prefix(PROGRESS_PREFIX.as_bytes()) {
                        progress.report(update.to_vec()).await;
                    } else if let Some(next) = line.strip_prefix(CONTINUE_PREFIX.as_bytes()) {
                        continuation = Some(next.to_vec());
                    } else {
                        kept.extend_from_slice(&line);
                        kept.push(b'\n');
                    }
                }
            }
            (kept, continuation)
        };
        let cancel = job.cancel.clone();
        let wait = async move {
            let wait = child.wait();
            tokio::pin!(wait);
            tokio::select! {
                status = &mut wait => status,
                () = cancel.cancelled() => {
                    // Still running (not reaped), so the group is still this process's.
                    super::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
                    wait.await
                }
            }
        };
        let (_, status, stdout, (stderr, continuation)) =
            tokio::join!(feed, wait, collect_stdout, collect_stderr);
        let status = match status {
            Ok(status) => status,
            Err(error) => return Outcome::Failed(format!("waiting for the handler: {error}")),
        };
        debug!(job = %job.id, %status, "handler process exited");
        let stderr = super::excerpt(&stderr, 512);
        match status.code() {
            Some(exit_code::SUCCESS) => match continuation {
                Some(continuation) => super::continuation(&job, &continuation),
                None => Outcome::Done(stdout.into()),
            },
            Some(exit_code::RETRY) => Outcome::Retry { after: None },
            Some(exit_code::PERMANENT) => {
                Outcome::Permanent(format!("handler exited with 65 (permanent): {stderr}"))
            }
            Some(code) => Outcome::Failed(format!("handler exited with {code}: {stderr}")),
            None => Outcome::Failed(format!("handler killed by a signal ({status}): {stderr}")),
        }
    }
}
