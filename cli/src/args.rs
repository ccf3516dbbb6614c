//! Command-line arguments of `conveyor`: the subcommands and their flags (the flags several
//! subcommands share are in [`crate::flags`]). Every flag can also be set from the environment;
//! the `///` lines here are the `--help` text.
//!
//! Every number and duration a flag takes is bounded ([`bounds`]): a value out of range or
//! malformed is refused by clap before anything runs, with one line naming the flag and the
//! range, so no flag value can overflow, panic, hang or allocate without limit further on.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use crate::flags::{NatsArgs, Output, QueueArgs, bounds};

/// Conveyor: durable job queues on NATS JetStream, run by a Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Logging (`--log-format`, the same in every Conveyor binary).
    #[command(flatten)]
    pub log: conveyor_logging::LogArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit jobs to a queue and print their ids.
    Submit(SubmitArgs),
    /// Cancel queued, delayed or running jobs by id.
    Cancel(CancelArgs),
    /// Show queue figures (pending, in flight, dead-lettered) read straight from JetStream.
    Status(StatusArgs),
    /// Print the stored outcome of finished jobs (queues with `results.retention`).
    Result(ResultArgs),
    /// Run NATS, the Kubernetes test double and the operator locally, no cluster needed.
    #[cfg(feature = "dev")]
    Dev(DevArgs),
    /// Inspect, requeue and purge a queue's dead letters.
    Dlq(crate::dlq::DlqArgs),
    /// Peek at a queue's pending jobs (by priority level) or delayed jobs, a page at a time.
    Jobs(crate::jobs::JobsArgs),
    /// List, show, trigger, suspend and resume JobSchedules (recurring jobs).
    Schedule(crate::schedule::ScheduleArgs),
    /// Measure Conveyor against raw JetStream on the same server in the same run.
    #[cfg(feature = "dev")]
    Bench(BenchArgs),
    /// A refreshing view of a namespace's queues and workers (figures, rates, conditions).
    Top(crate::top::TopArgs),
    /// Where one job stands: waiting (for what), continued, finished; its children's count.
    Job(crate::job::JobArgs),
    /// The children of a parent job: counts by outcome and the first few, however many.
    Flow(crate::flow::FlowArgs),
    /// Start a run of a Workflow (`--wait` for its result), or show a run's steps.
    Run(Box<crate::run::RunArgs>),
    /// Sign a producer identity for one queue with an account signing key and print its
    /// `.creds` (may submit to the queue and read its results, nothing else).
    Credentials(crate::credentials::CredentialsArgs),
}

impl Command {
    /// The log filter when `RUST_LOG` is not set: quiet for one-shot commands, the operator's
    /// story for `dev`.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Submit(_)
            | Command::Status(_)
            | Command::Dlq(_)
            | Command::Jobs(_)
            | Command::Schedule(_)
            | Command::Cancel(_)
            | Command::Result(_)
            | Command::Job(_)
            | Command::Flow(_)
            | Command::Run(_)
            | Command::Credentials(_)
            | Command::Top(_) => "warn",
            // kube-client traces every failed request at ERROR, which at a clean shutdown are
            // the operator's watches cut off as the test double stops; the operator reports
            // each failure it acts on itself ("reconcile failed, retrying").
            #[cfg(feature = "dev")]
            Command::Dev(_) => "warn,conveyor_operator=info,kube_client::client::builder=off",
            #[cfg(feature = "dev")]
            Command::Bench(_) => "warn",
        }
    }
}

/// What a failed dependency means (`--if-failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IfFailedArg {
    /// The dependent is dead-lettered too.
    Fail,
    /// The dependent runs anyway.
    Run,
}

