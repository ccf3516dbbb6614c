//! `conveyor schedule list|show|trigger|suspend|resume` against the Kubernetes test double and a
//! real `nats-server`. The schedule is put on the server with `conveyor::schedule` (what the
//! operator does), so the CLI is tested on its own.

use std::path::Path;
use std::process::Output;

use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor::protocol::JobEnvelope;
use conveyor::schedule::{Pattern, ScheduleMessage, Template};
use conveyor_crds::JobSchedule;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_testkit::NatsServer;
use kube::Api;
use tokio::process::Command;

const NS: &str = "team";

async fn run(cluster: &DevCluster, program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env_remove("CONVEYOR_NATS_URL")
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("CONVEYOR_KUBE_CONTEXT")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        tokio::io::AsyncWriteExt::write_all(&mut pipe, text.as_bytes())
            .await
            .unwrap();
    }
    drop(pipe);
    child.wait_with_output().await.expect("ends")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn conveyor(cluster: &DevCluster, args: &[&str]) -> Output {
    run(cluster, env!("CARGO_BIN_EXE_conveyor"), args, None).await
}

#[tokio::test]
async fn schedules_are_listed_shown_triggered_suspended_and_resumed() {
    let cluster = DevCluster::start(Options::api_only()).await.unwrap();
    let kubectl = "/usr/bin/kubectl";
    for crd in ["jobqueues.yaml", "jobschedules.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crds")
            .join(crd);
        ok(&run(
            &cluster,
            kubectl,
            &["apply", "-f", path.to_str().unwrap()],
            None,
        )
        .await);
    }
    ok(&run(&cluster, kubectl, &["create", "namespace", NS], None).await);
    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let queue = QueueRef::new(NS, "reports");
    ensure_queue(&js, &queue, &QueueSettings::default())
        .await
        .unwrap();
    let manifests = format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: reports}}\nspec: {{nats: {{url: \"{}\"}}}}\n---\n\
         apiVersion: conveyor.dev/v1alpha1\nkind: JobSchedule\nmetadata: {{name: nightly}}\nspec: {{schedule: '30 2 * * *', timeZone: Europe/Berlin, job: {{queue: reports, payload: hi}}}}\n",
        nats.url()
    );
    ok(&run(
        &cluster,
        kubectl,
        &["apply", "-n", NS, "-f", "-"],
        Some(&manifests),
    )
    .await);

    let list = ok(&conveyor(&cluster, &["schedule", "list", "-n", NS]).await);
    assert!(list.contains("NAME"), "{list}");
    let row = list
        .lines()
        .find(|l| l.starts_with("nightly"))
        .expect(&list);
    for cell in ["reports", "30 2 * * *", "false"] {
        assert!(row.contains(cell), "{list}");
    }
    // As JSON: the same schedule, and the state the operator wrote in its status.
    let api: Api<JobSchedule> = Api::namespaced(cluster.client(), NS);
    let status = serde_json::json!({"status": {
        "lastRun": {"time": "2026-12-02T01:30:00Z", "jobId": "nightly@2026-12-02T01:30:00Z", "outcome": "Completed"},
        "nextRun": "2026-12-03T01:30:00Z",
        "missedRuns": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Scheduled", "message": "the NATS server runs the schedule",
                        "lastTransitionTime": "2026-12-01T00:00:00Z"}],
    }});
    api.patch_status(
        "nightly",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .unwrap();
    let json = ok(&conveyor(&cluster, &["schedule", "list", "-n", NS, "-o", "json"]).await);
    let rows: serde_json::Value = serde_json::from_str(&json).expect(&json);
    assert_eq!(
        rows,
        serde_json::json!([{
            "name": "nightly",
            "queue": "reports",
            "schedule": "30 2 * * *",
            "timeZone": "Europe/Berlin",
            "suspend": false,
            "concurrencyPolicy": "Allow",
            "startingDeadline": null,
            "lastRun": {"time": "2026-12-02T01:30:00Z", "jobId": "nightly@2026-12-02T01:30:00Z", "outcome": "Completed"},
            "nextRun": "2026-12-03T01:30:00Z",
            "missedRuns": 2,
            "lastMissed": null,
            "ready": {"status": "True", "reason": "Scheduled", "message": "the NATS server runs the schedule"},
        }])
    );
    let empty = ok(&conveyor(
        &cluster,
        &["schedule", "list", "-n", "default", "-o", "json"],
    )
    .await);
    assert_eq!(empty.trim(), "[]");

    let show = ok(&conveyor(&cluster, &["schedule", "show", "nightly", "-n", NS]).await);
    assert!(show.contains("time zone: Europe/Berlin"), "{show}");

    // No schedule on the server yet (no operator here): trigger says so.
    let refused = conveyor(&cluster, &["schedule", "trigger", "nightly", "-n", NS]).await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("holds no schedule nightly"), "{said}");

    // What the operator would put there; trigger submits its job with a slot id.
    let pattern = Pattern::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
    let template = Template {
        payload: "hi".into(),
        ..Template::default()
    };
    let message = ScheduleMessage::new(&queue, "nightly", &pattern, &template, false);
    conveyor::schedule::ensure(&js, &queue, &message)
        .await
        .unwrap();
    let id = ok(&conveyor(&cluster, &["schedule", "trigger", "nightly", "-n", NS]).await);
    let id = id.trim();
    assert!(id.starts_with("nightly@") && id.ends_with('Z'), "{id}");
    let client = js.client();
    let job = conveyor::stored::next(&client, &queue.stream(), &queue.jobs_wildcard(), 1)
        .await
        .unwrap()
        .expect("the triggered run is queued");
    let headers = job.block().header_map();
    let envelope = JobEnvelope::decode(Some(&headers), &queue.stream(), job.sequence).unwrap();
    assert_eq!(envelope.id, id);
    assert_eq!(job.payload.as_ref(), b"hi");

    let said = ok(&conveyor(&cluster, &["schedule", "suspend", "nightly", "-n", NS]).await);
    assert_eq!(said.trim(), "jobschedule nightly suspended");
    assert!(api.get("nightly").await.unwrap().spec.suspend);
    ok(&conveyor(&cluster, &["schedule", "resume", "nightly", "-n", NS]).await);
    assert!(!api.get("nightly").await.unwrap().spec.suspend);

    let missing = conveyor(&cluster, &["schedule", "show", "nosuch", "-n", NS]).await;
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains("no JobSchedule nosuch in namespace team"),
        "{said}"
    );
    cluster.shutdown().await;
}
