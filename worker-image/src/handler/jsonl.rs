//! `jsonl` mode: one long-lived child process. The runtime writes one JSON request per job to
//! its stdin and reads one JSON response per job from its stdout, matched by job id; several
//! jobs are in flight at once. If the child exits, its in-flight jobs fail as attempts and the
//! next job starts a new child. A job that times out kills the child (it is hung). The child
//! leads a process group of its own, killed as a whole, so a signal to the runtime's group
//! does not reach it and nothing it started outlives it.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use conveyor::protocol::{JsonlRequest, JsonlResponse, JsonlStatus};
use conveyor::worker::{Outcome, Progress, ReceivedJob};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Answers awaited from the child, by job id, with where the job's progress goes.
type Pending = Mutex<HashMap<String, (oneshot::Sender<JsonlResponse>, Progress)>>;

/// Talks JSON lines to one long-lived child process, restarted when it dies.
#[derive(Debug)]
pub struct JsonlHandler {
    program: String,
    args: Vec<String>,
    current: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

/// One running child.
#[derive(Debug)]
struct Conn {
    pid: Option<u32>,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    exited: CancellationToken,
}

impl Conn {
    /// Kills the child's process group unless the child has exited already (its pid may be
    /// reused after that; the reader kills the group before it reaps the child).
    fn kill(&self) {
        if !self.exited.is_cancelled() {
            super::signal_group(self.pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Conn {
    /// The runtime is done with the child (it stops): the child's group goes with it.
    fn drop(&mut self) {
        self.kill();
    }
}

impl JsonlHandler {
    /// A handler that keeps `program args…` running and feeds it jobs.
    pub fn new(program: String, args: Vec<String>) -> Self {
        Self {
            program,
            args,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The running child, starting one if there is none.
    async fn conn(&self) -> Result<Arc<Conn>, String> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref().filter(|c| !c.exited.is_cancelled()) {
            return Ok(conn.clone());
        }
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("starting handler {:?}: {error}", self.program))?;
        let stdin = child.stdin.take().ok_or("handler has no stdin")?;
        let stdout = child.stdout.take().ok_or("handler has no stdout")?;
        let pid = child.id();
        info!(program = %self.program, ?pid, "started jsonl handler process");
        let conn = Arc::new(Conn {
            pid,
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            exited: CancellationToken::new(),
        });
        tokio::spawn(read_responses(child, stdout, conn.clone()));
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one attempt: sends the request line and waits for the matching response.
    pub async fn run(&self, job: ReceivedJob) -> Outcome {
        let conn = match self.conn().await {
            Ok(conn) => conn,
            Err(error) => return Outcome::Failed(error),
        };
        let dependencies =
            match super::dependencies(&job, conveyor::protocol::flow::MAX_INLINE_RESULT).await {
                Ok(dependencies) => dependencies,
                Err(error) => return Outcome::Failed(error),
            };
        let request = JsonlRequest {
            job: Some(job.flow.me().to_string()),
            dependencies,
            id: job.id.clone(),
            payload_b64: base64::engine::general_purpose::STANDARD.encode(&job.payload),
            payload: std::str::from_utf8(&job.payload).ok().map(str::to_owned),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
        };
        let mut line = serde_json::to_vec(&request).expect("a request always serializes");
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        let progress = job.progress.clone();
        if lock(&conn.pending)
            .insert(job.id.clone(), (tx, progress))
            .is_some()
        {
            warn!(job = %job.id, "two deliveries of one job in flight; the older one fails");
        }
        let mut guard = InFlight {
            conn: &conn,
            id: &job.id,
            answered: false,
        };
        let written = {
            let mut stdin = conn.stdin.lock().await;
            match stdin.write_all(&line).await {
                Ok(()) => stdin.flush().await,
                Err(error) => Err(error),
            }
        };
        if let Err(error) = written {
            guard.answered = true;
            lock(&conn.pending).remove(&job.id);
            return Outcome::Failed(format!("writing the job to the handler process: {error}"));
        }
        let response = rx.await;
        guard.answered = true;
        match response {
            Err(_) => Outcome::Failed("handler process exited while running the job".into()),
            Ok(response) => outcome(&job, response),
        }
    }
}

/// Removes a job's pending entry if its attempt is abandoned (timeout or give-back), and kills
/// the child: a child that does not answer in time is considered hung.
struct InFlight<'a> {
    conn: &'a Conn,
    id: &'a str,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.answered {
            lock(&self.conn.pending).remove(self.id);
            warn!(job = %self.id, "abandoning a job in the jsonl handler; killing the process");
            self.conn.kill();
        }
    }
}

fn outcome(job: &ReceivedJob, response: JsonlResponse) -> Outcome {
    let error = response
        .error
        .unwrap_or_else(|| "handler reported no error message".into());
    match response.status {
        JsonlStatus::Ok => Outcome::Done(
            response
                .result
                .map(|r| serde_json::to_vec(&r).unwrap_or_default())
                .unwrap_or_default()
                .into(),
        ),
        JsonlStatus::Retry => Outcome::Retry {
            after: response
                .retry_after_ms
                .map(std::time::Duration::from_millis),
        },
        JsonlStatus::Failed => Outcome::Failed(error),
        JsonlStatus::Permanent => Outcome::Permanent(error),
        JsonlStatus::Continue => match response.continuation {
            Some(continuation) => super::continue_with(job, continuation),
            None => Outcome::Failed("a continue answer without a continuation".into()),
        },
        // Never routed here: progress lines are forwarded by the reader.
        JsonlStatus::Progress => Outcome::Failed("a progress line is not an outcome".into()),
    }
}

/// Reads response lines until the child closes stdout, then fails what is still pending.
async fn read_responses(mut child: Child, stdout: ChildStdout, conn: Arc<Conn>) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => {}
            Ok(Some(line)) => match serde_json::from_str::<JsonlResponse>(&line) {
                Ok(response) if response.status == JsonlStatus::Progress => {
                    let progress = lock(&conn.pending)
                        .get(&response.id)
                        .map(|(_, progress)| progress.clone());
                    match progress {
                        Some(progress) => {
                            let update = response.progress.unwrap_or_default().to_string();
                            progress.report(update).await;
                        }
                        None => {
                            warn!(id = %response.id, "progress for a job that is not in flight")
                        }
                    }
                }
                Ok(response) => match lock(&conn.pending).remove(&response.id) {
                    Some((tx, _)) => {
                        let _ = tx.send(response);
                    }
                    None => warn!(id = %response.id, "response for a job that is not in flight"),
                },
                Err(error) => {
                    warn!(%error, line = %line, "handler wrote a line that is not a response")
                }
            },
            Ok(None) => break,
            Err(error) => {
                warn!(%error, "reading the handler's stdout");
                break;
            }
        }
    }
    // Not reaped yet, so the group is still the child's: what it started goes with it.
    super::signal_group(conn.pid, Signal::SIGKILL);
    conn.exited.cancel();
    lock(&conn.pending).clear();
    let _ = child.start_kill();
    match child.wait().await {
        Ok(status) => warn!(%status, "jsonl handler process exited; the next job starts a new one"),
        Err(error) => warn!(%error, "waiting for the jsonl handler process"),
    }
}

fn lock(
    pending: &Pending,
) -> std::sync::MutexGuard<'_, HashMap<String, (oneshot::Sender<JsonlResponse>, Progress)>> {
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
