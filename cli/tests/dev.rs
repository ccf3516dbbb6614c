//! `conveyor dev` as a newcomer runs it: the real binary, with the real `nats-server`, the
//! Kubernetes test double, the operator and worker processes. Needs `conveyor-worker` built next
//! to `conveyor` (`cargo build --workspace --bins`, which `make test` does).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

/// The repository's `examples/` directory.
fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn conveyor_dev(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.arg("dev")
        .args(args)
        .arg("--examples-dir")
        .arg(examples())
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("CONVEYOR_NATS_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Command lines of the processes running now that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(needle))
        .collect()
}

#[tokio::test]
async fn demo_processes_every_job_and_exits_zero() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_str = state.path().to_string_lossy().into_owned();
    let args = [
        "--demo",
        "--demo-jobs",
        "100",
        "--timeout",
        "120s",
        "--state-dir",
        &state_str,
    ];
    let out = timeout(Duration::from_secs(300), conveyor_dev(&args).output())
        .await
        .expect("conveyor dev --demo finishes within 5 minutes")
        .expect("conveyor dev --demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("100 of 100 jobs processed"), "{stdout}");
    assert!(
        stdout.contains("hello"),
        "kubectl get output names the queue: {stdout}"
    );
    let left = processes_mentioning(&state_str);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[tokio::test]
async fn ctrl_c_stops_everything_it_started() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_str = state.path().to_string_lossy().into_owned();
    let mut child: Child = conveyor_dev(&["--state-dir", &state_str])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn conveyor dev");

    // It prints the exports once everything runs.
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut kubeconfig, mut nats) = (None, None);
    timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(v) = line.trim().strip_prefix("export KUBECONFIG=") {
                kubeconfig = Some(v.to_owned());
            }
            if let Some(v) = line.trim().strip_prefix("export CONVEYOR_NATS_URL=") {
                nats = Some(v.to_owned());
            }
            if kubeconfig.is_some() && nats.is_some() {
                break;
            }
        }
    })
    .await
    .expect("conveyor dev prints the exports within 60 s");
    let kubeconfig = kubeconfig.expect("KUBECONFIG printed");
    let nats = nats.expect("CONVEYOR_NATS_URL printed");
    assert!(
        async_nats::connect(nats.as_str()).await.is_ok(),
        "NATS is up at {nats}"
    );

    // Worker pods run as processes; they too must stop with Ctrl-C.
    let applied = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "apply", "-f"])
        .arg(examples().join("hello"))
        .output()
        .expect("kubectl runs");
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    timeout(Duration::from_secs(60), async {
        while !processes_mentioning(&state_str)
            .iter()
            .any(|p| p.contains("conveyor-worker"))
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a worker pod process starts within 60 s");

    let pid = Pid::from_raw(i32::try_from(child.id().expect("running")).expect("pid"));
    kill(pid, Signal::SIGINT).expect("send SIGINT");
    let status = timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("conveyor dev stops within 60 s of Ctrl-C")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    let left = processes_mentioning(&state_str);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(
        async_nats::connect(nats.as_str()).await.is_err(),
        "NATS still answers at {nats}"
    );
}
