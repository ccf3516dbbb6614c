//! `make demo` as a newcomer's fresh shell runs it: `PATH` without `~/.local/bin`, where
//! `make deps` put nats-server, and a clean run prints no ERROR line (the shutdown used to print
//! `ERROR kube_client … (SendRequest)` for the operator's watches cut off by the stop). Needs
//! `cargo build --workspace --bins` and nats-server in `~/.local/bin` (`make deps`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

#[tokio::test]
async fn the_demo_finds_nats_server_in_local_bin_and_prints_no_error() {
    let home = std::env::var("HOME").expect("HOME");
    if !Path::new(&home).join(".local/bin/nats-server").is_file() {
        panic!("run `make deps` first: nats-server is not in {home}/.local/bin");
    }
    let state = tempfile::tempdir().expect("tempdir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["dev", "--demo", "--demo-jobs", "20", "--timeout", "120s"])
            .arg("--examples-dir")
            .arg(&examples)
            .arg("--state-dir")
            .arg(state.path())
            // A fresh shell: the system directories only.
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env_remove("CONVEYOR_NAMESPACE")
            .env_remove("CONVEYOR_NATS_URL")
            .env_remove("CONVEYOR_NATS_SERVER")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finishes within 5 minutes")
    .expect("conveyor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("20 of 20 jobs processed"), "{stdout}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
}
