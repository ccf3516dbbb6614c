//! Command-line and environment configuration of the operator. Every flag has an environment
//! fallback so the Helm chart can set it either way.

use std::net::SocketAddr;
use std::time::Duration;

/// Worker runtime image injected into worker pods unless `--worker-image` says otherwise: the
/// runtime released together with this operator.
pub const DEFAULT_WORKER_IMAGE: &str = concat!(
    "ghcr.io/conveyor-dev/conveyor-worker:",
    env!("CARGO_PKG_VERSION")
);

/// Settings of one operator process.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "conveyor-operator",
    version,
    about = "Kubernetes operator for Conveyor job queues"
)]
pub struct Config {
    /// Default NATS server URL(s), comma-separated, for queues without `spec.nats`; also
    /// injected into their worker pods.
    #[arg(
        long,
        env = "CONVEYOR_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// Image holding the worker runtime, copied into worker pods by an init container.
    #[arg(long, env = "CONVEYOR_WORKER_IMAGE", default_value = DEFAULT_WORKER_IMAGE)]
    pub worker_image: String,

    /// Address of the HTTP server for `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "CONVEYOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Watch only this namespace; all namespaces when absent.
    #[arg(long, env = "CONVEYOR_NAMESPACE")]
    pub namespace: Option<String>,

    /// Run controllers only while holding a Lease, so several replicas can run (`true`/`false`).
    #[arg(long, env = "CONVEYOR_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "CONVEYOR_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "CONVEYOR_LEASE_NAME", default_value = "conveyor-operator")]
    pub lease_name: String,

    /// How long a leader's Lease is valid without renewal; a standby takes over after it.
    #[arg(long, env = "CONVEYOR_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// Identity written into the Lease; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How often every queue is checked against NATS even without changes (recreates assets
    /// deleted behind the operator's back, refreshes the figures).
    #[arg(long, env = "CONVEYOR_RESYNC", default_value = "30s", value_parser = humantime::parse_duration)]
    pub resync: Duration,

    /// How often the scaler reads the backlog of autoscaled workers.
    #[arg(long, env = "CONVEYOR_SCALER_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub scaler_interval: Duration,
}

impl Config {
    /// Config with every default and the given NATS URL, for embedding and tests.
    pub fn with_nats_url(nats_url: impl Into<String>) -> Self {
        let mut config = <Self as clap::Parser>::parse_from(["conveyor-operator"]);
        config.nats_url = nats_url.into();
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_flags() {
        let config = Config::try_parse_from([
            "conveyor-operator",
            "--nats-url=nats://n:4222",
            "--leader-election=true",
            "--resync=1s",
            "--scaler-interval=250ms",
            "--http-addr=127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(config.nats_url, "nats://n:4222");
        assert!(config.leader_election);
        assert_eq!(config.resync, Duration::from_secs(1));
        assert_eq!(config.scaler_interval, Duration::from_millis(250));
        assert!(
            config
                .worker_image
                .starts_with("ghcr.io/conveyor-dev/conveyor-worker:")
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
