//! Container probes (`httpGet` against the pod IP, `tcpSocket`, `exec`) and the loop that runs
//! one of them with Kubernetes' timing: initial delay, period, timeout and success/failure
//! thresholds.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ImageConfig;
use super::launch::{self, Launch, Mount};

/// What a probe needs to reach its container.
#[derive(Clone)]
pub struct Target {
    /// The pod's IP.
    pub ip: IpAddr,
    /// The container (for named ports).
    pub container: Container,
    /// The container's running command line (environment and working directory of `exec`).
    pub launch: Launch,
    /// Volume mounts and image, to resolve `exec` commands like the container's.
    pub mounts: Vec<Mount>,
    /// The container's image.
    pub image: Option<ImageConfig>,
}

fn port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs the probe once; `true` on success.
pub async fn check(probe: &Probe, target: &Target) -> bool {
    let timeout =
        Duration::from_secs(u64::try_from(probe.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let Some(port) = port(&http.port, &target.container) else {
                return false;
            };
            let host = http
                .host
                .as_deref()
                .filter(|h| !h.is_empty())
                .map_or_else(|| target.ip.to_string(), str::to_owned);
            let scheme = http
                .scheme
                .as_deref()
                .unwrap_or("HTTP")
                .to_ascii_lowercase();
            let path = http.path.as_deref().unwrap_or("/");
            let url = format!(
                "{scheme}://{host}:{port}{}{path}",
                if path.starts_with('/') { "" } else { "/" }
            );
            let mut req = reqwest::Client::new().get(url).timeout(timeout);
            for h in http.http_headers.iter().flatten() {
                req = req.header(h.name.as_str(), h.value.as_str());
            }
            return req
                .send()
                .await
                .is_ok_and(|r| (200..400).contains(&r.status().as_u16()));
        }
        if let Some(tcp) = &probe.tcp_socket {
            let Some(port) = port(&tcp.port, &target.container) else {
                return false;
            };
            let ip = tcp
                .host
                .as_deref()
                .and_then(|h| h.parse().ok())
                .unwrap_or(target.ip);
            return tokio::net::TcpStream::connect(SocketAddr::new(ip, port))
                .await
                .is_ok();
        }
        if let Some(exec) = &probe.exec {
            let probe_container = Container {
                command: exec.command.clone(),
                args: None,
                ..target.container.clone()
            };
            let Ok(l) = launch::launch(
                &probe_container,
                target.image.as_ref(),
                &target.mounts,
                target.launch.env.clone(),
                &target.launch.cwd,
            ) else {
                return false;
            };
            let child = Command::new(&l.program)
                .args(&l.args)
                .env_clear()
                .envs(l.env)
                .current_dir(&l.cwd)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status();
            return child.await.is_ok_and(|s| s.success());
        }
        // gRPC probes are not emulated: they never succeed.
        false
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(false)
}

fn seconds(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(value.unwrap_or(default).max(0)).unwrap_or(0))
}

/// Probes until `stop` is cancelled, publishing the verdict (`Some(true)` once `successThreshold`
/// successes in a row, `Some(false)` once `failureThreshold` failures in a row; `None` until the
/// first verdict).
pub async fn run(
    probe: Probe,
    target: Target,
    verdict: watch::Sender<Option<bool>>,
    stop: CancellationToken,
) {
    let period = seconds(probe.period_seconds, 10).max(Duration::from_secs(1));
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(seconds(probe.initial_delay_seconds, 0)) => {}
    }
    let (mut successes, mut failures) = (0, 0);
    loop {
        let ok = tokio::select! {
            () = stop.cancelled() => return,
            ok = check(&probe, &target) => ok,
        };
        if ok {
            successes += 1;
            failures = 0;
            if successes >= success_threshold {
                verdict.send_replace(Some(true));
            }
        } else {
            failures += 1;
            successes = 0;
            if failures >= failure_threshold {
                verdict.send_replace(Some(false));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}
