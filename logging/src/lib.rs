//! The one logging setup of Conveyor's binaries (`conveyor-operator`, `conveyor-worker`,
//! `conveyor` and `conveyor-devcluster`): logs go to stderr, as `text` (coloured only when
//! stderr is a terminal, so pod logs and log shippers never see escape sequences) or as `json`
//! (one object per line), filtered by `RUST_LOG` directives (`info,kube=warn`) over a default
//! of each binary's own. Libraries never install a subscriber; a binary calls [`init`] once.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Environment variable of `--log-format`.
pub const LOG_FORMAT_ENV: &str = "CONVEYOR_LOG_FORMAT";
/// Environment variable of the filter directives.
pub const FILTER_ENV: &str = "RUST_LOG";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, spans).
    Json,
}

/// The logging flag every binary shares: `#[command(flatten)]` it into the binary's parser.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr: `text` (coloured only on a terminal) or `json` (one object per
    /// line). `RUST_LOG` filters what is logged, e.g. `info,kube=warn` or `debug`.
    #[arg(long, env = LOG_FORMAT_ENV, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Installs the log subscriber of a binary: `format` on stderr, filtered by `RUST_LOG` or,
/// when it is unset or empty, by `default_filter`. `RUST_LOG` that does not parse falls back
/// to `default_filter` and says so in a warning. A second call keeps the first subscriber.
pub fn init(format: LogFormat, default_filter: &str) {
    let (filter, invalid) = filter(std::env::var(FILTER_ENV).ok().as_deref(), default_filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.with_ansi(false).json().try_init(),
    };
    if let (Ok(()), Some(error)) = (installed, invalid) {
        tracing::warn!(%error, default = default_filter, "ignoring {FILTER_ENV}");
    }
}

/// The filter of `rust_log` (`RUST_LOG`), else of `default`; with why `rust_log` was refused.
fn filter(rust_log: Option<&str>, default: &str) -> (EnvFilter, Option<String>) {
    let fallback = || EnvFilter::try_new(default).unwrap_or_else(|_| EnvFilter::new("info"));
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => (fallback(), None),
        Some(spec) => match EnvFilter::try_new(spec) {
            Ok(filter) => (filter, None),
            Err(e) => (fallback(), Some(format!("{spec:?}: {e}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn the_flag_parses_text_and_json_and_refuses_others() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.log.log_format);
        assert_eq!(parse(&["x"]).unwrap(), LogFormat::Text);
        assert_eq!(
            parse(&["x", "--log-format", "json"]).unwrap(),
            LogFormat::Json
        );
        assert_eq!(parse(&["x", "--log-format=text"]).unwrap(), LogFormat::Text);
        assert!(parse(&["x", "--log-format", "yaml"]).is_err());
    }

    #[test]
    fn rust_log_wins_over_the_default_and_a_bad_one_falls_back() {
        let shown = |spec: &str| EnvFilter::new(spec).to_string();
        let (f, bad) = filter(Some("debug,kube=warn"), "info");
        assert_eq!(f.to_string(), shown("debug,kube=warn"));
        assert!(bad.is_none());
        let (f, bad) = filter(Some("  "), "info,kube=warn");
        assert_eq!(f.to_string(), shown("info,kube=warn"));
        assert!(bad.is_none());
        let (f, bad) = filter(Some("kube=loud"), "info");
        assert_eq!(f.to_string(), shown("info"));
        assert!(bad.unwrap().contains("kube=loud"));
    }
}
