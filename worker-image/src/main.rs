//! `conveyor-worker`: the worker runtime injected into users' pods. Parses arguments and hands
//! over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = conveyor_worker::Cli::parse();
    conveyor_worker::main(cli).await
}
