//! `conveyor job show`: where one job stands, read from its queue's waiting, results and flow
//! streams ([`conveyor::flow::job_status`]): waiting (for which dependencies, in which state),
//! continued (its continuation waits for its children), finished, or not known to those streams.

use clap::{Args, Subcommand};
use conveyor::flow::{self, DependencyState, JobRef, JobState};
use conveyor::protocol::Outcome;

use crate::args::QueueArgs;

/// Arguments of `conveyor job`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: JobCommand,
}

/// The subcommands of `conveyor job`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Print a job's state, what it waits for and its children's count.
    Show(ShowArgs),
}

/// Arguments of `conveyor job show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue.
    pub queue: String,
    /// The job: `ID`, or `QUEUE/ID` / `NAMESPACE/QUEUE/ID` elsewhere.
    pub id: String,
}

/// Runs `conveyor job …`.
pub async fn run(args: JobArgs) -> anyhow::Result<()> {
    let JobCommand::Show(args) = args.command;
    let home = (args.queue_args.namespace.as_str(), args.queue.as_str());
    let job = JobRef::parse(&args.id, home)?;
    let client = crate::discover::connect(&args.queue_args, Some(&job.queue)).await?;
    let status = flow::job_status(&client, &job).await?;
    print!("{}", render(&status));
    Ok(())
}

/// The lines `job show` prints.
fn render(status: &flow::JobStatus) -> String {
    let mut out = format!("job:       {}\n", status.job);
    match &status.state {
        JobState::Waiting { since, after } => {
            out.push_str(&format!("state:     waiting (since {since})\nwaits for:\n"));
            for (dependency, state) in after {
                let state = match state {
                    DependencyState::Missing => "not finished".to_owned(),
                    DependencyState::Completed => "completed".to_owned(),
                    DependencyState::Cancelled => "cancelled (skipped)".to_owned(),
                    DependencyState::Failed(error) => format!("failed: {error}"),
                };
                let mut options = Vec::new();
                if dependency.if_failed == flow::IfFailed::Run {
                    options.push("if-failed=run");
                }
                if dependency.optional {
                    options.push("optional");
                }
                let options = if options.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", options.join(", "))
                };
                out.push_str(&format!("  {}{options}: {state}\n", dependency.job));
            }
        }
        JobState::Continued {
            continuation,
            expected,
        } => out.push_str(&format!(
            "state:     continued: {continuation} runs when its {expected} children are done\n"
        )),
        JobState::Finished(outcome) => {
            let text = match outcome {
                Outcome::Completed => "completed".to_owned(),
                Outcome::Cancelled => "cancelled".to_owned(),
                Outcome::DeadLettered {
                    reason,
                    error,
                    attempts,
                } => format!("dead-lettered ({reason}) after {attempts} attempt(s): {error}"),
                Outcome::Progress => "running".to_owned(),
            };
            out.push_str(&format!("state:     {text}\n"));
        }
        JobState::Unknown => out.push_str(
            "state:     not waiting and no stored outcome: queued, running, not submitted, or finished longer ago than the results retention\n",
        ),
    }
    if let Some(children) = &status.children {
        out.push_str(&format!(
            "children:  {} finished{}\n",
            children.count,
            if children.released {
                ", continuation released"
            } else {
                ""
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor::flow::{ChildCount, Dependency, JobStatus};

    #[test]
    fn a_waiting_job_lists_each_dependency_with_its_state() {
        let status = JobStatus {
            job: JobRef::new("ns", "agg", "a1"),
            state: JobState::Waiting {
                since: "2026-12-02T03:00:00Z".into(),
                after: vec![
                    (
                        Dependency::on(JobRef::new("ns", "tw", "t1")).optional(),
                        DependencyState::Missing,
                    ),
                    (
                        Dependency::on(JobRef::new("ns", "fb", "f1")).run_if_failed(),
                        DependencyState::Failed("permanent: revoked".into()),
                    ),
                ],
            },
            children: Some(ChildCount {
                count: 3,
                applied: 9,
                released: false,
            }),
        };
        assert_eq!(
            render(&status),
            "job:       ns/agg/a1\n\
             state:     waiting (since 2026-12-02T03:00:00Z)\n\
             waits for:\n  ns/tw/t1 [optional]: not finished\n  ns/fb/f1 [if-failed=run]: failed: permanent: revoked\n\
             children:  3 finished\n"
        );
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: JobCommand,
    }

    #[tokio::test]
    async fn a_bad_job_reference_is_refused_before_connecting() {
        use clap::Parser as _;
        let parse = |args: &[&str]| Cli::try_parse_from(["conveyor"].iter().chain(args));
        for bad in ["Bad/q/p", "ns//p", "p;1"] {
            let Ok(Cli { command }) = parse(&["show", "q", bad]) else {
                panic!("show q {bad} parses")
            };
            let error = run(JobArgs { command })
                .await
                .expect_err("a bad reference is refused");
            assert!(
                error.to_string().contains("job reference") || error.to_string().contains("job id"),
                "{error}"
            );
        }
    }
}
