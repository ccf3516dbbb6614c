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

    /// Address of the web dashboard (e.g. `127.0.0.1:8090`); no dashboard when absent.
    #[arg(long, env = "CONVEYOR_DASHBOARD_ADDR")]
    pub dashboard_addr: Option<SocketAddr>,

    /// Directory of the mounted Secret with the NATS account signing key (`seed`: `SA…`) and
    /// the account's public key (`account`: `A…`). When set, every Worker's pods connect with a
    /// user JWT the operator signs for them, which may work the Worker's queue and nothing
    /// else (docs/security.md); when absent, they use the queue's credentials Secret.
    #[arg(long, env = "CONVEYOR_NATS_SIGNING_KEY_DIR")]
    pub nats_signing_key_dir: Option<std::path::PathBuf>,

    /// How long a Worker's signed NATS identity is valid, at least 60s; it is signed again at
    /// half of it.
    #[arg(long, env = "CONVEYOR_NATS_IDENTITY_LIFETIME", default_value = "24h", value_parser = identity_lifetime)]
    pub nats_identity_lifetime: Duration,

    /// Bearer token the dashboard's writes (requeue, purge) need; read-only when absent.
    #[arg(long, env = "CONVEYOR_DASHBOARD_TOKEN", hide_env_values = true)]
    pub dashboard_token: Option<Token>,
}

/// The shortest identity lifetime accepted: each re-signing (at half of it) rolls the
/// Worker's pods, so shorter would keep them restarting.
pub const MIN_IDENTITY_LIFETIME: Duration = Duration::from_secs(60);

/// The longest identity lifetime accepted: a Worker's access ends only when its identity
/// expires (a signing key cannot revoke), so a year at most.
pub const MAX_IDENTITY_LIFETIME: Duration = Duration::from_secs(366 * 86_400);

/// Parses `--nats-identity-lifetime`: a duration from [`MIN_IDENTITY_LIFETIME`] to
/// [`MAX_IDENTITY_LIFETIME`].
fn identity_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if lifetime < MIN_IDENTITY_LIFETIME {
        return Err(format!(
            "{text} is too short: an identity must live at least 60s, since it is signed again at half its lifetime and every re-signing rolls the Worker's pods"
        ));
    }
    if lifetime > MAX_IDENTITY_LIFETIME {
        return Err(format!(
            "{text} is too long: an identity may live at most 366d, since a Worker's access ends only when its identity expires"
        ));
    }
    Ok(lifetime)
}

/// A secret given on the command line or in the environment; `Debug` does not show it, so a
/// logged configuration keeps it out of the logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
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
            "--dashboard-addr=127.0.0.1:8090",
        ])
        .unwrap();
        assert_eq!(
            config.dashboard_addr,
            Some("127.0.0.1:8090".parse().unwrap())
        );
        assert_eq!(config.dashboard_token, None);
        assert_eq!(config.nats_signing_key_dir, None);
        assert_eq!(config.nats_identity_lifetime, Duration::from_secs(86_400));
        let with_token =
            Config::try_parse_from(["conveyor-operator", "--dashboard-token=s3cret"]).unwrap();
        let token = with_token.dashboard_token.unwrap();
        assert_eq!(token.0, "s3cret");
        assert!(!format!("{token:?}").contains("s3cret"));
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
    fn an_identity_lifetime_under_a_minute_is_refused() {
        for short in ["0s", "1s", "59s"] {
            let error = Config::try_parse_from([
                "conveyor-operator",
                &format!("--nats-identity-lifetime={short}"),
            ])
            .unwrap_err()
            .to_string();
            assert!(error.contains("at least 60s"), "{short}: {error}");
        }
        for ok in ["60s", "1m", "90m"] {
            let config = Config::try_parse_from([
                "conveyor-operator",
                &format!("--nats-identity-lifetime={ok}"),
            ])
            .unwrap();
            assert!(
                config.nats_identity_lifetime >= MIN_IDENTITY_LIFETIME,
                "{ok}"
            );
        }
        assert!(identity_lifetime("soon").is_err());
        assert!(identity_lifetime("366d").is_ok());
        for long in ["367d", "100years", "18446744073709551615s"] {
            assert!(identity_lifetime(long).is_err(), "{long}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
