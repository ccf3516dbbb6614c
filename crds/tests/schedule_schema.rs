//! The JobSchedule CRD's schema and CEL rules, evaluated with the `cel` interpreter the way the
//! API server evaluates them (as `cel_rules.rs` does for JobQueue and Worker): the columns
//! `kubectl get` shows, the bounds of `@every` and `startingDeadline`, and that no rule fails
//! at runtime on a value the schema admits or refuses.

use conveyor_crds::JobSchedule;
use conveyor_crds::schedule::STARTING_DEADLINE;
use kube::CustomResourceExt;
use serde_json::{Value, json};

mod common;

fn crd() -> Value {
    serde_json::to_value(JobSchedule::crd()).unwrap()
}

fn spec_schema() -> Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// Messages of the rules on `spec` and its fields (at any depth) that `spec` breaks; a rule
/// that does not evaluate to a bool fails the test.
fn violations(spec: &Value) -> Vec<String> {
    common::violations(&spec_schema(), spec)
}

fn spec(schedule: &str, extra: Value) -> Value {
    let mut spec = json!({"schedule": schedule, "job": {"queue": "q"}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

#[test]
fn the_columns_are_those_of_a_cronjob_and_more() {
    let crd = crd();
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Queue", "Schedule", "Suspend", "Last", "Next", "Ready", "Reason", "Age"
        ]
    );
}

#[test]
fn an_interval_is_at_most_a_year() {
    for ok in [
        "@every 8760h",
        "@every 1h30m",
        "@every 525600m",
        "@every 31536000s",
        "30 2 * * *",
        "@daily",
    ] {
        assert_eq!(
            violations(&spec(ok, json!({}))),
            Vec::<String>::new(),
            "{ok}"
        );
    }
    for long in [
        "@every 8761h",
        "@every 525601m",
        "@every 31536001s",
        "@every 8760h1s",
    ] {
        let said = violations(&spec(long, json!({})));
        assert_eq!(said.len(), 1, "{long}: {said:?}");
        assert!(said[0].contains("at most 8760h"), "{long}: {said:?}");
    }
    // Malformed values are the form rule's to refuse; the bound rule judges none of them.
    for bad in ["@every ", "@every 5", "@every 999999999s", "@every 1s1h"] {
        let said = violations(&spec(bad, json!({})));
        assert_eq!(said.len(), 1, "{bad}: {said:?}");
        assert!(said[0].starts_with("schedule must be"), "{bad}: {said:?}");
    }
}

#[test]
fn a_starting_deadline_is_a_bounded_duration() {
    let node = &spec_schema()["properties"]["startingDeadline"];
    assert_eq!(node["pattern"], conveyor_crds::duration::PATTERN);
    assert_eq!(node["maxLength"], 39);
    assert_eq!(node["minLength"], 2);
    let description = node["description"].as_str().unwrap();
    assert!(description.contains("1s to 3650d"), "{description}");
    for ok in ["1s", "90s", "1h30m", "3650d"] {
        let said = violations(&spec("@hourly", json!({"startingDeadline": ok})));
        assert!(said.is_empty(), "{ok}: {said:?}");
    }
    for out in ["0s", "999ms", "3651d"] {
        let said = violations(&spec("@hourly", json!({"startingDeadline": out})));
        assert_eq!(
            said,
            [format!(
                "startingDeadline must be a duration {} (units d, h, m, s, ms in that order, e.g. 1h30m)",
                STARTING_DEADLINE.range()
            )],
            "{out}"
        );
    }
}

#[test]
fn reserved_header_prefixes_are_refused_in_any_case() {
    for key in [
        "Nats-Msg-Id",
        "nats-msg-id",
        "NATS-Expected-Stream",
        "conveyor-timeout",
    ] {
        let job = json!({"queue": "q", "headers": {key: "x"}});
        let said = violations(&spec("@hourly", json!({"job": job})));
        assert_eq!(
            said,
            ["job.headers names must not start with Nats- or Conveyor- (in any case)"],
            "{key}"
        );
    }
    let job = json!({"queue": "q", "headers": {"tenant": "a", "X-Nats-Id": "b", "natsy": "c"}});
    assert_eq!(
        violations(&spec("@hourly", json!({"job": job}))),
        Vec::<String>::new()
    );
}
