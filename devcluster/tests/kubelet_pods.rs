//! The process kubelet against the devcluster API server: containers run as local processes with
//! their env and volumes, logs reach `kubectl logs`, deletion is graceful (SIGTERM, then SIGKILL
//! after the grace period), crashes back off, memory limits kill with OOMKilled.

mod common;

use std::time::{Duration, Instant};

use common::{kubectl, kubectl_ok, wait_for};
use conveyor_devcluster::{DevCluster, Options};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;

/// A cluster with controllers and kubelet whose CrashLoopBackOff starts at 200 ms.
async fn cluster() -> DevCluster {
    DevCluster::start(Options {
        base_backoff: Some(Duration::from_millis(200)),
        max_backoff: Some(Duration::from_secs(2)),
        ..Options::default()
    })
    .await
    .expect("devcluster starts")
}

async fn pod(cluster: &DevCluster, name: &str) -> Option<Pod> {
    Api::<Pod>::default_namespaced(cluster.client())
        .get_opt(name)
        .await
        .expect("get pod")
}

fn container_status(p: &Pod, name: &str) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref()?.phase.as_deref()
}

#[tokio::test]
async fn pod_runs_with_env_ip_and_logs_for_kubectl() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {GREETING: hello}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {token: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: echo}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo \"$GREETING $POD_NAME $TOKEN $MY_IP $EXPANDED\"; exec sleep 60"]
    env:
    - name: EXPANDED
      value: expanded-$(GREETING)
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: TOKEN
      valueFrom: {secretKeyRef: {name: creds, key: token}}
    - name: MY_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    envFrom:
    - configMapRef: {name: settings}
"#,
        ),
    )
    .await;
    let running = wait_for("pod echo to run", Duration::from_secs(20), || async {
        pod(&cluster, "echo")
            .await
            .filter(|p| phase(p) == Some("Running"))
    })
    .await;
    let status = running.status.clone().unwrap();
    let ip = status.pod_ip.clone().unwrap();
    assert!(ip.starts_with("127.") && ip != "127.0.0.1", "pod IP {ip}");
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    let c = container_status(&running, "main").unwrap();
    assert!(c.state.unwrap().running.is_some());
    assert!(c.ready);
    let expected = format!("hello echo s3cret {ip} expanded-hello\n");
    let logs = wait_for(
        "kubectl logs to show the output",
        Duration::from_secs(20),
        || async {
            let run = kubectl(&cluster, &["logs", "echo"], None).await;
            (run.ok && run.stdout == expected).then_some(run.stdout)
        },
    )
    .await;
    assert_eq!(logs, expected);
}

#[tokio::test]
async fn init_container_hands_off_through_an_empty_dir() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: handoff}
spec:
  restartPolicy: Never
  volumes:
  - name: shared
    emptyDir: {}
  initContainers:
  - name: prepare
    image: busybox
    command: ["sh", "-c", "echo from-init > /shared/msg"]
    volumeMounts: [{name: shared, mountPath: /shared}]
  containers:
  - name: main
    image: busybox
    command: ["cat", "/shared/msg"]
    volumeMounts: [{name: shared, mountPath: /shared}]
"#,
        ),
    )
    .await;
    let done = wait_for(
        "pod handoff to succeed",
        Duration::from_secs(20),
        || async {
            pod(&cluster, "handoff")
                .await
                .filter(|p| phase(p) == Some("Succeeded"))
        },
    )
    .await;
    let init = &done
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .as_ref()
        .unwrap()[0];
    let term = init.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (0, Some("Completed"))
    );
    let main = container_status(&done, "main").unwrap();
    assert_eq!(
        main.state.unwrap().terminated.unwrap().reason.as_deref(),
        Some("Completed")
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "handoff"], None).await,
        "from-init\n"
    );
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "handoff", "-c", "prepare"], None).await,
        ""
    );
}

