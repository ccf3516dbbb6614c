//! `conveyor`: the command-line tool of Conveyor — submit jobs, read queue figures, and run the
//! whole system locally on the Kubernetes test double (`conveyor dev`). Also usable as
//! `kubectl conveyor` when installed on `PATH` as `kubectl-conveyor`.
//!
//! `dev` and `bench` link the operator, the test double and the worker runtime; they come with
//! the cargo feature `dev` (on by default). Built with `--no-default-features`, the binary is the
//! plain client.

mod args;
#[cfg(feature = "dev")]
mod bench;
mod credentials;
#[cfg(feature = "dev")]
mod dev;
mod discover;
mod dlq;
mod flags;
mod flow;
mod input;
mod job;
mod jobs;
mod run;
mod schedule;
mod status;
mod submit;
mod table;
mod top;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use crate::args::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return refuse(e),
    };
    conveyor_logging::init(cli.log.log_format, cli.command.default_log_filter());
    let result = match cli.command {
        Command::Submit(args) => submit::run(args).await,
        Command::Cancel(args) => submit::cancel(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Result(args) => submit::result(args).await,
        #[cfg(feature = "dev")]
        Command::Dev(args) => dev::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Jobs(args) => jobs::run(args).await,
        Command::Schedule(args) => schedule::run(args).await,
        #[cfg(feature = "dev")]
        Command::Bench(args) => bench::run(args).await,
        Command::Top(args) => top::run(args).await,
        Command::Job(args) => job::run(args).await,
        Command::Flow(args) => flow::run(args).await,
        Command::Run(args) => run::run(*args).await,
        Command::Credentials(args) => credentials::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A flag value out of range or malformed is said in one line (`error: invalid value 'X' for
/// '--flag <FLAG>': out of range; allowed: …`), without clap's usage hint; every other parse
/// outcome (help, version, usage errors) is clap's own. Usage errors exit with status 2.
fn refuse(e: clap::Error) -> ExitCode {
    if e.kind() != ErrorKind::ValueValidation {
        e.exit();
    }
    let said = e.to_string();
    eprintln!("{}", said.lines().next().unwrap_or("error: invalid value"));
    ExitCode::from(2)
}
