//! The operator binary's log as a pod log sees it: stdout and stderr are pipes, not a terminal.
//! In `text` format no line carries an ANSI escape sequence; with `--log-format json` every
//! line is one JSON object. The operator runs against the Kubernetes test double (API only)
//! with `RUST_LOG=debug`, so kube's and hyper's spans are logged too, until SIGTERM. Needs
//! `cargo build -p conveyor-operator --bins` first.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::wait_for;
use serde_json::Value;
use tokio::io::AsyncReadExt;

const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the operator with `args` and the extra environment `env` until it logged that it
/// serves, stops it with SIGTERM and returns everything it wrote on stdout and stderr.
async fn operator_output(args: &[&str], env: &[(&str, &str)]) -> String {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let mut child =
        tokio::process::Command::new(conveyor_testkit::workspace_binary("conveyor-operator"))
            .args([
                "--nats-url=nats://127.0.0.1:1",
                "--http-addr=127.0.0.1:0",
                "--resync=1s",
            ])
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("RUST_LOG", "debug")
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR")
            .env_remove("CONVEYOR_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the operator binary runs");
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    let streams: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] = [
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    for mut stream in streams {
        let output = output.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                output.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }));
    }
    let text = || String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    wait_for(DEADLINE, "the operator logs that it serves", || async {
        text().contains("serving /healthz")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", text()));
    let pid = child.id().expect("still running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the operator stops after SIGTERM")
        .unwrap();
    for reader in readers {
        reader.await.unwrap();
    }
    cluster.shutdown().await;
    assert!(
        status.success(),
        "operator exited with {status}: {}",
        text()
    );
    text()
}

#[tokio::test]
async fn text_logs_carry_no_escape_sequences_when_not_on_a_terminal() {
    let log = operator_output(&[], &[]).await;
    assert!(log.contains("INFO"), "{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape sequences in the log: {:?}",
        log.lines().find(|l| l.contains('\u{1b}'))
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let log = operator_output(&["--log-format", "json"], &[]).await;
    assert_json_lines(&log);
}

/// The chart sets the format through the environment (`logFormat` → `CONVEYOR_LOG_FORMAT`).
#[tokio::test]
async fn the_log_format_can_come_from_the_environment() {
    let log = operator_output(&[], &[("CONVEYOR_LOG_FORMAT", "json")]).await;
    assert_json_lines(&log);
}

fn assert_json_lines(log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() > 2, "{log}");
    for line in &lines {
        let object: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("serving /healthz")),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'));
}