#[tokio::test]
async fn deletion_sends_sigterm_then_sigkill_after_the_grace_period() {
    let cluster = cluster().await;
    let out = tempfile::tempdir().unwrap();
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: polite}}
spec:
  volumes: [{{name: out, hostPath: {{path: "{dir}"}}}}]
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "trap 'echo term > /out/marker; exit 0' TERM; echo started > /out/started; while true; do sleep 0.1; done"]
    volumeMounts: [{{name: out, mountPath: /out}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: stubborn}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"]
"#,
        dir = out.path().display()
    );
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(&manifest)).await;
    for name in ["polite", "stubborn"] {
        wait_for(
            &format!("pod {name} to run"),
            Duration::from_secs(20),
            || async {
                pod(&cluster, name)
                    .await
                    .filter(|p| phase(p) == Some("Running"))
            },
        )
        .await;
    }
    wait_for(
        "the polite container to start its loop",
        Duration::from_secs(10),
        || async { out.path().join("started").exists().then_some(()) },
    )
    .await;

    let begin = Instant::now();
    kubectl_ok(
        &cluster,
        &["delete", "pod", "polite", "--wait=true", "--timeout=20s"],
        None,
    )
    .await;
    assert!(
        begin.elapsed() < Duration::from_secs(10),
        "a TERM-handling pod goes at once"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("marker")).unwrap(),
        "term\n"
    );

    let begin = Instant::now();
    kubectl_ok(
        &cluster,
        &["delete", "pod", "stubborn", "--wait=true", "--timeout=20s"],
        None,
    )
    .await;
    let took = begin.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "SIGKILL only after the 2 s grace period, took {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "SIGKILL right after the grace period, took {took:?}"
    );
    assert!(pod(&cluster, "stubborn").await.is_none());
}

#[tokio::test]
async fn crashing_container_shows_crash_loop_back_off() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &[
            "run",
            "crasher",
            "--image=busybox",
            "--restart=Always",
            "--command",
            "--",
            "sh",
            "-c",
            "echo boom; exit 3",
        ],
        None,
    )
    .await;
    let crashing = wait_for(
        "CrashLoopBackOff with restarts",
        Duration::from_secs(30),
        || async {
            let p = pod(&cluster, "crasher").await?;
            let c = container_status(&p, "crasher")?;
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            (waiting.reason.as_deref() == Some("CrashLoopBackOff") && c.restart_count >= 2)
                .then_some(c)
        },
    )
    .await;
    let last = crashing.last_state.unwrap().terminated.unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
    let previous = kubectl_ok(&cluster, &["logs", "crasher", "--previous"], None).await;
    assert_eq!(previous, "boom\n");
    wait_for(
        "kubectl describe to show BackOff events",
        Duration::from_secs(20),
        || async {
            let described = kubectl_ok(&cluster, &["describe", "pod", "crasher"], None).await;
            (described.contains("BackOff") && described.contains("Started")).then_some(())
        },
    )
    .await;
    wait_for(
        "kubectl get to show the back-off",
        Duration::from_secs(20),
        || async {
            let table = kubectl_ok(&cluster, &["get", "pod", "crasher"], None).await;
            table.contains("CrashLoopBackOff").then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn container_over_its_memory_limit_is_oom_killed() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: python
    command: ["python3", "-c", "x = bytearray(200 * 1024 * 1024); import time; time.sleep(30)"]
    resources:
      limits: {memory: 64Mi}
"#,
        ),
    )
    .await;
    let failed = wait_for("pod hog to fail", Duration::from_secs(30), || async {
        pod(&cluster, "hog")
            .await
            .filter(|p| phase(p) == Some("Failed"))
    })
    .await;
    let term = container_status(&failed, "main")
        .unwrap()
        .state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (137, Some("OOMKilled"))
    );
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_container() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: zombie}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "exec sleep 60"]
    livenessProbe:
      exec: {command: ["false"]}
      periodSeconds: 1
      failureThreshold: 1
"#,
        ),
    )
    .await;
    wait_for(
        "the liveness probe to restart the container",
        Duration::from_secs(30),
        || async {
            let c = container_status(&pod(&cluster, "zombie").await?, "main")?;
            (c.restart_count >= 1).then_some(())
        },
    )
    .await;
}

