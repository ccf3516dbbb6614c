//! `conveyor run WORKFLOW --input … [--id ID] [--wait]` starts a run of a Workflow (its spec as
//! it is now is pinned in the run, see docs/workflows.md); `conveyor run show WORKFLOW RUN`
//! prints its steps with their outcomes, read from the waves' child records in the run queue's
//! flow stream, and the run's outcome.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use conveyor::flow::{self, JobRef};
use conveyor::names::QueueRef;
use conveyor::protocol::Outcome;
use conveyor::workflow::Definition;
use conveyor::workflow::engine::{RUN_QUEUE, RunState, continuation_id, run_job_id, start};
use conveyor::{Client, JobResult};
use conveyor_crds::Workflow;
use kube::Api;
use kube::config::KubeConfigOptions;
use serde_json::Value;

use crate::args::QueueArgs;

/// How often `--wait` looks for the run's outcome.
const POLL: Duration = Duration::from_millis(200);
/// Most waves `run show` reads (a run has at most one per step, plus two for a failure).
const MAX_WAVES: u32 = 70;

/// Arguments of `conveyor run`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RunArgs {
    /// `show`; without it, start a run.
    #[command(subcommand)]
    pub command: Option<RunCommand>,
    /// Starting a run.
    #[command(flatten)]
    pub start: StartArgs,
}

/// The subcommands of `conveyor run`.
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Print a run's steps with their outcomes, and the run's outcome.
    Show(ShowArgs),
}

/// Arguments of `conveyor run WORKFLOW`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// The Workflow to run.
    #[arg(required = true)]
    pub workflow: Option<String>,
    /// The run's input: JSON text, or a file holding it (`-` for stdin).
    #[arg(long, default_value = "{}")]
    pub input: String,
    /// The run's id (starting the same id again is the same run); a fresh one when absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Wait for the run's outcome and print it (exit 1 when the run failed).
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Arguments of `conveyor run show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// The Workflow.
    pub workflow: String,
    /// The run's id.
    pub run: String,
}

/// Runs `conveyor run …`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    match args.command {
        Some(RunCommand::Show(args)) => show(&args).await,
        None => start_run(args.start).await,
    }
}

/// The run's input: JSON given inline, or read from a file (`-`: stdin).
fn input(text: &str) -> anyhow::Result<Value> {
    let trimmed = text.trim_start();
    let inline = trimmed.starts_with('{') || trimmed.starts_with('[') || trimmed.starts_with('"');
    let body = if inline {
        text.to_owned()
    } else if text == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the input from stdin")?
    } else {
        std::fs::read_to_string(text).with_context(|| format!("reading the input file {text}"))?
    };
    serde_json::from_str(&body).context("the input is not JSON")
}

async fn start_run(args: StartArgs) -> anyhow::Result<()> {
    let name = args.workflow.clone().unwrap_or_default();
    let ns = args.queue_args.namespace.clone();
    let input = input(&args.input)?;
    let options = KubeConfigOptions {
        context: args.queue_args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .context("reading the kubeconfig (Workflows live in Kubernetes)")?;
    let kube = kube::Client::try_from(config).context("building a Kubernetes client")?;
    let api: Api<Workflow> = Api::namespaced(kube, &ns);
    let workflow = api
        .get_opt(&name)
        .await
        .with_context(|| format!("reading Workflow {ns}/{name}"))?
        .ok_or_else(|| anyhow!("no Workflow {name} in namespace {ns}"))?;
    let ready = workflow
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => {}
        Some(c) => bail!("Workflow {name} is not ready ({}): {}", c.reason, c.message),
        None => bail!("Workflow {name} has not been checked by the operator yet"),
    }
    let definition: Definition = serde_json::to_value(&workflow.spec)
        .and_then(serde_json::from_value)
        .context("the Workflow's spec")?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| conveyor::Job::with_random_id("").id);
    let state = RunState::new(&ns, &name, &id, definition, input);
    let client = Client::new(crate::discover::connect(&args.queue_args, Some(RUN_QUEUE)).await?);
    let runs = QueueRef::new(&ns, RUN_QUEUE);
    let ack = start(&client, &runs, &state).await?;
    let note = if ack.duplicate {
        " (already started)"
    } else {
        ""
    };
    println!("{id}{note}");
    if !args.wait {
        return Ok(());
    }
    let started = Instant::now();
    loop {
        match client.result(&runs, &state.run).await? {
            Some(JobResult::Completed { result, .. }) => {
                println!("{}", String::from_utf8_lossy(&result));
                return Ok(());
            }
            Some(JobResult::DeadLettered { error, .. }) => bail!("run {id} failed: {error}"),
            Some(JobResult::Cancelled { .. }) => bail!("run {id} was cancelled"),
            None if started.elapsed() >= args.timeout => {
                bail!("run {id} did not finish within {:?}", args.timeout)
            }
            None => tokio::time::sleep(POLL).await,
        }
    }
}

/// One line per finished step job: wave, job, outcome, result (cut to a line).
async fn show(args: &ShowArgs) -> anyhow::Result<()> {
    let ns = &args.queue_args.namespace;
    let nats = crate::discover::connect(&args.queue_args, Some(RUN_QUEUE)).await?;
    let run = run_job_id(&args.workflow, &args.run);
    let prefix = format!("{run}.");
    let mut rows: Vec<[String; 4]> = Vec::new();
    for wave in 0..MAX_WAVES {
        let parent = if wave == 0 {
            run.clone()
        } else {
            continuation_id(&run, wave)
        };
        let parent = JobRef::new(ns.as_str(), RUN_QUEUE, parent);
        let mut after = 0;
        let mut any = false;
        loop {
            let page = flow::children_page(&nats, &parent, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.sequence;
            for child in page {
                any = true;
                let step = child
                    .job
                    .id
                    .strip_prefix(&prefix)
                    .unwrap_or(&child.job.id)
                    .to_owned();
                let (outcome, result) = match &child.outcome {
                    Outcome::Completed => (
                        "completed".to_string(),
                        String::from_utf8_lossy(&child.result).into_owned(),
                    ),
                    Outcome::DeadLettered { reason, error, .. } => {
                        ("failed".to_string(), format!("{reason}: {error}"))
                    }
                    _ => ("cancelled".to_string(), String::new()),
                };
                let result = crate::table::excerpt(&result.replace('\n', " "), 60);
                rows.push([wave.to_string(), step, outcome, result]);
            }
        }
        if !any {
            break;
        }
    }
    let runs = QueueRef::new(ns.as_str(), RUN_QUEUE);
    let state = match Client::new(nats).result(&runs, &run).await? {
        Some(JobResult::Completed { result, .. }) => {
            format!("completed: {}", String::from_utf8_lossy(&result))
        }
        Some(JobResult::DeadLettered { error, .. }) => format!("failed: {error}"),
        Some(JobResult::Cancelled { .. }) => "cancelled".into(),
        None => "running (or its outcome is no longer kept)".into(),
    };
    println!("run {} of {}: {state}", args.run, args.workflow);
    let header = ["WAVE", "STEP", "OUTCOME", "RESULT"];
    print!("{}", crate::table::render(&header, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_input_is_json_and_bad_json_is_refused() {
        assert_eq!(input(r#"{"a": 1}"#).unwrap(), serde_json::json!({"a": 1}));
        assert!(input("{nope").is_err());
        assert!(input("/no/such/file.json").is_err());
    }
}