/// Arguments of `conveyor submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue to submit to.
    pub queue: String,
    /// The job's payload. Without it (and without --file or --jsonl) the payload is read from stdin.
    #[arg(conflicts_with_all = ["file", "jsonl"])]
    pub payload: Option<String>,
    /// Read the payload from this file (`-` for stdin).
    #[arg(
        long,
        short = 'f',
        env = "CONVEYOR_SUBMIT_FILE",
        conflicts_with = "jsonl"
    )]
    pub file: Option<PathBuf>,
    /// Submit one job per line of this JSON Lines file (`-` for stdin): `{"id": "...", "payload": ...}`
    /// or, for any other line, the line itself as the payload.
    #[arg(long, env = "CONVEYOR_SUBMIT_JSONL", conflicts_with_all = ["id", "count"])]
    pub jsonl: Option<PathBuf>,
    /// Job id, the idempotency key: a second job with the same id within the queue's
    /// deduplication window is ignored. With --count N the ids are <ID>-1 … <ID>-N. Default: a
    /// fresh unique id per job.
    #[arg(long, env = "CONVEYOR_JOB_ID")]
    pub id: Option<String>,
    /// Submit the payload this many times (quick load), 1 to 1000000. The jobs are made and
    /// sent a window at a time, never all held at once.
    #[arg(long, env = "CONVEYOR_SUBMIT_COUNT", default_value_t = 1,
          value_parser = |s: &str| bounds::number::<u64>(s, 1, bounds::MAX_COUNT))]
    pub count: u64,
    /// Priority level of the jobs: 0 (default, lowest) up to the queue's `priorities` - 1
    /// (at most 9).
    #[arg(long, short = 'p', env = "CONVEYOR_PRIORITY", default_value_t = 0,
          value_parser = |s: &str| bounds::number::<u8>(s, 0, bounds::MAX_PRIORITY))]
    pub priority: u8,
    /// Run the jobs no earlier than this long from now (e.g. `30s`, `5m`, `2h`; at most
    /// `365d`); durable across server restarts.
    #[arg(long, env = "CONVEYOR_DELAY",
          value_parser = |s: &str| bounds::duration(s, Duration::ZERO, bounds::MAX_DELAY))]
    pub delay: Option<Duration>,
    /// Longest one attempt of each job may run before the runtime stops it and counts a
    /// failed attempt (e.g. `1500ms`, `30s`, `2h`; `1ms` to `168h`); the Worker's default
    /// (the queue's `timeout`) when absent.
    #[arg(long, env = "CONVEYOR_JOB_TIMEOUT",
          value_parser = |s: &str| bounds::duration(s, bounds::MILLISECOND, conveyor::protocol::envelope::MAX_TIMEOUT))]
    pub timeout: Option<Duration>,
    /// Most attempts of each job, first included (1 to 1000); it cannot raise the queue's
    /// `retry.maxAttempts`, only lower it. The queue's when absent.
    #[arg(long, env = "CONVEYOR_MAX_ATTEMPTS",
          value_parser = |s: &str| bounds::number::<u32>(s, 1, bounds::MAX_ATTEMPTS))]
    pub max_attempts: Option<u32>,
    /// Wait for every job's outcome and print one line per job: `<id> <completed|dead-lettered|
    /// cancelled> <result or error>`. Exits non-zero unless every job completed.
    #[arg(long, short = 'w', env = "CONVEYOR_WAIT")]
    pub wait: bool,
    /// Run only once these jobs have finished: `ID` (same queue), `QUEUE/ID` or
    /// `NAMESPACE/QUEUE/ID`, comma-separated, up to 64. Until then the job waits (the queue's
    /// `waiting` figure), holding no worker.
    #[arg(
        long,
        env = "CONVEYOR_SUBMIT_AFTER",
        value_delimiter = ',',
        value_name = "ID",
        conflicts_with = "delay"
    )]
    pub after: Vec<String>,
    /// With --after: what a dependency that failed means: `fail` (this job is dead-lettered,
    /// reason `dependency_failed`) or `run` (it runs anyway and is told which failed).
    #[arg(
        long,
        env = "CONVEYOR_SUBMIT_IF_FAILED",
        value_enum,
        default_value = "fail",
        requires = "after"
    )]
    pub if_failed: IfFailedArg,
    /// With --wait: how long to wait for each job's outcome (`1s` to `7d`).
    #[arg(long, env = "CONVEYOR_WAIT_TIMEOUT", default_value = "5m",
          value_parser = |s: &str| bounds::duration(s, bounds::SECOND, bounds::MAX_WAIT_TIMEOUT))]
    pub wait_timeout: Duration,
}

