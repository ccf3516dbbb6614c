//! The process kubelet signals containers as a container runtime does: graceful deletion sends
//! SIGTERM to the container's main process only (PID 1 of a real container), which decides what
//! becomes of its children, and once it exits everything else of the container is killed.

mod common;

use std::time::Duration;

use common::{kubectl_ok, wait_for};
use conveyor_devcluster::{DevCluster, Options};

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

#[tokio::test]
async fn graceful_deletion_sends_sigterm_to_the_main_process_only() {
    let cluster = DevCluster::start(Options::default())
        .await
        .expect("devcluster starts");
    let out = tempfile::tempdir().unwrap();
    // `$$$$` is `$$` once the kubelet has expanded `$(VAR)` references (`$$` escapes `$`).
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: parent}}
spec:
  terminationGracePeriodSeconds: 20
  volumes: [{{name: out, hostPath: {{path: "{dir}"}}}}]
  containers:
  - name: main
    image: busybox
    volumeMounts: [{{name: out, mountPath: /out}}]
    command:
    - sh
    - -c
    - |
      trap 'echo main >> /out/terms; exit 0' TERM
      sh -c 'trap "echo child >> /out/terms" TERM; echo $$$$ > /out/child.pid; while true; do sleep 0.1; done' &
      while [ ! -s /out/child.pid ]; do sleep 0.05; done
      echo started > /out/started
      while true; do sleep 0.1; done
"#,
        dir = out.path().display()
    );
    kubectl_ok(&cluster, &["apply", "-f", "-"], Some(&manifest)).await;
    wait_for(
        "the container and its child",
        Duration::from_secs(30),
        || async { out.path().join("started").exists().then_some(()) },
    )
    .await;
    let child: i32 = std::fs::read_to_string(out.path().join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(child));
    kubectl_ok(
        &cluster,
        &["delete", "pod", "parent", "--wait=true", "--timeout=30s"],
        None,
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(out.path().join("terms")).unwrap(),
        "main\n",
        "only the main process got SIGTERM"
    );
    wait_for(
        "the child killed with its container",
        Duration::from_secs(10),
        || async { (!alive(child)).then_some(()) },
    )
    .await;
    cluster.shutdown().await;
}
