//! `conveyor submit`: publishes jobs through the SDK's [`conveyor::Client`] and prints the id of
//! every job the queue stored, one per line, so scripts can pipe them on.
//!
//! Jobs are made as they are sent, a chunk at a time ([`CHUNK_JOBS`], [`CHUNK_BYTES`]), so
//! `--count 1000000` or a large `--jsonl` file holds one chunk in memory, not the whole load.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use conveyor::client::{Client, Job, JobResult, SubmitError};
use conveyor::names::QueueRef;
use futures::StreamExt;

use crate::args::{CancelArgs, IfFailedArg, ResultArgs, SubmitArgs};
use crate::input::{self, JobInput, PayloadSource};
use conveyor::flow::{Dependency, JobRef};

/// Jobs awaited at once with `--wait`.
const WAIT_WINDOW: usize = 256;

/// Most jobs handed to one [`Client::submit_batch`] (which keeps 256 publishes in flight): large
/// enough that the window rarely drains between chunks, small enough to hold.
const CHUNK_JOBS: usize = 4096;

/// Payload bytes after which a chunk is sent even if it has fewer than [`CHUNK_JOBS`] jobs (the
/// job that reaches it is the chunk's last), so large `--jsonl` payloads are not held 4096 at once.
const CHUNK_BYTES: usize = 16 << 20;

/// The jobs of a submission, made one by one; an error (a `--jsonl` file that changed since it
/// was checked) ends them.
type Inputs = Box<dyn Iterator<Item = anyhow::Result<JobInput>> + Send>;

/// Runs `conveyor submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let jobs = read_jobs(&args)?;
    let queue = args.queue_args.queue(&args.queue);
    let client = Client::new(crate::discover::connect(&args.queue_args, Some(&args.queue)).await?);
    let started = Instant::now();
    let dependencies = after(&args)?;
    let options = Options {
        priority: args.priority,
        delay: args.delay,
        timeout: args.timeout,
        max_attempts: args.max_attempts,
        after: &dependencies,
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
pub struct Options<'a> {
    /// Priority level.
    pub priority: u8,
    /// Run no earlier than this long from now.
    pub delay: Option<Duration>,
    /// Timeout of one attempt (the `Conveyor-Timeout` header).
    pub timeout: Option<Duration>,
    /// Most attempts (the `Conveyor-Max-Attempts` header).
    pub max_attempts: Option<u32>,
    /// Jobs each job waits for (`--after`), made once per run.
    pub after: &'a [Dependency],
}

/// The dependencies `--after` and `--if-failed` name, relative to the submitted-to queue.
fn after(args: &SubmitArgs) -> anyhow::Result<Vec<Dependency>> {
    let home = (args.queue_args.namespace.as_str(), args.queue.as_str());
    let mut dependencies = Vec::with_capacity(args.after.len());
    for text in &args.after {
        let job = JobRef::parse(text, home).with_context(|| format!("--after {text:?}"))?;
        let dependency = Dependency::on(job);
        dependencies.push(match args.if_failed {
            IfFailedArg::Fail => dependency,
            IfFailedArg::Run => dependency.run_if_failed(),
        });
    }
    Ok(dependencies)
}

