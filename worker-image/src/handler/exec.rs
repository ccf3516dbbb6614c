//! `exec` mode: one process per job. The payload is the process's stdin, stdout is the result,
//! and the exit code decides: 0 success, 75 (`EX_TEMPFAIL`) retry later, 65 (`EX_DATAERR`)
//! permanent failure, anything else (or a signal) a failed attempt.

use std::process::Stdio;

use conveyor::names::handler_env;
use conveyor::protocol::exit_code;
use conveyor::worker::{Outcome, ReceivedJob};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::debug;

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

    /// Runs one attempt. Dropping the future kills the process.
    pub async fn run(&self, job: ReceivedJob) -> Outcome {
        let mut child = match Command::new(&self.program)
            .args(&self.args)
            .env(handler_env::JOB_ID, &job.id)
            .env(handler_env::JOB_ATTEMPT, job.attempt.to_string())
            .env(handler_env::JOB_MAX_ATTEMPTS, job.max_attempts.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(error) => {
                return Outcome::Failed(format!("starting handler {:?}: {error}", self.program));
            }
        };
        let stdin = child.stdin.take();
        let payload = job.payload.clone();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A handler may exit without reading its input; that is its business.
                let _ = stdin.write_all(&payload).await;
            }
        };
        let (_, output) = tokio::join!(feed, child.wait_with_output());
        let output = match output {
            Ok(output) => output,
            Err(error) => return Outcome::Failed(format!("waiting for the handler: {error}")),
        };
        debug!(job = %job.id, status = %output.status, "handler process exited");
        let stderr = super::excerpt(&output.stderr, 512);
        match output.status.code() {
            Some(exit_code::SUCCESS) => Outcome::Done(output.stdout.into()),
            Some(exit_code::RETRY) => Outcome::Retry { after: None },
            Some(exit_code::PERMANENT) => {
                Outcome::Permanent(format!("handler exited with 65 (permanent): {stderr}"))
            }
            Some(code) => Outcome::Failed(format!("handler exited with {code}: {stderr}")),
            None => Outcome::Failed(format!(
                "handler killed by a signal ({}): {stderr}",
                output.status
            )),
        }
    }
}
