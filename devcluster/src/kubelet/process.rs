//! Container processes: each container is a session of its own (util-linux `setsid`), which
//! every process it starts stays in — also processes that lead process groups of their own and
//! orphans — so the session stands in for the container's cgroup: its memory is measured, and
//! all of it is killed when the main process exits or the container is dropped. Stop signals go
//! to the main process only, as a container runtime sends them to PID 1. Through util-linux
//! `setpriv --pdeathsig KILL` (the workspace forbids the `unsafe` a `pre_exec` hook needs) the
//! kernel kills the main process when the kubelet's spawner thread dies, so a crashed test
//! leaves no orphans behind. Without `setsid` a container falls back to a process group.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::launch::Launch;

/// Which processes belong to a container: those of its session, or (without `setsid`) of its
/// process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Session,
    Group,
}

type Request = (
    std::process::Command,
    oneshot::Sender<std::io::Result<Child>>,
);

/// Starts processes from one long-lived thread: `PR_SET_PDEATHSIG` fires when the *thread* that
/// forked the child exits, so it must not be a short-lived runtime thread.
pub struct Spawner {
    requests: mpsc::Sender<Request>,
    setpriv: Option<PathBuf>,
    setsid: Option<PathBuf>,
}

/// A program on the kubelet's `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
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
        let setpriv = on_path("setpriv");
        if setpriv.is_none() {
            tracing::warn!("setpriv not found: container processes may outlive a crashed kubelet");
        }
        let setsid = on_path("setsid");
        if setsid.is_none() {
            tracing::warn!(
                "setsid not found: containers are process groups, and a process that leads a \
                 group of its own escapes its container's memory limit and stop"
            );
        }
        Ok(Self {
            requests,
            setpriv,
            setsid,
        })
    }

    /// The processes of the container whose main process is `pid` (as [`Spawner::spawn`]
    /// started it); dropping the value kills them all.
    pub fn processes(&self, pid: u32) -> Processes {
        let scope = if self.setsid.is_some() {
            Scope::Session
        } else {
            Scope::Group
        };
        Processes { pid, scope }
    }

    /// Starts `launch` with stdout and stderr appended to `log`, in a new session (else a new
    /// process group) that the main process leads.
    pub async fn spawn(&self, launch: &Launch, log: &Path) -> std::io::Result<Child> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // setpriv → setsid → program, each exec'ing the next in the same process. setsid(1)
        // does not fork, since the child does not lead a process group.
        let mut chain: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(setpriv) = &self.setpriv {
            chain.extend([setpriv.as_os_str(), "--pdeathsig".as_ref(), "KILL".as_ref()]);
            chain.push("--".as_ref());
        }
        if let Some(setsid) = &self.setsid {
            chain.extend([setsid.as_os_str(), "--".as_ref()]);
        }
        chain.push(launch.program.as_ref());
        let mut cmd = std::process::Command::new(chain[0]);
        cmd.args(&chain[1..]);
        if self.setsid.is_none() {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
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

/// The processes of one container: its main process `pid` and every process in the session
/// (or process group) it leads. Killed, all of them, when dropped — when the main process has
/// exited, and when the kubelet's task is dropped with its runtime — so no process of the
/// container outlives it, as none outlives a container's PID 1.
#[derive(Debug)]
pub struct Processes {
    pid: u32,
    scope: Scope,
}

impl Processes {
    /// Sends `signal` to the main process only, as a container runtime does for a stop or a
    /// failed probe; the program decides what becomes of its children.
    pub fn signal_main(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGKILLs every process of the container (a group already gone is fine). Repeated while
    /// processes are found, since one may fork while the others are killed.
    pub fn kill_all(&self) {
        if self.scope == Scope::Group {
            if let Ok(pid) = i32::try_from(self.pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            return;
        }
        for _ in 0..10 {
            let members: Vec<u32> = members(self.scope, self.pid).collect();
            if members.is_empty() {
                return;
            }
            for pid in members {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    /// Resident memory, in bytes, of all processes of the container (from `/proc`).
    pub fn rss(&self) -> u64 {
        members(self.scope, self.pid)
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .sum()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The live processes whose session (or process group) is `id`, from `/proc`. Zombies are
/// left out: they hold no memory and are gone once reaped.
fn members(scope: Scope, id: u32) -> impl Iterator<Item = u32> {
    let field = match scope {
        Scope::Group => 2,
        Scope::Session => 3,
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // Fields after the command name, which may contain spaces: state ppid pgrp session …
            let rest = stat.get(stat.rfind(')')? + 1..)?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let owner: u32 = fields.nth(field - 1)?.parse().ok()?;
            (owner == id && state != 'Z').then_some(pid)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A container whose main process starts a child that leads a process group of its own
    /// (as the worker runtime does with its handlers): the child counts for the container's
    /// memory, a stop signal reaches the main process only, and dropping the container's
    /// processes kills the child too.
    #[tokio::test]
    async fn a_container_is_its_main_process_and_everything_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let spawner = Spawner::new().unwrap();
        let script = "python3 -c 'import os, time; os.setpgid(0, 0); time.sleep(60)' & \
                      echo hello; exec sleep 60";
        let launch = Launch {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
            cwd: dir.path().to_owned(),
        };
        let log = dir.path().join("c.log");
        let mut child = spawner.spawn(&launch, &log).await.unwrap();
        let pid = child.id().unwrap();
        let procs = spawner.processes(pid);
        let scope = procs.scope;
        let count = || members(scope, pid).count();
        // `python3` may be a shim (pyenv) that runs a few shells before Python: wait until the
        // child is Python, leading its own process group, and the only other process.
        let child_leads_a_group = || {
            members(Scope::Group, pid).count() == 1
                && members(scope, pid).any(|m| m != pid && members(Scope::Group, m).count() == 1)
        };
        until("the main process and its child", || {
            count() == 2
                && child_leads_a_group()
                && !std::fs::read_to_string(&log).unwrap_or_default().is_empty()
        })
        .await;
        assert!(procs.rss() > 0);
        procs.signal_main(Signal::SIGTERM);
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15)
        );
        assert_eq!(count(), 1, "the child got no signal");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
        drop(procs);
        until("the child is killed with the container", || count() == 0).await;
    }
}
