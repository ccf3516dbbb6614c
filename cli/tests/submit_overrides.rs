//! `conveyor submit --timeout/--max-attempts` against the real binary and a real nats-server:
//! the job carries the per-job overrides as the protocol's headers, and values out of range are
//! refused before anything is sent.

use std::process::Stdio;

use async_nats::jetstream;
use conveyor::admin::{QueueSettings, ensure_queue};
use conveyor::names::QueueRef;
use conveyor_testkit::NatsServer;
use tokio::process::Command;

async fn conveyor(nats: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .env("CONVEYOR_NATS_URL", nats)
        .env_remove("CONVEYOR_NAMESPACE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("conveyor runs")
}

#[tokio::test]
async fn submit_sets_the_per_job_timeout_and_attempts() {
    let nats = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let queue = QueueRef::new("default", "hello");
    ensure_queue(&js, &queue, &QueueSettings::default())
        .await
        .expect("create queue");
    let out = conveyor(
        &nats.url(),
        &[
            "submit",
            "hello",
            "--id",
            "quick",
            "--timeout",
            "1500ms",
            "--max-attempts",
            "2",
            "{}",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stream = js.get_stream(queue.stream()).await.expect("stream");
    let job = stream.get_raw_message(1).await.expect("the job");
    let header = |name: &str| job.headers.get(name).map(|v| v.to_string());
    assert_eq!(header("Nats-Msg-Id").as_deref(), Some("quick"));
    assert_eq!(header("Conveyor-Max-Attempts").as_deref(), Some("2"));
    let timeout = header("Conveyor-Timeout").expect("a timeout header");
    assert_eq!(
        humantime::parse_duration(&timeout).unwrap(),
        std::time::Duration::from_millis(1500),
        "{timeout}"
    );

    for bad in [
        &["--timeout", "0s"][..],
        &["--timeout", "169h"],
        &["--max-attempts", "0"],
        &["--max-attempts", "1001"],
    ] {
        let out = conveyor(&nats.url(), &[&["submit", "hello"], bad, &["{}"]].concat()).await;
        assert!(!out.status.success(), "{bad:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("out of range; allowed:"),
            "{bad:?}: {stderr}"
        );
    }
    let info = js
        .get_stream(queue.stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(info, 1, "refused submissions send nothing");
}
