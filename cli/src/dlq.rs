//! `conveyor dlq`: the dead-letter queue of a queue — list what failed and why, show one job,
//! requeue one, a filtered set or all with fresh attempts, or purge them. A thin shell over
//! `conveyor::dlq`. `list` also names the jobs that exhausted their attempts but are not
//! dead-lettered yet (their dead letter cannot be written), so no job is out of sight.

use std::fmt::Write as _;
use std::io::Write as _;

use async_nats::jetstream;
use clap::{ArgGroup, Args, Subcommand};
use conveyor::dlq::{self, DeadLetter, Selector};
use serde::Serialize;

use crate::args::{Output, QueueArgs};
use crate::table;

/// Arguments of `conveyor dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// The `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first: job id, attempts, reason, error, pod, time.
    List(ListArgs),
    /// Show one dead letter's headers and payload.
    Show(ShowArgs),
    /// Put dead letters back on their queue with fresh attempts (their job ids are kept).
    // clap's own usage put the selector group before the queue (`<ID|--error|--all> <QUEUE>`),
    // the reverse of the order the arguments are read in.
    #[command(override_usage = "conveyor dlq requeue [OPTIONS] <QUEUE> <ID|--error <TEXT>|--all>")]
    Requeue(SelectArgs),
    /// Delete dead letters for good.
    #[command(override_usage = "conveyor dlq purge [OPTIONS] <QUEUE> <ID|--error <TEXT>|--all>")]
    Purge(SelectArgs),
}

/// Arguments of `conveyor dlq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue.
    pub queue: String,
    /// Only dead letters whose error or reason contains this text (case-insensitive).
    #[arg(long, env = "CONVEYOR_DLQ_ERROR")]
    pub error: Option<String>,
    /// Show at most this many.
    #[arg(long, env = "CONVEYOR_DLQ_LIMIT", default_value_t = 50)]
    pub limit: usize,
    /// Output format.
    #[arg(long, short = 'o', env = "CONVEYOR_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of `conveyor dlq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue.
    pub queue: String,
    /// Job id.
    pub id: String,
    /// Print only the payload, byte for byte.
    #[arg(long)]
    pub payload_only: bool,
}

/// Which dead letters `requeue` and `purge` act on: exactly one of a job id, `--error` or
/// `--all`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("selector").required(true).args(["id", "error", "all"])))]
pub struct SelectArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue.
    pub queue: String,
    /// The job id of one dead letter.
    pub id: Option<String>,
    /// Every dead letter whose error or reason contains this text (case-insensitive).
    #[arg(long)]
    pub error: Option<String>,
    /// Every dead letter of the queue.
    #[arg(long)]
    pub all: bool,
    /// `requeue` only: also requeue the jobs that were dead-lettered because these failed
    /// (reason `dependency_failed`), and theirs; they wait again for the requeued jobs.
    #[arg(long)]
    pub with_dependents: bool,
}

impl SelectArgs {
    fn selector(&self) -> Selector {
        match (&self.id, &self.error) {
            (Some(id), _) => Selector::One(id.clone()),
            (None, Some(text)) => Selector::ErrorMatch(text.clone()),
            (None, None) => Selector::All,
        }
    }
}

/// Runs `conveyor dlq …`.
pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Show(args) => show(args).await,
        DlqCommand::Requeue(args) => {
            let (js, queue) = (
                connect(&args.queue_args, &args.queue).await?,
                args.queue_args.queue(&args.queue),
            );
            let moved = if args.with_dependents {
                dlq::requeue_with_dependents(&js, &queue, &args.selector()).await?
            } else {
                dlq::requeue(&js, &queue, &args.selector()).await?
            };
            println!("requeued {} job(s) to {}", moved.jobs.len(), args.queue);
            Ok(())
        }
        DlqCommand::Purge(args) => {
            if args.with_dependents {
                anyhow::bail!(
                    "--with-dependents is for requeue; purge removes only what it selects"
                );
            }
            let (js, queue) = (
                connect(&args.queue_args, &args.queue).await?,
                args.queue_args.queue(&args.queue),
            );
            let moved = dlq::purge(&js, &queue, &args.selector()).await?;
            println!(
                "purged {} dead letter(s) of {}",
                moved.jobs.len(),
                args.queue
            );
            Ok(())
        }
    }
}

