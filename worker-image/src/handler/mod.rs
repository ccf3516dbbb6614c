//! Handler modes: how the runtime hands a job to the user's program.

mod exec;
mod jsonl;

use conveyor::worker::{Handler, Outcome, ReceivedJob};

use crate::settings::HandlerMode;

pub use exec::ExecHandler;
pub use jsonl::JsonlHandler;

/// The handler of the configured mode.
#[derive(Debug)]
pub enum RuntimeHandler {
    /// One process per job.
    Exec(ExecHandler),
    /// One long-lived JSON-lines process.
    Jsonl(JsonlHandler),
}

impl RuntimeHandler {
    /// A handler running `command` (program and arguments) in `mode`.
    pub fn new(mode: HandlerMode, command: &[String]) -> anyhow::Result<Self> {
        let Some((program, args)) = command.split_first() else {
            anyhow::bail!("no handler command given: `conveyor-worker run -- <command> [args…]`");
        };
        Ok(match mode {
            HandlerMode::Exec => Self::Exec(ExecHandler::new(program.clone(), args.to_vec())),
            HandlerMode::Jsonl => Self::Jsonl(JsonlHandler::new(program.clone(), args.to_vec())),
        })
    }
}

impl Handler for RuntimeHandler {
    async fn handle(&self, job: ReceivedJob) -> Outcome {
        match self {
            Self::Exec(handler) => handler.run(job).await,
            Self::Jsonl(handler) => handler.run(job).await,
        }
    }
}

/// The last `limit` bytes of a process's output, as one trimmed line for error messages.
fn excerpt(bytes: &[u8], limit: usize) -> String {
    let start = bytes.len().saturating_sub(limit);
    String::from_utf8_lossy(&bytes[start..])
        .trim()
        .replace('\n', " | ")
}
