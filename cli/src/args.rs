//! Command-line arguments of `conveyor`. Every flag can also be set from the environment; the
//! `///` lines here are the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use conveyor::names::QueueRef;

/// Conveyor: durable job queues on NATS JetStream, run by a Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    Dev(DevArgs),
    /// Inspect, requeue and purge a queue's dead letters.
    Dlq(crate::dlq::DlqArgs),
    /// Measure Conveyor against raw JetStream on the same server in the same run.
    Bench(BenchArgs),
}

impl Command {
    /// The log filter when `RUST_LOG` is not set: quiet for one-shot commands, the operator's
    /// story for `dev`.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Submit(_)
            | Command::Status(_)
            | Command::Dlq(_)
            | Command::Cancel(_)
            | Command::Result(_) => "warn",
            Command::Dev(_) => "warn,conveyor_operator=info",
            Command::Bench(_) => "warn",
        }
    }
}

/// Where the queues live.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// NATS server URL(s), comma-separated. When not given, it is read from the JobQueue
    /// (`status.natsUrl`, else `spec.nats.url`) through the kubeconfig (`--context`, or the
    /// current context), and without a kubeconfig it is nats://127.0.0.1:4222.
    #[arg(long, env = "CONVEYOR_NATS_URL")]
    pub nats_url: Option<String>,
    /// kubeconfig context to find the JobQueue's NATS server in, when `--nats-url` is not
    /// given (default: the current context).
    #[arg(long, env = "CONVEYOR_KUBE_CONTEXT")]
    pub context: Option<String>,
    /// Kubernetes namespace of the JobQueue.
    #[arg(
        long,
        short = 'n',
        env = "CONVEYOR_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
}

impl QueueArgs {
    /// The queue `name` in the selected namespace.
    pub fn queue(&self, name: &str) -> QueueRef {
        QueueRef::new(&self.namespace, name)
    }
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
    /// Submit the payload this many times (quick load).
    #[arg(long, env = "CONVEYOR_SUBMIT_COUNT", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Priority level of the jobs: 0 (default, lowest) up to the queue's `priorities` - 1.
    #[arg(long, short = 'p', env = "CONVEYOR_PRIORITY", default_value_t = 0)]
    pub priority: u8,
    /// Run the jobs no earlier than this long from now (e.g. `30s`, `5m`, `2h`); durable across
    /// server restarts.
    #[arg(long, env = "CONVEYOR_DELAY", value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
    /// Wait for every job's outcome and print one line per job: `<id> <completed|dead-lettered|
    /// cancelled> <result or error>`. Exits non-zero unless every job completed.
    #[arg(long, short = 'w', env = "CONVEYOR_WAIT")]
    pub wait: bool,
    /// With --wait: how long to wait for each job's outcome.
    #[arg(long, env = "CONVEYOR_WAIT_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
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

/// Output formats of `conveyor status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// An aligned table, like `kubectl get`.
    Table,
    /// A JSON array of queue figures, for scripts.
    Json,
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
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Run the demo: apply examples/hello/, submit jobs, wait until all are processed, print a
    /// summary and exit (non-zero if any step fails).
    #[arg(long, env = "CONVEYOR_DEV_DEMO")]
    pub demo: bool,
    /// Number of jobs the demo submits.
    #[arg(long, env = "CONVEYOR_DEV_DEMO_JOBS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub demo_jobs: u64,
    /// Deadline of each step of the demo (e.g. `90s`, `2m`).
    #[arg(long, env = "CONVEYOR_DEV_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
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
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// NATS server to measure against; without it the bench starts its own `nats-server -js`
    /// (file storage in a temp dir).
    #[arg(long, env = "CONVEYOR_NATS_URL")]
    pub nats_url: Option<String>,
    /// The `nats-server` executable to start when no `--nats-url` is given.
    #[arg(long, env = "CONVEYOR_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Jobs per throughput measurement.
    #[arg(long, env = "CONVEYOR_BENCH_JOBS", default_value_t = 200_000)]
    pub jobs: usize,
    /// Payload size in bytes.
    #[arg(long, env = "CONVEYOR_BENCH_PAYLOAD", default_value_t = 256)]
    pub payload: usize,
    /// Jobs a worker holds at once (the raw consumer pulls batches of this size).
    #[arg(long, env = "CONVEYOR_BENCH_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Submission rate of the latency measurement, jobs per second.
    #[arg(long, env = "CONVEYOR_BENCH_RATE", default_value_t = 5_000)]
    pub rate: u32,
    /// Length of the latency measurement in seconds.
    #[arg(long, env = "CONVEYOR_BENCH_LATENCY_SECONDS", default_value_t = 5)]
    pub latency_seconds: u64,
    /// Rounds of each measurement; the report gives medians.
    #[arg(long, env = "CONVEYOR_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// Priority levels of Conveyor's queue; jobs are spread evenly over them (the raw side has
    /// one stream and one consumer either way). Above 1, workers sweep the levels' consumers.
    #[arg(long, env = "CONVEYOR_BENCH_PRIORITIES", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub priorities: u8,
    /// Also measure each side's producer and consumer apart (publish into an empty stream;
    /// consume a full one), to tell where a gap in throughput comes from.
    #[arg(long)]
    pub breakdown: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}
