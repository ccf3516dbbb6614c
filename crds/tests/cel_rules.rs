//! The CEL rules of the CRDs, evaluated here with the `cel` interpreter the way the API server
//! evaluates them: each `x-kubernetes-validations` rule with `self` bound to the value at its
//! place in the object, in CEL's standard library plus the string extension functions
//! Kubernetes enables. A rule that does not evaluate to a bool (a runtime error, which the API
//! server reports as a confusing rejection) fails the test.

use std::sync::Arc;

use conveyor_crds::bounds::{self, DURATIONS};
use conveyor_crds::duration::{self, Bounds};
use conveyor_crds::{JobQueue, Worker};
use kube::CustomResourceExt;
use serde_json::{Value, json};

mod common;
use common::{env, violations};

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

fn queue(spec: Value) -> Value {
    json!({"apiVersion": "conveyor.dev/v1alpha1", "kind": "JobQueue", "metadata": {"name": "q"}, "spec": spec})
}

/// The object and schema for a value at `path` (`spec.…`) of either kind.
fn with_value(path: &str, value: &str) -> (Value, Value) {
    let mut obj = if path.starts_with("spec.recycle.") || path.starts_with("spec.scaling.") {
        worker(good_worker_spec())
    } else {
        queue(json!({}))
    };
    let mut at = &mut obj;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if at.get(*part).is_none() {
            at[*part] = json!({});
        }
        at = &mut at[*part];
    }
    at[parts[parts.len() - 1]] = json!(value);
    let schema = if obj["kind"] == "Worker" {
        root::<Worker>()
    } else {
        root::<JobQueue>()
    };
    (obj, schema)
}

fn duration_violations(path: &str, value: &str) -> Vec<String> {
    let (obj, schema) = with_value(path, value);
    violations(&schema, &obj)
}

/// One millisecond more or less than a bound, in the field syntax.
fn shifted(d: std::time::Duration, more: bool) -> String {
    let ms = d.as_millis();
    format!("{}ms", if more { ms + 1 } else { ms - 1 })
}

#[test]
fn duration_rules_hold_every_field_to_its_range() {
    for (path, b) in DURATIONS {
        let field = path.trim_start_matches("spec.");
        let message = format!(
            "{field} must be a duration {} (units d, h, m, s, ms in that order, e.g. 1h30m)",
            b.range()
        );
        for ok in [b.min, b.max] {
            assert!(
                duration_violations(path, ok).is_empty(),
                "{path}={ok}: {:?}",
                duration_violations(path, ok)
            );
        }
        // Longer than the max by a millisecond, spelled in milliseconds (10 digits allow it).
        let above = shifted(b.max(), true);
        if above.len() <= 12 {
            assert_eq!(
                duration_violations(path, &above),
                [message.as_str()],
                "{path}={above}"
            );
        }
        let far = "9999d";
        assert_eq!(
            duration_violations(path, far),
            [message.as_str()],
            "{path}={far}"
        );
        if !b.min().is_zero() {
            let below = shifted(b.min(), false);
            assert_eq!(
                duration_violations(path, &below),
                [message.as_str()],
                "{path}={below}"
            );
            assert_eq!(
                duration_violations(path, "0s"),
                [message.as_str()],
                "{path}=0s"
            );
        }
    }
}

#[test]
fn timeout_bounds_the_issue_values() {
    let message = "timeout must be a duration from 1s to 24h (units d, h, m, s, ms in that order, e.g. 1h30m)";
    for bad in ["0s", "0ms", "999ms", "2d", "24h1ms", "1d1s", "25h"] {
        assert_eq!(duration_violations("spec.timeout", bad), [message], "{bad}");
    }
    for good in ["1s", "30s", "1000ms", "1d", "23h59m59s999ms", "1h30m"] {
        assert!(
            duration_violations("spec.timeout", good).is_empty(),
            "{good}"
        );
    }
}

#[test]
fn duration_rules_never_fail_at_runtime() {
    // Strings the pattern refuses too: the API server evaluates rules even after a pattern
    // violation, so the rule must quietly pass them (the pattern reports them).
    for (path, _) in DURATIONS {
        for value in [
            "",
            "d",
            "1d1d",
            "1h1d",
            "200000d",
            "9999d99999h999999m99999999s9999999999ms",
            "1.5h",
            "-1s",
            "1 s",
            "abc",
            "0",
            "1w",
            "00d",
            "0d0h0m0s0ms",
        ] {
            // `violations` panics on a rule that does not evaluate to a bool.
            duration_violations(path, value);
        }
    }
}

#[test]
fn the_pattern_admits_exactly_what_the_parser_reads() {
    let longest = "9999d99999h999999m99999999s9999999999ms";
    let any = Bounds::new("0s", longest);
    let program = env().compile("self.matches(pattern)").unwrap();
    for value in [
        "",
        "5",
        "s",
        "1h1d",
        "1s1s",
        "30m1h",
        "1w",
        "1.5h",
        "-1s",
        "99999d",
        "1 s",
        "1S",
        "0s",
        "1d",
        "500ms",
        "1m5ms",
        "1h30m",
        "7d12h",
        longest,
        "12345678901ms",
        "1d2h3m4s5ms",
    ] {
        let mut ctx = cel::Context::with_env(Arc::clone(env()));
        ctx.add_variable("self", value).unwrap();
        ctx.add_variable("pattern", duration::PATTERN).unwrap();
        let matches = program.execute(&ctx).unwrap() == cel::Value::Bool(true);
        let admitted = matches && value.len() >= duration::MIN_LENGTH as usize;
        let parsed = duration::parse("f", value, any).is_ok();
        assert_eq!(
            admitted, parsed,
            "{value:?}: pattern {matches}, parser {parsed}"
        );
    }
}

#[test]
fn durations_parse_with_the_same_bounds() {
    let q: JobQueue = serde_json::from_value(queue(json!({"timeout": "0s"}))).unwrap();
    let err = q.spec.timeout().unwrap_err().to_string();
    assert_eq!(
        err,
        "spec.timeout is 0s, out of range: must be a duration from 1s to 24h"
    );
    let q: JobQueue = serde_json::from_value(queue(json!({"timeout": "200000d"}))).unwrap();
    let err = q.spec.timeout().unwrap_err().to_string();
    assert!(
        err.contains("spec.timeout") && err.contains("too many digits"),
        "{err}"
    );
    assert_eq!(
        bounds::TIMEOUT.max(),
        std::time::Duration::from_secs(86_400)
    );
}
