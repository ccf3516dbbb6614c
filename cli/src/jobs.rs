//! `conveyor jobs list`: one page of a queue's pending jobs of one priority level, or of its
//! delayed jobs, oldest first — never a scan: each job is read by subject and sequence
//! (`STREAM.MSG.GET` with `next_by_subj`), at most `--limit` + 1 of them.

use async_nats::jetstream;
use clap::{Args, Subcommand};
use conveyor::peek::{self, Jobs, Peeked};
use serde::Serialize;

use crate::flags::{Output, QueueArgs};
use crate::table;

/// Arguments of `conveyor jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// The `jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List one page of a queue's pending jobs (one priority level) or delayed jobs.
    List(ListArgs),
}

/// Arguments of `conveyor jobs list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue.
    pub queue: String,
    /// Priority level of the pending jobs (0 is the lowest).
    #[arg(long, default_value_t = 0, conflicts_with = "delayed")]
    pub level: u8,
    /// List the delayed jobs (not due yet) instead of the pending ones.
    #[arg(long)]
    pub delayed: bool,
    /// First stream sequence to show (the previous page printed where the next one starts).
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Jobs on one page (at most 1000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Output format.
    #[arg(long, short = 'o', env = "CONVEYOR_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments the command runs on.
pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    match args.command {
        JobsCommand::List(args) => list(args).await,
    }
}

/// A job as `jobs list -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    sequence: u64,
    id: String,
    size: usize,
    stored_at: String,
    /// Pending jobs: delivered to a worker and not acked (running, or waiting for its retry).
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<bool>,
    /// Delayed jobs: when it runs (`@at <time>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    run_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    malformed: Option<String>,
}

impl From<Peeked> for Row {
    fn from(job: Peeked) -> Self {
        Row {
            sequence: job.sequence,
            id: job.id,
            size: job.size,
            stored_at: job.stored_at,
            delivered: job.delivered,
            run_at: job.run_at,
            malformed: job.malformed,
        }
    }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let client = crate::discover::connect(&args.queue_args, Some(&args.queue)).await?;
    let js = jetstream::new(client);
    let queue = args.queue_args.queue(&args.queue);
    let jobs = if args.delayed {
        Jobs::Delayed
    } else {
        Jobs::Pending(args.level)
    };
    let (found, next) = peek::page(&js, &queue, jobs, args.from, usize::from(args.limit)).await?;
    let rows: Vec<Row> = found.into_iter().map(Row::from).collect();
    match args.output {
        Output::Json => {
            let page = serde_json::json!({ "items": rows, "next": next });
            println!("{}", serde_json::to_string_pretty(&page)?);
        }
        Output::Table if rows.is_empty() => {
            let what = if args.delayed {
                "no delayed job".to_owned()
            } else {
                format!("no pending job at level {}", args.level)
            };
            eprintln!("{what} in {} from sequence {}", args.queue, args.from);
        }
        Output::Table => {
            print!("{}", jobs_table(&rows, args.delayed));
            if let Some(next) = next {
                eprintln!("more: --from {next}");
            }
        }
    }
    Ok(())
}

/// Longest id shown in the table; `-o json` gives it whole.
const ID_EXCERPT: usize = 64;

fn jobs_table(rows: &[Row], delayed: bool) -> String {
    let cells = |r: &Row, last: String| {
        [
            r.sequence.to_string(),
            table::excerpt(&r.id, ID_EXCERPT),
            r.size.to_string(),
            r.stored_at.clone(),
            last,
        ]
    };
    if delayed {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| cells(r, r.run_at.clone().unwrap_or_default()))
            .collect();
        table::render(&["SEQ", "ID", "BYTES", "SUBMITTED", "RUNS"], &rows)
    } else {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                let state = match (&r.malformed, r.delivered) {
                    (Some(problem), _) => format!("malformed: {}", table::excerpt(problem, 60)),
                    (None, Some(true)) => "delivered".to_owned(),
                    (None, _) => "waiting".to_owned(),
                };
                cells(r, state)
            })
            .collect();
        table::render(&["SEQ", "ID", "BYTES", "STORED", "STATE"], &rows)
    }
}
