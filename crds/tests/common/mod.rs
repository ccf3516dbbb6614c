//! Shared by the CRD schema tests: the CEL rules of a schema, evaluated with the `cel`
//! interpreter the way the API server evaluates them.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// CEL's standard library plus the string extension functions Kubernetes enables.
// Not every test crate compiles programs of its own.
#[allow(dead_code)]
pub fn env() -> &'static Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        env.add_extension(cel::extensions::strings).unwrap();
        Arc::new(env)
    })
}

/// Messages of the rules that `value` (an object at `schema`'s place) breaks, its own and those
/// of its fields at any depth: each `x-kubernetes-validations` rule with `self` bound to the
/// value at its place. A rule that does not evaluate to a bool (a runtime error) panics.
pub fn violations(schema: &Value, value: &Value) -> Vec<String> {
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
            let program = env()
                .compile(source)
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            let mut ctx = cel::Context::with_env(Arc::clone(env()));
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