/// The operator's runtime injection: an init container of one image copies a program into an
/// emptyDir; the app container of another image runs it from there, handing it a path of its
/// own image.
#[tokio::test]
async fn images_map_to_directories_and_programs_pass_through_volumes() {
    use std::os::unix::fs::PermissionsExt;
    let images = tempfile::tempdir().unwrap();
    let installer = images.path().join("installer");
    let app = images.path().join("app");
    std::fs::create_dir_all(installer.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(&app).unwrap();
    let script = |path: &std::path::Path, body: &str| {
        std::fs::write(path, body).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        &installer.join("usr/local/bin/runtime"),
        "#!/bin/sh\nif [ \"$1\" = install ]; then cp \"$0\" \"$2/runtime\"; else shift; exec cat \"$@\"; fi\n",
    );
    std::fs::write(app.join("handler.txt"), "handled\n").unwrap();
    let cluster = DevCluster::start(Options {
        images: [
            (
                "example.com/installer".to_owned(),
                conveyor_devcluster::ImageConfig {
                    root: installer.clone(),
                    entrypoint: vec!["/usr/local/bin/runtime".into()],
                },
            ),
            (
                "example.com/app".to_owned(),
                conveyor_devcluster::ImageConfig {
                    root: app.clone(),
                    entrypoint: vec![],
                },
            ),
        ]
        .into(),
        ..Options::default()
    })
    .await
    .expect("devcluster starts");
    kubectl_ok(
        &cluster,
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: injected}
spec:
  restartPolicy: Never
  volumes: [{name: rt, emptyDir: {}}]
  initContainers:
  - name: install
    image: example.com/installer:v1
    args: ["install", "/rt"]
    volumeMounts: [{name: rt, mountPath: /rt}]
  containers:
  - name: main
    image: example.com/app@sha256:0123
    command: ["/rt/runtime", "run", "/handler.txt"]
    volumeMounts: [{name: rt, mountPath: /rt}]
"#,
        ),
    )
    .await;
    wait_for(
        "pod injected to succeed",
        Duration::from_secs(20),
        || async {
            pod(&cluster, "injected")
                .await
                .filter(|p| phase(p) == Some("Succeeded"))
        },
    )
    .await;
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "injected"], None).await,
        "handled\n"
    );
}

/// Process groups (`pgrp` from `/proc/<pid>/stat`) of every live process.
fn process_groups() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            (state != "Z")
                .then(|| fields.nth(1)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[tokio::test]
async fn shutdown_kills_every_process_of_every_container() {
    let cluster = cluster().await;
    kubectl_ok(
        &cluster,
        &[
            "run",
            "lingering",
            "--image=busybox",
            "--command",
            "--",
            "sh",
            "-c",
            "sleep 300 & exec sleep 301",
        ],
        None,
    )
    .await;
    let running = wait_for("pod lingering to run", Duration::from_secs(20), || async {
        pod(&cluster, "lingering")
            .await
            .filter(|p| phase(p) == Some("Running"))
    })
    .await;
    let id = container_status(&running, "lingering")
        .unwrap()
        .container_id
        .unwrap();
    let pgid: u32 = id.trim_start_matches("devcluster://").parse().unwrap();
    wait_for(
        "both processes of the container",
        Duration::from_secs(10),
        || async { (process_groups().iter().filter(|g| **g == pgid).count() == 2).then_some(()) },
    )
    .await;
    cluster.shutdown().await;
    wait_for(
        "the container's processes to be gone",
        Duration::from_secs(10),
        || async { (!process_groups().contains(&pgid)).then_some(()) },
    )
    .await;
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn readiness_follows_an_exec_probe_both_ways() {
    let cluster = cluster().await;
    let flags = tempfile::tempdir().unwrap();
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: flappy}}
spec:
  volumes: [{{name: flags, hostPath: {{path: "{dir}"}}}}]
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "exec sleep 300"]
    volumeMounts: [{{name: flags, mountPath: /flags}}]
    readinessProbe:
      exec: {{command: ["test", "-f", "/flags/ready"]}}
      periodSeconds: 1
      failureThreshold: 1
"#,
        dir = flags.path().display()
    );
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(&manifest)).await;
    let running = wait_for("pod flappy to run", Duration::from_secs(20), || async {
        pod(&cluster, "flappy")
            .await
            .filter(|p| phase(p) == Some("Running"))
    })
    .await;
    assert!(!is_ready(&running), "not ready before the probe passes");
    std::fs::write(flags.path().join("ready"), "").unwrap();
    wait_for(
        "pod flappy to become ready",
        Duration::from_secs(20),
        || async { pod(&cluster, "flappy").await.filter(is_ready) },
    )
    .await;
    std::fs::remove_file(flags.path().join("ready")).unwrap();
    let unready = wait_for(
        "pod flappy to become unready",
        Duration::from_secs(20),
        || async { pod(&cluster, "flappy").await.filter(|p| !is_ready(p)) },
    )
    .await;
    assert!(!container_status(&unready, "main").unwrap().ready);
    assert_eq!(phase(&unready), Some("Running"));
}
