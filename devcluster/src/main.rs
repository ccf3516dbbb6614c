//! `conveyor-devcluster`: starts the Kubernetes test double and keeps it running until Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use conveyor_devcluster::{DevCluster, ImageConfig, Options};

/// Runs an in-process Kubernetes test double (API server, controllers, process kubelet).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory for the kubeconfig, logs and pod directories (default: a temporary directory).
    #[arg(long, env = "DEVCLUSTER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Serve only the API: no controllers, no kubelet.
    #[arg(long, env = "DEVCLUSTER_API_ONLY")]
    api_only: bool,
    /// An image the kubelet can run, as `NAME=DIRECTORY` (the directory acts as the image root).
    #[arg(long = "image", value_name = "NAME=DIR")]
    images: Vec<String>,
    #[command(flatten)]
    log: conveyor_logging::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    conveyor_logging::init(args.log.log_format, "warn");
    let mut images = BTreeMap::new();
    for spec in &args.images {
        let (name, dir) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--image expects NAME=DIR, got {spec:?}"))?;
        images.insert(
            name.to_owned(),
            ImageConfig {
                root: PathBuf::from(dir),
                entrypoint: Vec::new(),
            },
        );
    }
    let mut options = if args.api_only {
        Options::api_only()
    } else {
        Options::default()
    };
    options.state_dir = args.state_dir;
    options.images = images;
    let cluster = DevCluster::start(options).await?;
    println!("export KUBECONFIG={}", cluster.kubeconfig_path().display());
    println!("# devcluster serving {} — Ctrl-C to stop", cluster.url());
    tokio::signal::ctrl_c().await?;
    cluster.shutdown().await;
    Ok(())
}