impl Options<'_> {
    fn job(&self, input: JobInput) -> Job {
        let job = match input.id {
            Some(id) => Job::new(id, input.payload),
            None => Job::with_random_id(input.payload),
        }
        .priority(self.priority);
        let job = match self.timeout {
            Some(timeout) => job.timeout(timeout),
            None => job,
        };
        let job = match self.max_attempts {
            Some(attempts) => job.max_attempts(attempts),
            None => job,
        };
        let job = self
            .after
            .iter()
            .cloned()
            .fold(job, |job, dependency| job.after(dependency));
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
    jobs: Inputs,
    options: Options<'_>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut outcomes = futures::stream::iter(jobs)
        .map(|input| async move {
            let job = options.job(input.map_err(|e| format!("{e:#}"))?);
            let id = job.id.clone();
            // Progress goes to stderr, so stdout keeps one outcome line per job.
            let on_progress = move |update: bytes::Bytes| {
                eprintln!(
                    "{id}\tprogress\t{}",
                    one_line(&String::from_utf8_lossy(&update))
                );
            };
            client
                .submit_and_watch(queue, job, timeout, on_progress)
                .await
                .map_err(|e| e.to_string())
        })
        .buffer_unordered(WAIT_WINDOW);
    let mut stdout = std::io::stdout().lock();
    let (mut total, mut completed, mut first_problem) = (0usize, 0usize, None::<String>);
    while let Some(outcome) = outcomes.next().await {
        total += 1;
        let line = match outcome {
            Ok(result) => {
                if matches!(result, JobResult::Completed { .. }) {
                    completed += 1;
                }
                outcome_line(&result)
            }
            Err(error) => format!("-\terror\t{}", one_line(&error)),
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
    let client = Client::new(crate::discover::connect(&args.queue_args, Some(&args.queue)).await?);
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
    let client = Client::new(crate::discover::connect(&args.queue_args, Some(&args.queue)).await?);
    let mut refused = 0;
    for id in &args.ids {
        let cancelled = if args.with_children {
            client.cancel_with_children(&queue, id).await
        } else {
            client.cancel(&queue, id).await
        };
        match cancelled {
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

/// Submits `jobs` a chunk at a time, printing each stored job's id on stdout, in order, as its
/// chunk is acknowledged. Fails, after submitting all it can, when any job was refused, with the
/// first refusal's reason; an error of the inputs stops it after the jobs before it were sent.
pub async fn submit(
    client: &Client,
    queue: &QueueRef,
    mut jobs: Inputs,
    options: Options<'_>,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        stored: 0,
        duplicates: 0,
    };
    let (mut total, mut refused, mut first_refusal) = (0usize, 0usize, None::<SubmitError>);
    loop {
        let (chunk, input_error) = next_chunk(&mut jobs, options);
        if chunk.is_empty() && input_error.is_none() {
            break;
        }
        total += chunk.len();
        let results = client.submit_batch(queue, chunk).await;
        let mut stdout = std::io::stdout().lock();
        for result in results {
            match result {
                Ok(ack) => {
                    outcome.stored += 1;
                    outcome.duplicates += usize::from(ack.duplicate);
                    writeln!(stdout, "{}", ack.id).context("cannot write to stdout")?;
                }
                Err(e) => {
                    refused += 1;
                    first_refusal.get_or_insert(e);
                }
            }
        }
        stdout.flush().context("cannot write to stdout")?;
        if let Some(e) = input_error {
            return Err(e.context(format!("stopped after {} job(s) submitted", outcome.stored)));
        }
    }
    if let Some(first) = first_refusal {
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
        bail!("{refused} of {total} job(s) refused; first: {first}{hint}");
    }
    Ok(outcome)
}

/// The next chunk of jobs: up to [`CHUNK_JOBS`] jobs, ending after the job that brings its
/// payloads to [`CHUNK_BYTES`], or before an input error, which is returned beside it.
fn next_chunk(jobs: &mut Inputs, options: Options<'_>) -> (Vec<Job>, Option<anyhow::Error>) {
    let (mut chunk, mut bytes) = (Vec::new(), 0usize);
    while chunk.len() < CHUNK_JOBS && bytes < CHUNK_BYTES {
        match jobs.next() {
            Some(Ok(input)) => {
                bytes += input.payload.len();
                chunk.push(options.job(input));
            }
            Some(Err(e)) => return (chunk, Some(e)),
            None => break,
        }
    }
    (chunk, None)
}

/// The jobs of the arguments, checked before anything is sent: every line of a `--jsonl` file,
/// or the `--id` with `--count` and the payload, read once and shared by all jobs.
fn read_jobs(args: &SubmitArgs) -> anyhow::Result<Inputs> {
    if let Some(path) = &args.jsonl {
        return Ok(Box::new(input::Jsonl::open(path)?.jobs()));
    }
    if let Some(id) = &args.id {
        // The longest id a --count makes is the last one.
        let last = match args.count {
            1 => id.clone(),
            n => format!("{id}-{n}"),
        };
        conveyor::protocol::validate_id(&last).map_err(|e| match args.count {
            1 => anyhow!("--id: {e}"),
            n => anyhow!("--id with --count {n}: the last {e}"),
        })?;
    }
    let source = match (&args.payload, &args.file) {
        (Some(payload), _) => PayloadSource::Argument(payload),
        (None, Some(file)) => PayloadSource::File(file),
        (None, None) => PayloadSource::Stdin,
    };
    let payload = input::read_payload(source)?;
    Ok(Box::new(
        input::repeated(payload, args.id.clone(), args.count).map(Ok),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(n: usize, payload: bytes::Bytes) -> Inputs {
        Box::new((0..n).map(move |i| {
            Ok(JobInput {
                id: Some(format!("j{i}")),
                payload: payload.clone(),
            })
        }))
    }

    fn submit_args(args: &[&str]) -> SubmitArgs {
        use clap::Parser as _;
        let cli = crate::args::Cli::try_parse_from([&["conveyor", "submit"], args].concat())
            .expect("the flags parse");
        let crate::args::Command::Submit(args) = cli.command else {
            panic!("submit")
        };
        args
    }

    #[test]
    fn after_names_dependencies_relative_to_the_queue_and_refuses_bad_ones() {
        let args = submit_args(&[
            "--after",
            "a,kids/b,ns2/q2/c",
            "--if-failed",
            "run",
            "q",
            "x",
        ]);
        let home = args.queue_args.namespace.clone();
        assert_eq!(
            after(&args).unwrap(),
            vec![
                Dependency::on(JobRef::new(&home, "q", "a")).run_if_failed(),
                Dependency::on(JobRef::new(&home, "kids", "b")).run_if_failed(),
                Dependency::on(JobRef::new("ns2", "q2", "c")).run_if_failed(),
            ]
        );
        assert!(after(&submit_args(&["q", "x"])).unwrap().is_empty());
        for bad in ["Q/a", "ns//a", "a;b", "a b"] {
            let error = after(&submit_args(&["--after", bad, "q", "x"]))
                .expect_err("a bad reference is refused");
            assert!(
                format!("{error:#}").starts_with(&format!("--after {bad:?}")),
                "{error:#}"
            );
        }
    }

    #[test]
    fn chunks_hold_a_bounded_number_of_jobs_and_bytes() {
        let mut jobs = inputs(10_000, bytes::Bytes::from_static(b"x"));
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let (chunk, error) = next_chunk(&mut jobs, Options::default());
            assert!(error.is_none());
            (!chunk.is_empty()).then_some(chunk.len())
        })
        .collect();
        assert_eq!(sizes, [CHUNK_JOBS, CHUNK_JOBS, 10_000 - 2 * CHUNK_JOBS]);

        let big = bytes::Bytes::from(vec![0u8; 6 << 20]);
        let mut jobs = inputs(5, big);
        let (chunk, _) = next_chunk(&mut jobs, Options::default());
        assert_eq!(
            chunk.len(),
            3,
            "16 MiB are reached with the third 6 MiB job"
        );
        assert_eq!(chunk[0].id, "j0");
    }

    #[test]
    fn an_input_error_ends_the_chunk_after_the_jobs_before_it() {
        let mut jobs: Inputs = Box::new(
            [Ok(JobInput {
                id: None,
                payload: bytes::Bytes::new(),
            })]
            .into_iter()
            .chain(std::iter::once(Err(anyhow!("line 2: broken")))),
        );
        let (chunk, error) = next_chunk(&mut jobs, Options::default());
        assert_eq!(chunk.len(), 1);
        assert_eq!(error.unwrap().to_string(), "line 2: broken");
    }
}
