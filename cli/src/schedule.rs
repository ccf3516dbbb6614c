//! `conveyor schedule`: the JobSchedules of a namespace — list them with their last and next
//! run, show one, pause and resume one (`spec.suspend`, through the Kubernetes API), or submit
//! one run now (`trigger`: the job the NATS server holds for the schedule, with the id
//! `<name>@manual-<now>`, so a second trigger within the same second is a duplicate, and a
//! trigger at a slot's second does not make that slot's run one).

use anyhow::{Context as _, anyhow};
use clap::{Args, Subcommand};
use conveyor_crds::JobSchedule;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::KubeConfigOptions;
use kube::{Api, ResourceExt};
use serde::Serialize;

use crate::args::{Output, QueueArgs};
use crate::table;

/// Arguments of `conveyor schedule`.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ScheduleCommand,
}

/// The `schedule` subcommands.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// List the namespace's JobSchedules: queue, schedule, suspended, last and next run.
    List(ListArgs),
    /// Show one JobSchedule: its job, its state and its last run.
    Show(NameArgs),
    /// Submit one run now, with the job id `<name>@manual-<now>`.
    Trigger(NameArgs),
    /// Pause a schedule (`spec.suspend: true`): the NATS server stops submitting runs.
    Suspend(NameArgs),
    /// Resume a paused schedule; it starts afresh, without catching up on skipped runs.
    Resume(NameArgs),
}

/// Arguments of `conveyor schedule list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Output format: `table`, or `json` (an array of one object per schedule, for scripts).
    #[arg(long, short = 'o', env = "CONVEYOR_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of the `schedule` subcommands that name one JobSchedule.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobSchedule.
    pub name: String,
}

/// Runs `conveyor schedule …`.
pub async fn run(args: ScheduleArgs) -> anyhow::Result<()> {
    match args.command {
        ScheduleCommand::List(args) => list(&args.queue_args, args.output).await,
        ScheduleCommand::Show(args) => show(&args).await,
        ScheduleCommand::Trigger(args) => trigger(&args).await,
        ScheduleCommand::Suspend(args) => set_suspend(&args, true).await,
        ScheduleCommand::Resume(args) => set_suspend(&args, false).await,
    }
}

async fn api(args: &QueueArgs) -> anyhow::Result<Api<JobSchedule>> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .context("reading the kubeconfig (JobSchedules live in Kubernetes)")?;
    let client = kube::Client::try_from(config).context("building a Kubernetes client")?;
    Ok(Api::namespaced(client, &args.namespace))
}

async fn get(args: &NameArgs) -> anyhow::Result<(Api<JobSchedule>, JobSchedule)> {
    let api = api(&args.queue_args).await?;
    let ns = &args.queue_args.namespace;
    let schedule = api
        .get_opt(&args.name)
        .await
        .with_context(|| format!("looking up JobSchedule {ns}/{}", args.name))?
        .ok_or_else(|| anyhow!("no JobSchedule {} in namespace {ns}", args.name))?;
    Ok((api, schedule))
}

/// The columns of `schedule list`, one cell each in a [`row`].
const HEADER: [&str; 7] = [
    "NAME", "QUEUE", "SCHEDULE", "SUSPEND", "LAST RUN", "NEXT", "READY",
];

/// One row of `schedule list`.
fn row(s: &JobSchedule) -> [String; 7] {
    let status = s.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| format!("{} ({})", c.status, c.reason))
        .unwrap_or_else(|| "-".into());
    [
        s.name_any(),
        s.spec.job.queue.clone(),
        s.spec.schedule.clone(),
        s.spec.suspend.to_string(),
        status
            .last_run
            .map(|r| r.job_id)
            .unwrap_or_else(|| "-".into()),
        status
            .next_run
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| "-".into()),
        ready,
    ]
}

/// The `Ready` condition of `schedule list -o json`.
#[derive(Debug, Serialize, PartialEq)]
struct Ready {
    status: String,
    reason: String,
    message: String,
}

/// The last run of `schedule list -o json`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct LastRun {
    time: String,
    job_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
}

/// One object of `schedule list -o json`: the table's columns and the rest of the state, with
/// absent values as `null`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct JsonRow {
    name: String,
    queue: String,
    schedule: String,
    time_zone: Option<String>,
    suspend: bool,
    concurrency_policy: conveyor_crds::ConcurrencyPolicy,
    starting_deadline: Option<String>,
    last_run: Option<LastRun>,
    next_run: Option<String>,
    missed_runs: u64,
    last_missed: Option<String>,
    ready: Option<Ready>,
}

