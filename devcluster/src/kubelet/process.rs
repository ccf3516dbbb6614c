//! Container processes: started in a process group of their own (so signals reach every process
//! of the container), killed when dropped, and — through util-linux `setpriv --pdeathsig KILL`,
//! since the workspace forbids the `unsafe` a `pre_exec` hook needs — killed by the kernel when
//! the kubelet's spawner thread dies, so a crashed test leaves no orphans behind. Also measures a
//! process group's resident memory from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::launch::Launch;

type Request = (
    std::process::Command,
    oneshot::Sender<std::io::Result<Child>>,
);

/// Starts processes from one long-lived thread: `PR_SET_PDEATHSIG` fires when the *thread* that
/// forked the child exits, so it must not be a short-lived runtime thread.
pub struct Spawner {
    requests: mpsc::Sender<Request>,
    setpriv: Option<PathBuf>,
}

impl Spawner {
    /// Starts the spawner thread on the current tokio runtime. The thread ends (and the kernel
    /// kills every process it started) once the spawner is dropped.
    pub fn new() -> std::io::Result<Self> {
        let (requests, rx) = mpsc::channel::<Request>();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("devcluster-kubelet-spawner".into())
            .spawn(move || {
                let _guard = runtime.enter();
                for (std_cmd, reply) in rx {
                    let mut cmd = Command::from(std_cmd);
                    cmd.kill_on_drop(true);
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        let path = std::env::var("PATH").unwrap_or_default();
        let setpriv = std::env::split_paths(&path)
            .map(|d| d.join("setpriv"))
            .find(|p| p.is_file());
        if setpriv.is_none() {
            tracing::warn!("setpriv not found: container processes may outlive a crashed kubelet");
        }
        Ok(Self { requests, setpriv })
    }

    /// Starts `launch` with stdout and stderr appended to `log`, in a new process group.
    pub async fn spawn(&self, launch: &Launch, log: &Path) -> std::io::Result<Child> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = match &self.setpriv {
            Some(setpriv) => {
                let mut cmd = std::process::Command::new(setpriv);
                cmd.args(["--pdeathsig", "KILL", "--"]).arg(&launch.program);
                cmd
            }
            None => std::process::Command::new(&launch.program),
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.args(&launch.args)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.cwd)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((cmd, tx))
            .map_err(|_| std::io::Error::other("kubelet spawner stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("kubelet spawner stopped"))?
    }
}

/// Sends `signal` to every process of the group led by `pid`; a group already gone is fine.
pub fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Kills a container's whole process group when dropped — also when the kubelet's task is
/// dropped with its runtime — so no process of the container outlives it.
pub struct GroupGuard(pub u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

/// Resident memory, in bytes, of all processes in process group `pgid` (from `/proc`).
pub fn group_rss(pgid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // Fields after the command name, which may contain spaces: state ppid pgrp …
            let rest = &stat[stat.rfind(')')? + 1..];
            let pgrp: u32 = rest.split_whitespace().nth(2)?.parse().ok()?;
            if pgrp != pgid {
                return None;
            }
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_processes_lead_their_own_group_and_count_their_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spawner = Spawner::new().unwrap();
        let launch = Launch {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hello; exec sleep 30".into()],
            env: vec![],
            cwd: dir.path().to_owned(),
        };
        let log = dir.path().join("c.log");
        let mut child = spawner.spawn(&launch, &log).await.unwrap();
        let pid = child.id().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while group_rss(pid) == 0 || std::fs::read_to_string(&log).unwrap_or_default().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "process never showed up in /proc or its log"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        signal_group(pid, Signal::SIGTERM);
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15)
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
    }
}
