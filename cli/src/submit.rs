//! `conveyor submit`: publishes jobs through the SDK's [`conveyor::Client`] and prints the id of
//! every job the queue stored, one per line, so scripts can pipe them on.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conveyor::client::{Client, Job, JobResult, SubmitError};
use conveyor::names::QueueRef;
use futures::StreamExt;

use crate::args::{CancelArgs, ResultArgs, SubmitArgs};
use crate::input::{self, JobInput, PayloadSource};

/// Jobs awaited at once with `--wait`.
const WAIT_WINDOW: usize = 256;

/// Runs `conveyor submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let jobs = read_jobs(&args)?;
    let queue = args.queue_args.queue(&args.queue);
    let url = crate::discover::nats_url(&args.queue_args, Some(&args.queue)).await?;
    let client = Client::connect(&url).await?;
    let started = Instant::now();
    let options = Options {
        priority: args.priority,
        delay: args.delay,
    };
    if args.wait {
        return submit_and_wait(&client, &queue, jobs, options, args.wait_timeout).await;
    }
    let outcome = submit(&client, &queue, jobs, options).await?;
    eprintln!(
        "submitted {} job(s) to {}/{} in {:.2?}{}",
        outcome.stored,
        queue.namespace,
        queue.name,
        started.elapsed(),
        if outcome.duplicates > 0 {
            format!(
                " ({} already submitted before, not queued again)",
                outcome.duplicates
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Per-job settings from the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Priority level.
    pub priority: u8,
    /// Run no earlier than this long from now.
    pub delay: Option<Duration>,
}

impl Options {
    fn job(&self, input: JobInput) -> Job {
        let job = match input.id {
            Some(id) => Job::new(id, input.payload),
            None => Job::with_random_id(input.payload),
        }
        .priority(self.priority);
        match self.delay {
            Some(delay) => job.delay(delay),
            None => job,
        }
    }
}

/// Submits each job and waits for its outcome (`--wait`), up to `WAIT_WINDOW` at once, printing
/// `<id>\t<outcome>\t<result or error>` as outcomes arrive. Fails unless every job completed.
async fn submit_and_wait(
    client: &Client,
    queue: &QueueRef,
    jobs: Vec<JobInput>,
    options: Options,
    timeout: Duration,
) -> anyhow::Result<()> {
    let total = jobs.len();
    let mut outcomes = futures::stream::iter(jobs)
        .map(|input| {
            let job = options.job(input);
            let id = job.id.clone();
            // Progress goes to stderr, so stdout keeps one outcome line per job.
            let on_progress = move |update: bytes::Bytes| {
                eprintln!(
                    "{id}\tprogress\t{}",
                    one_line(&String::from_utf8_lossy(&update))
                );
            };
            client.submit_and_watch(queue, job, timeout, on_progress)
        })
        .buffer_unordered(WAIT_WINDOW);
    let mut stdout = std::io::stdout().lock();
    let (mut completed, mut first_problem) = (0usize, None::<String>);
    while let Some(outcome) = outcomes.next().await {
        let line = match outcome {
            Ok(result) => {
                if matches!(result, JobResult::Completed { .. }) {
                    completed += 1;
                }
                outcome_line(&result)
            }
            Err(error) => format!("-\terror\t{}", one_line(&error.to_string())),
        };
        if !line.contains("\tcompleted\t") && first_problem.is_none() {
            first_problem = Some(line.replace('\t', " "));
        }
        writeln!(stdout, "{line}").context("cannot write to stdout")?;
    }
    stdout.flush().context("cannot write to stdout")?;
    eprintln!(
        "{completed} of {total} job(s) completed on {}/{}",
        queue.namespace, queue.name
    );
    match first_problem {
        Some(first) => bail!(
            "{} of {total} job(s) did not complete; first: {first}",
            total - completed
        ),
        None => Ok(()),
    }
}

/// A job's outcome as one tab-separated line: `<id> completed <result>`, `<id> dead-lettered
/// <reason> after <n> attempt(s): <error>` or `<id> cancelled`.
fn outcome_line(result: &JobResult) -> String {
    match result {
        JobResult::Completed { id, result } => format!(
            "{id}\tcompleted\t{}",
            one_line(&String::from_utf8_lossy(result))
        ),
        JobResult::DeadLettered {
            id,
            reason,
            error,
            attempts,
        } => format!(
            "{id}\tdead-lettered\t{reason} after {attempts} attempt(s): {}",
            one_line(error)
        ),
        JobResult::Cancelled { id } => format!("{id}\tcancelled\t"),
    }
}

/// Runs `conveyor result`: one outcome line per stored result; fails when any id has none.
pub async fn result(args: ResultArgs) -> anyhow::Result<()> {
    let queue = args.queue_args.queue(&args.queue);
    let url = crate::discover::nats_url(&args.queue_args, Some(&args.queue)).await?;
    let client = Client::connect(&url).await?;
    let mut missing = Vec::new();
    for id in &args.ids {
        match client.result(&queue, id).await? {
            Some(result) => println!("{}", outcome_line(&result)),
            None => missing.push(id.as_str()),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "no stored result for {} (not finished yet, older than the queue's results.retention, \
         or the queue keeps no results)",
        missing.join(", ")
    )
}

/// Results and errors on one output line.
fn one_line(text: &str) -> String {
    text.trim_end().replace(['\n', '\r', '\t'], " ")
}

/// Runs `conveyor cancel`: prints each cancelled id; fails if any cancel was refused.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let queue = args.queue_args.queue(&args.queue);
    let url = crate::discover::nats_url(&args.queue_args, Some(&args.queue)).await?;
    let client = Client::connect(&url).await?;
    let mut refused = 0;
    for id in &args.ids {
        match client.cancel(&queue, id).await {
            Ok(ack) if ack.schedule_removed => {
                println!("{id}\tcancelled (was delayed; it will never run)")
            }
            Ok(_) => println!("{id}\tcancelled"),
            Err(error) => {
                refused += 1;
                eprintln!("error: cannot cancel {id}: {error}");
            }
        }
    }
    if refused > 0 {
        bail!("{refused} of {} cancel(s) failed", args.ids.len());
    }
    Ok(())
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Jobs the queue acknowledged (including duplicates).
    pub stored: usize,
    /// Jobs whose id the queue had seen inside its deduplication window.
    pub duplicates: usize,
}

/// Submits `jobs`, printing each stored job's id on stdout. Fails, after submitting all it can,
/// when any job was refused, with the first refusal's reason.
pub async fn submit(
    client: &Client,
    queue: &QueueRef,
    jobs: Vec<JobInput>,
    options: Options,
) -> anyhow::Result<Outcome> {
    let total = jobs.len();
    let jobs = jobs.into_iter().map(|j| options.job(j));
    let results = client.submit_batch(queue, jobs).await;
    let mut stdout = std::io::stdout().lock();
    let mut outcome = Outcome {
        stored: 0,
        duplicates: 0,
    };
    let mut refused: Vec<SubmitError> = Vec::new();
    for result in results {
        match result {
            Ok(ack) => {
                outcome.stored += 1;
                outcome.duplicates += usize::from(ack.duplicate);
                writeln!(stdout, "{}", ack.id).context("cannot write to stdout")?;
            }
            Err(e) => refused.push(e),
        }
    }
    stdout.flush().context("cannot write to stdout")?;
    if let Some(first) = refused.first() {
        let hint = match first {
            SubmitError::NoSuchQueue { .. } => format!(
                " (is the JobQueue applied and Ready? kubectl get jobqueue {} -n {})",
                queue.name, queue.namespace
            ),
            _ => String::new(),
        };
        if total == 1 {
            bail!("{first}{hint}");
        }
        bail!(
            "{} of {total} job(s) refused; first: {first}{hint}",
            refused.len()
        );
    }
    Ok(outcome)
}

/// The jobs the arguments describe.
fn read_jobs(args: &SubmitArgs) -> anyhow::Result<Vec<JobInput>> {
    if let Some(path) = &args.jsonl {
        return input::read_jsonl(path);
    }
    let source = match (&args.payload, &args.file) {
        (Some(payload), _) => PayloadSource::Argument(payload),
        (None, Some(file)) => PayloadSource::File(file),
        (None, None) => PayloadSource::Stdin,
    };
    let payload = input::read_payload(source)?;
    Ok(input::repeated(payload, args.id.as_deref(), args.count))
}
