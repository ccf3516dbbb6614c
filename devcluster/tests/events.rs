//! Event validation as on a real API server: a new-style Event's note is at most 1024 bytes
//! (through events.k8s.io/v1 and core/v1 alike), old-style core/v1 Events are not limited, and
//! an update through events.k8s.io/v1 may change the series but not the note.

mod common;

use common::{api_cluster, kubectl, kubectl_ok};
use k8s_openapi::api::core::v1::Event as CoreEvent;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn event(name: &str, note: &str) -> Event {
    serde_json::from_value(json!({
        "metadata": {"name": name}, "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "test", "reportingInstance": "test-1", "action": "Reconcile",
        "reason": "ScaledDown", "type": "Normal", "note": note,
        "regarding": {"kind": "ConfigMap", "name": "x", "namespace": "default", "apiVersion": "v1"}}))
    .expect("event")
}

fn invalid(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(e) => *e,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn an_event_note_over_1024_bytes_is_rejected_with_the_real_error() {
    let cluster = api_cluster().await;
    let v1: Api<Event> = Api::default_namespaced(cluster.client());
    v1.create(&PostParams::default(), &event("fits", &"x".repeat(1024)))
        .await
        .expect("a 1024-byte note is accepted");
    let err = v1
        .create(&PostParams::default(), &event("long", &"x".repeat(1025)))
        .await
        .expect_err("a 1025-byte note is refused");
    let e = invalid(err);
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "Event.events.k8s.io \"long\" is invalid: message: Invalid value: \"\": can have at most \
         1024 characters"
    );

    // A new-style Event through core/v1 is held to the same limit.
    let core: Api<CoreEvent> = Api::default_namespaced(cluster.client());
    let mut long: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "core-long"}, "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingComponent": "test", "reportingInstance": "test-1", "action": "Reconcile",
        "reason": "ScaledDown", "type": "Normal", "message": "y".repeat(2000),
        "involvedObject": {"kind": "ConfigMap", "name": "x", "namespace": "default"}}))
    .expect("core event");
    let e = invalid(
        core.create(&PostParams::default(), &long)
            .await
            .expect_err("refused"),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .starts_with("Event \"core-long\" is invalid: message:"),
        "{}",
        e.message
    );
    // An old-style one (no eventTime) is not.
    long.event_time = None;
    long.reporting_component = None;
    core.create(&PostParams::default(), &long)
        .await
        .expect("an old-style core/v1 Event is not limited");

    // kubectl shows the server's words.
    let manifest = serde_json::to_string(&event("by-kubectl", &"z".repeat(1100))).unwrap();
    let run = kubectl(&cluster, &["create", "-f", "-"], Some(&manifest)).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("can have at most 1024 characters"),
        "{}",
        run.stderr
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_events_v1_update_counts_the_series_but_keeps_the_note() {
    let cluster = api_cluster().await;
    let v1: Api<Event> = Api::default_namespaced(cluster.client());
    v1.create(
        &PostParams::default(),
        &event("e", "scaled down from 3 to 2"),
    )
    .await
    .expect("create");
    let series = json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:05.000000Z"}});
    v1.patch("e", &PatchParams::default(), &Patch::Merge(&series))
        .await
        .expect("the series may change");
    let renote = json!({"note": "scaled down from 2 to 1"});
    let e = invalid(
        v1.patch("e", &PatchParams::default(), &Patch::Merge(&renote))
            .await
            .expect_err("the note may not change"),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .contains("message: Invalid value: \"scaled down from 2 to 1\": field is immutable"),
        "{}",
        e.message
    );
    let stored = v1.get("e").await.expect("get");
    assert_eq!(stored.note.as_deref(), Some("scaled down from 3 to 2"));
    assert_eq!(stored.series.map(|s| s.count), Some(2));
    let shown = kubectl_ok(&cluster, &["get", "events"], None).await;
    assert!(shown.contains("scaled down from 3 to 2"), "{shown}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_controllers_recorder_counts_a_repeated_message_and_writes_a_new_one_apart() {
    use conveyor_devcluster::controllers::events::Recorder;
    let cluster = api_cluster().await;
    let recorder = Recorder::new(cluster.client(), "deployment-controller");
    let object: k8s_openapi::api::core::v1::ObjectReference = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
        "namespace": "default", "uid": "u-1"}))
    .unwrap();
    for message in ["Scaled up to 2", "Scaled up to 2", "Scaled down to 1"] {
        recorder
            .record(&object, "ScalingReplicaSet", message)
            .await
            .unwrap();
    }
    let events: Api<CoreEvent> = Api::default_namespaced(cluster.client());
    let mut seen: Vec<(String, i32)> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| (e.message.unwrap_or_default(), e.count.unwrap_or(0)))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("Scaled down to 1".to_owned(), 1),
            ("Scaled up to 2".to_owned(), 2)
        ]
    );
}
