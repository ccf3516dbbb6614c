//! The devcluster driven by kube-rs: optimistic concurrency, garbage collection, finalizers,
//! graceful pod deletion, pagination, watch semantics, status subresource, events, and a
//! kube-rs `Controller` reconciling against it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde_json::json;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}}))
        .expect("configmap")
}

#[tokio::test]
async fn stale_update_gets_409_conflict() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let created = api
        .create(&PostParams::default(), &cm("c"))
        .await
        .expect("create");
    let mut first = created.clone();
    first.data = Some([("k".to_owned(), "first".to_owned())].into());
    api.replace("c", &PostParams::default(), &first)
        .await
        .expect("first update");
    let mut stale = created;
    stale.data = Some([("k".to_owned(), "stale".to_owned())].into());
    let err = api
        .replace("c", &PostParams::default(), &stale)
        .await
        .expect_err("stale update fails");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
        }
        other => panic!("unexpected {other:?}"),
    }
    let dup = api
        .create(&PostParams::default(), &cm("c"))
        .await
        .expect_err("duplicate create fails");
    assert!(
        matches!(dup, kube::Error::Api(ref s) if s.reason == "AlreadyExists"),
        "{dup:?}"
    );
    cluster.shutdown().await;
}

fn owned(name: &str, owner: &ConfigMap) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid,
        "blockOwnerDeletion": true}]}}))
    .expect("configmap")
}

#[tokio::test]
async fn owned_objects_are_garbage_collected() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let pp = PostParams::default();
    // Background.
    let owner = api.create(&pp, &cm("owner")).await.expect("owner");
    api.create(&pp, &owned("child", &owner))
        .await
        .expect("child");
    api.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    wait_for("child collected", Duration::from_secs(5), || async {
        api.get_opt("child")
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    // Foreground: the owner waits for its dependents (with a finalizer that holds one of them).
    let owner = api.create(&pp, &cm("owner2")).await.expect("owner");
    let mut held = owned("held", &owner);
    held.metadata.finalizers = Some(vec!["test/hold".into()]);
    api.create(&pp, &held).await.expect("child");
    api.delete("owner2", &DeleteParams::foreground())
        .await
        .expect("delete owner");
    let o = api.get("owner2").await.expect("owner still there");
    assert!(o.metadata.deletion_timestamp.is_some());
    assert!(
        o.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"foregroundDeletion".to_owned())
    );
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release child");
    wait_for(
        "owner gone after its dependents",
        Duration::from_secs(5),
        || async {
            api.get_opt("owner2")
                .await
                .expect("get")
                .is_none()
                .then_some(())
        },
    )
    .await;
    // Orphan.
    let owner = api.create(&pp, &cm("owner3")).await.expect("owner");
    api.create(&pp, &owned("orphan", &owner))
        .await
        .expect("child");
    api.delete("owner3", &DeleteParams::orphan())
        .await
        .expect("delete owner");
    let orphan = api.get("orphan").await.expect("orphan stays");
    assert!(
        orphan
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let mut c = cm("f");
    c.metadata.finalizers = Some(vec!["example.com/cleanup".into()]);
    api.create(&PostParams::default(), &c)
        .await
        .expect("create");
    api.delete("f", &DeleteParams::default())
        .await
        .expect("delete");
    let marked = api.get("f").await.expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::<()>::Json(json_patch::Patch(vec![])),
    )
    .await
    .expect("no-op patch");
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": []}})),
    )
    .await
    .expect("remove finalizer");
    assert!(api.get_opt("f").await.expect("get").is_none());
    cluster.shutdown().await;
}