fn json_row(s: &JobSchedule) -> JsonRow {
    let status = s.status.clone().unwrap_or_default();
    JsonRow {
        name: s.name_any(),
        queue: s.spec.job.queue.clone(),
        schedule: s.spec.schedule.clone(),
        time_zone: s.spec.time_zone.clone(),
        suspend: s.spec.suspend,
        concurrency_policy: s.spec.concurrency_policy,
        starting_deadline: s.spec.starting_deadline.clone(),
        last_run: status.last_run.map(|run| LastRun {
            time: run.time.0.to_string(),
            job_id: run.job_id,
            outcome: run.outcome,
        }),
        next_run: status.next_run.map(|t| t.0.to_string()),
        missed_runs: status.missed_runs,
        last_missed: status.last_missed,
        ready: status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| Ready {
                status: c.status,
                reason: c.reason,
                message: c.message,
            }),
    }
}

async fn list(args: &QueueArgs, output: Output) -> anyhow::Result<()> {
    let api = api(args).await?;
    let schedules = api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing the JobSchedules of {}", args.namespace))?;
    if output == Output::Json {
        let rows: Vec<JsonRow> = schedules.items.iter().map(json_row).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if schedules.items.is_empty() {
        println!("no JobSchedules in namespace {}", args.namespace);
        return Ok(());
    }
    let rows: Vec<_> = schedules.items.iter().map(row).collect();
    print!("{}", table::render(&HEADER, &rows));
    Ok(())
}

async fn show(args: &NameArgs) -> anyhow::Result<()> {
    let (_, s) = get(args).await?;
    let status = s.status.clone().unwrap_or_default();
    println!("name:      {}", s.name_any());
    println!("queue:     {}", s.spec.job.queue);
    println!("schedule:  {}", s.spec.schedule);
    println!(
        "time zone: {}",
        s.spec.time_zone.as_deref().unwrap_or("UTC")
    );
    println!("suspend:   {}", s.spec.suspend);
    println!("policy:    {:?}", s.spec.concurrency_policy);
    if let Some(deadline) = &s.spec.starting_deadline {
        println!("deadline:  {deadline} (startingDeadline)");
    }
    if let Some(ready) = status.conditions.iter().find(|c| c.type_ == "Ready") {
        println!(
            "ready:     {} ({}): {}",
            ready.status, ready.reason, ready.message
        );
    }
    match &status.last_run {
        Some(run) => println!("last run:  {} (job {})", run.time.0, run.job_id),
        None => println!("last run:  -"),
    }
    match &status.next_run {
        Some(next) => println!("next run:  {}", next.0),
        None => println!("next run:  -"),
    }
    if status.missed_runs > 0 {
        println!("missed:    {} run(s)", status.missed_runs);
    }
    if let Some(missed) = &status.last_missed {
        println!("no run:    {missed}");
    }
    if let Some(subject) = &status.subject {
        println!("subject:   {subject}");
    }
    Ok(())
}

async fn trigger(args: &NameArgs) -> anyhow::Result<()> {
    let (_, s) = get(args).await?;
    let queue_name = &s.spec.job.queue;
    let nats = crate::discover::connect(&args.queue_args, Some(queue_name)).await?;
    let js = async_nats::jetstream::new(nats);
    let queue = args.queue_args.queue(queue_name);
    let now = k8s_openapi::jiff::Timestamp::now();
    match conveyor::schedule::trigger(&js, &queue, &args.name, now).await? {
        Some(id) => {
            println!("{id}");
            Ok(())
        }
        None => Err(anyhow!(
            "the NATS server holds no schedule {} (suspended, or not Ready: see `conveyor schedule show {}`)",
            args.name,
            args.name
        )),
    }
}

async fn set_suspend(args: &NameArgs, suspend: bool) -> anyhow::Result<()> {
    let (api, _) = get(args).await?;
    let patch = serde_json::json!({"spec": {"suspend": suspend}});
    api.patch(&args.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("updating JobSchedule {}", args.name))?;
    let done = if suspend { "suspended" } else { "resumed" };
    println!("jobschedule {} {done}", args.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_its_columns() {
        let rows = [[
            "nightly".to_owned(),
            "reports".to_owned(),
            "30 2 * * *".to_owned(),
            "false".to_owned(),
            "nightly@2026-12-02T01:30:00Z".to_owned(),
            "2026-12-03T01:30:00Z".to_owned(),
            "True (Scheduled)".to_owned(),
        ]];
        let out = table::render(&HEADER, &rows);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("QUEUE"), lines[1].find("reports"), "{out}");
        assert_eq!(lines[0].find("READY"), lines[1].find("True"), "{out}");
        // The layout of the table this command printed before it used `table::render`.
        assert_eq!(
            out,
            "NAME      QUEUE     SCHEDULE     SUSPEND   LAST RUN                       NEXT                   READY\n\
             nightly   reports   30 2 * * *   false     nightly@2026-12-02T01:30:00Z   2026-12-03T01:30:00Z   True (Scheduled)\n"
        );
    }
}
