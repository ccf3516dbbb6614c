//! `x-kubernetes-validations` rules: CEL expressions evaluated with the `cel` crate, `self`
//! bound to the value at the rule's schema node and `oldSelf` to the previous value on updates.
//! The environment is CEL's standard library plus the extended string functions (`indexOf`,
//! `substring`, `split`, `replace`, `lowerAscii` …) that Kubernetes also enables for CRD rules.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// Outcome of one rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The rule holds.
    Pass,
    /// The rule is violated; the message to report.
    Fail(String),
    /// The rule could not be compiled or evaluated.
    Error(String),
}

/// JSON to CEL (integers stay signed, as Kubernetes' int64 fields).
pub fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => match n.as_u64() {
                Some(u) => cel::Value::UInt(u),
                None => cel::Value::Float(n.as_f64().unwrap_or_default()),
            },
        },
        Value::String(s) => cel::Value::from(s.clone()),
        Value::Array(a) => cel::Value::from(a.iter().map(to_cel).collect::<Vec<_>>()),
        Value::Object(m) => {
            let map: HashMap<String, cel::Value> =
                m.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// The CEL environment of CRD rules, built once.
fn env() -> &'static Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        env.add_extension(cel::extensions::strings)
            .expect("the strings extension registers on the standard library");
        Arc::new(env)
    })
}

/// Compiles a rule or message expression in the CRD rules' environment.
pub fn compile(expr: &str) -> Result<cel::Program, String> {
    env().compile(expr).map_err(|e| e.to_string())
}

fn context() -> cel::Context<'static, 'static> {
    cel::Context::with_env(Arc::clone(env()))
}

/// Evaluates one rule of a schema node.
pub fn evaluate(rule: &Value, this: &Value, old: Option<&Value>) -> Verdict {
    let Some(expr) = rule.get("rule").and_then(Value::as_str) else {
        return Verdict::Error("rule is missing".into());
    };
    let uses_old = expr.contains("oldSelf");
    let optional_old = rule.get("optionalOldSelf").and_then(Value::as_bool) == Some(true);
    if uses_old && old.is_none() && !optional_old {
        // Transition rules only apply to updates.
        return Verdict::Pass;
    }
    let program = match compile(expr) {
        Ok(p) => p,
        Err(e) => return Verdict::Error(format!("compilation failed: {e}")),
    };
    let mut ctx = context();
    ctx.add_variable_from_value("self", to_cel(this));
    if let Some(o) = old {
        ctx.add_variable_from_value("oldSelf", to_cel(o));
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(true)) => Verdict::Pass,
        Ok(cel::Value::Bool(false)) => Verdict::Fail(message(rule, expr, this, old)),
        Ok(other) => Verdict::Error(format!("rule did not evaluate to a bool: {other:?}")),
        Err(e) => Verdict::Error(format!("{e}")),
    }
}

fn message(rule: &Value, expr: &str, this: &Value, old: Option<&Value>) -> String {
    if let Some(me) = rule.get("messageExpression").and_then(Value::as_str)
        && let Ok(p) = compile(me)
    {
        let mut ctx = context();
        ctx.add_variable_from_value("self", to_cel(this));
        if let Some(o) = old {
            ctx.add_variable_from_value("oldSelf", to_cel(o));
        }
        if let Ok(cel::Value::String(s)) = p.execute(&ctx) {
            return s.to_string();
        }
    }
    match rule.get("message").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => format!("failed rule: {expr}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_see_self_and_old_self() {
        let rule = json!({"rule": "self.min <= self.max", "message": "min must not exceed max"});
        assert_eq!(
            evaluate(&rule, &json!({"min": 1, "max": 2}), None),
            Verdict::Pass
        );
        assert_eq!(
            evaluate(&rule, &json!({"min": 3, "max": 2}), None),
            Verdict::Fail("min must not exceed max".into())
        );
        let transition = json!({"rule": "self == oldSelf", "message": "immutable"});
        assert_eq!(evaluate(&transition, &json!("a"), None), Verdict::Pass);
        assert_eq!(
            evaluate(&transition, &json!("b"), Some(&json!("a"))),
            Verdict::Fail("immutable".into())
        );
        let has = json!({"rule": "has(self.x) || self.y > 0"});
        assert_eq!(
            evaluate(&has, &json!({"y": 0}), None),
            Verdict::Fail("failed rule: has(self.x) || self.y > 0".into())
        );
    }

    #[test]
    fn kubernetes_string_functions_and_durations() {
        let rule = json!({"rule": "duration(string(int(self.substring(0, self.indexOf('d'))) * 24) + 'h') == duration('48h')"});
        assert_eq!(evaluate(&rule, &json!("2d"), None), Verdict::Pass);
        let bad = json!({"rule": "duration(self) > duration('0s')"});
        // Go's time.ParseDuration has no days: a rule that feeds it one fails at runtime.
        assert!(
            matches!(evaluate(&bad, &json!("1d"), None), Verdict::Error(_)),
            "{:?}",
            evaluate(&bad, &json!("1d"), None)
        );
        assert_eq!(
            evaluate(&bad, &json!("0s"), None),
            Verdict::Fail("failed rule: duration(self) > duration('0s')".into())
        );
    }

    #[test]
    fn message_expressions() {
        let rule = json!({"rule": "self.n < 3", "messageExpression": "'n is ' + string(self.n)"});
        assert_eq!(
            evaluate(&rule, &json!({"n": 5}), None),
            Verdict::Fail("n is 5".into())
        );
    }
}
