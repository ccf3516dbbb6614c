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
            "Waiting",
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
        [
            "Queue",
            "Desired",
            "Ready",
            "Busy",
            "Slots",
            "Available",
            "Reason",
            "Age"
        ]
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
        json!(["exec", "jsonl", "http"])
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

/// Every schema node below `schema`, with its path.
fn nodes<'a>(path: String, schema: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    out.push((path.clone(), schema));
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            nodes(format!("{path}.{name}"), prop, out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = schema.get(key).filter(|v| v.is_object()) {
            nodes(format!("{path}[]"), sub, out);
        }
    }
}

fn all_nodes(crd: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    nodes(
        String::new(),
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        &mut out,
    );
    out
}

#[test]
fn every_count_in_the_specs_has_bounds() {
    for crd in [crd_json::<JobQueue>(), crd_json::<Worker>()] {
        for (path, node) in all_nodes(&crd) {
            if !path.starts_with(".spec") || path.contains(".template") {
                continue;
            }
            if matches!(node["type"].as_str(), Some("integer" | "number")) {
                assert!(
                    node.get("minimum").is_some() && node.get("maximum").is_some(),
                    "{path} has no minimum and maximum: {node}"
                );
            }
        }
    }
}

#[test]
fn the_bounds_are_the_documented_ones() {
    let q = crd_json::<JobQueue>();
    let spec = &spec_schema(&q)["properties"];
    let range = |v: &Value| {
        (
            v["minimum"].as_f64().unwrap(),
            v["maximum"].as_f64().unwrap(),
        )
    };
    assert_eq!(range(&spec["priorities"]), (1.0, 10.0));
    assert_eq!(range(&spec["concurrencyLimit"]), (1.0, 1e6));
    assert_eq!(range(&spec["rateLimit"]), (1.0, 1e5));
    assert_eq!(range(&spec["stream"]["properties"]["replicas"]), (1.0, 5.0));
    assert_eq!(range(&spec["stream"]["properties"]["maxJobs"]), (1.0, 1e12));
    assert_eq!(
        range(&spec["stream"]["properties"]["maxBytes"]),
        (1.0, 1125899906842624.0)
    );
    assert_eq!(
        range(&spec["stream"]["properties"]["maxJobSize"]),
        (1.0, 67108864.0)
    );
    assert_eq!(
        range(&spec["retry"]["properties"]["maxAttempts"]),
        (1.0, 1000.0)
    );
    assert_eq!(
        range(&spec["alerts"]["properties"]["maxPending"]),
        (0.0, 1e12)
    );
    assert_eq!(
        range(&spec["alerts"]["properties"]["maxFailures"]),
        (0.0, 1e9)
    );
    let w = crd_json::<Worker>();
    let spec = &spec_schema(&w)["properties"];
    assert_eq!(range(&spec["replicas"]), (0.0, 1000.0));
    assert_eq!(range(&spec["concurrency"]), (1.0, 1000.0));
    let scaling = &spec["scaling"]["properties"];
    assert_eq!(range(&scaling["minReplicas"]), (0.0, 1000.0));
    assert_eq!(range(&scaling["maxReplicas"]), (0.0, 1000.0));
    assert_eq!(range(&scaling["targetBacklogPerReplica"]), (1.0, 1e6));
    let recycle = &spec["recycle"]["properties"];
    assert_eq!(range(&recycle["maxJobs"]), (1.0, 1e9));
    assert_eq!(range(&recycle["maxUnavailable"]), (1.0, 1000.0));
}

#[test]
fn every_duration_has_pattern_length_and_a_range_rule() {
    use conveyor_crds::bounds::DURATIONS;
    let q = crd_json::<JobQueue>();
    let w = crd_json::<Worker>();
    let mut seen = 0;
    for crd in [&q, &w] {
        for (path, node) in all_nodes(crd) {
            let Some(pattern) = node.get("pattern") else {
                continue;
            };
            assert_eq!(pattern, conveyor_crds::duration::PATTERN, "{path}");
            assert_eq!(node["maxLength"], 39, "{path}");
            assert_eq!(node["minLength"], 2, "{path}");
            let field = format!("spec{}", path.trim_start_matches(".spec"));
            let (_, bounds) = DURATIONS
                .iter()
                .find(|(f, _)| *f == field)
                .unwrap_or_else(|| panic!("{field} is not in bounds::DURATIONS"));
            let rules = node["x-kubernetes-validations"].as_array().unwrap();
            assert_eq!(rules.len(), 1, "{path}");
            // The API server estimates a rule's cost from the sizes it knows: those of `self`
            // (maxLength) and its substrings, not of a string built by `string(int)`, whose
            // concatenation it would price as unbounded.
            let rule = rules[0]["rule"].as_str().unwrap();
            assert!(
                !rule.replace("substring(", "").contains("string("),
                "{path}: {rule}"
            );
            let message = rules[0]["message"].as_str().unwrap();
            assert!(message.contains(&bounds.range()), "{path}: {message}");
            let description = node["description"].as_str().unwrap();
            assert!(
                description.contains(&format!("{} to {}", bounds.min, bounds.max)),
                "{path}: the description does not give the range: {description}"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, DURATIONS.len());
}

#[test]
fn every_string_with_a_rule_has_a_max_length() {
    // The API server estimates each rule's cost from the string's maxLength and refuses the
    // CRD when a rule on an unbounded string could exceed the budget.
    for crd in [crd_json::<JobQueue>(), crd_json::<Worker>()] {
        for (path, node) in all_nodes(&crd) {
            if node["type"] == "string" && node.get("x-kubernetes-validations").is_some() {
                assert!(
                    node.get("maxLength").is_some(),
                    "{path} has rules but no maxLength"
                );
            }
        }
    }
}

#[test]
fn only_formats_kubernetes_knows() {
    const KNOWN: &[&str] = &["int32", "int64", "float", "double", "date-time", "byte"];
    for crd in [crd_json::<JobQueue>(), crd_json::<Worker>()] {
        let text = crd.to_string();
        for (path, node) in all_nodes(&crd) {
            if let Some(f) = node.get("format").and_then(Value::as_str) {
                assert!(KNOWN.contains(&f), "{path}: format {f}");
            }
        }
        assert!(!text.contains("\"uint"), "an unsigned format is left");
    }
}

#[test]
fn the_worker_crd_fits_in_a_last_applied_annotation() {
    // `kubectl apply` (client side) stores the whole object as JSON in an annotation, and the
    // API server refuses more than 262144 bytes of annotations.
    let crd = crd_json::<Worker>();
    let size = serde_json::to_string(&crd).unwrap().len();
    assert!(size < 128 * 1024, "the Worker CRD is {size} bytes of JSON");
    let template = &spec_schema(&crd)["properties"]["template"];
    assert!(
        template["description"].as_str().is_some(),
        "our own description of template stays"
    );
    let mut descriptions = Vec::new();
    for (path, node) in all_nodes(template) {
        if !path.is_empty() && node.get("description").is_some() {
            descriptions.push(path);
        }
    }
    assert!(descriptions.is_empty(), "{descriptions:?}");
    // The structure stays: containers are required and typed.
    let pod = &template["properties"]["spec"];
    assert_eq!(pod["required"], json!(["containers"]));
    assert_eq!(
        pod["properties"]["containers"]["items"]["properties"]["resources"]["type"],
        "object"
    );
}