/// Arguments of `conveyor cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue.
    pub queue: String,
    /// Ids of the jobs to cancel: a queued or delayed job never runs, a running one is told to
    /// stop and is not retried.
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Cancel the jobs' children too, and theirs: a child that has not started is skipped
    /// (within about a second); one already running finishes.
    #[arg(long)]
    pub with_children: bool,
}

/// Arguments of `conveyor result`.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue (it must keep results: `spec.results.retention`).
    pub queue: String,
    /// Ids of the jobs whose stored outcome to print.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// Arguments of `conveyor status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Connection and namespace.
    #[command(flatten)]
    pub queue_args: QueueArgs,
    /// Name of the JobQueue; every queue of the namespace when omitted.
    pub queue: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', env = "CONVEYOR_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of `conveyor dev`.
#[cfg(feature = "dev")]
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Run the demo: apply examples/hello/, submit jobs, wait until all are processed, print a
    /// summary and exit (non-zero if any step fails).
    #[arg(long, env = "CONVEYOR_DEV_DEMO")]
    pub demo: bool,
    /// Number of jobs the demo submits, 1 to 100000.
    #[arg(long, env = "CONVEYOR_DEV_DEMO_JOBS", default_value_t = 100,
          value_parser = |s: &str| bounds::number::<u64>(s, 1, bounds::MAX_DEMO_JOBS))]
    pub demo_jobs: u64,
    /// Deadline of each step of the demo (e.g. `90s`, `2m`; `1s` to `24h`).
    #[arg(long, env = "CONVEYOR_DEV_TIMEOUT", default_value = "120s",
          value_parser = |s: &str| bounds::duration(s, bounds::SECOND, bounds::MAX_DEV_TIMEOUT))]
    pub timeout: Duration,
    /// Directory for NATS' store, the kubeconfig, pod logs and volumes. Default: a temporary
    /// directory removed on exit.
    #[arg(long, env = "CONVEYOR_DEV_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The nats-server executable (2.12 or newer), by path or name on PATH.
    #[arg(long, env = "CONVEYOR_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// The conveyor-worker runtime binary. Default: the one next to this executable.
    #[arg(long, env = "CONVEYOR_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// The repository's examples/ directory (hello image and manifests). Default: ./examples,
    /// else the one of the source tree this executable was built in.
    #[arg(long, env = "CONVEYOR_EXAMPLES_DIR")]
    pub examples_dir: Option<PathBuf>,
}

