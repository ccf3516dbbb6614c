//! Command line and environment of the runtime. Every `run` flag falls back to the environment
//! variable the operator injects (`conveyor::names::env`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use conveyor::connect::{NatsOptions, OptionsError, env as connect_env, read_secret_file};
use conveyor::names::env;
use conveyor::protocol::Backoff;
use conveyor::worker::WorkerOptions;

/// The Conveyor worker runtime.
#[derive(Debug, Parser)]
#[command(name = "conveyor-worker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy this executable into DIR (used by the init container).
    Install {
        /// Directory to copy `conveyor-worker` into.
        dir: PathBuf,
    },
    /// Pull jobs and hand them to the handler command.
    Run(Box<RunArgs>),
}

/// How jobs reach user code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HandlerMode {
    /// One process per job: payload on stdin, result on stdout, exit code decides.
    Exec,
    /// One long-lived process speaking JSON lines on stdin/stdout.
    Jsonl,
    /// An HTTP endpoint in the pod, one POST per job.
    Http,
}

/// Settings of `conveyor-worker run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = env::NATS_URL, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS `.creds` file (user JWT + nkey seed).
    #[arg(long, env = env::NATS_CREDS)]
    pub nats_creds: Option<PathBuf>,
    /// Directory of a mounted credentials Secret (keys `creds`, `nkey`, `token` or `user` +
    /// `password`); the operator mounts the JobQueue's `spec.nats.credentialsSecret` here.
    #[arg(long, env = connect_env::NATS_CREDENTIALS_DIR)]
    pub nats_credentials_dir: Option<PathBuf>,
    /// Directory of a mounted TLS Secret (keys `ca.crt`, `tls.crt`, `tls.key`); TLS is then
    /// required. The operator mounts the JobQueue's `spec.nats.tlsSecret` here.
    #[arg(long, env = connect_env::NATS_TLS_DIR)]
    pub nats_tls_dir: Option<PathBuf>,
    /// Prefix of the connection's inboxes; an identity minted by the operator may subscribe
    /// only under it (`_INBOX_<worker uid>`).
    #[arg(long, env = connect_env::NATS_INBOX_PREFIX)]
    pub nats_inbox_prefix: Option<String>,
    /// Namespace of the JobQueue.
    #[arg(long, env = env::QUEUE_NAMESPACE, default_value = "default")]
    pub namespace: String,
    /// Name of the JobQueue.
    #[arg(long, env = env::QUEUE_NAME)]
    pub queue: String,
    /// Priority levels of the queue.
    #[arg(long, env = env::PRIORITIES, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub priorities: u8,
    /// Jobs handled at once (and the most jobs held).
    #[arg(long, env = env::CONCURRENCY, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// How jobs reach the handler command.
    #[arg(long, env = env::HANDLER_MODE, value_enum, default_value = "exec")]
    pub handler_mode: HandlerMode,
    /// URL jobs are posted to in `http` mode.
    #[arg(long, env = env::HANDLER_URL)]
    pub handler_url: Option<String>,
    /// Name reported in dead letters and logs.
    #[arg(long, env = env::POD_NAME, default_value = "local")]
    pub pod_name: String,
    /// Address for /healthz, /readyz and /metrics; none when unset.
    #[arg(long, env = env::HEALTH_ADDR)]
    pub health_addr: Option<SocketAddr>,
    /// After SIGTERM, how long in-flight jobs may run before they are given back.
    #[arg(long, env = env::DRAIN_TIMEOUT, default_value = "25s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long a cancelled running job's handler may wind down before it is stopped.
    #[arg(long, env = env::CANCEL_GRACE, default_value = "5s", value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,
    /// Timeout of one attempt when the job sets none; the handler is killed when it passes.
    #[arg(long, env = env::JOB_TIMEOUT, value_parser = humantime::parse_duration)]
    pub job_timeout: Option<Duration>,
    /// Longest single wait for new jobs.
    #[arg(long, env = env::POLL_WAIT, default_value = "5s", value_parser = humantime::parse_duration)]
    pub poll_wait: Duration,
    /// Delay after the first failed attempt.
    #[arg(long, env = env::BACKOFF_INITIAL, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff_initial: Duration,
    /// Longest delay between attempts.
    #[arg(long, env = env::BACKOFF_MAX, default_value = "5m", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Growth factor of the delay per attempt.
    #[arg(long, env = env::BACKOFF_MULTIPLIER, default_value_t = 2.0)]
    pub backoff_multiplier: f64,
    /// Relative jitter of the delay, 0 to 1.
    #[arg(long, env = env::BACKOFF_JITTER, default_value_t = 0.2)]
    pub backoff_jitter: f64,
    /// Exit (0) after taking this many jobs, so the process is replaced by a fresh one.
    #[arg(long, env = env::MAX_JOBS, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jobs: Option<u64>,
    /// File to keep the running jobs' ids in (JSON), normally the container's termination
    /// message file: Kubernetes reports it when the container dies, even by SIGKILL or
    /// OOM-kill, and the operator names the job in the Worker's `Degraded` condition.
    #[arg(long, env = env::TERMINATION_MESSAGE_PATH)]
    pub termination_message_path: Option<PathBuf>,
    /// Logging (`--log-format`, the same in every Conveyor binary).
    #[command(flatten)]
    pub log: conveyor_logging::LogArgs,
    /// Keep each finished job's outcome in the queue's results stream, so producers can
    /// fetch it and other jobs can depend on it (on unless `false`).
    #[arg(long, env = env::STORE_RESULTS, default_value_t = true, action = clap::ArgAction::Set)]
    pub store_results: bool,
    /// Take a token from the queue's rate-limit stream for every job started (set by the
    /// operator for queues with a `rateLimit`).
    #[arg(long, env = env::RATE_LIMITED)]
    pub rate_limited: bool,
    /// The handler command and its arguments (after `--`); required for `exec` and `jsonl`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl RunArgs {
    /// The NATS connection settings: the URL (userinfo in it becomes credentials), then the
    /// mounted credentials and TLS Secrets, then a `.creds` file.
    pub fn nats_options(&self) -> Result<NatsOptions, OptionsError> {
        let mut options =
            NatsOptions::new(&self.nats_url)?.name(format!("conveyor-worker {}", self.pod_name));
        if let Some(dir) = &self.nats_credentials_dir {
            options = options.credentials_dir(dir)?;
        }
        if let Some(dir) = &self.nats_tls_dir {
            options = options.tls_dir(dir);
        }
        if let Some(path) = &self.nats_creds {
            let creds = read_secret_file("credentials file", path)?;
            options = options.auth(conveyor::connect::Auth::Creds(creds))?;
        }
        if let Some(prefix) = self.nats_inbox_prefix.as_deref().filter(|p| !p.is_empty()) {
            options = options.inbox_prefix(prefix);
        }
        Ok(options)
    }

    /// The worker engine's options from these settings.
    pub fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            concurrency: usize::try_from(self.concurrency).unwrap_or(1),
            priorities: self.priorities,
            backoff: Backoff {
                initial: self.backoff_initial,
                max: self.backoff_max,
                multiplier: self.backoff_multiplier,
                jitter: self.backoff_jitter,
            },
            job_timeout: self.job_timeout,
            drain_timeout: self.drain_timeout,
            poll_wait: self.poll_wait,
            pod_name: self.pod_name.clone(),
            max_jobs: self.max_jobs,
            cancel_grace: self.cancel_grace,
            store_results: self.store_results,
            rate_limited: self.rate_limited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_the_handler_command_after_the_separator() {
        let cli = Cli::try_parse_from([
            "conveyor-worker",
            "run",
            "--queue",
            "q",
            "--concurrency",
            "4",
            "--",
            "sh",
            "-c",
            "cat",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.command, ["sh", "-c", "cat"]);
        assert_eq!(args.worker_options().concurrency, 4);
        assert_eq!(args.drain_timeout, Duration::from_secs(25));
    }

    #[test]
    fn http_mode_needs_no_command() {
        let cli = Cli::try_parse_from([
            "conveyor-worker",
            "run",
            "--queue",
            "q",
            "--handler-mode",
            "http",
            "--handler-url",
            "http://127.0.0.1:8000/jobs",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.handler_mode, HandlerMode::Http);
        assert!(args.command.is_empty());
    }
}