async fn connect(args: &QueueArgs, queue: &str) -> anyhow::Result<jetstream::Context> {
    // Credentials and TLS from the flags; errors name the URL without its userinfo.
    let client = crate::discover::connect(args, Some(queue)).await?;
    Ok(jetstream::new(client))
}

/// A dead letter as `dlq list -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row<'a> {
    id: &'a str,
    attempts: Option<u32>,
    reason: &'a str,
    error: &'a str,
    pod: &'a str,
    failed_at: &'a str,
    subject: &'a str,
    size: Option<u64>,
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let js = connect(&args.queue_args, &args.queue).await?;
    let queue = args.queue_args.queue(&args.queue);
    let filter = args
        .error
        .clone()
        .map_or(Selector::All, Selector::ErrorMatch);
    let entries = dlq::list(&js, &queue, &filter, args.limit).await?;
    match args.output {
        Output::Json => {
            let rows: Vec<Row<'_>> = entries.iter().map(row).collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table if entries.is_empty() => eprintln!("no dead letters in {}", args.queue),
        Output::Table => print!("{}", table(&entries)),
    }
    // Jobs that exhausted their attempts but whose dead letter is not written yet (normally
    // for milliseconds; for good when it cannot be): said on stderr, so `-o json` stays a list.
    let exhausted = dlq::exhausted(&js, &queue, EXHAUSTED_NAMED).await?;
    if exhausted.count > 0 {
        eprint!("{}", awaiting(&args.queue, &exhausted));
    }
    Ok(())
}

/// Most jobs waiting for their dead letter that `dlq list` names.
const EXHAUSTED_NAMED: usize = 20;

fn awaiting(queue: &str, exhausted: &dlq::Exhausted) -> String {
    let mut out = format!(
        "{} job(s) exhausted their attempts and are not in the dead-letter stream yet; they stay in the work stream (if this lasts, `kubectl describe jobqueue {queue}` says why):\n",
        exhausted.count
    );
    for job in &exhausted.oldest {
        let _ = writeln!(
            out,
            "  {}   work sequence {}   {} deliveries   since {}",
            job.job_id, job.sequence, job.deliveries, job.since
        );
    }
    let more = exhausted
        .count
        .saturating_sub(exhausted.oldest.len() as u64);
    if more > 0 {
        let _ = writeln!(out, "  … and {more} more");
    }
    out
}

fn row(entry: &DeadLetter) -> Row<'_> {
    Row {
        id: &entry.job_id,
        attempts: entry.attempts,
        reason: &entry.reason,
        error: &entry.error,
        pod: &entry.pod,
        failed_at: &entry.failed_at,
        subject: &entry.subject,
        size: entry.size,
    }
}

/// Longest error excerpt in the table; `-o json` and `show` give the whole error.
const ERROR_EXCERPT: usize = 60;