/// Arguments of `conveyor bench`.
#[cfg(feature = "dev")]
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// NATS server to measure against; without it the bench starts its own `nats-server -js`
    /// (file storage in a temp dir).
    #[arg(long, env = "CONVEYOR_NATS_URL")]
    pub nats_url: Option<String>,
    /// The `nats-server` executable to start when no `--nats-url` is given.
    #[arg(long, env = "CONVEYOR_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Jobs per throughput measurement, 1 to 2000000.
    #[arg(long, env = "CONVEYOR_BENCH_JOBS", default_value_t = 200_000,
          value_parser = |s: &str| bounds::number::<usize>(s, 1, bounds::MAX_BENCH_JOBS))]
    pub jobs: usize,
    /// Payload size in bytes, 0 to 1048576.
    #[arg(long, env = "CONVEYOR_BENCH_PAYLOAD", default_value_t = 256,
          value_parser = |s: &str| bounds::number::<usize>(s, 0, bounds::MAX_BENCH_PAYLOAD))]
    pub payload: usize,
    /// Jobs a worker holds at once (the raw consumer pulls batches of this size), 1 to 4096.
    #[arg(long, env = "CONVEYOR_BENCH_CONCURRENCY", default_value_t = 64,
          value_parser = |s: &str| bounds::number::<usize>(s, 1, bounds::MAX_BENCH_CONCURRENCY))]
    pub concurrency: usize,
    /// Submission rate of the latency measurement, jobs per second, 1 to 100000.
    #[arg(long, env = "CONVEYOR_BENCH_RATE", default_value_t = 5_000,
          value_parser = |s: &str| bounds::number::<u32>(s, 1, bounds::MAX_BENCH_RATE))]
    pub rate: u32,
    /// Length of the latency measurement in seconds, 1 to 120.
    #[arg(long, env = "CONVEYOR_BENCH_LATENCY_SECONDS", default_value_t = 5,
          value_parser = |s: &str| bounds::number::<u64>(s, 1, bounds::MAX_BENCH_LATENCY_SECONDS))]
    pub latency_seconds: u64,
    /// Rounds of each measurement, 1 to 100; the report gives medians.
    #[arg(long, env = "CONVEYOR_BENCH_ROUNDS", default_value_t = 3,
          value_parser = |s: &str| bounds::number::<usize>(s, 1, bounds::MAX_BENCH_ROUNDS))]
    pub rounds: usize,
    /// Priority levels of Conveyor's queue, 1 to 10; jobs are spread evenly over them (the raw
    /// side has one stream and one consumer either way). Above 1, workers sweep the levels'
    /// consumers.
    #[arg(long, env = "CONVEYOR_BENCH_PRIORITIES", default_value_t = 1,
          value_parser = |s: &str| bounds::number::<u8>(s, 1, u64::from(conveyor::admin::MAX_PRIORITIES)))]
    pub priorities: u8,
    /// Also measure each side's producer and consumer apart (publish into an empty stream;
    /// consume a full one), to tell where a gap in throughput comes from.
    #[arg(long)]
    pub breakdown: bool,
    /// Run Conveyor's workers without storing each outcome in the results stream
    /// (`CONVEYOR_STORE_RESULTS=false` in a pod: its jobs can then not be depended on), to see
    /// what that write costs.
    #[arg(long)]
    pub no_store_results: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::bounds::{self, MAX_DELAY};
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([&["conveyor"], args].concat())
    }

    fn refusal(args: &[&str]) -> String {
        parse(args).expect_err("refused").to_string()
    }

    #[test]
    fn numbers_are_whole_and_in_range() {
        assert_eq!(bounds::number::<u64>("1", 1, 5), Ok(1));
        assert_eq!(bounds::number::<u8>("5", 0, 5), Ok(5));
        for (input, why) in [
            ("0", "out of range; allowed: 1 to 5"),
            ("6", "out of range; allowed: 1 to 5"),
            ("18446744073709551615", "out of range"),
            ("99999999999999999999999999", "out of range"),
            ("-1", "not a whole number; allowed: 1 to 5"),
            ("1.5", "not a whole number"),
            ("", "not a whole number"),
            ("1e3", "not a whole number"),
        ] {
            let err = bounds::number::<u64>(input, 1, 5).unwrap_err();
            assert!(err.starts_with(why), "{input}: {err}");
        }
    }

    #[test]
    fn durations_are_bounded_and_say_the_range() {
        let d = |s| bounds::duration(s, Duration::ZERO, MAX_DELAY);
        assert_eq!(d("0s"), Ok(Duration::ZERO));
        assert_eq!(d("365d"), Ok(MAX_DELAY));
        assert_eq!(d("10m"), Ok(Duration::from_secs(600)));
        for input in [
            "366d",
            "10000y",
            "1000000000000000000000000y",
            "18446744073709551615s",
        ] {
            let err = d(input).unwrap_err();
            assert!(err.contains("allowed: 0s to 365d"), "{input}: {err}");
        }
        for input in ["soon", "-1s", "", "5", "1h-"] {
            let err = d(input).unwrap_err();
            assert!(
                err.contains("allowed: 0s to 365d, e.g. 30s"),
                "{input}: {err}"
            );
        }
        let err = bounds::duration("0s", bounds::SECOND, bounds::MAX_WAIT_TIMEOUT).unwrap_err();
        assert_eq!(err, "out of range; allowed: 1s to 7d");
    }

    /// Out-of-range flags of `dev` and `bench`, with the flag each refusal must name.
    #[cfg(feature = "dev")]
    const DEV_REFUSALS: &[(&[&str], &str)] = &[
        (&["dev", "--demo-jobs", "0"], "--demo-jobs"),
        (&["dev", "--timeout", "100y"], "--timeout"),
        (&["bench", "--payload", "99999999999"], "--payload"),
        (&["bench", "--rate", "0"], "--rate"),
        (
            &["bench", "--latency-seconds", "18446744073709551615"],
            "--latency-seconds",
        ),
        (&["bench", "--rounds", "0"], "--rounds"),
        (&["bench", "--jobs", "0"], "--jobs"),
        (&["bench", "--concurrency", "0"], "--concurrency"),
        (&["bench", "--priorities", "11"], "--priorities"),
    ];
    #[cfg(not(feature = "dev"))]
    const DEV_REFUSALS: &[(&[&str], &str)] = &[];

    #[test]
    fn refusals_name_the_flag_on_their_first_line() {
        let said = refusal(&["submit", "q", "--delay", "10000y", "x"]);
        let first = said.lines().next().unwrap();
        assert!(
            first.contains("'--delay <DELAY>'") && first.contains("0s to 365d"),
            "{said}"
        );
        for (args, flag) in [
            (
                &["submit", "q", "--count", "18446744073709551615", "x"][..],
                "--count",
            ),
            (&["submit", "q", "--count", "100000000", "x"], "--count"),
            (&["submit", "q", "-p", "10", "x"], "--priority"),
            (
                &["submit", "q", "--wait-timeout", "0s", "x"],
                "--wait-timeout",
            ),
        ]
        .into_iter()
        .chain(DEV_REFUSALS.iter().copied())
        {
            let said = refusal(args);
            let first = said.lines().next().unwrap();
            assert!(
                first.contains(&format!("'{flag} <")) && first.contains("allowed: "),
                "{args:?}: {said}"
            );
        }
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let cli = parse(&[
            "submit",
            "q",
            "--count",
            "1000000",
            "-p",
            "9",
            "--delay",
            "365d",
            "--wait-timeout",
            "7d",
            "x",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("submit")
        };
        assert_eq!(args.count, bounds::MAX_COUNT);
        assert_eq!(args.priority, 9);
        assert_eq!(args.delay, Some(MAX_DELAY));
        assert_eq!((args.timeout, args.max_attempts), (None, None));
    }

    #[cfg(feature = "dev")]
    #[test]
    fn bench_defaults_go_through_the_same_parsers() {
        let Command::Bench(bench) = parse(&["bench"]).unwrap().command else {
            panic!("bench")
        };
        assert_eq!((bench.jobs, bench.rate, bench.rounds), (200_000, 5_000, 3));
    }

    #[test]
    fn submit_takes_a_timeout_and_max_attempts_within_their_bounds() {
        let submit = |extra: &[&str]| {
            let mut all = vec!["conveyor", "submit", "q"];
            all.extend_from_slice(extra);
            all.push("x");
            Cli::try_parse_from(all).map(|cli| match cli.command {
                Command::Submit(args) => (args.timeout, args.max_attempts),
                _ => panic!("submit"),
            })
        };
        assert_eq!(
            submit(&["--timeout", "1ms", "--max-attempts", "1"]).unwrap(),
            (Some(Duration::from_millis(1)), Some(1))
        );
        assert_eq!(
            submit(&["--timeout", "168h", "--max-attempts", "1000"]).unwrap(),
            (Some(Duration::from_secs(168 * 3600)), Some(1000))
        );
        for bad in [
            ["--timeout", "0s"],
            ["--timeout", "169h"],
            ["--max-attempts", "0"],
            ["--max-attempts", "1001"],
        ] {
            let err = submit(&bad).unwrap_err().to_string();
            assert!(err.contains("out of range; allowed:"), "{bad:?}: {err}");
        }
        let err = submit(&["--timeout", "0s"]).unwrap_err().to_string();
        assert!(err.contains("allowed: 1ms to 7d"), "{err}");
    }
}
