//! `conveyor flow show`: the children of a parent job, read from its queue's flow stream
//! ([`conveyor::flow::flow_summary`]): counts by outcome and the first few children, bounded
//! however large the fan-out, plus where the parent and its continuation stand.

use clap::{Args, Subcommand};
use conveyor::flow::{self, JobRef};
use conveyor::protocol::Outcome;

use crate::args::QueueArgs;

/// Most child records `flow show` reads (it says when there are more).
const READ_LIMIT: u64 = 100_000;

/// Arguments of `conveyor flow`.
#[derive(Debug, Args)]
pub struct FlowArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FlowCommand,
}

/// The subcommands of `conveyor flow`.
#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Print a parent's finished children by outcome and the first of them.
    Show(ShowArgs),
}

/// Arguments of `conveyor flow show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the parent's JobQueue.
    pub queue: String,
    /// The parent job: `ID`, or `QUEUE/ID` / `NAMESPACE/QUEUE/ID` elsewhere.
    pub id: String,
    /// How many children to list (0 to 1000; the counts cover all of them).
    #[arg(long, default_value_t = 20,
          value_parser = |s: &str| crate::flags::bounds::number::<usize>(s, 0, 1000))]
    pub show: usize,
}

/// Runs `conveyor flow …`.
pub async fn run(args: FlowArgs) -> anyhow::Result<()> {
    let FlowCommand::Show(args) = args.command;
    let home = (args.queue_args.namespace.as_str(), args.queue.as_str());
    let parent = JobRef::parse(&args.id, home)?;
    let client = crate::discover::connect(&args.queue_args, Some(&parent.queue)).await?;
    let status = flow::job_status(&client, &parent).await?;
    let summary = flow::flow_summary(&client, &parent, args.show, READ_LIMIT).await?;
    print!("{}", render(&status, &summary));
    Ok(())
}

fn render(status: &flow::JobStatus, summary: &flow::FlowSummary) -> String {
    let state = match &status.state {
        flow::JobState::Continued {
            continuation,
            expected,
        } => format!("continued: {continuation} waits for {expected} children"),
        flow::JobState::Finished(Outcome::Completed) => "completed".into(),
        flow::JobState::Finished(Outcome::DeadLettered { reason, .. }) => {
            format!("dead-lettered ({reason})")
        }
        flow::JobState::Finished(_) => "cancelled".into(),
        flow::JobState::Waiting { .. } => "waiting for its dependencies".into(),
        flow::JobState::Unknown => "running, or its continuation runs".into(),
    };
    let mut out = format!("parent:     {} ({state})\n", status.job);
    let more = if summary.truncated {
        format!(" (the first {} read; there are more)", summary.read)
    } else {
        String::new()
    };
    out.push_str(&format!(
        "finished:   {} children: {} completed, {} dead-lettered, {} cancelled{more}\n",
        summary.read, summary.completed, summary.dead_lettered, summary.cancelled
    ));
    if let Some(count) = &status.children {
        out.push_str(&format!(
            "counted:    {}{}\n",
            count.count,
            if count.released {
                " (continuation released)"
            } else {
                ""
            }
        ));
    }
    for child in &summary.first {
        let outcome = match &child.outcome {
            Outcome::Completed => "completed".to_owned(),
            Outcome::DeadLettered { reason, error, .. } => {
                format!("dead-lettered ({reason}): {error}")
            }
            Outcome::Cancelled => "cancelled".to_owned(),
            Outcome::Progress => "running".to_owned(),
        };
        out.push_str(&format!("  {}\t{outcome}\n", child.job));
    }
    if summary.read > summary.first.len() as u64 {
        out.push_str(&format!(
            "  … {} more\n",
            summary.read - summary.first.len() as u64
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use conveyor::flow::{ChildCount, ChildResult, FlowSummary, JobState, JobStatus};

    #[test]
    fn a_large_fan_out_prints_counts_and_only_the_first_children() {
        let status = JobStatus {
            job: JobRef::new("ns", "p", "fan"),
            state: JobState::Continued {
                continuation: "fan.k".into(),
                expected: 10_000,
            },
            children: Some(ChildCount {
                count: 9_999,
                applied: 10_005,
                released: false,
            }),
        };
        let child = |id: &str| ChildResult {
            job: JobRef::new("ns", "kids", id),
            outcome: Outcome::Completed,
            result: Bytes::new(),
            result_ref: None,
            sequence: 1,
        };
        let summary = FlowSummary {
            read: 9_999,
            completed: 9_998,
            dead_lettered: 0,
            cancelled: 1,
            first: vec![child("fan.0"), child("fan.1")],
            truncated: false,
        };
        assert_eq!(
            render(&status, &summary),
            "parent:     ns/p/fan (continued: fan.k waits for 10000 children)\n\
             finished:   9999 children: 9998 completed, 0 dead-lettered, 1 cancelled\n\
             counted:    9999\n  ns/kids/fan.0\tcompleted\n  ns/kids/fan.1\tcompleted\n  … 9997 more\n"
        );
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: FlowCommand,
    }

    #[tokio::test]
    async fn the_listed_children_are_bounded_and_a_bad_parent_is_refused_before_connecting() {
        use clap::Parser as _;
        let parse = |args: &[&str]| Cli::try_parse_from(["conveyor"].iter().chain(args));
        assert!(
            parse(&["show", "q", "p", "--show", "1001"]).is_err(),
            "at most 1000 children listed"
        );
        for bad in ["Bad/q/p", "ns//p", "p;1"] {
            let Ok(Cli { command }) = parse(&["show", "q", bad, "--show", "1000"]) else {
                panic!("show q {bad} parses")
            };
            let error = run(FlowArgs { command })
                .await
                .expect_err("a bad reference is refused");
            assert!(
                error.to_string().contains("job reference") || error.to_string().contains("job id"),
                "{error}"
            );
        }
    }
}
