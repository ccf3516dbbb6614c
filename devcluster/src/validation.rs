//! Admission of custom resources against their CRD's `openAPIV3Schema`, as the real API server
//! does it: null and unknown fields pruned (unless `x-kubernetes-preserve-unknown-fields`),
//! defaults applied, then types, `required`, `enum`, bounds, `pattern`, sizes,
//! `x-kubernetes-int-or-string` and `x-kubernetes-validations` CEL rules checked, with every
//! violation reported as a cause of one 422 Invalid error. As on the real server, the CEL rules
//! only count when the schema found no type, required, enum or size violation.

use serde_json::{Value, json};

use crate::cel::{Verdict, evaluate};
use crate::error::{ApiError, Cause};
use crate::registry::ResourceInfo;

/// Prunes, defaults and validates a custom resource; `old` is the stored object on updates
/// (for transition rules), `strict` rejects unknown fields instead of dropping them silently.
pub fn admit(
    info: &ResourceInfo,
    version: &str,
    mut obj: Value,
    old: Option<&Value>,
    strict: bool,
) -> Result<Value, ApiError> {
    let Some(schema) = info
        .crd
        .as_ref()
        .and_then(|v| v.get(version))
        .and_then(|v| v.schema.clone())
    else {
        return Ok(obj);
    };
    let mut unknown = Vec::new();
    normalize_root(&mut obj, &schema, &mut unknown);
    if strict && !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|u| format!("unknown field \"{u}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{} in version \"{version}\" cannot be handled as a {}: strict decoding error: {}",
            info.kind,
            info.kind,
            list.join(", ")
        )));
    }
    let mut found = Found::default();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, prop) in props {
            if matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
                continue;
            }
            if let Some(v) = obj.get(k) {
                validate(v, prop, k, old.and_then(|o| o.get(k)), &mut found);
            }
        }
    }
    for req in strings(schema.get("required")) {
        if obj.get(&req).is_none() {
            found
                .schema
                .push(cause("FieldValueRequired", &req, "Required value".into()));
        }
    }
    let root_old = old.cloned();
    rules(&obj, &schema, "", root_old.as_ref(), &mut found.rules);
    let mut causes = found.schema;
    if causes.iter().any(blocks_rules) {
        // The real server reports this cause with a nil field path.
        causes.push(cause(
            "FieldValueInvalid",
            "<nil>",
            "Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
        ));
    } else {
        causes.extend(found.rules);
    }
    if causes.is_empty() {
        return Ok(obj);
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Err(ApiError::invalid(&info.group, &info.kind, name, causes))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn cause(reason: &str, field: &str, message: String) -> Cause {
    Cause {
        reason: reason.into(),
        field: field.into(),
        message,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn normalize_root(obj: &mut Value, schema: &Value, unknown: &mut Vec<String>) {
    let Some(m) = obj.as_object_mut() else { return };
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if !preserves(schema) {
        let extra: Vec<String> = m
            .keys()
            .filter(|k| {
                !props.contains_key(*k) && !matches!(k.as_str(), "metadata" | "apiVersion" | "kind")
            })
            .cloned()
            .collect();
        for k in extra {
            m.remove(&k);
            unknown.push(k);
        }
    }
    for (k, prop) in &props {
        if matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
            continue;
        }
        normalize_field(m, k, prop, k, unknown);
    }
}

/// Prunes nulls, applies the default and recurses into one property of an object.
fn normalize_field(
    m: &mut serde_json::Map<String, Value>,
    key: &str,
    prop: &Value,
    path: &str,
    unknown: &mut Vec<String>,
) {
    let nullable = prop.get("nullable").and_then(Value::as_bool) == Some(true);
    if m.get(key).is_some_and(Value::is_null) && !nullable {
        m.remove(key);
    }
    if !m.contains_key(key)
        && let Some(d) = prop.get("default")
    {
        m.insert(key.to_owned(), d.clone());
    }
    if let Some(v) = m.get_mut(key) {
        normalize(v, prop, path, unknown);
    }
}

fn normalize(v: &mut Value, schema: &Value, path: &str, unknown: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                if !preserves(schema) {
                    let extra: Vec<String> = m
                        .keys()
                        .filter(|k| !props.contains_key(*k))
                        .cloned()
                        .collect();
                    for k in extra {
                        m.remove(&k);
                        unknown.push(join(path, &k));
                    }
                }
                for (k, prop) in props {
                    normalize_field(m, k, prop, &join(path, k), unknown);
                }
            } else if let Some(add) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let keys: Vec<String> = m.keys().cloned().collect();
                for k in keys {
                    normalize_field(m, &k, add, &join(path, &k), unknown);
                }
            } else if !preserves(schema)
                && schema.get("type").and_then(Value::as_str) == Some("object")
            {
                // An object without properties and without preserve-unknown-fields keeps nothing.
                let keys: Vec<String> = m.keys().cloned().collect();
                for k in keys {
                    unknown.push(join(path, &k));
                }
                m.clear();
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    normalize(item, item_schema, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// How a failed rule shows the value it judged, as kube-apiserver since 1.35: a string quoted,
/// a number, boolean or null as it is, each followed by `: `; an object or array not at all
/// (`spec.scaling: Invalid value: maxReplicas must …`).
fn shown_value(v: &Value) -> String {
    match v {
        Value::Object(_) | Value::Array(_) => String::new(),
        simple => format!("{simple}: "),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What validation found: schema violations, and the messages of the CEL rules that failed.
#[derive(Default)]
struct Found {
    schema: Vec<Cause>,
    rules: Vec<Cause>,
}

/// Schema violations after which the API server does not run CEL rules at all (its
/// `hasBlockingErr`): a rule could not make sense of a value of the wrong type, a missing
/// required field, a value outside an enum, or one too long or too large to bound its cost.
fn blocks_rules(cause: &Cause) -> bool {
    matches!(
        cause.reason.as_str(),
        "FieldValueNotSupported"
            | "FieldValueRequired"
            | "FieldValueTooLong"
            | "FieldValueTooMany"
            | "FieldValueTypeInvalid"
    )
}

fn validate(v: &Value, schema: &Value, path: &str, old: Option<&Value>, found: &mut Found) {
    if v.is_null() {
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if int_or_string {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            found.schema.push(cause(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: \"{}\": {path} in body must be of type int-or-string: \"{}\"",
                    type_name(v),
                    type_name(v)
                ),
            ));
            return;
        }
    } else if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            found.schema.push(cause(
                "FieldValueTypeInvalid",
                path,
                format!(
                    "Invalid value: \"{}\": {path} in body must be of type {t}: \"{}\"",
                    type_name(v),
                    type_name(v)
                ),
            ));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        let supported: Vec<String> = e.iter().map(Value::to_string).collect();
        found.schema.push(cause(
            "FieldValueNotSupported",
            path,
            format!(
                "Unsupported value: {v}: supported values: {}",
                supported.join(", ")
            ),
        ));
    }
    if let Some(n) = v.as_f64() {
        let excl_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
        let excl_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && (n < min || (excl_min && n == min))
        {
            let rel = if excl_min {
                "greater than"
            } else {
                "greater than or equal to"
            };
            found.schema.push(cause(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: {v}: {path} in body should be {rel} {}",
                    schema["minimum"]
                ),
            ));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && (n > max || (excl_max && n == max))
        {
            let rel = if excl_max {
                "less than"
            } else {
                "less than or equal to"
            };
            found.schema.push(cause(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: {v}: {path} in body should be {rel} {}",
                    schema["maximum"]
                ),
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            found.schema.push(cause(
                "FieldValueInvalid",
                path,
                format!("Invalid value: {v}: {path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            found.schema.push(cause(
                "FieldValueTooLong",
                path,
                format!("Too long: may not be more than {max} bytes"),
            ));
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str)
            && regex::Regex::new(p).is_ok_and(|re| !re.is_match(s))
        {
            found.schema.push(cause(
                "FieldValueInvalid",
                path,
                format!("Invalid value: {v}: {path} in body should match '{p}'"),
            ));
        }
    }
    match v {
        Value::Object(m) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, prop) in props {
                    if let Some(child) = m.get(k) {
                        validate(
                            child,
                            prop,
                            &join(path, k),
                            old.and_then(|o| o.get(k)),
                            found,
                        );
                    }
                }
            } else if let Some(add) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, child) in m {
                    validate(
                        child,
                        add,
                        &join(path, k),
                        old.and_then(|o| o.get(k)),
                        found,
                    );
                }
            }
            for req in strings(schema.get("required")) {
                if !m.contains_key(&req) {
                    found.schema.push(cause(
                        "FieldValueRequired",
                        &join(path, &req),
                        "Required value".into(),
                    ));
                }
            }
            let n = m.len() as u64;
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && n > max
            {
                found.schema.push(cause(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {n}: must have at most {max} items"),
                ));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                found.schema.push(cause(
                    "FieldValueInvalid",
                    path,
                    format!("Invalid value: {n}: {path} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                found.schema.push(cause(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {n}: must have at most {max} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item, item_schema, &format!("{path}[{i}]"), None, found);
                }
            }
        }
        _ => {}
    }
    rules(v, schema, path, old, &mut found.rules);
}

/// Evaluates the node's `x-kubernetes-validations`.
fn rules(v: &Value, schema: &Value, path: &str, old: Option<&Value>, causes: &mut Vec<Cause>) {
    for rule in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = match rule.get("fieldPath").and_then(Value::as_str) {
            Some(fp) => format!("{path}{fp}").trim_start_matches('.').to_owned(),
            None => path.to_owned(),
        };
        let ty = json!(type_name(v));
        let shown = shown_value(v);
        match evaluate(rule, v, old) {
            Verdict::Pass => {}
            Verdict::Fail(msg) => {
                let reason = rule
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("FieldValueInvalid");
                let message = match reason {
                    "FieldValueForbidden" => format!("Forbidden: {msg}"),
                    "FieldValueRequired" => format!("Required value: {msg}"),
                    "FieldValueDuplicate" => format!("Duplicate value: {msg}"),
                    _ => format!("Invalid value: {shown}{msg}"),
                };
                causes.push(cause(reason, &field, message));
            }
            Verdict::Error(e) => {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {ty}: rule evaluation error: {e}"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::from_crd;

    fn info() -> ResourceInfo {
        from_crd(&json!({"spec": {"group": "x.dev", "names": {"plural": "things", "kind": "Thing"}, "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "required": ["size"],
                    "x-kubernetes-validations": [{"rule": "self.size <= self.max", "message": "size must not exceed max"}],
                    "properties": {
                        "size": {"type": "integer", "minimum": 0},
                        "max": {"type": "integer", "default": 10},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "port": {"x-kubernetes-int-or-string": true},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "name": {"type": "string", "pattern": "^[a-z]+$"},
                        "tag": {"type": "string", "x-kubernetes-validations": [{"rule": "self != 'latest'", "message": "tag must be pinned"}]},
                        "count": {"type": "integer", "x-kubernetes-validations": [{"rule": "self % 2 == 0", "message": "count must be even"}]}
                    }}}}}}]}}))
        .unwrap()
    }

    #[test]
    fn defaults_and_pruning() {
        let obj = json!({"apiVersion": "x.dev/v1", "kind": "Thing", "metadata": {"name": "t"},
            "spec": {"size": 1, "junk": true, "port": "http", "free": {"any": 1}}, "extra": 1});
        let out = admit(&info(), "v1", obj, None, false).unwrap();
        assert_eq!(
            out["spec"],
            json!({"size": 1, "max": 10, "port": "http", "free": {"any": 1}})
        );
        assert!(out.get("extra").is_none());
    }

    #[test]
    fn strict_reports_unknown_fields() {
        let obj = json!({"metadata": {"name": "t"}, "spec": {"size": 1, "junk": true}});
        let err = admit(&info(), "v1", obj, None, true).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message.contains("unknown field \"spec.junk\""),
            "{}",
            err.message
        );
    }

    #[test]
    fn violations_become_causes() {
        let obj = json!({"metadata": {"name": "t"}, "spec": {"size": 20, "name": "A1"}});
        let err = admit(&info(), "v1", obj, None, false).unwrap_err();
        assert_eq!(err.code, 422);
        let fields: Vec<&str> = err.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.name", "spec"],
            "a pattern violation does not block rules"
        );
        assert!(
            err.message
                .contains("spec: Invalid value: size must not exceed max"),
            "an object's value is not shown: {}",
            err.message
        );
        // A simple value is shown (a string quoted), its type never.
        let obj =
            json!({"metadata": {"name": "t"}, "spec": {"size": 1, "tag": "latest", "count": 3}});
        let err = admit(&info(), "v1", obj, None, false).unwrap_err();
        assert!(
            err.message
                .contains(r#"spec.tag: Invalid value: "latest": tag must be pinned"#)
                && err
                    .message
                    .contains("spec.count: Invalid value: 3: count must be even"),
            "{}",
            err.message
        );
        // An enum violation does: the rules are not run, and the error says so.
        let obj =
            json!({"metadata": {"name": "t"}, "spec": {"size": 20, "mode": "c", "name": "A1"}});
        let err = admit(&info(), "v1", obj, None, false).unwrap_err();
        let fields: Vec<&str> = err.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.mode", "spec.name", "<nil>"],
            "{}",
            err.message
        );
        assert!(
            err.message.ends_with("<nil>: Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]"),
            "{}",
            err.message
        );
        let missing = admit(
            &info(),
            "v1",
            json!({"metadata": {"name": "t"}, "spec": {}}),
            None,
            false,
        )
        .unwrap_err();
        assert!(
            missing.message.contains("spec.size: Required value"),
            "{}",
            missing.message
        );
        let neg = admit(
            &info(),
            "v1",
            json!({"metadata": {"name": "t"}, "spec": {"size": -1}}),
            None,
            false,
        )
        .unwrap_err();
        assert!(
            neg.message.contains("greater than or equal to 0"),
            "{}",
            neg.message
        );
    }
}
