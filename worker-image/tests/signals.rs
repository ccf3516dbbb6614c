//! Handlers and signals, with the real runtime binary and a real nats-server: every handler
//! process leads a process group of its own, so a SIGTERM to the runtime's group (Ctrl-C on
//! `conveyor-worker run`) drains a running job instead of killing it, and a handler that is
//! timed out is killed together with the processes it started.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::{QueueRef, env};
use conveyor::{Client, Job};
use conveyor_testkit::{NatsServer, wait_for};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    nats: NatsServer,
    client: Client,
    queue: QueueRef,
    out: tempfile::TempDir,
}

async fn setup() -> anyhow::Result<Setup> {
    let nats = NatsServer::start().await?;
    let client = Client::connect(&nats.url()).await?;
    let queue = QueueRef::new("test", "signals");
    let settings = QueueSettings {
        timeout: Duration::from_secs(60),
        ..QueueSettings::default()
    };
    ensure_queue(client.jetstream(), &queue, &settings).await?;
    Ok(Setup {
        nats,
        client,
        queue,
        out: tempfile::tempdir()?,
    })
}

impl Setup {
    /// The runtime binary, leading a process group of its own (as a shell's foreground job
    /// does), so the test can signal that group as Ctrl-C would.
    fn worker(&self, mode: &str, extra: &[(&str, &str)], command: &[&str]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor-worker"));
        cmd.arg("run")
            .arg("--")
            .args(command)
            .env(env::NATS_URL, self.nats.url())
            .env(env::QUEUE_NAMESPACE, &self.queue.namespace)
            .env(env::QUEUE_NAME, &self.queue.name)
            .env(env::HANDLER_MODE, mode)
            .env(env::POD_NAME, "worker-under-test")
            .env(env::POLL_WAIT, "300ms")
            .env("OUT", self.out.path())
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        for (key, value) in extra {
            cmd.env(key, value);
        }
        cmd.spawn().expect("the runtime starts")
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.out.path().join(name)
    }
}

/// The pid written in `path`, once it is there.
fn pid_in(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Ctrl-C, or a kill of the process group: SIGTERM to every process of the runtime's group.
fn signal_group(child: &Child, signal: Signal) {
    let pid = i32::try_from(child.id().expect("running")).unwrap();
    killpg(Pid::from_raw(pid), signal).expect("signal the runtime's group");
}

#[tokio::test]
async fn a_timed_out_handler_is_killed_with_the_processes_it_started() -> anyhow::Result<()> {
    let s = setup().await?;
    let handler = r#"sleep 300 & echo $! > "$OUT/child.pid"; echo $$ > "$OUT/handler.pid"; wait"#;
    let _worker = s.worker("exec", &[], &["sh", "-c", handler]);
    let job = Job::new("slow", "x")
        .timeout(Duration::from_secs(1))
        .max_attempts(1);
    s.client.submit(&s.queue, job).await?;
    wait_for(WAIT, "the handler and its child started", || async {
        pid_in(&s.file("handler.pid")).is_some() && pid_in(&s.file("child.pid")).is_some()
    })
    .await?;
    let handler = pid_in(&s.file("handler.pid")).unwrap();
    let child = pid_in(&s.file("child.pid")).unwrap();
    wait_for(WAIT, "the handler and its child gone", || async {
        !alive(handler) && !alive(child)
    })
    .await?;
    Ok(())
}

async fn drains_on_a_group_sigterm(mode: &str, handler: &str) -> anyhow::Result<()> {
    let s = setup().await?;
    let mut worker = s.worker(mode, &[(env::DRAIN_TIMEOUT, "30s")], &["sh", "-c", handler]);
    let client = s.client.clone();
    let queue = s.queue.clone();
    let result = tokio::spawn(async move {
        client
            .submit_and_wait(&queue, Job::new("long", "x"), WAIT)
            .await
    });
    wait_for(WAIT, "the job started", || async {
        s.file("started").exists()
    })
    .await?;
    signal_group(&worker, Signal::SIGTERM);
    let status = tokio::time::timeout(WAIT, worker.wait()).await??;
    assert!(status.success(), "the runtime drained and exited: {status}");
    let result = result.await??;
    assert!(
        matches!(result, conveyor::JobResult::Completed { .. }),
        "the running job finished: {result:?}"
    );
    assert!(s.file("finished").exists(), "the handler ran to its end");
    Ok(())
}

#[tokio::test]
async fn a_group_sigterm_drains_a_running_exec_job() -> anyhow::Result<()> {
    drains_on_a_group_sigterm(
        "exec",
        r#"touch "$OUT/started"; sleep 2; touch "$OUT/finished"; echo done"#,
    )
    .await
}

#[tokio::test]
async fn a_group_sigterm_drains_a_running_jsonl_job() -> anyhow::Result<()> {
    let handler = r#"while read -r line; do
        id=$(printf '%s' "$line" | sed 's/.*"id":"\([^"]*\)".*/\1/')
        touch "$OUT/started"; sleep 2; touch "$OUT/finished"
        printf '{"id":"%s","status":"ok"}\n' "$id"
    done"#;
    drains_on_a_group_sigterm("jsonl", handler).await
}
