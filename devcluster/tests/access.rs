//! The permissions the served requests needed, per identity (`DevCluster::access`): the verbs
//! follow the API server's (get, list, watch, create, update, patch, delete, deletecollection),
//! subresources are `resource/subresource`, an owner reference with `blockOwnerDeletion`
//! needs `update` on the owner's `finalizers`, a server-side apply that creates needs `create`,
//! and an impersonated client is recorded apart from the others.

mod common;

use std::collections::BTreeSet;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchParams};
use serde_json::json;

use conveyor_devcluster::audit::Access;

#[tokio::test]
async fn each_identity_is_recorded_with_the_verbs_it_used() {
    let cluster = api_cluster().await;
    let alice = cluster.client_as("alice").unwrap();
    let maps: Api<ConfigMap> = Api::default_namespaced(alice.clone());
    let owner = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let owned: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owned",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid, "blockOwnerDeletion": true}]}}))
    .unwrap();
    maps.create(&PostParams::default(), &owned).await.unwrap();
    maps.get("owner").await.unwrap();
    maps.list(&ListParams::default()).await.unwrap();
    let mut watch = maps
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    while watch.next().await.is_some() {}
    maps.patch(
        "owner",
        &PatchParams::apply("alice"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"}})),
    )
    .await
    .unwrap();
    let mut current = maps.get("owner").await.unwrap();
    current.data = Some([("k".to_owned(), "w".to_owned())].into());
    maps.replace("owner", &PostParams::default(), &current)
        .await
        .unwrap();
    maps.delete("owned", &DeleteParams::default())
        .await
        .unwrap();
    maps.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(alice);
    let _ = deployments.get_scale("missing").await;

    let used: BTreeSet<String> = cluster
        .access("alice")
        .iter()
        .map(Access::to_string)
        .collect();
    let expected: BTreeSet<String> = [
        "create core/configmaps",
        "update core/configmaps/finalizers",
        "get core/configmaps",
        "list core/configmaps",
        "watch core/configmaps",
        "patch core/configmaps",
        "update core/configmaps",
        "delete core/configmaps",
        "deletecollection core/configmaps",
        "get apps/deployments/scale",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(used, expected);

    // A server-side apply that creates the object needs create too; one that changes it, patch.
    let apply_as = |user: &str| {
        let secrets: Api<Secret> = Api::default_namespaced(cluster.client_as(user).unwrap());
        async move {
            secrets
                .patch(
                    "made",
                    &PatchParams::apply("test"),
                    &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret"})),
                )
                .await
                .unwrap();
        }
    };
    apply_as("bob").await;
    apply_as("carol").await;
    let shown = |user: &str| -> Vec<String> {
        cluster.access(user).iter().map(Access::to_string).collect()
    };
    assert_eq!(shown("bob"), ["create core/secrets", "patch core/secrets"]);
    assert_eq!(shown("carol"), ["patch core/secrets"]);
    assert!(
        cluster.access("").is_empty(),
        "nothing else ran: {:?}",
        cluster.access("")
    );
}
