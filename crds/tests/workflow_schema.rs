//! The Workflow CRD's schema and CEL rules, evaluated with the `cel` interpreter the way the
//! API server evaluates them: unknown `dependsOn` and `output` names and self-dependencies are
//! refused at `kubectl apply`; cycles are left to the operator (a CRD rule cannot walk a graph).

use conveyor_crds::Workflow;
use kube::CustomResourceExt;
use serde_json::{Value, json};

mod common;

fn crd() -> Value {
    serde_json::to_value(Workflow::crd()).unwrap()
}

fn spec_schema() -> Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

fn violations(spec: &Value) -> Vec<String> {
    common::violations(&spec_schema(), spec)
}

#[test]
fn the_seeds_workflow_passes_every_rule() {
    let spec = json!({
        "steps": [
            {"name": "fetch-twitter", "queue": "twitter", "when": "has(input.twitter)"},
            {"name": "fetch-facebook", "queue": "social/facebook"},
            {"name": "aggregate", "queue": "aggregate",
             "dependsOn": ["fetch-twitter", "fetch-facebook"]}
        ],
        "onFailure": {"queue": "notify"},
        "output": "aggregate"
    });
    assert_eq!(violations(&spec), Vec::<String>::new());
}

#[test]
fn unknown_names_and_self_dependencies_are_refused() {
    let spec = json!({
        "steps": [
            {"name": "a", "queue": "q", "dependsOn": ["nope"]},
            {"name": "b", "queue": "q", "dependsOn": ["b"]}
        ],
        "output": "zzz"
    });
    assert_eq!(
        violations(&spec),
        [
            "every dependsOn entry must name a step of this workflow",
            "a step must not depend on itself",
            "output must name a step of this workflow"
        ]
    );
}

#[test]
fn a_step_has_a_queue_or_is_a_sub_run_never_both() {
    let ok = json!({"steps": [{"name": "a", "workflow": "tree"}]});
    assert_eq!(violations(&ok), Vec::<String>::new());
    let both = json!({"steps": [{"name": "a", "queue": "q", "workflow": "tree"}]});
    let neither = json!({"steps": [{"name": "a"}]});
    for spec in [both, neither] {
        assert_eq!(
            violations(&spec),
            ["a step needs exactly one of queue and workflow"],
            "{spec}"
        );
    }
}

#[test]
fn a_cycle_passes_the_schema_and_is_the_operators_to_refuse() {
    let spec = json!({
        "steps": [
            {"name": "a", "queue": "q", "dependsOn": ["b"]},
            {"name": "b", "queue": "q", "dependsOn": ["a"]}
        ]
    });
    assert_eq!(violations(&spec), Vec::<String>::new());
}

#[test]
fn lists_are_bounded_and_step_names_are_keys() {
    let steps = &spec_schema()["properties"]["steps"];
    assert_eq!(steps["maxItems"], 64);
    assert_eq!(steps["x-kubernetes-list-type"], "map");
    assert_eq!(steps["x-kubernetes-list-map-keys"], json!(["name"]));
    let step = &steps["items"]["properties"];
    assert_eq!(step["dependsOn"]["maxItems"], 32);
    assert_eq!(step["name"]["maxLength"], 63);
    assert_eq!(step["when"]["maxLength"], 1024);
}

#[test]
fn the_columns_say_whether_runs_can_start() {
    let crd = crd();
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Ready", "Reason", "Message", "Age"]);
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["wf"]));
}
