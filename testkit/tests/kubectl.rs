//! The kubectl runner with the real kubectl, offline: `kubectl config` reads only the kubeconfig,
//! and a plugin is a script on the plugin path.

use std::os::unix::fs::PermissionsExt as _;

use conveyor_testkit::kubectl::Kubectl;

const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]
users: [{name: u, user: {}}]
contexts: [{name: here, context: {cluster: c, user: u}}]
current-context: here
";

fn kubeconfig() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, KUBECONFIG).unwrap();
    (dir, path)
}

#[tokio::test]
async fn runs_against_the_kubeconfig_and_reports_failures() {
    let (_dir, path) = kubeconfig();
    let kubectl = Kubectl::new(&path);
    assert_eq!(
        kubectl.ok(&["config", "current-context"], None).await,
        "here\n"
    );
    let run = kubectl
        .run(&["config", "use-context", "nowhere"], None)
        .await;
    assert!(!run.ok && run.code == Some(1), "{run:?}");
    assert!(run.stderr.contains("nowhere"), "{run:?}");
    let err = kubectl
        .checked(&["config", "use-context", "nowhere"], None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[tokio::test]
async fn plugins_get_the_kubeconfig_stdin_and_only_the_environment_left() {
    let (dir, path) = kubeconfig();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let plugin = plugins.join("kubectl-echo");
    std::fs::write(
        &plugin,
        "#!/bin/sh\necho \"$KUBECONFIG ${HOME:-no home} $*\"\ncat\n",
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kubectl = Kubectl::new(&path)
        .with_plugins(&plugins)
        .without_env("HOME");
    let said = kubectl.ok(&["echo", "a", "b"], Some("from stdin")).await;
    assert_eq!(said, format!("{} no home a b\nfrom stdin", path.display()));
}

#[tokio::test]
async fn a_refusal_that_leaves_stdin_unread_is_a_failed_run() {
    let (_dir, path) = kubeconfig();
    // More than a pipe holds, so the write meets a kubectl that exited without reading it.
    let manifest = "#\n".repeat(1 << 20);
    let run = Kubectl::new(&path)
        .run(&["config", "use-context", "nowhere"], Some(&manifest))
        .await;
    assert!(!run.ok && run.code == Some(1), "{run:?}");
    assert!(run.stderr.contains("nowhere"), "{run:?}");
}
