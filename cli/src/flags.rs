//! Flags that several subcommands share — where the queues live (NATS connection, credentials,
//! namespace), the output format — and the bounds of every number and duration a flag takes.
//! Apart from [`crate::args`] so that the subcommands that define their own arguments
//! (`dlq`, `schedule`, `top`) can use them without `args`, which names those subcommands,
//! and them naming each other in a circle.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use conveyor::names::QueueRef;

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
    /// Credentials and TLS for the NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// How the CLI authenticates to NATS and secures the connection. Secrets are read from files
/// (never from the command line, where `ps` and shell history would show them); userinfo in
/// `--nats-url` (`nats://user:password@host`, `nats://token@host`) works too.
#[derive(Debug, Clone, Default, Args)]
pub struct NatsArgs {
    /// NATS `.creds` file (user JWT and nkey seed).
    #[arg(long, env = "CONVEYOR_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name; the password comes from `--nats-password-file`.
    #[arg(long, env = "CONVEYOR_NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS password of `--nats-user`.
    #[arg(
        long,
        env = "CONVEYOR_NATS_PASSWORD_FILE",
        value_name = "FILE",
        requires = "nats_user"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS authentication token.
    #[arg(long, env = "CONVEYOR_NATS_TOKEN_FILE", value_name = "FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// File holding an nkey seed (`SU…`).
    #[arg(long, env = "CONVEYOR_NATS_NKEY_FILE", value_name = "FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// Directory of a credentials Secret's keys (`creds`, `nkey`, `token` or `user` +
    /// `password`), e.g. a mounted Secret.
    #[arg(long, env = "CONVEYOR_NATS_CREDENTIALS_DIR", value_name = "DIR")]
    pub nats_credentials_dir: Option<PathBuf>,
    /// CA bundle (PEM) to verify the NATS server's certificate against; implies TLS.
    #[arg(long, env = "CONVEYOR_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients; needs `--tls-key`.
    #[arg(
        long,
        env = "CONVEYOR_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(
        long,
        env = "CONVEYOR_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Require TLS even when the server does not ask for it (`tls://` URLs do too).
    #[arg(long, env = "CONVEYOR_TLS_REQUIRED")]
    pub tls_required: bool,
}

impl QueueArgs {
    /// The queue `name` in the selected namespace.
    pub fn queue(&self, name: &str) -> QueueRef {
        QueueRef::new(&self.namespace, name)
    }
}

/// Output formats of `conveyor status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// An aligned table, like `kubectl get`.
    Table,
    /// A JSON array of queue figures, for scripts.
    Json,
}

/// The ranges of the CLI's numbers and durations, and the clap value parsers that enforce them.
/// Each refusal is one line that says what is allowed; clap prefixes it with the flag.
pub mod bounds {
    use std::time::Duration;

    /// `submit --count`: enough for quick load, small enough to finish.
    pub const MAX_COUNT: u64 = 1_000_000;
    /// `submit --priority`: the top level of a queue with the most levels.
    pub const MAX_PRIORITY: u64 = conveyor::admin::MAX_PRIORITIES as u64 - 1;
    /// `submit --delay`: a year. A delayed job is a server-side schedule, far from a calendar;
    /// the bound also keeps `now + delay` far from where times overflow or stop being printable.
    pub const MAX_DELAY: Duration = Duration::from_secs(365 * 86_400);
    /// `submit --wait-timeout`: a week.
    pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);
    /// `dev --demo-jobs`.
    #[cfg(feature = "dev")]
    pub const MAX_DEMO_JOBS: u64 = 100_000;
    /// `dev --timeout`: a day.
    #[cfg(feature = "dev")]
    pub const MAX_DEV_TIMEOUT: Duration = Duration::from_secs(86_400);
    /// `bench --jobs`: the bench keeps one result per job.
    #[cfg(feature = "dev")]
    pub const MAX_BENCH_JOBS: u64 = 2_000_000;
    /// `bench --payload`: the default `max_payload` of a NATS server.
    #[cfg(feature = "dev")]
    pub const MAX_BENCH_PAYLOAD: u64 = 1 << 20;
    /// `bench --concurrency`.
    #[cfg(feature = "dev")]
    pub const MAX_BENCH_CONCURRENCY: u64 = 4096;
    /// `bench --rate`: with `MAX_BENCH_LATENCY_SECONDS`, at most 12 million latency samples.
    #[cfg(feature = "dev")]
    pub const MAX_BENCH_RATE: u64 = 100_000;
    /// `bench --latency-seconds`: the bench gives each measurement 300 s to finish.
    #[cfg(feature = "dev")]
    pub const MAX_BENCH_LATENCY_SECONDS: u64 = 120;
    /// `bench --rounds`.
    #[cfg(feature = "dev")]
    pub const MAX_BENCH_ROUNDS: u64 = 100;
    /// The shortest timeout a flag takes.
    pub const SECOND: Duration = Duration::from_secs(1);
    /// `submit --timeout`: the shortest per-job timeout.
    pub const MILLISECOND: Duration = Duration::from_millis(1);
    /// `submit --max-attempts`: the most a queue's `retry.maxAttempts` allows.
    pub const MAX_ATTEMPTS: u64 = 1000;

    /// A whole number from `min` to `max` (both allowed), as any integer type `max` fits in.
    pub fn number<T: TryFrom<u64>>(s: &str, min: u64, max: u64) -> Result<T, String> {
        let allowed = format!("allowed: {min} to {max}");
        let n = match s.parse::<u64>() {
            Ok(n) => n,
            Err(_) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!("out of range; {allowed}"));
            }
            Err(_) => return Err(format!("not a whole number; {allowed}")),
        };
        if !(min..=max).contains(&n) {
            return Err(format!("out of range; {allowed}"));
        }
        T::try_from(n).map_err(|_| format!("out of range; {allowed}"))
    }

    /// A duration such as `30s`, `5m` or `2h` from `min` to `max` (both allowed).
    pub fn duration(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
        let allowed = format!("allowed: {} to {}", show(min), show(max));
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{e}; {allowed}, e.g. 30s, 5m or 2h"))?;
        if d < min || d > max {
            return Err(format!("out of range; {allowed}"));
        }
        Ok(d)
    }

    /// A bound as the user would type it: `365d`, `24h`, `1s`.
    fn show(d: Duration) -> String {
        if d.subsec_nanos() != 0 {
            return format!("{}ms", d.as_millis());
        }
        let s = d.as_secs();
        match s {
            0 => "0s".to_owned(),
            s if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
            s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
            s if s.is_multiple_of(60) => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }
}