#[tokio::test]
async fn bound_pods_terminate_gracefully() {
    let cluster = api_cluster().await;
    let api: Api<Pod> = Api::default_namespaced(cluster.client());
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"nodeName": "devcluster",
        "terminationGracePeriodSeconds": 7, "containers": [{"name": "c", "image": "x"}]}}),
    )
    .expect("pod");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    api.delete("p", &DeleteParams::default())
        .await
        .expect("delete");
    let p = api.get("p").await.expect("still there while terminating");
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(7));
    assert!(p.metadata.deletion_timestamp.is_some());
    // The kubelet finishes the deletion.
    api.delete("p", &DeleteParams::default().grace_period(0))
        .await
        .expect("final delete");
    assert!(api.get_opt("p").await.expect("get").is_none());
    // Eviction is a graceful delete too.
    let evictee: Pod = serde_json::from_value(
        json!({"metadata": {"name": "e"}, "spec": {"nodeName": "devcluster",
        "containers": [{"name": "c", "image": "x"}]}}),
    )
    .expect("pod");
    api.create(&PostParams::default(), &evictee)
        .await
        .expect("create");
    api.evict("e", &kube::api::EvictParams::default())
        .await
        .expect("evict");
    let e = api.get("e").await.expect("terminating");
    assert_eq!(e.metadata.deletion_grace_period_seconds, Some(30));
    // Unbound pods go at once.
    let unbound: Pod = serde_json::from_value(
        json!({"metadata": {"name": "u"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}),
    )
    .expect("pod");
    api.create(&PostParams::default(), &unbound)
        .await
        .expect("create");
    api.delete("u", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(api.get_opt("u").await.expect("get").is_none());
    cluster.shutdown().await;
}

#[tokio::test]
async fn lists_paginate_and_select() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    for i in 0..5 {
        let mut c = cm(&format!("c{i}"));
        c.metadata.labels = Some(
            [(
                "parity".to_owned(),
                if i % 2 == 0 { "even" } else { "odd" }.to_owned(),
            )]
            .into(),
        );
        api.create(&PostParams::default(), &c)
            .await
            .expect("create");
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.expect("list");
        assert!(page.items.len() <= 2);
        names.extend(page.items.into_iter().filter_map(|c| c.metadata.name));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    let even = api
        .list(&ListParams::default().labels("parity=even"))
        .await
        .expect("list");
    assert_eq!(even.items.len(), 3);
    let named = api
        .list(&ListParams::default().fields("metadata.name=c3"))
        .await
        .expect("list");
    assert_eq!(named.items.len(), 1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let created = api
        .create(&PostParams::default(), &cm("w"))
        .await
        .expect("create");
    let rv = created.metadata.resource_version.clone().expect("rv");
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .expect("patch");
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("event in time");
    match ev.expect("ok").expect("an event") {
        WatchEvent::Modified(c) => assert_eq!(c.data.unwrap_or_default()["k"], "2"),
        other => panic!("expected the missed modification, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let cluster = api_cluster().await;
    install_widgets(&cluster).await;
    let gvk = GroupVersionKind::gvk("test.devcluster.io", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let api: Api<DynamicObject> = Api::default_namespaced_with(cluster.client(), &ar);
    let w: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "test.devcluster.io/v1", "kind": "Widget",
        "metadata": {"name": "w"}, "spec": {"color": "red"}, "status": {"replicas": 9}}),
    )
    .expect("widget");
    let created = api
        .create(&PostParams::default(), &w)
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create"
    );
    let st = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2}})),
        )
        .await
        .expect("status");
    assert_eq!(
        st.metadata.generation,
        Some(1),
        "status writes keep generation"
    );
    let spec = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"color": "blue"}, "status": {"replicas": 5}})),
        )
        .await
        .expect("spec");
    assert_eq!(spec.metadata.generation, Some(2));
    assert_eq!(
        spec.data["status"]["replicas"], 2,
        "main resource writes ignore status"
    );
    let bad = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": -1}})),
        )
        .await
        .expect_err("invalid");
    assert!(
        matches!(bad, kube::Error::Api(ref s) if s.code == 422),
        "{bad:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn events_are_shared_between_api_groups() {
    let cluster = api_cluster().await;
    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(cluster.client());
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "test",
        "reportingInstance": "test-1", "action": "Reconcile", "reason": "Tested", "type": "Normal",
        "note": "it works", "regarding": {"kind": "ConfigMap", "name": "x", "namespace": "default", "apiVersion": "v1"}}))
    .expect("event");
    v1.create(&PostParams::default(), &ev)
        .await
        .expect("create");
    let core: Api<CoreEvent> = Api::default_namespaced(cluster.client());
    let list = core
        .list(&ListParams::default().fields("involvedObject.name=x,involvedObject.kind=ConfigMap"))
        .await
        .expect("list");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].message.as_deref(), Some("it works"));
    cluster.shutdown().await;
}

#[tokio::test]
async fn kube_rs_controller_reconciles() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let ctx = Arc::new(api.clone());
    let controller = Controller::new(api.clone(), watcher::Config::default())
        .run(
            |obj: Arc<ConfigMap>, api: Arc<Api<ConfigMap>>| async move {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let patch = json!({"metadata": {"annotations": {"reconciled": "yes"}}});
                api.patch(
                    &name,
                    &PatchParams::apply("test-controller"),
                    &Patch::Apply(patch),
                )
                .await?;
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _, _| Action::requeue(Duration::from_millis(100)),
            ctx,
        )
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    api.create(&PostParams::default(), &cm("a"))
        .await
        .expect("create");
    api.create(&PostParams::default(), &cm("b"))
        .await
        .expect("create");
    for name in ["a", "b"] {
        wait_for(
            "the controller to annotate",
            Duration::from_secs(10),
            || async {
                let c = api.get(name).await.expect("get");
                (c.metadata
                    .annotations
                    .unwrap_or_default()
                    .get("reconciled")
                    .map(String::as_str)
                    == Some("yes"))
                .then_some(())
            },
        )
        .await;
    }
    // Streaming lists (sendInitialEvents + bookmarks) work too.
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = 0;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), events.try_next())
        .await
        .expect("in time")
        .expect("ok")
    {
        match ev {
            watcher::Event::InitApply(_) => seen += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, 2);
    task.abort();
    cluster.shutdown().await;
}

#[tokio::test]
async fn metadata_lists_watches_and_delete_collection() {
    let cluster = api_cluster().await;
    let api: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    for name in ["m1", "m2", "keep"] {
        let mut c = cm(name);
        if name != "keep" {
            c.metadata.labels = Some([("batch".to_owned(), "x".to_owned())].into());
        }
        api.create(&PostParams::default(), &c)
            .await
            .expect("create");
    }
    let meta = api
        .list_metadata(&ListParams::default())
        .await
        .expect("list metadata");
    assert_eq!(meta.items.len(), 3);
    assert!(meta.items.iter().all(|m| m.metadata.uid.is_some()));
    let meta_api: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::default_namespaced(cluster.client());
    let mut stream = watcher(meta_api, watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("in time")
        .expect("metadata watch works")
    {
        match ev {
            watcher::Event::InitApply(m) => seen.extend(m.metadata.name),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("batch=x"),
    )
    .await
    .expect("delete collection");
    let left: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(left, ["keep"]);
    cluster.shutdown().await;
}
