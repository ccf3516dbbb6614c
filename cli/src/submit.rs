//! `conveyor submit`: publishes jobs through the SDK's [`conveyor::Client`] and prints the id of
//! every job the queue stored, one per line, so scripts can pipe them on.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{Context, bail};
use conveyor::client::{Client, Job, SubmitError};
use conveyor::names::QueueRef;

use crate::args::SubmitArgs;
use crate::input::{self, JobInput, PayloadSource};

/// Runs `conveyor submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let jobs = read_jobs(&args)?;
    let queue = args.queue_args.queue(&args.queue);
    let client = Client::connect(&args.queue_args.nats_url).await?;
    let started = Instant::now();
    let outcome = submit(&client, &queue, jobs, args.priority).await?;
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
    priority: u8,
) -> anyhow::Result<Outcome> {
    let total = jobs.len();
    let jobs = jobs.into_iter().map(|j| {
        let job = match j.id {
            Some(id) => Job::new(id, j.payload),
            None => Job::with_random_id(j.payload),
        };
        job.priority(priority)
    });
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
