//! A JobQueue on a NATS server that demands a password and TLS, end to end through the
//! Kubernetes test double: the operator reads the queue's credentials and TLS Secrets, the
//! worker pods (the real runtime) get them as mounted Secret volumes, and jobs are processed. A
//! known password then must not appear in the JobQueue (status), Events, the operator's log,
//! the Deployment, the pods, their logs or `conveyor status`. A wrong password makes the queue
//! `Ready=False` with reason `NatsAuthFailed` and the server's message, an unknown CA
//! `NatsTlsFailed`, and fixing the Secret (a rotation) makes it Ready again. Needs
//! `cargo build -p conveyor-worker -p conveyor-cli --bins` first.

mod worker_env;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::connect::{Auth, NatsOptions, Secret as Hidden};
use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use conveyor_crds::JobQueue;
use conveyor_testkit::{NatsServer, wait_for};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use worker_env::{Env, NS, noop_autoscaled_worker};

const PASSWORD: &str = "Zq8-known-Pa55word-9x";
const DEADLINE: Duration = Duration::from_secs(60);
const JOBS: usize = 300;

/// Everything the operator logs (it runs in this process), to grep for the password.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    // Installed before the fixture's own subscriber, which then stays out.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,kube=info,hyper=info,tower=info,h2=info,rustls=info",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init();
    captured
}

async fn secure_server() -> NatsServer {
    NatsServer::builder()
        .user_password("conveyor", PASSWORD)
        .tls()
        .start()
        .await
        .unwrap()
}

fn secrets(env: &Env) -> Api<Secret> {
    Api::namespaced(env.cluster.client(), NS)
}

async fn put_secret(env: &Env, name: &str, data: BTreeMap<String, Vec<u8>>) {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Default::default()
    };
    let api = secrets(env);
    if api.get_opt(name).await.unwrap().is_some() {
        api.patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name},
                "data": secret.data,
            })),
        )
        .await
        .unwrap();
    } else {
        api.create(&PostParams::default(), &secret).await.unwrap();
    }
}

async fn credentials_secret(env: &Env, name: &str, password: &str) {
    put_secret(
        env,
        name,
        BTreeMap::from([
            ("user".to_owned(), b"conveyor".to_vec()),
            ("password".to_owned(), password.as_bytes().to_vec()),
        ]),
    )
    .await;
}

async fn tls_secret(env: &Env, name: &str, ca: &Path) {
    put_secret(
        env,
        name,
        BTreeMap::from([("ca.crt".to_owned(), std::fs::read(ca).unwrap())]),
    )
    .await;
}

fn queue_yaml(name: &str, nats: &NatsServer, creds: &str, tls: &str) -> String {
    format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: {name}}}\nspec:\n  timeout: 60s\n  nats: {{url: '{}', credentialsSecret: {creds}, tlsSecret: {tls}}}\n",
        nats.tls_url()
    )
}

/// Waits for the queue's Ready condition to have `status` (and `reason`); returns its message.
async fn wait_ready(env: &Env, name: &str, status: &str, reason: Option<&str>) -> String {
    let api: Api<JobQueue> = Api::namespaced(env.cluster.client(), NS);
    let found = || async {
        let q = api.get_opt(name).await.ok().flatten()?;
        let ready = q
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (ready.status == status && reason.is_none_or(|r| ready.reason == r))
            .then_some(ready.message)
    };
    wait_for(
        DEADLINE,
        &format!("JobQueue {name} Ready={status} {reason:?}"),
        || async { found().await.is_some() },
    )
    .await
    .unwrap();
    found().await.unwrap()
}

fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the bins first",
        path.display()
    );
    path
}

fn read_tree(dir: &Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            read_tree(&path, out);
        } else if path.extension().is_some_and(|e| e == "log") {
            out.push_str(&String::from_utf8_lossy(
                &std::fs::read(&path).unwrap_or_default(),
            ));
        }
    }
}

