//! What the generated CRDs promise users: names, columns, subresources, defaults and the
//! structural rules the API server enforces.

use conveyor_crds::{JobQueue, Worker};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn crd_json<T: CustomResourceExt>() -> Value {
    serde_json::to_value(T::crd()).unwrap()
}

fn spec_schema(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
}

fn columns(crd: &Value) -> Vec<String> {
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn jobqueue_names_columns_and_status() {
    let crd = crd_json::<JobQueue>();
    assert_eq!(crd["metadata"]["name"], "jobqueues.conveyor.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["jq"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["conveyor"]));
    assert_eq!(
        columns(&crd),
        [
            "Ready",
            "Backlogged",
            "Failing",
            "Pending",
            "In-Flight",
            "Dead",
            "Delayed",
            "Done/s",
            "Oldest",
            "Reason",
            "Age"
        ]
    );
    assert_eq!(
        crd["spec"]["versions"][0]["subresources"],
        json!({"status": {}})
    );
    let conditions = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn jobqueue_defaults_mirror_serde() {
    let crd = crd_json::<JobQueue>();
    let spec = spec_schema(&crd);
    assert_eq!(spec["properties"]["priorities"]["default"], 1);
    assert_eq!(spec["properties"]["priorities"]["minimum"], 1.0);
    assert_eq!(spec["properties"]["priorities"]["maximum"], 10.0);
    assert_eq!(spec["properties"]["timeout"]["default"], "30s");
    assert_eq!(spec["properties"]["deletionPolicy"]["default"], "Delete");
    assert_eq!(
        spec["properties"]["deletionPolicy"]["enum"],
        json!(["Delete", "Retain"])
    );
    assert_eq!(
        spec["properties"]["stream"]["properties"]["storage"]["enum"],
        json!(["file", "memory"])
    );
    let q: JobQueue = serde_json::from_value(json!({
        "apiVersion": "conveyor.dev/v1alpha1", "kind": "JobQueue",
        "metadata": {"name": "q"}, "spec": {}
    }))
    .unwrap();
    assert_eq!(q.spec.priorities, 1);
    assert_eq!(q.spec.timeout, "30s");
    assert_eq!(q.spec.retry.max_attempts, 5);
    assert_eq!(q.spec.alerts.failure_window, "5m");
    assert_eq!(q.spec.alerts.max_failures, 0);
    assert_eq!(q.spec.retry.backoff.initial, "1s");
    let backoff = &spec["properties"]["retry"]["properties"]["backoff"]["properties"];
    assert_eq!(backoff["multiplier"]["default"], 2.0);
    assert_eq!(backoff["jitter"]["maximum"], 1.0);
    assert_eq!(
        spec["properties"]["retry"]["properties"]["maxAttempts"]["default"],
        5
    );
}

#[test]
fn worker_names_columns_and_scale_subresource() {
    let crd = crd_json::<Worker>();
    assert_eq!(crd["metadata"]["name"], "workers.conveyor.dev");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["cw"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["conveyor"]));
    assert_eq!(
        columns(&crd),
        ["Queue", "Desired", "Ready", "Available", "Reason", "Age"]
    );
    assert_eq!(
        crd["spec"]["versions"][0]["subresources"]["scale"],
        json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"
        })
    );
    let spec = spec_schema(&crd);
    assert_eq!(
        spec["properties"]["handler"]["properties"]["mode"]["enum"],
        json!(["exec", "jsonl"])
    );
    assert_eq!(spec["properties"]["concurrency"]["default"], 1);
    assert_eq!(spec["required"], json!(["handler", "queue", "template"]));
}

#[test]
fn every_field_is_documented() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            // The pod template is k8s-openapi's, documented upstream.
            if here.contains(".template.") {
                continue;
            }
            if prop
                .get("description")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                missing.push(here.clone());
            }
            walk(&here, prop, missing);
            if let Some(items) = prop.get("items") {
                walk(&format!("{here}[]"), items, missing);
            }
        }
    }
    let mut missing = Vec::new();
    for (name, crd) in [
        ("JobQueue", crd_json::<JobQueue>()),
        ("Worker", crd_json::<Worker>()),
    ] {
        let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        for part in ["spec", "status"] {
            walk(&format!("{name}.{part}"), &root[part], &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}