fn table(entries: &[DeadLetter]) -> String {
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            [
                e.job_id.clone(),
                e.attempts.map_or_else(|| "?".into(), |n| n.to_string()),
                e.reason.clone(),
                e.pod.clone(),
                e.failed_at.clone(),
                table::excerpt(&e.error, ERROR_EXCERPT),
            ]
        })
        .collect();
    table::render(
        &["ID", "ATTEMPTS", "REASON", "POD", "FAILED AT", "ERROR"],
        &rows,
    )
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let js = connect(&args.queue_args, &args.queue).await?;
    let queue = args.queue_args.queue(&args.queue);
    let job = dlq::show(&js, &queue, &args.id).await?;
    let mut stdout = std::io::stdout().lock();
    if !args.payload_only {
        let mut headers: Vec<(String, String)> = job
            .headers
            .iter()
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(move |v| (name.to_owned(), v.as_str().to_owned()))
            })
            .collect();
        headers.sort();
        for (name, value) in headers {
            writeln!(stdout, "{name}: {value}")?;
        }
        writeln!(stdout)?;
    }
    stdout.write_all(&job.payload)?;
    if !args.payload_only && !job.payload.ends_with(b"\n") {
        writeln!(stdout)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DlqCommand,
    }

    #[test]
    fn requeue_needs_exactly_one_selector() {
        let parse = |args: &[&str]| Cli::try_parse_from(["dlq"].iter().chain(args));
        let Ok(Cli {
            command: DlqCommand::Requeue(one),
        }) = parse(&["requeue", "q", "job-1"])
        else {
            panic!("requeue q job-1 parses");
        };
        assert_eq!(one.selector(), Selector::One("job-1".into()));
        let Ok(Cli {
            command: DlqCommand::Purge(all),
        }) = parse(&["purge", "q", "--all"])
        else {
            panic!("purge q --all parses");
        };
        assert_eq!(all.selector(), Selector::All);
        assert!(parse(&["requeue", "q"]).is_err(), "no selector");
        assert!(
            parse(&["requeue", "q", "job-1", "--all"]).is_err(),
            "two selectors"
        );
    }

    #[test]
    fn jobs_awaiting_their_dead_letter_are_named() {
        let job = |id: &str| dlq::ExhaustedJob {
            job_id: id.into(),
            sequence: 9,
            deliveries: 3,
            since: "2026-12-01T00:00:00Z".into(),
        };
        let text = awaiting(
            "mail",
            &dlq::Exhausted {
                count: 3,
                oldest: vec![job("big-1"), job("big-2")],
            },
        );
        assert!(text.starts_with("3 job(s) exhausted"), "{text}");
        assert!(text.contains("kubectl describe jobqueue mail"), "{text}");
        assert!(
            text.contains(
                "  big-1   work sequence 9   3 deliveries   since 2026-12-01T00:00:00Z\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("  … and 1 more\n"), "{text}");
    }

    #[test]
    fn the_table_cuts_long_errors() {
        let entry = DeadLetter {
            sequence: 1,
            job_id: "job-1".into(),
            reason: "exhausted".into(),
            error: "x".repeat(100),
            attempts: Some(5),
            pod: "pod-a".into(),
            failed_at: "2026-01-01T00:00:00Z".into(),
            subject: "conveyor.ns.q.jobs.0".into(),
            size: Some(3),
        };
        let text = table(&[entry]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].starts_with("job-1"));
        assert!(lines[1].ends_with(&format!("{}…", "x".repeat(60))));
    }

    #[test]
    fn the_table_keeps_its_layout() {
        let entry =
            |id: &str, attempts, reason: &str, pod: &str, day: u8, error: &str| DeadLetter {
                sequence: 1,
                job_id: id.into(),
                reason: reason.into(),
                error: error.into(),
                attempts,
                pod: pod.into(),
                failed_at: format!("2026-01-0{day}T00:00:00Z"),
                subject: "conveyor.ns.q.jobs.0".into(),
                size: None,
            };
        let text = table(&[
            entry("job-1", Some(5), "exhausted", "pod-a", 1, "boom"),
            entry("job-22", None, "permanent", "pod-bb", 2, "bad input"),
        ]);
        // The layout this command printed before it used `table::render`.
        assert_eq!(
            text,
            "ID       ATTEMPTS   REASON      POD      FAILED AT              ERROR\n\
             job-1    5          exhausted   pod-a    2026-01-01T00:00:00Z   boom\n\
             job-22   ?          permanent   pod-bb   2026-01-02T00:00:00Z   bad input\n"
        );
    }
}
