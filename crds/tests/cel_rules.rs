//! The CEL rules of the CRDs, evaluated here with the `cel` interpreter the way the API server
//! evaluates them: each `x-kubernetes-validations` rule with `self` bound to the value at its
//! place in the object.

use conveyor_crds::{JobQueue, Worker};
use kube::CustomResourceExt;
use serde_json::{Value, json};

/// Messages of the rules that `object` breaks.
fn violations(schema: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check(schema, value, &mut out);
    out
}

fn check(schema: &Value, value: &Value, out: &mut Vec<String>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            let source = rule["rule"].as_str().unwrap();
            let program = cel::Program::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            let mut ctx = cel::Context::default();
            ctx.add_variable("self", cel::to_value(value).unwrap())
                .unwrap();
            match program.execute(&ctx) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => {
                    out.push(
                        rule.get("message")
                            .and_then(Value::as_str)
                            .unwrap_or(source)
                            .to_owned(),
                    );
                }
                other => panic!("rule {source} on {value}: {other:?}"),
            }
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for (name, sub) in props {
            if let Some(v) = obj.get(name) {
                check(sub, v, out);
            }
        }
    }
    if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
        for v in list {
            check(items, v, out);
        }
    }
}

fn root<T: CustomResourceExt>() -> Value {
    serde_json::to_value(T::crd()).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        .clone()
}

fn worker(spec: Value) -> Value {
    json!({"apiVersion": "conveyor.dev/v1alpha1", "kind": "Worker", "metadata": {"name": "w"}, "spec": spec})
}

fn good_worker_spec() -> Value {
    json!({
        "queue": "hello",
        "handler": {"mode": "exec", "command": ["/handler.sh"]},
        "template": {"spec": {"containers": [{"name": "handler", "image": "hello"}]}},
        "scaling": {"minReplicas": 1, "maxReplicas": 4}
    })
}

#[test]
fn the_hello_example_passes() {
    let w: Value = serde_yaml::from_str(include_str!("../../examples/hello/worker.yaml")).unwrap();
    assert_eq!(violations(&root::<Worker>(), &w), Vec::<String>::new());
    let q: Value = serde_yaml::from_str(include_str!("../../examples/hello/queue.yaml")).unwrap();
    assert_eq!(violations(&root::<JobQueue>(), &q), Vec::<String>::new());
}

#[test]
fn min_replicas_above_max_is_rejected() {
    let mut spec = good_worker_spec();
    spec["scaling"] = json!({"minReplicas": 5, "maxReplicas": 2});
    let v = violations(&root::<Worker>(), &worker(spec));
    assert_eq!(
        v,
        ["scaling.minReplicas must be less than or equal to scaling.maxReplicas"]
    );
}

#[test]
fn min_equal_max_and_zero_are_fine() {
    for (min, max) in [(3, 3), (0, 0), (0, 8)] {
        let mut spec = good_worker_spec();
        spec["scaling"] = json!({"minReplicas": min, "maxReplicas": max});
        assert!(
            violations(&root::<Worker>(), &worker(spec)).is_empty(),
            "{min}..{max}"
        );
    }
}

#[test]
fn exec_and_jsonl_need_a_command() {
    for mode in ["exec", "jsonl"] {
        for handler in [json!({"mode": mode}), json!({"mode": mode, "command": []})] {
            let mut spec = good_worker_spec();
            spec["handler"] = handler;
            let v = violations(&root::<Worker>(), &worker(spec));
            assert_eq!(
                v,
                ["handler.command is required for the exec and jsonl modes"],
                "{mode}"
            );
        }
    }
}

#[test]
fn a_template_without_containers_is_rejected() {
    let mut spec = good_worker_spec();
    spec["template"] = json!({"spec": {"containers": []}});
    let v = violations(&root::<Worker>(), &worker(spec));
    assert_eq!(
        v,
        ["template.spec.containers must contain the container that runs the handler"]
    );
}

#[test]
fn an_empty_nats_url_is_rejected() {
    let q = json!({
        "apiVersion": "conveyor.dev/v1alpha1", "kind": "JobQueue", "metadata": {"name": "q"},
        "spec": {"nats": {"url": ""}}
    });
    assert_eq!(
        violations(&root::<JobQueue>(), &q),
        ["nats.url must not be empty"]
    );
}