#[tokio::test]
async fn a_queue_with_credentials_and_tls_secrets_works_and_shows_its_password_nowhere() {
    let logs = capture_logs();
    let env = Env::start().await;
    let nats = secure_server().await;
    credentials_secret(&env, "q-creds", PASSWORD).await;
    tls_secret(&env, "q-tls", &nats.tls().unwrap().ca).await;
    env.apply(&queue_yaml("secure", &nats, "q-creds", "q-tls"))
        .await;
    env.apply(&noop_autoscaled_worker(
        "secure",
        "{minReplicas: 1, maxReplicas: 2, targetBacklogPerReplica: 100}",
    ))
    .await;
    wait_ready(&env, "secure", "True", None).await;

    let options = NatsOptions::new(&nats.tls_url())
        .unwrap()
        .auth(Auth::UserPassword {
            user: "conveyor".into(),
            password: Hidden::new(PASSWORD),
        })
        .unwrap()
        .tls_dir(&nats.tls().unwrap().client_dir);
    let client = Client::connect_with(&options).await.unwrap();
    let queue = QueueRef::new(NS, "secure");
    let results = client
        .submit_batch(&queue, (0..JOBS).map(|i| Job::new(format!("s{i}"), "x")))
        .await;
    assert!(results.iter().all(Result::is_ok), "every job accepted");
    let js = client.jetstream().clone();
    wait_for(
        Duration::from_secs(120),
        "every job processed by the workers",
        || async {
            match js.get_stream(queue.stream()).await {
                Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages == 0),
                Err(_) => false,
            }
        },
    )
    .await
    .unwrap();

    // `conveyor status` with the CLI's credential and TLS flags.
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::File::create(&password_file)
        .unwrap()
        .write_all(PASSWORD.as_bytes())
        .unwrap();
    let cli = |password_file: &Path| {
        std::process::Command::new(target_bin("conveyor"))
            .args(["status", "secure", "-n", NS, "--nats-url", &nats.tls_url()])
            .args(["--nats-user", "conveyor", "--nats-password-file"])
            .arg(password_file)
            .arg("--tls-ca")
            .arg(&nats.tls().unwrap().ca)
            .env_remove("CONVEYOR_NATS_URL")
            .output()
            .unwrap()
    };
    let status = cli(&password_file);
    let status_out = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(status.status.success(), "{status_out}");
    assert!(status_out.contains("secure"), "{status_out}");
    // A wrong password: a clear error, and neither password in it.
    let wrong_file = dir.path().join("wrong");
    std::fs::write(&wrong_file, format!("not-{PASSWORD}")).unwrap();
    let refused = cli(&wrong_file);
    let refused_out = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success());
    assert!(
        refused_out
            .to_lowercase()
            .contains("authorization violation"),
        "{refused_out}"
    );
    // With the URL's userinfo, the error shows it redacted.
    let userinfo = std::process::Command::new(target_bin("conveyor"))
        .args(["status", "secure", "-n", NS, "--nats-url"])
        .arg(format!(
            "tls://conveyor:not-{PASSWORD}@127.0.0.1:{}",
            nats.port()
        ))
        .arg("--tls-ca")
        .arg(&nats.tls().unwrap().ca)
        .output()
        .unwrap();
    let userinfo_out = String::from_utf8_lossy(&userinfo.stderr).into_owned();
    assert!(!userinfo.status.success());

    // The secrecy grep.
    let mut places = BTreeMap::new();
    places.insert(
        "JobQueue",
        env.kubectl(&["get", "jobqueue", "secure", "-o", "yaml"])
            .await,
    );
    places.insert(
        "Events",
        env.kubectl(&["get", "events", "-o", "yaml"]).await,
    );
    places.insert(
        "Deployment",
        env.kubectl(&["get", "deployment", "secure", "-o", "yaml"])
            .await,
    );
    places.insert("Pods", env.kubectl(&["get", "pods", "-o", "yaml"]).await);
    places.insert(
        "describe",
        env.kubectl(&["describe", "jobqueue", "secure"]).await,
    );
    let mut pod_logs = String::new();
    read_tree(env.cluster.logs_dir(), &mut pod_logs);
    assert!(pod_logs.contains("conveyor"), "pod logs were found");
    places.insert("pod logs", pod_logs);
    places.insert("conveyor status", status_out);
    places.insert("conveyor status (wrong password)", refused_out);
    places.insert("conveyor status (userinfo)", userinfo_out);
    places.insert(
        "operator log",
        String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned(),
    );
    let deployment = &places["Deployment"];
    assert!(
        deployment.contains("q-creds") && deployment.contains("q-tls"),
        "{deployment}"
    );
    for (place, text) in &places {
        assert!(!text.is_empty(), "{place} is empty");
        assert!(
            !text.contains(PASSWORD),
            "the password is in the {place}:\n{text}"
        );
    }
    drop(client);
    env.shutdown().await;
}

#[tokio::test]
async fn a_wrong_password_is_nats_auth_failed_an_unknown_ca_nats_tls_failed_and_rotation_heals() {
    let env = Env::start().await;
    let nats = secure_server().await;
    credentials_secret(&env, "bad-creds", &format!("wrong-{PASSWORD}")).await;
    tls_secret(&env, "good-tls", &nats.tls().unwrap().ca).await;
    env.apply(&queue_yaml("locked", &nats, "bad-creds", "good-tls"))
        .await;
    let message = wait_ready(&env, "locked", "False", Some("NatsAuthFailed")).await;
    assert!(
        message.to_lowercase().contains("authorization violation"),
        "{message}"
    );
    assert!(!message.contains(PASSWORD), "{message}");

    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let stranger = conveyor_testkit::tls::TlsFiles::generate(other.path()).unwrap();
    credentials_secret(&env, "good-creds", PASSWORD).await;
    tls_secret(&env, "wrong-tls", &stranger.ca).await;
    env.apply(&queue_yaml("stranger", &nats, "good-creds", "wrong-tls"))
        .await;
    let message = wait_ready(&env, "stranger", "False", Some("NatsTlsFailed")).await;
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    // Credentials in spec.nats.url would be shown in status and put into pods: refused.
    let with_userinfo: JobQueue = serde_yaml::from_str(&format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: leaky}}\nspec:\n  nats: {{url: 'nats://conveyor:{PASSWORD}@127.0.0.1:{}'}}\n",
        nats.port()
    ))
    .unwrap();
    let api: Api<JobQueue> = Api::namespaced(env.cluster.client(), NS);
    let refused = api
        .create(&PostParams::default(), &with_userinfo)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("must not carry credentials"), "{refused}");

    // Rotation: the right password in the Secret makes the queue Ready.
    credentials_secret(&env, "bad-creds", PASSWORD).await;
    wait_ready(&env, "locked", "True", None).await;
    let events = env.kubectl(&["get", "events", "-o", "yaml"]).await;
    assert!(events.contains("NatsAuthFailed"), "{events}");
    assert!(!events.contains(PASSWORD), "{events}");
    env.shutdown().await;
}
