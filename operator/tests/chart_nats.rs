//! The chart's bundled NATS server, rendered by Helm's own template engine (Helm v4's library,
//! bundled by the PyPI package helm-python-sdk; `make deps` installs it): authentication is on
//! by default with a generated password the operator is configured with, the monitoring port
//! stays inside the pod unless exposed, and the rendered server configuration, run by a real
//! `nats-server`, refuses clients without the generated credentials.
//!
//! Offline rendering cannot show that an upgrade keeps the password (Helm's `lookup` sees no
//! cluster here); the template reads the existing Secret with `lookup` for that.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const RENDER: &str = r#"
import json, sys
import helm_python, yaml
chart = helm_python.Chart.load(sys.argv[1])
manifests = chart.render(json.loads(sys.argv[2]), name="conveyor", namespace="conveyor",
                         is_install=True)
objects = [doc for path in sorted(manifests) if path.endswith((".yaml", ".yml"))
           for doc in yaml.safe_load_all(manifests[path]) if doc]
json.dump(objects, sys.stdout)
"#;

/// The chart's objects rendered with `values` (release `conveyor` in namespace `conveyor`).
fn render(values: Value) -> Vec<Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/conveyor");
    let out = Command::new("python3")
        .args(["-c", RENDER])
        .arg(&chart)
        .arg(values.to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "rendering the chart failed (make deps installs helm-python-sdk): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("rendered objects")
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// A key of a rendered Secret, decoded.
fn secret_value(secret: &Value, key: &str) -> String {
    let encoded = secret["data"][key].as_str().expect("a data key");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    String::from_utf8(bytes).expect("text")
}

fn service_ports(objects: &[Value]) -> Vec<i64> {
    object(objects, "Service", "conveyor-nats").expect("the NATS Service")["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect()
}

/// The Secret the operator's pod mounts as its default NATS credentials, if any.
fn operator_credentials(objects: &[Value]) -> Option<String> {
    let pod = &object(objects, "Deployment", "conveyor").expect("the operator")["spec"]["template"]
        ["spec"];
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let dir = env
        .iter()
        .find(|e| e["name"] == "CONVEYOR_NATS_CREDENTIALS_DIR")?;
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir["value"])
        .expect("the credentials directory is a mounted volume");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    Some(volume["secret"]["secretName"].as_str().unwrap().to_owned())
}

/// A `nats-server` started by the test; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn bundled_nats_requires_the_generated_credentials_and_keeps_monitoring_in_the_pod() {
    let objects = render(json!({}));
    let credentials =
        object(&objects, "Secret", "conveyor-nats-credentials").expect("generated credentials");
    let user = secret_value(credentials, "user");
    let password = secret_value(credentials, "password");
    assert_eq!(user, "conveyor");
    assert_eq!(password.len(), 32, "a generated password");
    assert!(password.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        operator_credentials(&objects).as_deref(),
        Some("conveyor-nats-credentials"),
        "the operator connects with the generated credentials"
    );

    assert_eq!(
        service_ports(&objects),
        [4222],
        "the Service exposes the client port only"
    );
    let server = &object(&objects, "StatefulSet", "conveyor-nats").expect("the NATS server")["spec"]
        ["template"]["spec"]["containers"][0];
    let container_ports: Vec<i64> = server["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(container_ports, [4222]);
    let config = secret_value(
        object(&objects, "Secret", "conveyor-nats-config").expect("the server configuration"),
        "nats.conf",
    );
    assert!(
        config.contains("http: \"127.0.0.1:8222\""),
        "monitoring listens on loopback: {config}"
    );

    // The rendered configuration, on loopback ports and a temporary store, run for real.
    let dir = tempfile::tempdir().unwrap();
    let port = conveyor_testkit::free_port().unwrap();
    let http = conveyor_testkit::free_port().unwrap();
    let local = config
        .replace("0.0.0.0:4222", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:8222", &format!("127.0.0.1:{http}"))
        .replace("\"/data\"", &format!("{:?}", dir.path().join("data")));
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, local).unwrap();
    let _server = Server(
        Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (PATH=$HOME/.local/bin:$PATH)"),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let start = Instant::now();
    let client = loop {
        match async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            .connect(&url)
            .await
        {
            Ok(client) => break client,
            Err(error) if start.elapsed() > Duration::from_secs(20) => {
                panic!("the generated credentials connect: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    async_nats::jetstream::new(client)
        .query_account()
        .await
        .expect("JetStream is on");
    let anonymous = async_nats::connect(&url).await;
    assert!(
        anonymous.is_err(),
        "a client without credentials is refused"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password(user, "guess".into())
        .connect(&url)
        .await;
    assert!(wrong.is_err(), "a wrong password is refused");
}

#[test]
fn monitoring_and_authentication_follow_their_values() {
    let exposed = render(json!({"nats": {"monitoring": {"expose": true}}}));
    assert_eq!(service_ports(&exposed), [4222, 8222]);

    let open = render(json!({"nats": {"auth": {"enabled": false}}}));
    assert!(object(&open, "Secret", "conveyor-nats-credentials").is_none());
    assert_eq!(operator_credentials(&open), None);
    let config = secret_value(
        object(&open, "Secret", "conveyor-nats-config").unwrap(),
        "nats.conf",
    );
    assert!(!config.contains("authorization"), "{config}");

    let named = render(json!({"nats": {"credentialsSecret": "my-creds"}}));
    assert_eq!(
        operator_credentials(&named).as_deref(),
        Some("my-creds"),
        "a named Secret wins over the generated one"
    );

    let external = render(json!({"nats": {"enabled": false, "url": "tls://nats.nats.svc:4222"}}));
    assert!(
        external
            .iter()
            .all(|o| o["metadata"]["name"] != "conveyor-nats-credentials"),
        "no bundled server, no generated credentials"
    );
    assert_eq!(operator_credentials(&external), None);
}

/// The operator container's value of environment variable `name`.
fn operator_env(objects: &[Value], name: &str) -> Option<String> {
    let deployment = object(objects, "Deployment", "conveyor").expect("the operator Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

#[test]
fn the_operator_log_format_follows_its_value() {
    assert_eq!(
        operator_env(&render(json!({})), "CONVEYOR_LOG_FORMAT").as_deref(),
        Some("text")
    );
    assert_eq!(
        operator_env(&render(json!({"logFormat": "json"})), "CONVEYOR_LOG_FORMAT").as_deref(),
        Some("json")
    );
}

/// The signing key's Secret is mounted 0440 and the pod's fsGroup is the operator's group:
/// with 0400 and no fsGroup the files belong to root and user 65532 cannot read them.
#[test]
fn the_signing_key_is_readable_by_the_operators_group_only() {
    let objects = render(json!({"nats": {"accountSigningKeySecret": "signing"}}));
    let deployment = object(&objects, "Deployment", "conveyor").expect("the operator Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["fsGroup"], 65532, "{pod}");
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "nats-signing-key")
        .expect("the signing-key volume");
    assert_eq!(volume["secret"]["secretName"], "signing");
    assert_eq!(volume["secret"]["defaultMode"], 0o440, "{volume}");
}
